"""Signing keys and trust files for tests: a release manager who may sign registry decisions."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.registry.signing import KEY_ENV, TRUST_ENV, KeyFiles, add_signer, generate_key


def make_signer(root: Path, name: str, trust: Path | None = None) -> KeyFiles:
    """A key pair for ``name`` under ``root/keys/<name>``, listed in ``trust`` (default ``root/trust.yaml``)."""
    keys = generate_key(root / "keys" / name)
    add_signer(trust or root / "trust.yaml", name, keys.public_text)
    return keys


def use_signer(monkeypatch: pytest.MonkeyPatch, root: Path, name: str) -> KeyFiles:
    """``name`` signs this test's decisions: ``$CESSL_SIGNING_KEY`` / ``$CESSL_TRUST_FILE`` point at
    a fresh key and ``root/trust.yaml`` (subprocesses inherit them)."""
    keys = make_signer(root, name)
    use_keys(monkeypatch, keys, root / "trust.yaml")
    return keys


def use_keys(monkeypatch: pytest.MonkeyPatch, keys: KeyFiles, trust: Path) -> None:
    """Sign with ``keys`` and verify against ``trust`` (e.g. one key for a module's shared store,
    so that `cessl models` verifies every model there)."""
    monkeypatch.setenv(KEY_ENV, str(keys.private))
    monkeypatch.setenv(TRUST_ENV, str(trust))
