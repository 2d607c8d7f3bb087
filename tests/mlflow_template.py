"""One migrated MLflow database per test session, copied into every new SQLite store.

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
