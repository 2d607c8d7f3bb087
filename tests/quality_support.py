"""Faulty ECG records for the signal-quality tests (no tests here): a real fixture record with one
fault injected, as a signal ``(12, samples)`` in mV or written as a WFDB record.

Shared by tests/unit/test_data_quality.py (the check), tests/unit/test_model_serving.py
(``cessl predict``), tests/unit/test_serve.py and tests/integration/test_serve_http.py (``cessl serve``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from ml.data.records import STANDARD_LEADS
from ml.data.synth import electrode_off as synth_electrode_off
from ml.data.synth import header_text, mat_v4_bytes, to_digital

LEAD_I, LEAD_II, LEAD_III, AVR, AVL = range(5)


def zero_lead(x: np.ndarray, *leads: str) -> np.ndarray:
    """Leads not recorded (V3 by default): every sample 0 mV, what an export writes for a lead its
    device did not acquire (a note, not a fault, within QualityConfig.max_missing_leads)."""
    y = x.copy()
    for lead in leads or ("V3",):
        y[STANDARD_LEADS.index(lead)] = 0.0
    return y


def electrode_off(x: np.ndarray, lead: str = "V3", seed: int = 0) -> np.ndarray:
    """An electrode that came off: the lead is the amplifier's offset and its own noise (the
    synthetic hospitals' fault, :func:`ml.data.synth.electrode_off`), a near-flat line."""
    y = x.copy()
    y[STANDARD_LEADS.index(lead)] = synth_electrode_off(x.shape[1], np.random.default_rng(seed))
    return y


def constant_lead(x: np.ndarray, lead: str = "V3", level_mv: float = 0.3) -> np.ndarray:
    """A lead stuck at a constant level other than 0 mV (an amplifier's offset or rail)."""
    y = x.copy()
    y[STANDARD_LEADS.index(lead)] = level_mv
    return y


def clip_lead(x: np.ndarray, lead: str = "II") -> np.ndarray:
    """An amplifier clipping the lead at its 5th and 95th percentiles (10% of samples at its rails)."""
    y = x.copy()
    j = STANDARD_LEADS.index(lead)
    low, high = np.percentile(y[j], [5, 95])
    y[j] = np.clip(y[j], low, high)
    return y


def saturate_lead(x: np.ndarray, lead: str = "II") -> np.ndarray:
    """A drift of 3 mV over the record pushing the lead into a 1.5 mV rail for seconds."""
    y = x.copy()
    j = STANDARD_LEADS.index(lead)
    y[j] = np.clip(y[j] + np.linspace(0.0, 3.0, y.shape[1]), -5.0, 1.5)
    return y


def nan_samples(x: np.ndarray, lead: str = "aVR") -> np.ndarray:
    y = x.copy()
    y[STANDARD_LEADS.index(lead), 100:110] = np.nan
    return y


def dropout(x: np.ndarray, lead: str = "V3", fs: float = 500.0) -> np.ndarray:
    """The lead at a constant 0 mV for 3 s in the middle of the record."""
    y = x.copy()
    y[STANDARD_LEADS.index(lead), int(2 * fs) : int(5 * fs)] = 0.0
    return y


def swap_la_ra(x: np.ndarray) -> np.ndarray:
    """Left and right arm cables swapped: I -> -I, II <-> III, aVR <-> aVL (aVF and the chest leads,
    referred to Wilson's terminal, which the swap leaves alone, are unchanged)."""
    y = x.copy()
    y[LEAD_I], y[LEAD_II], y[LEAD_III] = -x[LEAD_I], x[LEAD_III], x[LEAD_II]
    y[AVR], y[AVL] = x[AVL], x[AVR]
    return y


def white_noise(x: np.ndarray, sd_mv: float = 1.0, seed: int = 0) -> np.ndarray:
    """Heavy broadband noise: N(0, ``sd_mv``) added to every lead."""
    return x + np.random.default_rng(seed).normal(0.0, sd_mv, x.shape)


# name -> (fault, the sampling rate it claims given the true one, a phrase its reason must hold)
SIGNAL_FAULTS: dict[str, tuple[Callable[[np.ndarray], np.ndarray], Callable[[float], float], str]] = {
    "electrode off": (electrode_off, float, "V3: flat (peak-to-peak 0.0"),
    "lead at a constant offset": (constant_lead, float, "V3: flat (a constant 0.300 mV throughout"),
    "4 leads not recorded": (
        lambda x: zero_lead(x, "V1", "V2", "V3", "V4"),
        float,
        "leads V1, V2, V3, V4 not recorded (all samples 0): at most 3 may be missing",
    ),
    "lead I not recorded": (
        lambda x: zero_lead(x, "I"),
        float,
        "lead I not recorded (all samples 0): leads I and II must be recorded",
    ),
    "lead II not recorded": (
        lambda x: zero_lead(x, "II"),
        float,
        "lead II not recorded (all samples 0): leads I and II must be recorded",
    ),
    "leads I and II not recorded": (
        lambda x: zero_lead(x, "I", "II"),
        float,
        "leads I, II not recorded (all samples 0): leads I and II must be recorded",
    ),
    "clipped lead": (clip_lead, float, "II: clipped"),
    "saturated lead": (saturate_lead, float, "II: saturated"),
    "NaN samples": (nan_samples, float, "aVR: NaN/Inf in 10 of"),
    "50x gain": (lambda x: 50.0 * x, float, "implausible amplitude"),
    "all near zero": (lambda x: 0.04 * x, float, "all leads near zero"),
    "20 Hz sampling rate": (lambda x: x, lambda fs: 20.0, "implausible sampling rate 20 Hz"),
    "2-second record": (lambda x: x[:, :1000], float, "too short: 2.00 s"),
    "swapped LA/RA": (swap_la_ra, float, "left/right arm electrodes reversed (LA/RA)"),
    "heavy white noise": (white_noise, float, "noisy: broadband noise"),
    "3-second dropout": (dropout, float, "V3: flat for 3.00 s"),
}


def write_wfdb(
    folder: Path,
    name: str,
    signal_mv: np.ndarray,
    fs: float,
    dx: Sequence[str] = ("426783006",),
    lead_names: Sequence[str] = STANDARD_LEADS,
) -> Path:
    """``folder/name.hea`` + ``.mat`` (Challenge format, 1 uV steps) of a signal in mV; the header's path."""
    folder.mkdir(parents=True, exist_ok=True)
    digital = to_digital(signal_mv)
    comments = ["Age: 60", "Sex: Female", f"Dx: {','.join(dx)}"]
    (folder / f"{name}.mat").write_bytes(mat_v4_bytes(digital))
    header = folder / f"{name}.hea"
    header.write_text(header_text(name, digital, fs, comments, lead_names=lead_names), encoding="utf-8")
    return header
