"""``cessl serve``'s adapter bank in process: a tinylight backbone and two sites whose adapters
differ in everything an adapter can hold (ranks with unadapted layers, deactivation p,
BatchNorm statistics, biases, the head's classes), registered in a SQLite MLflow store
(tests/serve_support.py). Each site's answer equals its own Predictor; the LRU evicts; a
registry outage keeps the last champion; a record failing the signal-quality check is answered
unreadable beside the good ones, one with a lead not recorded with a note; bad flags are one line. The real server over HTTP:
tests/integration/test_serve_http.py."""

from __future__ import annotations

import mlflow
import numpy as np
import pytest
import torch
from quality_support import clip_lead, electrode_off, zero_lead
from serve_support import BASE, SITES, build_network, read_signals
from servers import free_port

from ml.eval.predictor import Predictor, load_predictor
from ml.model.adapter import CheckpointError, state_dict_identity
from ml.model.adapter_bank import AdapterLRU, SharedBackbone, read_site_adapter
from ml.model.backbone import ECGTransformer
from ml.model.pretrained import read_backbone


@pytest.fixture(scope="module")
def network(tmp_path_factory) -> dict:
    return build_network(tmp_path_factory.mktemp("network"))


@pytest.fixture(scope="module")
def signals(ecg_records_dir) -> np.ndarray:
    return read_signals(ecg_records_dir)


# --------------------------------------------------------------------------- the bank, in process


def test_switched_backbone_equals_each_sites_own_predictor(network, signals):
    """Switching sites in and out of one backbone (in any order) gives each site's own
    probabilities; the backbone's tensors are the same objects before and after."""
    from ml.eval.predictor import preprocess_signal

    bb = read_backbone(network["backbone"])
    shared = SharedBackbone(bb.state, bb.config, bb.identity)
    before = {k: v.data_ptr() for k, v in shared.model.state_dict().items() if "lora" not in k}
    x = np.stack([preprocess_signal(r, 500.0) for r in signals.astype(np.float64)])
    adapters = {site: read_site_adapter(network["adapters"][site], site) for site in SITES}
    for site in ("hospital-a", "hospital-b", "hospital-a", "hospital-b", "hospital-a"):
        shared.activate(adapters[site])
        got = Predictor(shared.model, adapters[site].classes, np.asarray(adapters[site].thresholds), bb.identity)
        want = load_predictor(network["backbone"], network["adapters"][site])
        assert np.abs(got.predict_proba(x) - want.predict_proba(x)).max() < 1e-5, site
    untouched = [k for k, ptr in before.items() if k not in adapters["hospital-a"].tensors]
    assert untouched and all(shared.model.state_dict()[k].data_ptr() == before[k] for k in untouched)
    assert adapters["hospital-a"].nbytes < shared.nbytes


def test_bank_refuses_another_backbones_adapter(network):
    bb = read_backbone(network["backbone"])
    torch.manual_seed(99)
    other = ECGTransformer(bb.config).state_dict()
    shared = SharedBackbone(other, bb.config, state_dict_identity(other))
    with pytest.raises(CheckpointError, match="trained on backbone"):
        shared.activate(read_site_adapter(network["adapters"]["hospital-a"], "a"))


def test_lru_evicts_the_least_recently_used(network):
    loads = []

    def loader(site):
        def load():
            loads.append(site)
            return read_site_adapter(network["adapters"][site], site)

        return load

    lru = AdapterLRU(1)
    lru.get("a", loader("hospital-a"))
    lru.get("a", loader("hospital-a"))
    lru.get("b", loader("hospital-b"))
    assert loads == ["hospital-a", "hospital-b"] and lru.keys() == ["b"] and lru.evictions == 1
    with pytest.raises(ValueError, match="at least one"):
        AdapterLRU(0)


def test_a_registry_outage_keeps_the_last_champion(network, monkeypatch):
    """An unreachable registry does not take the sites down: the last resolved champion
    keeps answering; a site never resolved says the registry does not answer."""
    from pipeline.registry.store import TrackingConfig
    from pipeline.serving.server import ModelUnavailableError, Network, ServeConfig

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    config = ServeConfig(
        sites=SITES, tracking_uri=network["uri"], model_name=BASE, refresh_seconds=0, trust_file=network["trust_file"]
    )
    previous = mlflow.get_tracking_uri(), mlflow.get_registry_uri()
    net = Network(config)  # points the process's mlflow at the store (as the server does)
    try:
        assert net.champion("hospital-a").version == "1"
        net._client = TrackingConfig.resolve(f"http://127.0.0.1:{free_port()}").client()  # nothing listens
        assert net.champion("hospital-a").version == "1"
        assert net.resolve("hospital-a", None) == ("1", "champion")
        with pytest.raises(ModelUnavailableError, match="registry does not answer"):
            net.resolve("hospital-b", None)
    finally:
        net.close()
        mlflow.set_tracking_uri(previous[0])
        mlflow.set_registry_uri(previous[1])


def test_a_record_failing_signal_quality_is_unreadable_beside_the_good_ones(network, signals):
    """One request, good and faulty records: the faulty ones (an electrode off, a clipped lead) are
    never run through the model (NaN, no diagnoses, the reason per lead); the good ones get their
    site's own probabilities, and one with a lead not recorded (all zeros) is predicted with the
    note in ``notes``."""
    from pipeline.serving.server import Network, ServeConfig

    config = ServeConfig(sites=SITES, tracking_uri=network["uri"], model_name=BASE, trust_file=network["trust_file"])
    previous = mlflow.get_tracking_uri(), mlflow.get_registry_uri()
    net = Network(config)
    try:
        unrecorded = zero_lead(signals[1], "V3")
        batch = np.stack(
            [signals[0], electrode_off(signals[0], "V3"), signals[1], clip_lead(signals[1], "aVL"), unrecorded]
        )
        answer = net.predict("hospital-a", batch, 500.0)
        assert answer.statuses() == ["ok", "unreadable", "ok", "unreadable", "ok"]
        assert answer.problems[1].startswith("signal quality: V3: flat (peak-to-peak 0.0")
        assert answer.problems[3].startswith("signal quality: aVL: clipped: ")
        assert np.isnan(answer.probabilities[[1, 3]]).all() and answer.diagnoses[1] == answer.diagnoses[3] == []
        want = load_predictor(network["backbone"], network["adapters"]["hospital-a"]).predict_raw(
            np.stack([signals[0], signals[1], unrecorded]), 500.0
        )
        assert np.abs(answer.probabilities[[0, 2, 4]] - want).max() < 1e-5
        assert answer.problems[0] == answer.problems[2] == answer.problems[4] == ""
        assert answer.notes == ["", "", "", "", "signal quality: V3 not recorded (all samples 0)"]
        zeros = net.predict("hospital-b", np.zeros((1, 12, 5000)), 500.0)  # nothing to run: still an answer
        assert zeros.statuses() == ["unreadable"] and zeros.classes and np.isnan(zeros.probabilities).all()
        assert zeros.problems == ["signal quality: no lead recorded (all 12 are 0 mV throughout)"]
    finally:
        net.close()
        mlflow.set_tracking_uri(previous[0])
        mlflow.set_registry_uri(previous[1])


def test_a_port_in_use_is_one_line_before_any_model_loads(tmp_path, capsys):
    """The port is checked first: the registry (a store that does not exist) is never opened."""
    import socket

    from pipeline.cli import main as cessl

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        missing = f"sqlite:///{tmp_path}/never/mlflow.db"
        assert (
            cessl(["serve", "--site", "x", "--host", "127.0.0.1", "--port", str(port), "--tracking-uri", missing]) == 2
        )
    err = capsys.readouterr().err.strip()
    assert f"cannot listen on 127.0.0.1:{port}: Address already in use (--host / --port)" in err
    assert len(err.splitlines()) == 1 and not (tmp_path / "never").exists()
    assert cessl(["serve", "--site", "x", "--host", "no-such-host.invalid", "--tracking-uri", missing]) == 2
    assert "--host 'no-such-host.invalid': not an address of this machine" in capsys.readouterr().err


def test_bad_flags_are_one_line_errors(tmp_path):
    from pipeline.cli import main as cessl

    with pytest.raises(SystemExit) as exit_info:
        cessl(["serve", "--site", "x", "--port", "0"])
    assert exit_info.value.code == 2
    assert cessl(["serve", "--site", "Bad_Name", "--tracking-uri", f"sqlite:///{tmp_path}/mlflow.db"]) == 2
    assert cessl(["serve", "--tracking-uri", f"sqlite:///{tmp_path}/mlflow.db"]) == 2  # no sites
    assert cessl(["serve", "--sites", str(tmp_path / "missing.yaml")]) == 2


class _Sites:
    """What the batcher asks of the server's network, on a real shared backbone: a site's
    adapter switched in (``forward``) and the one-pass model of several sites (``multi_site``)."""

    def __init__(self, network: dict) -> None:
        bb = read_backbone(network["backbone"])
        self.shared = SharedBackbone(bb.state, bb.config, bb.identity)
        self.adapters = {site: read_site_adapter(network["adapters"][site], site) for site in SITES}

    def forward(self, adapter, x: np.ndarray) -> np.ndarray:
        self.shared.activate(adapter)
        return Predictor(
            self.shared.model, adapter.classes, np.asarray(adapter.thresholds), adapter.backbone_id
        ).predict_proba(x)

    def multi_site(self, adapters):
        from ml.model.multi_site import MultiSiteModel

        return MultiSiteModel(self.shared.base, self.shared.config, list({a.key: a for a in adapters}.values()))


@pytest.mark.parametrize("one_pass", [False, True], ids=["by-site", "one-pass"])
def test_a_mixed_batch_answers_each_record_with_its_own_site(network, signals, one_pass):
    """Interleaved requests of two sites, batched either way (`cessl serve --mixed-batches`):
    each request gets its own site's probabilities; by-site runs one forward per site."""
    from ml.eval.predictor import preprocess_signal
    from pipeline.serving.server import Batcher, _Job

    x = np.stack([preprocess_signal(r, 500.0) for r in signals.astype(np.float64)]).astype(np.float32)
    sites = _Sites(network)
    order = ["hospital-a", "hospital-b", "hospital-a", "hospital-b"]
    jobs = [_Job(sites.adapters[site], x[[i % len(x), (i + 1) % len(x)]]) for i, site in enumerate(order)]
    answers = Batcher(sites, 0.0, 64, one_pass=one_pass).forward(jobs)
    for site, job, (probs, shared) in zip(order, jobs, answers, strict=True):
        want = load_predictor(network["backbone"], network["adapters"][site]).predict_proba(job.x)
        assert np.abs(probs - want).max() < 1e-5, site
        assert shared == (2 if one_pass else 1)


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("flavors:\n  python_function:\n    artifacts:\n      adapter: {path: artifacts/adapter}\n", None),
        ("flavors: !!python/object/apply:os.system ['true']\n", "not a CE-SSL adapter model"),
        (  # an alias bomb beside a valid entry: a few lines a plain YAML load expands to 9^7 nodes
            "a: &a [x, x, x, x, x, x, x, x, x]\nb: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a]\n"
            "c: &c [*b, *b, *b, *b, *b, *b, *b, *b, *b]\nd: &d [*c, *c, *c, *c, *c, *c, *c, *c, *c]\n"
            "e: &e [*d, *d, *d, *d, *d, *d, *d, *d, *d]\nf: &f [*e, *e, *e, *e, *e, *e, *e, *e, *e]\n"
            "g: [*f, *f, *f, *f, *f, *f, *f, *f, *f]\n"
            "flavors:\n  python_function:\n    artifacts:\n      adapter: {path: artifacts/adapter}\n",
            "not a CE-SSL adapter model",
        ),
        ("flavors:\n  python_function:\n    artifacts: {}\n", "no 'adapter' artifact"),
        ("flavors:\n  python_function:\n    artifacts:\n      adapter: {path: ../../etc}\n", "escapes the model"),
        ("flavors:\n  python_function:\n    artifacts:\n      adapter: {path: /etc}\n", "escapes the model"),
    ],
)
def test_a_model_versions_mlmodel_is_read_as_an_untrusted_file(tmp_path, text, problem):
    """The server finds a version's adapter through its MLmodel, written by the pipeline's
    identity: no YAML tags, bounded aliases, a path inside the model, else the site's model is
    unavailable (one message naming the model), never a crash or a stalled server."""
    from pipeline.serving.server import ModelUnavailableError, mlmodel_artifact_path

    mlmodel = tmp_path / "MLmodel"
    mlmodel.write_text(text)
    uri = "models:/cessl-ecg-hospital-a/3"
    if problem is None:
        assert mlmodel_artifact_path(mlmodel, "adapter", uri) == "artifacts/adapter"
        return
    with pytest.raises(ModelUnavailableError, match=problem) as err:
        mlmodel_artifact_path(mlmodel, "adapter", uri)
    assert uri in str(err.value)
