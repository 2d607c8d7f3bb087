"""Real disk faults: a read-only and a full file system (tmpfs mounts; needs root, else skipped).

Each command answers with one line and its documented exit code, and leaves nothing behind:
no output folder it was asked to create, no partial file.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import ECG_RECORDS

from ml.errors import EXIT_DISK, EXIT_USAGE

pytestmark = pytest.mark.slow  # real mounts and real commands: ~30 s


def _mount(path: Path, options: str) -> None:
    path.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({proc.stderr.strip() or 'not root'})")


@pytest.fixture
def mounted(tmp_path: Path) -> Iterator[dict[str, Path]]:
    mounts = {"read_only": tmp_path / "ro", "full": tmp_path / "full"}
    _mount(mounts["read_only"], "size=64k,ro")
    try:
        _mount(mounts["full"], "size=200k")
        yield mounts
    finally:
        for path in mounts.values():
            subprocess.run(["umount", str(path)], capture_output=True)


def cessl(*argv: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipeline.cli", *argv], cwd=cwd, capture_output=True, text=True)


def error_lines(proc: subprocess.CompletedProcess) -> list[str]:
    return [line for line in proc.stderr.splitlines() if "error" in line]


def test_output_on_a_read_only_file_system_is_refused_up_front(mounted, tmp_path):
    out = mounted["read_only"] / "ingested"
    proc = cessl("data", "ingest", str(ECG_RECORDS), str(out), cwd=tmp_path)
    assert proc.returncode == EXIT_USAGE, proc.stderr
    assert "Traceback" not in proc.stderr
    [line] = error_lines(proc)
    assert str(mounted["read_only"]) in line and "not writable" in line
    assert not out.exists()


def test_a_full_disk_is_one_line_and_leaves_no_partial_folder(mounted, tmp_path):
    out = mounted["full"] / "synthetic"
    proc = cessl("data", "synth", str(out), "--records", "40", cwd=tmp_path)
    assert proc.returncode == EXIT_DISK, proc.stderr
    assert "Traceback" not in proc.stderr
    [line] = error_lines(proc)
    assert "no space left" in line and str(out) in line
    assert list(mounted["full"].iterdir()) == []  # neither the folder nor its staging copy


def test_after_a_full_disk_the_same_command_succeeds_where_there_is_room(mounted, tmp_path):
    cessl("data", "synth", str(mounted["full"] / "synthetic"), "--records", "40", cwd=tmp_path)
    out = tmp_path / "synthetic"
    proc = cessl("data", "synth", str(out), "--records", "4", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert len(list(out.glob("*.hea"))) >= 4
