"""The embedded default backbone built with the real recipe (minutes of pre-training). The
shrunk recipe and the cache: tests/unit/test_default_backbone.py."""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path

import pytest

from ml.model.pretrained import read_backbone
from ml.train.default_backbone import DEFAULT_RECIPES, build_default_backbone, ensure_default_backbone


@pytest.mark.slow
@pytest.mark.timeout(900)  # the recipe may take up to 600 s (asserted)
def test_the_demos_default_recipe(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The real recipe of the default backbone (``tinylight``, what `make demo` builds on first
    use) builds, learns something, and takes minutes, not more (logged)."""
    caplog.set_level(logging.INFO)
    t0 = time.perf_counter()
    folder = ensure_default_backbone(tmp_path, name="tinylight", progress=False)
    elapsed = time.perf_counter() - t0
    meta = read_backbone(folder).meta
    losses = [loss for _, loss in meta["training"]["losses"]]
    assert losses[-1] < losses[0]
    logging.getLogger(__name__).info("default tinylight backbone built in %.0f s", elapsed)
    assert elapsed < 600, f"default tinylight backbone took {elapsed:.0f} s"
    assert DEFAULT_RECIPES["tinylight"].folder_name == folder.name


@pytest.mark.slow
def test_the_tiny_recipe_builds_and_learns_on_its_real_data(tmp_path: Path) -> None:
    """``tiny``'s recipe (a larger model, same source data and schedule) for a quarter of its
    steps: the architecture builds, trains on the real source records and its loss falls. Its
    full length is the same code path as tinylight's (timed above)."""
    recipe = dataclasses.replace(DEFAULT_RECIPES["tiny"], max_steps=DEFAULT_RECIPES["tiny"].max_steps // 4)
    folder = build_default_backbone(tmp_path / "tiny", recipe, progress=False)
    meta = read_backbone(folder).meta
    losses = [loss for _, loss in meta["training"]["losses"]]
    assert meta["training"]["steps"] == recipe.max_steps and losses[-1] < losses[0]
