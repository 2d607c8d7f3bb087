"""Data versions per site: each network site's folder is versioned on its own (its own
``<folder>.dvc``); ``cessl data add --site`` adds to that site alone and git-commits its
``.dvc`` file; a recorded version whose data is not here is never replaced (``dvc pull`` it
first, or ``--replace``)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from ml.data.dvc import dir_md5, dvc_md5
from ml.data.synth import SynthConfig, generate
from pipeline import cli
from pipeline.cli.sites import track_sites
from pipeline.registry.lineage import source_data_version


def _git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=repo, check=True, capture_output=True, text=True).stdout.strip()


def _records(folder: Path, n: int, seed: int, prefix: str) -> Path:
    generate(folder, SynthConfig(records=n, seed=seed, prefix=prefix), workers=1, progress=False)
    return folder


@pytest.fixture
def network(tmp_path, monkeypatch) -> Path:
    """A git repository with two sites (network/a, network/b), each DVC-versioned and committed."""
    for who in ("AUTHOR", "COMMITTER"):
        monkeypatch.setenv(f"GIT_{who}_NAME", "cessl-test")
        monkeypatch.setenv(f"GIT_{who}_EMAIL", "test@cessl.invalid")
    monkeypatch.setenv("DVC_NO_ANALYTICS", "1")
    repo = tmp_path / "repo"
    repo.mkdir()
    _git(repo, "init", "-q")
    (repo / ".gitignore").write_text("/network/*\n!/network/*.dvc\n/sites.yaml\n")
    folders = [_records(repo / "network" / s, 3, seed, s.upper()) for s, seed in (("a", 1), ("b", 2))]
    (repo / "sites.yaml").write_text("version: 1\nsites:\n  a:\n    source: network/a\n  b:\n    source: network/b\n")
    versions = track_sites(folders, repo)
    assert set(versions) == {"network/a", "network/b"}
    _git(repo, "add", "-A")
    _git(repo, "commit", "-q", "-m", "two sites")
    monkeypatch.chdir(repo)
    return repo


def test_data_add_site_adds_to_that_site_alone_and_commits_its_version(network, tmp_path, capsys):
    before = {s: dvc_md5(network / f"network/{s}.dvc") for s in ("a", "b")}
    assert before["a"] == dir_md5(network / "network" / "a") != before["b"]
    incoming = _records(tmp_path / "incoming", 2, 7, "N")

    assert cli.main(["data", "add", str(incoming), "--site", "a"]) == 0
    out = capsys.readouterr().out
    assert "copied 2 records into" in out and "committed network/a.dvc" in out
    after = dvc_md5(network / "network/a.dvc")
    assert after != before["a"] and after == dir_md5(network / "network" / "a")
    assert source_data_version(str(network / "network" / "a"), network) == after  # what retrain compares
    assert dvc_md5(network / "network/b.dvc") == before["b"]  # the other site's version is untouched
    assert (network / "network" / "a" / "N00000.hea").is_file()
    assert after in _git(network, "log", "-1", "--format=%s")
    assert _git(network, "status", "--porcelain", "--untracked-files=no") == ""
    capsys.readouterr()
    assert cli.main(["data", "version", "--site", "a"]) == 0
    assert capsys.readouterr().out.strip() == after


def test_data_add_never_replaces_a_version_whose_data_is_not_here(network, tmp_path, capsys):
    incoming = _records(tmp_path / "incoming", 2, 7, "N")
    recorded = dvc_md5(network / "network/b.dvc")
    # a fresh clone: b's .dvc is committed, its data was never pulled
    subprocess.run(["rm", "-rf", str(network / "network" / "b")], check=True)
    assert cli.main(["data", "add", str(incoming), "--site", "b"]) == 2
    err = capsys.readouterr().err
    assert "`dvc pull network/b.dvc` first, or pass --replace" in err and recorded in err
    assert dvc_md5(network / "network/b.dvc") == recorded and not (network / "network" / "b").exists()

    # part of a's recorded version missing here: refused too, naming what is missing
    (network / "network" / "a" / "A00001.mat").unlink()
    assert cli.main(["data", "add", str(incoming), "--site", "a"]) == 2
    assert "1 of its files are not here (A00001.mat" in capsys.readouterr().err

    # an explicit --replace records what is here as the site's new version
    assert cli.main(["data", "add", str(incoming), "--site", "b", "--replace"]) == 0
    assert dvc_md5(network / "network/b.dvc") == dir_md5(network / "network" / "b") != recorded


def test_data_add_site_refuses_what_it_cannot_do_in_one_line(network, tmp_path, capsys):
    incoming = _records(tmp_path / "incoming", 1, 7, "N")
    (network / "s3.yaml").write_text("version: 1\nsites:\n  c:\n    source: s3://bucket/c\n")
    assert cli.main(["data", "add", str(incoming), "--site", "c", "--sites", "s3.yaml"]) == 2
    assert "the site's source is s3://bucket/c: put the records under that prefix" in capsys.readouterr().err
    (network / "out.yaml").write_text(f"version: 1\nsites:\n  d:\n    source: {tmp_path / 'elsewhere'}\n")
    assert cli.main(["data", "add", str(incoming), "--site", "d", "--sites", "out.yaml"]) == 2
    assert "not a folder inside the repository" in capsys.readouterr().err
    assert cli.main(["data", "add", str(incoming), "--site", "nope"]) == 2
    assert "no site named 'nope'" in capsys.readouterr().err
    assert cli.main(["data", "add", str(incoming), "--site", "a", "--name", "x"]) == 2
    assert "--name and --site cannot be combined" in capsys.readouterr().err


def test_the_demo_network_versions_each_hospital_on_its_own(tmp_path, monkeypatch):
    from pipeline.cli.sites import ensure_demo_network
    from pipeline.core.sites import load_sites

    monkeypatch.setenv("DVC_NO_ANALYTICS", "1")
    sites_file = ensure_demo_network(tmp_path / "sites.yaml", n_sites=2, records=3)
    for site in load_sites(sites_file):
        folder = Path(site.source)
        assert dvc_md5(folder.parent / f"{folder.name}.dvc") == dir_md5(folder)


def test_a_network_run_pushes_each_registered_sites_version(network, tmp_path):
    from pipeline.cli.sites import FAILED, REGISTERED, SiteOutcome, push_site_versions

    remote = tmp_path / "remote"
    assert cli.main(["data", "remote", "add", "backup", str(remote), "--default"]) == 0
    versions = {s: dvc_md5(network / f"network/{s}.dvc") for s in ("a", "b")}
    outcomes = [
        SiteOutcome("a", str(network / "network" / "a"), REGISTERED, data_version=versions["a"]),
        SiteOutcome("b", str(network / "network" / "b"), FAILED, data_version=versions["b"]),
        SiteOutcome("c", "s3://bucket/c", REGISTERED, data_version="etags:x"),
    ]
    assert push_site_versions(outcomes, network) == ["a"]  # b failed, c's objects are their own version
    pushed = {p.name for p in (remote / "files" / "md5").rglob("*.dir")}
    assert pushed == {versions["a"].removesuffix(".dir")[2:] + ".dir"}
