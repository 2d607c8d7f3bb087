"""``cessl serve``: a network's champions from one process over real HTTP (KServe, v2 protocol).

A tiny real setup: a tinylight backbone and two sites whose adapters differ in everything
an adapter can hold (ranks with unadapted layers, deactivation p, BatchNorm statistics,
biases, the head's classes), logged and registered as ``serve-test-hospital-a`` /
``-hospital-b`` in a SQLite MLflow store, with ``champion`` aliases. The real server runs
in a subprocess on a free port with ``--max-adapters 1`` (every switch between the sites
evicts and reloads), and is called with httpx. What each site answers must equal that
site's own Predictor; a moved alias is served without a restart; every kind of bad
request is a 4xx with a message, and the process keeps running.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import httpx
import mlflow
import numpy as np
import pytest
import torch
from servers import free_port, start_process_group, stop_process_group, wait_until

from ml.eval.predictor import Predictor, load_predictor, read_wfdb
from ml.model.adapter import AdapterMeta, CheckpointError, load_backbone_weights, save_adapter, state_dict_identity
from ml.model.adapter_bank import AdapterLRU, SharedBackbone, read_site_adapter
from ml.model.backbone import ECGTransformer, backbone_config
from ml.model.lora import LoRAConfig, mark_trainable
from ml.model.pretrained import CODE15_CLASSES, read_backbone, save_backbone
from pipeline.registry.policy import site_model_name
from pipeline.registry.pyfunc_model import log_adapter_model

REPO = Path(__file__).resolve().parents[2]
BASE = "serve-test"
SITES = ("hospital-a", "hospital-b")
CLASSES = {
    "hospital-a": ["164889003", "270492004", "59118001", "426783006"],  # AF, IAVB, RBBB, SNR
    "hospital-b": ["426783006", "164889003", "713427006"],  # SNR, AF, complete RBBB
}
LORA = {
    "hospital-a": LoRAConfig(r=4, rank_map={"encoder_layers.0.conv1": 0, "classifier.0": 2}),
    "hospital-b": LoRAConfig(r=2, p=0.1, rank_map={"transformer_layers.0.fc1": 0}),
}
START_TIMEOUT_S = 120.0


def _adapter(root: Path, site: str, state: dict, seed: int) -> Path:
    """A site's adapter with every stored tensor moved off the backbone (as training would)."""
    torch.manual_seed(seed)
    classes = CLASSES[site]
    model = ECGTransformer(backbone_config("tinylight", len(classes)), LORA[site])
    load_backbone_weights(model, state, drop_head=True)
    mark_trainable(model, "lora")
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(torch.randn_like(param) * 0.05)
        for name, buffer in model.named_buffers():
            if name.endswith("running_mean"):
                buffer.add_(torch.randn_like(buffer) * 0.1)
    thresholds = [0.3 + 0.1 * i for i in range(len(classes))]
    meta = AdapterMeta(backbone_id=state_dict_identity(state), classes=classes, thresholds=thresholds)
    return save_adapter(model.eval(), root / f"adapter-{site}", meta)


@pytest.fixture(scope="module")
def network(tmp_path_factory) -> dict:
    """The backbone, both sites' adapters, and the store where they are registered:
    hospital-a v1 (champion) and v2 (= hospital-b's adapter, for the alias move), hospital-b v1."""
    root = tmp_path_factory.mktemp("network")
    torch.manual_seed(3)
    config = backbone_config("tinylight", len(CODE15_CLASSES))
    backbone = save_backbone(ECGTransformer(config).state_dict(), config, CODE15_CLASSES, root / "backbone")
    state = read_backbone(backbone).state
    adapters = {site: _adapter(root, site, state, seed) for seed, site in enumerate(SITES)}
    uri = f"sqlite:///{root / 'mlflow.db'}"
    previous = mlflow.get_tracking_uri(), mlflow.get_registry_uri()
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    try:
        experiment = mlflow.create_experiment("serving", artifact_location=(root / "mlruns").as_uri())
        infos = {}
        for site in SITES:
            with mlflow.start_run(experiment_id=experiment):
                name = site_model_name(BASE, site)
                infos[site] = log_adapter_model(backbone, adapters[site], CLASSES[site], registered_model_name=name)
        client = mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)
        name_a = site_model_name(BASE, "hospital-a")
        assert str(mlflow.register_model(infos["hospital-b"].model_uri, name_a).version) == "2"
        for site in SITES:
            client.set_registered_model_alias(site_model_name(BASE, site), "champion", "1")
    finally:
        mlflow.set_tracking_uri(previous[0])
        mlflow.set_registry_uri(previous[1])
    sites_file = root / "sites.yaml"
    sites_file.write_text("version: 1\nsites:\n" + "".join(f"  {site}:\n    source: data/{site}\n" for site in SITES))
    return {"root": root, "uri": uri, "backbone": backbone, "adapters": adapters, "sites_file": sites_file}


@pytest.fixture(scope="module")
def signals(ecg_records_dir) -> np.ndarray:
    """Two real 12-lead records at 500 Hz and one random one, (3, 12, 5000) float32."""
    real = [read_wfdb(ecg_records_dir / r)[0][:, :5000] for r in ("E07500", "E07501")]
    noise = np.random.default_rng(0).normal(0, 0.2, size=(12, 5000))
    return np.stack([*real, noise]).astype(np.float32)


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
    config = ServeConfig(sites=SITES, tracking_uri=network["uri"], model_name=BASE, refresh_seconds=0)
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


@pytest.fixture(scope="module")
def server(network, tmp_path_factory):
    work = tmp_path_factory.mktemp("serve")
    port = free_port()
    log_path = work / "serve.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "AWS_"))}
    env |= {"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "HOME": str(work)}
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
        "6",
    ]
    proc = start_process_group(cmd, env, log_path, work)
    server = Server(f"http://127.0.0.1:{port}", proc, log_path)
    try:
        wait_until(
            lambda: server.http.get("/v2/health/ready").status_code == 200,
            proc,
            START_TIMEOUT_S,
            "cessl serve",
            log_path,
        )
        yield server
    finally:
        server.http.close()
        stop_process_group(proc)


def test_bad_flags_are_one_line_errors(tmp_path):
    from pipeline.cli import main as cessl

    with pytest.raises(SystemExit) as exit_info:
        cessl(["serve", "--site", "x", "--port", "0"])
    assert exit_info.value.code == 2
    assert cessl(["serve", "--site", "Bad_Name", "--tracking-uri", f"sqlite:///{tmp_path}/mlflow.db"]) == 2
    assert cessl(["serve", "--tracking-uri", f"sqlite:///{tmp_path}/mlflow.db"]) == 2  # no sites
    assert cessl(["serve", "--sites", str(tmp_path / "missing.yaml")]) == 2
