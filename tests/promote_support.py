"""Real, tiny models and records for the promotion tests (``cessl promote`` recomputes its evidence).

- :func:`write_records`: a synthetic hospital of WFDB records (``ml.data.synth``) and the
  content hash of each (ingest's, ``ml.data.ingest``);
- :func:`make_backbone` / :func:`make_adapter`: a ``tinylight`` backbone and LoRA adapters over
  it; an adapter's per-class thresholds decide how good it is on any records: thresholds of
  0 diagnose every class (macro F-beta2 > 0), thresholds above 1 diagnose nothing (F-beta2 0);
- :class:`Pipeline`: what the pipeline's register step writes, with any MLflow client (a
  local SQLite store, or the pipeline identity on an authenticated server): a run (param
  ``source``), the pyfunc model, a version of ``<model>-candidates`` tagged with the method,
  test split, digests, backbone and classes, ``challenger`` for a production method, and the frozen test set at
  the first registration.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

CLASSES = ["426783006", "426177001", "427084000"]  # NSR, SB, STach: every synthetic record has one
N_RECORDS = 16
GOOD, BAD = 0.0, 1.01  # thresholds: every class diagnosed / none


def write_records(root: Path, n: int = N_RECORDS, seed: int = 0) -> tuple[Path, dict[str, str]]:
    """``n`` synthetic 12-lead records (8 s at 250 Hz, cheap to preprocess) and id -> content hash."""
    from ml.data.ingest import ingest, read_manifest
    from ml.data.synth import SynthConfig, generate

    folder = root / "records"
    generate(folder, SynthConfig(records=n, classes=tuple(CLASSES), seed=seed, fs=250.0, duration_s=8.0))
    ingest(folder, root / "ingest", progress=False)
    manifest = read_manifest(root / "ingest" / "manifest.parquet")
    accepted = manifest[manifest["status"] == "accepted"]
    return folder, dict(zip(accepted["id"].astype(str), accepted["content_hash"].astype(str), strict=True))


def make_backbone(root: Path) -> Path:
    from ml.model.backbone import ECGTransformer, backbone_config
    from ml.model.pretrained import CODE15_CLASSES, save_backbone

    torch.manual_seed(3)
    config = backbone_config("tinylight", len(CODE15_CLASSES))
    return save_backbone(ECGTransformer(config).state_dict(), config, CODE15_CLASSES, root / "backbone")


def make_adapter(root: Path, backbone: Path, name: str, threshold: float, method: str = "cessl", seed: int = 0) -> Path:
    """An adapter of ``backbone`` for :data:`CLASSES` whose thresholds are all ``threshold``."""
    from ml.model.adapter import AdapterMeta, load_backbone_weights, save_adapter, state_dict_identity
    from ml.model.backbone import ECGTransformer, backbone_config
    from ml.model.lora import LoRAConfig, mark_trainable
    from ml.model.pretrained import read_backbone

    torch.manual_seed(seed)
    state = read_backbone(backbone).state
    model = ECGTransformer(backbone_config("tinylight", len(CLASSES)), LoRAConfig(r=2))
    load_backbone_weights(model, state, drop_head=True)
    mark_trainable(model, "lora")
    meta = AdapterMeta(
        backbone_id=state_dict_identity(state), classes=list(CLASSES), thresholds=[threshold] * len(CLASSES)
    )
    meta.method = method
    return save_adapter(model.eval(), root / f"adapter-{name}", meta)


@dataclass
class Pipeline:
    """Registers like the pipeline's register step, through ``client`` (see the module doc)."""

    client: object
    model: str  # the production model; versions go to <model>-candidates
    records: Path
    hashes: dict[str, str]
    backbone: Path
    experiment: str = "cessl"
    site: str = ""
    registered: list[str] = field(default_factory=list)
    logged: dict[Path, tuple[str, str]] = field(default_factory=dict)  # adapter -> (run, model URI): logged once

    @property
    def candidates(self) -> str:
        from pipeline.registry.tracking import candidates_model_name

        return candidates_model_name(self.model)

    def _experiment_id(self) -> str:
        found = self.client.get_experiment_by_name(self.experiment)
        return found.experiment_id if found else self.client.create_experiment(self.experiment)

    @contextlib.contextmanager
    def _global_uri(self) -> Iterator[None]:
        """MLflow's fluent API (and a SQLite store resolving a logged model) on this client's store."""
        import mlflow

        from pipeline.registry.access import client_tracking_uri

        uri = client_tracking_uri(self.client)
        previous = mlflow.get_tracking_uri(), mlflow.get_registry_uri()
        mlflow.set_tracking_uri(uri)
        mlflow.set_registry_uri(uri)
        try:
            yield
        finally:
            mlflow.set_tracking_uri(previous[0])
            mlflow.set_registry_uri(previous[1])

    def log_model(self, adapter: Path) -> tuple[str, str]:
        """A run holding the pyfunc model of ``adapter``: (run id, model URI)."""
        import mlflow

        from pipeline.registry.pyfunc_model import log_adapter_model

        with mlflow.start_run(experiment_id=self._experiment_id()) as run:
            mlflow.log_param("source", str(self.records))
            info = log_adapter_model(self.backbone, adapter, list(CLASSES), registered_model_name=None)
        return run.info.run_id, info.model_uri

    def for_model(self, model: str, site: str = "") -> Pipeline:
        """The same pipeline registering for another production model (the models it logged are reused)."""
        return Pipeline(
            self.client, model, self.records, self.hashes, self.backbone, self.experiment, site, [], self.logged
        )

    def register(
        self,
        adapter: Path | None,
        method: str = "cessl",
        tags: dict[str, str] | None = None,
        challenger: bool | None = None,
    ) -> str:
        """A candidate version of ``adapter`` (None: a version with no model behind it); the
        ``challenger`` alias moves to it for a production method (or as ``challenger`` says)."""
        from ml.data.splits import Splits

        client = self.client
        test = [f"{self.site}/{i}" if self.site else i for i in sorted(self.hashes)]
        splits = Splits(
            test=test,
            train=[],
            valid=[],
            unlabelled=[],
            classes=list(CLASSES),
            test_hashes={k: self.hashes[k.split("/", 1)[-1] if self.site else k] for k in test},
        )
        with self._global_uri():
            version = self._register(client, splits, adapter, method, tags or {})
        if challenger if challenger is not None else self.is_production(method):
            from pipeline.registry.tracking import CHALLENGER

            client.set_registered_model_alias(self.candidates, CHALLENGER, version)
        return version

    @staticmethod
    def is_production(method: str) -> bool:
        from pipeline.registry.tracking import is_production_method

        return is_production_method(method)

    def _register(self, client, splits, adapter: Path | None, method: str, tags: dict[str, str]) -> str:
        from ml.model.adapter import read_adapter_config
        from pipeline.registry.testsets import after_registration
        from pipeline.registry.tracking import TAG_METHOD, TAG_TEST_SPLIT, model_digests

        run = client.create_run(self._experiment_id())  # each registration's own run (its frozen test set)
        run_id = run.info.run_id
        client.log_param(run_id, "source", str(self.records))
        if adapter is None:
            source, facts = f"{run.info.artifact_uri}/model", {}
        else:
            if adapter not in self.logged:
                self.logged[adapter] = self.log_model(adapter)
            source = self.logged[adapter][1]
            # the digests, backbone and classes the register step records (components.register)
            facts = model_digests(self.backbone, adapter)
            facts |= {"backbone_id": read_adapter_config(adapter)["backbone_id"], "classes": ",".join(CLASSES)}
        version_tags = {TAG_METHOD: method, TAG_TEST_SPLIT: splits.test_split_hash, **facts, **tags}
        if self.site:
            version_tags["site"] = self.site
        try:
            client.get_registered_model(self.candidates)
        except Exception:
            client.create_registered_model(self.candidates)
        model_id = source.removeprefix("models:/") if source.startswith("models:/m-") else None  # a logged model
        created = client.create_model_version(self.candidates, source, run_id, tags=version_tags, model_id=model_id)
        version = str(created.version)
        after_registration(client, self.candidates, version, run_id, splits)
        self.registered.append(version)
        return version


def signed_champion(root: Path, model: str) -> dict:
    """A SQLite store in ``root`` whose ``model`` has a signed champion: a forced `promote` (as a
        release manager makes one) of the pipeline's candidate (a ``GOOD`` adapter over 16 synthetic
        records), whose run logged the split of the records (test: the first 6 keys, train: the
        rest). The store's ``uri``, ``client``, ``records``, ``trust`` file, the manager's ``keys`` and
    ``store``: the command-line flags that name the store and the trust file."""
    from mlflow.tracking import MlflowClient
    from signing_support import make_signer

    from ml.data.splits import Splits
    from pipeline.registry.audit import current_user
    from pipeline.registry.policy import promote
    from pipeline.registry.signing import find_trust, load_signer
    from pipeline.registry.tracking import CHAMPION

    uri = f"sqlite:///{root / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    client.create_experiment("cessl", artifact_location=(root / "mlruns").as_uri())
    records, hashes = write_records(root)
    backbone = make_backbone(root)
    pipeline = Pipeline(client, model, records, hashes, backbone)
    candidate = pipeline.register(make_adapter(root, backbone, "good", GOOD))
    run_id = client.get_model_version(pipeline.candidates, candidate).run_id
    splits = Splits(test=sorted(hashes)[:6], train=sorted(hashes)[6:], valid=[], unlabelled=[], classes=CLASSES)
    client.log_artifact(run_id, str(splits.save(root / "splits.json")), "data")
    keys = make_signer(root, current_user())
    trust = root / "trust.yaml"
    decision = promote(
        client, model, force=True, reason="the champion", signer=load_signer(keys.private), trust=find_trust(str(trust))
    )
    assert decision.promoted and client.get_model_version_by_alias(model, CHAMPION).run_id == run_id
    store = ["--tracking-uri", uri, "--trust-file", str(trust)]  # a registry verb's flags for this store
    return {
        "root": root,
        "uri": uri,
        "client": client,
        "records": records,
        "trust": str(trust),
        "keys": keys,
        "store": store,
    }
