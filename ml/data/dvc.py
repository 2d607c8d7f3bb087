"""Data versions with DVC: the demo hospital in ``data/``, adding hospitals, reading versions.

``data/`` (git-ignored) is tracked by ``data.dvc`` at the repository root; the md5 of
``data/`` written there is the data version that runs log for lineage
(:func:`data_version`). The demo hospital is generated bit-identically by
:func:`ensure_demo_data`, so a fresh clone rebuilds exactly the data its ``data.dvc``
names (``dvc status`` clean) without pulling anything. :func:`add_records` copies a new
hospital's records from a folder or ``s3://`` prefix into ``data/<name>/`` and records a
new DVC version; ``dvc push`` / ``dvc pull`` move it through any DVC remote (S3 included).

A hospital network's site is versioned on its own: its folder ``<parent>/<site>`` has its
own ``<parent>/<site>.dvc`` (:class:`Versioned`); ``add_records(..., folder=...)`` adds to
it and records the site's new version alone. Adding never replaces a committed version
whose data is not here (:func:`committed_version_problem`: ``dvc pull`` it first, or
``replace``).

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
    return track_folders(repo_root, [data_dir])[data_dir]


def track_folders(repo_root: str | Path, folders: Iterable[str]) -> dict[str, str]:
    """``dvc add`` of each folder (paths relative to the repository), each versioned on its
    own by ``<folder>.dvc``, in one DVC call; folder -> its version."""
    root = Path(repo_root)
    folders = list(folders)
    ensure_dvc_repo(root)
    run_dvc("add", "-q", *folders, cwd=root)
    versions = {}
    for folder in folders:
        version = data_version(root, f"{folder}.dvc")
        if version is None:
            raise RuntimeError(f"dvc add did not write {folder}.dvc in {root}")
        versions[folder] = version
    return versions


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


def git_ignored(repo_root: str | Path, path: str) -> bool:
    """Whether git ignores ``path`` (relative to the work tree); False outside one."""
    return git(repo_root, "check-ignore", "-q", "--", path, check=False).returncode == 0


def git_changes(repo_root: str | Path) -> list[str] | None:
    """Paths of tracked files with staged or unstaged changes; None outside a git work tree."""
    proc = git(repo_root, "status", "--porcelain", "--untracked-files=no", check=False)
    if proc.returncode != 0:
        return None
    return [line[3:].split(" -> ")[-1].strip('"') for line in proc.stdout.splitlines() if line.strip()]


class DirtyTreeError(CesslError):
    """The git tree has other changes: data.dvc was not committed (the message says how)."""


def commit_version(
    repo_root: str | Path, version: str, message: str, other_changes: list[str], dvc_file: str = DVC_FILE
) -> str | None:
    """Commit ``dvc_file`` (``data.dvc``, or a site's ``<site>.dvc``; a path relative to the
    repository) and the ``.gitignore`` that ``dvc add`` writes with ``message``; the new
    commit, or None when there is nothing to commit. ``other_changes``: tracked paths that
    were changed before the data was added: then nothing is committed and
    :class:`DirtyTreeError` gives the exact command to run."""
    root = Path(repo_root)
    ignores = dict.fromkeys((".gitignore", (Path(dvc_file).parent / ".gitignore").as_posix(), f"{DATA_DIR}/.gitignore"))
    paths = [dvc_file] + [p for p in ignores if (root / p).is_file() and p not in other_changes]
    status = git(root, "status", "--porcelain", "--", *paths).stdout
    if not status.strip():
        return None
    command = f"git add {' '.join(paths)} && git commit -m {shlex.quote(message)} -- {' '.join(paths)}"
    if other_changes:
        shown = ", ".join(other_changes[:5]) + (" ..." if len(other_changes) > 5 else "")
        raise DirtyTreeError(
            f"data version {version} is recorded in {dvc_file} but not committed: the git tree has other "
            f"changes ({shown}); commit {dvc_file} alone with: {command}"
        )
    try:
        git(root, "add", "--", *paths)
        git(root, "commit", "-q", "-m", message, "--", *paths)
    except RuntimeError as err:  # no git identity, a hook refused...
        raise DirtyTreeError(
            f"data version {version} is recorded in {dvc_file} but not committed ({err}); run: {command}"
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


class VersionNotPresentError(CesslError):
    """A committed data version whose data is not here: adding to it would replace it."""


@dataclass(frozen=True)
class Versioned:
    """A folder DVC versions on its own and its ``.dvc`` file (``data`` / ``data.dvc``, or a
    site's ``network/hospital-a`` / ``network/hospital-a.dvc``), both inside ``root``."""

    root: Path
    folder: Path

    @classmethod
    def of(cls, folder: str | Path, repo_root: str | Path) -> Versioned:
        """``folder`` (inside ``repo_root``: DVC versions nothing outside its repository)."""
        from ml.errors import ParameterError

        root, path = Path(repo_root).resolve(), Path(folder).absolute().resolve()
        if not path.is_relative_to(root) or path == root:
            raise ParameterError(
                f"{path}: not a folder inside the repository {root} (--repo): DVC versions only folders inside it"
            )
        return cls(root, path)

    @property
    def relative(self) -> str:
        return self.folder.relative_to(self.root).as_posix()

    @property
    def dvc_file(self) -> str:
        """The ``.dvc`` file next to the folder, relative to the repository."""
        return f"{self.relative}.dvc"

    def recorded(self) -> str | None:
        """The version its ``.dvc`` file records (None: untracked)."""
        return dvc_md5(self.root / self.dvc_file, self.folder)


def cached_listing(repo_root: str | Path, version: str) -> list[tuple[str, str]] | None:
    """The files of directory version ``version`` (``<md5>.dir``) as the local DVC cache holds
    its listing ((relative path, md5) pairs); None when the cache does not have it."""
    if not version.endswith(".dir"):
        return None
    proc = run_dvc("cache", "dir", cwd=repo_root, check=False)
    cache = Path(proc.stdout.strip()) if proc.returncode == 0 and proc.stdout.strip() else None
    if cache is None:
        return None
    for candidate in (cache / "files" / "md5" / version[:2] / version[2:], cache / version[:2] / version[2:]):
        if candidate.is_file():
            entries = json.loads(candidate.read_text(encoding="utf-8"))
            return [(str(e["relpath"]), str(e["md5"])) for e in entries]
    return None


def committed_version_problem(target: Versioned) -> str | None:
    """Why adding records to ``target`` would replace a recorded version whose data is not
    here (None: it would not): the folder is missing or empty, or files of the recorded
    version are missing or differ (checked against the DVC cache's listing; a folder that
    differs from a version the cache does not know is refused too)."""
    recorded = target.recorded()
    if recorded is None:
        return None
    pull = f"`dvc pull {target.dvc_file}` first, or pass --replace to record a new version from what is here"
    head = f"{target.dvc_file} records data version {recorded}"
    if not target.folder.is_dir() or not any(target.folder.iterdir()):
        return f"{head} but {target.relative}/ is not here: adding to it would replace that version; {pull}"
    if dir_md5(target.folder) == recorded:
        return None
    listing = cached_listing(target.root, recorded)
    if listing is None:
        return (
            f"{head}, {target.relative}/ holds other data and the DVC cache does not have that version to "
            f"compare: adding to it could replace it; {pull}"
        )
    missing = [
        rel for rel, md5 in listing if not (target.folder / rel).is_file() or file_md5(target.folder / rel) != md5
    ]
    if missing:
        return f"{head} but {len(missing)} of its files are not here ({', '.join(missing[:3])}...): {pull}"
    return None


@dataclass
class AddResult:
    destination: Path
    copied: int = 0  # records copied
    unchanged: int = 0  # already present with identical bytes
    conflicts: list[str] = field(default_factory=list)  # present with other bytes: kept, not overwritten
    unsafe: list[str] = field(default_factory=list)  # keys refused (path traversal...)
    version_before: str | None = None
    version_after: str | None = None
    committed: str | None = None  # the git commit recording the .dvc file
    not_committed: str = ""  # why the .dvc file was left uncommitted (with the git command to run)
    dvc_file: str = DVC_FILE  # the .dvc file of the version (relative to the repository)


def add_records(
    source: str | Path,
    repo_root: str | Path = ".",
    *,
    name: str | None = None,
    folder: str | Path | None = None,
    track_with_dvc: bool = True,
    push: bool = False,
    commit: bool = True,
    replace: bool = False,
) -> AddResult:
    """Copy every record of ``source`` into ``data/<name>/`` (or into ``folder``, a network
    site's own source, versioned on its own by ``<folder>.dvc``) and record a new DVC version.

    Never replaces a recorded version whose data is not here (:class:`VersionNotPresentError`
    saying to ``dvc pull`` it first) unless ``replace``.

    ``commit`` (in a git work tree): the ``.dvc`` file is committed with a message naming the
    version, unless tracked files had other changes before: then it is left staged for
    nobody and :attr:`AddResult.not_committed` gives the exact git command.

    Records already there with identical bytes are skipped; a record whose files differ
    from what is already there is reported as a conflict and left untouched (a hospital
    does not silently rewrite history). Keys that could escape the folder are refused.
    """
    from ml.data.sources import open_source

    root = Path(repo_root).resolve()
    src = open_source(source)
    if folder is None:
        dest_name = name or re.sub(r"[^A-Za-z0-9_.-]+", "_", src.uri.rstrip("/").rsplit("/", 1)[-1]) or "hospital"
        target, dest = Versioned(root, root / DATA_DIR), root / DATA_DIR / dest_name
    else:
        target = Versioned.of(folder, root)
        dest = target.folder
    problem = committed_version_problem(target) if track_with_dvc and not replace else None
    if problem:
        raise VersionNotPresentError(problem)
    result = AddResult(dest, version_before=target.recorded(), dvc_file=target.dvc_file)
    changes = git_changes(root) if commit and track_with_dvc else None
    other = [c for c in changes or [] if c != target.dvc_file]
    _copy_records(src, dest, result)
    if not track_with_dvc:
        result.version_after = dir_md5(target.folder)
        return result
    result.version_after = track(root, target.relative)
    if push:
        run_dvc("push", "-q", target.dvc_file, cwd=root)
    if changes is not None and git_ignored(root, target.dvc_file):
        log.info("%s records version %s (git ignores it: not committed)", target.dvc_file, result.version_after)
    elif changes is not None:
        message = (
            f"data: version {result.version_after} ({result.copied} records added from {src.uri} "
            f"into {dest.relative_to(root).as_posix()})"
        )
        try:
            result.committed = commit_version(root, result.version_after, message, other, target.dvc_file)
        except DirtyTreeError as err:
            result.not_committed = str(err)
    return result


def _copy_records(src, dest: Path, result: AddResult) -> None:
    """Copy every record of ``src`` into ``dest`` (counts, conflicts and refusals into ``result``)."""
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
