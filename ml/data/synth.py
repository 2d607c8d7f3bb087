"""Synthetic hospitals: realistic 12-lead ECGs written as Challenge-format WFDB records.

The heart is a moving dipole D(t) = (x: left, y: inferior, z: anterior) made of Gaussian
waves (P, septal Q, R, S, RBBB's R', LBBB's second R, T) placed around each beat; the 12
leads are its projections (limb leads obey Einthoven/Goldberger exactly, precordial leads
sit around the horizontal plane), plus noise added at the 9 electrodes (baseline wander,
mains hum, EMG bursts) so that it spreads across leads the way real noise does.

Diagnoses change the rhythm or the waves the way a cardiologist reads them: sinus rate
(NSR / SB / STach), respiratory RR modulation (SA), irregular RR without P waves and with
fibrillatory waves (AF), long PR (IAVB), wide QRS with LBBB or RBBB morphology, premature
wide beats with compensatory pause (PVC), premature beats with an abnormal P (PAC), small
QRS (LQRSV), inverted or flat T (TInv / TAb), frontal QRS axis (LAD / RAD), long QT (LQT),
and, from each record's second random stream, pathological Q waves in an inferior or anterior
territory (QAb), poor R-wave progression (PRWP), incomplete RBBB (IRBBB) and a non-specific
intraventricular conduction delay (NSIVCB).

Everything is drawn from ``numpy.random.default_rng([seed, index])``: a record depends
only on the seed and its number, so generation is deterministic in any batch size or
process count, and files are byte-identical (no timestamps anywhere). Only numpy is used
in the generator (no library whose numerical output could change between versions).
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import struct
import uuid
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from ml.data.parallel import process_pool, progress_bar
from ml.data.records import STANDARD_LEADS, Reason

log = logging.getLogger(__name__)

# Challenge SNOMED codes of the diagnoses the generator can draw.
NSR, SB, STACH, SA, AF = "426783006", "426177001", "427084000", "427393009", "164889003"
IAVB, LBBB, RBBB, PVC, PAC = "270492004", "164909002", "59118001", "17338001", "63593006"
LQRSV, TINV, TAB, LAD, RAD, LQT = "251146004", "59931005", "164934002", "39732003", "47665007", "111975006"
# Conduction and morphology findings drawn from a record's second random stream (so that a
# hospital without them draws exactly what it always drew): Q waves, poor R-wave progression,
# incomplete RBBB, non-specific intraventricular conduction delay.
QAB, PRWP, IRBBB, NSIVCB = "164917005", "365413008", "713426002", "698252002"

SUPPORTED_CLASSES: tuple[str, ...] = (
    NSR,
    SB,
    STACH,
    SA,
    AF,
    IAVB,
    LBBB,
    RBBB,
    PVC,
    PAC,
    LQRSV,
    TINV,
    TAB,
    LAD,
    RAD,
    LQT,
    QAB,
    PRWP,
    IRBBB,
    NSIVCB,
)
DEFAULT_CLASSES: tuple[str, ...] = (NSR, SB, STACH, AF, IAVB, LBBB, RBBB, PVC, LQRSV, TINV)
# The network demo's classes: none of them a label the embedded default backbone was pre-trained
# on (the six CODE-15% rhythm and conduction diagnoses, ``ml.train.default_backbone``): ectopy,
# voltage, repolarisation, Q waves, R-wave progression and conduction delays.
NETWORK_DEMO_CLASSES: tuple[str, ...] = (NSR, SA, PAC, PVC, LQRSV, TAB, LQT, QAB, PRWP, IRBBB, NSIVCB)

# Probability of each diagnosis (rhythms are exclusive and drawn by weight).
RHYTHM_WEIGHTS = {NSR: 0.45, SB: 0.17, STACH: 0.17, AF: 0.15, SA: 0.06}
FINDING_PROB = {
    IAVB: 0.14,
    RBBB: 0.12,
    LBBB: 0.10,
    PVC: 0.14,
    PAC: 0.10,
    LQRSV: 0.12,
    TINV: 0.14,
    TAB: 0.12,
    LAD: 0.12,
    RAD: 0.06,
    LQT: 0.10,
}
MORPHOLOGY_PROB = {QAB: 0.14, PRWP: 0.12, IRBBB: 0.12, NSIVCB: 0.12}

# Wave rows of the per-beat parameter arrays.
P_W, Q_W, R_W, R2_W, S_W, RP_W, T_W = range(7)
N_WAVES = 7

GAIN = 1000.0  # adu per mV, as in the Challenge files (1 uV resolution)
UNITS_PER_MV = {"mV": 1.0, "uV": 1000.0}  # a header's physical unit -> units in one mV
LEAD_FAULTS = ("flat", "inverted")  # a disconnected electrode, a reversed one

# Electrodes RA, LA, LL, V1..V6 -> 12 leads.
_E = np.zeros((12, 9))
_E[0, [0, 1]] = [-1, 1]  # I = LA - RA
_E[1, [0, 2]] = [-1, 1]  # II = LL - RA
_E[2, [1, 2]] = [-1, 1]  # III = LL - LA
_E[3, :3] = [1, -0.5, -0.5]  # aVR
_E[4, :3] = [-0.5, 1, -0.5]  # aVL
_E[5, :3] = [-0.5, -0.5, 1]  # aVF
for _i in range(6):
    _E[6 + _i, :3] = -1 / 3
    _E[6 + _i, 3 + _i] = 1
ELECTRODE_TO_LEAD = _E

# Dipole (x left, y inferior, z anterior) -> 12 leads.
_PRECORDIAL_DEG = np.array([120.0, 95.0, 75.0, 55.0, 30.0, 0.0])
_M = np.zeros((12, 3))
_M[0] = [1, 0, 0]  # I
_M[1] = [0.5, np.sqrt(3) / 2, 0]  # II
_M[2] = _M[1] - _M[0]  # III
_M[3] = -(_M[0] + _M[1]) / 2  # aVR
_M[4] = _M[0] - _M[1] / 2  # aVL
_M[5] = _M[1] - _M[0] / 2  # aVF
_M[6:, 0] = 1.6 * np.cos(np.radians(_PRECORDIAL_DEG))
_M[6:, 1] = 0.25
_M[6:, 2] = 1.6 * np.sin(np.radians(_PRECORDIAL_DEG))
DIPOLE_TO_LEAD = _M


def rotation(degrees: Sequence[float]) -> np.ndarray:
    """The 3x3 rotation turning the heart's dipole by ``degrees`` about the x (left), y
    (inferior) and z (anterior) axes in turn: a heart lying otherwise in the chest, or the
    electrodes placed otherwise on it, as every lead sees it."""
    result = np.eye(3)
    for axis, angle in enumerate(degrees):
        a = np.radians(float(angle))
        c, s = np.cos(a), np.sin(a)
        i, j = [k for k in range(3) if k != axis]
        turn = np.eye(3)
        turn[i, i], turn[i, j], turn[j, i], turn[j, j] = c, -s, s, c
        result = turn @ result
    return result


def dipole_to_lead(heart_rotation_deg: Sequence[float]) -> np.ndarray:
    """The 12 x 3 projection of a heart turned by ``heart_rotation_deg`` (:func:`rotation`);
    unturned, exactly :data:`DIPOLE_TO_LEAD`."""
    if not any(heart_rotation_deg):
        return DIPOLE_TO_LEAD
    return DIPOLE_TO_LEAD @ rotation(heart_rotation_deg)


@dataclass(frozen=True)
class SynthConfig:
    """A synthetic hospital. ``classes`` are SNOMED codes (or Challenge abbreviations)."""

    records: int = 100
    classes: tuple[str, ...] = DEFAULT_CLASSES
    seed: int = 0
    fs: float = 500.0
    duration_s: float = 10.0
    unlabelled_fraction: float = 0.0  # records written without a # Dx line
    prefix: str = "S"
    start: int = 0  # number of the first record (to extend a hospital)
    mains_hz: float = 50.0
    noise: float = 1.0  # scale of all noise sources
    # The site's devices and population (the defaults: the demo hospital, unchanged bytes).
    gain: float = GAIN  # ADC gain in the header, adu per `units`
    units: str = "mV"  # physical units in the header: "mV" or "uV"
    wander: float = 1.0  # scale of the baseline wander (on top of `noise`)
    prevalence: tuple[tuple[str, float], ...] = ()  # (class, factor): its drawing weight times factor
    lead_fault: str = ""  # "<lead>:flat" or "<lead>:inverted": a device fault on that lead...
    lead_fault_fraction: float = 0.0  # ...in this fraction of the records
    # the site's lead geometry: the heart's dipole turned by these angles (x, y, z; degrees) before
    # it is projected onto the leads (:func:`rotation`); a shift no preprocessing step undoes
    heart_rotation_deg: tuple[float, float, float] = (0.0, 0.0, 0.0)

    def __post_init__(self) -> None:
        from ml.data.labels import LabelMapping

        mapping = LabelMapping.from_csv()
        codes = tuple(mapping.code_for(c) for c in self.classes)
        unsupported = [mapping.abbreviation(c) for c in codes if c not in SUPPORTED_CLASSES]
        if unsupported:
            raise ValueError(
                f"no synthetic model for {', '.join(unsupported)}; supported: "
                + ", ".join(mapping.abbreviations(SUPPORTED_CLASSES))
            )
        object.__setattr__(self, "classes", codes)
        if not 0.0 <= self.unlabelled_fraction <= 1.0:
            raise ValueError("unlabelled_fraction must be within [0, 1]")
        prevalence = tuple((mapping.code_for(str(c)), float(f)) for c, f in self.prevalence)
        if any(not np.isfinite(f) or f < 0 for _, f in prevalence):
            raise ValueError("prevalence factors must be finite and >= 0")
        object.__setattr__(self, "prevalence", prevalence)
        if self.units not in UNITS_PER_MV:
            raise ValueError(f"units must be one of {', '.join(UNITS_PER_MV)}, got {self.units!r}")
        if not self.gain > 0:
            raise ValueError(f"gain must be > 0 adu per {self.units}, got {self.gain}")
        if self.lead_fault:
            lead, _, kind = self.lead_fault.partition(":")
            if lead not in STANDARD_LEADS or kind not in LEAD_FAULTS:
                raise ValueError(
                    f"lead_fault {self.lead_fault!r} must be '<lead>:<kind>' with a lead of "
                    f"{', '.join(STANDARD_LEADS)} and a kind of {', '.join(LEAD_FAULTS)}"
                )
        if not 0.0 <= self.lead_fault_fraction <= 1.0:
            raise ValueError("lead_fault_fraction must be within [0, 1]")
        angles = tuple(float(a) for a in self.heart_rotation_deg)
        if len(angles) != 3 or not all(np.isfinite(a) and -180.0 <= a <= 180.0 for a in angles):
            raise ValueError(f"heart_rotation_deg must be 3 angles within [-180, 180], got {self.heart_rotation_deg}")
        object.__setattr__(self, "heart_rotation_deg", angles)

    @property
    def adu_per_mv(self) -> float:
        """Digital units per millivolt of the written signal files."""
        return self.gain * UNITS_PER_MV[self.units]

    def record_id(self, index: int) -> str:
        return f"{self.prefix}{index:05d}"


@dataclass
class SynthRecord:
    record_id: str
    signal: np.ndarray  # (12, n) mV
    fs: float
    labels: list[str]  # diagnoses present (SNOMED codes)
    labelled: bool  # whether the header carries them
    age: int
    sex: str
    lead_fault: str = ""  # the config's lead_fault when this record has it


# ---------------------------------------------------------------------------------------
# Generator
# ---------------------------------------------------------------------------------------


def _direction(frontal_deg: float, elevation: float) -> np.ndarray:
    """Unit vector at a frontal-plane angle (0 = left, 90 = inferior), tilted anteriorly."""
    a = np.radians(frontal_deg)
    return np.array([np.cos(a) * np.cos(elevation), np.sin(a) * np.cos(elevation), np.sin(elevation)])


def _findings(
    probability: Mapping[str, float], u: np.ndarray, allowed: set[str], factor: Mapping[str, float]
) -> list[str]:
    """The findings present: each allowed one whose uniform draw ``u[j]`` falls below its
    probability times the hospital's factor (at most 0.9)."""
    return [
        code
        for j, (code, p) in enumerate(probability.items())
        if code in allowed and u[j] < min(p * factor.get(code, 1.0), 0.9)
    ]


def draw_labels(
    rng: np.random.Generator, classes: Sequence[str], prevalence: Mapping[str, float] | None = None
) -> list[str]:
    """Diagnoses of one record: a rhythm plus independent findings, within ``classes``.

    ``prevalence``: code -> factor on its weight (rhythms) or probability (findings, at
    most 0.9): a hospital's own case mix. The same random numbers are drawn either way."""
    allowed = set(classes)
    factor = dict(prevalence or {})
    rhythms = [c for c in RHYTHM_WEIGHTS if c in allowed and factor.get(c, 1.0) > 0]
    labels: list[str] = []
    u = rng.random(1 + len(FINDING_PROB))
    if rhythms:
        weights = np.array([RHYTHM_WEIGHTS[c] * factor.get(c, 1.0) for c in rhythms])
        cum = np.cumsum(weights / weights.sum())
        labels.append(rhythms[int(np.searchsorted(cum, u[0], side="right").clip(0, len(rhythms) - 1))])
    labels += _findings(FINDING_PROB, u[1:], allowed, factor)
    # Exclusions that make clinical sense.
    if AF in labels:
        labels = [c for c in labels if c not in (IAVB, PAC)]
    if LBBB in labels:
        labels = [c for c in labels if c not in (RBBB, RAD)]
    if LAD in labels and RAD in labels:
        labels.remove(RAD)
    if TINV in labels and TAB in labels:
        labels.remove(TAB)
    return labels


def draw_morphology(
    rng: np.random.Generator,
    classes: Sequence[str],
    labels: Sequence[str],
    prevalence: Mapping[str, float] | None = None,
) -> list[str]:
    """The conduction and morphology findings (:data:`MORPHOLOGY_PROB`) of a record whose
    other diagnoses are ``labels``, drawn from the record's second stream ``rng``: none of them
    beside a bundle-branch block (whose QRS already is wide and notched), and at most one of the
    two conduction delays (incomplete RBBB, non-specific delay)."""
    found = _findings(MORPHOLOGY_PROB, rng.random(len(MORPHOLOGY_PROB)), set(classes), dict(prevalence or {}))
    if LBBB in labels or RBBB in labels:
        found = [c for c in found if c not in (IRBBB, NSIVCB)]
    if IRBBB in found and NSIVCB in found:
        found.remove(NSIVCB)
    return found


def _beat_times(
    rng: np.random.Generator, labels: Sequence[str], duration: float
) -> tuple[np.ndarray, np.ndarray, float]:
    """R-peak times and beat types (0 normal, 1 PVC, 2 PAC) covering [-1 s, duration + 1 s]."""
    if SB in labels:
        hr = rng.uniform(42, 56)
    elif STACH in labels:
        hr = rng.uniform(105, 145)
    elif AF in labels:
        hr = rng.uniform(70, 125)
    else:
        hr = rng.uniform(60, 95)
    rr = 60.0 / hr
    n_max = int((duration + 2.0) / 0.25) + 4
    noise = rng.standard_normal(n_max)
    resp_f, resp_phase = rng.uniform(0.15, 0.3), rng.uniform(0, 2 * np.pi)
    resp_depth = rng.uniform(0.10, 0.18) if SA in labels else rng.uniform(0.0, 0.02)
    # Ectopic beats at 1-3 moments inside the record, so a labelled record shows them.
    slots: list[tuple[float, int]] = []
    for flag, code in ((1, PVC), (2, PAC)):
        if code in labels:
            n_slots = 1 + int(rng.integers(0, 3))
            slots += [(float(s), flag) for s in rng.uniform(0.6, max(0.6, duration - 1.2), n_slots)]
    slots.sort()
    times, types = [], []
    t = -rng.uniform(0.0, rr) - 1.0
    prev_type = 0
    k = 0
    while t < duration + 1.0 and k < n_max:
        times.append(t)
        types.append(prev_type)
        if AF in labels:
            step = rr * float(np.exp(0.22 * noise[k]))
            step = min(max(step, 0.28), 2.0)
        else:
            step = rr * (1.0 + 0.015 * noise[k] + resp_depth * np.sin(2 * np.pi * resp_f * t + resp_phase))
        next_type = 0
        if prev_type == 0 and slots and t + step > slots[0][0]:
            next_type = slots.pop(0)[1]
            while slots and slots[0][0] < t + step + rr:  # two ectopics never in a row
                slots.pop(0)
        if next_type == 1:
            step *= rng.uniform(0.55, 0.68)
        elif next_type == 2:
            step *= rng.uniform(0.62, 0.75)
        elif prev_type == 1:
            step = 2 * rr - (times[-1] - times[-2]) if len(times) > 1 else rr  # compensatory pause
        t += step
        prev_type = next_type
        k += 1
    return np.array(times), np.array(types), rr


def _wave_parameters(
    rng: np.random.Generator, labels: Sequence[str], types: np.ndarray, rr: float, morphology: np.random.Generator
):
    """Per-beat offsets (W, K), widths (W, K) and dipole amplitudes (W, K, 3). The findings of
    :data:`MORPHOLOGY_PROB` draw from ``morphology``, the record's second stream: a record
    without them draws from ``rng`` exactly what it always drew."""
    k = len(types)
    off = np.zeros((N_WAVES, k))
    sig = np.full((N_WAVES, k), 0.01)
    amp = np.zeros((N_WAVES, k, 3))

    lqrsv = rng.uniform(0.22, 0.35) if LQRSV in labels else 1.0
    a_r = rng.uniform(1.0, 1.7) * lqrsv
    if LAD in labels:
        axis = rng.uniform(-75, -35)
    elif RAD in labels:
        axis = rng.uniform(100, 150)
    else:
        axis = rng.uniform(10, 75)
    elev = rng.uniform(-0.45, -0.2)
    if PRWP in labels:  # the QRS turned posteriorly: small R waves across V1-V4
        elev = morphology.uniform(-1.1, -0.85)
    if LBBB in labels:
        qrsd = rng.uniform(0.13, 0.16)
    elif RBBB in labels:
        qrsd = rng.uniform(0.12, 0.15)
    else:
        qrsd = rng.uniform(0.08, 0.10)
        if NSIVCB in labels:  # slowed conduction without a bundle-branch pattern
            qrsd = morphology.uniform(0.112, 0.128)
    pr = rng.uniform(0.23, 0.32) if IAVB in labels else rng.uniform(0.12, 0.19)
    qtc = rng.uniform(0.48, 0.56) if LQT in labels else rng.uniform(0.38, 0.43)
    qt = qtc * np.sqrt(rr)
    a_t = rng.uniform(0.25, 0.45)
    t_dir = _direction(np.clip(axis + rng.uniform(-20, 20), 0, 80), rng.uniform(0.1, 0.35))
    if TINV in labels:
        t_dir = -t_dir
        a_t *= rng.uniform(0.6, 1.0)
    elif TAB in labels:
        a_t *= rng.uniform(0.05, 0.25)
    p_dir = _direction(rng.uniform(40, 70), 0.1)
    a_p = rng.uniform(0.10, 0.20)
    beat_scale = 1.0 + 0.03 * rng.standard_normal(k)

    normal = types != 1
    onset = -0.5 * qrsd
    # P (absent in AF and before PVCs; PACs have an ectopic, inverted-axis P)
    if AF not in labels:
        off[P_W] = onset - pr + 0.05
        sig[P_W] = 0.022
        amp[P_W] = np.outer(a_p * (types == 0), p_dir)
        pac = types == 2
        if pac.any():
            amp[P_W, pac] = a_p * _direction(rng.uniform(-90, -40), 0.0)
            off[P_W, pac] = onset - rng.uniform(0.10, 0.14) + 0.05
    if LBBB in labels:
        lb_dir = _direction(rng.uniform(-10, 40), -0.7)
        off[R_W], sig[R_W] = -0.17 * qrsd, 0.13 * qrsd
        off[R2_W], sig[R2_W] = 0.17 * qrsd, 0.13 * qrsd
        amp[R_W] = np.outer(a_r * 0.9 * normal, lb_dir)
        amp[R2_W] = np.outer(a_r * 1.0 * normal, lb_dir)
        t_dir = -lb_dir * 0.8 + 0.2 * t_dir  # secondary (discordant) T
    else:
        off[Q_W], sig[Q_W] = -0.35 * qrsd, 0.1 * qrsd
        off[R_W], sig[R_W] = 0.0, 0.11 * qrsd if RBBB not in labels else 0.08 * qrsd
        off[S_W], sig[S_W] = 0.32 * qrsd if RBBB not in labels else 0.18 * qrsd, 0.1 * qrsd
        amp[Q_W] = np.outer(0.15 * a_r * normal, _direction(axis + 180, 0.9))
        amp[R_W] = np.outer(a_r * normal, _direction(axis, elev))
        amp[S_W] = np.outer(0.25 * a_r * normal, _direction(axis + 160, -0.3))
        if RBBB in labels:
            off[RP_W], sig[RP_W] = 0.36 * qrsd, 0.12 * qrsd
            amp[RP_W] = np.outer(0.55 * a_r * normal, _direction(180 + rng.uniform(-20, 20), 0.75))
        elif IRBBB in labels:  # a small terminal R' toward V1, the QRS still narrow
            off[RP_W], sig[RP_W] = 0.34 * qrsd, 0.09 * qrsd
            amp[RP_W] = np.outer(
                morphology.uniform(0.22, 0.35) * a_r * normal, _direction(180 + morphology.uniform(-20, 20), 0.75)
            )
        if QAB in labels:  # a necrosis Q wave: wide, deep initial forces away from an inferior or anterior territory
            territory = (
                _direction(-90 + morphology.uniform(-20, 20), 0.0)
                if morphology.random() < 0.5
                else _direction(morphology.uniform(-30, 30), -1.1)
            )
            off[Q_W], sig[Q_W] = -0.38 * qrsd, 0.15 * qrsd
            amp[Q_W] = np.outer(morphology.uniform(0.35, 0.55) * a_r * normal, territory)
    off[T_W] = onset + qt - 0.12
    sig[T_W] = rng.uniform(0.04, 0.055)
    amp[T_W] = np.outer(a_t * normal, t_dir)

    pvc = types == 1
    if pvc.any():  # wide, bizarre, no P, discordant T
        v_dir = _direction(rng.uniform(-150, 150), rng.uniform(-0.8, 0.8))
        amp[:, pvc] = 0.0
        off[R_W, pvc], sig[R_W, pvc] = 0.0, rng.uniform(0.035, 0.045)
        amp[R_W, pvc] = 1.6 * a_r / max(lqrsv, 0.5) * v_dir
        off[T_W, pvc], sig[T_W, pvc] = 0.32, 0.07
        amp[T_W, pvc] = -0.45 * v_dir
    amp *= beat_scale[None, :, None]
    return off, sig, amp


WINDOW_S = (-0.45, 0.75)  # every wave of a beat lies within this span around its R peak


def _render_dipole(t: np.ndarray, r: np.ndarray, off, sig, amp, fs: float) -> np.ndarray:
    """Sum of every beat's Gaussian waves -> (3, n) dipole (each beat on its own window)."""
    n = t.size
    lo, hi = int(np.floor(WINDOW_S[0] * fs)), int(np.ceil(WINDOW_S[1] * fs))
    centre = np.rint(r * fs).astype(np.int64)
    idx = centre[:, None] + np.arange(lo, hi + 1)[None, :]  # (K, L) sample numbers
    tt = idx / fs  # (K, L) seconds
    z = (tt[None, :, :] - (r[None, :, None] + off[:, :, None])) / sig[:, :, None]  # (W, K, L)
    g = np.exp(-0.5 * np.minimum(z * z, 60.0))
    contrib = np.einsum("wkl,wkc->ckl", g, amp)  # (3, K, L)
    inside = (idx >= 0) & (idx < n)
    flat_idx = idx[inside]
    dipole = np.empty((3, n))
    for c in range(3):
        dipole[c] = np.bincount(flat_idx, weights=contrib[c][inside], minlength=n)
    return dipole


def _noise(rng: np.random.Generator, t: np.ndarray, config: SynthConfig) -> np.ndarray:
    """Electrode noise (9, n): baseline wander, mains hum, EMG with bursts."""
    n = t.size
    level = config.noise
    # Baseline wander: two slow sinusoids per electrode, evaluated every 20 ms and
    # interpolated linearly (they move < 1% of a cycle in between).
    step = max(1, int(config.fs // 50))
    coarse_t = t[::step]
    if coarse_t[-1] < t[-1]:
        coarse_t = np.append(coarse_t, coarse_t[-1] + step / config.fs)
    wander_amp = rng.uniform(0.02, 0.25) * level * config.wander * rng.uniform(0.3, 1.0, (9, 2))
    wander_f = rng.uniform(0.05, 0.5, (9, 2))
    wander_ph = rng.uniform(0, 2 * np.pi, (9, 2))
    coarse = np.einsum(
        "ek,ekn->en", wander_amp, np.sin(2 * np.pi * wander_f[..., None] * coarse_t + wander_ph[..., None])
    )
    pos = np.arange(n) / step
    i0 = np.minimum(pos.astype(np.int64), coarse.shape[1] - 2)
    frac = pos - i0
    wander = coarse[:, i0] * (1 - frac) + coarse[:, i0 + 1] * frac
    mains = (
        rng.uniform(0.0, 0.03)
        * level
        * rng.uniform(0.5, 1.5, (9, 1))
        * np.sin(2 * np.pi * config.mains_hz * t + rng.uniform(0, 2 * np.pi))
    )
    emg_std = rng.uniform(0.003, 0.02) * level
    envelope = np.ones(n)
    if rng.random() < 0.35:  # a muscle burst
        start = int(rng.integers(0, max(1, n - 1)))
        width = int(rng.uniform(0.5, 2.0) * config.fs)
        envelope[start : start + width] = rng.uniform(3, 6)
    emg = emg_std * envelope * rng.standard_normal((9, n), dtype=np.float32)
    return wander + mains + emg


def _f_waves(rng: np.random.Generator, t: np.ndarray) -> np.ndarray:
    """Atrial fibrillatory waves (3, n): 4-8 Hz, drifting phase and amplitude."""
    freq = rng.uniform(4.5, 7.5)
    drift = np.cumsum(rng.standard_normal(t.size)) * 0.02
    amp = rng.uniform(0.04, 0.1) * (1 + 0.3 * np.sin(2 * np.pi * rng.uniform(0.1, 0.4) * t))
    wave = amp * np.sin(2 * np.pi * freq * t + drift)
    return np.outer(np.array([-0.3, 0.5, 0.8]), wave)


def synthesize_record(index: int, config: SynthConfig) -> SynthRecord:
    """Record number ``index`` of the hospital described by ``config`` (pure function)."""
    rng = np.random.default_rng([config.seed, index])
    labels = draw_labels(rng, config.classes, dict(config.prevalence))
    morphology_rng = np.random.default_rng([config.seed, index, 2])
    if any(c in MORPHOLOGY_PROB for c in config.classes):
        labels += draw_morphology(morphology_rng, config.classes, labels, dict(config.prevalence))
    labelled = bool(rng.random() >= config.unlabelled_fraction)
    age = int(rng.integers(18, 95))
    sex = "Male" if rng.random() < 0.52 else "Female"
    n = round(config.duration_s * config.fs)
    t = np.arange(n) / config.fs
    r, types, rr = _beat_times(rng, labels, config.duration_s)
    off, sig, amp = _wave_parameters(rng, labels, types, rr, morphology_rng)
    dipole = _render_dipole(t, r, off, sig, amp, config.fs)
    dipole *= 1.0 + 0.05 * np.sin(2 * np.pi * rng.uniform(0.15, 0.3) * t)  # breathing
    if AF in labels:
        dipole += _f_waves(rng, t)
    leads = dipole_to_lead(config.heart_rotation_deg) @ dipole + ELECTRODE_TO_LEAD @ _noise(rng, t, config)
    fault = _apply_lead_fault(leads, index, config)
    return SynthRecord(config.record_id(config.start + index), leads, config.fs, labels, labelled, age, sex, fault)


def electrode_off(n_samples: int, rng: np.random.Generator) -> np.ndarray:
    """What a lead whose electrode came off records (mV): no ECG, the amplifier's offset (a
    constant 0.1-0.5 mV of either sign) and its own noise (3 uV rms), a near-flat line with a
    peak-to-peak of ~0.02 mV. Never exact zeros: a lead at 0 mV throughout is one that was not
    recorded (:mod:`ml.data.quality`), which is not a fault."""
    offset = rng.choice((-1.0, 1.0)) * rng.uniform(0.1, 0.5)
    return offset + rng.normal(0.0, 0.003, n_samples)


def _apply_lead_fault(leads: np.ndarray, index: int, config: SynthConfig) -> str:
    """The site's device fault on one lead, in ``lead_fault_fraction`` of its records (its
    own random stream: a site without faults draws exactly what it always drew)."""
    if not config.lead_fault or config.lead_fault_fraction <= 0:
        return ""
    rng = np.random.default_rng([config.seed, index, 1])
    if rng.random() >= config.lead_fault_fraction:
        return ""
    lead, _, kind = config.lead_fault.partition(":")
    j = STANDARD_LEADS.index(lead)
    if kind == "flat":  # electrode off: the amplifier's offset and its own noise, no ECG
        leads[j] = electrode_off(leads.shape[1], rng)
    else:  # electrode cable reversed
        leads[j] = -leads[j]
    return config.lead_fault


# ---------------------------------------------------------------------------------------
# Writing Challenge-format WFDB records (deterministic bytes)
# ---------------------------------------------------------------------------------------


def to_digital(signal_mv: np.ndarray, gain: float = GAIN) -> np.ndarray:
    return np.clip(np.rint(signal_mv * gain), -32767, 32767).astype("<i2")


def mat_v4_bytes(matrix: np.ndarray, name: str = "val") -> bytes:
    """A MATLAB v4 file holding one real matrix (int16, float32 or float64)."""
    types = {np.dtype("<i2"): 30, np.dtype("<f8"): 0, np.dtype("<f4"): 10}
    matrix = np.asarray(matrix)
    dtype = matrix.dtype.newbyteorder("<")
    rows, cols = matrix.shape
    head = struct.pack("<5i", types[dtype], rows, cols, 0, len(name) + 1) + name.encode() + b"\0"
    return head + np.asarray(matrix, dtype).T.tobytes()  # column-major


def checksum(digital: np.ndarray) -> np.ndarray:
    total = digital.astype(np.int64).sum(axis=-1)
    return ((total + 2**15) % 2**16) - 2**15


def header_text(
    record_id: str,
    digital: np.ndarray,
    fs: float,
    comments: Sequence[str],
    lead_names: Sequence[str] = STANDARD_LEADS,
    gain: float = GAIN,
    units: str = "mV",
    file_name: str | None = None,
    sig_len: int | None = None,
) -> str:
    file_name = file_name or f"{record_id}.mat"
    n = digital.shape[1] if sig_len is None else sig_len
    lines = [f"{record_id} {len(lead_names)} {fs:g} {n}"]
    sums = checksum(digital)
    for i, lead in enumerate(lead_names):
        first = int(digital[i, 0]) if digital.shape[1] else 0
        lines.append(f"{file_name} 16x1+24 {gain:.1f}(0)/{units} 16 0 {first} {int(sums[i])} 0 {lead}")
    lines += [f"# {c}" for c in comments]
    return "\n".join(lines) + "\n"


def comments_for(record: SynthRecord, dx: Sequence[str] | None = None) -> list[str]:
    out = [f"Age: {record.age}", f"Sex: {record.sex}"]
    if record.labelled:
        out.append(f"Dx: {','.join(record.labels if dx is None else dx)}")
    return [*out, "Rx: Unknown", "Hx: Unknown", "Sx: Unknown"]


def write_record(out_dir: Path, record: SynthRecord, gain: float = GAIN, units: str = "mV") -> None:
    """``<id>.hea`` + ``<id>.mat`` (int16; ``gain`` adu per ``units``, 1000 adu/mV by default)."""
    digital = to_digital(record.signal, gain * UNITS_PER_MV[units])
    (out_dir / f"{record.record_id}.mat").write_bytes(mat_v4_bytes(digital))
    (out_dir / f"{record.record_id}.hea").write_text(
        header_text(record.record_id, digital, record.fs, comments_for(record), gain=gain, units=units),
        encoding="utf-8",
        newline="\n",
    )


@dataclass
class SynthSummary:
    out_dir: str
    records: int
    labelled: int
    label_counts: dict[str, int]
    faults: dict[str, str] = field(default_factory=dict)  # record key -> expected reason or "accepted"
    lead_faults: int = 0  # records written with the config's lead fault


def _write_chunk(job: dict) -> tuple[int, Counter, int, int]:
    config = SynthConfig(**job["config"])
    out_dir = Path(job["out_dir"])
    counts: Counter = Counter()
    labelled = faulty = 0
    for index in job["indices"]:
        record = synthesize_record(index, config)
        write_record(out_dir, record, config.gain, config.units)
        faulty += bool(record.lead_fault)
        if record.labelled:
            labelled += 1
            counts.update(record.labels)
    return len(job["indices"]), counts, labelled, faulty


def generate(
    out_dir: str | Path,
    config: SynthConfig = SynthConfig(),
    *,
    faults: bool = False,
    workers: int = 1,
    chunk_size: int = 64,
    progress: bool | None = None,
) -> SynthSummary:
    """Write ``config.records`` records (and, with ``faults``, one record per fault kind)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    jobs = [
        {"config": asdict(config), "out_dir": str(out), "indices": list(range(i, min(i + chunk_size, config.records)))}
        for i in range(0, config.records, chunk_size)
    ]
    counts: Counter = Counter()
    labelled = faulty = 0
    with progress_bar(config.records, "synth", progress) as bar:
        if workers <= 1 or len(jobs) <= 2:
            results = map(_write_chunk, jobs)
            for n, c, lab, bad in results:
                counts += c
                labelled += lab
                faulty += bad
                bar.update(n)
        else:
            with process_pool(workers) as pool:
                for n, c, lab, bad in pool.map(_write_chunk, jobs):
                    counts += c
                    labelled += lab
                    faulty += bad
                    bar.update(n)
    summary = SynthSummary(
        str(out), config.records, labelled, {c: counts[c] for c in config.classes}, lead_faults=faulty
    )
    if faults:
        summary.faults = inject_faults(out, seed=config.seed, fs=config.fs)
    return summary


# ---------------------------------------------------------------------------------------
# A network of hospitals, with real site shift
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SiteProfile:
    """What makes one synthetic hospital's records differ from another's: its ECG devices
    (sampling rate, ADC gain and units, mains frequency, noise, baseline wander, a faulty
    lead on some records), its lead geometry (the heart's dipole turned before it reaches
    the leads: electrode placement and body habitus, a shift that survives preprocessing,
    which undoes rate, gain, wander and mains) and its population (the case mix)."""

    fs: float
    gain: float
    units: str
    mains_hz: float
    noise: float
    wander: float
    prevalence: tuple[tuple[str, float], ...]
    lead_fault: str = ""
    lead_fault_fraction: float = 0.0
    heart_rotation_deg: tuple[float, float, float] = (0.0, 0.0, 0.0)


# Sites take these in turn (site i: SITE_PROFILES[i % 4]); each differs from the others in
# every respect. Record names are the same at every site (00001, 00002...), on purpose.
SITE_PROFILES: tuple[SiteProfile, ...] = (
    # a university hospital: 500 Hz, 1 uV steps, clean signals, the reference case mix
    SiteProfile(500.0, 1000.0, "mV", 50.0, 0.6, 0.5, (), heart_rotation_deg=(0.0, 0.0, 35.0)),
    # a cardiology clinic: cheap 250 Hz carts at 5 uV per step, noisy, 60 Hz mains, many AF,
    # ectopic beats and conduction disorders; one cart has its V4 cable reversed
    SiteProfile(
        250.0,
        200.0,
        "mV",
        60.0,
        1.6,
        2.5,
        ((AF, 3.0), (STACH, 0.4), (LBBB, 2.2), (PVC, 2.0), (NSR, 0.5), (PAC, 1.8), (IRBBB, 1.8), (NSIVCB, 1.8)),
        "V4:inverted",
        0.25,
        heart_rotation_deg=(0.0, -40.0, 0.0),
    ),
    # a rural hospital: 1000 Hz recorders writing microvolts, older patients (brady, AV
    # block, RBBB, old infarcts: Q waves and poor R progression); one recorder's V4 electrode
    # falls off
    SiteProfile(
        1000.0,
        1.0,
        "uV",
        50.0,
        1.0,
        1.2,
        ((SB, 2.5), (AF, 0.3), (IAVB, 2.2), (RBBB, 2.0), (TINV, 0.4), (QAB, 2.0), (PRWP, 1.8), (SA, 0.4)),
        "V4:flat",
        0.2,
        heart_rotation_deg=(25.0, 0.0, -25.0),
    ),
    # an emergency department: 500 Hz at 2 uV per step, motion artefacts, tachycardias
    SiteProfile(
        500.0,
        500.0,
        "mV",
        60.0,
        2.0,
        3.0,
        ((STACH, 3.0), (SB, 0.3), (PVC, 1.8), (LQRSV, 1.8), (TINV, 1.8)),
        "V2:flat",
        0.1,
        heart_rotation_deg=(-20.0, 30.0, 0.0),
    ),
)

SITE_PREFIX = "hospital-"
MAX_SITES = 26 * 27  # hospital-a ... hospital-zz


def site_name(index: int) -> str:
    """``hospital-a``, ``hospital-b``, ... ``hospital-z``, ``hospital-aa``... (DNS labels)."""
    if not 0 <= index < MAX_SITES:
        raise ValueError(f"site index must be within [0, {MAX_SITES}), got {index}")
    letters = ""
    n = index + 1
    while n:
        n, r = divmod(n - 1, 26)
        letters = chr(ord("a") + r) + letters
    return SITE_PREFIX + letters


@dataclass(frozen=True)
class SiteOptions:
    """What every site of a synthetic network shares: the classes drawn from, the fraction of
    unlabelled records and the records' duration."""

    classes: tuple[str, ...] = DEFAULT_CLASSES
    unlabelled_fraction: float = 0.1
    duration_s: float = 10.0


def site_config(index: int, records: int, seed: int = 0, options: SiteOptions = SiteOptions()) -> SynthConfig:
    """The :class:`SynthConfig` of site ``index`` of a network: its profile and its own
    random stream (derived from ``seed`` and ``index``). Records are named ``00001``...
    at every site."""
    profile = SITE_PROFILES[index % len(SITE_PROFILES)]
    site_seed = int(np.random.SeedSequence([seed, index]).generate_state(1)[0])
    return SynthConfig(
        records=records,
        classes=tuple(options.classes),
        seed=site_seed,
        fs=profile.fs,
        duration_s=options.duration_s,
        unlabelled_fraction=options.unlabelled_fraction,
        prefix="",
        start=1,
        mains_hz=profile.mains_hz,
        noise=profile.noise,
        gain=profile.gain,
        units=profile.units,
        wander=profile.wander,
        prevalence=profile.prevalence,
        lead_fault=profile.lead_fault,
        lead_fault_fraction=profile.lead_fault_fraction,
        heart_rotation_deg=profile.heart_rotation_deg,
    )


def network_sites(
    n_sites: int, records_per_site: int, seed: int = 0, options: SiteOptions = SiteOptions()
) -> list[tuple[str, SynthConfig]]:
    """(site name, :func:`site_config`) of each of the ``n_sites`` hospitals of a network."""
    if n_sites < 1:
        raise ValueError(f"n_sites must be >= 1, got {n_sites}")
    if records_per_site < 1:
        raise ValueError(f"records_per_site must be >= 1, got {records_per_site}")
    return [(site_name(i), site_config(i, records_per_site, seed, options)) for i in range(n_sites)]


def synthesize_network(
    out_dir: Path,
    n_sites: int,
    records_per_site: int,
    seed: int = 0,
    options: SiteOptions = SiteOptions(),
    *,
    workers: int = 1,
    progress: bool | None = None,
) -> list[tuple[str, Path]]:
    """Write ``n_sites`` synthetic hospitals, ``out_dir/hospital-a``, ``out_dir/hospital-b``...
    (:func:`network_sites`: real site shift, clashing record names); returns (site name,
    folder) pairs. Bit-identical for the same arguments. Each site's folder is written
    aside and swapped in whole: an existing one is replaced, never half-written."""
    configs = network_sites(n_sites, records_per_site, seed, options)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    sites = []
    for name, config in configs:
        folder = out / name
        with _replaced_folder(folder) as staging:
            summary = generate(staging, config, workers=workers, progress=progress)
        log.info(
            "%s: %d records at %g Hz, %g adu/%s, %d with lead fault %s",
            name,
            summary.records,
            config.fs,
            config.gain,
            config.units,
            summary.lead_faults,
            config.lead_fault or "-",
        )
        sites.append((name, folder))
    return sites


@contextlib.contextmanager
def _replaced_folder(target: Path) -> Iterator[Path]:
    """A hidden sibling to write in, moved to ``target`` on success (an existing ``target``
    is replaced; the staging folder is removed on failure)."""
    staging = target.parent / f".{target.name}.staging-{uuid.uuid4().hex[:8]}"
    staging.mkdir(parents=True)
    try:
        yield staging
        old = None
        if target.exists():
            old = target.parent / f".{target.name}.old-{uuid.uuid4().hex[:8]}"
            os.replace(target, old)
        os.replace(staging, target)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


# ---------------------------------------------------------------------------------------
# Faulty records, for tests of ingestion
# ---------------------------------------------------------------------------------------

FAULT_PREFIX = "F_"


def inject_faults(out_dir: str | Path, seed: int = 0, fs: float = 500.0) -> dict[str, str]:
    """Write one faulty record per kind into ``out_dir``; returns header key -> the
    expected outcome (a :class:`Reason` value, or ``"accepted"``)."""
    out = Path(out_dir)
    base_config = SynthConfig(records=1, seed=seed + 7919, fs=fs, prefix=FAULT_PREFIX)
    expected: dict[str, str] = {}

    def good(i: int, **changes) -> SynthRecord:
        cfg = SynthConfig(**{**asdict(base_config), **changes})
        rec = synthesize_record(i, cfg)
        rec.labelled = True
        if not rec.labels:
            rec.labels = [NSR]
        return rec

    def put(key: str, header: str | bytes | None, mat: bytes | None, outcome: str, mat_name: str | None = None):
        folder = out / Path(key).parent
        folder.mkdir(parents=True, exist_ok=True)
        stem = Path(key).stem
        if header is not None:
            data = header.encode("utf-8") if isinstance(header, str) else header
            (folder / f"{stem}.hea").write_bytes(data)
        if mat is not None:
            (folder / (mat_name or f"{stem}.mat")).write_bytes(mat)
        expected[key] = outcome

    def standard(name: str, rec: SynthRecord, outcome: str, **kw) -> None:
        digital = to_digital(rec.signal)
        put(f"{name}.hea", header_text(name, digital, rec.fs, comments_for(rec), **kw), mat_v4_bytes(digital), outcome)

    def rec_named(i: int, name: str, **changes) -> SynthRecord:
        rec = good(i, **changes)
        rec.record_id = name
        return rec

    accepted = "accepted"
    n = 0

    def nxt() -> int:
        nonlocal n
        n += 1
        return n

    # -- signal files
    name = f"{FAULT_PREFIX}truncated"
    rec = rec_named(nxt(), name)
    d = to_digital(rec.signal)
    mat = mat_v4_bytes(d)
    put(f"{name}.hea", header_text(name, d, fs, comments_for(rec)), mat[: int(len(mat) * 0.6)], Reason.TRUNCATED)

    name = f"{FAULT_PREFIX}missing_signal_file"
    rec = rec_named(nxt(), name)
    put(f"{name}.hea", header_text(name, to_digital(rec.signal), fs, comments_for(rec)), None, Reason.UNREADABLE)

    name = f"{FAULT_PREFIX}corrupt_signal_file"
    rec = rec_named(nxt(), name)
    put(
        f"{name}.hea",
        header_text(name, to_digital(rec.signal), fs, comments_for(rec)),
        b"this is not a MAT file\n" * 100,
        Reason.UNREADABLE,
    )

    name = f"{FAULT_PREFIX}length_mismatch"
    rec = rec_named(nxt(), name)
    d = to_digital(rec.signal)
    short = d[:, : d.shape[1] * 4 // 5]
    put(f"{name}.hea", header_text(name, d, fs, comments_for(rec)), mat_v4_bytes(short), Reason.HEADER_MISMATCH)

    name = f"{FAULT_PREFIX}signal_count_mismatch"
    rec = rec_named(nxt(), name)
    d = to_digital(rec.signal)
    put(f"{name}.hea", header_text(name, d, fs, comments_for(rec)), mat_v4_bytes(d[:11]), Reason.HEADER_MISMATCH)

    name = f"{FAULT_PREFIX}checksum_mismatch"  # signal file of another recording
    rec = rec_named(nxt(), name)
    other = to_digital(good(nxt()).signal)
    put(
        f"{name}.hea",
        header_text(name, to_digital(rec.signal), fs, comments_for(rec)),
        mat_v4_bytes(other),
        Reason.HEADER_MISMATCH,
    )

    # -- leads
    name = f"{FAULT_PREFIX}missing_leads"
    rec = rec_named(nxt(), name)
    keep = [0, 1, 6, 7, 8, 9, 10, 11]
    d = to_digital(rec.signal)[keep]
    put(
        f"{name}.hea",
        header_text(name, d, fs, comments_for(rec), lead_names=[STANDARD_LEADS[i] for i in keep]),
        mat_v4_bytes(d),
        Reason.MISSING_LEADS,
    )

    name = f"{FAULT_PREFIX}extra_leads"  # 15 leads in a shuffled order: keep the 12 by name
    rec = rec_named(nxt(), name)
    d = to_digital(rec.signal)
    xyz = to_digital(rec.signal[[0, 5, 7]] * 0.7)
    names = [*STANDARD_LEADS, "X", "Y", "Z"]
    order = np.random.default_rng([seed, 99]).permutation(15)
    full = np.concatenate([d, xyz])[order]
    put(
        f"{name}.hea",
        header_text(name, full, fs, comments_for(rec), lead_names=[names[i] for i in order]),
        mat_v4_bytes(full),
        accepted,
    )

    name = f"{FAULT_PREFIX}shuffled_leads"
    rec = rec_named(nxt(), name)
    d = to_digital(rec.signal)
    order = np.random.default_rng([seed, 100]).permutation(12)
    lead_names = [STANDARD_LEADS[i].upper() if i % 2 else STANDARD_LEADS[i] for i in order]  # "AVR", "V1"...
    put(
        f"{name}.hea",
        header_text(name, d[order], fs, comments_for(rec), lead_names=lead_names),
        mat_v4_bytes(d[order]),
        accepted,
    )

    # -- sample values
    name = f"{FAULT_PREFIX}nan_samples"
    rec = rec_named(nxt(), name)
    d = to_digital(rec.signal).astype(np.float64)
    d[3, 1000:1010] = np.nan
    put(
        f"{name}.hea",
        header_text(name, np.nan_to_num(d).astype(np.int64), fs, comments_for(rec)),
        mat_v4_bytes(d),
        Reason.NON_FINITE,
    )

    name = f"{FAULT_PREFIX}inf_samples"
    rec = rec_named(nxt(), name)
    d = to_digital(rec.signal).astype(np.float64)
    d[7, 2000] = np.inf
    put(
        f"{name}.hea",
        header_text(name, np.nan_to_num(d, posinf=0).astype(np.int64), fs, comments_for(rec)),
        mat_v4_bytes(d),
        Reason.NON_FINITE,
    )

    name = f"{FAULT_PREFIX}invalid_samples"  # WFDB's "no sample" value in format 16
    rec = rec_named(nxt(), name)
    d = to_digital(rec.signal)
    d[1, 100:400] = -32768
    standard_digital = d
    put(f"{name}.hea", header_text(name, standard_digital, fs, comments_for(rec)), mat_v4_bytes(d), Reason.NON_FINITE)

    name = f"{FAULT_PREFIX}flat_line"
    rec = rec_named(nxt(), name)
    d = np.full_like(to_digital(rec.signal), 12)
    put(f"{name}.hea", header_text(name, d, fs, comments_for(rec)), mat_v4_bytes(d), Reason.FLAT_LINE)

    name = f"{FAULT_PREFIX}too_short"
    standard(name, rec_named(nxt(), name, duration_s=1.5), Reason.TOO_SHORT)

    # -- sample rates (resampled later, not rejected) and units
    for rate in (250.0, 257.0, 1000.0):
        name = f"{FAULT_PREFIX}fs_{rate:g}"
        standard(name, rec_named(nxt(), name, fs=rate), accepted)
    name = f"{FAULT_PREFIX}fs_too_low"
    standard(name, rec_named(nxt(), name, fs=50.0, duration_s=10.0), Reason.BAD_SAMPLE_RATE)

    name = f"{FAULT_PREFIX}units_uV"
    rec = rec_named(nxt(), name)
    d = to_digital(rec.signal)  # 1 adu = 1 uV
    put(f"{name}.hea", header_text(name, d, fs, comments_for(rec), gain=1.0, units="uV"), mat_v4_bytes(d), accepted)
    name = f"{FAULT_PREFIX}units_mv_lowercase"
    standard(name, rec_named(nxt(), name), accepted, units="mv")
    name = f"{FAULT_PREFIX}bad_units"
    standard(name, rec_named(nxt(), name), Reason.BAD_UNITS, units="mmHg")

    # -- labels
    name = f"{FAULT_PREFIX}no_dx"
    rec = rec_named(nxt(), name)
    rec.labelled = False
    standard(name, rec, accepted)
    name = f"{FAULT_PREFIX}empty_dx"
    rec = rec_named(nxt(), name)
    d = to_digital(rec.signal)
    put(f"{name}.hea", header_text(name, d, fs, [f"Age: {rec.age}", "Sex: Female", "Dx: "]), mat_v4_bytes(d), accepted)
    name = f"{FAULT_PREFIX}unscored_codes"
    rec = rec_named(nxt(), name)
    d = to_digital(rec.signal)
    dx = [*rec.labels, "55827005", "251187003"]  # valid SNOMED CT codes the Challenge does not score
    put(f"{name}.hea", header_text(name, d, fs, comments_for(rec, dx)), mat_v4_bytes(d), accepted)

    # -- identity: a record is (site, path); only a byte-identical copy is a duplicate
    name = f"{FAULT_PREFIX}duplicate"
    standard(name, rec_named(nxt(), name), accepted)
    rec = rec_named(nxt(), name)  # same name, other content, in another folder: another record
    d = to_digital(rec.signal)
    put(f"zz_resubmitted/{name}.hea", header_text(name, d, fs, comments_for(rec)), mat_v4_bytes(d), accepted)
    name = f"{FAULT_PREFIX}copy"
    rec = rec_named(nxt(), name)
    standard(name, rec, accepted)
    d = to_digital(rec.signal)
    put(f"zz_resubmitted/{name}.hea", header_text(name, d, fs, comments_for(rec)), mat_v4_bytes(d), Reason.DUPLICATE_ID)

    # -- headers
    name = f"{FAULT_PREFIX}latin1_header"
    rec = rec_named(nxt(), name)
    d = to_digital(rec.signal)
    text = header_text(name, d, fs, [*comments_for(rec)[:-1], "Hx: fibrillation auriculaire traitée"])
    put(f"{name}.hea", text.encode("latin-1"), mat_v4_bytes(d), accepted)
    name = f"{FAULT_PREFIX}binary_header"
    put(f"{name}.hea", bytes(range(256)) * 4, None, Reason.BAD_HEADER)
    name = f"{FAULT_PREFIX}bad_record_line"
    rec = rec_named(nxt(), name)
    d = to_digital(rec.signal)
    text = header_text(name, d, fs, comments_for(rec)).replace(f"{name} 12 {fs:g}", f"{name} twelve {fs:g}", 1)
    put(f"{name}.hea", text, mat_v4_bytes(d), Reason.BAD_HEADER)
    name = f"{FAULT_PREFIX}unsafe_signal_name"
    rec = rec_named(nxt(), name)
    d = to_digital(rec.signal)
    put(
        f"{name}.hea",
        header_text(name, d, fs, comments_for(rec), file_name="../../etc/passwd"),
        None,
        Reason.UNSAFE_PATH,
    )

    # -- what the reader accepts but ingestion quarantines (added last)
    name = f"{FAULT_PREFIX}lead_off"  # V3's electrode off: read, but fails the signal-quality check
    i = nxt()
    rec = rec_named(i, name)  # the fault's own stream, as a site's lead fault: [seed, index, 1]
    rec.signal[STANDARD_LEADS.index("V3")] = electrode_off(
        rec.signal.shape[1], np.random.default_rng([base_config.seed, i, 1])
    )
    standard(name, rec, Reason.SIGNAL_QUALITY)
    name = f"{FAULT_PREFIX}unknown_label"  # a diagnosis written as text, not as a SNOMED CT code
    rec = rec_named(nxt(), name)
    d = to_digital(rec.signal)
    dx = [*rec.labels, "AFIB"]
    put(f"{name}.hea", header_text(name, d, fs, comments_for(rec, dx)), mat_v4_bytes(d), Reason.UNKNOWN_LABEL)
    return {k: str(v) for k, v in expected.items()}
