"""The registered model's Python code: an MLflow pyfunc of backbone + adapter.

This module is logged with every model version (``code_paths``: the whole ``ml``
package), so a model loads wherever MLflow and the requirements are installed: no
checkout of this project, no ``cessl`` package, no Kubeflow. It imports nothing of the
pipeline; :mod:`pipeline.pyfunc_model` logs it.

Artifacts: ``backbone/`` (``backbone.safetensors`` + ``backbone_config.json``) and
``adapter/`` (``adapter_model.safetensors`` + ``adapter_config.json``: classes, rank map,
p, thresholds); :func:`ml.eval.predictor.load_predictor` rebuilds the model (the adapter
refuses a backbone other than the one it was trained on).

``predict(model_input, params)`` accepts:

* raw 12-lead signals in mV, ``(N, 12, samples)`` (``(12, samples)`` is one record), as
  a numpy array, a nested list, or a dict ``{"signals": array}`` (the named tensor
  :data:`SIGNALS`; what ``{"inputs": {"signals": [...]}}`` or ``{"instances": [...]}``
  sends to ``mlflow models serve``). All records of one call share the sample rate
  ``params["sample_rate"]`` (Hz, default 500); they are resampled, filtered and cropped
  or padded like the training data. Returns the probabilities ``(N, C)`` float32, the
  columns in the order of ``metadata["classes"]``.
* a pandas DataFrame with a column of WFDB record paths (``record``, ``path`` or the only
  column; with or without ``.hea``; what ``{"dataframe_split": ...}`` sends), read where
  the model runs. Returns the table of ``cessl predict``
  (:meth:`ml.eval.predictor.Predictor.predict_records`): ``record``, ``p_<code>`` per
  class, ``diagnoses``, ``codes`` (thresholded with the adapter's per-class thresholds)
  and ``error``: a record that cannot be read gets NaN probabilities and the reason there,
  the other records are still predicted. ``sample_rate`` is not used (the header has it).

Why the signature has no input schema: MLflow enforces an input schema before ``predict``
runs and a tensor schema always requires its tensor, so a DataFrame of paths would be
refused; the tensor's spec is in the model's metadata (``input_tensor``) and ``predict``
checks it itself (wrong inputs raise an ``INVALID_PARAMETER_VALUE`` MlflowException, a
400 from the server). The outputs and the ``sample_rate`` parameter are in the signature.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
from mlflow.pyfunc import PythonModel

if TYPE_CHECKING:
    from ml.eval.predictor import Predictor

SIGNALS = "signals"
N_LEADS = 12
INPUT_SAMPLE_RATE = 500.0
RECORD_COLUMNS = ("record", "path", "records", "paths")


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
