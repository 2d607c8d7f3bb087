"""Logging and loading the registered model: an MLflow pyfunc of backbone + adapter.

The pyfunc class is :class:`ml.eval.serving.ECGAdapterModel`; its module docstring says
what ``predict`` accepts and returns. In short: raw 12-lead signals ``(N, 12, samples)``
in mV (an array, or the named tensor ``{"signals": array}``; ``params["sample_rate"]``,
default 500 Hz) -> probabilities ``(N, C)`` float32 in the order of
``metadata["classes"]``; a DataFrame with a ``record`` column of WFDB paths -> the table
of ``cessl predict`` (probabilities, thresholded diagnoses, and an ``error`` column for
records that could not be read).

A logged model carries everything it needs to load outside this checkout:
``code_paths`` holds the ``ml`` package (the pyfunc class and the model code; nothing of
``pipeline``, Kubeflow or DVC), the requirements are real PyPI distributions at the
installed versions without local tags (``torch==2.13.0``, not ``+cpu``) and without our
own package, and an input example (one 10 s record of zeros) shows the request format.

``cessl predict`` loads the registered model with :func:`load_predictor` and calls
``predict_records``; ``mlflow models serve -m models:/NAME@champion --env-manager local``
serves the same probabilities over HTTP.
"""

from __future__ import annotations

import logging
from pathlib import Path

import mlflow.pyfunc
import numpy as np

import ml
from ml.eval.serving import INPUT_SAMPLE_RATE, N_LEADS, SIGNALS, ECGAdapterModel

log = logging.getLogger(__name__)

__all__ = ["ECGAdapterModel", "load_predictor", "load_pyfunc", "log_adapter_model", "model_signature"]

MODEL_NAME_IN_RUN = "model"
# What the model needs at run time (the packages ``ml``'s model code, records and
# preprocessing import); ``cessl`` itself is not one: its code is logged with the model.
SERVING_DISTRIBUTIONS = ("mlflow", "torch", "numpy", "scipy", "pandas", "safetensors", "wfdb", "tqdm")
EXAMPLE_SAMPLES = 5000  # 10 s at 500 Hz: the length of a typical 12-lead record


def public_version(version: str) -> str:
    """A version without its local label: ``2.13.0+cpu`` -> ``2.13.0`` (PyPI has no local versions)."""
    return version.split("+", 1)[0]


def _requirements() -> list[str]:
    """Pinned requirements of the serving environment (no slow inference by MLflow)."""
    from importlib import metadata

    pins = []
    for dist in SERVING_DISTRIBUTIONS:
        try:
            pins.append(f"{dist}=={public_version(metadata.version(dist))}")
        except metadata.PackageNotFoundError:
            continue
    return pins


def input_tensor_spec():
    from mlflow.types import TensorSpec

    return TensorSpec(np.dtype(np.float32), (-1, N_LEADS, -1), name=SIGNALS)


def model_signature(n_classes: int):
    """Outputs ``(N, C)`` float32 and the ``sample_rate`` parameter; no input schema (see
    :mod:`ml.eval.serving`: MLflow would refuse the DataFrame of paths before ``predict``)."""
    from mlflow.models import ModelSignature
    from mlflow.types import ParamSchema, ParamSpec, Schema, TensorSpec

    return ModelSignature(
        inputs=None,
        outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, n_classes), name="probabilities")]),
        params=ParamSchema([ParamSpec("sample_rate", "double", INPUT_SAMPLE_RATE)]),
    )


def input_example() -> dict[str, np.ndarray]:
    """One record of zeros, ``{"signals": (1, 12, 5000) float32}`` (a small artifact)."""
    return {SIGNALS: np.zeros((1, N_LEADS, EXAMPLE_SAMPLES), dtype=np.float32)}


def model_metadata(classes: list[str]) -> dict:
    from mlflow.types import Schema

    return {
        "classes": list(classes),
        "input": (
            f"raw 12-lead signals in mV: the tensor {SIGNALS!r} (N, 12, samples) float32 at params['sample_rate']"
            f" (default {INPUT_SAMPLE_RATE:g} Hz); or a DataFrame with a 'record' column of WFDB record paths"
        ),
        "input_tensor": Schema([input_tensor_spec()]).to_json(),
        "input_sample_rate": INPUT_SAMPLE_RATE,
        "output": (
            "tensor input: probabilities (N, C) float32, columns in the order of 'classes'; DataFrame input: a"
            " table record, p_<class>..., diagnoses, codes, error (NaN probabilities and the reason for records"
            " that could not be read)"
        ),
    }


def log_adapter_model(backbone_dir: Path, adapter_dir: Path, classes: list[str], registered_model_name: str | None):
    """Log the pyfunc model in the active run (and register it); returns MLflow's ModelInfo."""
    return mlflow.pyfunc.log_model(
        name=MODEL_NAME_IN_RUN,
        python_model=ECGAdapterModel(),
        artifacts={"backbone": str(backbone_dir), "adapter": str(adapter_dir)},
        code_paths=[str(Path(ml.__file__).parent)],
        signature=model_signature(len(classes)),
        input_example=input_example(),
        pip_requirements=_requirements(),
        metadata=model_metadata(classes),
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
