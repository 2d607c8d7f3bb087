"""MLflow in the test process: one migrated database per session, copied into every new SQLite
store, and no tracking URI leaking from one test into the next.

Loaded as a pytest plugin from ``tests/conftest.py``. Creating an MLflow SQLite store runs
MLflow's ~60 schema migrations (2-4 s on this machine) and every new store object reads the
migration scripts again to find the schema head (~1 s); dozens of tests make a fresh store.
This plugin runs MLflow's own ``_initialize_tables`` once, into a template file, and then (in
the test process only) gives every new SQLite store a copy of it through SQLite's backup API:
the same tables, indexes and ``alembic_version`` that the migrations produce, so the stores
behave exactly as freshly migrated ones. The schema head is read once. Processes the tests
start (the CLI, kfp.local tasks, servers) migrate as usual.
"""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest


def _copy_into(template: Path, migrate: Callable[[Any], None]) -> Callable[[Any], None]:
    """An ``_initialize_tables(engine)`` that copies ``template`` into a SQLite engine's database
    (any other database: ``migrate``, MLflow's own)."""

    def initialize(engine: Any) -> None:
        if engine.dialect.name != "sqlite":
            migrate(engine)
            return
        source = sqlite3.connect(template)
        target = engine.raw_connection()
        try:
            source.backup(target.driver_connection)
        finally:
            target.close()
            source.close()

    return initialize


@pytest.fixture(scope="session", autouse=True)
def migrated_mlflow_template(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    import mlflow.store.db.utils as db_utils
    import sqlalchemy
    from mlflow.store.model_registry import sqlalchemy_store as registry_store

    template = tmp_path_factory.mktemp("mlflow-template") / "mlflow.db"
    engine = sqlalchemy.create_engine(f"sqlite:///{template}")
    migrate = db_utils._initialize_tables
    migrate(engine)
    engine.dispose()
    head = db_utils._get_latest_schema_revision()
    saved = (db_utils._initialize_tables, registry_store._initialize_tables, db_utils._get_latest_schema_revision)
    initialize = _copy_into(template, migrate)
    db_utils._initialize_tables = registry_store._initialize_tables = initialize
    db_utils._get_latest_schema_revision = lambda: head
    try:
        yield template
    finally:
        db_utils._initialize_tables, registry_store._initialize_tables, db_utils._get_latest_schema_revision = saved


MLFLOW_URI_ENV = ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")


@pytest.fixture(autouse=True)
def mlflow_globals_do_not_leak() -> Iterator[None]:
    """Each test starts from MLflow's defaults: ``mlflow.set_tracking_uri`` (called by the fluent
    API, e.g. while logging a model) keeps the URI in a module global and writes it into
    ``os.environ`` behind monkeypatch's back, so a later test in the same process would reach
    an earlier test's store. Both are put back after every test."""
    import sys

    before = {name: os.environ.get(name) for name in MLFLOW_URI_ENV}
    yield
    tracking = sys.modules.get("mlflow.tracking._tracking_service.utils")
    registry = sys.modules.get("mlflow.tracking._model_registry.utils")
    if tracking is not None:
        tracking._tracking_uri = None
    if registry is not None:
        registry._registry_uri = None
    for name, value in before.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value
