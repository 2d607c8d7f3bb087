"""Pre-training across "nodes": two torchrun launchers joined by a c10d rendezvous.

Each launcher is started the way one machine of a cluster starts it (``torchrun --nnodes 2
--nproc_per_node 1 --rdzv-backend c10d --rdzv-endpoint HOST:PORT --rdzv-id ID``), here both
on localhost with a free port, one process each; the worker is this file's ``__main__``.
The data is a real dataset store (``ml.data.store``: memory-mapped signals + table).

- equivalence: 2 nodes x 1 process (batch 4 each) give the weights of 1 process with the
  global batch of 8 after the same steps (float64; see tests/integration/test_pretrain_ddp.py for why
  float64 and why Cutmix is off);
- shards, not copies: each rank's dataset is fetched exactly its DistributedSampler shard,
  the two shards are disjoint, and the pages of the memory-mapped signals each rank has
  touched (its ``/proc/self/smaps`` resident size of ``signals.npy``) are its shard's rows,
  not the store;
- a worker killed mid-run (SIGKILL at its 4th batch; last checkpoint at step 2) ends the
  job on both nodes within seconds with one clear line from the surviving rank (a
  ``DistributedTrainingError``, exit code 5, no traceback); rerunning the same two launchers
  resumes from rank 0's checkpoint in the shared ``checkpoint_dir`` and ends with exactly
  the weights of the uninterrupted run;
- a --checkpoint-dir that is not one shared volume (each node its own folder) is refused
  before any step, on every rank.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from store_support import write_random_store

N_RECORDS, STEPS, GLOBAL_BATCH, NODES = 256, 4, 8, 2
CODES = ["164889003", "426177001", "59118001", "270492004"]
BASE_LR = 0.128  # x global batch 8 / 1024 = 1e-3
CHECKPOINT_EVERY = 2
KILL_AT_FETCH = 4  # rank 1 dies fetching its 4th batch: 3 steps done, checkpoint at step 2
RECORD_BYTES = 12 * 6144 * 4
LAUNCH_TIMEOUT_S = 240
DIST_TIMEOUT_S = 60.0

# each two-launcher run takes ~10-20 s on two cores (LAUNCH_TIMEOUT_S each at most)
pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


def _config(batch_size: int, checkpoint_dir: Path | None = None):
    from ml.train.pretrain import PretrainConfig

    return PretrainConfig(
        backbone="tinylight",
        num_classes=len(CODES),
        max_steps=STEPS,
        batch_size=batch_size,
        base_lr=BASE_LR,
        cutmix_alpha=0.0,
        seed=11,
        progress=False,
        device="cpu",
        dtype="float64",
        checkpoint_dir=str(checkpoint_dir) if checkpoint_dir else None,
        checkpoint_every=CHECKPOINT_EVERY,
        dist_timeout_s=DIST_TIMEOUT_S,
    )


def _write_store(path: Path) -> None:
    write_random_store(path, N_RECORDS, CODES, seed=5)


class _RecordingDataset:
    """A StoreDataset that remembers which indices it was asked for and, when told to,
    kills its own process (SIGKILL: no cleanup, as a lost node) at its n-th batch."""

    def __init__(self, store_path: Path, kill_at: int | None = None) -> None:
        from ml.data.store import ECGStore, StoreDataset

        store = ECGStore.open(store_path)
        self.inner = StoreDataset(store, store.ids, CODES)
        self.fetched: list[int] = []
        self.kill_at = kill_at
        self.batches = 0

    def __len__(self) -> int:
        return len(self.inner)

    def __getitem__(self, index: int):
        self.fetched.append(int(index))
        return self.inner[index]

    def __getitems__(self, indices: list[int]) -> list:
        self.batches += 1
        if self.kill_at is not None and self.batches == self.kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        self.fetched.extend(int(i) for i in indices)
        return self.inner.__getitems__(indices)


def _signals_resident_bytes(store_path: Path) -> int:
    """Resident bytes of this process's mappings of the store's signals file."""
    target = str((store_path / "signals.npy").resolve())
    total, inside = 0, False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        fields = line.split()
        if fields and "-" in fields[0] and len(fields) >= 5:  # a mapping's header line
            inside = fields[-1] == target
        elif inside and fields[0] == "Rss:":
            total += int(fields[1]) * 1024
    return total


# --- launching ------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Node:
    returncode: int
    output: str  # the launcher's own output
    worker_stderr: str  # its worker's stderr (torchrun --redirects)


def _launch(tmp: Path, store: Path, out: Path, ckpt: Path, kill_at: int | None = None) -> tuple[list[Node], float]:
    """Start two torchrun launchers (one "node" each), wait for both; (nodes, seconds)."""
    port, rdzv_id = _free_port(), uuid.uuid4().hex[:8]
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "OMP_NUM_THREADS")
    }
    env["OMP_NUM_THREADS"] = "1"
    here = Path(__file__).resolve()  # the repository (the code) and tests/ (store_support, for the worker)
    env["PYTHONPATH"] = os.pathsep.join([str(here.parents[2]), str(here.parents[1]), env.get("PYTHONPATH", "")])
    procs, logs = [], []
    t0 = time.perf_counter()
    for node in range(NODES):
        log_dir = tmp / f"logs-{rdzv_id}-{node}"
        logs.append(log_dir)
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nnodes",
            str(NODES),
            "--nproc_per_node",
            "1",
            "--node-rank",
            str(node),
            "--rdzv-backend",
            "c10d",
            "--rdzv-endpoint",
            f"127.0.0.1:{port}",
            "--rdzv-id",
            rdzv_id,
            "--rdzv-conf",
            "join_timeout=120",
            "--max-restarts",
            "0",
            "--monitor-interval",
            "0.5",
            "--log-dir",
            str(log_dir),
            "--redirects",
            "3",
            __file__,
            str(store),
            str(out),
            str(ckpt),
            str(kill_at or 0),
        ]
        procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    nodes = []
    try:
        for proc, log_dir in zip(procs, logs, strict=True):
            output, _ = proc.communicate(timeout=LAUNCH_TIMEOUT_S)
            stderr = "".join(p.read_text() for p in sorted(log_dir.rglob("stderr.log")))
            nodes.append(Node(proc.returncode, output, stderr))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return nodes, time.perf_counter() - t0


def _worker(store: Path, out: Path, ckpt: Path, kill_at: int) -> int:
    from ml.train.pretrain import pretrain
    from pipeline.cli import report

    rank = int(os.environ["RANK"])
    dataset = _RecordingDataset(store, kill_at if kill_at and rank == 1 else None)
    ckpt = Path(str(ckpt).replace("{rank}", str(rank)))  # a per-node folder: a volume not shared
    config = _config(GLOBAL_BATCH // int(os.environ["WORLD_SIZE"]), ckpt)
    try:
        result = pretrain(dataset, config)  # type: ignore[arg-type]
    except Exception as err:  # the CLI's error boundary: one line, the class's exit code
        code = report(err, verbose=False)
        if code is None:
            raise
        return code
    torch.save(
        {
            "state_dict": result.state_dict,
            "world_size": result.world_size,
            "lr": result.lr,
            "fetched": dataset.fetched,
            "resident": _signals_resident_bytes(store),
            "memmap": isinstance(dataset.inner.store.signals, np.memmap),
        },
        out.with_name(f"{out.stem}.rank{rank}.pt"),
    )
    return 0


# --- tests ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """One store and one uninterrupted 2-node run of it, shared by the tests."""
    tmp = tmp_path_factory.mktemp("multinode")
    store = tmp / "store"
    _write_store(store)
    nodes, _ = _launch(tmp, store, tmp / "full.pt", tmp / "ckpt-full")
    for i, node in enumerate(nodes):
        assert node.returncode == 0, f"launcher {i} failed:\n{node.output[-3000:]}\n{node.worker_stderr[-3000:]}"
    ranks = [torch.load(tmp / f"full.rank{r}.pt", weights_only=True) for r in range(NODES)]
    return {"tmp": tmp, "store": store, "ranks": ranks}


def test_two_nodes_match_one_process_with_the_global_batch(uninterrupted: dict) -> None:
    from ml.data.store import ECGStore, StoreDataset
    from ml.model.backbone import ECGTransformer, backbone_config
    from ml.train.pretrain import pretrain

    ranks = uninterrupted["ranks"]
    assert [r["world_size"] for r in ranks] == [2, 2] and ranks[0]["lr"] == pytest.approx(1e-3)
    store = ECGStore.open(uninterrupted["store"])
    single = pretrain(StoreDataset(store, store.ids, CODES), _config(GLOBAL_BATCH))
    assert single.world_size == 1 and single.lr == pytest.approx(1e-3) and single.steps == STEPS

    torch.manual_seed(11)
    init = ECGTransformer(backbone_config("tinylight", len(CODES))).state_dict()
    worst, moved = 0.0, 0.0
    for name, ref in single.state_dict.items():
        for r in ranks:  # every rank ends with the same weights
            got = r["state_dict"][name]
            if not ref.is_floating_point():
                assert torch.equal(ref, got), name
                continue
            worst = max(worst, (ref - got).abs().max().item())
        if ref.is_floating_point() and "running_" not in name:
            moved = max(moved, (ref - init[name].double()).abs().max().item())
    assert moved > 2e-3, f"weights barely moved ({moved:.2e}); the comparison would be vacuous"
    assert worst < 1e-9, f"2 nodes vs 1 process: max |delta| = {worst:.2e}"


def test_each_rank_reads_only_its_shard_of_the_memory_mapped_store(uninterrupted: dict) -> None:
    from torch.utils.data import DistributedSampler

    ranks = uninterrupted["ranks"]
    per_rank, full = GLOBAL_BATCH // NODES, N_RECORDS * RECORD_BYTES
    shards = []
    for rank, r in enumerate(ranks):
        sampler = DistributedSampler(range(N_RECORDS), num_replicas=NODES, rank=rank, shuffle=True, seed=11)
        sampler.set_epoch(0)
        expected = list(sampler)[: STEPS * per_rank]
        assert r["fetched"] == expected, f"rank {rank} read other records than its shard"
        shards.append(set(expected))
        assert r["memmap"], "the store's signals are not memory-mapped"
        # the kernel maps a file in folios (up to MiBs on ext4 with large folios), so a
        # 288 KiB row can bring ~1-4 MiB into the mapping; a full copy maps all of it
        bound = min(len(expected) * 4 * 2**20, full // 2)
        assert 0 < r["resident"] <= bound, f"rank {rank}: {r['resident']} bytes of signals resident, > {bound}"
    assert not shards[0] & shards[1], "the ranks' shards overlap"
    assert len(shards[0] | shards[1]) == STEPS * GLOBAL_BATCH


def test_resident_bytes_see_a_full_read(uninterrupted: dict) -> None:
    """The measure above is not blind: reading every row maps the whole signals file."""
    from ml.data.store import ECGStore

    store = ECGStore.open(uninterrupted["store"])
    assert _signals_resident_bytes(uninterrupted["store"]) == 0
    store.read(range(N_RECORDS))
    assert _signals_resident_bytes(uninterrupted["store"]) >= 0.9 * N_RECORDS * RECORD_BYTES


def test_killed_worker_fails_the_job_clearly_and_resume_matches(uninterrupted: dict) -> None:
    from ml.train.checkpoint import load_checkpoint
    from ml.train.pretrain import CHECKPOINT_NAME

    tmp, store = uninterrupted["tmp"], uninterrupted["store"]
    shared = tmp / "shared-volume" / "ckpt"  # what --checkpoint-dir names on a cluster
    nodes, seconds = _launch(tmp, store, tmp / "killed.pt", shared, kill_at=KILL_AT_FETCH)
    everything = "\n".join(n.output + n.worker_stderr for n in nodes)
    assert all(n.returncode != 0 for n in nodes), everything[-4000:]
    assert seconds < DIST_TIMEOUT_S, f"the job took {seconds:.0f} s to fail: something waited for a timeout"
    assert not list(tmp.glob("killed.rank*.pt"))  # no rank finished
    survivor = [n.worker_stderr for n in nodes if "rank 0 of 2" in n.worker_stderr]
    assert len(survivor) == 1, everything[-4000:]
    lines = [line for line in survivor[0].splitlines() if line.strip()]
    assert "Traceback" not in survivor[0], survivor[0]
    assert lines[-1].startswith("cessl: error: rank 0 of 2: the process group failed after step 3"), lines[-1]
    assert "another worker died" in lines[-1] and f"{shared / CHECKPOINT_NAME} (step 2)" in lines[-1], lines[-1]
    # the dead worker's launcher names it (the survivor's launcher may lose the rendezvous
    # store with the other node before it prints its own summary: that is torchrun's output)
    assert "Signal 9 (SIGKILL)" in everything
    assert load_checkpoint(shared / CHECKPOINT_NAME)["step"] == 2

    nodes, _ = _launch(tmp, store, tmp / "resumed.pt", shared)
    for i, node in enumerate(nodes):
        assert node.returncode == 0, f"resume, launcher {i}:\n{node.output[-3000:]}\n{node.worker_stderr[-3000:]}"
    assert load_checkpoint(shared / CHECKPOINT_NAME)["step"] == STEPS
    full = uninterrupted["ranks"][0]["state_dict"]
    for rank in range(NODES):
        resumed = torch.load(tmp / f"resumed.rank{rank}.pt", weights_only=True)
        # only the steps after the checkpoint were run: rows of steps 3 and 4
        assert len(resumed["fetched"]) == (STEPS - 2) * GLOBAL_BATCH // NODES
        for name, value in full.items():
            assert torch.equal(value, resumed["state_dict"][name]), f"rank {rank}: {name} differs after resume"


def test_a_checkpoint_folder_not_shared_between_nodes_is_refused(uninterrupted: dict) -> None:
    """Each node with its own --checkpoint-dir: rank 0 finds the checkpoint, rank 1 none; the
    ranks would train different schedules, so both stop at once and say why."""
    tmp = uninterrupted["tmp"]
    split = tmp / "split"
    (split / "node1").mkdir(parents=True)
    shutil.copytree(tmp / "ckpt-full", split / "node0")
    nodes, seconds = _launch(tmp, uninterrupted["store"], tmp / "split.pt", split / "node{rank}")
    everything = "\n".join(n.output + n.worker_stderr for n in nodes)
    assert all(n.returncode != 0 for n in nodes) and seconds < DIST_TIMEOUT_S, everything[-4000:]
    for node in nodes:
        assert "Traceback" not in node.worker_stderr, node.worker_stderr
        last = node.worker_stderr.strip().splitlines()[-1]
        assert last.startswith("cessl: error: the ranks would resume from different steps [4, 0]"), last
        assert "must be one volume shared by every node (--checkpoint-dir)" in last


if __name__ == "__main__":  # torchrun worker: STORE OUT CHECKPOINT_DIR KILL_AT
    sys.exit(_worker(Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]), int(sys.argv[4])))
