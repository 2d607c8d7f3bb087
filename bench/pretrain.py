"""Pre-training throughput: one process vs 2-process DDP (gloo) on CPU, same global batch.

    python bench/pretrain.py                       # tinylight, global batch 16, 10 timed steps, 3 repeats
    python bench/pretrain.py --config tiny --steps 6 --repeat 1

Both runs use the real loop (``ml.train.pretrain.pretrain``: AdamW, Cutmix, BCE) on the same
in-memory random records, in fresh processes, one after the other:

- single: one process with all the cores (torch's default threads), batch = global batch;
- single, 1 thread: the same with OMP_NUM_THREADS=1 (what each DDP process gets);
- ddp: ``torchrun --standalone --nproc_per_node 2``, one thread per process
  (OMP_NUM_THREADS=1, torchrun's default), batch = global batch / 2, GlobalBatchNorm.

Throughput = samples (all processes) / time, over the steps after ``--warmup`` untimed
steps, read from rank 0's per-step clock; the runs alternate ``--repeat`` times and the
medians are printed with the ratio ddp / single (and the machine's load average, since a
shared machine's load moves these figures).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def _worker(args: argparse.Namespace) -> None:
    import torch

    from ml.train.pretrain import PretrainConfig, TensorPairDataset, pretrain

    world = int(os.environ.get("WORLD_SIZE", "1"))
    x = np.load(args.data / "x.npy", mmap_mode="r")
    y = np.load(args.data / "y.npy")
    dataset = TensorPairDataset(np.asarray(x), y)
    config = PretrainConfig(
        backbone=args.config,
        max_steps=args.warmup + args.steps,
        batch_size=args.global_batch // world,
        cutmix_alpha=0.75,
        seed=0,
        device="cpu",
        progress=False,
        log_every=10**9,
    )
    result = pretrain(dataset, config)
    if result.is_main:
        ends = result.step_end_s
        timed = ends[-1] - ends[args.warmup - 1] if args.warmup else ends[-1]
        samples = args.steps * args.global_batch
        record = {
            "world_size": world,
            "threads": torch.get_num_threads(),
            "steps": args.steps,
            "global_batch": args.global_batch,
            "seconds": timed,
            "samples_per_s": samples / timed,
        }
        (args.data / f"result_{world}.json").write_text(json.dumps(record))


def _run(cmd: list[str], env: dict[str, str], what: str) -> None:
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"{what} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="tinylight")
    parser.add_argument("--global-batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=10, help="timed steps")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=3, help="runs of each, interleaved; medians reported")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    parser.add_argument("--worker", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker is not None:
        args.data = args.worker
        _worker(args)
        return
    if args.global_batch % args.nproc:
        sys.exit("--global-batch must be divisible by --nproc")

    with tempfile.TemporaryDirectory(prefix="bench-pretrain-") as tmp:
        data = Path(tmp)
        n = (args.warmup + args.steps) * args.global_batch
        rng = np.random.default_rng(0)
        np.save(data / "x.npy", rng.standard_normal((n, 12, 6144), dtype=np.float32))
        np.save(data / "y.npy", (rng.random((n, 6)) < 0.3).astype(np.float32))
        env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
        env["PYTHONPATH"] = f"{ROOT}{os.pathsep}{env.get('PYTHONPATH', '')}"
        common = [
            __file__,
            "--config",
            args.config,
            "--global-batch",
            str(args.global_batch),
            "--steps",
            str(args.steps),
            "--warmup",
            str(args.warmup),
            "--worker",
            str(data),
        ]
        single_env = {k: v for k, v in env.items() if k != "OMP_NUM_THREADS"}
        ddp_env = {**env, "OMP_NUM_THREADS": env.get("OMP_NUM_THREADS", "1")}
        t0 = time.perf_counter()
        singles, ones, ddps = [], [], []
        for _ in range(args.repeat):  # interleaved, so that a change in machine load hits all
            _run([sys.executable, *common], single_env, "single-process run")
            singles.append(json.loads((data / "result_1.json").read_text()))
            _run([sys.executable, *common], {**single_env, "OMP_NUM_THREADS": "1"}, "single-thread run")
            ones.append(json.loads((data / "result_1.json").read_text()))
            _run(
                [
                    sys.executable,
                    "-m",
                    "torch.distributed.run",
                    "--standalone",
                    "--nproc_per_node",
                    str(args.nproc),
                    *common,
                ],
                ddp_env,
                "DDP run",
            )
            ddps.append(json.loads((data / f"result_{args.nproc}.json").read_text()))
    single = float(np.median([r["samples_per_s"] for r in singles]))
    one = float(np.median([r["samples_per_s"] for r in ones]))
    ddp = float(np.median([r["samples_per_s"] for r in ddps]))
    ratio = ddp / single
    load = os.getloadavg()[0]
    print(
        f"pre-training throughput, {args.config}, global batch {args.global_batch}, {args.steps} timed steps, "
        f"median of {args.repeat} (CPU, {os.cpu_count()} cores, load {load:.1f}, "
        f"{time.perf_counter() - t0:.0f} s in all)"
    )

    def runs(records: list[dict]) -> str:
        return ", ".join(f"{r['samples_per_s']:.1f}" for r in records)

    print(f"  single process ({singles[0]['threads']} threads): {single:8.2f} samples/s  (runs: {runs(singles)})")
    print(
        f"  DDP {args.nproc} processes (gloo, {ddps[0]['threads']} thread each): {ddp:8.2f} samples/s  "
        f"(runs: {runs(ddps)})"
    )
    print(f"  single process (1 thread):  {one:8.2f} samples/s  (runs: {runs(ones)})")
    print(f"  ratio DDP / single: {ratio:.2f}x   (DDP / single-thread process: {ddp / one:.2f}x)")
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "config": args.config,
                    "global_batch": args.global_batch,
                    "single": singles,
                    "single_1thread": ones,
                    "ddp": ddps,
                    "ratio": ratio,
                    "ratio_vs_1thread": ddp / one,
                    "load": load,
                },
                indent=2,
            )
        )


if __name__ == "__main__":
    main()
