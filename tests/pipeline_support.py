"""Helpers of the pipeline / component / registry tests (imported by them; no tests here).

- :func:`make_hospital`: a small synthetic hospital of WFDB records (``ml.data.synth``).
- :func:`make_backbone`: a seeded, randomly initialised tinylight backbone folder (seconds,
  where the embedded default pre-trains for minutes); the steps treat both alike.
- :func:`make_repo`: a project folder with ``data/`` versioned by DVC (``data.dvc``).
- :func:`cessl`: the ``cessl`` command line in-process.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

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
