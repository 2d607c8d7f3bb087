"""Helpers of the pipeline / component / registry tests (imported by them; no tests here).

- :func:`make_hospital`: a small synthetic hospital of WFDB records (``ml.data.synth``).
- :func:`make_backbone`: a seeded, randomly initialised tinylight backbone folder (seconds,
  where the embedded default pre-trains for minutes); the steps treat both alike.
- :func:`make_repo`: a project folder with ``data/`` versioned by DVC (``data.dvc``).
- :func:`cessl`: the ``cessl`` command line in-process.
- :class:`RecordingClient` / :func:`record_kfp_calls`: a stand-in for ``kfp.Client`` that
  records the calls (no Kubeflow Pipelines API server runs on these machines).
- :func:`make_store`: a real dataset store (synth, ingest, preprocess through the CLI).
- :func:`git` / :func:`new_git_repo`: git with a test identity, a new repository.
- :func:`closed_port` / :func:`snapshot`: a port nothing listens on, the paths under a folder.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

from pipeline import cli

REPO = Path(__file__).resolve().parents[1]
SMALL_RUN = [
    "--backbone-config",
    "tinylight",
    "--labelled-ratio",
    "0.3",
    "--max-steps",
    "8",
    "--val-every",
    "4",
    "--batch-size",
    "8",
    "--min-class-count",
    "5",
    "--method",
    "cessl",
    "-r",
    "8",
]
# the fewest steps that still train, validate and register: the comparison's cells and network sites
TINY_TRAINING = [
    "--backbone-config",
    "tinylight",
    "--max-steps",
    "4",
    "--val-every",
    "2",
    "--batch-size",
    "8",
    "--min-class-count",
    "5",
    "-r",
    "8",
]


def make_hospital(folder: Path, records: int, seed: int, start: int = 0, faults: bool = False) -> Path:
    from ml.data.synth import SynthConfig, generate

    generate(
        folder,
        SynthConfig(records=records, seed=seed, start=start, unlabelled_fraction=0.1),
        faults=faults,
        workers=1,
        progress=False,
    )
    return folder


def make_backbone(folder: Path, name: str = "tinylight", seed: int = 7) -> Path:
    from ml.model.backbone import BACKBONE_CONFIGS, ECGTransformer
    from ml.model.pretrained import CODE15_CLASSES, save_backbone

    config = BACKBONE_CONFIGS[name]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        state = ECGTransformer(config).state_dict()
    return save_backbone(
        state, config, list(CODE15_CLASSES), folder, source="pretrain", note="random initialisation for tests"
    )


def make_repo(root: Path, records: int = 120, seed: int = 11) -> Path:
    """``root/data`` holding one synthetic hospital, tracked by DVC (``root/data.dvc``)."""
    from ml.data.dvc import track

    root.mkdir(parents=True, exist_ok=True)
    make_hospital(root / "data" / "hospital_a", records, seed, faults=True)
    track(root)
    return root


def add_records(root: Path, records: int, seed: int, start: int) -> str:
    """A second data version: more records for the hospital, ``dvc add`` again; returns its md5."""
    from ml.data.dvc import track

    make_hospital(root / "data" / "hospital_a", records, seed, start=start)
    return track(root)


def cessl(*argv: str) -> int:
    """``cessl ARGV`` in this process."""
    return cli.main([str(a) for a in argv])


def cessl_process(argv: list[str], cwd: Path, env: dict[str, str], log_path: Path) -> subprocess.Popen:
    """``cessl ARGV`` as a child process in its own process group (so a test can kill it)."""
    code = "import sys; from pipeline import cli; sys.exit(cli.main(sys.argv[1:]))"
    handle = log_path.open("w")
    return subprocess.Popen(
        [sys.executable, "-c", code, *map(str, argv)],
        cwd=cwd,
        env={**os.environ, **env, "PYTHONPATH": str(REPO)},
        stdout=handle,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


@dataclass
class RecordingClient:
    """Records what the commands ask of ``kfp.Client``, answers with fixed ids."""

    calls: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    hosts: list[str] = field(default_factory=list)

    def create_run_from_pipeline_package(self, pipeline_file: str, **kwargs: Any):
        self.calls.append(("run", {"pipeline_file": pipeline_file, **kwargs}))
        return SimpleNamespace(run_id="run-1")

    def create_experiment(self, name: str, **kwargs: Any):
        self.calls.append(("experiment", {"name": name, **kwargs}))
        return SimpleNamespace(experiment_id="exp-1")

    def create_recurring_run(self, **kwargs: Any):
        self.calls.append(("recurring", kwargs))
        return SimpleNamespace(recurring_run_id="job-1")


def record_kfp_calls(monkeypatch, repo: Path) -> RecordingClient:
    """The commands' KFP client (and the host check) replaced by a recorder, in ``repo``."""
    from pipeline.cli import preflight
    from pipeline.cli import run as run_command

    client = RecordingClient()

    def connect(args) -> RecordingClient:
        client.hosts.append(args.host)
        return client

    monkeypatch.setattr(run_command, "kfp_client", connect)
    monkeypatch.setattr(preflight, "check_kfp_host", lambda host, timeout=5.0: host)  # no KFP server here
    monkeypatch.chdir(repo)
    return client


def make_store(root: Path, records: int = 40, seed: int = 3) -> Path:
    """A real dataset store in ``root/store``: a synthetic source (cessl data synth), ingested and
    preprocessed."""
    assert cli.main(["data", "synth", str(root / "src"), "--records", str(records), "--seed", str(seed)]) == 0
    assert cli.main(["data", "ingest", str(root / "src"), str(root / "ingest")]) == 0
    assert cli.main(["data", "preprocess", str(root / "ingest"), str(root / "store"), "--min-count", "2"]) == 0
    return root / "store"


def git(cwd: Path, *args: str) -> str:
    """``git ARGS`` in ``cwd`` with a test identity and ``main`` as the first branch; its stdout."""
    identity = ["-c", "user.name=cessl-test", "-c", "user.email=test@cessl.invalid", "-c", "init.defaultBranch=main"]
    return subprocess.run(["git", *identity, *args], cwd=cwd, capture_output=True, text=True, check=True).stdout


def new_git_repo(path: Path) -> Path:
    """A new git repository at ``path`` that ignores ``/data/``."""
    path.mkdir(parents=True)
    git(path, "init", "-q")
    (path / ".gitignore").write_text("/data/\n")
    return path


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def snapshot(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}
