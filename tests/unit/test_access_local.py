"""Access control without a server: local stores need no login, and passwords never reach a
log. The roles against a real auth server: tests/integration/test_access.py."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.core.logsafe import redact, register_secret
from pipeline.registry.access import (
    password_env,
    require_model_permission,
)

MODEL = "cessl-ecg"


def test_local_stores_need_no_login(tmp_path: Path) -> None:
    assert require_model_permission(f"sqlite:///{tmp_path / 'mlflow.db'}", MODEL, "promote") is None


def test_passwords_are_redacted_from_logs(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(password_env("bob"), "bobs-password-123")
    monkeypatch.setenv("MLFLOW_AUTH_ADMIN_PASSWORD", "admins-password-123")
    register_secret("from-a-file-123")
    text = redact("bobs-password-123 admins-password-123 from-a-file-123")
    assert "password-123" not in text and "from-a-file" not in text
