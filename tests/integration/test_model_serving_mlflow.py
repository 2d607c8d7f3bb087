"""The registered pyfunc model is deployable: it loads outside this checkout (its code is
logged with it), installs anywhere (plain PyPI requirements), predicts every input its
documentation names, and ``mlflow models serve`` answers a real HTTP request with the
probabilities of ``cessl predict``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import urllib.request
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
from model_support import CLASSES, make_model_dirs, p_columns
from servers import _log_tail, free_port, start_process_group, stop_process_group, wait_until
from serving_support import sqlite_registry

from ml.eval.predictor import load_predictor, read_wfdb
from pipeline.cli import main as cessl
from pipeline.registry.pyfunc_model import load_predictor as load_registered_predictor
from pipeline.registry.pyfunc_model import load_pyfunc, log_adapter_model

MODEL_NAME = "serving-test"
RECORDS = ["E07500", "E07501", "HR06000"]
SERVE_START_TIMEOUT_S = 180.0


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory) -> tuple[Path, Path]:
    return make_model_dirs(tmp_path_factory.mktemp("model"))


@pytest.fixture(scope="module")
def registered(model_dirs, tmp_path_factory) -> tuple[str, str]:
    """``(tracking_uri, model_uri)``: the model logged and registered in a SQLite store."""
    with (
        sqlite_registry(tmp_path_factory.mktemp("store")) as (uri, experiment),
        mlflow.start_run(experiment_id=experiment),
    ):
        info = log_adapter_model(*model_dirs, classes=CLASSES, registered_model_name=MODEL_NAME)
    return uri, f"models:/{MODEL_NAME}/{info.registered_model_version}"


@pytest.fixture(scope="module")
def model_path(registered, tmp_path_factory) -> Path:
    """The registered model downloaded to a local folder (what a server would fetch)."""
    uri, model_uri = registered
    mlflow.set_registry_uri(uri)
    try:
        return Path(mlflow.artifacts.download_artifacts(model_uri, dst_path=str(tmp_path_factory.mktemp("downloaded"))))
    finally:
        mlflow.set_registry_uri(mlflow.get_tracking_uri())


@pytest.fixture(scope="module")
def reference(model_dirs, ecg_records_dir) -> pd.DataFrame:
    """What ``cessl predict`` computes for RECORDS (the Predictor on the same artifacts)."""
    return load_predictor(*model_dirs).predict_records([ecg_records_dir / r for r in RECORDS])


def _isolated_env(tmp: Path) -> dict[str, str]:
    """No PYTHONPATH, no MLflow settings, caches under ``tmp``: the model must bring its code."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH" and not k.startswith(("MLFLOW_", "AWS_"))}
    env |= {"HOME": str(tmp), "PYTHONNOUSERSITE": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    # the venv's scripts (``mlflow models serve`` runs ``uvicorn``) as an activated venv has them
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    return env


# The fresh interpreter hides this project: the editable install's finder of ``cessl`` is
# removed, so ``ml`` can only come from the model's logged code.
LOAD_SCRIPT = textwrap.dedent(
    """
    import json, sys
    sys.meta_path[:] = [f for f in sys.meta_path if "editable" not in type(f).__module__.lower()]
    import mlflow, numpy as np, pandas as pd
    model_path, records, out = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3]
    model = mlflow.pyfunc.load_model(model_path)
    x = np.load(out + "/signals.npy")
    by_array = model.predict(x)
    by_name = model.predict({"signals": x}, params={"sample_rate": 500.0})
    table = model.predict(pd.DataFrame({"record": records}))
    np.save(out + "/by_array.npy", by_array)
    np.save(out + "/by_name.npy", by_name)
    table.to_json(out + "/table.json", orient="split")
    names = ("ml", "ml.eval.predictor", "pipeline", "pipeline.registry.pyfunc_model", "pipeline.cli", "kfp", "cessl")
    mods = {m: getattr(sys.modules.get(m), "__file__", None) for m in names}
    json.dump(mods, open(out + "/modules.json", "w"))
    """
)


@pytest.mark.slow  # logging the model (module fixture) takes ~15 s
def test_requirements_are_installable_anywhere(model_path):
    requirements = (model_path / "requirements.txt").read_text().split()
    names = {r.split("==")[0].lower() for r in requirements if "==" in r}
    assert "cessl" not in names and {"torch", "mlflow", "numpy", "safetensors"} <= names
    assert not [r for r in requirements if "+" in r], requirements  # no local versions (+cpu)
    conda = (model_path / "conda.yaml").read_text()
    assert "cessl" not in conda and "+cpu" not in conda
    code = model_path / "code"
    assert (code / "ml" / "eval" / "predictor.py").is_file()
    assert sorted(p.name for p in (code / "pipeline").iterdir()) == ["__init__.py", "registry"]
    assert sorted(p.name for p in (code / "pipeline" / "registry").iterdir()) == ["__init__.py", "pyfunc_model.py"]
    info = mlflow.models.Model.load(model_path)
    assert info.metadata["classes"] == CLASSES and "probabilities" in info.metadata["output"]
    tensor = json.loads(info.metadata["input_tensor"])[0]
    assert tensor["name"] == "signals" and tensor["tensor-spec"]["shape"] == [-1, 12, -1]
    assert info.signature.inputs is None and info.signature.params.to_dict()[0]["name"] == "sample_rate"
    assert tuple(info.signature.outputs.to_dict()[0]["tensor-spec"]["shape"]) == (-1, len(CLASSES))
    example = json.loads((model_path / "serving_input_example.json").read_text())
    assert np.asarray(example["inputs"]["signals"]).shape == (1, 12, 5000)
    assert sum(f.stat().st_size for f in model_path.glob("*example*")) < 1_500_000  # zeros, indented JSON


@pytest.mark.integration
@pytest.mark.slow
def test_loads_and_predicts_outside_the_checkout(model_path, reference, ecg_records_dir, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    signals = np.stack([read_wfdb(ecg_records_dir / r)[0] for r in RECORDS]).astype(np.float32)
    np.save(out / "signals.npy", signals)
    records = [str(ecg_records_dir / r) for r in RECORDS]
    cwd = tmp_path / "empty"
    cwd.mkdir()
    run = subprocess.run(
        [sys.executable, "-I", "-c", LOAD_SCRIPT, str(model_path), json.dumps(records), str(out)],
        cwd=cwd,
        env=_isolated_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-4000:]

    modules = json.loads((out / "modules.json").read_text())
    code_dir = (model_path / "code").resolve()
    for name in ("ml", "ml.eval.predictor", "pipeline", "pipeline.registry.pyfunc_model"):
        assert Path(modules[name]).resolve().is_relative_to(code_dir), modules
    assert modules["pipeline.cli"] is None and modules["kfp"] is None and modules["cessl"] is None

    expected = reference[p_columns(reference)].to_numpy()
    by_array, by_name = np.load(out / "by_array.npy"), np.load(out / "by_name.npy")
    assert by_array.shape == (len(RECORDS), len(CLASSES)) and by_array.dtype == np.float32
    np.testing.assert_allclose(by_array, expected, atol=1e-5)
    np.testing.assert_allclose(by_name, expected, atol=1e-5)
    table = pd.read_json(out / "table.json", orient="split", dtype={"codes": str})
    assert list(table["record"]) == RECORDS
    np.testing.assert_allclose(table[p_columns(reference)].to_numpy(), expected, atol=1e-6)
    assert list(table["diagnoses"].fillna("")) == list(reference["diagnoses"])


@pytest.mark.slow
def test_in_process_load_matches_cessl_predict(registered, reference, ecg_records_dir, tmp_path):
    """``cessl predict`` (load_predictor of the registry) and the pyfunc agree; bad inputs are refused."""
    uri, model_uri = registered
    records = [str(ecg_records_dir / r) for r in RECORDS]
    out = tmp_path / "predictions.json"
    assert (
        cessl(
            ["predict", "--model", model_uri, *records, str(tmp_path / "gone"), "-o", str(out), "--tracking-uri", uri]
        )
        == 0
    )
    rows = json.loads(out.read_text())["records"]  # strict JSON: NaN of the unreadable record is null
    assert [r["record"] for r in rows] == [*RECORDS, "gone"] and rows[-1]["error"] and not rows[0]["error"]
    got = np.array([[r[c] for c in p_columns(reference)] for r in rows[:-1]])
    np.testing.assert_allclose(got, reference[p_columns(reference)].to_numpy(), atol=1e-6)
    assert all(rows[-1][c] is None for c in p_columns(reference))

    predictor = load_registered_predictor(model_uri, tracking_uri=uri)
    table = predictor.predict_records([ecg_records_dir / r for r in RECORDS])
    np.testing.assert_allclose(table[p_columns(table)], reference[p_columns(reference)], atol=1e-6)
    model = load_pyfunc(model_uri, tracking_uri=uri)
    with pytest.raises(mlflow.exceptions.MlflowException, match="shape"):
        model.predict(np.zeros((1, 3, 500), dtype=np.float32))
    with pytest.raises(mlflow.exceptions.MlflowException, match="record"):
        model.predict(pd.DataFrame({"a": [1], "b": [2]}))


@pytest.mark.slow
def test_predict_in_bf16_stays_close_to_fp32(registered, ecg_records_dir, tmp_path):
    """``cessl predict --precision bf16`` runs the forward under autocast: close to fp32, not equal."""
    uri, model_uri = registered
    records = [str(ecg_records_dir / r) for r in RECORDS]
    tables = {}
    for precision in ("fp32", "bf16"):
        out = tmp_path / f"{precision}.csv"
        argv = ["predict", "--model", model_uri, *records, "-o", str(out), "--tracking-uri", uri]
        assert cessl([*argv, "--precision", precision, "--device", "cpu"]) == 0
        tables[precision] = pd.read_csv(out, dtype={"codes": str})
    fp32, bf16 = (tables[p][p_columns(tables[p])].to_numpy() for p in ("fp32", "bf16"))
    np.testing.assert_allclose(bf16, fp32, atol=0.05)
    assert not np.array_equal(bf16, fp32), "--precision bf16 left the forward in float32"


def _post(url: str, payload: dict) -> tuple[int, dict]:
    request = urllib.request.Request(
        url, data=json.dumps(payload).encode(), headers={"Content-Type": "application/json"}, method="POST"
    )
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read() or b"{}")


@pytest.mark.integration
@pytest.mark.slow
def test_mlflow_models_serve_answers_http(model_path, reference, ecg_records_dir, tmp_path):
    cwd = tmp_path / "empty"
    cwd.mkdir()
    port = free_port()
    mlflow_cli = Path(sys.executable).with_name("mlflow")
    cmd = [str(mlflow_cli), "models", "serve", "-m", str(model_path), "--env-manager", "local"]
    cmd += ["-h", "127.0.0.1", "-p", str(port), "-w", "1"]
    log_path = tmp_path / "serve.log"
    server = start_process_group(cmd, _isolated_env(tmp_path), log_path, cwd)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_until(
            lambda: urllib.request.urlopen(f"{base}/ping", timeout=2).status == 200,
            server,
            SERVE_START_TIMEOUT_S,
            "mlflow models serve",
            log_path,
        )
        signals = np.stack([read_wfdb(ecg_records_dir / r)[0] for r in RECORDS])  # float64 mV, 500 Hz
        expected = reference[p_columns(reference)].to_numpy()

        status, body = _post(
            f"{base}/invocations", {"inputs": {"signals": signals.tolist()}, "params": {"sample_rate": 500}}
        )
        assert status == 200, (body, _log_tail(log_path))
        np.testing.assert_allclose(np.asarray(body["predictions"]), expected, atol=1e-5)

        status, body = _post(f"{base}/invocations", {"instances": signals.tolist()})
        assert status == 200, (body, _log_tail(log_path))
        np.testing.assert_allclose(np.asarray(body["predictions"]), expected, atol=1e-5)

        # the same records at 250 Hz are another input: the parameter reaches the model
        status, body = _post(
            f"{base}/invocations",
            {"inputs": {"signals": signals[:, :, ::2].tolist()}, "params": {"sample_rate": 250.0}},
        )
        assert status == 200 and np.asarray(body["predictions"]).shape == expected.shape

        records = [str(ecg_records_dir / r) for r in RECORDS]
        status, body = _post(
            f"{base}/invocations", {"dataframe_split": {"columns": ["record"], "data": [[r] for r in records]}}
        )
        assert status == 200, (body, _log_tail(log_path))
        rows = pd.DataFrame(body["predictions"])
        np.testing.assert_allclose(rows[p_columns(reference)].to_numpy(), expected, atol=1e-6)

        status, body = _post(f"{base}/invocations", {"inputs": {"signals": [[[0.0] * 10] * 3]}})
        assert status == 400 and "shape" in body.get("message", ""), body
    finally:
        stop_process_group(server)
    assert server.poll() is not None
