"""The registered model: an MLflow pyfunc that loads backbone + adapter and predicts.

Artifacts of every model version: ``backbone/`` (``backbone.safetensors`` +
``backbone_config.json``) and ``adapter/`` (``adapter_model.safetensors`` +
``adapter_config.json``: classes, rank map, p, thresholds). Loading rebuilds the model
with :func:`ml.eval.predictor.load_predictor` (the adapter refuses a backbone other
than the one it was trained on).

``predict`` takes raw 12-lead signals ``(N, 12, T)`` float32 in mV at 500 Hz (the
signature's input) and returns probabilities ``(N, C)``; the classes are in the model's
metadata. From WFDB records: ``load_predictor(uri).predict_records(paths)`` (what
``cessl predict`` does), which also applies the per-class thresholds.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import mlflow.pyfunc
import numpy as np

log = logging.getLogger(__name__)

MODEL_NAME_IN_RUN = "model"
INPUT_SAMPLE_RATE = 500.0


def _requirements() -> list[str]:
    """Pinned requirements of the serving environment (no slow inference by MLflow)."""
    from importlib import metadata

    pins = []
    for dist in ("torch", "numpy", "scipy", "pandas", "safetensors", "scikit-learn", "wfdb", "mlflow", "cessl"):
        try:
            pins.append(f"{dist}=={metadata.version(dist)}")
        except metadata.PackageNotFoundError:
            continue
    return pins


class ECGAdapterModel(mlflow.pyfunc.PythonModel):
    """Backbone + CE-SSL adapter as a pyfunc model."""

    def __init__(self) -> None:
        self._predictor = None

    def load_context(self, context) -> None:
        from ml.eval.predictor import load_predictor

        self._predictor = load_predictor(Path(context.artifacts["backbone"]), Path(context.artifacts["adapter"]))

    @property
    def predictor(self):
        if self._predictor is None:
            raise RuntimeError("the model's artifacts are not loaded (use mlflow.pyfunc.load_model)")
        return self._predictor

    def predict(self, context, model_input: np.ndarray, params: dict[str, Any] | None = None) -> np.ndarray:
        """Probabilities ``(N, C)`` of raw signals ``(N, 12, T)`` at ``params['sample_rate']`` (500 Hz)."""
        sample_rate = float((params or {}).get("sample_rate", INPUT_SAMPLE_RATE))
        return self.predictor.predict_raw(np.asarray(model_input, dtype=np.float32), sample_rate).astype(np.float32)

    def predict_records(self, records):
        """Per-record probabilities and thresholded diagnoses (a DataFrame) of WFDB records."""
        return self.predictor.predict_records(records)


def model_signature(n_classes: int):
    from mlflow.models import ModelSignature
    from mlflow.types import ParamSchema, ParamSpec, Schema, TensorSpec

    return ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, 12, -1), name="signals")]),
        outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, n_classes), name="probabilities")]),
        params=ParamSchema([ParamSpec("sample_rate", "double", INPUT_SAMPLE_RATE)]),
    )


def log_adapter_model(backbone_dir: Path, adapter_dir: Path, classes: list[str], registered_model_name: str | None):
    """Log the pyfunc model in the active run (and register it); returns MLflow's ModelInfo."""
    return mlflow.pyfunc.log_model(
        name=MODEL_NAME_IN_RUN,
        python_model=ECGAdapterModel(),
        artifacts={"backbone": str(backbone_dir), "adapter": str(adapter_dir)},
        signature=model_signature(len(classes)),
        pip_requirements=_requirements(),
        metadata={
            "classes": list(classes),
            "input": "raw 12-lead signals (N, 12, T) in mV",
            "input_sample_rate": INPUT_SAMPLE_RATE,
        },
        registered_model_name=registered_model_name,
    )


def load_pyfunc(model_uri: str, tracking_uri: str | None = None):
    """``mlflow.pyfunc.load_model`` against ``tracking_uri`` (default: the active one)."""
    if tracking_uri:
        mlflow.set_tracking_uri(tracking_uri)
        mlflow.set_registry_uri(tracking_uri)
    return mlflow.pyfunc.load_model(model_uri)


def load_predictor(model_uri: str, tracking_uri: str | None = None):
    """The :class:`ml.eval.predictor.Predictor` inside a registered pyfunc model."""
    model = load_pyfunc(model_uri, tracking_uri)
    python_model = model.unwrap_python_model()
    if not isinstance(python_model, ECGAdapterModel):
        raise ValueError(f"{model_uri} is not a CE-SSL adapter model ({type(python_model).__name__})")
    return python_model.predictor
