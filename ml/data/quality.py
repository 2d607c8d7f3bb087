"""Signal quality of one raw ECG record: can it be learnt from and diagnosed, and if not, why.

One check, three users: ingestion quarantines a record that fails it (reason
``signal_quality``, :mod:`ml.data.ingest`); ``cessl predict``
(:meth:`ml.eval.predictor.Predictor.predict_records`) and ``cessl serve``
(:mod:`pipeline.serving.server`) answer it "unreadable" with the reasons, never with
diagnoses. A record that passes goes on unchanged: nothing here alters a signal.

Input: ``signal`` ``(n_leads, n_samples)`` in mV (the layout of
:attr:`ml.data.records.ECGRecord.signal` and of the server's ``signals`` tensor), its sampling
rate in Hz and its lead names (the 12 standard leads in order by default). The checks, each
threshold a field of :class:`QualityConfig` whose comment gives its source:

* record: implausible sampling rate; too short for the model's window; a standard lead
  absent from the record; more leads not recorded than allowed, or lead I or II not
  recorded; no lead carrying an ECG-sized signal (all near zero); limb-lead (LA/RA) reversal,
  only where it is unambiguous.
* lead: NaN/Inf samples; flat (no signal at all: a near-constant line with a little noise, or
  a constant level other than 0 mV); flat for seconds (a dropout); clipped or saturated (long
  runs, or many samples, at its own extreme value); implausible amplitude (a gain or unit
  error); broadband noise dominating the band the model sees.

A lead that was **not recorded** is told apart from one whose electrode came off. A lead whose
every sample is exactly 0 mV (the ADC baseline: the digital value of its header's baseline)
for the whole record was not recorded: real 12-lead exports write the leads a device did not
acquire that way (two of the real fixture records, JS20004 and JS20008 from Chapman-Shaoxing,
have V2, V4 and V6 at exactly 0 mV for their whole 10 s). Such a record passes with a *note*
(``V2, V4, V6 not recorded (all samples 0)``) as long as at most
:attr:`QualityConfig.max_missing_leads` leads are missing and leads I and II are both recorded;
otherwise it fails, naming them. An electrode that came off does not write exact zeros for
the whole record: the amplifier still digitises its own noise (a near-constant line), an
offset or a rail (a constant level other than 0 mV), or the lead drops out for part of the
record (a stretch of constant samples); those are faults.

The checks are conservative by design: they flag what no electrocardiograph records from a
heart, never a rare but real ECG. Every threshold on a measured quantity keeps a margin of at
least 2 over the worst value of the 35 real PhysioNet/CinC 2021 records in
``tests/fixtures/ecg`` (``tests/unit/test_data_quality.py`` measures them; all 35 pass, the two
with unrecorded leads with the note), and the synthetic hospitals of every site profile pass
but for their disconnected electrodes.

The kinds of checks are those of the ECG signal-quality literature around the PhysioNet/CinC
Challenge 2011 on the clinical acceptability of 12-lead ECGs (Silva, Moody & Celi, CinC 2011;
Clifford et al., "Signal quality indices and data fusion for determining clinical acceptability
of electrocardiograms", Physiol. Meas. 33:1419, 2012): rules for flat, missing and saturated
leads and implausible amplitudes, and spectral signal-quality indices (Behar et al., "ECG
signal quality during arrhythmia and its application to false alarm reduction", IEEE TBME
60:1660, 2013: the relative power of the QRS band and of the baseline). The numbers are this
module's, set as each comment says.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np
from scipy import signal as sps

from ml.data.records import STANDARD_LEADS, ECGRecord, ValidationConfig, lead_index

# The model's window: ml.data.preprocess.PreprocessConfig (6144 samples at 500 Hz, band 1-47 Hz).
MODEL_WINDOW_S = 6144 / 500.0  # 12.288 s; a shorter record is zero-padded to it
MODEL_BAND_HZ = (1.0, 47.0)

# How ``cessl predict`` and ``cessl serve`` read a WFDB record: read_record's checks of the file
# and header only; what the signal holds (flat, too short, sampling rate) is judged here, so
# that such a record is answered "unreadable" with this module's reasons.
STRUCTURAL_CHECKS = ValidationConfig(min_fs=0.0, min_duration_s=0.0, max_flat_leads=len(STANDARD_LEADS))


@dataclass(frozen=True)
class QualityConfig:
    """Thresholds of the signal-quality checks (each one's source in its comment)."""

    # Sampling rate. Below 100 Hz the 1-47 Hz band the model reads is not kept (Nyquist: > 94 Hz;
    # the same bound as ml.data.records.ValidationConfig.min_fs). Above 20 kHz no ECG recorder
    # writes 12-lead records (diagnostic ECGs: 250-1000 Hz; high-resolution research ECGs up
    # to ~10 kHz); it is also the server's upper bound (pipeline.serving.server.MAX_SAMPLE_RATE).
    min_fs: float = 100.0
    max_fs: float = 20_000.0
    # Duration. The model reads 12.288 s (MODEL_WINDOW_S) and zero-pads a shorter record; the
    # Challenge's 10-s recordings fill 81% of it (CPSC 2018's last 6-60 s). Below 5 s over 59%
    # of the model's input would be padding, a regime it never saw in training, with as few as
    # 4 beats at 50 bpm.
    min_duration_s: float = 5.0
    # Flat lead: peak-to-peak below 0.05 mV over the whole record. The smallest QRS of a real
    # lead (an isoelectric limb lead) still spans ~0.1-0.2 mV (even "low QRS voltage" means
    # < 0.5 mV in every limb lead, < 1 mV in every chest lead); the smallest real lead in the
    # fixtures spans 0.23 mV (4.6x this bound). A lead at exactly 0 mV throughout is not flat
    # but not recorded (below).
    flat_ptp_mv: float = 0.05
    # Leads not recorded (every sample exactly 0 mV, the ADC baseline) tolerated, as a note.
    # The PhysioNet/CinC Challenge 2021 ("Will two do?", Reyna et al., CinC 2021) scored
    # reduced-lead sets of 6 (I, II, III, aVR, aVL, aVF), 4 (I, II, III, V2), 3 (I, II, V2)
    # and 2 (I, II) leads: an ECG is read with leads missing; and real 12-lead exports carry
    # unrecorded leads (the fixtures' JS20004 and JS20008: V2, V4 and V6). 3: what those real
    # records show; preprocessing keeps an unrecorded lead at zeros (as in such records of the
    # Challenge data), and with more than 3 of its 12 inputs empty the 12-lead model would read
    # mostly what it was not trained on (a site whose recorders write reduced lead sets, and
    # whose model was trained on them, raises it). Leads I and II must be
    # recorded, whatever this says: every reduced set of the Challenge keeps them, and the
    # other limb leads derive from them (III = II - I, aVR = -(I + II)/2, aVL = I - II/2,
    # aVF = II - I/2), so without them the frontal plane is lost.
    max_missing_leads: int = 3
    # Flat for seconds: a constant value (an electrode that came off and back) for 2 s or more;
    # the longest constant stretch of a real fixture lead is 0.39 s (coarse ADC steps at rest).
    max_flat_run_s: float = 2.0
    # Saturation / clipping (an amplifier at its rail): a lead at its own maximum or minimum
    # for 0.5 s in a row, or for 5% of its samples. An ECG touches its
    # extremes only at a few QRS peaks; the real fixtures stay there at most 0.11 s in a row
    # and 1.1% of the time (4.5x margin).
    max_rail_run_s: float = 0.5
    max_rail_fraction: float = 0.05
    # Amplitude, measured robustly: the range of the 1st-99th percentiles of the lead band-passed
    # to 0.5-40 Hz (98% of its samples: a few spikes do not count, sustained amplitude does).
    # Diagnostic electrocardiographs are specified for +-5 mV (10 mV peak-to-peak) inputs
    # (IEC 60601-2-25) and the tallest real QRS complexes reach ~5 mV in one lead; 15 mV of
    # sustained range is a gain or unit error (the fixtures' largest: 6.7 mV in JS20006 V4).
    max_amplitude_mv: float = 15.0
    # All near zero: the record's largest lead (same measure) spans less than 0.1 mV: no lead
    # carries an ECG (a gain or unit error, a disconnected cable); 5x below the low-QRS-voltage
    # bound of the limb leads (0.5 mV); the fixtures' smallest is 0.73 mV.
    min_record_amplitude_mv: float = 0.1
    # Broadband noise: its density, the median power spectral density over 40-150 Hz (above the
    # ECG's own power; the median ignores mains hum and its harmonics, which the band-pass
    # removes), extrapolated to the model's 1-47 Hz band, as a fraction of the power there: a
    # spectral SQI in the sense of Behar et al. 2013. 0.5 is an in-band SNR of 0 dB; the real
    # fixtures reach 0.08, the noisiest synthetic sites 0.16.
    max_noise_fraction: float = 0.5
    noise_low_hz: float = 40.0
    noise_high_hz: float = 150.0
    min_noise_band_hz: float = 20.0  # a narrower measurable band (fs < 134 Hz): not measured
    # LA/RA reversal (Batchvarov, Malik & Camm, "Incorrect electrode cable connection during
    # electrocardiographic recording", Europace 9:1081, 2007: lead I inverted, aVR upright).
    # Flagged only when clear: over >= 4 beats, the median QRS polarity (max + min) / (max - min)
    # is <= -0.5 in lead I and >= +0.5 in aVR, and >= +0.3 in V6 (a normal lateral precordial
    # QRS: the swap does not touch the chest leads, dextrocardia and extreme right axis do).
    reversal_polarity: float = 0.5
    reversal_v6_polarity: float = 0.3
    min_beats: int = 4

    def __post_init__(self) -> None:
        if not 0 < self.min_fs < self.max_fs:
            raise ValueError(f"QualityConfig: need 0 < min_fs < max_fs, got {self.min_fs} and {self.max_fs}")
        if self.min_duration_s < 0 or self.flat_ptp_mv < 0 or self.max_missing_leads < 0:
            raise ValueError("QualityConfig: min_duration_s, flat_ptp_mv and max_missing_leads must be >= 0")
        if not 0 < self.max_rail_fraction <= 1 or not 0 < self.max_noise_fraction <= 1:
            raise ValueError("QualityConfig: max_rail_fraction and max_noise_fraction must be within (0, 1]")


@dataclass(frozen=True)
class QualityResult:
    """What the checks found: the record passes (``ok``) when nothing was found.

    ``lead_reasons``: lead name -> why that lead fails (the first problem found in it);
    ``record_reasons``: problems of the record as a whole; ``notes``: what was seen but
    tolerated, for the user to know (``V2, V4, V6 not recorded (all samples 0)``: leads not
    recorded, within ``QualityConfig.max_missing_leads``); a record with notes is ``ok``.
    ``missing``: the leads not recorded (every sample 0 mV), tolerated or not.
    """

    lead_reasons: dict[str, str] = field(default_factory=dict)
    record_reasons: tuple[str, ...] = ()
    notes: tuple[str, ...] = ()
    missing: tuple[str, ...] = ()

    @property
    def ok(self) -> bool:
        return not self.lead_reasons and not self.record_reasons

    def summary(self) -> str:
        """One line: the record's reasons, then ``LEAD: reason`` per lead ("ok" when none)."""
        parts = [*self.record_reasons, *(f"{lead}: {why}" for lead, why in self.lead_reasons.items())]
        return "; ".join(parts) or "ok"

    def to_dict(self) -> dict:
        return {
            "ok": self.ok,
            "record": list(self.record_reasons),
            "leads": dict(self.lead_reasons),
            "notes": list(self.notes),
            "missing": list(self.missing),
        }


# ---------------------------------------------------------------------------------------
# Measures (pure functions of one lead or of the record)
# ---------------------------------------------------------------------------------------


def longest_run(mask: np.ndarray) -> tuple[int, int]:
    """(length, start) of the longest run of True in a 1-D boolean array ((0, 0) when none)."""
    if not mask.any():
        return 0, 0
    edges = np.diff(np.concatenate(([0], mask.astype(np.int8), [0])))
    starts, ends = np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)
    i = int(np.argmax(ends - starts))
    return int(ends[i] - starts[i]), int(starts[i])


@lru_cache(maxsize=32)
def _butter(fs: float, low: float, high: float) -> np.ndarray:
    return sps.butter(2, [low, high], btype="bandpass", fs=fs, output="sos")


def bandpass(x: np.ndarray, fs: float, low: float = 0.5, high: float = 40.0) -> np.ndarray:
    """Zero-phase Butterworth band-pass (order 2) along the last axis; ``x`` as is when too
    short to filter. The default band, 0.5-40 Hz, is the ECG's diagnostic band (without
    baseline wander and mains hum) in which amplitudes and polarities are measured."""
    sos = _butter(float(fs), low, min(high, 0.45 * fs))
    if x.shape[-1] <= 3 * (2 * len(sos) + 1):  # sosfiltfilt's padding needs more samples
        return x
    return np.asarray(sps.sosfiltfilt(sos, x, axis=-1))


def robust_amplitude(band: np.ndarray) -> np.ndarray:
    """Per lead, the 1st-99th percentile range (mV) of ``band`` ``(leads, samples)``, a record
    band-passed by :func:`bandpass`."""
    low, high = np.percentile(band, [1.0, 99.0], axis=-1)
    return np.asarray(high - low)


def noise_fraction(x: np.ndarray, fs: float, config: QualityConfig = QualityConfig()) -> np.ndarray | None:
    """Per lead, the estimated share of broadband noise in the model's 1-47 Hz band (see
    :class:`QualityConfig`); None when the sampling rate leaves no measurable band above 40 Hz."""
    high = min(config.noise_high_hz, 0.45 * fs)
    if high - config.noise_low_hz < config.min_noise_band_hz:
        return None
    nperseg = min(x.shape[-1], round(2 * fs))
    freqs, psd = sps.welch(x - x.mean(axis=-1, keepdims=True), fs=fs, nperseg=nperseg, axis=-1)
    df = freqs[1] - freqs[0]
    floor = np.median(psd[:, (freqs >= config.noise_low_hz) & (freqs <= high)], axis=-1)
    low_band, high_band = MODEL_BAND_HZ
    in_band = psd[:, (freqs >= low_band) & (freqs <= high_band)].sum(axis=-1) * df
    return np.asarray(floor * (high_band - low_band) / np.maximum(in_band, 1e-30))


def beat_positions(x: np.ndarray, fs: float) -> np.ndarray:
    """Sample positions of the QRS complexes of ``x`` ``(leads, samples)``: peaks of the summed
    squared slope of the leads band-passed to 5-25 Hz (each lead scaled to unit variance),
    at least 0.3 s apart (at most 200 bpm)."""
    y = bandpass(x, fs, 5.0, 25.0)
    y = y / np.maximum(y.std(axis=-1, keepdims=True), 1e-12)
    energy = np.sum(np.diff(y, axis=-1) ** 2, axis=0)
    if not energy.size:
        return np.zeros(0, dtype=int)
    peaks, _ = sps.find_peaks(energy, distance=max(1, int(0.3 * fs)), height=0.2 * np.percentile(energy, 99.5))
    return np.asarray(peaks, dtype=int)


def qrs_polarity(band: np.ndarray, fs: float, beats: np.ndarray) -> np.ndarray | None:
    """Per lead of ``band`` (a record band-passed by :func:`bandpass`), the median over beats
    of (max + min) / (max - min) of the QRS (+-60 ms around each beat, relative to the median
    of +-400 ms): +1 all upward, -1 all downward. None when fewer than 3 beats lie far enough
    from the record's ends."""
    y = band
    half, context = int(0.06 * fs), int(0.4 * fs)
    beats = beats[(beats - context >= 0) & (beats + context < y.shape[-1])]
    if len(beats) < 3:
        return None
    values = []
    for b in beats:
        base = np.median(y[:, b - context : b + context], axis=-1, keepdims=True)
        qrs = y[:, b - half : b + half + 1] - base
        high, low = qrs.max(axis=-1), qrs.min(axis=-1)
        values.append((high + low) / np.maximum(high - low, 1e-12))
    return np.asarray(np.median(values, axis=0))


# ---------------------------------------------------------------------------------------
# The checks
# ---------------------------------------------------------------------------------------


def sampling_rate_problem(fs: float, config: QualityConfig = QualityConfig()) -> str | None:
    if not math.isfinite(fs) or not config.min_fs <= fs <= config.max_fs:
        return f"implausible sampling rate {fs:g} Hz (plausible: {config.min_fs:g}-{config.max_fs:g} Hz)"
    return None


def duration_problem(n_samples: int, fs: float, config: QualityConfig = QualityConfig()) -> str | None:
    seconds = n_samples / fs
    if seconds < config.min_duration_s:
        return (
            f"too short: {seconds:.2f} s (the model reads {MODEL_WINDOW_S:.3f} s and needs at least "
            f"{config.min_duration_s:g} s of it)"
        )
    return None


def not_recorded(lead: np.ndarray) -> bool:
    """Whether a lead (mV) was not recorded: it has samples and every one is exactly 0 mV (the
    ADC baseline), what an export writes for a lead its device did not acquire."""
    return bool(lead.size) and not np.any(lead)


def lead_problem(lead: np.ndarray, fs: float | None, config: QualityConfig = QualityConfig()) -> str | None:
    """The first problem of one lead (mV) among non-finite samples, flat, a flat stretch and
    clipping (the time-based checks need a plausible ``fs``; None: skip them). A lead that was
    :func:`not_recorded` is judged by :func:`missing_leads_problem`, not here (it is flat)."""
    finite = np.isfinite(lead)
    if not finite.all():
        if not finite.any():
            return "missing (no finite sample)"
        return f"NaN/Inf in {int((~finite).sum())} of {lead.size} samples"
    ptp = float(lead.max() - lead.min()) if lead.size else 0.0
    if lead.size and ptp == 0.0:
        return f"flat (a constant {float(lead[0]):.3f} mV throughout: an electrode off or an amplifier at a rail)"
    if ptp < config.flat_ptp_mv:
        return f"flat (peak-to-peak {ptp:.3f} mV < {config.flat_ptp_mv:g} mV: an electrode off?)"
    if fs is None:
        return None
    at_max, at_min = lead == lead.max(), lead == lead.min()
    rail_run = max(longest_run(at_max)[0], longest_run(at_min)[0])
    if rail_run / fs >= config.max_rail_run_s:
        value = float(lead.max()) if longest_run(at_max)[0] == rail_run else float(lead.min())
        return (
            f"saturated: at {value:.3f} mV for {rail_run / fs:.2f} s in a row "
            f"(clipping; at most {config.max_rail_run_s:g} s at its extreme)"
        )
    rail_fraction = float((at_max | at_min).mean())
    if rail_fraction >= config.max_rail_fraction:
        return (
            f"clipped: {100 * rail_fraction:.1f}% of samples at its extremes ({float(lead.min()):.3f} / "
            f"{float(lead.max()):.3f} mV; at most {100 * config.max_rail_fraction:g}%)"
        )
    run, start = longest_run(np.diff(lead) == 0)
    if (run + 1) / fs >= config.max_flat_run_s:
        return (
            f"flat for {(run + 1) / fs:.2f} s from {start / fs:.2f} s "
            f"(a constant {float(lead[start]):.3f} mV; at most {config.max_flat_run_s:g} s)"
        )
    return None


def reversal_problem(
    x: np.ndarray, band: np.ndarray, fs: float, leads: Sequence[str], config: QualityConfig = QualityConfig()
) -> str | None:
    """LA/RA reversal of ``x`` (``band``: the same band-passed) when it is clear (see
    :class:`QualityConfig`); None otherwise or when leads I, aVR or V6 are absent or there are
    too few beats to tell."""
    index = {name: i for i, name in enumerate(leads)}
    needed = [index.get(n) for n in ("I", "aVR", "V6")]
    if any(i is None for i in needed):
        return None
    beats = beat_positions(x, fs)
    if len(beats) < config.min_beats:
        return None
    polarity = qrs_polarity(band, fs, beats)
    if polarity is None:
        return None
    lead_i, avr, v6 = (float(polarity[i]) for i in needed if i is not None)
    if lead_i <= -config.reversal_polarity and avr >= config.reversal_polarity and v6 >= config.reversal_v6_polarity:
        return (
            f"left/right arm electrodes reversed (LA/RA): QRS negative in lead I ({lead_i:+.2f}) and "
            f"upright in aVR ({avr:+.2f}) while V6 is normal ({v6:+.2f}); re-record with the arm "
            "cables on the right arms"
        )
    return None


def check_signal(
    signal: np.ndarray,
    fs: float,
    leads: Sequence[str] = STANDARD_LEADS,
    config: QualityConfig = QualityConfig(),
) -> QualityResult:
    """Check one record ``signal`` ``(n_leads, n_samples)`` in mV at ``fs`` Hz with lead names
    ``leads`` (ValueError when the shapes disagree). See the module docstring."""
    x = np.asarray(signal, dtype=np.float64)
    leads = [STANDARD_LEADS[i] if (i := lead_index(str(name))) is not None else str(name) for name in leads]
    if x.ndim != 2 or x.shape[0] != len(leads):
        raise ValueError(
            f"signal of shape {tuple(np.shape(signal))}: expected (leads, samples) with {len(leads)} leads "
            f"({', '.join(leads)})"
        )
    record: list[str] = []
    absent = [name for name in STANDARD_LEADS if name not in leads]
    if absent:
        record.append(f"missing lead(s) {', '.join(absent)}")
    fs_problem = sampling_rate_problem(float(fs), config)
    if fs_problem:
        record.append(fs_problem)
    timed = fs_problem is None
    short = duration_problem(x.shape[1], float(fs), config) if timed else None
    if short:
        record.append(short)
    if x.shape[1] == 0:
        return QualityResult({}, (*record, "no samples"))

    missing = [name for i, name in enumerate(leads) if not_recorded(x[i])]
    found = {
        name: None if name in missing else lead_problem(x[i], float(fs) if timed else None, config)
        for i, name in enumerate(leads)
    }
    reasons = {name: why for name, why in found.items() if why}
    notes: list[str] = []
    if missing:
        problem = missing_leads_problem(missing, len(leads), config)
        if problem:
            record.append(problem)
        else:
            notes.append(f"{', '.join(missing)} not recorded (all samples 0)")
    good = [i for i, name in enumerate(leads) if not found[name] and name not in missing]
    if not good and len(missing) < len(leads):
        record.append(f"no lead carries a signal (all {len(leads)} fail)")
    if timed and good:
        record += _signal_problems(x, float(fs), leads, good, reasons, skip_spectral=short is not None, config=config)
    return QualityResult(reasons, tuple(record), tuple(notes), tuple(missing))


def missing_leads_problem(missing: Sequence[str], n_leads: int, config: QualityConfig = QualityConfig()) -> str | None:
    """Why the leads ``missing`` (not recorded) of a record of ``n_leads`` leads make it unreadable:
    all of them, more than ``config.max_missing_leads``, or lead I or II among them; None when
    they are tolerated (see :class:`QualityConfig`)."""
    if len(missing) == n_leads:
        return f"no lead recorded (all {n_leads} are 0 mV throughout)"
    rules = []
    if len(missing) > config.max_missing_leads:
        rules.append(f"at most {config.max_missing_leads} may be missing")
    limb = [name for name in ("I", "II") if name in missing]
    if limb:
        rules.append("leads I and II must be recorded (the other limb leads derive from them)")
    if not rules:
        return None
    which = f"lead {missing[0]}" if len(missing) == 1 else f"leads {', '.join(missing)}"
    return f"{which} not recorded (all samples 0): " + ", and ".join(rules)


def _signal_problems(
    x: np.ndarray,
    fs: float,
    leads: Sequence[str],
    good: list[int],
    reasons: dict[str, str],
    *,
    skip_spectral: bool,
    config: QualityConfig,
) -> list[str]:
    """Amplitude, noise and reversal of the leads that passed the per-lead checks (``reasons``
    gets the lead problems; the record's problems are returned)."""
    record: list[str] = []
    band = bandpass(x[good], fs)
    amplitude = robust_amplitude(band)
    for i, value in zip(good, amplitude, strict=True):
        if value > config.max_amplitude_mv:
            reasons[leads[i]] = (
                f"implausible amplitude: 98% of samples span {value:.1f} mV (> {config.max_amplitude_mv:g} mV; "
                "a gain or unit error?)"
            )
    largest = int(np.argmax(amplitude))
    if float(amplitude[largest]) < config.min_record_amplitude_mv:
        record.append(
            f"all leads near zero: the largest, {leads[good[largest]]}, spans {float(amplitude[largest]):.3f} mV "
            f"(< {config.min_record_amplitude_mv:g} mV: no ECG, or a gain or unit error)"
        )
    if skip_spectral:
        return record
    noise = noise_fraction(x[good], fs, config)
    if noise is not None:
        for i, value in zip(good, noise, strict=True):
            if value > config.max_noise_fraction and leads[i] not in reasons:
                reasons[leads[i]] = (
                    f"noisy: broadband noise ~{min(100 * float(value), 100):.0f}% of its 1-47 Hz power "
                    f"(> {100 * config.max_noise_fraction:g}%)"
                )
    if not reasons:  # the polarity of a bad lead tells nothing
        reversal = reversal_problem(x[good], band, fs, [leads[i] for i in good], config)
        if reversal:
            record.append(reversal)
    return record


def check_record(record: ECGRecord, config: QualityConfig = QualityConfig()) -> QualityResult:
    """:func:`check_signal` of a record read by :func:`ml.data.records.read_record` (12 standard leads)."""
    return check_signal(record.signal, record.fs, STANDARD_LEADS, config)
