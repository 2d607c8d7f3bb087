"""Encoder memory layout: channels-last (what ``ECGTransformer.encode`` does) vs NCHW.

Times training steps of CE-SSL, FixMatch full fine-tuning and supervised full fine-tuning
with the encoder run both ways on the same models, interleaved (the layout order
alternates every round), and prints NHWC / NCHW as a ratio of total time per method.
This is the measurement behind running the encoder channels-last on every device.

    python bench/encoder_layout.py --config base medium --batch 64 --device cuda
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table
from torch import Tensor

from ml.model.backbone import BACKBONE_CONFIGS, ECGTransformer, backbone_config
from ml.train.config import resolve_device

sys.path.insert(0, str(Path(__file__).parent))
from common import add_run_options, device_name, setup
from train_step import NUM_CLASSES, Workload, rank_map_for, timed_step

log = logging.getLogger("bench.encoder_layout")
METHODS = ("cessl", "fixmatch", "full")
LAYOUTS = ("nhwc", "nchw")


def _encode_nchw(self: ECGTransformer, x: Tensor) -> Tensor:
    """The encoder blocks on a contiguous (NCHW) input: the layout before channels-last."""
    x = x.contiguous()
    for block in self.encoder_layers:
        x = block(x)
    return x


@contextmanager
def encoder_layout(layout: str) -> Iterator[None]:
    """Run ``ECGTransformer.encode`` in ``layout`` for the block (nhwc: the code as it is)."""
    original = ECGTransformer.encode
    if layout == "nchw":
        ECGTransformer.encode = _encode_nchw  # type: ignore[method-assign]  # the variant under test, restored below
    try:
        yield
    finally:
        ECGTransformer.encode = original  # type: ignore[method-assign]  # restore


def measure(config_name: str, batch: int, rounds: int, steps: int, device: torch.device) -> dict[str, dict]:
    """Per method: total ms of each layout over the interleaved rounds and NHWC / NCHW."""
    config = backbone_config(config_name, NUM_CLASSES)
    rank_map = rank_map_for(config, batch, device)
    works = {m: Workload(m, config, rank_map, batch, device) for m in METHODS}
    for layout in LAYOUTS:  # warm-up: kernels and allocator for both layouts
        with encoder_layout(layout):
            for method in METHODS:
                works[method].step()
    total = {(m, layout): 0.0 for m in METHODS for layout in LAYOUTS}
    for round_ in range(rounds):
        for layout in LAYOUTS if round_ % 2 == 0 else LAYOUTS[::-1]:
            with encoder_layout(layout):
                for method in METHODS:
                    total[method, layout] += sum(timed_step(works[method], device) for _ in range(steps))
        log.info("%s: round %d/%d done", config_name, round_ + 1, rounds)
    per_step = rounds * steps
    return {
        m: {
            "nhwc_ms": total[m, "nhwc"] / per_step,
            "nchw_ms": total[m, "nchw"] / per_step,
            "nhwc_over_nchw": total[m, "nhwc"] / total[m, "nchw"],
        }
        for m in METHODS
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", nargs="+", default=["tiny"], choices=sorted(BACKBONE_CONFIGS))
    parser.add_argument("--batch", type=int, default=16, help="labelled batch (= unlabelled batch)")
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--steps", type=int, default=4, help="timed steps per method, layout and round")
    add_run_options(parser)
    args = parser.parse_args(argv)
    setup(args)
    device = resolve_device(args.device)
    name = device_name(device)
    table = Table(title=f"Encoder layout, batch {args.batch}+{args.batch}, {name}")
    for column in ("config", "method", "NHWC ms/step", "NCHW ms/step", "NHWC / NCHW"):
        table.add_column(column, justify="left" if column in ("config", "method") else "right")
    figures = {}
    for config_name in args.config:
        figures[config_name] = measure(config_name, args.batch, args.rounds, args.steps, device)
        for method, f in figures[config_name].items():
            table.add_row(
                config_name, method, f"{f['nhwc_ms']:.1f}", f"{f['nchw_ms']:.1f}", f"{f['nhwc_over_nchw']:.3f}"
            )
        if device.type == "cuda":
            torch.cuda.empty_cache()
    Console(width=120).print(table)
    if args.json:
        Path(args.json).write_text(json.dumps({"device": name, "batch": args.batch, "figures": figures}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
