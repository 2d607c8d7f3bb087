"""DVC: the directory md5 DVC records, `cessl data add` in a git repository, the demo dataset
regenerated bit-identically (the committed version), and an S3 remote round trip on a real S3
server. The parsers: tests/unit/test_data_dvc.py."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from pipeline_support import git, new_git_repo

from ml.data.dvc import (
    DVC_FILE,
    REAL_RECORDS_DIR,
    add_records,
    data_version,
    dir_md5,
    ensure_demo_data,
    run_dvc,
    track,
    write_demo_data,
)
from ml.data.synth import SynthConfig, generate
from pipeline.cli import main

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow  # ~10 s: regenerates the whole demo hospital (twice)
def test_demo_data_is_bit_identical_and_is_the_committed_version(tmp_path):
    """A fresh clone regenerates exactly the data that data.dvc names: dvc status clean."""
    committed = data_version(REPO)
    assert committed, "data.dvc is missing at the repository root"
    clone = new_git_repo(tmp_path / "clone")
    shutil.copytree(REPO / REAL_RECORDS_DIR, clone / REAL_RECORDS_DIR)
    shutil.copy(REPO / DVC_FILE, clone / DVC_FILE)
    run_dvc("init", "-q", cwd=clone)
    demo = ensure_demo_data(clone)
    assert demo.version == committed == data_version(clone)
    assert (clone / DVC_FILE).read_text() == (REPO / DVC_FILE).read_text()  # untouched
    assert "up to date" in run_dvc("status", cwd=clone).stdout
    # and once more, elsewhere: same bytes
    again = write_demo_data(tmp_path / "again", REPO / REAL_RECORDS_DIR)
    assert dir_md5(again) == committed
    # a second call with data in place only re-checks it
    assert ensure_demo_data(clone).recorded == committed


@pytest.mark.integration
def test_s3_remote_push_pull_and_new_versions(s3_server, s3_bucket, tmp_path, monkeypatch):
    for key, value in s3_server.env().items():
        monkeypatch.setenv(key, value)
    origin = new_git_repo(tmp_path / "origin")
    generate(origin / "data" / "site_a", SynthConfig(records=8, seed=3), workers=1, progress=False)
    run_dvc("init", "-q", cwd=origin)
    v1 = track(origin)
    run_dvc("remote", "add", "-d", "store", f"s3://{s3_bucket}/dvc", cwd=origin)
    run_dvc("remote", "modify", "store", "endpointurl", s3_server.endpoint_url, cwd=origin)
    git(origin, "add", ".")
    git(origin, "commit", "-q", "-m", "data v1")
    run_dvc("push", "-q", cwd=origin)

    clone = tmp_path / "clone"
    git(tmp_path, "clone", "-q", str(origin), str(clone))
    assert not (clone / "data").exists()
    run_dvc("pull", "-q", cwd=clone)
    assert dir_md5(clone / "data") == v1 == dir_md5(origin / "data")

    # a new hospital arrives in S3: `cessl data add` copies it in and records version 2
    upload = tmp_path / "upload"
    generate(upload, SynthConfig(records=5, seed=4, prefix="B"), workers=1, progress=False)
    client = s3_server.client()
    for path in sorted(upload.iterdir()):
        client.put_object(Bucket=s3_bucket, Key=f"incoming/site_b/{path.name}", Body=path.read_bytes())
    result = add_records(f"s3://{s3_bucket}/incoming/site_b", origin, push=True)
    assert (result.copied, result.unchanged, result.conflicts) == (5, 0, [])
    assert result.version_before == v1 and result.version_after == data_version(origin) != v1
    assert result.committed and not result.not_committed  # data.dvc committed, naming the version
    assert result.version_after in git(origin, "log", "-1", "--format=%s")
    again = add_records(f"s3://{s3_bucket}/incoming/site_b", origin)  # idempotent
    assert (again.copied, again.unchanged, again.version_after) == (0, 5, result.version_after)
    assert again.committed is None and not git(origin, "status", "--porcelain", "--untracked-files=no")

    git(clone, "pull", "-q")
    run_dvc("pull", "-q", cwd=clone)
    assert dir_md5(clone / "data") == result.version_after
    assert sorted(p.name for p in (clone / "data" / "site_b").iterdir()) == sorted(p.name for p in upload.iterdir())


def test_dir_md5_is_what_dvc_records(tmp_path):
    repo = new_git_repo(tmp_path / "repo")
    generate(repo / "data" / "h", SynthConfig(records=3, seed=1), workers=1, progress=False)
    (repo / "data" / "notes.txt").write_text("x\n")
    assert track(repo) == data_version(repo) == dir_md5(repo / "data")
    assert run_dvc("status", cwd=repo).stdout.strip().startswith("Data and pipelines are up to date")


def test_add_records_a_new_data_version(tmp_path, capsys, monkeypatch):
    import subprocess

    from ml.data.dvc import data_version, dir_md5
    from ml.data.synth import SynthConfig, generate

    monkeypatch.setenv("DVC_NO_ANALYTICS", "1")
    for who in ("AUTHOR", "COMMITTER"):  # data add commits data.dvc
        monkeypatch.setenv(f"GIT_{who}_NAME", "cessl-test")
        monkeypatch.setenv(f"GIT_{who}_EMAIL", "test@cessl.invalid")
    repo = tmp_path / "repo"
    repo.mkdir()
    subprocess.run(["git", "init", "-q"], cwd=repo, check=True)
    (repo / ".gitignore").write_text("/data/\n")
    incoming = tmp_path / "incoming"
    generate(incoming, SynthConfig(records=3, seed=5, prefix="X"), workers=1, progress=False)
    assert main(["data", "add", str(incoming), "--repo", str(repo), "--name", "site_x"]) == 0
    out = capsys.readouterr().out
    assert "copied 3 records" in out and "committed data.dvc" in out
    version = data_version(repo)
    assert version == dir_md5(repo / "data")
    assert main(["data", "version", "--repo", str(repo)]) == 0
    assert capsys.readouterr().out.strip() == version
    # a record that changed at the hospital is a conflict, not a silent overwrite
    (incoming / "X00000.hea").write_text((incoming / "X00000.hea").read_text().replace("Age:", "Age: 1"))
    assert main(["data", "add", str(incoming), "--repo", str(repo), "--name", "site_x"]) == 1
    assert data_version(repo) == version
