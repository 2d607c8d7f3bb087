"""Helpers of the lineage tests (unit and integration; no tests here): a registration bundle
with fixed contents and a stand-in for the adapter model's logging."""

from __future__ import annotations

from pathlib import Path


def fake_bundle(tmp: Path, source: str = "s3://hospital/ecg", data_version: str = "d" * 32 + ".dir"):
    """A registration bundle with fixed contents (same fingerprint for every caller)."""
    from components.register import Registration
    from ml.data.splits import Splits

    splits = Splits(test=["a", "b"], train=["c"], valid=["d"], unlabelled=[], classes=["1", "2"])
    model = tmp / "model"  # stands for the backbone and adapter folders (their digests are version tags)
    model.mkdir(exist_ok=True)
    (model / "weights").write_text("w")
    tags = {"data_version": data_version, "git_commit": "0123abc+dirty", "test_split_hash": splits.test_split_hash}
    return Registration(
        params={"method": "cessl", "r": 8, "source": source},
        tags=tags | {"method": "cessl"},  # a production method: the version becomes the challenger
        test_metrics={"macro_f_beta": 0.5},
        curves=[{"step": 1, "train_loss": 1.0}],
        rank_map={"layer": 8},
        classes=["1", "2"],
        backbone_dir=model,
        adapter_dir=model,
        splits=splits,
        fingerprint="race-" + data_version[:8],
        run_name="race",
        data_version=data_version,
        git_commit="0123abc+dirty",
    )


def stub_model_logging(monkeypatch=None) -> None:
    """Log a trivial pyfunc instead of the adapter model (no trained model needed here)."""
    import mlflow

    from pipeline.registry import pyfunc_model

    class Echo(mlflow.pyfunc.PythonModel):
        def predict(self, context, model_input, params=None):
            return model_input

    def log_stub(backbone_dir, adapter_dir, classes, registered_model_name):
        assert registered_model_name is None  # registration is log_and_register's, with its tags
        return mlflow.pyfunc.log_model(name="model", python_model=Echo())

    if monkeypatch is not None:
        monkeypatch.setattr(pyfunc_model, "log_adapter_model", log_stub)
    else:
        pyfunc_model.log_adapter_model = log_stub
