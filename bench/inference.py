"""Inference cost of a merged CE-SSL adapter vs the plain backbone (target: within 2%).

After fine-tuning, ``merge_lora`` folds every low-rank update into its frozen weight
(W <- W + (1 - p) B A), so the deployed model has exactly the backbone's shapes and
operations. This benchmark times eval-mode forward passes of:

- ``backbone``  the plain r = 0 model;
- ``merged``    the CE-SSL model (allocated ranks, non-zero LoRA tensors) after merge_lora;
- ``unmerged``  the same model before merging (for reference: W + (1 - p) B A every call);

interleaved (the order alternates every round); the ratio is paired (median over rounds of
the within-round ratio). It also checks that the merged logits equal the unmerged ones.

    python bench/inference.py --config tiny --batch 16 --rounds 40 --threads 1 --device cpu
"""

from __future__ import annotations

import argparse
import copy
import logging
import statistics
import sys
from collections.abc import Callable
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from ml.model.backbone import BACKBONE_CONFIGS, ECGTransformer, backbone_config
from ml.model.lora import LoRAConfig, lora_layers, merge_lora
from ml.train.build import build_model
from ml.train.config import resolve_device

sys.path.insert(0, str(Path(__file__).parent))
from common import (
    add_run_options,
    device_name,
    elapsed_s,
    interleaved_rounds,
    paired_ratio,
    publish,
    setup,
    stand_in_rank_map,
)

log = logging.getLogger("bench.inference")

NUM_CLASSES = 19
TARGET = 1.02  # merged / backbone


LORA = LoRAConfig()  # the paper's r and p


def build_models(config_name: str, device: torch.device) -> dict[str, torch.nn.Module]:
    config = backbone_config(config_name, NUM_CLASSES)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        backbone = ECGTransformer(config)
    state = backbone.state_dict()
    names = backbone.adapted_layer_names()
    adapted = build_model(state, config, "cessl", LORA, rank_map=stand_in_rank_map(names, LORA.r), seed=0)
    with torch.no_grad():  # stand-in for trained adapters: B = 0 would make the merge a no-op
        generator = torch.Generator().manual_seed(1)
        for layer in lora_layers(adapted).values():
            layer.lora_B.copy_(0.02 * torch.randn(layer.lora_B.shape, generator=generator))
    merged = copy.deepcopy(adapted)
    merge_lora(merged)
    models = {"backbone": backbone, "merged": merged, "unmerged": adapted}
    return {name: model.to(device).eval() for name, model in models.items()}


@torch.inference_mode()
def measure(args: argparse.Namespace) -> dict:
    device = resolve_device(args.device)
    models = build_models(args.config, device)
    x = torch.randn(args.batch, 12, 1, 6144, generator=torch.Generator().manual_seed(2)).to(device)
    max_diff = (models["merged"](x) - models["unmerged"](x)).abs().max().item()
    for model in models.values():  # warm-up
        model(x)

    def forward_ms(model: torch.nn.Module) -> Callable[[], float]:
        return lambda: 1e3 * elapsed_s(lambda: model(x), device)

    times = interleaved_rounds({name: forward_ms(model) for name, model in models.items()}, args.rounds)
    median = {name: statistics.median(values) for name, values in times.items()}

    def paired(name: str) -> float:
        return paired_ratio(times[name], times["backbone"])

    return {
        "config": args.config,
        "batch": args.batch,
        "rounds": args.rounds,
        "device": device_name(device),
        "median_ms": median,
        "ratio_merged_to_backbone": paired("merged"),
        "ratio_unmerged_to_backbone": paired("unmerged"),
        "max_abs_logit_diff_merged_vs_unmerged": max_diff,
    }


def report(summary: dict, console: Console) -> None:
    table = Table(
        title=f"Eval forward, {summary['config']}, batch {summary['batch']}, {summary['device']}, "
        f"median of {summary['rounds']}"
    )
    for column in ("model", "ms/batch", "x backbone"):
        table.add_column(column, justify="left" if column == "model" else "right")
    ratios = {
        "backbone": 1.0,
        "merged": summary["ratio_merged_to_backbone"],
        "unmerged": summary["ratio_unmerged_to_backbone"],
    }
    for name, value in summary["median_ms"].items():
        table.add_row(name, f"{value:.1f}", f"{ratios[name]:.3f}")
    console.print(table)
    ratio = summary["ratio_merged_to_backbone"]
    verdict = "[green]PASS[/]" if ratio <= TARGET else "[red]FAIL[/]"
    console.print(f"merged adapter within 2% of the backbone: {100 * (ratio - 1):+.1f}% {verdict}")
    console.print(f"max |logit| difference merged vs unmerged: {summary['max_abs_logit_diff_merged_vs_unmerged']:.2e}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="tiny", choices=sorted(BACKBONE_CONFIGS))
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=30, help="timed forward passes per model")
    add_run_options(parser)
    args = parser.parse_args(argv)
    setup(args)
    summary = measure(args)
    return publish(summary, args, report)


if __name__ == "__main__":
    sys.exit(main())
