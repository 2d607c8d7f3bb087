"""Data versions with DVC: the demo hospital in ``data/``, adding hospitals, reading versions.

``data/`` (git-ignored) is tracked by ``data.dvc`` at the repository root; the md5 of
``data/`` written there is the data version that runs log for lineage
(:func:`data_version`). The demo hospital is generated bit-identically by
:func:`ensure_demo_data`, so a fresh clone rebuilds exactly the data its ``data.dvc``
names (``dvc status`` clean) without pulling anything. :func:`add_records` copies a new
hospital's records from a folder or ``s3://`` prefix into ``data/<name>/`` and records a
new DVC version; ``dvc push`` / ``dvc pull`` move it through any DVC remote (S3 included).

DVC runs as the ``dvc`` command of the running environment (a subprocess): its Python
API does not cover ``add``/``push``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)

DATA_DIR = "data"
DVC_FILE = "data.dvc"
DEMO_HOSPITAL = "demo_hospital"
REAL_SAMPLE = "cinc2021_sample"
DEMO_SEED = 20240620
DEMO_RECORDS = 600
DEMO_UNLABELLED_FRACTION = 0.1
# A few real Challenge records (Georgia, PTB-XL with its "mv" unit, Chapman-Shaoxing with
# flat leads), copied from the repository's test fixtures.
REAL_RECORDS = ("E07500", "E07509", "HR06000", "JS20000", "JS20004")
REAL_RECORDS_DIR = Path("tests") / "fixtures" / "ecg" / "cinc2021"


# ---------------------------------------------------------------------------------------
# Versions
# ---------------------------------------------------------------------------------------


def file_md5(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def dir_md5(path: str | Path) -> str:
    """The md5 DVC gives a directory (``<md5>.dir``): md5 of its sorted JSON file list."""
    root = Path(path)
    entries = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if d not in (".dvc", ".git")]
        for name in files:
            full = Path(folder) / name
            entries.append({"md5": file_md5(full), "relpath": full.relative_to(root).as_posix()})
    entries.sort(key=lambda e: e["relpath"])
    return hashlib.md5(json.dumps(entries, sort_keys=True).encode()).hexdigest() + ".dir"


def dvc_md5(dvc_file: str | Path, data_path: str | Path | None = None) -> str | None:
    """The md5 a ``.dvc`` file records for its output (the one at ``data_path`` if given).

    None when the file does not exist or tracks no such output; ValueError when it is not
    valid YAML or the output has no md5.
    """
    import yaml

    dvc_file = Path(dvc_file)
    if not dvc_file.is_file():
        return None
    try:
        spec = yaml.safe_load(dvc_file.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as err:
        raise ValueError(f"{dvc_file}: not a valid .dvc file ({err})") from err
    for out in spec.get("outs") or []:
        path = (dvc_file.parent / str(out.get("path", ""))).resolve()
        if data_path is None or path == Path(data_path).resolve():
            md5 = out.get("md5")
            if not md5:
                raise ValueError(f"{dvc_file}: output {out.get('path')!r} has no md5")
            return str(md5)
    return None


def data_version(repo_root: str | Path = ".", dvc_file: str = DVC_FILE) -> str | None:
    """The md5 recorded in ``data.dvc`` (e.g. ``"3f2a...e1.dir"``), None if untracked."""
    return dvc_md5(Path(repo_root) / dvc_file)


def find_repo_root(start: str | Path = ".") -> Path:
    """The nearest folder at or above ``start`` holding ``.dvc`` or ``.git``."""
    here = Path(start).resolve()
    for folder in (here, *here.parents):
        if (folder / ".dvc").is_dir() or (folder / ".git").exists():
            return folder
    return here


def dvc_command() -> list[str]:
    exe = Path(sys.executable).with_name("dvc")
    if exe.exists():
        return [str(exe)]
    found = shutil.which("dvc")
    return [found] if found else [sys.executable, "-m", "dvc"]


def run_dvc(*args: str, cwd: str | Path, env: dict[str, str] | None = None, check: bool = True):
    """Run ``dvc ARGS`` in ``cwd``; raises RuntimeError with DVC's output on failure."""
    full_env = {**os.environ, "DVC_NO_ANALYTICS": "1", **(env or {})}
    proc = subprocess.run([*dvc_command(), *args], cwd=cwd, env=full_env, capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise RuntimeError(f"dvc {' '.join(args)} failed in {cwd}: {(proc.stderr or proc.stdout).strip()}")
    return proc


def ensure_dvc_repo(repo_root: str | Path) -> None:
    """``dvc init`` when the repository has no ``.dvc`` folder yet."""
    root = Path(repo_root)
    if not (root / ".dvc").is_dir():
        args = ["init", "-q"] + ([] if (root / ".git").exists() else ["--no-scm"])
        run_dvc(*args, cwd=root)


def track(repo_root: str | Path, data_dir: str = DATA_DIR) -> str:
    """``dvc add data`` (fills the cache; rewrites data.dvc only when data changed)."""
    root = Path(repo_root)
    ensure_dvc_repo(root)
    run_dvc("add", "-q", data_dir, cwd=root)
    version = data_version(root, f"{data_dir}.dvc")
    if version is None:
        raise RuntimeError(f"dvc add did not write {data_dir}.dvc in {root}")
    return version


# ---------------------------------------------------------------------------------------
# The demo hospital
# ---------------------------------------------------------------------------------------


@dataclass
class DemoData:
    path: Path
    version: str  # dir md5 of data/ (what data.dvc records)
    recorded: str | None  # md5 in data.dvc before this call
    tracked: bool  # whether dvc add ran

    @property
    def matches_record(self) -> bool:
        return self.recorded is not None and self.recorded == self.version


def write_demo_data(data_dir: str | Path, real_records_dir: str | Path | None = None) -> Path:
    """Generate the demo hospital (+ a few real records) into ``data_dir`` (replaced)."""
    from ml.data.parallel import default_workers
    from ml.data.synth import SynthConfig, generate

    data = Path(data_dir)
    tmp = data.with_name(f".{data.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    config = SynthConfig(records=DEMO_RECORDS, seed=DEMO_SEED, unlabelled_fraction=DEMO_UNLABELLED_FRACTION, prefix="H")
    generate(tmp / DEMO_HOSPITAL, config, faults=True, workers=default_workers(), progress=False)
    if real_records_dir is not None:
        src = Path(real_records_dir)
        dst = tmp / REAL_SAMPLE
        dst.mkdir(parents=True)
        for name in REAL_RECORDS:
            for suffix in (".hea", ".mat"):
                shutil.copyfile(src / f"{name}{suffix}", dst / f"{name}{suffix}")
    if data.exists():
        shutil.rmtree(data)
    os.replace(tmp, data)
    return data


def ensure_demo_data(repo_root: str | Path = ".", *, track_with_dvc: bool = True, force: bool = False) -> DemoData:
    """Make ``data/`` hold the dataset that ``data.dvc`` names, generating the demo hospital.

    - ``data/`` already matches data.dvc: only ``dvc add`` (fills the DVC cache, so
      ``dvc status`` is clean); data.dvc is not changed.
    - ``data/`` is missing (fresh clone): the demo hospital is generated (deterministic,
      byte-identical files) and tracked; if data.dvc names another version (hospitals
      were added since), that version is checked out from the DVC cache/remote instead
      (``dvc pull``) and data.dvc is never overwritten.
    - ``data/`` differs from data.dvc: left alone (pending changes), with a warning.
    - ``force``: regenerate the demo hospital and record it as the new version.
    """
    root = Path(repo_root).resolve()
    data = root / DATA_DIR
    recorded = data_version(root)
    real = root / REAL_RECORDS_DIR
    current = dir_md5(data) if data.is_dir() else None
    if current is not None and current == recorded and not force:
        if track_with_dvc:
            track(root)
        return DemoData(data, current, recorded, track_with_dvc)
    if current is not None and recorded is not None and not force:
        log.warning("data/ (%s) differs from data.dvc (%s): left as is; `dvc checkout` restores it", current, recorded)
        return DemoData(data, current, recorded, False)
    if not real.is_dir():
        raise FileNotFoundError(f"real sample records not found at {real}")
    log.info("generating the demo hospital in %s", data)
    write_demo_data(data, real)
    current = dir_md5(data)
    if recorded is not None and current != recorded and not force:
        log.info("data.dvc names %s, not the demo hospital alone: pulling it with DVC", recorded)
        shutil.rmtree(data)
        proc = run_dvc("pull", "-q", DVC_FILE, cwd=root, check=False)
        if proc.returncode != 0:
            raise RuntimeError(
                f"data.dvc names data version {recorded} but the demo generator gives {current} (hospitals "
                f"were added since, or the generator changed); `dvc pull` could not fetch {recorded}: "
                f"{(proc.stderr or proc.stdout).strip()}. `cessl data demo-data --force` records the demo "
                "hospital as the new version"
            )
        return DemoData(data, dir_md5(data), recorded, True)
    if track_with_dvc:
        version = track(root)
        if version != current:
            raise RuntimeError(f"data.dvc says {version}, data/ hashes to {current}")
    return DemoData(data, current, recorded, track_with_dvc)


# ---------------------------------------------------------------------------------------
# Adding a hospital
# ---------------------------------------------------------------------------------------


@dataclass
class AddResult:
    destination: Path
    copied: int = 0  # records copied
    unchanged: int = 0  # already present with identical bytes
    conflicts: list[str] = field(default_factory=list)  # present with other bytes: kept, not overwritten
    unsafe: list[str] = field(default_factory=list)  # keys refused (path traversal...)
    version_before: str | None = None
    version_after: str | None = None


def add_records(
    source: str | Path,
    repo_root: str | Path = ".",
    *,
    name: str | None = None,
    track_with_dvc: bool = True,
    push: bool = False,
) -> AddResult:
    """Copy every record of ``source`` into ``data/<name>/`` and record a new DVC version.

    Records already there with identical bytes are skipped; a record whose files differ
    from what is already there is reported as a conflict and left untouched (a hospital
    does not silently rewrite history). Keys that could escape the folder are refused.
    """
    from ml.data.sources import open_source

    root = Path(repo_root).resolve()
    src = open_source(source)
    dest_name = name or re.sub(r"[^A-Za-z0-9_.-]+", "_", src.uri.rstrip("/").rsplit("/", 1)[-1]) or "hospital"
    dest = root / DATA_DIR / dest_name
    result = AddResult(dest, version_before=data_version(root))
    for ref in src.list_records():
        if ref.problem:
            result.unsafe.append(f"{ref.key}: {ref.problem}")
            continue
        files = {key: src.read(key) for key in src.record_files(ref)}
        targets = {dest / key: data for key, data in files.items()}
        existing = {p: p.read_bytes() for p in targets if p.exists()}
        if existing and all(existing.get(p) == d for p, d in targets.items()):
            result.unchanged += 1
            continue
        if any(existing.get(p, d) != d for p, d in targets.items()):
            result.conflicts.append(ref.key)
            continue
        for path, data in targets.items():
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.part")
            tmp.write_bytes(data)
            os.replace(tmp, path)
        result.copied += 1
    if track_with_dvc:
        result.version_after = track(root)
        if push:
            run_dvc("push", "-q", cwd=root)
    else:
        result.version_after = dir_md5(root / DATA_DIR)
    return result
