"""Helpers of the ``cessl serve`` tests (unit: the bank in process; integration: the server over
HTTP; no tests here): a tinylight backbone and two sites whose adapters differ in everything an
adapter can hold, registered as ``serve-test-hospital-a`` / ``-hospital-b`` in a SQLite MLflow store."""

from __future__ import annotations

from pathlib import Path

import mlflow
import numpy as np
from serving_support import random_backbone, site_adapter, sqlite_registry
from signing_support import make_signer

from ml.eval.predictor import read_wfdb
from ml.model.lora import LoRAConfig
from pipeline.registry.audit import current_user
from pipeline.registry.policy import promote, rollback, site_model_name
from pipeline.registry.pyfunc_model import log_adapter_model
from pipeline.registry.signing import load_signer, load_trust
from pipeline.registry.tracking import CHALLENGER, TAG_METHOD, candidates_model_name, model_digests

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
    thresholds = [0.3 + 0.1 * i for i in range(len(CLASSES[site]))]
    return site_adapter(
        root / f"adapter-{site}", state, "tinylight", CLASSES[site], LORA[site], seed=seed, thresholds=thresholds
    )


def build_network(root: Path) -> dict:
    """The backbone, both sites' adapters, and the store where they are registered (in ``root``): each
    site's adapter in its candidates model, copied into the production model by a signed
    promotion (hospital-a v1, hospital-b v1: the champions); hospital-a v2 is hospital-b's
    adapter (for the alias move), promoted and rolled back (signed), so v1 is champion again."""
    backbone, state = random_backbone(root, "tinylight", seed=3)
    adapters = {site: make_adapter(root, site, state, seed) for seed, site in enumerate(SITES)}
    with sqlite_registry(root) as (uri, experiment):
        infos = {}
        for site in SITES:
            with mlflow.start_run(experiment_id=experiment):
                infos[site] = log_adapter_model(backbone, adapters[site], CLASSES[site], registered_model_name=None)
        client = mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)
        keys = make_signer(root / "signing", current_user())
        signing = {"signer": load_signer(keys.private), "trust": load_trust(root / "signing" / "trust.yaml")}

        def promoted(site: str, adapter: str) -> str:
            """The pipeline registers ``adapter`` as the challenger of the site's candidates
            model; a signed promotion copies it into the production model (its version)."""
            name = site_model_name(BASE, site)
            tags = {TAG_METHOD: "cessl", **model_digests(backbone, adapters[adapter])}
            version = mlflow.register_model(infos[adapter].model_uri, candidates_model_name(name), tags=tags).version
            client.set_registered_model_alias(candidates_model_name(name), CHALLENGER, str(version))
            decision = promote(client, name, force=True, reason=f"{adapter}'s adapter", **signing)
            assert decision.promoted, decision.reason
            return str(decision.production_version)

        assert [promoted(site, site) for site in SITES] == ["1", "1"]
        name_a = site_model_name(BASE, "hospital-a")
        assert promoted("hospital-a", "hospital-b") == "2"
        assert rollback(client, name_a, reason="v1 again", **signing).restored == "1"
    sites_file = root / "sites.yaml"
    sites_file.write_text("version: 1\nsites:\n" + "".join(f"  {site}:\n    source: data/{site}\n" for site in SITES))
    return {
        "root": root,
        "uri": uri,
        "backbone": backbone,
        "adapters": adapters,
        "sites_file": sites_file,
        "signing": signing,
        "trust_file": str(root / "signing" / "trust.yaml"),
    }


def read_signals(ecg_records_dir: Path) -> np.ndarray:
    """Three real 12-lead records at 500 Hz, (3, 12, 5000) float32 (each passes the signal-quality
    check: random noise would be answered unreadable)."""
    real = [read_wfdb(ecg_records_dir / r)[0][:, :5000] for r in ("E07500", "E07501", "HR06001")]
    return np.stack(real).astype(np.float32)
