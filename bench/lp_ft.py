"""LP-FT: CE-SSL with its classifier started from random vs from the linear probe (``head_init``).

Kumar et al. 2022 ("Fine-Tuning can Distort Pretrained Features and Underperform
Out-of-Distribution"): fitting the head first on the frozen features (linear probing), then
fine-tuning, keeps a random head's large early gradients from distorting the pre-trained
features. Here: the embedded default backbone (``ml.train.default_backbone``, pre-trained on a
synthetic source hospital, cached after the first build) fine-tuned with CE-SSL
(``ml.train.recipe``: rank allocation, ``finetune``, valid thresholds) on a different synthetic
hospital (``ml.data.synth``: the demo's ten classes, its own seed, the same preprocessing)
for a fixed small step budget, once per seed and head start. Per seed the records are
shuffled into labelled / unlabelled / valid splits (the test split is fixed), the rank map is
shared by both starts, and both are scored on the same test records: macro F-beta2 (valid
thresholds) and macro mAP, mean +- sd over the seeds, and the paired difference per seed.
The probe's cost is the time of :func:`ml.train.recipe.init_head` against the whole fine-tune.

    python bench/lp_ft.py --steps 40 --seeds 0 1 2 --threads 2
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Subset

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import add_run_options, finetune_and_score, setup
from ml.data.synth import DEFAULT_CLASSES, SynthConfig
from ml.model.backbone import BACKBONE_CONFIGS, backbone_config
from ml.model.lora import LoRAConfig
from ml.model.pretrained import read_backbone
from ml.model.rank_allocation import RankAllocationConfig
from ml.train.config import HEAD_INITS, TrainConfig
from ml.train.default_backbone import DEFAULT_RECIPES, ensure_default_backbone, source_hospital
from ml.train.recipe import allocate_ranks_for

log = logging.getLogger("bench.lp_ft")
METRICS = ("macro_f_beta", "macro_map")
TARGET_SEED = 20240620  # the demo hospital's seed: another hospital than the backbone's source


def target_hospital(records: int, config: str):
    """The target hospital's records as tensors (the default backbone's source-hospital code,
    with the demo's ten classes, no extra rhythm and the target's seed)."""
    classes = SynthConfig(classes=DEFAULT_CLASSES).classes  # SNOMED codes
    recipe = dataclasses.replace(
        DEFAULT_RECIPES[config], n_records=records, classes=classes, extra_rhythms=(), data_seed=TARGET_SEED
    )
    dataset, names, _ = source_hospital(recipe)
    return dataset, names


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="tinylight", choices=sorted(DEFAULT_RECIPES))
    parser.add_argument("--steps", type=int, default=40, help="fine-tuning steps (fixed budget)")
    parser.add_argument("--val-every", type=int, default=10)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--labelled", type=int, default=48)
    parser.add_argument("--unlabelled", type=int, default=96)
    parser.add_argument("--valid", type=int, default=48)
    parser.add_argument("--test", type=int, default=96)
    add_run_options(parser)
    args = parser.parse_args()
    setup(args)
    for name in ("ml.train.recipe", "ml.train.trainer", "ml.train.build", "ml.model.rank_allocation"):
        logging.getLogger(name).setLevel(logging.WARNING)

    t0 = time.perf_counter()
    backbone = read_backbone(ensure_default_backbone(name=args.config, progress=False))
    t_backbone = time.perf_counter() - t0
    n = args.labelled + args.unlabelled + args.valid + args.test
    dataset, classes = target_hospital(n, args.config)
    config = backbone_config(BACKBONE_CONFIGS[args.config].name, len(classes))
    test = Subset(dataset, range(n - args.test, n))
    log.info("backbone %.1f s, %d target records %.1f s", t_backbone, n, time.perf_counter() - t0 - t_backbone)

    rows = []
    for seed in args.seeds:
        order = np.random.default_rng(seed).permutation(n - args.test).tolist()
        cuts = np.cumsum([args.labelled, args.unlabelled])
        labelled, unlabelled = Subset(dataset, order[: cuts[0]]), Subset(dataset, order[cuts[0] : cuts[1]])
        valid = Subset(dataset, order[cuts[1] :])
        lora = LoRAConfig()
        ranks = allocate_ranks_for(
            "cessl", backbone.state, config, lora, RankAllocationConfig(), labelled, args.batch, seed, args.device
        )
        for head_init in HEAD_INITS:
            train = TrainConfig(
                method="cessl",
                max_steps=args.steps,
                val_every=args.val_every,
                batch_size=args.batch,
                lr=args.lr,
                seed=seed,
                device=args.device,
                progress=False,
                head_init=head_init,
            )
            outcome, seconds, scores = finetune_and_score(
                backbone.state, config, lora, ranks.rank_map, train, (labelled, unlabelled, valid, test)
            )
            row = {
                "seed": seed,
                "head_init": head_init,
                **{m: scores[m] for m in METRICS},
                "valid_best": outcome.result.best_score,
                "best_step": outcome.result.best_step,
                "seconds": seconds,
                "probe_seconds": outcome.head_init_seconds,
            }
            rows.append(row)
            log.info("%s", {k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()})

    def sd(values: list[float]) -> float:
        return statistics.stdev(values) if len(values) > 1 else 0.0

    print(
        f"\nCE-SSL, {args.config} default backbone, {args.steps} steps, batch {args.batch}, "
        f"{args.labelled}/{args.unlabelled}/{args.valid}/{args.test} records, seeds {args.seeds}, "
        f"{torch.get_num_threads()} threads"
    )
    print("| head_init | test macro F-beta2 | test macro mAP | best step | fine-tune s | probe s |")
    print("|---|---:|---:|---:|---:|---:|")
    summary: dict[str, dict[str, Any]] = {}
    for head_init in HEAD_INITS:
        mine = [r for r in rows if r["head_init"] == head_init]
        cols = {k: [float(r[k]) for r in mine] for k in (*METRICS, "best_step", "seconds", "probe_seconds")}
        summary[head_init] = {f"{k}_mean": statistics.mean(v) for k, v in cols.items()}
        summary[head_init] |= {f"{k}_sd": sd(v) for k, v in cols.items()}
        print(
            f"| {head_init} | "
            + " | ".join(f"{statistics.mean(cols[k]):.3f} +- {sd(cols[k]):.3f}" for k in METRICS)
            + f" | {statistics.mean(cols['best_step']):.0f} | {statistics.mean(cols['seconds']):.1f}"
            f" | {statistics.mean(cols['probe_seconds']):.2f} |"
        )
    for m in METRICS:
        diffs = [
            float(b[m] - a[m])
            for a, b in zip(
                [r for r in rows if r["head_init"] == "random"],
                [r for r in rows if r["head_init"] == "linear-probe"],
                strict=True,
            )
        ]
        summary[f"diff_{m}"] = {"mean": statistics.mean(diffs), "sd": sd(diffs), "per_seed": diffs}
        print(
            f"linear-probe - random, {m}: {statistics.mean(diffs):+.3f} +- {sd(diffs):.3f} "
            f"(per seed {', '.join(f'{d:+.3f}' for d in diffs)})"
        )
    print(f"total {time.perf_counter() - t0:.0f} s")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "rows": rows, "summary": summary}, indent=1))


if __name__ == "__main__":
    main()
