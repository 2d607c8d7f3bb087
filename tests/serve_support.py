"""Helpers of the ``cessl serve`` tests (unit: the bank in process; integration: the server over
HTTP; no tests here): a tinylight backbone and two sites whose adapters differ in everything an
adapter can hold, registered as ``serve-test-hospital-a`` / ``-hospital-b`` in a SQLite MLflow store."""

from __future__ import annotations

from pathlib import Path

import mlflow
import numpy as np
import torch

from ml.eval.predictor import read_wfdb
from ml.model.adapter import AdapterMeta, load_backbone_weights, save_adapter, state_dict_identity
from ml.model.backbone import ECGTransformer, backbone_config
from ml.model.lora import LoRAConfig, mark_trainable
from ml.model.pretrained import CODE15_CLASSES, read_backbone, save_backbone
from pipeline.registry.policy import site_model_name
from pipeline.registry.pyfunc_model import log_adapter_model

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


def make_adapter(root: Path, site: str, state: dict, seed: int) -> Path:
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


def build_network(root: Path) -> dict:
    """The backbone, both sites' adapters, and the store where they are registered (in ``root``):
    hospital-a v1 (champion) and v2 (= hospital-b's adapter, for the alias move), hospital-b v1."""
    torch.manual_seed(3)
    config = backbone_config("tinylight", len(CODE15_CLASSES))
    backbone = save_backbone(ECGTransformer(config).state_dict(), config, CODE15_CLASSES, root / "backbone")
    state = read_backbone(backbone).state
    adapters = {site: make_adapter(root, site, state, seed) for seed, site in enumerate(SITES)}
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


def read_signals(ecg_records_dir: Path) -> np.ndarray:
    """Two real 12-lead records at 500 Hz and one random one, (3, 12, 5000) float32."""
    real = [read_wfdb(ecg_records_dir / r)[0][:, :5000] for r in ("E07500", "E07501")]
    noise = np.random.default_rng(0).normal(0, 0.2, size=(12, 5000))
    return np.stack([*real, noise]).astype(np.float32)
