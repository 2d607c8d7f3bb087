"""``cessl serve``: a network's champions from one process over real HTTP (KServe, v2 protocol).

A tiny real setup: a tinylight backbone and two sites whose adapters differ in everything
an adapter can hold (ranks with unadapted layers, deactivation p, BatchNorm statistics,
biases, the head's classes), logged and registered in the sites' candidates models and
copied by signed promotions into ``serve-test-hospital-a`` / ``-hospital-b`` in a SQLite
MLflow store. The real server runs in a subprocess on a free port with ``--max-adapters 1``
(every switch between the sites evicts and reloads), and is called with httpx. What each
site answers must equal that site's own Predictor; a record that fails the signal-quality
check is answered unreadable with its reason, beside the good ones, and one with leads not
recorded is answered with a note; a signed promotion is
served without a restart, an alias moved without one is not; every kind of bad request is a
4xx with a message, and the process keeps running.
"""

from __future__ import annotations

import base64
import json
import os
import sys
import time
from pathlib import Path

import httpx
import mlflow
import numpy as np
import pytest
from quality_support import electrode_off, write_wfdb, zero_lead
from serve_support import BASE, CLASSES, SITES, build_network, read_signals
from servers import _log_tail, free_port, start_process_group, stop_process_group, wait_until

from ml.eval.predictor import load_predictor
from pipeline.registry.policy import promote, rollback, site_model_name
from pipeline.registry.tracking import CHALLENGER, candidates_model_name

REPO = Path(__file__).resolve().parents[2]
START_TIMEOUT_S = 120.0
MAX_BODY_MB = 64  # room for the ~48 MB liveness request; the 413 cases go just past it
RECORD = "E07500"


@pytest.fixture(scope="module")
def network(tmp_path_factory) -> dict:
    return build_network(tmp_path_factory.mktemp("network"))


@pytest.fixture(scope="module")
def signals(ecg_records_dir) -> np.ndarray:
    return read_signals(ecg_records_dir)


def _reference(network: dict, site: str, x: np.ndarray, sample_rate: float = 500.0) -> np.ndarray:
    return load_predictor(network["backbone"], network["adapters"][site]).predict_raw(x, sample_rate)


# --------------------------------------------------------------------------- the bank, in process


# --------------------------------------------------------------------------- the server over HTTP


class Server:
    def __init__(self, base: str, proc, log_path: Path) -> None:
        self.base, self.proc, self.log_path = base, proc, log_path
        self.http = httpx.Client(base_url=base, timeout=60.0)

    def infer(self, model: str, x: np.ndarray | None = None, **body) -> httpx.Response:
        if x is not None:
            body.setdefault(
                "inputs",
                [{"name": "signals", "datatype": "FP32", "shape": list(x.shape), "data": x.reshape(-1).tolist()}],
            )
        return self.http.post(f"/v2/models/{model}/infer", json=body)

    def alive(self) -> bool:
        return self.proc.poll() is None and self.http.get("/v2/health/live").status_code == 200

    def close(self) -> None:
        self.http.close()
        stop_process_group(self.proc)


def _start(network: dict, work: Path, *flags: str) -> Server:
    """``cessl serve`` for the network's sites and hospital-c (registered nowhere: served, never
    ready) with ``flags`` on a free port, up once hospital-a is ready (the server is not:
    hospital-c has no champion)."""
    port = free_port()
    log_path = work / "serve.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "AWS_"))}
    env |= {
        "PYTHONPATH": str(REPO),
        "OMP_NUM_THREADS": "1",
        "HOME": str(work),
        "CESSL_TRUST_FILE": network["trust_file"],
    }
    cmd = [
        sys.executable,
        "-m",
        "pipeline.cli",
        "serve",
        "--sites",
        str(network["sites_file"]),
        "--site",
        "hospital-c",  # registered nowhere: served, never ready
        "--model-name",
        BASE,
        "--tracking-uri",
        network["uri"],
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--max-adapters",
        "1",
        "--refresh-seconds",
        "0.5",
        "--max-body-mb",
        str(MAX_BODY_MB),
        *flags,
    ]
    proc = start_process_group(cmd, env, log_path, work)
    server = Server(f"http://127.0.0.1:{port}", proc, log_path)
    try:
        wait_until(
            lambda: server.http.get("/v2/models/hospital-a/ready").status_code == 200,
            proc,
            START_TIMEOUT_S,
            "cessl serve",
            log_path,
        )
    except BaseException:
        server.close()
        raise
    return server


@pytest.fixture(scope="module")
def server(network, tmp_path_factory):
    server = _start(network, tmp_path_factory.mktemp("serve"), "--batch-window-ms", "50", "--mixed-batches", "one-pass")
    try:
        yield server
    finally:
        server.close()


def _probabilities(response: httpx.Response) -> np.ndarray:
    assert response.status_code == 200, response.text
    out = {o["name"]: o for o in response.json()["outputs"]}
    return np.asarray(out["probabilities"]["data"], dtype=np.float64).reshape(out["probabilities"]["shape"])


def _outputs(response: httpx.Response) -> dict:
    return {o["name"]: o["data"] for o in response.json()["outputs"]}


@pytest.mark.integration
def test_health_and_readiness(server):
    assert server.http.get("/v2/health/live").json() == {"live": True}
    ready = server.http.get("/v2/health/ready")  # a configured site has no champion: not ready, and why
    assert ready.status_code == 503 and ready.json()["ready"] is False, ready.text
    assert "hospital-c: serve-test-hospital-c has no champion" in ready.json()["error"]
    assert "hospital-a" not in ready.json()["error"] and "hospital-b" not in ready.json()["error"]
    assert server.http.get("/v2/models/hospital-a/ready").json() == {"name": "hospital-a", "ready": True}
    not_ready = server.http.get("/v2/models/hospital-c/ready")
    assert not_ready.status_code == 503 and "serve-test-hospital-c has no champion" in not_ready.json()["error"]
    assert server.http.get("/v2/models/hospital-z/ready").status_code == 404
    assert set(server.http.get("/v2/models").json()["models"]) == {"hospital-a", "hospital-b", "hospital-c"}
    metadata = server.http.get("/v2/models/hospital-a").json()
    assert [i["name"] for i in metadata["inputs"]] == ["signals", "records"]
    assert server.http.get("/v2/models/hospital-a/versions/2/ready").json()["ready"] is True
    assert server.http.get("/v2/models/hospital-a/versions/7/ready").status_code == 404


@pytest.mark.integration
def test_each_site_answers_like_its_own_predictor(server, network, signals):
    """Alternating sites with --max-adapters 1 evicts and reloads on every switch."""
    for site in ("hospital-a", "hospital-b", "hospital-a", "hospital-b"):
        response = server.infer(site, signals)
        want = _reference(network, site, signals)
        assert np.abs(_probabilities(response) - want).max() < 1e-5, site
        body = response.json()
        assert body["model_name"] == site_model_name(BASE, site) and body["model_version"] == "1"
        assert body["parameters"]["site"] == site and body["parameters"]["alias"] == "champion"
        out = _outputs(response)
        assert out["classes"] == CLASSES[site] and len(out["diagnoses"]) == len(signals)
        thresholds = np.asarray(out["thresholds"])
        for row, codes in zip(want, out["codes"], strict=True):
            expected = [c for c, p, t in zip(CLASSES[site], row, thresholds, strict=True) if p >= t]
            assert codes == ";".join(expected)
    names = _outputs(server.infer("hospital-a", signals[:1]))
    assert names["class_names"] == ["AF", "IAVB", "RBBB", "NSR"]
    assert names["descriptions"][0] == "atrial fibrillation"
    assert "evicted" in server.log_path.read_text()


@pytest.mark.integration
def test_concurrent_requests_to_different_sites_do_not_mix(server, network, signals):
    """Requests for both sites at once (threads): each answer is its own site's."""
    from concurrent.futures import ThreadPoolExecutor

    x = signals[:1]
    want = {site: _reference(network, site, x) for site in SITES}
    sites = [SITES[i % 2] for i in range(8)]
    with ThreadPoolExecutor(max_workers=4) as pool:
        answers = list(pool.map(lambda site: server.infer(site, x), sites))
    for site, answer in zip(sites, answers, strict=True):
        assert np.abs(_probabilities(answer) - want[site]).max() < 1e-5, site


@pytest.mark.integration
def test_concurrent_requests_of_three_models_share_one_forward_pass(server, network, signals):
    """hospital-a, hospital-b and hospital-a:2 (hospital-b's adapter, another version) at once:
    they are answered by one multi-site pass (``batch_sites`` > 1) and each answer equals its
    own model's within 1e-5, whatever the order the records were batched in."""
    from concurrent.futures import ThreadPoolExecutor

    models = ["hospital-a", "hospital-b", "hospital-a:2", "hospital-b", "hospital-a", "hospital-a:2"]
    reference = {"hospital-a": "hospital-a", "hospital-b": "hospital-b", "hospital-a:2": "hospital-b"}
    want = {m: _reference(network, reference[m], signals[:2]) for m in reference}
    shared = 0
    for _ in range(5):  # the 50 ms window gathers them unless the machine stalls a request
        with ThreadPoolExecutor(max_workers=len(models)) as pool:
            answers = list(pool.map(lambda m: server.infer(m, signals[:2]), models))
        for model, answer in zip(models, answers, strict=True):
            assert np.abs(_probabilities(answer) - want[model]).max() < 1e-5, model
        shared = max(a.json()["parameters"]["batch_sites"] for a in answers)
        if shared > 1:
            break
    assert shared > 1, "no two sites ever shared a forward pass"


@pytest.mark.integration
def test_liveness_answers_while_a_large_request_is_parsed(server, network, signals):
    """A ~48 MB JSON request is parsed in the server's decoding child process and preprocessed
    in worker threads: /v2/health/live keeps answering within 100 ms meanwhile (parsed in a
    thread of the server process, the parse holds the GIL and stalls a probe 0.13-0.19 s; on
    the event loop ~0.2 s). The body is encoded before the probes start: encoding it in this
    process would hold this process's GIL."""
    import threading

    x = np.tile(signals, (10, 1, 1))[:40]  # 40 records x 12 x 5000: ~48 MB of JSON
    done = threading.Event()
    answer: list[httpx.Response] = []

    body = {"inputs": [{"name": "signals", "datatype": "FP32", "shape": list(x.shape), "data": x.ravel().tolist()}]}
    content = json.dumps(body).encode()

    def big() -> None:
        with httpx.Client(base_url=server.base, timeout=120.0) as client:
            headers = {"content-type": "application/json"}
            answer.append(client.post("/v2/models/hospital-b/infer", content=content, headers=headers))
        done.set()

    thread = threading.Thread(target=big)
    thread.start()
    latencies = []
    while not done.is_set():
        start = time.perf_counter()
        assert server.http.get("/v2/health/live").status_code == 200
        latencies.append(time.perf_counter() - start)
        time.sleep(0.01)
    thread.join()
    assert answer[0].status_code == 200, answer[0].text
    assert np.abs(_probabilities(answer[0])[:2] - _reference(network, "hospital-b", x[:2])).max() < 1e-5
    assert len(latencies) >= 5, latencies
    assert max(latencies) < 0.1, sorted(latencies)[-5:]


@pytest.mark.integration
def test_a_full_queue_is_answered_429(network, signals, tmp_path):
    """--max-queue 1 and a 300 ms window: of concurrent requests the first is admitted, the
    others are told the server is busy (429, Retry-After); then it answers again."""
    from concurrent.futures import ThreadPoolExecutor

    server = _start(network, tmp_path, "--max-queue", "1", "--batch-window-ms", "300")
    try:
        with ThreadPoolExecutor(max_workers=6) as pool:
            answers = list(pool.map(lambda m: server.infer(m, signals[:1]), ["hospital-a", "hospital-b"] * 3))
        codes = sorted(a.status_code for a in answers)
        assert 200 in codes and 429 in codes and set(codes) == {200, 429}, codes
        busy = next(a for a in answers if a.status_code == 429)
        assert "server busy" in busy.json()["error"] and "--max-queue 1" in busy.json()["error"]
        assert busy.headers["retry-after"] == "1"
        assert server.infer("hospital-b", signals[:1]).status_code == 200
        assert "Traceback" not in server.log_path.read_text()
    finally:
        server.close()


@pytest.mark.integration
def test_sample_rate_parameter_resamples_like_the_predictor(server, network, signals):
    x = signals[:, :, :2500]  # 10 s at 250 Hz
    response = server.infer("hospital-b", x, parameters={"sample_rate": 250})
    assert np.abs(_probabilities(response) - _reference(network, "hospital-b", x, 250.0)).max() < 1e-5


@pytest.mark.integration
def test_wfdb_records_as_bytes(server, network, ecg_records_dir):
    header = (ecg_records_dir / f"{RECORD}.hea").read_text()
    signal_file = header.splitlines()[1].split()[0]
    payload = base64.b64encode((ecg_records_dir / signal_file).read_bytes()).decode()
    body = {"inputs": [{"name": "records", "datatype": "BYTES", "shape": [1, 2], "data": [header, payload]}]}
    response = server.http.post("/v2/models/hospital-a/infer", json=body)
    want = load_predictor(network["backbone"], network["adapters"]["hospital-a"]).predict_records(
        [ecg_records_dir / RECORD]
    )
    got = _probabilities(response)
    assert np.abs(got - want[[f"p_{c}" for c in CLASSES["hospital-a"]]].to_numpy()).max() < 1e-5


def _records_input(headers: list[Path]) -> dict:
    """The ``records`` input of WFDB records on disk: per record its header text and base64 signal file."""
    data = []
    for header in headers:
        text = header.read_text()
        signal_file = header.with_name(text.splitlines()[1].split()[0])
        data += [text, base64.b64encode(signal_file.read_bytes()).decode()]
    return {"inputs": [{"name": "records", "datatype": "BYTES", "shape": [len(headers), 2], "data": data}]}


@pytest.mark.integration
def test_a_record_failing_signal_quality_is_answered_unreadable(server, network, signals, ecg_records_dir, tmp_path):
    """Good and faulty records in one request, as signals and as WFDB files: each faulty one gets
    status ``unreadable``, its reason per lead, no diagnoses and -1 probabilities; each good one
    its site's own answer, and one with leads not recorded (all zeros: the real JS20004's V2, V4
    and V6, or a zeroed V3) its answer with the note in ``notes``. A record too short for the
    model is such an answer too, not a 400."""
    metadata = server.http.get("/v2/models/hospital-a").json()
    assert {"status", "reason", "notes"} <= {o["name"] for o in metadata["outputs"]}
    unrecorded = zero_lead(signals[1], "V3")
    batch = np.stack([signals[0], electrode_off(signals[0], "V3"), signals[1], unrecorded]).astype(np.float32)
    response = server.infer("hospital-a", batch)
    out = _outputs(response)
    assert out["status"] == ["ok", "unreadable", "ok", "ok"]
    assert out["reason"][0] == out["reason"][2] == out["reason"][3] == ""
    assert out["reason"][1].startswith("signal quality: V3: flat (peak-to-peak 0.0")
    assert out["notes"] == ["", "", "", "signal quality: V3 not recorded (all samples 0)"]
    assert out["diagnoses"][1] == out["codes"][1] == ""
    probs = _probabilities(response)
    assert (probs[1] == -1).all()
    want = _reference(network, "hospital-a", np.stack([signals[0], signals[1], unrecorded]))
    assert np.abs(probs[[0, 2, 3]] - want).max() < 1e-5

    good = ecg_records_dir / f"{RECORD}.hea"
    zeros = write_wfdb(tmp_path, "zeros", np.zeros((12, 5000)), 500.0)  # refused by the strict reader alone
    unrecorded_file = ecg_records_dir / "JS20004.hea"  # real: V2, V4 and V6 not recorded
    response = server.http.post("/v2/models/hospital-b/infer", json=_records_input([zeros, good, unrecorded_file]))
    out = _outputs(response)
    assert out["status"] == ["unreadable", "ok", "ok"], response.text
    assert out["reason"] == ["signal quality: no lead recorded (all 12 are 0 mV throughout)", "", ""]
    assert out["notes"] == ["", "", "signal quality: V2, V4, V6 not recorded (all samples 0)"]
    want = load_predictor(network["backbone"], network["adapters"]["hospital-b"]).predict_records(
        [good, unrecorded_file]
    )
    got = _probabilities(response)[1:]
    assert np.abs(got - want[[f"p_{c}" for c in CLASSES["hospital-b"]]].to_numpy()).max() < 1e-5
    assert list(want["notes"]) == out["notes"][1:]

    short = server.http.post("/v2/models/hospital-a/infer", json=_signals_input([0.1] * 120, [1, 12, 10]))
    assert _outputs(short)["status"] == ["unreadable"] and "too short: 0.02 s" in _outputs(short)["reason"][0]
    assert server.alive()


@pytest.mark.integration
def test_explicit_version_and_alias_move_without_restart(server, network, signals):
    client = mlflow.MlflowClient(tracking_uri=network["uri"], registry_uri=network["uri"])
    name = site_model_name(BASE, "hospital-a")
    pinned = server.infer("hospital-a:2", signals)
    assert pinned.json()["model_version"] == "2" and pinned.json()["parameters"]["alias"] == "pinned"
    # v2 of hospital-a is hospital-b's adapter: it answers like hospital-b
    assert np.abs(_probabilities(pinned) - _reference(network, "hospital-b", signals)).max() < 1e-5
    by_param = server.infer("hospital-a", signals, parameters={"version": "2"})
    assert by_param.json()["model_version"] == "2"
    by_path = server.infer("hospital-a/versions/2", signals)  # the v2 protocol's versioned path
    assert by_path.json()["model_version"] == "2"
    signing = network["signing"]

    def served(version: str) -> httpx.Response:
        for _ in range(150):  # --refresh-seconds 0.5: picked up within a second
            answer = server.infer("hospital-a", signals)
            if answer.json()["model_version"] == version:
                break
            time.sleep(0.2)
        return answer

    try:
        client.set_registered_model_alias(candidates_model_name(name), CHALLENGER, "2")  # hospital-b's adapter
        decision = promote(client, name, force=True, reason="v2", **signing)  # a signed promotion
        assert decision.promoted and decision.production_version == "2"  # its earlier copy
        moved = served("2")
        assert moved.json()["model_version"] == "2", moved.text
        assert np.abs(_probabilities(moved) - _reference(network, "hospital-b", signals)).max() < 1e-5
        # the alias moved without a signed decision: v2 keeps answering, readiness says why
        client.set_registered_model_alias(name, "champion", "1")
        for _ in range(150):
            ready = server.http.get("/v2/models/hospital-a/ready")
            if ready.status_code == 503:
                break
            time.sleep(0.2)
        assert ready.status_code == 503, ready.text
        assert all(w in ready.json()["error"] for w in (name, "'champion' is v1", "names v2")), ready.text
        assert server.infer("hospital-a", signals).json()["model_version"] == "2"
        not_ready = server.http.get("/v2/health/ready")  # the site still answers; the server is not ready
        assert not_ready.status_code == 503 and "hospital-a: " in not_ready.json()["error"], not_ready.text
        assert "'champion' is v1" in not_ready.json()["error"]
        assert "serving the last verified champion v2" in server.log_path.read_text()
    finally:
        client.set_registered_model_alias(name, "champion", "2")
        rollback(client, name, reason="back to v1", **signing)  # signed: v1 again, ready again
    assert served("1").json()["model_version"] == "1"
    assert server.http.get("/v2/models/hospital-a/ready").status_code == 200
    assert "hospital-a" not in server.http.get("/v2/health/ready").json()["error"]  # only hospital-c is missing


@pytest.mark.integration
def test_a_signed_calibration_is_served_without_a_restart(server, network, signals):
    """Before: present / absent by the thresholds, ``calibrated`` false. A release manager's
    signed ``calibrate`` decision for hospital-b v1 is picked up at the next refresh: every
    record's decisions are the calibration's, with the refer classes and the miss-rate bounds."""
    from ml.eval.calibration import CalibrationConfig, calibrate
    from ml.eval.predictor import decisions_of
    from pipeline.registry.calibration import CalibrationFit, record_calibration

    site, classes = "hospital-b", CLASSES["hospital-b"]
    before = server.infer(site, signals)
    out = _outputs(before)
    assert before.json()["parameters"]["calibrated"] is False
    thresholds = np.asarray(out["thresholds"], dtype=np.float64)
    probs = _probabilities(before)
    assert out["decisions"] == list(decisions_of(probs, classes, thresholds).reshape(-1))
    assert out["miss_rate_bounds"] == [-1.0] * len(classes) and out["refer"] == [""] * len(signals)
    # a calibration whose refer band holds these records' AF probabilities: t_low below, t_high above them
    rng = np.random.default_rng(0)
    labels = np.zeros((400, len(classes)), dtype=bool)
    labels[:, 1] = True  # AF: 400 positives, their probabilities spread over [0, 1)
    calibration_probs = np.tile(probs.mean(axis=0), (400, 1))
    calibration_probs[:, 1] = rng.random(400) * probs[:, 1].min()
    calibration = calibrate(
        calibration_probs,
        labels,
        classes,
        np.maximum(thresholds, probs.max(axis=0) + 1e-3),  # t_high above every record: no "present" for AF
        CalibrationConfig(target_miss_rate=0.05, critical=("AF",)),
    )
    fit = CalibrationFit(records=400, unreadable=0, source="test", refer_rate=0.0, observed_miss={})
    client = mlflow.MlflowClient(tracking_uri=network["uri"], registry_uri=network["uri"])
    name = site_model_name(BASE, site)
    entry = record_calibration(client, name, "1", calibration, fit, **network["signing"])
    for _ in range(150):  # --refresh-seconds 0.5
        after = server.infer(site, signals)
        if after.json()["parameters"]["calibrated"]:
            break
        time.sleep(0.2)
    assert after.json()["parameters"] == after.json()["parameters"] | {
        "calibrated": True,
        "calibration_entry": entry.seq,
    }
    out = _outputs(after)
    decisions = calibration.decide(_probabilities(after))
    assert out["decisions"] == list(decisions.reshape(-1))
    assert all(d == "refer" for d in decisions[:, 1])  # AF is referred for every record, named as such
    assert all("AF" in refer.split(";") for refer in out["refer"])
    af = calibration.classes[1]
    assert out["miss_rate_bounds"][1] == pytest.approx(af.miss_rate_bound, rel=1e-6)
    assert out["miss_rate_uppers"][1] == pytest.approx(af.miss_rate_upper, rel=1e-6)
    assert server.infer(f"{site}:1", signals).json()["parameters"]["calibrated"] is True  # pinned: the same version
    card = server.http.get(f"/v2/models/{site}/card")
    assert card.status_code == 200 and card.headers["content-type"].startswith("text/markdown"), card.text
    assert card.text.startswith(f"# Model card: {name} v1") and f"(audit entry #{entry.seq})" in card.text
    assert "Not for clinical use without validation" in card.text
    assert server.http.get("/v2/models/hospital-z/card").status_code == 404
    assert server.http.get("/v2/models/hospital-c/card").status_code == 503  # no champion


def _signals_input(data, shape, datatype="FP32", name="signals") -> dict:
    return {"inputs": [{"name": name, "datatype": datatype, "shape": shape, "data": data}]}


BAD_REQUESTS = {
    "unknown site": ("hospital-z", _signals_input([0.0] * 12 * 10, [1, 12, 10]), 404, "no site 'hospital-z'"),
    "unknown version": ("hospital-a:99", _signals_input([0.0] * 12 * 10, [1, 12, 10]), 404, "no version 99"),
    "bad version": ("hospital-a:x", _signals_input([0.0] * 12 * 10, [1, 12, 10]), 404, "positive integer"),
    "no champion": ("hospital-c", _signals_input([0.0] * 12 * 10, [1, 12, 10]), 503, "no champion"),
    "wrong leads": ("hospital-a", _signals_input([0.0] * 11 * 100, [1, 11, 100]), 400, "[n, 12, samples]"),
    "data vs shape": ("hospital-a", _signals_input([0.0] * 10, [1, 12, 100]), 400, "does not fit shape"),
    "wrong dtype": ("hospital-a", _signals_input([0] * 1200, [1, 12, 100], "INT32"), 400, "must be FP32"),
    "strings": ("hospital-a", _signals_input(["a"] * 1200, [1, 12, 100]), 400, "signals"),
    "wrong input name": ("hospital-a", _signals_input([0.0] * 1200, [1, 12, 100], name="x"), 400, "exactly one input"),
    "no inputs": ("hospital-a", {"inputs": []}, 400, "exactly one input"),
    "missing inputs": ("hospital-a", {"parameters": {}}, 400, "inputs"),
    "missing shape": ("hospital-a", {"inputs": [{"name": "signals", "datatype": "FP32", "data": [1.0]}]}, 400, "shape"),
    "negative shape": ("hospital-a", _signals_input([0.0] * 1200, [1, -12, -100]), 400, "non-negative integers"),
    "per-input sample rate": (
        "hospital-a",
        {"inputs": [{**_signals_input([0.0] * 1200, [1, 12, 100])["inputs"][0], "parameters": {"sample_rate": 250}}]},
        400,
        "own parameter sample_rate, which would be ignored",
    ),
    "bad sample rate": (
        "hospital-a",
        {**_signals_input([0.0] * 1200, [1, 12, 100]), "parameters": {"sample_rate": -5}},
        400,
        "sample_rate",
    ),
    "too slow a sample rate": (
        "hospital-a",
        {**_signals_input([0.0] * 1200, [1, 12, 100]), "parameters": {"sample_rate": 10}},
        400,
        "sample_rate must be in [50",
    ),
    "unknown parameter": (
        "hospital-a",
        {**_signals_input([0.0] * 1200, [1, 12, 100]), "parameters": {"samplerate": 250}},
        400,
        "unknown parameters",
    ),
    "bad base64": (
        "hospital-a",
        _signals_input(["R 12 500 5000\nR.mat 16 1000 16 0 0 0 0 I", "!!"], [1, 2], "BYTES", "records"),
        400,
        "base64",
    ),
    "header escapes": (
        "hospital-a",
        _signals_input(["R 12 500 5000\n../x.mat 16 1000 16 0 0 0 0 I", "AAAA"], [1, 2], "BYTES", "records"),
        400,
        "bare NAME.mat",
    ),
}


@pytest.mark.integration
@pytest.mark.parametrize("case", sorted(BAD_REQUESTS))
def test_bad_requests_are_4xx_with_a_message(server, case):
    model, body, status, message = BAD_REQUESTS[case]
    response = server.http.post(f"/v2/models/{model}/infer", json=body)
    assert response.status_code == status, response.text
    assert message in response.json()["error"], response.text
    assert server.alive()


@pytest.mark.integration
def test_nan_malformed_json_and_oversized_bodies(server, signals):
    nan = (
        '{"inputs": [{"name": "signals", "datatype": "FP32", "shape": [1, 12, 2], "data": [NaN' + ", 0.0" * 23 + "]}]}"
    )
    for text, status, message in [
        (nan, 400, "NaN or infinite"),
        (nan.replace("NaN", "Infinity"), 400, "NaN or infinite"),
        ('{"inputs": [', 400, "malformed request"),
        ("not json at all", 400, "malformed request"),
    ]:
        response = server.http.post(
            "/v2/models/hospital-a/infer", content=text, headers={"content-type": "application/json"}
        )
        assert response.status_code == status, (text[:40], response.text)
        assert message in response.json()["error"], response.text
    big = server.http.post(
        "/v2/models/hospital-a/infer",
        content=b"x" * ((MAX_BODY_MB + 1) * 1024 * 1024),
        headers={"content-type": "application/json"},
    )
    assert big.status_code == 413 and f"exceeds the limit of {MAX_BODY_MB} MiB" in big.json()["error"]

    def chunks():
        for _ in range(MAX_BODY_MB * 11):
            yield b" " * (100 * 1024)

    streamed = server.http.post(
        "/v2/models/hospital-a/infer", content=chunks(), headers={"content-type": "application/json"}
    )
    assert streamed.status_code == 413, streamed.text
    assert server.alive()
    assert _probabilities(server.infer("hospital-b", signals[:1])).shape == (1, 3)  # still answers


@pytest.mark.integration
def test_no_traceback_for_bad_requests_in_the_log(server):
    log = server.log_path.read_text()
    assert "Traceback" not in log, _log_tail(server.log_path, 80)


@pytest.mark.integration
def test_sigterm_stops_the_server_gracefully(server):
    """Last in this module: the server goes down on SIGTERM (a pod's stop) without a traceback."""
    import signal

    server.proc.send_signal(signal.SIGTERM)
    assert server.proc.wait(timeout=30) is not None
    log = server.log_path.read_text()
    assert "Traceback" not in log, _log_tail(server.log_path, 40)
