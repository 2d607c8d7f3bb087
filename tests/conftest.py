"""Shared pytest fixtures: fixture paths, and real servers (see tests/servers.py)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import settings
from tiers import SERVER_FIXTURES, tier_of, tier_problem

# Under pytest-xdist each worker (and every process it starts) computes on one core: two workers
# with two OpenMP threads each are several times slower than one thread each on a 2-core machine.
if os.environ.get("PYTEST_XDIST_WORKER"):
    for _key in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(_key, "1")
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

# cuBLAS is deterministic only with a fixed workspace, read when CUDA first starts: set it
# before any test touches the GPU (the trainer's deterministic mode relies on it).
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
# Every test and the processes it starts: no DVC analytics, and a git identity for the commits
# that `cessl data add` makes.
for _key, _value in {
    "DVC_NO_ANALYTICS": "1",
    "GIT_AUTHOR_NAME": "cessl-test",
    "GIT_AUTHOR_EMAIL": "test@cessl.invalid",
    "GIT_COMMITTER_NAME": "cessl-test",
    "GIT_COMMITTER_EMAIL": "test@cessl.invalid",
}.items():
    os.environ.setdefault(_key, _value)

FIXTURES = Path(__file__).parent / "fixtures"
REFERENCE = FIXTURES / "reference"
ECG_RECORDS = FIXTURES / "ecg" / "cinc2021"
LABEL_MAPPING = FIXTURES / "ecg" / "challenge2021_label_mapping.csv"

TESTS = Path(__file__).resolve().parent

# pytester: tests/unit/test_tiers.py runs a collection of its own to prove the guard below
pytest_plugins = ["servers", "mlflow_template", "pytester"]

# Hypothesis: the same examples on every run and no example database ("ci", the default: a
# failure reproduces, and a clean checkout runs what CI ran); HYPOTHESIS_PROFILE=thorough
# searches wider, with fresh random examples each time.
settings.register_profile("ci", derandomize=True, database=None, deadline=None, max_examples=30, print_blob=True)
settings.register_profile("thorough", deadline=None, max_examples=1000)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

# Fixtures that start a real server (S3, MLflow, a Docker engine): every test that uses
# one, directly or through another fixture, is marked ``integration`` (and ``docker`` for
# the engine), so the markers cannot drift from what a test really starts. Each test file
# lives in a tier folder (tests/unit, tests/integration, tests/e2e; see tests/tiers.py) and
# a unit test that uses a server fails the collection.


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    problems = []
    for item in items:
        used = set(getattr(item, "fixturenames", ()))
        for fixture, marker in SERVER_FIXTURES.items():
            if fixture in used:
                item.add_marker(pytest.mark.integration)
                item.add_marker(getattr(pytest.mark, marker))
        problem = tier_problem(item.path, item.nodeid, used, TESTS)
        if problem and problem not in problems:
            problems.append(problem)
    if problems:
        raise pytest.UsageError("tests in the wrong tier:\n  " + "\n  ".join(problems))
    items.sort(key=lambda item: WORK_ORDER.index(tier_of(item.path, TESTS) or "unit"))  # stable: files stay whole


# `make test` runs the tiers on two workers (pytest-xdist): a test file stays on one worker (its
# module and session fixtures start once there), the whole e2e tier shares one worker (one Docker
# engine, one image build), and the longest tier goes first so that the unit tier fills the gaps
# at the end instead of leaving one worker idle.
WORK_ORDER = ("e2e", "integration", "unit")


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config: pytest.Config, log: Any) -> Any:
    from xdist.scheduler import LoadScopeScheduling

    class TierScheduling(LoadScopeScheduling):
        """A file per unit of work, the e2e tier as one unit; units in collection order."""

        def _split_scope(self, nodeid: str) -> str:
            path = nodeid.split("::", 1)[0]
            return "tests/e2e" if path.startswith("tests/e2e/") else path

    config.option.loadscopereorder = False  # the order above, not "most tests first"
    return TierScheduling(config, log)


# The tests that take the ``device`` fixture run on the CPU and, where one is present, on a
# CUDA device too (``pytest -m cuda`` selects the GPU half; CI has no GPU and skips it).
DEVICES = (
    "cpu",
    pytest.param(
        "cuda", marks=[pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")]
    ),
)
# The tolerance for the reference goldens is 1e-4; the CPU reproduces them to 1e-5.
GOLDEN_ATOL = {"cpu": 1e-5, "cuda": 1e-4}


@pytest.fixture(params=DEVICES)
def device(request: pytest.FixtureRequest) -> Iterator[torch.device]:
    """The device a test runs on. CUDA in full float32 (no TF32 in matmuls or cuDNN
    convolutions), so that the CPU's tolerances hold there as well."""
    if request.param == "cpu":
        yield torch.device("cpu")
        return
    flags = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield torch.device("cuda")
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = flags


@pytest.fixture
def golden_atol(device: torch.device) -> float:
    return GOLDEN_ATOL[device.type]


@pytest.fixture(scope="session")
def reference_dir() -> Path:
    return REFERENCE


@pytest.fixture(scope="session")
def ecg_records_dir() -> Path:
    return ECG_RECORDS


@pytest.fixture(scope="session")
def label_mapping_csv() -> Path:
    return LABEL_MAPPING


@pytest.fixture(scope="module")
def single_torch_thread():
    """One torch thread for a module: on a shared, oversubscribed 2-core CI machine two
    spinning OpenMP threads are several times slower than one."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture
def spy_reads(monkeypatch):
    """``spy_reads(SourceClass)`` -> the list of keys its ``read`` is called with from then on
    (the reads still happen): proves what ingestion fetched and what it skipped."""

    def install(source_class: type) -> list[str]:
        keys: list[str] = []
        original = source_class.read

        def spy(self, key):
            keys.append(key)
            return original(self, key)

        monkeypatch.setattr(source_class, "read", spy)
        return keys

    return install
