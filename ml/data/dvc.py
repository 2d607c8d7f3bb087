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
import shlex
import shutil
import subprocess
import sys
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from ml.errors import CesslError
from ml.io import atomic_write_bytes

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


def listing_md5(files: Iterable[tuple[str, str]]) -> str:
    """The md5 DVC gives a directory holding ``files`` ((relative POSIX path, content md5)
    pairs): ``<md5>.dir``, the md5 of their JSON list sorted by path."""
    entries = sorted(({"md5": md5, "relpath": rel} for rel, md5 in files), key=lambda e: e["relpath"])
    return hashlib.md5(json.dumps(entries, sort_keys=True).encode()).hexdigest() + ".dir"


def dir_md5(path: str | Path) -> str:
    """The md5 DVC gives a directory (``<md5>.dir``): md5 of its sorted JSON file list."""
    root = Path(path)
    files = []
    for folder, dirs, names in os.walk(root):
        dirs[:] = [d for d in dirs if d not in (".dvc", ".git")]
        for name in names:
            full = Path(folder) / name
            files.append((full.relative_to(root).as_posix(), file_md5(full)))
    return listing_md5(files)


ETAG_VERSION_PREFIX = "etags:"
_MD5 = re.compile(r"[0-9a-f]{32}")


def objects_version(objects: Iterable[tuple[str, int, str]]) -> str:
    """The data version of a set of stored objects ((relative key, size, ETag) triples).

    When every ETag is a plain md5 (single-part uploads) it is DVC's directory md5 of those
    files, ``<md5>.dir``: the same version a local copy of the files gets (:func:`dir_md5`).
    Otherwise (multipart ETags ``<md5>-<parts>``, another server's scheme) it is a content
    digest of the listing, named as such: ``etags:<30 hex of sha256 over keys, sizes, ETags>``.
    Either changes when any object is added, removed or rewritten with other bytes.
    """
    items = sorted((str(key), int(size), str(etag).strip('"').lower()) for key, size, etag in objects)
    if not items:
        raise FileNotFoundError("no objects: an empty source has no data version")
    if all(_MD5.fullmatch(etag) for _, _, etag in items):
        return listing_md5((key, etag) for key, _, etag in items)
    digest = hashlib.sha256(json.dumps(items).encode()).hexdigest()
    return ETAG_VERSION_PREFIX + digest[:30]


def source_version(source: str | Path) -> str:
    """The data version of a source computed from the source itself: a folder's DVC md5
    (:func:`dir_md5`), an ``s3://`` prefix's :func:`objects_version` (one listing, no reads)."""
    text = str(source)
    if text.startswith("s3://"):
        from ml.data.sources import S3Source

        src = S3Source(text)
        try:
            return objects_version(src.objects())
        except FileNotFoundError:
            raise FileNotFoundError(f"{src.uri}: no objects under this prefix") from None
    if not Path(text).is_dir():
        raise FileNotFoundError(f"{text}: data folder not found")
    return dir_md5(text)


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
# Remotes and git
# ---------------------------------------------------------------------------------------


def add_remote(
    repo_root: str | Path, name: str, url: str, *, default: bool = False, endpoint_url: str = "", force: bool = False
) -> None:
    """``dvc remote add [-d] [-f] NAME URL`` (+ ``dvc remote modify NAME endpointurl URL`` for an
    S3-compatible server). Credentials are never written: DVC reads the AWS_* variables."""
    root = Path(repo_root)
    ensure_dvc_repo(root)
    run_dvc("remote", "add", *(["-d"] if default else []), *(["-f"] if force else []), name, url, cwd=root)
    if endpoint_url:
        run_dvc("remote", "modify", name, "endpointurl", endpoint_url, cwd=root)


def default_remote(repo_root: str | Path) -> str | None:
    """The DVC default remote's name (``core.remote``), None when none is set."""
    root = Path(repo_root)
    if not (root / ".dvc").is_dir():
        return None
    proc = run_dvc("config", "core.remote", cwd=root, check=False)
    return proc.stdout.strip() or None if proc.returncode == 0 else None


def push(repo_root: str | Path, dvc_file: str | Path = DVC_FILE, remote: str | None = None) -> None:
    """``dvc push [-r REMOTE] DVC_FILE``: the data version ``dvc_file`` names, to the remote."""
    run_dvc("push", "-q", *(["-r", remote] if remote else []), str(dvc_file), cwd=Path(repo_root))


def git(repo_root: str | Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(["git", *args], cwd=repo_root, capture_output=True, text=True, timeout=60)
    if check and proc.returncode != 0:
        raise RuntimeError(f"git {' '.join(args)} failed in {repo_root}: {(proc.stderr or proc.stdout).strip()}")
    return proc


def git_changes(repo_root: str | Path) -> list[str] | None:
    """Paths of tracked files with staged or unstaged changes; None outside a git work tree."""
    proc = git(repo_root, "status", "--porcelain", "--untracked-files=no", check=False)
    if proc.returncode != 0:
        return None
    return [line[3:].split(" -> ")[-1].strip('"') for line in proc.stdout.splitlines() if line.strip()]


class DirtyTreeError(CesslError):
    """The git tree has other changes: data.dvc was not committed (the message says how)."""


def commit_version(repo_root: str | Path, version: str, message: str, other_changes: list[str]) -> str | None:
    """Commit ``data.dvc`` (and the ``.gitignore`` that ``dvc add`` writes) with ``message``;
    the new commit, or None when there is nothing to commit. ``other_changes``: tracked paths
    that were changed before the data was added: then nothing is committed and
    :class:`DirtyTreeError` gives the exact command to run."""
    root = Path(repo_root)
    paths = [DVC_FILE] + [
        p for p in (".gitignore", f"{DATA_DIR}/.gitignore") if (root / p).is_file() and p not in other_changes
    ]
    status = git(root, "status", "--porcelain", "--", *paths).stdout
    if not status.strip():
        return None
    command = f"git add {' '.join(paths)} && git commit -m {shlex.quote(message)} -- {' '.join(paths)}"
    if other_changes:
        shown = ", ".join(other_changes[:5]) + (" ..." if len(other_changes) > 5 else "")
        raise DirtyTreeError(
            f"data version {version} is recorded in {DVC_FILE} but not committed: the git tree has other "
            f"changes ({shown}); commit {DVC_FILE} alone with: {command}"
        )
    try:
        git(root, "add", "--", *paths)
        git(root, "commit", "-q", "-m", message, "--", *paths)
    except RuntimeError as err:  # no git identity, a hook refused...
        raise DirtyTreeError(
            f"data version {version} is recorded in {DVC_FILE} but not committed ({err}); run: {command}"
        ) from None
    return git(root, "rev-parse", "HEAD").stdout.strip()


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
    committed: str | None = None  # the git commit recording data.dvc
    not_committed: str = ""  # why data.dvc was left uncommitted (with the git command to run)


def add_records(
    source: str | Path,
    repo_root: str | Path = ".",
    *,
    name: str | None = None,
    track_with_dvc: bool = True,
    push: bool = False,
    commit: bool = True,
) -> AddResult:
    """Copy every record of ``source`` into ``data/<name>/`` and record a new DVC version.

    ``commit`` (in a git work tree): ``data.dvc`` is committed with a message naming the
    version, unless tracked files had other changes before: then it is left staged for
    nobody and :attr:`AddResult.not_committed` gives the exact git command.

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
    changes = git_changes(root) if commit and track_with_dvc else None
    other = [c for c in changes or [] if c != DVC_FILE]
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
            atomic_write_bytes(path, data)
        result.copied += 1
    if track_with_dvc:
        result.version_after = track(root)
        if push:
            run_dvc("push", "-q", cwd=root)
        if changes is not None:
            message = (
                f"data: version {result.version_after} ({result.copied} records added from {src.uri} "
                f"into {DATA_DIR}/{dest_name})"
            )
            try:
                result.committed = commit_version(root, result.version_after, message, other)
            except DirtyTreeError as err:
                result.not_committed = str(err)
    else:
        result.version_after = dir_md5(root / DATA_DIR)
    return result
