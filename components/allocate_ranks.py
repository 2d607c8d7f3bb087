"""Step: one-shot rank allocation (CE-SSL part 2) -> per-layer rank map (JSON).

For a method whose ranks are allocated (``cessl``): the backbone is built with every
adapted layer at rank r, the pre-trained weights loaded, and one pass over the labelled
train split, with fine-tuning's labelled batch size and a shuffled order seeded from the
run's seed, scores each adapted matrix; the least important get r_low
(:func:`ml.train.recipe.allocate_ranks_for`). Every other method gets ``{}``: ``lora``
trains at the uniform rank ``LoRAConfig.r``, ``full``/``fixmatch`` have no adapters.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from components.common import sha256_json, write_json
from components.data_access import dataset, open_store
from ml.data.splits import Splits
from ml.model.pretrained import read_backbone

if TYPE_CHECKING:
    from ml.model.lora import LoRAConfig
    from ml.model.rank_allocation import RankAllocationConfig

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RankResult:
    rank_map: dict[str, int]
    summary: str
    fingerprint: str


def summarise(rank_map: dict[str, int]) -> str:
    """E.g. ``"13 layers: 8 x r=8, 5 x r=16"``."""
    if not rank_map:
        return "no allocated ranks (uniform LoRA rank r, or full fine-tuning)"
    counts = Counter(rank_map.values())
    parts = ", ".join(f"{n} x r={r}" for r, n in sorted(counts.items()))
    return f"{len(rank_map)} layers: {parts}"


def allocate_ranks_step(
    store_dir: Path,
    splits_path: Path,
    backbone_dir: Path,
    out_path: Path,
    *,
    method: str,
    lora: LoRAConfig,
    allocation: RankAllocationConfig,
    batch_size: int,
    seed: int,
) -> RankResult:
    """Write the rank map of ``method`` to ``out_path`` (``{}`` unless its ranks are allocated)."""
    from ml.model.backbone import backbone_config
    from ml.train.recipe import allocate_ranks_for

    splits = Splits.load(splits_path)
    backbone = read_backbone(backbone_dir)
    state, name, identity = backbone.state, backbone.name, backbone.identity
    train = dataset(open_store(store_dir), splits.train, splits.classes)
    if batch_size > len(train):
        log.info("allocation batch %d > %d labelled train records: using %d", batch_size, len(train), len(train))
    allocated = allocate_ranks_for(
        method, state, backbone_config(name, len(splits.classes)), lora, allocation, train, batch_size, seed
    )
    rank_map = allocated.rank_map
    summary = summarise(rank_map)
    write_json(out_path, rank_map)
    log.info("rank map (%s, r=%d, c=%.2f): %s", method, lora.r, allocation.compress, summary)
    inputs = {
        "rank_map": rank_map,
        "method": method,
        "lora": asdict(lora),
        "allocation": asdict(allocation),
        "batch_size": min(batch_size, len(train)),
        "seed": seed,
        "backbone": identity,
    }
    return RankResult(rank_map=rank_map, summary=summary, fingerprint=sha256_json(inputs))
