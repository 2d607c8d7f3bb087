"""Read and validate one WFDB ECG record (PhysioNet/CinC 2021 ``.hea`` + ``.mat``, or ``.dat``).

:func:`read_record` turns the bytes of a header (and a callback that fetches the signal
files it names) into an :class:`ECGRecord` in physical units (mV) with the 12 standard
leads in the standard order, or raises :class:`RecordError` carrying one
:class:`Reason`. The header parser is strict on purpose (wfdb's own parser silently
replaces malformed fields by defaults); formats 16 (the Challenge ``.mat`` files are
MATLAB v4 int16 matrices, i.e. format 16 with a 24-byte offset), 61, 80, 24 and 32 are
decoded here with numpy, any other WFDB format (212, 310, 311, FLAC...) by ``wfdb``.
"""

from __future__ import annotations

import io
import math
import re
import tempfile
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path

import numpy as np

from ml.data.paths import UnsafePathError, file_name_problem, resolve_inside
from ml.errors import BadFileError

STANDARD_LEADS: tuple[str, ...] = (
    "I",
    "II",
    "III",
    "aVR",
    "aVL",
    "aVF",
    "V1",
    "V2",
    "V3",
    "V4",
    "V5",
    "V6",
)
_LEAD_INDEX = {name.lower(): i for i, name in enumerate(STANDARD_LEADS)}

WFDB_DEFAULT_FS = 250.0  # WFDB's default when the header gives no sampling frequency
WFDB_DEFAULT_GAIN = 200.0  # WFDB's default ADC gain (adu per physical unit)


class Reason(StrEnum):
    """Why a record was quarantined. One record, one reason (the first problem found)."""

    BAD_HEADER = "bad_header"  # header not decodable or not valid WFDB
    UNSAFE_PATH = "unsafe_path"  # key or signal file name escapes the record's folder
    UNREADABLE = "unreadable"  # signal file missing, or not a WFDB/MAT signal file
    TRUNCATED = "truncated"  # signal file shorter than its own or the header's size
    HEADER_MISMATCH = "header_signal_mismatch"  # file content disagrees with the header
    UNSUPPORTED = "unsupported"  # valid WFDB this pipeline does not handle (multi-segment...)
    MISSING_LEADS = "missing_leads"  # one of the 12 standard leads is absent
    BAD_UNITS = "bad_units"  # physical units that are not a voltage
    BAD_SAMPLE_RATE = "bad_sample_rate"  # too low to keep the 1-47 Hz band
    NON_FINITE = "non_finite"  # NaN/Inf or WFDB "invalid sample" values
    FLAT_LINE = "flat_line"  # (almost) every lead has no signal
    TOO_SHORT = "too_short"  # shorter than the minimum duration
    DUPLICATE_ID = "duplicate_id"  # a record with this id was seen first elsewhere
    SIGNAL_QUALITY = "signal_quality"  # read, but unfit to learn from (ml.data.quality: flat lead, clipping...)
    UNKNOWN_LABEL = "unknown_label"  # a # Dx token that is not a SNOMED CT concept id (ml.data.labels)


class RecordError(BadFileError):
    """A record that cannot be accepted: ``reason`` plus a message naming the file."""

    def __init__(self, reason: Reason, message: str):
        super().__init__(message)
        self.reason = reason
        self.message = message


@dataclass(frozen=True)
class ValidationConfig:
    """Thresholds of the record checks."""

    min_duration_s: float = 2.0
    min_fs: float = 100.0  # the 47 Hz band edge needs > 94 Hz
    flat_tolerance_mv: float = 0.005  # a lead whose peak-to-peak is below this is flat
    max_flat_leads: int = 6  # more flat leads than this: the record is a flat line
    verify_checksums: bool = True


@dataclass
class SignalSpec:
    """One signal line of a WFDB header."""

    file_name: str
    fmt: str
    samps_per_frame: int = 1
    byte_offset: int = 0
    gain: float = WFDB_DEFAULT_GAIN
    gain_given: float | None = None  # the header's own value (0 or None: WFDB's "uncalibrated": refused)
    baseline: int = 0
    units: str = "mV"
    adc_res: int = 0
    adc_zero: int = 0
    init_value: int | None = None
    checksum: int | None = None
    description: str = ""


@dataclass
class Header:
    """A parsed single-segment WFDB header."""

    record_name: str
    n_sig: int
    fs: float
    sig_len: int | None
    signals: list[SignalSpec]
    comments: list[str]
    notes: list[str] = field(default_factory=list)  # non-fatal oddities (e.g. encoding)

    def comment(self, key: str) -> str | None:
        """Value of a ``# Key: value`` comment (case-insensitive key), or None."""
        for line in self.comments:
            name, sep, value = line.partition(":")
            if sep and name.strip().lower() == key.lower():
                return value.strip()
        return None


@dataclass
class ECGRecord:
    """A record that passed every check. ``signal`` is (12, n_samples) float32 in mV."""

    record_id: str
    signal: np.ndarray
    fs: float
    dx: list[str] | None  # codes on the ``# Dx`` line in header order; None: no Dx line
    age: float | None
    sex: str | None  # "M" / "F" / None
    notes: list[str]
    flat_leads: list[str]
    n_signals: int = 12  # signals in the file (extra leads included)

    @property
    def n_samples(self) -> int:
        return int(self.signal.shape[1])


# ---------------------------------------------------------------------------------------
# Header
# ---------------------------------------------------------------------------------------

_RECORD_LINE = re.compile(
    r"^(?P<name>[^\s/]+)(?:/(?P<nseg>\d+))?\s+(?P<nsig>\d+)"
    r"(?:\s+(?P<fs>[0-9.eE+-]+)(?:/[0-9.eE+-]+(?:\([0-9.eE+-]+\))?)?"
    r"(?:\s+(?P<siglen>\d+))?)?(?:\s+.*)?$"
)
_FORMAT = re.compile(r"^(?P<fmt>\d+)(?:x(?P<spf>\d+))?(?::(?P<skew>\d+))?(?:\+(?P<offset>\d+))?$")
_GAIN = re.compile(r"^(?P<gain>[0-9.eE+-]+)(?:\((?P<baseline>-?\d+)\))?(?:/(?P<units>.*))?$")


def decode_header(data: bytes, where: str) -> tuple[str, list[str]]:
    """Header bytes -> text. UTF-8 first; other bytes are read as Latin-1 (and noted)."""
    if b"\x00" in data:
        raise RecordError(Reason.BAD_HEADER, f"{where}: header contains NUL bytes (binary file?)")
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    try:
        return data.decode("utf-8"), []
    except UnicodeDecodeError as err:
        note = f"header is not UTF-8 (byte 0x{data[err.start]:02x} at offset {err.start}); read as Latin-1"
        return data.decode("latin-1"), [note]


def _int(token: str, what: str, where: str) -> int:
    try:
        return int(token)
    except ValueError:
        raise RecordError(Reason.BAD_HEADER, f"{where}: {what} {token!r} is not an integer") from None


def _float(token: str, what: str, where: str) -> float:
    try:
        value = float(token)
    except ValueError:
        raise RecordError(Reason.BAD_HEADER, f"{where}: {what} {token!r} is not a number") from None
    if not math.isfinite(value):
        raise RecordError(Reason.BAD_HEADER, f"{where}: {what} {token!r} is not finite")
    return value


def _parse_signal_line(line: str, where: str) -> SignalSpec:
    tokens = line.split()
    if len(tokens) < 2:
        raise RecordError(Reason.BAD_HEADER, f"{where}: signal line {line!r} has no format field")
    fmt = _FORMAT.match(tokens[1])
    if not fmt:
        raise RecordError(Reason.BAD_HEADER, f"{where}: signal format {tokens[1]!r} is not valid WFDB")
    spec = SignalSpec(
        file_name=tokens[0],
        fmt=fmt["fmt"],
        samps_per_frame=int(fmt["spf"] or 1),
        byte_offset=int(fmt["offset"] or 0),
    )
    if len(tokens) > 2:
        gain = _GAIN.match(tokens[2])
        if not gain:
            raise RecordError(Reason.BAD_HEADER, f"{where}: ADC gain field {tokens[2]!r} is not valid WFDB")
        value = _float(gain["gain"], "ADC gain", where)
        if value < 0:  # would flip the lead's polarity without a word
            raise RecordError(
                Reason.BAD_HEADER,
                f"{where}: ADC gain {tokens[2]!r} of signal file {tokens[0]} is negative; a gain must be > 0 "
                "(adu per mV)",
            )
        spec.gain_given = value
        spec.gain = value or WFDB_DEFAULT_GAIN  # WFDB: 0 = uncalibrated (the default 200 is a guess; read refuses it)
        spec.baseline = int(gain["baseline"]) if gain["baseline"] is not None else 0
        spec.units = gain["units"] if gain["units"] is not None else "mV"
    if len(tokens) > 3:
        spec.adc_res = _int(tokens[3], "ADC resolution", where)
    if len(tokens) > 4:
        spec.adc_zero = _int(tokens[4], "ADC zero", where)
        if gain and gain["baseline"] is None:
            spec.baseline = spec.adc_zero
    if len(tokens) > 5:
        spec.init_value = _int(tokens[5], "initial value", where)
    if len(tokens) > 6:
        spec.checksum = _int(tokens[6], "checksum", where)
    if len(tokens) > 8:
        spec.description = " ".join(tokens[8:])
    elif len(tokens) == 8:
        spec.description = ""  # block size only, no description
    return spec


def parse_header(text: str, where: str) -> Header:
    """Parse a single-segment WFDB header (record line, signal lines, ``#`` comments)."""
    lines: list[str] = []
    comments: list[str] = []
    for raw in text.splitlines():
        line = raw.strip()
        if line.startswith("#"):
            comments.append(line[1:].strip())
        elif line:
            lines.append(line.split("#", 1)[0].strip())
    if not lines:
        raise RecordError(Reason.BAD_HEADER, f"{where}: no record line")
    match = _RECORD_LINE.match(lines[0])
    if not match:
        raise RecordError(Reason.BAD_HEADER, f"{where}: record line {lines[0]!r} is not valid WFDB")
    if match["nseg"]:
        raise RecordError(Reason.UNSUPPORTED, f"{where}: multi-segment records are not supported")
    n_sig = int(match["nsig"])
    fs = _float(match["fs"], "sampling frequency", where) if match["fs"] else WFDB_DEFAULT_FS
    sig_len = int(match["siglen"]) if match["siglen"] else None
    signals = [_parse_signal_line(line, where) for line in lines[1:]]
    if len(signals) != n_sig:
        raise RecordError(
            Reason.BAD_HEADER,
            f"{where}: record line announces {n_sig} signals but {len(signals)} signal lines follow",
        )
    return Header(match["name"], n_sig, fs, sig_len, signals, comments)


# ---------------------------------------------------------------------------------------
# Signal files
# ---------------------------------------------------------------------------------------

# format -> (numpy dtype of one sample, WFDB "invalid sample" value, offset added on read)
_NUMPY_FORMATS: dict[str, tuple[str, int, int]] = {
    "16": ("<i2", -(2**15), 0),
    "61": (">i2", -(2**15), 0),
    "80": ("u1", -(2**7), -128),
    "32": ("<i4", -(2**31), 0),
}
_INVALID = {
    "16": -(2**15),
    "61": -(2**15),
    "80": -(2**7),
    "24": -(2**23),
    "32": -(2**31),
    "212": -(2**11),
    "310": -(2**9),
    "311": -(2**9),
    "8": None,
}


def check_file_name(name: str, where: str) -> None:
    """A signal file named by a header must be a plain name in the header's folder
    (:func:`ml.data.paths.file_name_problem`: any name but a path, ``..``, control characters...)."""
    problem = file_name_problem(name)
    if problem:
        raise RecordError(
            Reason.UNSAFE_PATH,
            f"{where}: signal file name {name!r} is not a plain file name in the record's folder ({problem})",
        )


def _read_mat(data: bytes, where: str, name: str) -> np.ndarray:
    """A Challenge ``.mat`` file -> (n_sig, n_samples) array (int16 kept, floats kept)."""
    if len(data) < 20:
        raise RecordError(Reason.TRUNCATED, f"{where}: {name} has {len(data)} bytes, not even a MAT header")
    if data[:10] == b"MATLAB 5.0" or data[:4] not in (b"\x1e\x00\x00\x00", b"\x00\x00\x00\x00", b"\x0a\x00\x00\x00"):
        return _read_mat_scipy(data, where, name)
    mopt, rows, cols, imagf, namlen = np.frombuffer(data[:20], "<i4")
    if imagf or not (0 < namlen < 64) or rows <= 0 or cols < 0:
        raise RecordError(Reason.UNREADABLE, f"{where}: {name} is not a MATLAB v4 real matrix")
    dtype = {30: "<i2", 0: "<f8", 10: "<f4"}[int(mopt)]
    start = 20 + int(namlen)
    expected = int(rows) * int(cols) * np.dtype(dtype).itemsize
    if len(data) - start < expected:
        raise RecordError(
            Reason.TRUNCATED,
            f"{where}: {name} holds {len(data) - start} of the {expected} data bytes its {rows}x{cols} matrix needs",
        )
    if len(data) - start > expected:
        raise RecordError(Reason.HEADER_MISMATCH, f"{where}: {name} has {len(data) - start - expected} trailing bytes")
    # MATLAB stores column-major: samples of all signals interleaved, one frame per column.
    return np.frombuffer(data, dtype, count=int(rows) * int(cols), offset=start).reshape(int(cols), int(rows)).T


def _read_mat_scipy(data: bytes, where: str, name: str) -> np.ndarray:
    from scipy.io import loadmat

    try:
        content = loadmat(io.BytesIO(data))
    except Exception as err:  # scipy raises many types for damaged files
        reason = Reason.TRUNCATED if "truncat" in str(err).lower() or "EOF" in str(err) else Reason.UNREADABLE
        raise RecordError(reason, f"{where}: {name} is not a readable MAT file ({err})") from None
    if "val" not in content:
        raise RecordError(Reason.UNREADABLE, f"{where}: {name} has no 'val' matrix")
    return np.asarray(content["val"])


def _read_dat(data: bytes, specs: list[SignalSpec], sig_len: int | None, where: str, name: str) -> np.ndarray:
    fmt = specs[0].fmt
    n = len(specs)
    body = data[specs[0].byte_offset :]
    if fmt == "24":
        usable = len(body) - len(body) % 3
        raw = np.frombuffer(body[:usable], "u1").reshape(-1, 3).astype(np.int32)
        values = raw[:, 0] | (raw[:, 1] << 8) | (raw[:, 2] << 16)
        values = np.where(values >= 2**23, values - 2**24, values)
        leftover = len(body) % 3
    else:
        dtype, _, offset = _NUMPY_FORMATS[fmt]
        size = np.dtype(dtype).itemsize
        leftover = len(body) % size
        values = np.frombuffer(body[: len(body) - leftover], dtype).astype(np.int32) + offset
    n_frames = len(values) // n
    if sig_len is not None and n_frames < sig_len:
        raise RecordError(
            Reason.TRUNCATED, f"{where}: {name} holds {n_frames} of the {sig_len} samples per signal in the header"
        )
    if leftover or len(values) % n or (sig_len is not None and n_frames > sig_len):
        raise RecordError(
            Reason.HEADER_MISMATCH,
            f"{where}: {name} size ({len(data)} bytes) does not match {n} signals"
            + (f" x {sig_len} samples" if sig_len is not None else "")
            + f" in format {fmt}",
        )
    return values.reshape(n_frames, n).T


def _read_with_wfdb(header_text: str, files: dict[str, bytes], record_name: str, where: str) -> np.ndarray:
    """Decode any other WFDB format with the wfdb package (files copied to a temp folder)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # wfdb triggers Pandas4Warning under pandas 3
        import wfdb

        with tempfile.TemporaryDirectory(prefix="cessl-wfdb-") as tmp:
            (Path(tmp) / f"{record_name}.hea").write_text(header_text, encoding="utf-8")
            for file_name, data in files.items():
                (Path(tmp) / file_name).write_bytes(data)
            try:
                rec = wfdb.rdrecord(str(Path(tmp) / record_name), physical=False, return_res=32)
            except Exception as err:  # wfdb raises ValueError/IndexError/... on damaged files
                raise RecordError(Reason.UNREADABLE, f"{where}: wfdb cannot read the signal ({err})") from None
    return rec.d_signal.T.astype(np.int64)


def read_digital(
    header: Header, header_text: str, read_file: Callable[[str], bytes], where: str
) -> tuple[np.ndarray, np.ndarray]:
    """Digital samples of every header signal: (n_sig, n) float64 and an invalid-sample mask."""
    groups: dict[str, list[int]] = {}
    for i, spec in enumerate(header.signals):
        check_file_name(spec.file_name, where)
        groups.setdefault(spec.file_name, []).append(i)
    out: np.ndarray | None = None
    invalid: np.ndarray | None = None
    files: dict[str, bytes] = {}
    for file_name in groups:
        try:
            files[file_name] = read_file(file_name)
        except FileNotFoundError:
            raise RecordError(Reason.UNREADABLE, f"{where}: signal file {file_name} is missing") from None
        except UnsafePathError as err:
            raise RecordError(Reason.UNSAFE_PATH, f"{where}: {err}") from None
        except OSError as err:
            raise RecordError(Reason.UNREADABLE, f"{where}: cannot read {file_name} ({err})") from None
    for file_name, idx in groups.items():
        specs = [header.signals[i] for i in idx]
        if any(s.samps_per_frame != 1 for s in specs):
            raise RecordError(Reason.UNSUPPORTED, f"{where}: multi-frequency signals are not supported")
        data = files[file_name]
        fmts = {s.fmt for s in specs}
        if file_name.lower().endswith(".mat"):
            values = _read_mat(data, where, file_name)
            if values.shape[0] != len(specs):
                raise RecordError(
                    Reason.HEADER_MISMATCH,
                    f"{where}: {file_name} holds {values.shape[0]} signals, the header lists {len(specs)}",
                )
            if header.sig_len is not None and values.shape[1] != header.sig_len:
                raise RecordError(
                    Reason.HEADER_MISMATCH,
                    f"{where}: {file_name} holds {values.shape[1]} samples per signal, "
                    f"the header says {header.sig_len}",
                )
            sentinel = _INVALID.get(specs[0].fmt) if values.dtype.kind == "i" else None
        elif len(fmts) == 1 and fmts <= set(_NUMPY_FORMATS) | {"24"}:
            values = _read_dat(data, specs, header.sig_len, where, file_name)
            sentinel = _INVALID[specs[0].fmt]
        else:
            values = _read_with_wfdb(header_text, files, header.record_name, where)[idx]
            sentinel = -(2**31)  # wfdb's return_res=32 marks invalid samples this way
        block_invalid = values == sentinel if sentinel is not None else np.zeros(values.shape, bool)
        if out is None or invalid is None:  # the first file: both are allocated together
            out = np.empty((header.n_sig, values.shape[1]), np.float64)
            invalid = np.zeros(out.shape, bool)
        if values.shape[1] != out.shape[1]:
            raise RecordError(Reason.HEADER_MISMATCH, f"{where}: signal files hold different numbers of samples")
        out[idx] = values
        invalid[idx] = block_invalid
    assert out is not None and invalid is not None
    return out, invalid


def _verify_checksums(header: Header, digital: np.ndarray, invalid: np.ndarray, where: str) -> None:
    """Compare each signal's 16-bit sum with the header's checksum (when it has one)."""
    if digital.shape[1] == 0:
        return
    sums = digital.sum(axis=1)  # float64: exact for integer samples of a record this size
    for i, spec in enumerate(header.signals):
        total = sums[i]
        if spec.checksum is None or invalid[i].any() or not np.isfinite(total) or total != np.round(total):
            continue  # invalid samples, or a float matrix: no meaningful checksum
        checksum = ((int(total) + 2**15) % 2**16) - 2**15
        if (checksum - spec.checksum) % 2**16:  # writers differ on signed/unsigned
            name = spec.description or f"signal {i}"
            raise RecordError(
                Reason.HEADER_MISMATCH,
                f"{where}: checksum of {name} is {checksum}, the header says {spec.checksum} "
                "(signal file does not belong to this header, or is corrupted)",
            )


# ---------------------------------------------------------------------------------------
# Units, leads, metadata
# ---------------------------------------------------------------------------------------

_UNIT_SCALE = {  # -> mV
    "mv": 1.0,
    "millivolt": 1.0,
    "millivolts": 1.0,
    "uv": 1e-3,
    "µv": 1e-3,
    "μv": 1e-3,
    "microvolt": 1e-3,
    "microvolts": 1e-3,
    "v": 1e3,
    "volt": 1e3,
    "volts": 1e3,
    "nv": 1e-6,
}


def unit_scale(units: str) -> float | None:
    """Factor from ``units`` to mV (case-insensitive: ``mV``, ``mv``, ``uV``...), None if unknown."""
    return _UNIT_SCALE.get(units.strip().lower())


def lead_index(name: str) -> int | None:
    """Position of a lead name in :data:`STANDARD_LEADS` (case-insensitive), None for others."""
    return _LEAD_INDEX.get(name.strip().lower())


def _parse_age(value: str | None) -> float | None:
    if value is None:
        return None
    try:
        age = float(value)
    except ValueError:
        return None
    return age if math.isfinite(age) and 0 <= age < 130 else None


def _parse_sex(value: str | None) -> str | None:
    if not value:
        return None
    v = value.strip().lower()
    if v in ("m", "male", "man"):
        return "M"
    if v in ("f", "female", "woman"):
        return "F"
    return None


def parse_metadata(header: Header) -> tuple[list[str] | None, float | None, str | None]:
    """(Dx codes or None when there is no ``# Dx`` line, age, sex) from header comments."""
    from ml.data.labels import parse_dx

    dx_value = header.comment("Dx")
    dx = parse_dx(dx_value) if dx_value is not None else None
    if dx is not None and not dx:
        dx = None  # an empty Dx line carries no diagnosis: unlabelled
    return dx, _parse_age(header.comment("Age")), _parse_sex(header.comment("Sex"))


# ---------------------------------------------------------------------------------------
# The whole record
# ---------------------------------------------------------------------------------------


def read_header(header_bytes: bytes, where: str) -> tuple[Header, str]:
    text, notes = decode_header(header_bytes, where)
    header = parse_header(text, where)
    header.notes.extend(notes)
    return header, text


def read_record(
    header_bytes: bytes,
    read_file: Callable[[str], bytes],
    where: str,
    config: ValidationConfig = ValidationConfig(),
    record_id: str | None = None,
) -> ECGRecord:
    """Parse, decode and check one record; raise :class:`RecordError` with the first problem.

    ``read_file(name)`` returns the bytes of a signal file named in the header (it lives
    next to the header); ``where`` names the record in messages (a path or URI).
    """
    header, text = read_header(header_bytes, where)
    notes = list(header.notes)
    if header.fs < config.min_fs:
        raise RecordError(
            Reason.BAD_SAMPLE_RATE, f"{where}: sampling frequency {header.fs:g} Hz is below {config.min_fs:g} Hz"
        )

    # Leads by name, before touching the signal files.
    columns: list[int | None] = [None] * len(STANDARD_LEADS)
    extra: list[str] = []
    for i, spec in enumerate(header.signals):
        j = lead_index(spec.description)
        if j is None:
            extra.append(spec.description or f"#{i}")
        elif columns[j] is not None:
            raise RecordError(Reason.BAD_HEADER, f"{where}: lead {STANDARD_LEADS[j]} appears twice")
        else:
            columns[j] = i
    missing = [STANDARD_LEADS[j] for j, c in enumerate(columns) if c is None]
    if missing:
        raise RecordError(Reason.MISSING_LEADS, f"{where}: missing lead(s) {', '.join(missing)}")
    if extra:
        notes.append(f"ignored extra lead(s) {', '.join(extra)}")
    lead_columns = [c for c in columns if c is not None]  # all of them: none is missing
    for i in lead_columns:
        spec = header.signals[i]
        if unit_scale(spec.units) is None:
            raise RecordError(Reason.BAD_UNITS, f"{where}: lead {spec.description} is in {spec.units!r}, not a voltage")
        if not spec.gain_given:  # WFDB header(5): a zero or missing gain means "uncalibrated"
            given = "0" if spec.gain_given == 0 else "missing"
            raise RecordError(
                Reason.BAD_UNITS,
                f"{where}: lead {spec.description} (signal file {spec.file_name}) has ADC gain {given}, which WFDB "
                "defines as uncalibrated: its amplitude in mV is unknown (the classes depend on it); write the "
                "recorder's gain (adu/mV) into the header",
            )

    digital, invalid = read_digital(header, text, read_file, where)
    if config.verify_checksums:
        _verify_checksums(header, digital, invalid, where)

    order = np.asarray(lead_columns)
    digital, invalid = digital[order], invalid[order]
    specs = [header.signals[i] for i in order]
    gain = np.array([s.gain for s in specs])[:, None]
    baseline = np.array([s.baseline for s in specs], np.float64)[:, None]
    scale = np.array([unit_scale(s.units) for s in specs])[:, None]
    signal = (digital - baseline) * (scale / gain)

    n = signal.shape[1]
    if n < config.min_duration_s * header.fs:
        raise RecordError(
            Reason.TOO_SHORT, f"{where}: {n / header.fs:.2f} s long, the minimum is {config.min_duration_s:g} s"
        )
    bad = invalid | ~np.isfinite(signal)
    if bad.any():
        leads = [STANDARD_LEADS[j] for j in np.flatnonzero(bad.any(axis=1))]
        raise RecordError(
            Reason.NON_FINITE,
            f"{where}: {int(bad.sum())} NaN/Inf/invalid sample(s) in lead(s) {', '.join(leads)}",
        )
    ptp = signal.max(axis=1) - signal.min(axis=1)
    flat = [STANDARD_LEADS[j] for j in np.flatnonzero(ptp < config.flat_tolerance_mv)]
    if len(flat) > config.max_flat_leads:
        raise RecordError(Reason.FLAT_LINE, f"{where}: {len(flat)} of 12 leads are flat ({', '.join(flat)})")
    if flat:
        notes.append(f"flat lead(s) {', '.join(flat)}")
    if header.fs != 500:
        notes.append(f"sampled at {header.fs:g} Hz")
    dx, age, sex = parse_metadata(header)
    return ECGRecord(
        record_id=record_id or header.record_name,
        signal=signal.astype(np.float32),
        fs=float(header.fs),
        dx=dx,
        age=age,
        sex=sex,
        notes=notes,
        flat_leads=flat,
        n_signals=header.n_sig,
    )


def read_record_file(path: str | Path, config: ValidationConfig = ValidationConfig()) -> ECGRecord:
    """:func:`read_record` for a header on the local disk (signal files next to it).

    The header and every signal file it names must resolve inside the header's folder
    (:func:`ml.data.paths.resolve_inside`, as ingestion checks them): a symbolic link out of
    it is refused (UnsafePathError for the header, ``unsafe_path`` RecordError for a signal file).
    """
    path = Path(path)
    if path.suffix != ".hea":
        path = path.with_suffix(".hea")
    folder = path.parent
    header = resolve_inside(folder, path.name, "the record's folder")
    return read_record(
        header.read_bytes(),
        lambda name: resolve_inside(folder, name, "the record's folder").read_bytes(),
        str(path),
        config,
        record_id=path.stem,
    )
