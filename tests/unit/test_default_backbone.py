"""The embedded default backbone: built once from a synthetic source hospital, then cached.

The tests shrink the recipe (a few records and steps); the real recipe is built in
tests/integration/test_default_backbone_recipe.py.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from ml.model.pretrained import BACKBONE_WEIGHTS, read_backbone
from ml.train import default_backbone
from ml.train.default_backbone import (
    CODE15_SNOMED,
    DEFAULT_RECIPES,
    DefaultRecipe,
    default_cache_dir,
    ensure_default_backbone,
)

SMALL = DefaultRecipe(name="tinylight", n_records=12, max_steps=2, batch_size=4)


@pytest.fixture()
def small_recipe(monkeypatch: pytest.MonkeyPatch) -> DefaultRecipe:
    monkeypatch.setitem(DEFAULT_RECIPES, "tinylight", SMALL)
    return SMALL


def test_build_then_cache(small_recipe: DefaultRecipe, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = ensure_default_backbone(tmp_path, name="tinylight", progress=False)
    assert folder == tmp_path / "tinylight-default-v1"
    backbone = read_backbone(folder)
    config, meta = backbone.config, backbone.meta
    assert (config.name, config.num_classes) == ("tinylight", 6)
    assert meta["source"] == "embedded-default" and meta["classes"] == list(CODE15_SNOMED)
    assert meta["data_version"].startswith("synth-source:seed=15000:sha256=")
    assert meta["recipe"]["max_steps"] == 2 and meta["training"]["steps"] == 2

    def no_rebuild(*args, **kwargs):
        raise AssertionError("the cached backbone was rebuilt")

    monkeypatch.setattr(default_backbone, "build_default_backbone", no_rebuild)
    assert ensure_default_backbone(tmp_path, name="tinylight") == folder
    assert not list(tmp_path.glob(".*.tmp"))  # no leftovers of the build


def test_build_is_deterministic_and_a_broken_cache_is_rebuilt(small_recipe: DefaultRecipe, tmp_path: Path) -> None:
    first = read_backbone(ensure_default_backbone(tmp_path / "one", name="tinylight", progress=False))
    folder = ensure_default_backbone(tmp_path / "two", name="tinylight", progress=False)
    assert read_backbone(folder).identity == first.identity

    (folder / BACKBONE_WEIGHTS).write_bytes(b"truncated")
    rebuilt = ensure_default_backbone(tmp_path / "two", name="tinylight", progress=False)
    assert read_backbone(rebuilt).identity == first.identity


def test_a_cache_from_another_recipe_is_rebuilt(
    small_recipe: DefaultRecipe, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ensure_default_backbone(tmp_path, name="tinylight", progress=False)
    monkeypatch.setitem(DEFAULT_RECIPES, "tinylight", replace(small_recipe, max_steps=1))
    folder = ensure_default_backbone(tmp_path, name="tinylight", progress=False)
    assert read_backbone(folder).meta["training"]["steps"] == 1


def test_source_hospital_is_not_the_demo_hospital() -> None:
    from ml.data.dvc import DEMO_SEED
    from ml.data.synth import DEFAULT_CLASSES

    for recipe in DEFAULT_RECIPES.values():
        assert recipe.data_seed != DEMO_SEED
        assert set(recipe.classes) != set(DEFAULT_CLASSES)
        assert recipe.max_steps * recipe.batch_size <= 2000  # a few minutes of CPU, not more


def test_cache_location(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("CESSL_CACHE", str(tmp_path))
    assert default_cache_dir() == tmp_path / "backbones"
    monkeypatch.delenv("CESSL_CACHE")
    assert default_cache_dir() == Path.home() / ".cache" / "cessl" / "backbones"
    with pytest.raises(ValueError, match="no embedded default backbone of size 'base'"):
        ensure_default_backbone(tmp_path, name="base")


def test_cli_default(small_recipe: DefaultRecipe, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from pipeline.cli import main as cessl

    assert cessl(["backbone", "default", "--config", "tinylight", "--cache-dir", str(tmp_path)]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "tinylight-default-v1")
