"""Serving a hospital network from one process: memory, throughput, switch cost (``cessl serve``'s core).

Builds one backbone and ``--sites`` site adapters (the pipeline's rank allocation shape:
r = 16, the least important 60% of the matrices at r_low = 8; random non-zero LoRA tensors,
BatchNorm statistics, biases and heads per site, as training would leave them), written
as adapter folders, then measures side by side, in one run:

- memory: the resident set (VmRSS) of a fresh process holding the backbone and 1 adapter,
  the backbone and all the adapters (``SharedBackbone`` + ``AdapterLRU``, what ``cessl serve``
  holds), and one merged full model per site (what serving each site's own model needs),
  each after answering one request per site; and the bytes of the tensors themselves;
- throughput: requests of ``--batch`` preprocessed records, all to one site vs spread
  round-robin over every site (each request switches the adapter), interleaved rounds;
- adapter switch cost: ``SharedBackbone.activate`` between different sites, p50 / p99;
- batched prediction: records/s of ``--big-batch`` records in one call, preprocessing
  included (raw 10 s at 500 Hz -> the model's input) and the forward alone;
- mixed batches (``cessl serve``'s batching of concurrent requests): a batch of
  ``--mixed-batch`` records interleaved over 1, 5 and 20 sites (``--mixed-sites``), answered
  by one multi-site pass (:class:`ml.model.multi_site.MultiSiteModel`), by each site's own
  merged model (records grouped by site) and by switching the adapter per site group:
  records/s and p50 / p99 batch latency, side by side (interleaved rounds), and the memory
  of the server holding the multi-site stacks too.

    python bench/serve.py --config tiny --sites 20 --threads 1 --device cpu
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).parent))
sys.path.append(str(Path(__file__).resolve().parents[1] / "tests"))  # serving_support: the tiny model folders
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
from serving_support import random_backbone, site_adapter

from ml.eval.predictor import Predictor, load_predictor, preprocess_signal
from ml.model.adapter_bank import AdapterLRU, SharedBackbone, read_site_adapter
from ml.model.backbone import BACKBONE_CONFIGS, ECGTransformer, backbone_config
from ml.model.lora import LoRAConfig, merge_lora
from ml.model.multi_site import MultiSiteModel
from ml.model.pretrained import CODE15_CLASSES, read_backbone

log = logging.getLogger("bench.serve")

CLASSES = ["164889003", "270492004", "59118001", "426783006", "164934002", "713426002", "427084000", "426177001"]
MEMORY_TARGET = 1.3  # RSS with every site's adapter / RSS with one
THROUGHPUT_TARGET = 0.8  # spread over the sites / one site


def build_network(root: Path, config_name: str, n_sites: int) -> tuple[Path, list[Path]]:
    """A backbone folder and ``n_sites`` adapter folders (distinct tensors per site)."""
    backbone_dir, state = random_backbone(root, config_name, seed=0)
    names = ECGTransformer(backbone_config(config_name, len(CODE15_CLASSES))).adapted_layer_names()
    lora = LoRAConfig(r=16, rank_map=stand_in_rank_map(names))
    adapters = [
        # sites differ in their class lists too
        site_adapter(
            root / f"site-{site:02d}",
            state,
            config_name,
            CLASSES[: 4 + site % 5],
            lora,
            seed=100 + site,
            weight_noise=0.02,
            bn_noise=0.05,
        )
        for site in range(n_sites)
    ]
    return backbone_dir, adapters


def _rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _inputs(n: int, seed: int = 0) -> np.ndarray:
    """``n`` preprocessed records (from raw 10 s at 500 Hz)."""
    raw = np.random.default_rng(seed).normal(0, 0.3, size=(n, 12, 5000))
    return np.stack([preprocess_signal(r, 500.0) for r in raw])


# --------------------------------------------------------------------------- memory (child processes)


def memory_child(root: Path, scenario: str, n_sites: int) -> dict:
    """Run in a fresh process: hold ``scenario``'s models, answer one request per site, report RSS."""
    backbone_dir = root / "backbone"
    adapters = [root / f"site-{i:02d}" for i in range(n_sites)]
    x = _inputs(2)
    torch.set_num_threads(1)
    baseline = _rss_mb()  # interpreter + torch + numpy, nothing of the models
    tensor_bytes = 0
    if scenario in ("bank-1", "bank-all", "multi-all"):
        bb = read_backbone(backbone_dir)
        shared = SharedBackbone(bb.state, bb.config, bb.identity)
        del bb
        lru = AdapterLRU(capacity=max(n_sites, 1))
        chosen = adapters[:1] if scenario == "bank-1" else adapters
        for path in chosen:
            adapter = lru.get(path.name, lambda p=path: read_site_adapter(p, p.name))
            shared.activate(adapter)
            Predictor(shared.model, adapter.classes, np.asarray(adapter.thresholds), adapter.backbone_id).predict_proba(
                x
            )
        tensor_bytes = shared.nbytes + lru.nbytes
        if scenario == "multi-all":  # what cessl serve holds: the adapters and their one-pass stacks
            multi = MultiSiteModel(shared.base, shared.config, lru.values())
            with torch.inference_mode():  # requests of 2 records as in the other rows, each of 2 sites
                for i in range(n_sites):
                    multi(torch.from_numpy(x[:, :, None, :]), torch.tensor([i, (i + 1) % n_sites]))
            tensor_bytes += multi.nbytes
    elif scenario == "merged-all":
        models = []
        for path in adapters:
            predictor = load_predictor(backbone_dir, path)
            merge_lora(predictor.model)
            for layer in predictor.model.modules():  # a deployed merged model keeps no pre-merge copy
                if hasattr(layer, "_unmerged_weight"):
                    layer._unmerged_weight = None
            predictor.predict_proba(x)
            models.append(predictor)
            tensor_bytes += sum(
                t.numel() * t.element_size() for k, t in predictor.model.state_dict().items() if "lora_" not in k
            )
    else:
        raise ValueError(scenario)
    return {"scenario": scenario, "rss_mb": _rss_mb(), "baseline_mb": baseline, "tensor_mb": tensor_bytes / 2**20}


def measure_memory(root: Path, n_sites: int) -> dict:
    results = {}
    for scenario in ("bank-1", "bank-all", "multi-all", "merged-all"):
        proc = subprocess.run(
            [sys.executable, __file__, "--memory-child", scenario, "--root", str(root), "--sites", str(n_sites)],
            capture_output=True,
            text=True,
            check=True,
            timeout=900,
            env={**os.environ, "OMP_NUM_THREADS": "1"},
        )
        results[scenario] = json.loads(proc.stdout.strip().splitlines()[-1])
    return results


# --------------------------------------------------------------------------- time


@torch.inference_mode()
def measure_time(backbone_dir: Path, adapter_dirs: list[Path], args: argparse.Namespace) -> dict:
    bb = read_backbone(backbone_dir)
    shared = SharedBackbone(bb.state, bb.config, bb.identity)
    adapters = [read_site_adapter(p, p.name) for p in adapter_dirs]
    x = _inputs(args.batch, seed=1)

    def answer(adapter) -> None:
        shared.activate(adapter)
        Predictor(shared.model, adapter.classes, np.asarray(adapter.thresholds), adapter.backbone_id).predict_proba(x)

    for adapter in adapters:  # warm-up
        answer(adapter)

    def answer_each(sites: list) -> None:
        for adapter in sites:
            answer(adapter)

    def records_per_s(sites: list) -> float:  # one request to each of ``sites``
        return len(sites) * args.batch / elapsed_s(lambda: answer_each(sites))

    rounds = interleaved_rounds(
        {"single": lambda: records_per_s([adapters[0]] * len(adapters)), "spread": lambda: records_per_s(adapters)},
        args.rounds,
    )
    single, spread = rounds["single"], rounds["spread"]
    switches = []
    for i in range(args.switches):
        a, b = adapters[i % len(adapters)], adapters[(i + 1) % len(adapters)]
        shared.activate(a)
        start = time.perf_counter()
        shared.activate(b)
        switches.append((time.perf_counter() - start) * 1e3)
    raw = np.random.default_rng(3).normal(0, 0.3, size=(args.big_batch, 12, 5000))
    predictor = Predictor(shared.model, adapters[0].classes, np.asarray(adapters[0].thresholds), bb.identity)
    shared.activate(adapters[0])
    predictor.batch_size = args.big_batch
    start = time.perf_counter()
    big = np.stack([preprocess_signal(r, 500.0) for r in raw])
    preprocess_s = time.perf_counter() - start
    start = time.perf_counter()
    predictor.predict_proba(big)
    forward_s = time.perf_counter() - start
    # exactness: the switched model vs each site's own Predictor (first 3 sites)
    max_diff = 0.0
    for adapter, path in list(zip(adapters, adapter_dirs, strict=True))[:3]:
        shared.activate(adapter)
        got = Predictor(shared.model, adapter.classes, np.asarray(adapter.thresholds), bb.identity).predict_proba(x)
        max_diff = max(max_diff, float(np.abs(got - load_predictor(backbone_dir, path).predict_proba(x)).max()))
    return {
        "single_site_records_per_s": statistics.median(single),
        "spread_records_per_s": statistics.median(spread),
        "ratio_spread_to_single": paired_ratio(spread, single),
        "switch_ms_p50": float(np.percentile(switches, 50)),
        "switch_ms_p99": float(np.percentile(switches, 99)),
        "batched_records_per_s_with_preprocessing": args.big_batch / (preprocess_s + forward_s),
        "batched_records_per_s_forward_only": args.big_batch / forward_s,
        "max_abs_prob_diff_vs_own_predictor": max_diff,
    }


# --------------------------------------------------------------------------- mixed batches


def _percentile_ms(seconds: list[float], q: float) -> float:
    return float(np.percentile(seconds, q)) * 1e3


@torch.inference_mode()
def measure_mixed(backbone_dir: Path, adapter_dirs: list[Path], args: argparse.Namespace) -> dict:
    """A batch of ``--mixed-batch`` records interleaved over k sites, three ways, side by side."""
    bb = read_backbone(backbone_dir)
    shared = SharedBackbone(bb.state, bb.config, bb.identity)
    adapters = [read_site_adapter(p, p.name) for p in adapter_dirs]
    multi = MultiSiteModel(shared.base, shared.config, adapters)
    merged = []
    for path in adapter_dirs:
        model = load_predictor(backbone_dir, path).model
        merge_lora(model)
        merged.append(model.eval())
    x = torch.from_numpy(_inputs(args.mixed_batch, seed=5)[:, :, None, :])

    def by_site(site: np.ndarray) -> dict[int, torch.Tensor]:
        return {int(s): torch.from_numpy(np.flatnonzero(site == s)) for s in np.unique(site)}

    def one_pass(site: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(multi(x, site))

    def own_models(groups: dict[int, torch.Tensor]) -> None:
        for s, rows in groups.items():
            merged[s](x[rows])

    def switching(groups: dict[int, torch.Tensor]) -> None:
        for s, rows in groups.items():
            shared.activate(adapters[s])
            shared.model(x[rows])

    figures = {}
    for k in [k for k in args.mixed_sites if k <= len(adapters)]:
        site_np = np.arange(args.mixed_batch) % k  # interleaved: 0, 1, ..., k-1, 0, 1, ...
        site, groups = torch.from_numpy(site_np), by_site(site_np)
        modes = {
            "multi": lambda site=site: one_pass(site),
            "merged": lambda groups=groups: own_models(groups),
            "switch": lambda groups=groups: switching(groups),
        }
        for mode in modes.values():  # warm-up
            mode()
        times = interleaved_rounds(
            {name: (lambda mode=mode: elapsed_s(mode)) for name, mode in modes.items()}, args.mixed_rounds
        )
        # exactness: the one pass vs each site's own merged model, record by record
        got = one_pass(site)
        diff = max(
            float(
                (got[i, : adapters[s].backbone_config.num_classes] - torch.sigmoid(merged[s](x[i : i + 1]))[0])
                .abs()
                .max()
            )
            for i, s in enumerate(site_np.tolist())
        )
        figures[str(k)] = {
            **{
                f"{name}_records_per_s": args.mixed_batch / statistics.median(seconds)
                for name, seconds in times.items()
            },
            **{f"{name}_p50_ms": _percentile_ms(seconds, 50) for name, seconds in times.items()},
            **{f"{name}_p99_ms": _percentile_ms(seconds, 99) for name, seconds in times.items()},
            "multi_over_merged": paired_ratio(times["merged"], times["multi"]),
            "multi_over_switch": paired_ratio(times["switch"], times["multi"]),
            "max_abs_prob_diff_vs_merged": diff,
        }
    return figures


# --------------------------------------------------------------------------- report


def report(summary: dict, console: Console) -> None:
    mem = summary["memory"]
    table = Table(title=f"Memory, {summary['config']}, {summary['sites']} sites (after one request per site)")
    for column in ("server holds", "RSS MB", "RSS - imports MB", "tensors MB"):
        table.add_column(column, justify="left" if column == "server holds" else "right")
    labels = {
        "bank-1": "backbone + 1 adapter",
        "bank-all": f"backbone + {summary['sites']} adapters",
        "multi-all": f"backbone + {summary['sites']} adapters + one-pass stacks",
        "merged-all": f"{summary['sites']} merged models",
    }
    for key, label in labels.items():
        m = mem[key]
        table.add_row(label, f"{m['rss_mb']:.0f}", f"{m['rss_mb'] - m['baseline_mb']:.1f}", f"{m['tensor_mb']:.1f}")
    console.print(table)
    r = summary["ratios"]
    ok = "[green]PASS[/]" if r["rss_adapters_all_to_1"] <= MEMORY_TARGET else "[red]FAIL[/]"
    console.print(
        f"RSS {summary['sites']} adapters / 1: {r['rss_adapters_all_to_1']:.3f} (target <= {MEMORY_TARGET}) {ok}; "
        f"{summary['sites']} merged models / 1 adapter: {r['rss_merged_all_to_1']:.3f}"
    )
    console.print(
        f"tensors {summary['sites']} adapters / 1: {r['tensors_adapters_all_to_1']:.3f}; "
        f"{summary['sites']} merged / 1 adapter: {r['tensors_merged_all_to_1']:.3f}"
    )
    t = summary["time"]
    ok = "[green]PASS[/]" if t["ratio_spread_to_single"] >= THROUGHPUT_TARGET else "[red]FAIL[/]"
    console.print(
        f"throughput, batch {summary['batch']}: one site {t['single_site_records_per_s']:.1f} records/s, spread over "
        f"{summary['sites']} sites {t['spread_records_per_s']:.1f} records/s, ratio {t['ratio_spread_to_single']:.3f} "
        f"(target >= {THROUGHPUT_TARGET}) {ok}"
    )
    console.print(f"adapter switch: p50 {t['switch_ms_p50']:.3f} ms, p99 {t['switch_ms_p99']:.3f} ms")
    console.print(
        f"batched prediction ({summary['big_batch']} records): {t['batched_records_per_s_with_preprocessing']:.1f} "
        f"records/s with preprocessing, {t['batched_records_per_s_forward_only']:.1f} forward only ({summary['device']})"
    )
    console.print(f"max |p| difference, switched vs own Predictor: {t['max_abs_prob_diff_vs_own_predictor']:.2e}")
    console.print(
        f"RSS with the one-pass stacks / backbone + 1 adapter: {r['rss_multi_all_to_1']:.3f} (target <= "
        f"{MEMORY_TARGET}); tensors: {r['tensors_multi_all_to_1']:.3f}"
    )
    table = Table(title=f"Mixed batches of {summary['mixed_batch']} records (records/s; batch latency p50 / p99 ms)")
    for column in ("sites/batch", "one pass", "own merged models", "adapter switching", "pass/merged", "pass/switch"):
        table.add_column(column, justify="right")
    for k, f in summary["mixed"].items():
        table.add_row(
            k,
            *(
                f"{f[f'{m}_records_per_s']:.1f} ({f[f'{m}_p50_ms']:.0f} / {f[f'{m}_p99_ms']:.0f})"
                for m in ("multi", "merged", "switch")
            ),
            f"{f['multi_over_merged']:.2f}x",
            f"{f['multi_over_switch']:.2f}x",
        )
    console.print(table)
    worst = max((f["max_abs_prob_diff_vs_merged"] for f in summary["mixed"].values()), default=0.0)
    console.print(f"max |p| difference, one pass vs each site's merged model: {worst:.2e}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="tiny", choices=sorted(BACKBONE_CONFIGS))
    parser.add_argument("--sites", type=int, default=20)
    parser.add_argument("--batch", type=int, default=4, help="records per request")
    parser.add_argument("--rounds", type=int, default=6, help="timed rounds (each: one request per site, both modes)")
    parser.add_argument("--switches", type=int, default=2000)
    parser.add_argument("--big-batch", type=int, default=64, help="records of the batched-prediction figure")
    parser.add_argument(
        "--mixed-sites",
        type=lambda text: [int(k) for k in text.split(",")],
        default=[1, 5, 20],
        help="sites per mixed batch, comma-separated (capped at --sites; default 1,5,20)",
    )
    parser.add_argument("--mixed-batch", type=int, default=20, help="records per mixed batch")
    parser.add_argument("--mixed-rounds", type=int, default=5, help="timed rounds of each mixed-batch mode")
    parser.add_argument("--memory-child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--root", default=None, help=argparse.SUPPRESS)
    add_run_options(parser)
    args = parser.parse_args(argv)
    if args.memory_child:
        print(json.dumps(memory_child(Path(args.root), args.memory_child, args.sites)))
        return 0
    setup(args)
    if args.device not in ("cpu", "auto"):
        log.warning("the adapter bank serves on the CPU; --device %s is ignored", args.device)
    with tempfile.TemporaryDirectory(prefix="cessl-bench-serve-") as tmp:
        root = Path(tmp)
        backbone_dir, adapter_dirs = build_network(root, args.config, args.sites)
        memory = measure_memory(root, args.sites)
        timing = measure_time(backbone_dir, adapter_dirs, args)
        mixed = measure_mixed(backbone_dir, adapter_dirs, args)
    one, every, multi, merged = (memory[k] for k in ("bank-1", "bank-all", "multi-all", "merged-all"))
    summary = {
        "config": args.config,
        "sites": args.sites,
        "batch": args.batch,
        "big_batch": args.big_batch,
        "rounds": args.rounds,
        "device": device_name(torch.device("cpu")),
        "memory": memory,
        "ratios": {
            "rss_adapters_all_to_1": every["rss_mb"] / one["rss_mb"],
            "rss_merged_all_to_1": merged["rss_mb"] / one["rss_mb"],
            "tensors_adapters_all_to_1": every["tensor_mb"] / one["tensor_mb"],
            "tensors_merged_all_to_1": merged["tensor_mb"] / one["tensor_mb"],
            "rss_multi_all_to_1": multi["rss_mb"] / one["rss_mb"],
            "tensors_multi_all_to_1": multi["tensor_mb"] / one["tensor_mb"],
        },
        "time": timing,
        "mixed_batch": args.mixed_batch,
        "mixed": mixed,
    }
    return publish(summary, args, report)


if __name__ == "__main__":
    sys.exit(main())
