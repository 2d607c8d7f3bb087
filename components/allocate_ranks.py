"""Step: one-shot rank allocation (CE-SSL part 2) -> per-layer rank map (JSON).

For ``cessl``: the backbone is built with every adapted layer at rank r, the pre-trained
weights loaded, and one pass over the labelled train split scores each adapted matrix
(:func:`ml.model.rank_allocation.allocate_ranks`); the least important get r_low. The
baselines get what they use: ``lora`` a uniform rank r, ``full``/``fixmatch`` no adapters.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

from components.common import sha256_json, write_json
from components.data_access import dataset, open_store
from ml.data.splits import Splits
from ml.model.pretrained import read_backbone

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RankConfig:
    method: str = "cessl"
    r: int = 16
    compress: float = 0.6
    seed: int = 0
    variant: str = "taylor"  # taylor | fisher
    batch_size: int = 16

    def __post_init__(self) -> None:
        if self.r < 1:
            raise ValueError(f"rank r must be >= 1, got {self.r}")
        if not 0.0 <= self.compress <= 1.0:
            raise ValueError(f"compress ratio must be in [0, 1], got {self.compress}")


@dataclass(frozen=True)
class RankResult:
    rank_map: dict[str, int]
    summary: str
    fingerprint: str


def summarise(rank_map: dict[str, int]) -> str:
    """E.g. ``"13 layers: 8 x r=8, 5 x r=16"``."""
    if not rank_map:
        return "no adapters (full fine-tuning)"
    counts = Counter(rank_map.values())
    parts = ", ".join(f"{n} x r={r}" for r, n in sorted(counts.items()))
    return f"{len(rank_map)} layers: {parts}"


def _loader(train_ds, batch_size: int):
    import torch
    from torch.utils.data import DataLoader

    return DataLoader(train_ds, batch_size=batch_size, shuffle=False, generator=torch.Generator())


def allocate_ranks_step(store_dir: Path, splits_path: Path, backbone_dir: Path, out_path: Path,
                        config: RankConfig) -> RankResult:
    """Write the rank map for ``config.method`` to ``out_path``."""
    from ml.model.backbone import adapted_layer_names, backbone_config
    from ml.model.rank_allocation import allocate_ranks
    from ml.train.finetune import build_model_for_method

    splits = Splits.load(splits_path)
    backbone = read_backbone(backbone_dir)
    state, name, identity = backbone.state, backbone.name, backbone.identity
    store = open_store(store_dir)
    model_config = backbone_config(name, len(splits.classes))
    if config.method == "cessl":
        model = build_model_for_method(state, model_config, "lora", r=config.r, seed=config.seed)
        train = dataset(store, splits.train, splits.classes)
        rank_map = allocate_ranks(model, _loader(train, min(config.batch_size, len(train))), config.r,
                                  compress=config.compress, variant=config.variant)
    elif config.method == "lora":
        rank_map = {layer: config.r for layer in adapted_layer_names(model_config)}
    else:
        rank_map = {}
    rank_map = {k: int(v) for k, v in rank_map.items()}
    summary = summarise(rank_map)
    write_json(out_path, rank_map)
    log.info("rank map (%s, r=%d, c=%.2f): %s", config.method, config.r, config.compress, summary)
    fingerprint = sha256_json({"rank_map": rank_map, "config": asdict(config), "backbone": identity})
    return RankResult(rank_map=rank_map, summary=summary, fingerprint=fingerprint)
