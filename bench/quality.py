"""Quality of the training methods at the paper's label fractions, on one frozen test split.

Methods (``ml.train.methods``: cessl, lora, full, fixmatch, head-only) x labelled fractions x
seeds, each fine-tuned from the same pre-trained backbone for a fixed step budget, all scored
on **one** test split (drawn once with ``--test-seed``; a seed only reshuffles which of the
other records keep their labels): test macro F-beta2 (thresholds on the valid split), macro
mAP and macro AUROC, ms per step, trainable parameters and, on a GPU, peak memory. Then per
method and fraction the paired difference against CE-SSL (same seed, same test records), mean
+- sd over the seeds, with the paper's published CE-SSL figure beside it for layout.

Data: by default the network demo's first synthetic hospital (``ml.data.synth``: its lead
geometry, case mix and the eleven demo classes, none of them a label of the backbone's pre-training), generated in
memory and preprocessed as real records are. ``--source FOLDER`` reads a WFDB folder a user
mounts instead (a PTB-XL or PhysioNet/CinC 2021 download): its records are quality-checked and
preprocessed (``ml.eval.monitoring.read_signals``), and the classes are the Challenge-scored
diagnoses with at least ``--min-positives`` positive records (at most ``--max-classes``, the
most frequent). The backbone: the embedded default (``--config``), or ``--backbone FOLDER``.

    python bench/quality.py --steps 40 --seeds 0 1 2 --threads 2              # synthetic, CPU
    python bench/quality.py --source /data/ptbxl --backbone /models/base --ratios 0.05 0.1 \\
        --steps 0 --device cuda                                              # the paper's schedule

``--steps 0`` trains the paper's schedule (200 epochs of complete labelled batches).
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Subset, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import add_run_options, device_name, finetune_and_score, setup
from ml.data.splits import make_splits
from ml.errors import CesslError
from ml.model.backbone import backbone_config
from ml.model.lora import LoRAConfig
from ml.model.pretrained import read_backbone
from ml.model.rank_allocation import RankAllocationConfig
from ml.train.config import TrainConfig, batch_size_for_label_ratio
from ml.train.methods import get_method
from ml.train.recipe import allocate_ranks_for

log = logging.getLogger("bench.quality")

METHODS = ("cessl", "lora", "full", "fixmatch", "head-only")
REFERENCE = "cessl"
METRICS = ("macro_f_beta", "macro_map", "macro_auroc")
# The paper's CE-SSL figure at 5% labels (base backbone, macro F-beta2; ../shared/docs/METHOD.md)
PAPER_CESSL_5PCT = {"G12EC": 0.551, "PTB-XL": 0.578, "Ningbo": 0.569, "Chapman": 0.530}


@dataclass(frozen=True)
class Target:
    """Preprocessed records (N, 12, 6144), their labels over ``classes`` and where they came from."""

    signals: np.ndarray
    labels: np.ndarray
    classes: list[str]
    description: str

    def dataset(self) -> TensorDataset:
        return TensorDataset(torch.from_numpy(self.signals[:, :, None, :]), torch.from_numpy(self.labels))


def synthetic_target(records: int) -> Target:
    """The network demo's first hospital (its profile, the demo's classes), in memory."""
    from ml.data.preprocess import preprocess_signal
    from ml.data.synth import NETWORK_DEMO_CLASSES, SiteOptions, site_config, synthesize_record

    config = site_config(0, records, seed=0, options=SiteOptions(classes=NETWORK_DEMO_CLASSES, unlabelled_fraction=0))
    x = np.empty((records, 12, 6144), np.float32)
    y = np.zeros((records, len(config.classes)), np.float32)
    for i in range(records):
        record = synthesize_record(i, config)
        x[i] = preprocess_signal(record.signal, record.fs)
        y[i, [config.classes.index(c) for c in record.labels if c in config.classes]] = 1.0
    return Target(x, y, list(config.classes), f"synthetic hospital-a of the network demo, {records} records")


def folder_target(folder: Path, min_positives: int, max_classes: int) -> Target:
    """A WFDB folder's labelled, readable records over its frequent Challenge-scored classes."""
    from ml.eval.challenge import scored_codes
    from ml.eval.monitoring import folder_records, read_signals

    read = read_signals(folder_records(folder))
    scored = set(scored_codes())
    keep = [i for i, dx in enumerate(read.dx) if dx]
    counts: dict[str, int] = {}
    for i in keep:
        for code in set(read.dx[i] or ()) & scored:
            counts[code] = counts.get(code, 0) + 1
    classes = [c for c, n in sorted(counts.items(), key=lambda kv: -kv[1]) if n >= min_positives][:max_classes]
    if not classes:
        raise SystemExit(f"{folder}: no Challenge-scored class has {min_positives} positive records")
    y = np.array([[float(c in (read.dx[i] or ())) for c in classes] for i in keep], np.float32)
    skipped = len(read.unreadable)
    description = f"{folder}: {len(keep)} labelled readable records ({skipped} unreadable), {len(classes)} classes"
    return Target(read.signals[keep], y, classes, description)


def peak_memory_mb(device: torch.device) -> float:
    return torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else float("nan")


def run_cell(
    target: Target, backbone, method: str, ratio: float, seed: int, args: argparse.Namespace
) -> dict[str, Any]:
    """One (method, labelled fraction, seed) fine-tune, scored on the frozen test split."""
    ids = [f"{i:06d}" for i in range(len(target.labels))]
    splits = make_splits(
        ids, target.labels, test_size=args.test_ratio, labelled_ratio=ratio, seed=seed, test_seed=args.test_seed
    )
    index = {name: i for i, name in enumerate(ids)}
    data = target.dataset()

    def part(names: list[str]) -> Subset:
        return Subset(data, [index[n] for n in names])

    labelled, valid, unlabelled, test = (
        part(splits.train),
        part(splits.valid),
        part(splits.unlabelled),
        part(splits.test),
    )
    config = backbone_config(backbone.name, len(target.classes))
    lora = LoRAConfig()
    batch = args.batch or batch_size_for_label_ratio(ratio)
    device = torch.device(args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    ranks = allocate_ranks_for(
        method, backbone.state, config, lora, RankAllocationConfig(), labelled, batch, seed, args.device
    )
    train = TrainConfig(
        method=method,
        epochs=200 if args.steps == 0 else None,
        max_steps=args.steps or 1,
        val_every=max(1, args.steps // 2) if args.steps else 50,
        batch_size=batch,
        lr=args.lr,
        seed=seed,
        device=args.device,
        progress=False,
    )
    outcome, seconds, scores = finetune_and_score(
        backbone.state, config, lora, ranks.rank_map, train, (labelled, unlabelled, valid, test)
    )
    steps = outcome.result.steps
    return {
        "method": method,
        "ratio": ratio,
        "seed": seed,
        **{m: float(scores[m]) for m in METRICS},
        "n_labelled": len(splits.train),
        "n_unlabelled": len(splits.unlabelled),
        "n_test": len(splits.test),
        "test_ids": splits.test,
        "steps": steps,
        "best_step": outcome.result.best_step,  # 0: validation never beat the start (LP-FT: the probe)
        "ms_per_step": 1000 * seconds / steps if steps else float("nan"),
        "seconds": seconds,
        "trainable": outcome.trainable,
        "total": outcome.total,
        "peak_memory_mb": peak_memory_mb(device),
    }


def _sd(values: list[float]) -> float:
    return statistics.stdev(values) if len(values) > 1 else 0.0


def report(rows: list[dict[str, Any]], args: argparse.Namespace, target: Target, backbone_name: str) -> dict:
    """The table (mean +- sd over seeds) and the paired differences against CE-SSL."""
    test_sets = {json.dumps(r["test_ids"]) for r in rows}
    assert len(test_sets) == 1, "every cell must score the same test records"
    print(
        f"\n{target.description}; backbone {backbone_name}; {len(target.classes)} classes; "
        f"one test split of {rows[0]['n_test']} records; {args.steps or '200 epochs'} steps; "
        f"seeds {args.seeds}; {device_name(torch.device(args.device if args.device != 'auto' else 'cpu'))}"
    )
    print(
        "| method | reads | labelled | labelled / unlabelled records | test macro F-beta2 | test mAP | test AUROC "
        "| best step | ms/step | trainable (share) | peak MB | F-beta2 - cessl (paired) |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    summary: dict[str, Any] = {}
    for ratio in args.ratios:
        reference = {r["seed"]: r for r in rows if r["method"] == REFERENCE and r["ratio"] == ratio}
        for method in args.methods:
            mine = [r for r in rows if r["method"] == method and r["ratio"] == ratio]
            if not mine:
                continue
            cols = {k: [float(r[k]) for r in mine] for k in (*METRICS, "ms_per_step", "peak_memory_mb", "best_step")}
            diffs = [r["macro_f_beta"] - reference[r["seed"]]["macro_f_beta"] for r in mine if r["seed"] in reference]
            paired = "" if method == REFERENCE or not diffs else f"{statistics.mean(diffs):+.3f} +- {_sd(diffs):.3f}"
            peak, ms = statistics.mean(cols["peak_memory_mb"]), statistics.mean(cols["ms_per_step"])
            reads = "labelled + unlabelled" if get_method(method).reads_unlabelled else "labelled"
            share = mine[0]["trainable"] / mine[0]["total"]
            print(
                f"| {method} | {reads} | {ratio:.0%} | {mine[0]['n_labelled']} / {mine[0]['n_unlabelled']} | "
                + " | ".join(f"{statistics.mean(cols[m]):.3f} +- {_sd(cols[m]):.3f}" for m in METRICS)
                + f" | {statistics.mean(cols['best_step']):.0f}"
                + (" | no step" if not np.isfinite(ms) else f" | {ms:.0f}")
                + f" | {mine[0]['trainable']:,} ({share:.1%}) | "
                + ("n/a" if not np.isfinite(peak) else f"{peak:.0f}")
                + f" | {paired} |"
            )
            summary[f"{method}@{ratio}"] = {f"{k}_mean": statistics.mean(v) for k, v in cols.items()} | {
                "diff_f_beta_vs_cessl": diffs
            }
    print(
        "paper, CE-SSL at 5% labels, base backbone, macro F-beta2 (200 epochs, real datasets): "
        + ", ".join(f"{k} {v:.3f}" for k, v in PAPER_CESSL_5PCT.items())
    )
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--source", type=Path, default=None, help="a WFDB folder (PTB-XL, CinC 2021); default synthetic"
    )
    parser.add_argument("--records", type=int, default=480, help="synthetic records (without --source)")
    parser.add_argument("--min-positives", type=int, default=20)
    parser.add_argument("--max-classes", type=int, default=20)
    parser.add_argument("--backbone", type=Path, default=None, help="a backbone folder (default: the embedded one)")
    parser.add_argument("--config", default="tinylight", help="size of the embedded default backbone")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.01, 0.05, 0.1])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--test-ratio", type=float, default=0.3)
    parser.add_argument("--test-seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=40, help="fixed budget; 0: the paper's 200 epochs")
    parser.add_argument("--batch", type=int, default=16, help="0: the paper's rule for the fraction")
    parser.add_argument("--lr", type=float, default=1e-3)
    add_run_options(parser)
    args = parser.parse_args()
    setup(args)
    for name in ("ml.train.recipe", "ml.train.trainer", "ml.train.build", "ml.model.rank_allocation"):
        logging.getLogger(name).setLevel(logging.WARNING)
    if REFERENCE not in args.methods:
        args.methods = [REFERENCE, *args.methods]

    t0 = time.perf_counter()
    if args.backbone is None:
        from ml.train.default_backbone import ensure_default_backbone

        folder = ensure_default_backbone(name=args.config, progress=False)
    else:
        folder = args.backbone
    try:  # a backbone or source folder that is missing or unusable: one line, exit 1
        backbone = read_backbone(folder)
        target = (
            synthetic_target(args.records)
            if args.source is None
            else folder_target(args.source, args.min_positives, args.max_classes)
        )
    except (OSError, CesslError) as err:
        raise SystemExit(f"bench/quality.py: {err}") from None
    log.info("%s (%.0f s)", target.description, time.perf_counter() - t0)
    rows = []
    for ratio in args.ratios:
        for seed in args.seeds:
            for method in args.methods:
                row = run_cell(target, backbone, method, ratio, seed, args)
                rows.append(row)
                log.info(
                    "%s @ %.0f%% seed %d: F-beta2 %.3f mAP %.3f (%.0f s)",
                    method,
                    100 * ratio,
                    seed,
                    row["macro_f_beta"],
                    row["macro_map"],
                    row["seconds"],
                )
    summary = report(rows, args, target, str(folder))
    print(f"total {time.perf_counter() - t0:.0f} s")
    if args.json:
        plain = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
        Path(args.json).write_text(json.dumps({"args": plain, "rows": rows, "summary": summary}, indent=1))


if __name__ == "__main__":
    main()
