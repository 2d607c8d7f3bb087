"""What the model benchmarks share: the device / threads / json options, logging, device naming,
the interleaved timing rounds, the stand-in rank allocation, one fine-tune scored on a test
split and the report."""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import torch
from rich.console import Console

from ml.model.rank_allocation import RankAllocationConfig, default_r_low

REPORT_WIDTH = 120


def add_run_options(parser: argparse.ArgumentParser) -> None:
    """--device, --threads, --json: where the benchmark runs and where its figures go."""
    parser.add_argument("--device", default="cpu", help="cpu | cuda | auto")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--json", default=None, help="also write the figures here")


def setup(args: argparse.Namespace, level: int = logging.INFO) -> None:
    """Logging to stderr and torch's CPU thread count, from the run options."""
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)-7s %(name)s: %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("ml.train.build").setLevel(logging.ERROR)  # "no pre-trained backbone" per model
    if args.threads:
        torch.set_num_threads(args.threads)


def device_name(device: torch.device) -> str:
    """The GPU's name, or the CPU with its torch thread count."""
    return torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"


def stand_in_rank_map(
    names: Sequence[str], r: int = 16, compress: float = RankAllocationConfig().compress
) -> dict[str, int]:
    """A fixed stand-in allocation (the pipeline's shape): the first floor((num_layers + 1) * c)
    matrices at r_low, the others at ``r``."""
    low = int((len(names) + 1) * compress)
    return {name: default_r_low(r) if i < low else r for i, name in enumerate(names)}


def interleaved_rounds(candidates: Mapping[str, Callable[[], float]], rounds: int) -> dict[str, list[float]]:
    """Each candidate's figure in each of ``rounds`` rounds: a round runs every candidate once,
    in reverse order every other round, so drift and warm caches favour none."""
    names = list(candidates)
    figures: dict[str, list[float]] = {name: [] for name in names}
    for round_ in range(rounds):
        for name in names if round_ % 2 == 0 else names[::-1]:
            figures[name].append(candidates[name]())
    return figures


def paired_ratio(figures: Sequence[float], baseline: Sequence[float]) -> float:
    """The median over rounds of the within-round ratio ``figures / baseline``."""
    return statistics.median(a / b for a, b in zip(figures, baseline, strict=True))


def elapsed_s(work: Callable[[], object], device: torch.device | None = None) -> float:
    """Seconds ``work`` takes (on a GPU: up to the end of its kernels)."""
    cuda = device is not None and device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    work()
    if cuda:
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def publish(summary: dict, args: argparse.Namespace, report: Callable[[dict, Console], None]) -> int:
    """The figures as tables on the console and, with ``--json``, as a file; exit code 0."""
    report(summary, Console(width=REPORT_WIDTH))
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2))
    return 0


def finetune_and_score(
    backbone_state: Mapping[str, torch.Tensor],
    config,
    lora,
    rank_map: Mapping[str, int],
    train,
    splits: Sequence,
) -> tuple:
    """``ml.train.recipe.finetune`` on ``splits`` (labelled, unlabelled, valid, test), timed, and
    its test metrics (``ml.eval.metrics.metric_values``, thresholds from valid):
    ``(outcome, seconds, metrics)``."""
    from ml.eval.evaluate import predict_with_labels
    from ml.eval.metrics import metric_values
    from ml.train.recipe import finetune

    labelled, unlabelled, valid, test = splits
    start = time.perf_counter()
    outcome = finetune(backbone_state, config, lora, rank_map, train, labelled, unlabelled, valid)
    seconds = time.perf_counter() - start
    probs, labels = predict_with_labels(outcome.model, test, train.eval_batch_size)
    return outcome, seconds, metric_values(labels, probs, outcome.thresholds)
