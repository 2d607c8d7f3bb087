"""The embedded default backbone built with the real recipe (minutes of pre-training). The
shrunk recipe and the cache: tests/unit/test_default_backbone.py."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import pytest

from ml.model.pretrained import read_backbone
from ml.train.default_backbone import (
    DEFAULT_RECIPES,
    ensure_default_backbone,
)


@pytest.mark.slow
@pytest.mark.timeout(900)  # each recipe may take up to 600 s (asserted)
@pytest.mark.parametrize("name", ["tinylight", "tiny"])
def test_real_default_recipe(name: str, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The real recipe builds, learns something, and takes minutes, not more (logged)."""
    caplog.set_level(logging.INFO)
    t0 = time.perf_counter()
    folder = ensure_default_backbone(tmp_path, name=name, progress=False)
    elapsed = time.perf_counter() - t0
    meta = read_backbone(folder).meta
    losses = [loss for _, loss in meta["training"]["losses"]]
    assert losses[-1] < losses[0]
    logging.getLogger(__name__).info("default %s backbone built in %.0f s", name, elapsed)
    assert elapsed < 600, f"default {name} backbone took {elapsed:.0f} s"
    assert DEFAULT_RECIPES[name].folder_name == folder.name
