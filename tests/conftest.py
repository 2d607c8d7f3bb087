"""Shared pytest fixtures: fixture paths, and real servers (see tests/servers.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

FIXTURES = Path(__file__).parent / "fixtures"
REFERENCE = FIXTURES / "reference"
ECG_RECORDS = FIXTURES / "ecg" / "cinc2021"
LABEL_MAPPING = FIXTURES / "ecg" / "challenge2021_label_mapping.csv"

pytest_plugins = ["servers"]


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
    import torch

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
