"""The test tiers (folders under tests/) and the rules of what each may use.

- ``unit``: no server, no subprocess pipeline, no git/DVC repository work, no Docker; fast
  (``make test-fast``, under 2 minutes);
- ``integration``: real MLflow / S3 / auth servers, kfp.local runs, real processes (git, DVC,
  torchrun), registry decisions on real models;
- ``e2e``: Docker images, TrainJobs, the full demo.

:func:`tier_problem` is what the collection hook in ``conftest.py`` applies to every test.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

TESTS = Path(__file__).resolve().parent
TIERS = ("unit", "integration", "e2e")

# Fixtures that start a real server (S3, MLflow, a Docker engine) -> the marker they imply.
SERVER_FIXTURES = {
    "s3_server": "integration",
    "mlflow_server": "integration",
    "mlflow_auth_server": "integration",
    "docker_engine": "docker",
}


def tier_of(path: Path, tests: Path = TESTS) -> str | None:
    """The tier folder a test file lives in (``None``: outside every tier folder)."""
    try:
        parts = path.resolve().relative_to(tests).parts
    except ValueError:
        return None
    return parts[0] if len(parts) > 1 and parts[0] in TIERS else None


def tier_problem(path: Path, test: str, fixtures: Iterable[str], tests: Path = TESTS) -> str | None:
    """Why ``test`` (in ``path``, using ``fixtures``) is in the wrong place, or ``None``."""
    tier = tier_of(path, tests)
    if tier is None:
        where = path.relative_to(tests) if path.is_relative_to(tests) else path
        return f"{where}: a test file outside the tier folders; move it to tests/{{{','.join(TIERS)}}}/"
    servers = sorted(set(fixtures) & SERVER_FIXTURES.keys())
    if tier == "unit" and servers:
        return f"{test}: a unit test may start no server but uses {', '.join(servers)}; move it to tests/integration/"
    return None


def files_under(tests: Path = TESTS) -> list[Path]:
    """Every test file under ``tests`` (whatever its folder)."""
    return sorted(p for p in tests.rglob("test_*.py") if "fixtures" not in p.relative_to(tests).parts)
