"""`cessl method-demo`: the CE-SSL core end to end on synthetic tensors, in a couple of minutes on CPU.

What it runs (all three parts of the method, nothing of the pipeline around them; ``make
demo`` / ``cessl run`` is the whole pipeline):

1. a small synthetic multi-label task on (N, 12, 1, 6144) tensors
   (:mod:`ml.train.synthetic`): labelled train / valid / test splits and an unlabelled pool;
2. a backbone - randomly initialised, standing in for a pre-trained one (the log says so);
3. one-shot rank allocation (Taylor importance, one shuffled pass over the labelled train
   split with the training batch size);
4. CE-SSL fine-tuning: LoRA at the allocated ranks with random deactivation and the
   semi-supervised BatchNorm step (:func:`ml.train.steps.semi_supervised_step`);
5. evaluation on the test split with thresholds fitted on the validation split.

Steps 3-5 are the shared recipe of :mod:`ml.train.recipe`, as in the pipeline. It prints the
trainable/total parameter counts, the rank map and the test metrics.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

# torch, scikit-learn and the ml/ stack load only when the demo runs: every `cessl`
# command builds this parser, and none of the others should pay for them at start-up.
if TYPE_CHECKING:
    import pandas as pd
    from rich.console import Console
    from rich.table import Table

    from ml.eval.evaluate import EvaluationReport
    from ml.model.lora import LoRAConfig
    from ml.model.rank_allocation import RankAllocationConfig
    from ml.train.trainer import TrainResult

log = logging.getLogger(__name__)

METHOD = "cessl"


def _default_lora() -> LoRAConfig:
    from ml.model.lora import LoRAConfig

    return LoRAConfig()


def _default_allocation() -> RankAllocationConfig:
    from ml.model.rank_allocation import RankAllocationConfig

    return RankAllocationConfig()


@dataclass(frozen=True)
class DemoOptions:
    """Sizes of the demo; the defaults finish in a couple of minutes on two CPU cores.

    The method's own settings (r, p, c) are the paper's, from ``LoRAConfig`` and
    ``RankAllocationConfig``.
    """

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
    warmup_frac: float = 0.05
    lora: LoRAConfig = field(default_factory=_default_lora)
    allocation: RankAllocationConfig = field(default_factory=_default_allocation)
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


def _random_backbone(name: str, classes: int, seed: int) -> tuple[dict, int]:
    """A randomly initialised backbone's state dict and parameter count."""
    import torch

    from ml.model.backbone import ECGTransformer, backbone_config
    from ml.model.lora import count_parameters

    log.warning("backbone %s is RANDOMLY INITIALISED: it stands in for a pre-trained checkpoint", name)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        backbone = ECGTransformer(backbone_config(name, classes))
    return backbone.state_dict(), count_parameters(backbone)[1]


def _train_config(options: DemoOptions):
    from ml.train.config import TrainConfig

    return TrainConfig(
        method=METHOD,
        lr=options.lr,
        max_steps=options.steps,
        batch_size=options.batch_size,
        val_every=min(options.val_every, options.steps),
        warmup_frac=options.warmup_frac,
        seed=options.seed,
        device=options.device,
        progress=options.progress,
    )


def run_demo(options: DemoOptions) -> DemoReport:
    """Synthetic data -> random stand-in backbone -> rank allocation -> CE-SSL -> test metrics."""
    from ml.eval.evaluate import evaluate
    from ml.model.backbone import backbone_config
    from ml.train.recipe import allocate_ranks_for, finetune
    from ml.train.synthetic import SyntheticTaskConfig, make_splits

    start = time.perf_counter()
    sizes = {"train": options.train, "valid": options.valid, "test": options.test, "unlabelled": options.unlabelled}
    log.info("synthetic task: %d classes, splits %s", options.classes, sizes)
    task, data = make_splits(sizes, SyntheticTaskConfig(num_classes=options.classes), seed=options.seed)
    config = backbone_config(options.backbone, options.classes)
    backbone_state, backbone_params = _random_backbone(options.backbone, options.classes, options.seed)

    allocated = allocate_ranks_for(
        METHOD,
        backbone_state,
        config,
        options.lora,
        options.allocation,
        data["train"],
        options.batch_size,
        options.seed,
    )
    train_config = _train_config(options)
    outcome = finetune(
        backbone_state,
        config,
        options.lora,
        allocated.rank_map,
        train_config,
        data["train"],
        data["unlabelled"],
        data["valid"],
    )
    evaluation = evaluate(outcome.model, data["test"], thresholds=outcome.thresholds, classes=task.classes)
    if options.out:
        _save(outcome.model, task.classes, evaluation.thresholds, Path(options.out))
    return DemoReport(
        outcome.trainable,
        outcome.total,
        backbone_params,
        allocated.rank_map,
        allocated.importance,
        outcome.result,
        evaluation,
        time.perf_counter() - start,
    )


def _save(model, classes: list[str], thresholds, out: Path) -> None:
    from ml.model.adapter import AdapterMeta, save_adapter

    model.cpu()
    meta = AdapterMeta(
        backbone_id="demo-random-init", classes=classes, thresholds=[float(t) for t in thresholds], method=METHOD
    )
    save_adapter(model, out, meta)


def render(report: DemoReport, options: DemoOptions, console: Console) -> None:
    """The demo's result as rich tables."""
    from rich.table import Table

    from ml.eval.metrics import MACRO_CONVENTION
    from ml.model.rank_allocation import default_r_low

    params = Table(title="Parameters")
    params.add_column("")
    params.add_column("count", justify="right")
    params.add_row("trainable (CE-SSL)", f"{report.trainable:,}")
    params.add_row("total (backbone + LoRA)", f"{report.total:,}")
    params.add_row("trainable / backbone", f"{100 * report.trainable / report.backbone_params:.1f}%")
    console.print(params)

    r, allocation = options.lora.r, options.allocation
    r_low = default_r_low(r) if allocation.r_low is None else allocation.r_low
    low = sum(v == r_low for v in report.rank_map.values())
    title = f"Rank map (r={r}, r_low={r_low}, c={allocation.compress}): {low} of {len(report.rank_map)} at r_low"
    ranks = Table(title=title)
    ranks.add_column("layer")
    ranks.add_column("importance", justify="right")
    ranks.add_column("rank", justify="right")
    for name, rank in report.rank_map.items():
        ranks.add_row(name, f"{report.importance[name]:.3e}", str(rank))
    console.print(ranks)

    train = report.train
    caption = f"best valid mAP {train.best_score:.3f} at step {train.best_step} of {train.steps}; {MACRO_CONVENTION}"
    metrics = Table(title="Test metrics", caption=caption)
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


def _given(**values: Any) -> dict[str, Any]:
    """The options given on the command line (None: the dataclass's default)."""
    return {k: v for k, v in values.items() if v is not None}


def options_from_args(args: argparse.Namespace) -> DemoOptions:
    """:class:`DemoOptions` from the parsed flags; -r, -p and --compress default to the ml/ configs'."""
    from ml.model.lora import LoRAConfig
    from ml.model.rank_allocation import RankAllocationConfig

    return DemoOptions(
        backbone=args.backbone,
        classes=args.classes,
        steps=args.steps,
        batch_size=args.batch_size,
        val_every=args.val_every,
        lr=args.lr,
        lora=LoRAConfig(**_given(r=args.r, p=args.p)),
        allocation=RankAllocationConfig(**_given(compress=args.compress)),
        seed=args.seed,
        device=args.device,
        out=args.out,
        progress=not args.no_progress,
    )


def _command(args: argparse.Namespace) -> int:
    import torch
    from rich.console import Console

    if args.threads:
        torch.set_num_threads(args.threads)
    options = options_from_args(args)
    report = run_demo(options)
    render(report, options, Console())
    return 0


def _plain_defaults() -> argparse.Namespace:
    """:class:`DemoOptions`' plain defaults, without building the ml/ configs (torch loads only when the demo runs)."""
    return argparse.Namespace(
        **{f.name: f.default for f in dataclasses.fields(DemoOptions) if f.default is not dataclasses.MISSING}
    )


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    """Add ``cessl method-demo``."""
    from pipeline.cli.backbone import SIZES
    from pipeline.core.constraints import non_negative_int, positive_int
    from pipeline.core.params import flag_type

    defaults = _plain_defaults()
    parser = subparsers.add_parser(
        "method-demo",
        help="run the CE-SSL core end to end on synthetic tensors (a couple of minutes on CPU)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--backbone", choices=SIZES, default=defaults.backbone, help="backbone size (default %(default)s)"
    )
    parser.add_argument("--classes", type=positive_int, default=defaults.classes, help="synthetic classes")
    parser.add_argument("--steps", type=positive_int, default=defaults.steps, help="CE-SSL steps")
    parser.add_argument(
        "--batch-size", type=positive_int, default=defaults.batch_size, help="labelled (= unlabelled) batch"
    )
    parser.add_argument(
        "--val-every", type=flag_type("val_every"), default=defaults.val_every, help="validate every N steps"
    )
    parser.add_argument("--lr", type=flag_type("lr"), default=defaults.lr, help="peak learning rate")
    parser.add_argument(
        "-r", type=flag_type("r"), default=None, help="LoRA rank r (default: LoRAConfig's, the paper's)"
    )
    parser.add_argument(
        "--compress",
        type=flag_type("compress"),
        default=None,
        help="rank allocation ratio c (default: RankAllocationConfig's, the paper's)",
    )
    parser.add_argument(
        "-p",
        type=flag_type("p"),
        default=None,
        help="random deactivation probability (default: LoRAConfig's, the paper's)",
    )
    parser.add_argument("--seed", type=flag_type("seed"), default=defaults.seed)
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default=defaults.device, help="auto | cpu | cuda")
    parser.add_argument(
        "--threads",
        type=non_negative_int,
        default=0,
        help="torch CPU threads (0: torch's default; 1 is faster on a busy machine)",
    )
    parser.add_argument("--out", default=None, help="also save the adapter to this folder")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.set_defaults(func=_command)
