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

import contextlib
import functools
import os
import sqlite3
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest


class _Template:
    """``_initialize_tables(engine)`` for the test process: the first new SQLite store is migrated
    by MLflow (``migrate``) into ``path``, every new one after it gets a copy of that database
    (any other database: MLflow's own migrations)."""

    def __init__(self, path: Path, migrate: Callable[[Any], None]) -> None:
        self.path, self.migrate = path, migrate

    def __call__(self, engine: Any) -> None:
        if engine.dialect.name != "sqlite":
            self.migrate(engine)
            return
        if not self.path.exists():
            import sqlalchemy

            template = sqlalchemy.create_engine(f"sqlite:///{self.path}")
            self.migrate(template)
            template.dispose()
        source = sqlite3.connect(self.path)
        target = engine.raw_connection()
        try:
            source.backup(target.driver_connection)
        finally:
            target.close()
            source.close()


@pytest.fixture(scope="session", autouse=True)
def migrated_mlflow_template(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """The template is migrated on the first new store (a session that makes none pays nothing);
    MLflow still checks every store's schema version against its head."""
    import mlflow.store.db.utils as db_utils
    from mlflow.store.model_registry import sqlalchemy_store as registry_store

    saved = (db_utils._initialize_tables, registry_store._initialize_tables, db_utils._get_latest_schema_revision)
    initialize = _Template(tmp_path_factory.mktemp("mlflow-template") / "mlflow.db", db_utils._initialize_tables)
    db_utils._initialize_tables = registry_store._initialize_tables = initialize
    db_utils._get_latest_schema_revision = functools.cache(db_utils._get_latest_schema_revision)
    try:
        yield
    finally:
        db_utils._initialize_tables, registry_store._initialize_tables, db_utils._get_latest_schema_revision = saved


MLFLOW_URI_ENV = ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")


@contextlib.contextmanager
def mlflow_uris_restored() -> Iterator[None]:
    """MLflow's tracking and registry URIs as they were: ``mlflow.set_tracking_uri`` (called by
    the fluent API, e.g. while logging a model) keeps the URI in a module global and writes it
    into ``os.environ`` behind monkeypatch's back, where a later test, and every process it
    starts, would reach this test's store. Both are put back (the globals to unset)."""
    import sys

    before = {name: os.environ.get(name) for name in MLFLOW_URI_ENV}
    try:
        yield
    finally:
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


@pytest.fixture(autouse=True)
def mlflow_globals_do_not_leak() -> Iterator[None]:
    """Each test starts from MLflow's defaults (:func:`mlflow_uris_restored`)."""
    with mlflow_uris_restored():
        yield


@pytest.fixture(scope="module", autouse=True)
def mlflow_globals_do_not_leak_from_module_fixtures() -> Iterator[None]:
    """The same around each test file: a module-scoped fixture (a store built once for the file)
    is set up before any test's own guard and would otherwise leak into the next file, e.g. a
    later `cessl run` subprocess finding MLFLOW_TRACKING_URI pointing at the checkout's store."""
    with mlflow_uris_restored():
        yield
