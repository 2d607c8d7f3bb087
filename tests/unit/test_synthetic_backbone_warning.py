"""A cluster run on the embedded synthetic backbone warns loudly in resolve_backbone's log;
a local run (no ``KUBERNETES_SERVICE_HOST``) and a real backbone do not. (Submit and
schedule warn too: tests/unit/test_kfp_auth.py.)"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from components.backbone import IN_CLUSTER_ENV, resolve_backbone_step
from ml.model.pretrained import read_backbone, save_backbone
from ml.train.default_backbone import DEFAULT_RECIPES, DefaultRecipe

SMALL = DefaultRecipe(name="tinylight", n_records=12, max_steps=2, batch_size=4)
WARNING = "SYNTHETIC BACKBONE"


@pytest.fixture()
def cache(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    monkeypatch.setitem(DEFAULT_RECIPES, "tinylight", SMALL)  # a few records and steps
    monkeypatch.delenv(IN_CLUSTER_ENV, raising=False)
    return tmp_path / "cache"


def _warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and WARNING in r.getMessage()]


def test_default_backbone_warns_only_in_a_cluster(cache, tmp_path, monkeypatch, caplog):
    caplog.set_level(logging.INFO)
    resolve_backbone_step("default", "tinylight", tmp_path / "local", cache_dir=cache)
    assert not _warnings(caplog)  # a local run: the demo backbone is expected
    monkeypatch.setenv(IN_CLUSTER_ENV, "10.96.0.1")
    resolve_backbone_step("default", "tinylight", tmp_path / "pod", cache_dir=cache)
    (message,) = _warnings(caplog)
    assert "cessl backbone import CKPT.pt --config base --out DIR --register" in message
    caplog.clear()
    # the same weights passed as a folder (or registered and fetched by models:/) warn as well
    resolve_backbone_step(str(tmp_path / "pod"), "tinylight", tmp_path / "folder", cache_dir=cache)
    assert len(_warnings(caplog)) == 1


def test_a_real_backbone_does_not_warn(cache, tmp_path, monkeypatch, caplog):
    synthetic = read_backbone(resolve_backbone_step("default", "tinylight", tmp_path / "d", cache_dir=cache).path)
    pretrained = save_backbone(
        synthetic.state, synthetic.config, synthetic.meta["classes"], tmp_path / "pretrained", source="pretrain"
    )
    monkeypatch.setenv(IN_CLUSTER_ENV, "10.96.0.1")
    caplog.set_level(logging.INFO)
    resolve_backbone_step(str(pretrained), "tinylight", tmp_path / "out", cache_dir=cache)
    assert not _warnings(caplog)
