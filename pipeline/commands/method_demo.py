"""`cessl demo`: the CE-SSL core end to end on synthetic tensors, in a couple of minutes on CPU.

What it runs (all three parts of the method, nothing of the pipeline around them):

1. a small synthetic multi-label task on (N, 12, 1, 6144) tensors
   (:mod:`ml.train.synthetic`): labelled train / valid / test splits and an unlabelled pool;
2. a backbone - randomly initialised, standing in for a pre-trained one (the log says so);
3. one-shot rank allocation (Taylor importance, one pass over the labelled train split);
4. CE-SSL fine-tuning: LoRA at the allocated ranks with random deactivation and the
   semi-supervised BatchNorm step (:func:`ml.train.steps.semi_supervised_step`);
5. evaluation on the test split with thresholds fitted on the validation split.

It prints the trainable/total parameter counts, the rank map and the test metrics.
"""

from __future__ import annotations

import argparse
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

# torch, scikit-learn and the ml/ stack load only when the demo runs: every `cessl`
# command builds this parser, and none of the others should pay for them at start-up.
if TYPE_CHECKING:
    import pandas as pd
    from rich.console import Console
    from rich.table import Table

    from ml.eval.evaluate import EvaluationReport
    from ml.train.trainer import TrainResult

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DemoOptions:
    """Sizes of the demo; the defaults finish in a couple of minutes on two CPU cores."""

    backbone: str = "tinylight"
    classes: int = 4
    train: int = 96
    valid: int = 48
    test: int = 96
    unlabelled: int = 96
    steps: int = 60
    batch_size: int = 16
    val_every: int = 20
    lr: float = 3e-3  # the paper's 1e-3 assumes a pre-trained backbone; this one is random
    r: int = 16
    compress: float = 0.6
    p: float = 0.2
    seed: int = 0
    device: str = "auto"
    out: str | None = None  # write the adapter here (optional)
    progress: bool = True


@dataclass
class DemoReport:
    trainable: int
    total: int
    backbone_params: int
    rank_map: dict[str, int]
    importance: dict[str, float]
    train: TrainResult
    evaluation: EvaluationReport
    seconds: float


def _allocation_batches(dataset, batch_size: int, seed: int):
    """One pass over the labelled train split, in a seeded order."""
    from ml.train.loaders import EpochStream, fetch

    stream = EpochStream(len(dataset), batch_size, seed)
    n_batches = max(1, len(dataset) // batch_size)
    return [fetch(dataset, stream.next_indices()) for _ in range(n_batches)]


def run_demo(options: DemoOptions) -> DemoReport:
    """Synthetic data -> random stand-in backbone -> rank allocation -> CE-SSL -> test metrics."""
    import torch

    from ml.eval.evaluate import evaluate
    from ml.model.backbone import ECGTransformer, backbone_config
    from ml.model.lora import count_parameters
    from ml.model.rank_allocation import parameter_importance, ranks_from_importance
    from ml.train.config import TrainConfig
    from ml.train.finetune import build_model_for_method
    from ml.train.synthetic import SyntheticTaskConfig, make_splits
    from ml.train.trainer import fit

    start = time.perf_counter()
    sizes = {"train": options.train, "valid": options.valid, "test": options.test, "unlabelled": options.unlabelled}
    task_config = SyntheticTaskConfig(num_classes=options.classes)
    log.info("synthetic task: %d classes, splits %s", options.classes, sizes)
    task, data = make_splits(sizes, task_config, seed=options.seed)
    config = backbone_config(options.backbone, options.classes)

    log.warning("backbone %s is RANDOMLY INITIALISED: it stands in for a pre-trained checkpoint", options.backbone)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(options.seed)
        backbone = ECGTransformer(config)
    backbone_state, backbone_params = backbone.state_dict(), count_parameters(backbone)[1]

    # CE-SSL part 2: one-shot rank allocation on the labelled train split.
    scoring = build_model_for_method(backbone_state, config, "lora", r=options.r, seed=options.seed)
    importance = parameter_importance(scoring, _allocation_batches(data["train"], options.batch_size, options.seed))
    rank_map = ranks_from_importance(importance, config.num_layers, options.r, options.compress)
    del scoring

    # CE-SSL parts 1 and 3: LoRA with random deactivation + semi-supervised BatchNorm.
    model = build_model_for_method(backbone_state, config, "cessl", rank_map=rank_map, p=options.p,
                                   r=options.r, seed=options.seed)  # fmt: skip
    trainable, total = count_parameters(model)
    train_config = TrainConfig(
        method="cessl", lr=options.lr, max_steps=options.steps, batch_size=options.batch_size,
        val_every=options.val_every, seed=options.seed, device=options.device, progress=options.progress,
        warmup_frac=0.05,
    )  # fmt: skip
    result = fit(model, data["train"], data["unlabelled"], data["valid"], train_config)
    evaluation = evaluate(model, data["test"], valid=data["valid"], classes=task.classes)

    if options.out:
        from ml.model.adapter import AdapterMeta, save_adapter

        model.cpu()
        meta = AdapterMeta(backbone_id="demo-random-init", classes=task.classes,
                           thresholds=[float(t) for t in evaluation.thresholds], method="cessl")  # fmt: skip
        save_adapter(model, Path(options.out), meta)
    return DemoReport(trainable, total, backbone_params, rank_map, importance, result, evaluation,
                      time.perf_counter() - start)  # fmt: skip


def render(report: DemoReport, options: DemoOptions, console: Console) -> None:
    """The demo's result as rich tables."""
    from rich.table import Table

    from ml.model.rank_allocation import default_r_low

    params = Table(title="Parameters")
    params.add_column("")
    params.add_column("count", justify="right")
    params.add_row("trainable (CE-SSL)", f"{report.trainable:,}")
    params.add_row("total (backbone + LoRA)", f"{report.total:,}")
    params.add_row("trainable / backbone", f"{100 * report.trainable / report.backbone_params:.1f}%")
    console.print(params)

    r_low = default_r_low(options.r)
    low = sum(v == r_low for v in report.rank_map.values())
    ranks = Table(title=f"Rank map (r={options.r}, r_low={r_low}, c={options.compress}): "
                        f"{low} of {len(report.rank_map)} matrices at r_low")  # fmt: skip
    ranks.add_column("layer")
    ranks.add_column("importance", justify="right")
    ranks.add_column("rank", justify="right")
    for name, rank in report.rank_map.items():
        ranks.add_row(name, f"{report.importance[name]:.3e}", str(rank))
    console.print(ranks)

    metrics = Table(title="Test metrics",
                    caption=f"best valid mAP {report.train.best_score:.3f} at step {report.train.best_step} "
                            f"of {report.train.steps}")  # fmt: skip
    metrics.add_column("metric")
    metrics.add_column("value", justify="right")
    for name, value in report.evaluation.metrics.items():
        metrics.add_row(name, f"{value:.4f}")
    console.print(metrics)
    console.print(_frame_table(report.evaluation.per_class, "Per class (test)"))
    console.print(f"demo finished in {report.seconds:.0f} s")


def _frame_table(frame: pd.DataFrame, title: str) -> Table:
    from rich.table import Table

    table = Table(title=title)
    for column in frame.columns:
        table.add_column(str(column), justify="left" if column == "class" else "right")
    for row in frame.itertuples(index=False):
        table.add_row(*(f"{v:.3f}" if isinstance(v, float) else str(v) for v in row))
    return table


def _command(args: argparse.Namespace) -> int:
    import torch
    from rich.console import Console

    if args.threads:
        torch.set_num_threads(args.threads)
    options = DemoOptions(
        backbone=args.backbone, classes=args.classes, steps=args.steps, batch_size=args.batch_size,
        val_every=min(args.val_every, args.steps), lr=args.lr, r=args.r, compress=args.compress, p=args.p,
        seed=args.seed, device=args.device, out=args.out, progress=not args.no_progress,
    )  # fmt: skip
    report = run_demo(options)
    render(report, options, Console())
    return 0


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    """Add ``cessl demo``."""
    defaults = DemoOptions()
    parser = subparsers.add_parser(
        "demo",
        help="run the CE-SSL core end to end on synthetic tensors (a couple of minutes on CPU)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--backbone", default=defaults.backbone, help="backbone size (default %(default)s)")
    parser.add_argument("--classes", type=int, default=defaults.classes, help="synthetic classes")
    parser.add_argument("--steps", type=int, default=defaults.steps, help="CE-SSL steps")
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size, help="labelled (= unlabelled) batch")
    parser.add_argument("--val-every", type=int, default=defaults.val_every, help="validate every N steps")
    parser.add_argument("--lr", type=float, default=defaults.lr, help="peak learning rate")
    parser.add_argument("-r", type=int, default=defaults.r, help="LoRA rank r")
    parser.add_argument("--compress", type=float, default=defaults.compress, help="rank allocation ratio c")
    parser.add_argument("-p", type=float, default=defaults.p, help="random deactivation probability")
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--device", default=defaults.device, help="auto | cpu | cuda")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch CPU threads (0: torch's default; 1 is faster on a busy machine)")
    parser.add_argument("--out", default=None, help="also save the adapter to this folder")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.set_defaults(func=_command)
