"""Time per training step, peak memory and stored parameters of CE-SSL vs its baselines.

All five methods are measured in ONE run on the same backbone size, batch and device,
interleaved (the order rotates every round) so that machine noise hits them alike:

- ``cessl``          CE-SSL: LoRA at allocated ranks (one-shot allocation, c = 0.6) with
                     random deactivation p = 0.2, semi-supervised BatchNorm step;
- ``cessl-no-deact`` the same with p = 0;
- ``lora``           plain LoRA, uniform r = 16, p = 0, supervised step;
- ``full``           full fine-tuning, supervised step;
- ``fixmatch``       FixMatch with full fine-tuning (labelled + weak + strong views).

A step is what the trainer does: augment, forward, backward, AdamW step. Labelled batch
B, unlabelled batch B. Peak memory: on CUDA the method's whole footprint, the peak of
``torch.cuda.max_memory_allocated`` over building the model and its steps with nothing else
on the device (weights, batches, gradients, AdamW state, activations: comparable with the
paper's peak GPU memory, less the CUDA context and the allocator's cache); on CPU the
peak-RSS growth during the steps of a fresh subprocess per method (VmHWM, reset before the
steps; tracemalloc does not see torch's allocations).
Every figure is also printed as a ratio to FixMatch full fine-tuning. Time ratios are ratios
of total time over the interleaved rounds (what a training run pays); the interleaving makes
slow drifts in machine load hit every method alike. The saving of random deactivation is
measured apart, over ``--pairs`` alternating single steps of CE-SSL with and without it, as
1 - (total time with) / (total time without). Not a median of per-step ratios: a layer's
saving comes in only the ~20% of steps that switch it off, so the per-step ratios are skewed
and their median misses most of the saving that a training run gets.

Mixed precision (``--precisions fp32 bf16``): CE-SSL, CE-SSL without deactivation and FixMatch
are measured in bf16 too (``<method>@bf16``: the trainer's autocast, float32 master weights,
TF32 for what autocast leaves in float32 on CUDA), interleaved with the fp32 ones; the table
shows each bf16 variant next to its fp32 twin (``x fp32``), and the deactivation saving is
measured in both precisions. The loader's share of a step: one step's two batches (B + B)
fetched from host memory and copied to the device by the trainer's loader
(:class:`ml.train.loaders.BatchIterator`, pinned and non-blocking on CUDA), timed alone and
as the extra time of steps fed by it over steps on resident batches (what overlapping the
loading with the compute does not hide).

    python bench/train_step.py --config tiny --batch 16 --steps 4 --rounds 6 --pairs 40 --threads 1 --device cpu
    python bench/train_step.py --config medium --batch 64 --device cuda --precisions fp32 bf16
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import re
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table
from torch.utils.data import TensorDataset

from ml.model.adapter import AdapterMeta, save_adapter
from ml.model.backbone import BACKBONE_CONFIGS, BackboneConfig, ECGTransformer, backbone_config
from ml.model.lora import LoRAConfig, count_parameters
from ml.model.rank_allocation import RankAllocationConfig, default_r_low
from ml.train.augment import make_generator
from ml.train.build import build_model
from ml.train.config import TrainConfig, resolve_device
from ml.train.loaders import BatchIterator
from ml.train.precision import Precision, resolve_precision
from ml.train.recipe import allocate_ranks_for
from ml.train.trainer import build_optimizer

sys.path.insert(0, str(Path(__file__).parent))
from common import add_run_options, device_name, setup

log = logging.getLogger("bench.train_step")

LORA = LoRAConfig()  # the paper's r and p
ALLOCATION = RankAllocationConfig()  # the paper's c
R = LORA.r
# benchmarked variant -> (training method of ml.train.methods, its LoRA settings)
VARIANTS: dict[str, tuple[str, LoRAConfig]] = {
    "cessl": ("cessl", LORA),
    "cessl-no-deact": ("cessl", replace(LORA, p=0.0)),
    "lora": ("lora", LORA),
    "full": ("full", LORA),
    "fixmatch": ("fixmatch", LORA),
}
METHODS: tuple[str, ...] = tuple(VARIANTS)
REFERENCE = "fixmatch"
# The variants also measured in bf16 (``<name>@bf16``) with --precisions fp32 bf16.
MIXED_VARIANTS: tuple[str, ...] = ("cessl", "cessl-no-deact", "fixmatch")
MIXED = "bf16"


def variant_name(method: str, precision: str) -> str:
    """``cessl`` (fp32) or ``cessl@bf16``."""
    return method if precision == "fp32" else f"{method}@{precision}"


def split_variant(name: str) -> tuple[str, str]:
    """``cessl@bf16`` -> (``cessl``, ``bf16``); ``cessl`` -> (``cessl``, ``fp32``)."""
    method, _, precision = name.partition("@")
    return method, precision or "fp32"


def variants_for(precisions: list[str]) -> tuple[str, ...]:
    """Every fp32 variant, then the mixed-precision twins of :data:`MIXED_VARIANTS`."""
    names = list(METHODS) if "fp32" in precisions else []
    names += [variant_name(m, p) for p in precisions if p != "fp32" for m in MIXED_VARIANTS]
    return tuple(names)


NUM_CLASSES = 19  # the reference parameter counts use 19 classes

# Targets of the issue: (description, check over the results).
TARGETS = (
    "CE-SSL step <= 0.5 x FixMatch full fine-tuning",
    "random deactivation saves >= 5% of the CE-SSL step",
    "CE-SSL trainable parameters <= 5% of the backbone",
    "LoRA r=16 trainable <= 5% of the medium backbone (upper bound of CE-SSL's)",
)


@dataclass
class Measurement:
    method: str
    round_ms: list[float]  # mean step time of every interleaved round
    min_ms: float  # fastest single step
    peak_mb: float
    trainable: int
    total: int
    stored_bytes: int  # adapter safetensors (full model for full fine-tuning)

    @property
    def step_ms(self) -> float:
        """Median over rounds of the round's mean step time."""
        return statistics.median(self.round_ms)

    def ratio_to(self, other: Measurement) -> float:
        """Total time over the interleaved rounds, this method / the other one."""
        if len(self.round_ms) != len(other.round_ms):
            raise ValueError(f"{self.method} and {other.method} were timed over different rounds")
        return sum(self.round_ms) / sum(other.round_ms)


class Workload:
    """One variant's model, optimiser, batches and step function (the trainer's, from the method registry)."""

    def __init__(
        self,
        method: str,
        config: BackboneConfig,
        rank_map: dict[str, int],
        batch: int,
        device: torch.device,
        seed: int = 0,
    ) -> None:
        self.method = method
        base, precision = split_variant(method)
        self.precision: Precision = resolve_precision(precision, device)
        train_method, lora = VARIANTS[base]
        self.train_config = TrainConfig(method=train_method, seed=seed, precision=precision)
        self.training_method = self.train_config.training_method
        self.model = build_model(None, config, train_method, lora, rank_map, seed=seed).to(device).train()
        self.optimizer, _ = build_optimizer(self.model, self.train_config)
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(batch, config.n_leads, 1, config.seq_len, generator=g).to(device)
        self.y = (torch.rand(batch, config.num_classes, generator=g) < 0.2).float().to(device)
        u = torch.randn(batch, config.n_leads, 1, config.seq_len, generator=g).to(device)
        self.u = u if self.training_method.reads_unlabelled else None
        self.generator = make_generator(seed, device)

    def loss(self, x: torch.Tensor | None = None, y: torch.Tensor | None = None, u: torch.Tensor | None = None):
        """The method's loss on the resident batches (or on ``x``, ``y``, ``u``), in the variant's precision."""
        step = self.training_method.step
        x, y = (self.x, self.y) if x is None or y is None else (x, y)
        u = self.u if u is None or not self.training_method.reads_unlabelled else u
        with self.precision.autocast():
            return step(self.model, x, y, u, self.generator, self.train_config).loss

    def step(self, x: torch.Tensor | None = None, y: torch.Tensor | None = None, u: torch.Tensor | None = None):
        loss = self.loss(x, y, u)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_step(work: Workload, device: torch.device) -> float:
    _sync(device)
    start = time.perf_counter()
    work.step()
    _sync(device)
    return (time.perf_counter() - start) * 1e3


def rank_map_for(config: BackboneConfig, batch: int, device: torch.device) -> dict[str, int]:
    """A real one-shot allocation (the recipe's: Taylor, the paper's c) over two random labelled batches."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2 * batch, config.n_leads, 1, config.seq_len, generator=g)
    y = (torch.rand(2 * batch, config.num_classes, generator=g) < 0.2).float()
    allocated = allocate_ranks_for(
        "cessl", None, config, LORA, ALLOCATION, TensorDataset(x, y), batch, seed=1, device=str(device)
    )
    return allocated.rank_map


def stored_bytes(work: Workload) -> int:
    """Size of what a fine-tuning run stores: the adapter, or the whole model for full FT."""
    from safetensors.torch import save_file

    with tempfile.TemporaryDirectory() as tmp:
        model = work.model
        if not work.training_method.uses_adapters:
            path = Path(tmp) / "model.safetensors"
            save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, str(path))
            return path.stat().st_size
        classes = [str(k) for k in range(model.config.num_classes)]
        meta = AdapterMeta(
            backbone_id="bench", classes=classes, thresholds=[0.5] * len(classes), method=work.training_method.name
        )
        save_adapter(model, tmp, meta)
        return (Path(tmp) / "adapter_model.safetensors").stat().st_size


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        return int(re.search(rf"{field}:\s+(\d+) kB", f.read()).group(1))


def _reset_peak_rss() -> None:
    """Reset the kernel's peak-RSS mark (VmHWM) of this process (Linux >= 4.0)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def probe_memory(method: str, args: argparse.Namespace, rank_map: dict[str, int]) -> float:
    """Peak memory growth (MB) over ``args.steps`` steps of ``method`` in this process.

    CUDA: max_memory_allocated from before the model is built (nothing else may be alive
    on the device) to after the steps. CPU: the peak RSS (VmHWM, reset just before the
    steps) minus the RSS before the steps - run in a fresh process so that no other
    method's freed-but-cached memory is reused.
    """
    device = resolve_device(args.device)
    config = backbone_config(args.config, NUM_CLASSES)
    if device.type == "cuda":
        gc.collect()
        torch.cuda.empty_cache()
        if held := torch.cuda.memory_allocated(device):  # e.g. cuBLAS workspaces, kept by the process
            log.info("%.0f MB allocated before the %s probe (counted in its peak)", held / 2**20, method)
        torch.cuda.reset_peak_memory_stats(device)
        work = Workload(method, config, rank_map, args.batch, device)
        for _ in range(args.steps):
            work.step()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) / 2**20
    work = Workload(method, config, rank_map, args.batch, device)
    gc.collect()
    _reset_peak_rss()
    base = _status_kb("VmRSS")
    for _ in range(args.steps):
        work.step()
    return (_status_kb("VmHWM") - base) / 1024


def memory_in_subprocess(method: str, args: argparse.Namespace, rank_map: dict[str, int]) -> float:
    """Run :func:`probe_memory` in a fresh interpreter (its own peak-RSS high-water mark)."""
    cmd = [
        sys.executable,
        __file__,
        "--probe-memory",
        method,
        "--config",
        args.config,
        "--batch",
        str(args.batch),
        "--steps",
        str(args.steps),
        "--device",
        args.device,
        "--threads",
        str(args.threads),
        "--rank-map",
        json.dumps(rank_map),
    ]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return float(json.loads(out.strip().splitlines()[-1])["peak_mb"])


def deactivation_pairs(
    works: dict[str, Workload], pairs: int, device: torch.device, precision: str = "fp32"
) -> list[tuple[float, float]]:
    """(CE-SSL ms, CE-SSL without deactivation ms) of ``pairs`` single steps, alternating."""
    on, off = variant_name("cessl", precision), variant_name("cessl-no-deact", precision)
    times = []
    for i in range(pairs):
        order = (on, off) if i % 2 == 0 else (off, on)
        ms = {method: timed_step(works[method], device) for method in order}
        times.append((ms[on], ms[off]))
    return times


def loader_figures(work: Workload, config: BackboneConfig, batch: int, steps: int, device: torch.device) -> dict:
    """The loader's share of ``work``'s step (see the module doc), in milliseconds per step.

    ``loader_ms``: fetching and copying one step's two batches alone; ``fed_ms``: a step
    that takes its batches from the loader (no synchronisation between steps, as in the
    trainer); ``resident_ms``: a step on batches already on the device; ``loader_share``:
    ``(fed - resident) / fed``, the part of a fed step that loading adds.
    """
    from torch.utils.data import TensorDataset

    g = torch.Generator().manual_seed(3)
    n = 4 * batch
    data = TensorDataset(
        torch.randn(n, config.n_leads, 1, config.seq_len, generator=g),
        (torch.rand(n, config.num_classes, generator=g) < 0.2).float(),
    )
    labelled, unlabelled = BatchIterator(data, batch, 1, device), BatchIterator(data, batch, 2, device)

    def run(fn) -> float:
        _sync(device)
        start = time.perf_counter()
        for _ in range(steps):
            fn()
        _sync(device)
        return (time.perf_counter() - start) * 1e3 / steps

    def fed() -> None:
        x, y = next(labelled)
        work.step(x, y, next(unlabelled)[0])

    run(lambda: (next(labelled), next(unlabelled)))  # warm-up: pinned-memory pool, first copies
    loader_ms = run(lambda: (next(labelled), next(unlabelled)))
    fed_ms, resident_ms = run(fed), run(work.step)
    return {
        "variant": work.method,
        "loader_ms": loader_ms,
        "fed_ms": fed_ms,
        "resident_ms": resident_ms,
        "loader_share": max(0.0, (fed_ms - resident_ms) / fed_ms),
    }


def deactivation_saving(pair_times: list[tuple[float, float]]) -> float:
    """1 - (total CE-SSL time) / (total time without deactivation) over the alternating pairs."""
    return 1 - sum(t for t, _ in pair_times) / sum(t for _, t in pair_times)


@dataclass
class Extras:
    """What ``measure`` finds besides the per-variant figures."""

    pair_times: dict[str, list[tuple[float, float]]]  # precision -> deactivation pairs
    loader: list[dict]


def measure(args: argparse.Namespace) -> tuple[list[Measurement], dict[str, int], int, Extras]:
    device = resolve_device(args.device)
    config = backbone_config(args.config, NUM_CLASSES)
    rank_map = rank_map_for(config, args.batch, device)
    backbone_params = count_parameters(ECGTransformer(config))[1]
    variants = variants_for(args.precisions)
    works = {m: Workload(m, config, rank_map, args.batch, device) for m in variants}
    for _ in range(args.warmup):  # allocator, AdamW state, kernels, GPU clocks
        for method in variants:
            works[method].step()
    times: dict[str, list[list[float]]] = {m: [] for m in variants}
    for round_ in range(args.rounds):
        order = variants[round_ % len(variants) :] + variants[: round_ % len(variants)]
        for method in order:
            times[method].append([timed_step(works[method], device) for _ in range(args.steps)])
        log.info("round %d/%d done", round_ + 1, args.rounds)
    pair_times = {p: deactivation_pairs(works, args.pairs, device, p) for p in args.precisions}
    loader = [
        loader_figures(works[variant_name("cessl", p)], config, args.batch, max(args.steps, 2), device)
        for p in args.precisions
    ]
    sizes = {m: (count_parameters(w.model), stored_bytes(w)) for m, w in works.items()}
    works.clear()  # free every model before the memory probes (which collect and empty the cache)
    results = []
    for method in variants:
        peak = (
            probe_memory(method, args, rank_map)
            if device.type == "cuda"
            else memory_in_subprocess(method, args, rank_map)
        )
        (trainable, total), stored = sizes[method]
        round_ms = [statistics.fmean(steps) for steps in times[method]]
        fastest = min(min(steps) for steps in times[method])
        results.append(Measurement(method, round_ms, fastest, peak, trainable, total, stored))
    return results, rank_map, backbone_params, Extras(pair_times, loader)


TABLE_RANKS = (R, 4)  # the paper's two rank settings


def parameter_table(num_classes: int = NUM_CLASSES) -> list[tuple[str, int, dict[int, int]]]:
    """(config, backbone parameters, {r: LoRA trainable parameters at uniform r}) per size.

    Built on the meta device: no memory, no time. CE-SSL after allocation trains fewer
    (the low-ranked matrices get r_low = (r // 4) * 2), so each is its upper bound.
    """
    rows = []
    for name in BACKBONE_CONFIGS:
        config = backbone_config(name, num_classes)
        with torch.device("meta"):
            backbone = count_parameters(ECGTransformer(config))[1]
            lora = {r: count_parameters(build_model(None, config, "lora", LoRAConfig(r=r)))[0] for r in TABLE_RANKS}
        rows.append((name, backbone, lora))
    return rows


MIXED_TARGETS = (
    "bf16 CE-SSL step <= 0.35 x fp32 FixMatch full fine-tuning",
    "bf16 CE-SSL step <= 0.5 x fp32 CE-SSL step",
    "bf16 CE-SSL peak memory <= 4 GB (the issue's target at medium on CUDA)",
    "random deactivation saves >= 5% of the bf16 CE-SSL step",
)


def verdicts(
    results: dict[str, Measurement], backbone_params: int, pair_times: dict[str, list[tuple[float, float]]]
) -> list[tuple[str, str, bool]]:
    out: list[tuple[str, str, bool]] = []
    if "cessl" in results:
        ce, ref = results["cessl"], results[REFERENCE]
        time_ratio = ce.ratio_to(ref)
        saving = deactivation_saving(pair_times["fp32"])
        share = ce.trainable / backbone_params
        medium = next(row for row in parameter_table() if row[0] == "medium")
        out += [
            (TARGETS[0], f"{time_ratio:.3f}x", time_ratio <= 0.5),
            (TARGETS[1], f"{100 * saving:.1f}%", saving >= 0.05),
            (TARGETS[2], f"{100 * share:.1f}%", share <= 0.05),
            (TARGETS[3], f"{100 * medium[2][R] / medium[1]:.1f}%", medium[2][R] / medium[1] <= 0.05),
        ]
    mixed = variant_name("cessl", MIXED)
    if mixed in results and "cessl" in results:
        bf, ref, ce = results[mixed], results[REFERENCE], results["cessl"]
        saving = deactivation_saving(pair_times[MIXED])
        out += [
            (MIXED_TARGETS[0], f"{bf.ratio_to(ref):.3f}x", bf.ratio_to(ref) <= 0.35),
            (MIXED_TARGETS[1], f"{bf.ratio_to(ce):.3f}x", bf.ratio_to(ce) <= 0.5),
            (MIXED_TARGETS[2], f"{bf.peak_mb:.0f} MB", bf.peak_mb <= 4096),
            (MIXED_TARGETS[3], f"{100 * saving:.1f}%", saving >= 0.05),
        ]
    return out


def report(
    results: list[Measurement],
    rank_map: dict[str, int],
    backbone_params: int,
    extras: Extras,
    args: argparse.Namespace,
    console: Console,
) -> dict:
    by_method = {r.method: r for r in results}
    ref = by_method.get(REFERENCE) or results[0]
    device = resolve_device(args.device)
    name = device_name(device)
    table = Table(title=f"Training step, {args.config}, batch {args.batch}+{args.batch}, {name}")
    for column in (
        "method",
        "ms/step",
        "min ms",
        "x FixMatch",
        "peak MB",
        "x FixMatch",
        "trainable",
        "% backbone",
        "stored KB",
        "x FixMatch",
        "x fp32",
    ):
        table.add_column(column, justify="left" if column == "method" else "right")

    def x_fp32(r: Measurement) -> str:  # a bf16 variant's time over its fp32 twin's
        twin = by_method.get(split_variant(r.method)[0])
        return f"{r.ratio_to(twin):.3f}" if twin is not None and twin is not r else ""

    for r in results:
        table.add_row(
            r.method,
            f"{r.step_ms:.0f}",
            f"{r.min_ms:.0f}",
            f"{r.ratio_to(ref):.3f}",
            f"{r.peak_mb:.0f}",
            f"{r.peak_mb / ref.peak_mb:.2f}",
            f"{r.trainable:,}",
            f"{100 * r.trainable / backbone_params:.1f}",
            f"{r.stored_bytes / 1024:.0f}",
            f"{r.stored_bytes / ref.stored_bytes:.3f}",
            x_fp32(r),
        )
    console.print(table)
    loading = Table(title="The loader's share of a step (B + B records from host memory to the device)")
    for column in ("variant", "loader ms", "step fed ms", "step resident ms", "loader share"):
        loading.add_column(column, justify="left" if column == "variant" else "right")
    for row in extras.loader:
        loading.add_row(
            row["variant"],
            f"{row['loader_ms']:.1f}",
            f"{row['fed_ms']:.1f}",
            f"{row['resident_ms']:.1f}",
            f"{100 * row['loader_share']:.1f}%",
        )
    console.print(loading)
    low = sum(v < R for v in rank_map.values())
    console.print(f"rank map: {low} of {len(rank_map)} matrices at r_low = {default_r_low(R)}, the rest at r = {R}")
    checks = Table(title="Targets")
    for column in ("target", "measured", "result"):
        checks.add_column(column)
    outcome = verdicts(by_method, backbone_params, extras.pair_times)
    for target, value, ok in outcome:
        checks.add_row(target, value, "[green]PASS[/]" if ok else "[red]FAIL[/]")
    console.print(checks)
    sizes = Table(title=f"Trainable parameters by backbone size (uniform LoRA rank, {NUM_CLASSES} classes)")
    for column in ("config", "backbone", *(c for r in TABLE_RANKS for c in (f"r = {r}", "% backbone"))):
        sizes.add_column(column, justify="left" if column == "config" else "right")
    for config_name, backbone, lora in parameter_table():
        cells = (c for r in TABLE_RANKS for c in (f"{lora[r]:,}", f"{100 * lora[r] / backbone:.1f}"))
        sizes.add_row(config_name, f"{backbone:,}", *cells)
    console.print(sizes)
    return {
        "config": args.config,
        "batch": args.batch,
        "device": name,
        "steps": args.steps,
        "rounds": args.rounds,
        "backbone_params": backbone_params,
        "rank_map": rank_map,
        "precisions": list(args.precisions),
        "results": [
            asdict(r) | {"step_ms": r.step_ms, "x_fixmatch": r.ratio_to(ref), "precision": split_variant(r.method)[1]}
            for r in results
        ],
        "deactivation_pair_ms": extras.pair_times.get("fp32", []),
        "deactivation_pair_ms_by_precision": extras.pair_times,
        "loader": extras.loader,
        "targets": [{"target": t, "measured": v, "pass": ok} for t, v, ok in outcome],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="tiny", choices=sorted(BACKBONE_CONFIGS))
    parser.add_argument("--batch", type=int, default=16, help="labelled batch (= unlabelled batch)")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per method and round")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per method before timing")
    parser.add_argument(
        "--pairs",
        type=int,
        default=12,
        help="alternating CE-SSL / no-deactivation step pairs for the deactivation saving",
    )
    parser.add_argument(
        "--precisions",
        nargs="+",
        default=["fp32"],
        choices=["fp32", MIXED],
        help="fp32: every method; bf16: also CE-SSL, CE-SSL without deactivation and FixMatch in bf16",
    )
    add_run_options(parser)
    parser.add_argument("--probe-memory", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--rank-map", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    setup(args, logging.WARNING if args.probe_memory else logging.INFO)
    if args.probe_memory:
        peak = probe_memory(args.probe_memory, args, json.loads(args.rank_map))
        sys.stdout.write(json.dumps({"peak_mb": peak}) + "\n")
        return 0
    results, rank_map, backbone_params, extras = measure(args)
    summary = report(results, rank_map, backbone_params, extras, args, Console(width=180))
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
