"""Every verb with bad values of every parameter it takes: a clear answer, before any work.

The cases are generated from the parameter definitions:

- every :class:`pipeline.core.params.PipelineParams` field's constraints (field metadata:
  ``minimum``, ``maximum``, ``exclusive_*``, ``choices``, ``check``) -> out-of-range,
  wrong-type and not-a-choice values for ``run``, ``submit``, ``schedule``, ``retrain`` and
  ``compare``;
- every other flag whose argparse ``type=`` is a range helper of
  :mod:`pipeline.core.constraints` (found by walking the parser) -> values outside its range;
- paths (missing inputs, a file where a folder is expected, a missing parent), URIs,
  unreachable servers (MLflow, KFP, Docker, S3), plus hypothesis properties of the ranges.

Each case asserts: the documented exit code, exactly one line on stderr naming the
parameter or file, no traceback, no file created in the working directory, and speed.
"""

from __future__ import annotations

import argparse
import dataclasses
import errno
import math
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pipeline_support import closed_port, snapshot

from ml.errors import (
    EXIT_BAD_FILE,
    EXIT_DISK,
    EXIT_STEP_FAILED,
    EXIT_UNAVAILABLE,
    EXIT_USAGE,
    ParameterError,
)
from pipeline import cli
from pipeline.cli.options import ParamsTarget
from pipeline.core import constraints
from pipeline.core.failures import describe, failed_run_message
from pipeline.core.logsafe import redact
from pipeline.core.params import DEFAULTS, PipelineParams, cli_fields, field_types
from pipeline.dags.compare import EXCLUDED_PARAMS

FAST_S = 5.0  # validation happens before any work: far below this
HOST = "http://127.0.0.1:9"  # never reached by the parameter cases (they fail first)


# --------------------------------------------------------------------------- helpers


@dataclasses.dataclass
class Outcome:
    code: int
    out: str
    err: str
    seconds: float

    @property
    def err_lines(self) -> list[str]:
        return [line for line in self.err.splitlines() if line.strip()]


# One parser for the module: building it (every verb and flag) costs far more than a case
# below, and main() parses with it as with a fresh one (argparse keeps no state between parses;
# test_the_shared_parser_parses_like_a_fresh_one checks it after all the cases).
BUILD_PARSER = cli.build_parser
PARSER = BUILD_PARSER()


@pytest.fixture(autouse=True, scope="module")
def one_parser() -> Iterator[None]:
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(cli, "build_parser", lambda: PARSER)
        yield


def run_cli(argv: list[str], capsys: pytest.CaptureFixture) -> Outcome:
    capsys.readouterr()
    start = time.perf_counter()
    try:
        code = cli.main([str(a) for a in argv])
    except SystemExit as exc:  # the parser's own errors
        code = exc.code if isinstance(exc.code, int) else EXIT_USAGE
    seconds = time.perf_counter() - start
    captured = capsys.readouterr()
    return Outcome(int(code), captured.out, captured.err, seconds)


def assert_clear_failure(outcome: Outcome, code: int, names: tuple[str, ...], limit: float = FAST_S) -> None:
    assert outcome.code == code, f"exit {outcome.code}, expected {code}: {outcome.err}"
    assert len(outcome.err_lines) == 1, f"expected one line on stderr, got:\n{outcome.err}"
    line = outcome.err_lines[0]
    assert "Traceback" not in outcome.err
    assert any(name in line for name in names), f"{line!r} names none of {names}"
    assert outcome.seconds < limit, f"took {outcome.seconds:.1f} s"


@pytest.fixture()
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """An empty working directory (no MLflow store, no data); checks nothing is created in it."""
    work = tmp_path / "work"
    work.mkdir()
    for name in ("src", "ingest", "store", "backbone"):
        (work / name).mkdir()
    (work / "ckpt.pt").write_bytes(b"not a checkpoint")
    monkeypatch.chdir(work)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    before = snapshot(work)
    yield work
    assert snapshot(work) == before, f"files created: {sorted(snapshot(work) - before)}"


# --------------------------------------------------------------------------- pipeline parameters

# Each verb that takes the generated pipeline flags, with the rest of a valid command line.
PARAM_VERBS: dict[str, tuple[list[str], tuple[str, ...]]] = {
    "run": ([], ()),
    "submit": (["--host", HOST], ()),
    "schedule": (["--host", HOST, "--cron", "0 3 * * 1"], ()),
    "retrain": ([], ()),
    "compare": ([], EXCLUDED_PARAMS),
}


def bad_values(field: dataclasses.Field, kind: type) -> list[str]:
    """Values that break the field's constraints (from its metadata)."""
    meta, values = field.metadata, []
    step = 1 if kind is int else 0.5
    if meta.get("minimum") is not None:
        values.append(meta["minimum"] - step)
    if meta.get("exclusive_minimum") is not None:
        values.append(meta["exclusive_minimum"])
    if meta.get("maximum") is not None:
        values.append(meta["maximum"] + step)
    if meta.get("exclusive_maximum") is not None:
        values.append(meta["exclusive_maximum"])
    texts = [str(int(v)) if kind is int else repr(float(v)) for v in values]
    if kind is int:
        texts += ["1.5", "many"]
    elif kind is float:
        texts += ["nan", "inf", "lots"]
    if meta.get("choices"):
        texts.append("no-such-choice")
    check = meta.get("check")
    if check == "source":
        texts += ["s3://", "ftp://host/records"]
    elif check == "non_empty":
        texts.append(" ")
    elif check == "model_name":
        texts.append("a/b@c")
    return texts


def param_cases() -> list[pytest.param]:
    types, cases = field_types(), []
    for verb, (extra, exclude) in PARAM_VERBS.items():
        for field in cli_fields(exclude):
            flag = field.metadata["flag"] or "--" + field.name.replace("_", "-")
            for value in bad_values(field, types[field.name]):
                cases.append(pytest.param(verb, flag, value, extra, id=f"{verb} {flag} {value}"))
    return cases


PARAM_CASES = param_cases()


def site_override_cases() -> list[pytest.param]:
    """`cessl sites add`: each override a site may set, with the bad values of its parameter."""
    from pipeline.core.sites import OVERRIDABLE

    types, fields = field_types(), {f.name: f for f in dataclasses.fields(PipelineParams)}
    cases = []
    for name in OVERRIDABLE:
        flag = fields[name].metadata["flag"] or "--" + name.replace("_", "-")
        for value in bad_values(fields[name], types[name]):
            cases.append(pytest.param(flag, value, id=f"sites add {flag} {value}"))
    return cases


@pytest.mark.parametrize(("flag", "value"), site_override_cases())
def test_bad_site_override(flag, value, workdir, capsys):
    outcome = run_cli(["sites", "add", "hospital-a", "src", "--file", "sites.yaml", flag, value], capsys)
    assert_clear_failure(outcome, EXIT_USAGE, (flag,))


@pytest.mark.parametrize(
    ("argv", "names"),
    [
        (["sites", "add", "Hospital_A", "src"], ("Hospital_A",)),
        (["sites", "add", "hospital-a", "s3://"], ("s3://",)),
        (["sites", "remove", "nope", "--file", "src/missing.yaml"], ("missing.yaml",)),
        (["sites", "list", "--file", "ckpt.pt"], ("ckpt.pt",)),
    ],
    ids=lambda v: " ".join(v) if isinstance(v, list) else "",
)
def test_bad_site_registry_input(argv, names, workdir, capsys):
    outcome = run_cli(argv, capsys)
    assert outcome.code != 0
    assert_clear_failure(outcome, outcome.code, names)


def test_every_numeric_pipeline_parameter_has_constraints():
    """A new numeric parameter without a range would be silently accepted at any value."""
    types = field_types()
    bounds = ("minimum", "maximum", "exclusive_minimum", "exclusive_maximum")
    for field in dataclasses.fields(PipelineParams):
        if types[field.name] in (int, float):
            assert any(field.metadata.get(b) is not None for b in bounds), field.name


@pytest.mark.parametrize(("verb", "flag", "value", "extra"), PARAM_CASES)
def test_bad_pipeline_parameter(verb, flag, value, extra, workdir, capsys):
    outcome = run_cli([verb, *extra, flag, value], capsys)
    assert_clear_failure(outcome, EXIT_USAGE, (flag,))


def test_validate_reports_every_problem_in_one_line():
    with pytest.raises(ParameterError) as err:
        DEFAULTS.replace(labelled_ratio=1.5, r=0, p=1.0, lr=-1.0, method="nope", val_every=0)
    message = str(err.value)
    assert "\n" not in message
    for flag in ("--labelled-ratio", "-r", "-p", "--lr", "--method", "--val-every"):
        assert flag in message


def test_the_kfp_validate_step_gets_the_same_answers():
    """What the pipeline's first step runs on the (text) values KFP hands it."""
    from pipeline.dags.tasks import validate

    assert validate({"epochs": "0.0", "max_steps": "7"}) == "7 steps"
    with pytest.raises(ParameterError, match=r"--labelled-ratio.*-r"):
        validate({**DEFAULTS.arguments(), "labelled_ratio": "0", "r": "0"})
    with pytest.raises(ParameterError, match="--lr"):
        validate({"lr": "fast"})


def test_the_compiled_pipeline_validates_first(tmp_path):
    import yaml

    from pipeline.dags.finetune import CompileOptions
    from pipeline.dags.spec import compile_spec, finetune_spec

    path = compile_spec(finetune_spec(), tmp_path / "p.yaml", CompileOptions.local("img:1"))
    spec = next(yaml.safe_load_all(path.read_text()))
    tasks = spec["root"]["dag"]["tasks"]
    for first in ("ingest", "resolve-backbone"):
        assert "validate" in tasks[first]["dependentTasks"], first


# --------------------------------------------------------------------------- every other flag


# A valid command line for every verb whose flags are checked by a type= range helper.
BASE_ARGV: dict[tuple[str, ...], list[str]] = {
    ("data", "synth"): ["data", "synth", "out"],
    ("data", "ingest"): ["data", "ingest", "src", "out"],
    ("data", "preprocess"): ["data", "preprocess", "ingest", "out"],
    ("data", "split"): ["data", "split", "store", "splits.json"],
    ("backbone", "pretrain"): ["backbone", "pretrain", "--store", "store", "--out", "out"],
    ("backbone", "pipeline", "compile"): ["backbone", "pipeline", "compile"],
    ("backbone", "pipeline", "run"): ["backbone", "pipeline", "run", "--source", "src"],
    ("backbone", "pipeline", "submit"): ["backbone", "pipeline", "submit", "--host", HOST],
    ("method-demo",): ["method-demo"],
    ("promote",): ["promote", "some-model"],
    ("compile",): ["compile"],
    ("compare",): ["compare"],
    ("run",): ["run"],
    ("retrain",): ["retrain"],
    ("submit",): ["submit", "--host", HOST],
    ("schedule",): ["schedule", "--host", HOST, "--cron", "0 3 * * 1"],
    ("serve",): ["serve", "--site", "hospital-a"],
    ("monitor",): ["monitor", "m", "--recent", "src"],
    ("calibrate",): ["calibrate", "m", "--records", "src"],
    ("card",): ["card", "m"],
}


def walk(
    parser: argparse.ArgumentParser, path: tuple[str, ...] = ()
) -> Iterator[tuple[tuple[str, ...], argparse.Action]]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from walk(sub, (*path, name))
        else:
            yield path, action


def range_flag_cases() -> list[pytest.param]:
    generated = {f.metadata["flag"] or "--" + f.name.replace("_", "-") for f in cli_fields()}
    cases = []
    for verb, action in walk(PARSER):
        bounds = getattr(action.type, "bounds", None)
        if not action.option_strings or bounds is None or verb not in BASE_ARGV:
            continue
        flag = action.option_strings[-1]
        if verb[0] in PARAM_VERBS and flag in generated:
            continue  # the pipeline parameters' cases above
        kind = action.type.kind
        step = 1 if kind is int else 0.5
        values = []
        if bounds["minimum"] is not None:
            values.append(bounds["minimum"] - step)
        if bounds["exclusive_minimum"] is not None:
            values.append(bounds["exclusive_minimum"])
        if bounds["maximum"] is not None:
            values.append(bounds["maximum"] + step)
        if bounds["exclusive_maximum"] is not None:
            values.append(bounds["exclusive_maximum"])
        texts = [str(int(v)) if kind is int else repr(float(v)) for v in values] + ["abc"]
        if kind is float:
            texts.append("nan")
        for text in texts:
            cases.append(pytest.param(verb, flag, text, id=f"{' '.join(verb)} {flag} {text}"))
    return cases


RANGE_CASES = range_flag_cases()


def test_no_numeric_flag_is_unchecked():
    """Every int/float flag of every verb goes through a range helper (no bare type=int)."""
    for verb, action in walk(PARSER):
        assert action.type not in (int, float), f"cessl {' '.join(verb)} {action.option_strings}: bare {action.type}"


def test_every_verb_with_a_numeric_flag_has_cases():
    """A verb with a range-checked flag must be in BASE_ARGV, or its flags get no generated case."""
    missing = {
        " ".join(verb)
        for verb, action in walk(PARSER)
        if action.option_strings and getattr(action.type, "bounds", None) is not None and verb not in BASE_ARGV
    }
    assert not missing, f"add these verbs to BASE_ARGV: {sorted(missing)}"


def test_the_issue_examples_are_among_the_cases():
    ids = {case.id for case in RANGE_CASES}
    for expected in (
        "data ingest --workers 0",
        "data ingest --min-duration -0.5",
        "data ingest --max-flat-leads -1",
        "data preprocess --min-count 0",
        "data synth --records 0",
        "data synth --fs 0.0",
    ):
        assert expected in ids, expected
    assert any(case.id == "run --batch-size -1" for case in PARAM_CASES)


@pytest.mark.parametrize(("verb", "flag", "value"), RANGE_CASES)
def test_bad_flag_value(verb, flag, value, workdir, capsys):
    outcome = run_cli([*BASE_ARGV[verb], flag, value], capsys)
    assert_clear_failure(outcome, EXIT_USAGE, (flag,))


# --------------------------------------------------------------------------- paths and URIs

PATH_CASES = [
    # (argv, names one of)
    (["data", "ingest", "missing", "out"], ("missing",)),
    (["data", "ingest", "ckpt.pt", "out"], ("ckpt.pt",)),
    (["data", "ingest", "src", "ckpt.pt"], ("ckpt.pt",)),  # an existing file as the output folder
    (["data", "ingest", "s3://", "out"], ("s3://",)),
    (["data", "ingest", "s3://Not_A_Bucket/x", "out"], ("Not_A_Bucket",)),
    (["data", "synth", "no/such/parent/out"], ("no/such/parent",)),
    (["data", "preprocess", "missing", "store2"], ("missing",)),
    (["data", "split", "missing", "s.json"], ("missing",)),
    (["data", "split", "store", "store"], ("store",)),  # a folder where a file is expected
    (["data", "add", "src", "--repo", "missing-repo"], ("missing-repo",)),
    (["data", "demo-data", "--repo", "missing-repo"], ("missing-repo",)),
    (["data", "version", "--repo", "ckpt.pt"], ("ckpt.pt",)),
    (["backbone", "import", "missing.pt", "--config", "tiny", "--out", "o"], ("missing.pt",)),
    (["backbone", "import", "src", "--config", "tiny", "--out", "o"], ("src",)),
    (["backbone", "import", "ckpt.pt", "--config", "huge", "--out", "o"], ("--config",)),
    (["backbone", "show", "missing"], ("missing",)),
    (["backbone", "pretrain", "--store", "missing", "--out", "o"], ("missing",)),
    (["compile", "-o", "store"], ("store",)),
    (["run", "--json", "no/such/dir/s.json"], ("no/such/dir",)),
    (["run", "--pipeline-root", "ckpt.pt/x"], ("ckpt.pt",)),
    (["run", "--tracking-uri", "mlflow.db"], ("mlflow.db",)),
    (["run", "--tracking-uri", "sqlite:///no/such/folder/mlflow.db"], ("no/such/folder",)),
    (["run", "--tracking-uri", "sqlite:///elsewhere.db"], ("elsewhere.db",)),  # a typo: no new empty store
    (["run", "--tracking-uri", "http://:5000"], ("http://:5000",)),
    (["run", "--source", "missing-data", "--no-demo-data"], ("missing-data",)),
    (["run", "--backbone", "missing-backbone"], ("missing-backbone",)),
    (["compare", "--backbone", "missing-backbone"], ("missing-backbone",)),
    (["models"], ("mlflow.db",)),  # nothing tracked here: no empty store is created
    (["models", "--tracking-uri", "sqlite:///typo.db"], ("typo.db",)),
    (["promote", "m", "--tracking-uri", "sqlite:///typo.db"], ("typo.db",)),
    (["predict", "--model", "models:/m@champion", "src", "--tracking-uri", "sqlite:///typo.db"], ("typo.db",)),
    (["predict", "--model", "models:/m@champion", "src", "-o", "no/such/dir/p.csv"], ("no/such/dir",)),
    (["backbone", "fetch", "models:/cessl-backbone-tiny/1", "--out", "o"], ("mlflow.db",)),
    (["submit", "--host", "kfp.example.org"], ("--host",)),
    (["submit", "--host", HOST, "--package", "missing.yaml"], ("missing.yaml",)),
    (["schedule", "--host", HOST, "--cron", "every monday"], ("--cron",)),
    (["schedule", "--host", HOST, "--cron", "0 3 * *"], ("--cron",)),
    # names that become paths must not escape their root
    (["data", "synth", "out", "--prefix", "../esc"], ("--prefix",)),
    (["data", "synth", "out", "--prefix", "a/b"], ("--prefix",)),
    (["data", "add", "src", "--name", "../esc"], ("--name",)),
    (["data", "add", "src", "--name", ".."], ("--name",)),
    # cluster settings: checked when parsed, not by kfp or the cluster later
    (["compile", "--finetune-cpu", "abc"], ("--finetune-cpu",)),
    (["compile", "--finetune-cpu", "0"], ("--finetune-cpu",)),
    (["compile", "--finetune-memory", "lots"], ("--finetune-memory",)),
    (["compile", "--image", ""], ("--image",)),
    (["compile", "--image", "Has Spaces:1"], ("--image",)),
    (["compile", "--accelerator-type", ""], ("--accelerator-type",)),
    (["run", "--image", ""], ("--image",)),
    # an alias is checked before the training, not when registering after it
    (["backbone", "default", "--register", "--alias", "bad alias"], ("--alias",)),
    (["backbone", "import", "ckpt.pt", "--config", "tiny", "--out", "o", "--register", "--alias", "x@y"], ("--alias",)),
]


@pytest.mark.parametrize(("argv", "names"), PATH_CASES, ids=[" ".join(a) for a, _ in PATH_CASES])
def test_bad_path_or_uri(argv, names, workdir, capsys):
    outcome = run_cli(argv, capsys)
    assert_clear_failure(outcome, EXIT_USAGE, names)


def test_predict_on_cuda_without_a_gpu_is_one_line_before_any_download(workdir, capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    outcome = run_cli(["predict", "--model", "models:/m@champion", "src", "--device", "cuda"], capsys)
    assert_clear_failure(outcome, EXIT_USAGE, ("--device cuda", torch.__version__))
    assert not Path("mlflow.db").exists()


def test_a_typo_in_the_store_path_creates_no_database(workdir, capsys, tmp_path):
    typo = tmp_path / "mlfow.db"
    outcome = run_cli(["run", "--tracking-uri", f"sqlite:///{typo}"], capsys)
    assert_clear_failure(outcome, EXIT_USAGE, (str(typo),))
    assert "--create-store" in outcome.err and not typo.exists()


def test_s3_without_credentials_is_code_3_and_leaves_no_output(workdir, capsys, monkeypatch):
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(workdir / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(workdir / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    outcome = run_cli(["data", "ingest", "s3://bucket/prefix", "out"], capsys)
    assert_clear_failure(outcome, EXIT_UNAVAILABLE, ("s3://bucket/prefix",), limit=15)
    assert "AWS_ACCESS_KEY_ID" in outcome.err


def test_s3_endpoint_that_does_not_answer_is_code_3(workdir, capsys, monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAIOSFODNN7EXAMPLE")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY")
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{closed_port()}")
    outcome = run_cli(["data", "ingest", "s3://bucket/prefix", "out"], capsys)
    assert_clear_failure(outcome, EXIT_UNAVAILABLE, ("127.0.0.1",), limit=15)
    assert "wJalrXUtnFEMI" not in outcome.err


# --------------------------------------------------------------------------- unreachable servers


@pytest.mark.parametrize(
    "argv",
    [
        ["models", "--tracking-uri"],
        ["promote", "m", "--tracking-uri"],
        ["run", "--tracking-uri"],
        ["retrain", "--tracking-uri"],
        ["compare", "--tracking-uri"],
    ],
    ids=lambda argv: argv[0],
)
def test_unreachable_mlflow_is_one_line_code_3(argv, workdir, capsys):
    uri = f"http://127.0.0.1:{closed_port()}"
    outcome = run_cli([*argv, uri], capsys)
    assert_clear_failure(outcome, EXIT_UNAVAILABLE, (uri,), limit=10)


@pytest.mark.parametrize("verb", [["submit"], ["schedule", "--cron", "0 3 * * 1"], ["retrain", "--create-store"]])
def test_unreachable_kfp_host_is_one_line_code_3(verb, workdir, capsys):
    host = f"http://127.0.0.1:{closed_port()}"
    outcome = run_cli([verb[0], "--host", host, *verb[1:]], capsys)
    assert_clear_failure(outcome, EXIT_UNAVAILABLE, (host,), limit=10)


def test_docker_runner_without_an_engine_is_one_line_code_3(workdir, capsys, monkeypatch):
    monkeypatch.setenv("DOCKER_HOST", f"unix://{workdir.parent / 'no-docker.sock'}")
    outcome = run_cli(["run", "--runner", "docker", "--no-demo-data"], capsys)
    assert_clear_failure(outcome, EXIT_UNAVAILABLE, ("no-docker.sock",), limit=10)


# --------------------------------------------------------------------------- the error boundary


def _raise(error: BaseException):
    def command(args) -> int:
        raise error

    return command


def _errors() -> list[tuple[BaseException, int, str]]:
    from botocore.exceptions import ClientError, EndpointConnectionError, NoCredentialsError

    oserror = OSError(errno.EROFS, "Read-only file system")
    oserror.filename = "/mnt/ro/out"
    full = OSError(errno.ENOSPC, "No space left on device")
    full.filename = "/data/store"
    cases: list[tuple[BaseException, int, str]] = [
        (NoCredentialsError(), EXIT_UNAVAILABLE, "AWS_ACCESS_KEY_ID"),
        (EndpointConnectionError(endpoint_url="http://s3.local:9000"), EXIT_UNAVAILABLE, "http://s3.local:9000"),
        (
            ClientError({"Error": {"Code": "NoSuchBucket", "Message": "no bucket"}}, "ListObjectsV2"),
            EXIT_USAGE,
            "NoSuchBucket",
        ),
        (
            ClientError({"Error": {"Code": "InvalidAccessKeyId", "Message": "bad key"}}, "ListObjectsV2"),
            EXIT_UNAVAILABLE,
            "InvalidAccessKeyId",
        ),
        (oserror, EXIT_DISK, "/mnt/ro/out"),
        (full, EXIT_DISK, "/data/store"),
        (ConnectionRefusedError(111, "Connection refused"), EXIT_UNAVAILABLE, "Connection refused"),
        (FileExistsError(17, "File exists", "out"), EXIT_USAGE, "out"),
    ]
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import RESOURCE_DOES_NOT_EXIST

    cases.append(
        (
            MlflowException("Registered model alias champion not found.", error_code=RESOURCE_DOES_NOT_EXIST),
            EXIT_USAGE,
            "champion",
        )
    )
    cases.append(
        (
            MlflowException("API request to http://x:5000/api failed: Max retries exceeded\nline 2"),
            EXIT_UNAVAILABLE,
            "http://x:5000",
        )
    )
    from safetensors import SafetensorError

    cases.append((SafetensorError("Error while deserializing header: HeaderTooLarge"), EXIT_BAD_FILE, "safetensors"))
    import pickle

    cases.append((pickle.UnpicklingError("invalid load key, 'x'."), EXIT_BAD_FILE, "invalid load key"))
    from pipeline.dags.finetune import PipelineRunError

    cases.append((PipelineRunError("pipeline cessl: step 'finetune' failed"), EXIT_STEP_FAILED, "finetune"))
    try:
        import docker.errors

        cases.append(
            (docker.errors.DockerException("Error while fetching server API version"), EXIT_UNAVAILABLE, "Docker")
        )
    except ImportError:
        pass
    return cases


@pytest.mark.parametrize(
    ("error", "code", "named"), _errors(), ids=lambda v: type(v).__name__ if isinstance(v, BaseException) else str(v)
)
def test_known_failures_are_one_line_with_their_code(error, code, named, workdir, capsys, monkeypatch):
    from pipeline.cli import registry as registry_command

    monkeypatch.setattr(registry_command, "cmd_rollback", _raise(error))
    monkeypatch.setattr(cli, "build_parser", BUILD_PARSER)  # a parser that calls the patched command
    outcome = run_cli(["rollback", "m"], capsys)
    assert_clear_failure(outcome, code, (named,))
    verbose = run_cli(["-v", "rollback", "m"], capsys)
    assert verbose.code == code and "Traceback" in verbose.err, "-v adds the traceback"


def test_unknown_exceptions_keep_their_traceback(workdir, monkeypatch):
    from pipeline.cli import registry as registry_command

    monkeypatch.setattr(registry_command, "cmd_rollback", _raise(KeyError("a bug")))
    monkeypatch.setattr(cli, "build_parser", BUILD_PARSER)
    with pytest.raises(KeyError):
        cli.main(["rollback", "m"])
    assert describe(KeyError("x")) is None and describe(AttributeError("x")) is None


def test_a_failed_step_is_one_line_with_its_log(tmp_path):
    log = tmp_path / "last_run.log"
    log.write_text(
        "12:00:00.000 - INFO - Executing task 'ingest'\n"
        "Traceback (most recent call last):\n"
        '  File "x.py", line 1, in <module>\n'
        "components.common.StepError: /data/store: classes not found\n"
        "12:00:01.000 - ERROR - Task \x1b[96m'finetune'\x1b[0m finished with status \x1b[91mFAILURE\x1b[0m\n"
        "12:00:01.000 - ERROR - Pipeline \x1b[95m'cessl'\x1b[0m finished with status \x1b[91mFAILURE\x1b[0m. "
        "Inner task failed: \x1b[96m'finetune'\x1b[0m.\n"
    )
    message = failed_run_message("cessl", log)
    assert "\n" not in message
    assert "'finetune'" in message and "StepError: /data/store: classes not found" in message and str(log) in message


# --------------------------------------------------------------------------- hypothesis


@given(st.integers(max_value=0) | st.text(min_size=1).filter(lambda t: not t.strip().lstrip("+").isdigit()))
def test_records_is_a_positive_integer(value):
    with pytest.raises(argparse.ArgumentTypeError):
        constraints.positive_int(str(value))


@given(
    st.floats(allow_nan=True, allow_infinity=True),
    st.floats(-10, 10),
    st.floats(-10, 10),
)
def test_range_check_accepts_exactly_the_range(value, low, high):
    convert = constraints.number(float, minimum=min(low, high), exclusive_maximum=max(low, high))
    inside = math.isfinite(value) and min(low, high) <= value < max(low, high)
    try:
        assert convert(repr(value)) == value and inside
    except argparse.ArgumentTypeError:
        assert not inside


@settings(suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.floats(allow_nan=True, allow_infinity=True), st.sampled_from(["labelled_ratio", "p", "compress", "lr"]))
def test_pipeline_float_parameters_follow_their_metadata(value, name):
    field = next(f for f in dataclasses.fields(PipelineParams) if f.name == name)
    problem = constraints.field_problems(field, value)
    try:
        DEFAULTS.replace(**{name: value})
        assert problem is None
    except ParameterError as err:
        assert problem is not None and problem in str(err)


@settings(suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    st.text(alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), min_size=1, max_size=30)
)
def test_path_checks_answer_or_accept_and_create_nothing(tmp_path_factory, name):
    root = tmp_path_factory.mktemp("paths")
    (root / "file").write_text("x")
    before = snapshot(root)
    for check in (
        constraints.existing_dir,
        constraints.existing_file,
        constraints.output_dir,
        constraints.output_file,
        constraints.output_root,
    ):
        for text in (str(root / name), str(root / "file" / name)):
            try:
                check(text)
            except (argparse.ArgumentTypeError, ValueError):
                pass
            except OSError as err:  # e.g. a name too long: still a clean error type for argparse? no
                pytest.fail(f"{check.__name__}({text!r}) raised {err!r}")
    assert snapshot(root) == before


# --------------------------------------------------------------------------- real processes


# --------------------------------------------------------------------------- secrets


def test_redaction_of_keys_tokens_and_passwords(monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "hunter2-secret")
    text = (
        "{'X-Amz-Security-Token': b'IQoJb3JpZ2luX2VjEKnownToken', 'Authorization': b'AWS4-HMAC-SHA256 "
        "Credential=AKIAIOSFODNN7EXAMPLE/20240101/us-east-1/s3/aws4_request, Signature=abc'} "
        "aws_secret_access_key=wJalrXUtnFEMI/K7MDENG http://bob:pa55word@mlflow:5000 password=hunter2-secret"
    )
    clean = redact(text)
    for secret in ("IQoJb3JpZ2luX2VjEKnownToken", "AKIAIOSFODNN7EXAMPLE", "wJalrXUtnFEMI", "pa55word", "hunter2"):
        assert secret not in clean
    assert redact("/etc/passwd: not a folder") == "/etc/passwd: not a folder"


def test_third_party_loggers_stay_quiet_under_verbose(workdir, capsys):
    import logging

    run_cli(["-v", "data", "version"], capsys)
    for name in ("botocore", "urllib3", "boto3", "s3transfer"):
        assert logging.getLogger(name).getEffectiveLevel() >= logging.WARNING, name
    run_cli(["-v", "--debug-http", "data", "version"], capsys)
    assert logging.getLogger("botocore").getEffectiveLevel() == logging.DEBUG
    run_cli(["data", "version"], capsys)  # back to quiet for the next tests


# --------------------------------------------------------------------------- compare's grid


def grid_cases() -> list[pytest.param]:
    """Each grid flag takes a list of one pipeline parameter's values: the bad values of that
    parameter (from its metadata, as above), alone and inside a valid list, and bad lists."""
    from pipeline.cli.verbs import GRID_FLAGS

    types, fields, cases = field_types(), {f.name: f for f in dataclasses.fields(PipelineParams)}, []
    for flag, (name, default) in GRID_FLAGS.items():
        values = bad_values(fields[name], types[name])
        values += [f"{default},{values[0]}", "", ",", f"{default},", f"{default.split(',')[0]},{default}"]
        cases += [pytest.param(flag, value, id=f"compare {flag} {value!r}") for value in values]
    return cases


def test_grid_flags_are_generated_from_the_pipeline_parameters():
    from pipeline.cli.verbs import GRID_FLAGS
    from pipeline.dags.compare import GRID_FIELDS

    assert sorted(name for name, _ in GRID_FLAGS.values()) == sorted(GRID_FIELDS)
    actions = {
        a.option_strings[-1]: a for verb, a in walk(cli.build_parser()) if verb == ("compare",) and a.option_strings
    }
    for flag, (name, _) in GRID_FLAGS.items():
        assert actions[flag].type.item.field.name == name


@pytest.mark.parametrize(("flag", "value"), grid_cases())
def test_bad_grid_flag(flag, value, workdir, capsys):
    """Refused when parsed: before the project lock (no .cache/cessl/run.lock), before any log line."""
    outcome = run_cli(["compare", flag, value], capsys)
    assert_clear_failure(outcome, EXIT_USAGE, (flag,))
    assert not (workdir / ".cache").exists()


@pytest.mark.parametrize(
    "verb",
    [["run"], ["retrain"], ["compare", "--seeds", "0"], ["backbone", "pipeline", "run"]],
    ids=lambda v: " ".join(v[:3]),
)
def test_local_runs_check_everything_before_the_lock_and_the_first_log_line(verb, workdir, capsys):
    """A valid command line whose data cannot be had (no demo records outside the project, an
    empty --source): one line, no run.lock, no state folder, no MLflow store."""
    outcome = run_cli(verb, capsys)
    assert_clear_failure(outcome, EXIT_USAGE, ("--source",))
    outcome = run_cli([*verb, "--source", "src"], capsys)  # an empty folder: no WFDB record
    assert_clear_failure(outcome, EXIT_USAGE, ("src",))
    assert "no WFDB record" in outcome.err


# --------------------------------------------------------------------------- every choice


def choice_cases() -> list[pytest.param]:
    """Every option with choices, of every verb with a valid base command line (found by
    walking the parser): a value outside them."""
    cases = []
    for verb, action in walk(PARSER):
        if not action.option_strings or not action.choices or verb not in BASE_ARGV:
            continue
        flag = action.option_strings[-1]
        cases.append(pytest.param(verb, flag, id=f"{' '.join(verb)} {flag}"))
    return cases


@pytest.mark.parametrize(("verb", "flag"), choice_cases())
def test_bad_choice(verb, flag, workdir, capsys):
    outcome = run_cli([*BASE_ARGV[verb], flag, "no-such-choice"], capsys)
    assert_clear_failure(outcome, EXIT_USAGE, (flag,))


# --------------------------------------------------------------------------- every --tracking-uri

# A valid command line of every verb that takes --tracking-uri and opens the store locally.
TRACKING_ARGV: dict[tuple[str, ...], list[str]] = {
    ("run",): ["run", "--no-demo-data", "--source", "src"],
    ("retrain",): ["retrain", "--no-demo-data", "--source", "src"],
    ("compare",): ["compare", "--no-demo-data", "--source", "src"],
    ("models",): ["models"],
    ("promote",): ["promote", "m"],
    ("rollback",): ["rollback", "m"],
    ("access", "init"): ["access", "init", "--pipeline-user", "p"],
    ("access", "check"): ["access", "check", "m"],
    ("audit", "verify"): ["audit", "verify"],
    ("predict",): ["predict", "--model", "models:/m@champion", "src"],
    ("testset", "show"): ["testset", "show", "m"],
    ("testset", "refresh"): ["testset", "refresh", "m", "--reason", "new classes"],
    ("testset", "export"): ["testset", "export", "m"],
    ("backbone", "fetch"): ["backbone", "fetch", "models:/cessl-backbone-tiny/1", "--out", "o"],
    ("backbone", "default"): ["backbone", "default", "--register", "--cache-dir", "cache"],
    ("backbone", "import"): ["backbone", "import", "ckpt.pt", "--config", "tiny", "--out", "o", "--register"],
    ("backbone", "pretrain"): ["backbone", "pretrain", "--store", "store", "--out", "o", "--register"],
    ("backbone", "pipeline", "run"): ["backbone", "pipeline", "run", "--source", "src"],
    ("serve",): ["serve", "--site", "hospital-a"],
    ("monitor",): ["monitor", "m", "--recent", "src"],
    ("calibrate",): ["calibrate", "m", "--records", "src"],
    ("card",): ["card", "m"],
}
# The cluster's URI, handed to the pods (never opened on this machine).
CLUSTER_TRACKING = {("submit",), ("schedule",), ("backbone", "pipeline", "submit")}


def test_every_verb_with_a_tracking_uri_is_checked():
    verbs = {verb for verb, action in walk(PARSER) if "--tracking-uri" in action.option_strings}
    assert verbs - CLUSTER_TRACKING == set(TRACKING_ARGV), "a new verb takes --tracking-uri: add it here"
    for verb, action in walk(PARSER):
        if "--tracking-uri" in action.option_strings:
            assert action.type is constraints.tracking_uri, verb


def tracking_cases() -> list[pytest.param]:
    cases = []
    for verb, argv in TRACKING_ARGV.items():
        name = " ".join(verb)
        for uri, named in (
            ("sqlite:///{work}/nope/x.db", "{work}/nope"),  # a folder that does not exist: never created
            ("sqlite:///{work}/x.db", "{work}/x.db"),  # no such store: never created (a typo)
            ("sqlite:///{work}/src", "{work}/src"),  # a folder, not a .db file
            ("mlflow.db", "mlflow.db"),  # not a URI
        ):
            cases.append(pytest.param(argv, uri, named, id=f"{name} {uri.format(work='W')}"))
    return cases


@pytest.mark.parametrize(("argv", "uri", "named"), tracking_cases())
def test_bad_tracking_store(argv, uri, named, workdir, capsys):
    outcome = run_cli([*argv, "--tracking-uri", uri.format(work=workdir)], capsys)
    assert_clear_failure(outcome, EXIT_USAGE, (named.format(work=workdir),))
    assert "mlflow.store" not in outcome.err and "Creating initial MLflow database" not in outcome.out


@pytest.mark.parametrize(
    "argv",
    [argv for verb, argv in TRACKING_ARGV.items() if verb[0] in ("testset", "models", "promote", "predict", "audit")],
)
def test_registry_verbs_need_an_existing_default_store(argv, workdir, capsys):
    outcome = run_cli(argv, capsys)
    assert_clear_failure(outcome, EXIT_USAGE, ("mlflow.db",))


@pytest.mark.parametrize("verb", ["show", "refresh", "export"])
def test_testset_verbs_with_an_unreachable_server_are_code_3(verb, workdir, capsys):
    uri = f"http://127.0.0.1:{closed_port()}"
    argv = TRACKING_ARGV[("testset", verb)]
    outcome = run_cli([*argv, "--tracking-uri", uri], capsys)
    assert_clear_failure(outcome, EXIT_UNAVAILABLE, (uri,), limit=10)


# --------------------------------------------------------------------------- data remote


@pytest.fixture(scope="module")
def project_template(tmp_path_factory) -> tuple[Path, Path]:
    """``(project, storage)``: a git work tree with DVC and one remote ``origin`` (the storage
    folder), made once (git and DVC take seconds; a copy takes milliseconds)."""
    from ml.data.dvc import add_remote

    base = tmp_path_factory.mktemp("template")
    root, storage = base / "proj", base / "storage"
    root.mkdir()
    storage.mkdir()
    subprocess.run(["git", "init", "-q", str(root)], check=True)
    add_remote(root, "origin", str(storage))
    return root, storage


@pytest.fixture()
def project(workdir: Path, project_template: tuple[Path, Path]) -> Iterator[Path]:
    """The template's copy inside the checked working directory, its ``origin`` the copy's storage."""
    template, storage = project_template
    root = workdir / "proj"
    shutil.copytree(template, root, symlinks=True)
    (workdir / "storage").mkdir()
    config_file = root / ".dvc" / "config"
    config = config_file.read_text().replace(str(storage), str(workdir / "storage"))
    assert str(workdir / "storage") in config
    config_file.write_text(config)
    yield root
    assert config_file.read_text() == config, "the DVC config changed"
    for extra in ("proj", "storage"):  # made here, not by the command
        shutil.rmtree(workdir / extra)


def remote_cases() -> list[pytest.param]:
    add = ["data", "remote", "add"]
    cases = [
        # (argv, names one of)
        ([*add, "r", "{work}/storage2", "--repo", "{work}/missing-repo"], ("missing-repo",)),
        ([*add, "r", "{work}/storage2", "--default", "--repo", "{work}/src"], ("src",)),  # not git, not DVC
        ([*add, "r", "{work}/storage2", "--repo", "{work}/ckpt.pt"], ("ckpt.pt",)),
        ([*add, "r", "{work}/no/such/parent/x", "--repo", "{work}/proj"], ("no/such/parent",)),
        ([*add, "r", "{work}/ckpt.pt", "--repo", "{work}/proj"], ("ckpt.pt",)),  # a file, not a folder
        ([*add, "r", "s3://", "--repo", "{work}/proj"], ("s3://",)),
        ([*add, "r", "s3://Not_A_Bucket/x", "--repo", "{work}/proj"], ("Not_A_Bucket",)),
        ([*add, "r", "ftp://host/x", "--repo", "{work}/proj"], ("ftp",)),
        ([*add, "r", "", "--repo", "{work}/proj"], ("remote URL",)),
        ([*add, "a b", "{work}/storage2", "--repo", "{work}/proj"], ("a b",)),
        ([*add, "../r", "{work}/storage2", "--repo", "{work}/proj"], ("../r",)),
        ([*add, "r", "s3://bucket/x", "--endpoint-url", "minio:9000", "--repo", "{work}/proj"], ("--endpoint-url",)),
        (
            [*add, "r", "{work}/storage2", "--endpoint-url", "http://minio:9000", "--repo", "{work}/proj"],
            ("--endpoint-url",),
        ),
        ([*add, "origin", "{work}/storage2", "--repo", "{work}/proj"], ("origin", "--force")),  # exists
        (["data", "remote", "list", "--repo", "{work}/missing-repo"], ("missing-repo",)),
        (["data", "remote", "list", "--repo", "{work}/src"], ("src",)),
    ]
    return [pytest.param(argv, names, id=" ".join(argv[2:]).replace("{work}/", "")) for argv, names in cases]


def test_every_data_remote_verb_has_cases():
    verbs = {verb for verb, _ in walk(PARSER) if verb[:2] == ("data", "remote") and len(verb) == 3}
    assert verbs == {tuple(case.values[0][:3]) for case in remote_cases()}


@pytest.mark.parametrize(("argv", "names"), remote_cases())
def test_bad_data_remote(argv, names, project, capsys):
    work = project.parent
    outcome = run_cli([a.format(work=work) for a in argv], capsys)
    assert_clear_failure(outcome, EXIT_USAGE, names, limit=15)  # the name check asks DVC once
    assert not (work / "storage2").exists() and not (work / "src" / ".dvc").exists()


# --------------------------------------------------------------------------- lists (hypothesis)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(-5, 20), min_size=1, max_size=6))
def test_seed_lists_accept_exactly_distinct_non_negative_seeds(seeds):
    from pipeline.cli.verbs import grid_type

    convert = grid_type("seed", "0,1,2")
    valid = all(s >= 0 for s in seeds) and len(set(seeds)) == len(seeds)
    try:
        assert convert(",".join(map(str, seeds))) == tuple(seeds) and valid
    except argparse.ArgumentTypeError:
        assert not valid


@settings(max_examples=60, deadline=None)
@given(st.lists(st.floats(allow_nan=True, allow_infinity=True), min_size=1, max_size=4))
def test_ratio_lists_accept_exactly_distinct_fractions(ratios):
    from pipeline.cli.verbs import grid_type

    convert = grid_type("labelled_ratio", "0.05")
    valid = all(math.isfinite(r) and 0 < r < 1 for r in ratios) and len(set(ratios)) == len(ratios)
    try:
        assert convert(",".join(map(repr, ratios))) == tuple(ratios) and valid
    except argparse.ArgumentTypeError:
        assert not valid


def test_the_shared_parser_parses_like_a_fresh_one(workdir, capsys):
    """After every case above, the module's parser still gives what a new one gives."""
    fresh = BUILD_PARSER()
    for argv in [*BASE_ARGV.values(), *TRACKING_ARGV.values()]:
        assert _parsed(PARSER, argv) == _parsed(fresh, argv), argv


def _comparable(value):
    if isinstance(value, ParamsTarget):
        return (value.parser.prog, value.params.__name__)
    return getattr(value, "__qualname__", value) if callable(value) else value


def _parsed(parser: argparse.ArgumentParser, argv: list[str]) -> dict | int | str | None:
    try:  # a command built in a closure is a new function per parser: compared by its name;
        # the --params target holds its own parser: compared by that parser's prog and field set
        parsed = vars(parser.parse_args(argv))
        return {k: _comparable(v) for k, v in parsed.items()}
    except SystemExit as exc:
        return exc.code
