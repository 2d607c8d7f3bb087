"""The registered model: an MLflow pyfunc of backbone + adapter, and how it is logged and loaded.

Artifacts of every model version: ``backbone/`` (``backbone.safetensors`` +
``backbone_config.json``) and ``adapter/`` (``adapter_model.safetensors`` +
``adapter_config.json``: classes, rank map, p, thresholds). Loading rebuilds the model
with :func:`ml.eval.predictor.load_predictor` (the adapter refuses a backbone other
than the one it was trained on).

``predict(model_input, params)`` accepts:

* raw 12-lead signals in mV, ``(N, 12, samples)`` (``(12, samples)`` is one record), as
  a numpy array, a nested list, or a dict ``{"signals": array}`` (the named tensor
  ``signals``; what ``{"inputs": {"signals": [...]}}`` or ``{"instances": [...]}`` sends
  to ``mlflow models serve``). All records of one call share the sample rate
  ``params["sample_rate"]`` (Hz, default 500); they are resampled, filtered and cropped
  or padded like the training data. Returns the probabilities ``(N, C)`` float32, the
  columns in the order of ``metadata["classes"]``.
* a pandas DataFrame with a column of WFDB record paths (``record``, ``path`` or the only
  column; with or without ``.hea``; what ``{"dataframe_split": ...}`` sends), read where
  the model runs. Returns the table of ``cessl predict``
  (:meth:`ml.eval.predictor.Predictor.predict_records`): ``record``, ``p_<code>`` per
  class, ``diagnoses``, ``codes`` (thresholded with the adapter's per-class thresholds),
  ``error``, ``status``, ``reason`` and ``notes``: a record that cannot be read or fails the
  signal-quality check (:mod:`ml.data.quality`) is ``unreadable``, with NaN probabilities, no
  diagnoses and the reason; the other records are still predicted, ``notes`` saying what the
  check tolerated in them (leads not recorded). ``sample_rate`` is not
  used (headers have it). The raw-signal tensor path above returns probabilities only, with
  no quality check (its output is one tensor).

Why the signature has no input schema: MLflow enforces an input schema before ``predict``
runs, and a tensor schema always requires its tensor, so a DataFrame of paths would be
refused. The tensor's spec is in the model's metadata (``input_tensor``, with ``input``
and ``output`` in words) and ``predict`` checks its input itself (wrong inputs raise an
``INVALID_PARAMETER_VALUE`` MlflowException: a 400 from the server). The outputs and the
``sample_rate`` parameter are in the signature.

A logged model loads outside this checkout: ``code_paths`` holds the ``ml`` package and
this module (as ``pipeline/registry/pyfunc_model.py`` with the package's docstring-only
``__init__``; nothing of Kubeflow, DVC or the CLI). This module imports only mlflow,
numpy, pandas and ``ml``. The requirements are real PyPI distributions at the installed
versions without local tags (``torch==2.13.0``, not ``+cpu``) and without our own
package; the input example is one 10 s record of zeros.

``cessl predict`` loads the registered model with :func:`load_predictor` and calls
``predict_records``; ``mlflow models serve -m models:/NAME@champion --env-manager local``
serves the same probabilities over HTTP.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import mlflow.pyfunc
import numpy as np
import pandas as pd
from mlflow.pyfunc import PythonModel

import ml

if TYPE_CHECKING:
    from ml.eval.predictor import Predictor

log = logging.getLogger(__name__)

MODEL_NAME_IN_RUN = "model"
SIGNALS = "signals"
N_LEADS = 12
INPUT_SAMPLE_RATE = 500.0
RECORD_COLUMNS = ("record", "path", "records", "paths")
# What the model needs at run time (the packages ``ml``'s model code, records and
# preprocessing import); ``cessl`` itself is not one: its code is logged with the model.
SERVING_DISTRIBUTIONS = ("mlflow", "torch", "numpy", "scipy", "pandas", "safetensors", "wfdb", "tqdm")
EXAMPLE_SAMPLES = 5000  # 10 s at 500 Hz: the length of a typical 12-lead record


def _invalid(message: str) -> Exception:
    from mlflow.exceptions import MlflowException

    return MlflowException.invalid_parameter_value(message)


def signals_array(model_input: Any) -> np.ndarray:
    """``(N, 12, samples)`` float32 of an array, a nested list or ``{"signals": array}``."""
    if isinstance(model_input, dict):
        if SIGNALS in model_input:
            model_input = model_input[SIGNALS]
        elif len(model_input) == 1:
            model_input = next(iter(model_input.values()))
        else:
            raise _invalid(f"expected the tensor {SIGNALS!r}, got the inputs {sorted(model_input)}")
    try:
        x = np.asarray(model_input, dtype=np.float32)
    except (TypeError, ValueError) as err:
        raise _invalid(f"{SIGNALS} must be numbers of shape (N, 12, samples): {err}") from None
    if x.ndim == 2:
        x = x[None]
    if x.ndim != 3 or x.shape[1] != N_LEADS or x.shape[0] == 0 or x.shape[2] == 0:
        raise _invalid(f"{SIGNALS} must have the shape (N, 12, samples), got {x.shape}")
    if not np.all(np.isfinite(x)):
        raise _invalid(f"{SIGNALS} contains NaN or infinite values")
    return x


def record_paths(frame: pd.DataFrame) -> list[str]:
    """The WFDB record paths of a DataFrame (column ``record``/``path``, or its only column)."""
    column = next((c for c in RECORD_COLUMNS if c in frame.columns), None)
    if column is None and len(frame.columns) == 1:
        column = frame.columns[0]
    if column is None:
        raise _invalid(f"a DataFrame input needs a column of WFDB record paths ({'/'.join(RECORD_COLUMNS)})")
    values = frame[column].tolist()
    if not values or not all(isinstance(v, str | Path) and str(v) for v in values):
        raise _invalid(f"column {column!r} must hold WFDB record paths (strings)")
    return [str(v) for v in values]


class ECGAdapterModel(PythonModel):
    """Backbone + CE-SSL adapter as a pyfunc model (see the module docstring for ``predict``)."""

    def __init__(self) -> None:
        self._predictor: Predictor | None = None

    def load_context(self, context) -> None:
        from ml.eval.predictor import load_predictor

        self._predictor = load_predictor(Path(context.artifacts["backbone"]), Path(context.artifacts["adapter"]))

    @property
    def predictor(self) -> Predictor:
        if self._predictor is None:
            raise RuntimeError("the model's artifacts are not loaded (use mlflow.pyfunc.load_model)")
        return self._predictor

    def predict(self, context, model_input, params=None):
        """Probabilities ``(N, C)`` of raw signals, or the predictions table of a DataFrame of paths."""
        if isinstance(model_input, pd.DataFrame):
            return self.predict_records(record_paths(model_input))
        sample_rate = float((params or {}).get("sample_rate") or INPUT_SAMPLE_RATE)
        if not sample_rate > 0:
            raise _invalid(f"sample_rate must be positive, got {sample_rate}")
        return self.predictor.predict_raw(signals_array(model_input), sample_rate).astype(np.float32)

    def predict_records(self, records) -> pd.DataFrame:
        """The predictions table of WFDB records (what ``cessl predict`` writes)."""
        return self.predictor.predict_records(records)


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
    """Outputs ``(N, C)`` float32 and the ``sample_rate`` parameter; no input schema (see the
    module docstring: MLflow would refuse the DataFrame of paths before ``predict``)."""
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
    with tempfile.TemporaryDirectory(prefix="cessl-model-code-") as tmp:
        return mlflow.pyfunc.log_model(
            name=MODEL_NAME_IN_RUN,
            python_model=ECGAdapterModel(),
            artifacts={"backbone": str(backbone_dir), "adapter": str(adapter_dir)},
            code_paths=model_code_paths(Path(tmp)),
            signature=model_signature(len(classes)),
            input_example=input_example(),
            pip_requirements=_requirements(),
            metadata=model_metadata(classes),
            registered_model_name=registered_model_name,
        )


def model_code_paths(tmp: Path) -> list[str]:
    """The code logged with the model: the ``ml`` package and a ``pipeline`` package holding
    only its ``__init__`` and ``registry/`` with its ``__init__`` and this module (the pyfunc
    class is pickled by reference to ``pipeline.registry.pyfunc_model``)."""
    registry = Path(__file__).parent
    package = registry.parent
    stub = tmp / package.name
    (stub / registry.name).mkdir(parents=True)
    shutil.copy(package / "__init__.py", stub / "__init__.py")
    for name in ("__init__.py", Path(__file__).name):
        shutil.copy(registry / name, stub / registry.name / name)
    return [str(Path(ml.__file__).parent), str(stub)]


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
