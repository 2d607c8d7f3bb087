"""Pre-training throughput: one process vs 2-process DDP (gloo) on CPU, the communication
share of a DDP step, and an on-paper projection to N nodes.

    python bench/pretrain.py                       # tinylight, global batch 16, 10 timed steps, 3 repeats
    python bench/pretrain.py --config tiny --steps 6 --repeat 1
    python bench/pretrain.py --bandwidth-gbps 10 100 --latency-us 30

All runs use the real loop (``ml.train.pretrain.pretrain``: AdamW, Cutmix, BCE) on the same
in-memory random records, in fresh processes, one after the other (``--repeat`` rounds,
interleaved so that a change in machine load hits all of them; medians reported):

- single: one process with all the cores (torch's default threads), batch = global batch;
- single, 1 thread: the same with OMP_NUM_THREADS=1 (what each DDP process gets);
- local, 1 thread: one process, 1 thread, batch = global batch / nproc: what one DDP
  process computes, without any communication (the compute time of the projection);
- ddp: ``torchrun --standalone --nproc_per_node 2``, one thread per process, batch =
  global batch / 2, GlobalBatchNorm, with ``measure_comm`` on: a DDP comm hook times each
  gradient bucket's all-reduce (from the bucket being ready to its future completing; the
  union of the buckets' intervals per step, which overlaps the backward pass) and the
  BatchNorm all-reduces are timed where they block. After the timed steps the same process
  group times an all-reduce of one step's gradient volume alone (no compute running) and
  a tiny all-reduce (the latency of one collective).

Throughput = samples (all processes) / time, over the steps after ``--warmup`` untimed
steps, read from rank 0's per-step clock.

Projection to N nodes (one process per node, each with the measured per-process compute
time and batch; weak scaling, global batch N x per-process batch): a step takes
``compute + 2(N-1)/N x V / B + C x 2(N-1) x a`` with V the all-reduce volume per step
(gradients + BatchNorm statistics, measured), B a stated network bandwidth, C the
all-reduces per step (measured) and a a stated per-message latency (ring all-reduce: 2(N-1)
transfers of V/N each). Communication is assumed not to overlap compute (a lower bound on
throughput; DDP overlaps the gradient buckets with the backward pass).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
NODES = (1, 2, 4, 8)


def _median_ms(values: list[float]) -> float:
    return float(np.median(values)) * 1e3 if values else 0.0


def _time_all_reduce(numel: int, reps: int) -> float:
    """Median seconds of one all-reduce of ``numel`` float32 in the current process group."""
    import torch
    import torch.distributed as dist

    tensor = torch.ones(max(numel, 1))
    times = []
    for i in range(reps + 2):
        dist.barrier()
        start = time.perf_counter()
        dist.all_reduce(tensor)
        if i >= 2:  # two warm-up calls
            times.append(time.perf_counter() - start)
    return float(np.median(times))


def _worker(args: argparse.Namespace) -> None:
    import torch
    import torch.distributed as dist

    from ml.train.pretrain import PretrainConfig, TensorPairDataset, pretrain

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:  # our own group: it outlives pretrain() for the isolated all-reduce timings
        dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=600))
    x = np.load(args.data / "x.npy", mmap_mode="r")
    y = np.load(args.data / "y.npy")
    dataset = TensorPairDataset(np.asarray(x), y)
    config = PretrainConfig(
        backbone=args.config,
        max_steps=args.warmup + args.steps,
        batch_size=args.batch,
        cutmix_alpha=0.75,
        seed=0,
        device="cpu",
        progress=False,
        log_every=10**9,
        measure_comm=world > 1,
    )
    result = pretrain(dataset, config)
    record: dict = {"world_size": world, "threads": torch.get_num_threads(), "batch": args.batch}
    if result.comm is not None:
        comm = result.comm
        record["comm"] = {
            "grad_bytes": comm.grad_bytes,
            "bn_bytes": comm.bn_bytes,
            "collectives": comm.collectives,
            "buckets": comm.buckets,
            "grad_ms": _median_ms(comm.grad_s[args.warmup :]),
            "bn_ms": _median_ms(comm.bn_s[args.warmup :]),
            "comm_ms": _median_ms([g + b for g, b in zip(comm.grad_s, comm.bn_s, strict=True)][args.warmup :]),
            "isolated_grad_allreduce_ms": _time_all_reduce(comm.grad_bytes // 4, 10) * 1e3,
            "tiny_allreduce_ms": _time_all_reduce(1, 20) * 1e3,
        }
        dist.destroy_process_group()
    if result.is_main:
        ends = [0.0, *result.step_end_s]
        durations = np.diff(ends)[args.warmup :]
        timed = ends[-1] - ends[args.warmup]
        samples = args.steps * args.batch * world
        record |= {
            "steps": args.steps,
            "global_batch": args.batch * world,
            "seconds": timed,
            "samples_per_s": samples / timed,
            "step_ms": float(np.median(durations)) * 1e3,
        }
        (args.data / f"result_{args.tag}.json").write_text(json.dumps(record))


def _run(cmd: list[str], env: dict[str, str], what: str) -> None:
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"{what} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")


def project(
    compute_ms: float, local_batch: int, volume_bytes: int, collectives: int, bandwidth_gbps: float, latency_us: float
) -> list[dict]:
    """Step time and throughput with N nodes (:data:`NODES`) under the ring all-reduce model."""
    rows = []
    for n in NODES:
        ring = 2 * (n - 1) / n
        transfer_ms = ring * volume_bytes * 8 / (bandwidth_gbps * 1e9) * 1e3
        latency_ms = collectives * 2 * (n - 1) * latency_us / 1e3
        step_ms = compute_ms + transfer_ms + latency_ms
        rows.append(
            {
                "nodes": n,
                "bandwidth_gbps": bandwidth_gbps,
                "latency_us": latency_us,
                "step_ms": step_ms,
                "comm_ms": transfer_ms + latency_ms,
                "samples_per_s": n * local_batch / step_ms * 1e3,
                "efficiency": compute_ms / step_ms,  # throughput / (N x one node's)
            }
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="tinylight")
    parser.add_argument("--global-batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=10, help="timed steps")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=3, help="runs of each, interleaved; medians reported")
    parser.add_argument(
        "--bandwidth-gbps", type=float, nargs="+", default=[10.0, 100.0], help="network bandwidths to project with"
    )
    parser.add_argument("--latency-us", type=float, default=30.0, help="per-message latency to project with")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    parser.add_argument("--worker", type=Path, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--batch", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--tag", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker is not None:
        args.data = args.worker
        _worker(args)
        return
    if args.global_batch % args.nproc or args.nproc < 2:
        sys.exit("--nproc must be >= 2 and divide --global-batch")
    if args.warmup < 1:
        sys.exit("--warmup must be >= 1 (the first step builds DDP's buckets)")
    local_batch = args.global_batch // args.nproc

    with tempfile.TemporaryDirectory(prefix="bench-pretrain-") as tmp:
        data = Path(tmp)
        n = (args.warmup + args.steps) * args.global_batch
        rng = np.random.default_rng(0)
        np.save(data / "x.npy", rng.standard_normal((n, 12, 6144), dtype=np.float32))
        np.save(data / "y.npy", (rng.random((n, 6)) < 0.3).astype(np.float32))
        env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
        env["PYTHONPATH"] = f"{ROOT}{os.pathsep}{env.get('PYTHONPATH', '')}"
        common = [__file__, "--config", args.config, "--steps", str(args.steps), "--warmup", str(args.warmup)]
        common += ["--worker", str(data)]
        single_env = {k: v for k, v in env.items() if k != "OMP_NUM_THREADS"}
        one_env = {**single_env, "OMP_NUM_THREADS": "1"}
        ddp_env = {**env, "OMP_NUM_THREADS": env.get("OMP_NUM_THREADS", "1")}
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(args.nproc)]
        runs: dict[str, tuple[list[str], dict[str, str], str]] = {
            "single": ([sys.executable, *common, "--batch", str(args.global_batch)], single_env, "single-process run"),
            "single_1thread": ([sys.executable, *common, "--batch", str(args.global_batch)], one_env, "1-thread run"),
            "local_1thread": ([sys.executable, *common, "--batch", str(local_batch)], one_env, "per-process run"),
            "ddp": ([*launcher, *common, "--batch", str(local_batch)], ddp_env, "DDP run"),
        }
        t0 = time.perf_counter()
        results: dict[str, list[dict]] = {name: [] for name in runs}
        for _ in range(args.repeat):  # interleaved, so that a change in machine load hits all
            for name, (cmd, run_env, what) in runs.items():
                _run([*cmd, "--tag", name], run_env, what)
                results[name].append(json.loads((data / f"result_{name}.json").read_text()))
    load = os.getloadavg()[0]

    def med(name: str, key: str) -> float:
        return float(np.median([r[key] for r in results[name]]))

    def med_comm(key: str) -> float:
        return float(np.median([r["comm"][key] for r in results["ddp"]]))

    single, one, ddp = (
        med("single", "samples_per_s"),
        med("single_1thread", "samples_per_s"),
        med("ddp", "samples_per_s"),
    )
    local = med("local_1thread", "samples_per_s")
    ddp_step, compute_ms = med("ddp", "step_ms"), med("local_1thread", "step_ms")
    comm0 = results["ddp"][0]["comm"]
    grad_bytes, bn_bytes, collectives = comm0["grad_bytes"], comm0["bn_bytes"], comm0["collectives"]
    buckets = comm0["buckets"]
    volume = grad_bytes + bn_bytes
    comm_ms, grad_ms, bn_ms = med_comm("comm_ms"), med_comm("grad_ms"), med_comm("bn_ms")
    iso_ms, tiny_ms = med_comm("isolated_grad_allreduce_ms"), med_comm("tiny_allreduce_ms")
    ring = 2 * (args.nproc - 1) / args.nproc
    loopback_gbps = ring * grad_bytes * 8 / (iso_ms / 1e3) / 1e9 if iso_ms > 0 else 0.0  # bus bandwidth
    # the same model with this machine's own loopback figures, against the measured DDP run
    model_here_ms = compute_ms + iso_ms + (collectives - buckets) * tiny_ms
    projection = [
        row
        for bw in args.bandwidth_gbps
        for row in project(compute_ms, local_batch, volume, collectives, bw, args.latency_us)
    ]

    def runs_of(name: str) -> str:
        return ", ".join(f"{r['samples_per_s']:.1f}" for r in results[name])

    print(
        f"pre-training throughput, {args.config}, global batch {args.global_batch}, {args.steps} timed steps, "
        f"median of {args.repeat} (CPU, {os.cpu_count()} cores, load {load:.1f}, "
        f"{time.perf_counter() - t0:.0f} s in all)"
    )
    print(
        f"  single process ({results['single'][0]['threads']} threads): {single:8.2f} samples/s  ({runs_of('single')})"
    )
    print(f"  DDP {args.nproc} processes (gloo, 1 thread each): {ddp:8.2f} samples/s  ({runs_of('ddp')})")
    print(f"  single process (1 thread):   {one:8.2f} samples/s  ({runs_of('single_1thread')})")
    print(f"  one DDP process's share alone (1 thread, batch {local_batch}): {local:8.2f} samples/s")
    print(f"  ratio DDP / single: {ddp / single:.2f}x   (DDP / single-thread process: {ddp / one:.2f}x)")
    print(
        f"communication per DDP step (rank 0, median): step {ddp_step:.1f} ms; all-reduce in flight "
        f"{comm_ms:.1f} ms = {comm_ms / ddp_step:.0%} of the step (gradients {grad_ms:.1f} ms, overlapping the "
        f"backward pass; BatchNorm {bn_ms:.1f} ms, blocking)"
    )
    print(
        f"  volume per step: {volume / 1e6:.3f} MB = gradients {grad_bytes / 1e6:.3f} MB + BatchNorm statistics "
        f"{bn_bytes / 1e3:.1f} kB, in {collectives} all-reduces"
    )
    print(
        f"  alone: the gradient all-reduce {iso_ms:.2f} ms ({loopback_gbps:.2f} Gbit/s over loopback), "
        f"a 1-element all-reduce {tiny_ms * 1e3:.0f} us"
    )
    print(
        f"  model check at N = {args.nproc} with these loopback figures: step {model_here_ms:.1f} ms "
        f"(compute {compute_ms:.1f} ms + communication) vs {ddp_step:.1f} ms measured"
    )
    print(
        f"projection (ring all-reduce, no overlap, compute {compute_ms:.1f} ms/step for {local_batch} records "
        f"per node, {volume / 1e6:.3f} MB and {collectives} all-reduces per step, latency {args.latency_us:.0f} us):"
    )
    for row in projection:
        print(
            f"  {row['bandwidth_gbps']:6.0f} Gbit/s  N = {row['nodes']}: step {row['step_ms']:7.1f} ms "
            f"(communication {row['comm_ms']:6.1f} ms)  {row['samples_per_s']:8.1f} samples/s  "
            f"efficiency {row['efficiency']:.0%}"
        )
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "config": args.config,
                    "global_batch": args.global_batch,
                    "local_batch": local_batch,
                    **results,
                    "ratio": ddp / single,
                    "ratio_vs_1thread": ddp / one,
                    "load": load,
                    "comm": {
                        "step_ms": ddp_step,
                        "comm_ms": comm_ms,
                        "grad_ms": grad_ms,
                        "bn_ms": bn_ms,
                        "comm_share": comm_ms / ddp_step,
                        "grad_bytes": grad_bytes,
                        "bn_bytes": bn_bytes,
                        "volume_bytes": volume,
                        "collectives": collectives,
                        "buckets": buckets,
                        "isolated_grad_allreduce_ms": iso_ms,
                        "tiny_allreduce_ms": tiny_ms,
                        "loopback_gbps": loopback_gbps,
                        "model_step_ms_here": model_here_ms,
                    },
                    "compute_ms": compute_ms,
                    "projection": projection,
                },
                indent=2,
            )
        )


if __name__ == "__main__":
    main()
