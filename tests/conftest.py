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
