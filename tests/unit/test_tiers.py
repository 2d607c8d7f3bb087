"""The test tiers: every test file lives in a tier folder, and a unit test that starts a
server (a fixture of tests/tiers.py's SERVER_FIXTURES) fails the collection with one clear line."""

from __future__ import annotations

from pathlib import Path

import pytest
from tiers import SERVER_FIXTURES, TESTS, TIERS, files_under, tier_of, tier_problem


def test_every_test_file_lives_in_a_tier_folder():
    outside = [str(p.relative_to(TESTS)) for p in files_under() if tier_of(p) is None]
    assert not outside, f"move these into tests/{{{','.join(TIERS)}}}/: {outside}"
    assert {tier_of(p) for p in files_under()} == set(TIERS)


def test_a_test_file_outside_the_tiers_is_named(tmp_path: Path):
    for path in (tmp_path / "test_x.py", tmp_path / "other" / "test_x.py"):
        problem = tier_problem(path, "test_x.py::test_a", (), tests=tmp_path)
        assert problem and str(path.relative_to(tmp_path)) in problem and "tests/{unit,integration,e2e}/" in problem


@pytest.mark.parametrize("fixture", sorted(SERVER_FIXTURES))
def test_a_server_in_a_unit_test_is_refused_and_elsewhere_allowed(fixture: str, tmp_path: Path):
    problem = tier_problem(tmp_path / "unit" / "test_x.py", "unit/test_x.py::test_a", ["tmp_path", fixture], tmp_path)
    assert problem == (
        f"unit/test_x.py::test_a: a unit test may start no server but uses {fixture}; move it to tests/integration/"
    )
    for tier in ("integration", "e2e"):
        assert tier_problem(tmp_path / tier / "test_x.py", "t", [fixture], tmp_path) is None
    assert tier_problem(tmp_path / "unit" / "test_x.py", "t", ["tmp_path"], tmp_path) is None


def test_the_collection_of_a_unit_test_with_a_server_fails(pytester: pytest.Pytester):
    """The real conftest.py, on a tree with a unit test that asks for ``s3_server`` (through
    another fixture): the collection stops with the test's name and the fixture."""
    tests = pytester.path / "tests"
    (tests / "unit").mkdir(parents=True)
    (tests / "integration").mkdir()
    (tests / "conftest.py").write_text((TESTS / "conftest.py").read_text())
    body = "import pytest\n\n@pytest.fixture\ndef s3_server():\n    return 1\n\n@pytest.fixture\ndef bucket(s3_server):\n    return s3_server\n\n"
    (tests / "unit" / "test_uses_s3.py").write_text(body + "def test_a(bucket):\n    assert bucket\n")
    (tests / "integration" / "test_uses_s3_too.py").write_text(body + "def test_b(bucket):\n    assert bucket\n")
    result = pytester.runpytest_inprocess("--collect-only", "-q", "-p", "no:cacheprovider", str(tests))
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(
        ["*tests/unit/test_uses_s3.py::test_a: a unit test may start no server but uses s3_server*"]
    )
    assert "test_b" not in result.stderr.str()
    (tests / "unit" / "test_uses_s3.py").unlink()
    assert pytester.runpytest_inprocess("--collect-only", "-q", "-p", "no:cacheprovider", str(tests)).ret == 0
