"""Supervised multi-label pre-training of a backbone (the paper's CODE-15% step).

One loop for one process and for many (``torchrun``, DistributedDataParallel):

- AdamW, ``lr = base_lr x world_size x batch_size / 1024`` (base_lr 1e-3, batch_size per
  process), weight decay 0.01, constant learning rate, BCE-with-logits.
- Cutmix on the time axis (``ml.train.augment.cutmix``); its randomness is a function of
  (seed, step, rank) only, so an interrupted run resumes bit-for-bit.
- Data order: ``DistributedSampler(shuffle, seed, drop_last)`` with ``set_epoch`` in every
  run (``num_replicas=1`` for one process), so the union of the per-process batches of a
  step is exactly the single-process batch of the same global size.
- Multi-process: ``WORLD_SIZE > 1`` in the environment (torchrun sets it) starts a process
  group, NCCL on CUDA and gloo on CPU. BatchNorm sees the *global* batch: nn.SyncBatchNorm
  on CUDA, :class:`GlobalBatchNorm2d` on CPU (SyncBatchNorm is GPU-only). Rank 0 alone
  writes checkpoints and logs.
- Checkpoints (``<checkpoint_dir>/pretrain_last.pt``): model, optimizer, position in the
  data (epoch, batch) and a fingerprint of the schedule; written atomically by rank 0, read
  back with ``torch.load(weights_only=True)`` by every rank, so on several machines
  ``checkpoint_dir`` must be a shared volume (the ranks check that they resume from the same
  step). A resumed run must have the same global batch.
- Data at scale: each process reads only its shard: the sampler hands it its indices, and a
  map-style dataset over a memory-mapped store (``ml.data.store.StoreDataset``) reads just
  those rows; nothing here copies the whole dataset.
- Failures: a collective that fails (a peer process died, the network dropped, nothing
  arrived within ``dist_timeout_s``) or a process group that cannot be joined ends the run
  with :class:`DistributedTrainingError` (one line naming this rank, the step and the
  checkpoint to resume from), never a hang: every collective is bounded by the timeout.
"""

from __future__ import annotations

import logging
import os
import re
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from ml.errors import StepFailedError
from ml.model.backbone import BackboneConfig, ECGTransformer, backbone_config
from ml.train.augment import cutmix, make_generator
from ml.train.checkpoint import load_checkpoint, save_checkpoint
from ml.train.loaders import dataset_size
from ml.train.pretrain_config import DEFAULT_DIST_TIMEOUT_S, PretrainConfig

logger = logging.getLogger(__name__)

CHECKPOINT_NAME = "pretrain_last.pt"


class DistributedTrainingError(StepFailedError):
    """A multi-process run lost a peer (killed, crashed, unreachable) or could not start its
    process group; the message names the rank, the step and the checkpoint to resume from."""


@dataclass
class CommStats:
    """What one process sent through all-reduce, per step (``measure_comm``).

    grad_bytes / bn_bytes: bytes all-reduced per step for the gradients (DDP's buckets) and
    for the global BatchNorm statistics (forward sums and their gradients).
    grad_s / bn_s: per step, the wall time the gradient all-reduces were in flight (union of
    the buckets' intervals: they overlap the backward pass) and the time spent blocked in
    the BatchNorm all-reduces (these are synchronous).
    collectives: all-reduce calls per step (each one pays the network latency), of which
    ``buckets`` carry gradients.
    """

    grad_bytes: int = 0
    bn_bytes: int = 0
    collectives: int = 0
    buckets: int = 0
    grad_s: list[float] = field(default_factory=list)
    bn_s: list[float] = field(default_factory=list)

    @property
    def bytes_per_step(self) -> int:
        return self.grad_bytes + self.bn_bytes


class _CommMeter:
    """Collects :class:`CommStats` while the loop runs (thread-safe: gloo completes the
    gradient buckets' futures on its own threads)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._grad: list[tuple[float, float]] = []
        self._bn_s = 0.0
        self._bytes = {"grad": 0, "bn": 0}
        self._calls = 0
        self._buckets = 0
        self.stats = CommStats()

    def bn(self, seconds: float, nbytes: int) -> None:
        with self._lock:
            self._bn_s += seconds
            self._bytes["bn"] += nbytes
            self._calls += 1

    def grad(self, start: float, end: float, nbytes: int) -> None:
        with self._lock:
            self._grad.append((start, end))
            self._bytes["grad"] += nbytes
            self._calls += 1
            self._buckets += 1

    def end_step(self) -> None:
        with self._lock:
            busy, last = 0.0, float("-inf")
            for start, end in sorted(self._grad):  # union of the intervals
                if end > last:
                    busy += end - max(start, last)
                    last = end
            self.stats.grad_s.append(busy)
            self.stats.bn_s.append(self._bn_s)
            # per step: the figures of a complete step (the first one sets them)
            if not self.stats.collectives:
                self.stats.grad_bytes, self.stats.bn_bytes = self._bytes["grad"], self._bytes["bn"]
                self.stats.collectives, self.stats.buckets = self._calls, self._buckets
            self._grad, self._bn_s, self._bytes, self._calls, self._buckets = [], 0.0, {"grad": 0, "bn": 0}, 0, 0

    def ddp_hook(self, state: object, bucket: dist.GradBucket) -> torch.futures.Future[Tensor]:
        """DDP's default all-reduce (divide by the world size, sum), timed."""
        start = time.perf_counter()
        buffer = bucket.buffer()
        buffer.div_(dist.get_world_size())
        future = dist.all_reduce(buffer, async_op=True).get_future()
        nbytes = buffer.numel() * buffer.element_size()

        def done(fut: torch.futures.Future[list[Tensor]]) -> Tensor:
            self.grad(start, time.perf_counter(), nbytes)
            return fut.value()[0]

        return future.then(done)


@dataclass
class PretrainResult:
    """Final weights (plain CPU tensors, reference names) and a record of the run."""

    state_dict: dict[str, Tensor]
    config: BackboneConfig
    steps: int
    world_size: int
    rank: int
    lr: float
    losses: list[tuple[int, float]] = field(default_factory=list)  # (step, global mean loss)
    samples: int = 0  # samples (all processes) processed by this invocation
    elapsed_s: float = 0.0  # wall time of this invocation's training steps
    step_end_s: list[float] = field(default_factory=list)  # time since start at the end of each step
    comm: CommStats | None = None  # with measure_comm on several processes

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def samples_per_s(self) -> float:
        return self.samples / self.elapsed_s if self.elapsed_s > 0 else 0.0


# --- distributed scaffolding --------------------------------------------------------------
@dataclass(frozen=True)
class DistEnv:
    """Where this process sits: rank, world size, device, backend (None: one process)."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")
    backend: str | None = None
    owns_group: bool = False  # this module started the process group (and ends it)

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup_distributed(device: str = "auto", enabled: bool = True, timeout_s: float = DEFAULT_DIST_TIMEOUT_S) -> DistEnv:
    """Read torchrun's environment (WORLD_SIZE, RANK, LOCAL_RANK); start the process group
    when WORLD_SIZE > 1 (NCCL on CUDA, gloo on CPU). ``enabled=False``: one process.

    ``timeout_s`` bounds joining the group and every later collective, so a lost peer ends
    the run (:class:`DistributedTrainingError`) instead of hanging it."""
    world_size = int(os.environ.get("WORLD_SIZE", "1")) if enabled else 1
    local_rank = int(os.environ.get("LOCAL_RANK", "0")) if world_size > 1 else 0
    use_cuda = torch.cuda.is_available() if device == "auto" else device.startswith("cuda")
    if use_cuda:
        explicit = device not in ("auto", "cuda")
        torch_device = torch.device(device) if explicit else torch.device("cuda", local_rank)
        torch.cuda.set_device(torch_device)
    else:
        torch_device = torch.device("cpu")
    if world_size <= 1:
        return DistEnv(device=torch_device)
    backend = "nccl" if use_cuda else "gloo"
    owns = False
    if not dist.is_initialized():
        try:
            dist.init_process_group(backend=backend, timeout=timedelta(seconds=timeout_s))
        except (RuntimeError, OSError) as err:  # DistStoreError, DistNetworkError, refused
            where = f"{os.environ.get('MASTER_ADDR', '?')}:{os.environ.get('MASTER_PORT', '?')}"
            raise DistributedTrainingError(
                f"rank {os.environ.get('RANK', '?')} of {world_size}: could not join the process group "
                f"at {where} ({backend}): rendezvous failed: {_first_line(err)}"
            ) from err
        owns = True
    return DistEnv(
        rank=dist.get_rank(),
        local_rank=local_rank,
        world_size=dist.get_world_size(),
        device=torch_device,
        backend=dist.get_backend(),
        owns_group=owns,
    )


def _all_reduce_sum(tensor: Tensor, meter: _CommMeter | None) -> None:
    if meter is None:
        dist.all_reduce(tensor)
        return
    start = time.perf_counter()
    dist.all_reduce(tensor)
    meter.bn(time.perf_counter() - start, tensor.numel() * tensor.element_size())


class _AllReduceSum(torch.autograd.Function):
    """Differentiable all-reduce (sum): every process gets the total; the gradient of
    each input is the all-reduced sum of the output gradients."""

    @staticmethod
    def forward(ctx: Any, tensor: Tensor, meter: _CommMeter | None = None) -> Tensor:
        ctx.meter = meter
        out = tensor.clone(memory_format=torch.contiguous_format)
        _all_reduce_sum(out, meter)
        return out

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        return _AllReduceSum.apply(grad, ctx.meter), None


class GlobalBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d normalising with the statistics of the global batch (all processes).

    The CPU / gloo counterpart of ``nn.SyncBatchNorm`` (which is GPU-only). Sums go through
    a differentiable all-reduce, so gradients flow
    through the shared mean and variance exactly as in one process with the whole batch.
    Same parameters and buffers as ``nn.BatchNorm2d``, hence the same state-dict names.
    Outside training, or without a process group, it is a plain BatchNorm2d.
    """

    meter: _CommMeter | None = None  # set by pretrain(measure_comm=True)

    def forward(self, x: Tensor) -> Tensor:
        if not (self.training and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(x)
        self._check_input_dim(x)
        c = x.shape[1]
        dims = [0, 2, 3]
        shape = (1, c, 1, 1)
        local = torch.cat([x.sum(dims), x.new_tensor([x.numel() / c])])  # (C + 1,)
        total = _AllReduceSum.apply(local, self.meter)
        count = total[c].detach()
        mean = total[:c] / count
        centred = x - mean.view(shape)
        var = _AllReduceSum.apply(centred.square().sum(dims), self.meter) / count  # biased, as used to normalise
        y = centred * torch.rsqrt(var + self.eps).view(shape)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        if self.track_running_stats:
            tracked, running_mean, running_var = self.num_batches_tracked, self.running_mean, self.running_var
            assert tracked is not None and running_mean is not None and running_var is not None  # as tracked
            with torch.no_grad():
                tracked.add_(1)
                f = self.momentum if self.momentum is not None else 1.0 / float(tracked)
                n = float(count)
                running_mean.mul_(1 - f).add_(mean.detach(), alpha=f)
                running_var.mul_(1 - f).add_(var.detach() * (n / max(n - 1.0, 1.0)), alpha=f)
        return y


def convert_global_batchnorm(module: nn.Module) -> nn.Module:
    """Replace every ``nn.BatchNorm2d`` by a :class:`GlobalBatchNorm2d` sharing its
    parameters and buffers (like ``nn.SyncBatchNorm.convert_sync_batchnorm``)."""
    if type(module) is nn.BatchNorm2d:
        new = GlobalBatchNorm2d(
            module.num_features, module.eps, module.momentum, module.affine, module.track_running_stats
        )
        if module.affine:
            new.weight, new.bias = module.weight, module.bias
        new.running_mean, new.running_var = module.running_mean, module.running_var
        new.num_batches_tracked = module.num_batches_tracked
        new.train(module.training)
        return new
    for name, child in module.named_children():
        module.add_module(name, convert_global_batchnorm(child))
    return module


def _sync_batchnorm(model: nn.Module, env: DistEnv) -> nn.Module:
    if env.device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return convert_global_batchnorm(model)


def _mean_across(value: float, env: DistEnv) -> float:
    if not env.distributed:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=env.device)
    dist.all_reduce(t)
    return float(t.item()) / env.world_size


def _first_line(err: BaseException) -> str:
    """The gist of a backend error: its first line without gloo's source location
    (``[.../pair.cc:537] ``) and the advice that follows the first sentence."""
    lines = str(err).strip().splitlines()
    if not lines:
        return type(err).__name__
    text = re.sub(r"^\[[^\]]*\.(?:cc|cpp|h|hpp):\d+\]\s*", "", lines[0])
    return text.split(". This is typically")[0].rstrip(".")


_COMM_FAILURE_MARKERS = ("gloo", "nccl", "connection", "timed out", "timeout", "peer", "socket", "broken pipe")


def _is_comm_failure(err: BaseException) -> bool:
    """A failed collective: torch's DistError family, or the RuntimeError gloo raises when a
    peer's socket closes or a wait times out (its message names the transport)."""
    if isinstance(err, dist.DistError):
        return True
    return isinstance(err, RuntimeError) and any(m in str(err).lower() for m in _COMM_FAILURE_MARKERS)


def _lost_peer(
    err: BaseException, env: DistEnv, step: int, ckpt_path: Path | None, saved_step: int
) -> DistributedTrainingError:
    """The one-line error of a rank whose collective failed: where it stood, what to rerun."""
    if ckpt_path is None:
        resume = "no --checkpoint-dir: a rerun starts over"
    elif saved_step > 0:
        resume = f"rerun the same command to resume from {ckpt_path} (step {saved_step})"
    else:
        resume = f"no checkpoint written yet in {ckpt_path.parent}: a rerun starts over"
    return DistributedTrainingError(
        f"rank {env.rank} of {env.world_size}: the process group failed after step {step} "
        f"(another worker died or is unreachable: {_first_line(err)}); {resume}"
    )


def _check_same_resume_point(step: int, env: DistEnv, ckpt_path: Path | None) -> None:
    """Every rank must resume from the same step: a checkpoint folder that is not shared
    between the machines would otherwise leave them training different schedules."""
    if not env.distributed:
        return
    steps = [torch.zeros(1, dtype=torch.int64, device=env.device) for _ in range(env.world_size)]
    try:
        dist.all_gather(steps, torch.tensor([step], dtype=torch.int64, device=env.device))
    except Exception as err:
        if not _is_comm_failure(err):
            raise
        raise _lost_peer(err, env, step, ckpt_path, step) from err
    seen = [int(t.item()) for t in steps]
    if len(set(seen)) > 1:
        raise DistributedTrainingError(
            f"the ranks would resume from different steps {seen} (rank order): the checkpoint folder "
            f"{ckpt_path.parent if ckpt_path else None} must be one volume shared by every node (--checkpoint-dir)"
        )


def _step_seed(seed: int, step: int, rank: int) -> int:
    """Seed of the augmentation generator at ``step`` on ``rank`` (resume-safe)."""
    return (seed * 1_000_003 + step * 1009 + rank) % (2**63 - 1)


# --- checkpoints --------------------------------------------------------------------------
def _fingerprint(config: PretrainConfig, num_classes: int, world_size: int, lr: float) -> dict[str, Any]:
    """What a resumed run must share with the run that wrote the checkpoint."""
    return {
        "backbone": config.backbone,
        "num_classes": num_classes,
        "global_batch": world_size * config.batch_size,
        "lr": lr,
        "weight_decay": config.weight_decay,
        "adam_eps": config.adam_eps,
        "cutmix_alpha": config.cutmix_alpha,
        "seed": config.seed,
        "dtype": config.dtype,
    }


# --- the loop -----------------------------------------------------------------------------
def _infer_num_classes(dataset: Dataset) -> int:
    _, y = dataset[0]
    return int(torch.as_tensor(y).numel())


def _epoch_batches(sampler: DistributedSampler, epoch: int, batch_size: int, start: int) -> list[list[int]]:
    """This process's batches of ``epoch`` (sampler order), from batch ``start`` on."""
    sampler.set_epoch(epoch)
    indices = list(iter(sampler))
    n_batches = len(indices) // batch_size
    return [indices[i * batch_size : (i + 1) * batch_size] for i in range(start, n_batches)]


def pretrain(dataset: Dataset, config: PretrainConfig) -> PretrainResult:
    """Supervised pre-training of ``config.backbone`` on ``dataset`` (``(x, y)`` pairs:
    x (12, 1, 6144) float32, y (C,) multi-hot). Multi-process when launched by torchrun.

    Every process returns the same final weights (DDP keeps them in sync); only rank 0
    writes checkpoints and logs progress.
    """
    env = setup_distributed(config.device, config.distributed, config.dist_timeout_s)
    num_classes = config.num_classes or _infer_num_classes(dataset)
    bb_config = backbone_config(config.backbone, num_classes)
    lr = config.learning_rate(env.world_size)

    torch.manual_seed(config.seed)  # the same initial weights in every process
    dtype = getattr(torch, config.dtype)
    model: nn.Module = ECGTransformer(bb_config).to(env.device, dtype)
    if env.distributed and config.sync_batchnorm:
        model = _sync_batchnorm(model, env)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=config.weight_decay, eps=config.adam_eps)

    sampler: DistributedSampler[int] = DistributedSampler(
        dataset, num_replicas=env.world_size, rank=env.rank, shuffle=True, seed=config.seed, drop_last=True
    )
    steps_per_epoch = len(sampler) // config.batch_size
    if steps_per_epoch < 1:
        raise ValueError(
            f"{dataset_size(dataset)} records give no full batch of {config.batch_size} per process "
            f"on {env.world_size} process(es); lower --batch-size or add data"
        )
    total_steps = config.max_steps or config.epochs * steps_per_epoch

    step, epoch, batch_in_epoch = 0, 0, 0
    fingerprint = _fingerprint(config, num_classes, env.world_size, lr)
    ckpt_path = Path(config.checkpoint_dir) / CHECKPOINT_NAME if config.checkpoint_dir else None
    if ckpt_path is not None and config.resume and ckpt_path.exists():
        ckpt = load_checkpoint(ckpt_path)
        if ckpt["fingerprint"] != fingerprint:
            diff = {
                k: (ckpt["fingerprint"].get(k), v) for k, v in fingerprint.items() if ckpt["fingerprint"].get(k) != v
            }
            raise ValueError(
                f"checkpoint {ckpt_path} was written by a different run "
                f"(checkpoint vs now: {diff}); use another --checkpoint-dir or --no-resume"
            )
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        step, epoch, batch_in_epoch = ckpt["step"], ckpt["epoch"], ckpt["batch_in_epoch"]
        if env.is_main:
            logger.info("resumed from %s at step %d (epoch %d, batch %d)", ckpt_path, step, epoch, batch_in_epoch)
    _check_same_resume_point(step, env, ckpt_path)

    meter = _CommMeter() if config.measure_comm and env.distributed else None
    if env.distributed:
        from torch.nn.parallel import DistributedDataParallel

        ddp: nn.Module = DistributedDataParallel(
            model, device_ids=[env.device.index] if env.device.type == "cuda" else None
        )
        if meter is not None:
            # a lambda: DDP refuses a hook whose annotations are strings (postponed evaluation)
            ddp.register_comm_hook(None, lambda state, bucket: meter.ddp_hook(state, bucket))  # type: ignore[operator]
            for module in model.modules():
                if isinstance(module, GlobalBatchNorm2d):
                    module.meter = meter
    else:
        ddp = model

    if env.is_main:
        logger.info(
            "pre-training %s (%d classes) on %d records: %d process(es) [%s], batch %d/process "
            "(global %d), lr %.3g, %d steps (%d/epoch), cutmix alpha %s",
            bb_config.name,
            num_classes,
            dataset_size(dataset),
            env.world_size,
            env.backend or env.device.type,
            config.batch_size,
            env.world_size * config.batch_size,
            lr,
            total_steps,
            steps_per_epoch,
            config.cutmix_alpha or "off",
        )

    bar = None
    if env.is_main and config.progress and step < total_steps:
        from tqdm.auto import tqdm

        bar = tqdm(total=total_steps, initial=step, desc=f"pretrain {bb_config.name}", unit="step")

    losses: list[tuple[int, float]] = []
    step_end: list[float] = []
    samples, start_step, saved_step = 0, step, step
    t0 = time.perf_counter()
    ddp.train()
    try:
        while step < total_steps:
            batches = _epoch_batches(sampler, epoch, config.batch_size, batch_in_epoch)
            loader = DataLoader(
                dataset, batch_sampler=batches, num_workers=config.num_workers, pin_memory=env.device.type == "cuda"
            )
            for x, y in loader:
                x = x.to(env.device, dtype, non_blocking=True)
                y = y.to(env.device, dtype, non_blocking=True)
                if config.cutmix_alpha > 0:
                    gen = make_generator(_step_seed(config.seed, step, env.rank), env.device)
                    with torch.no_grad():
                        x, y = cutmix(x, y, gen, alpha=config.cutmix_alpha)
                loss = F.binary_cross_entropy_with_logits(ddp(x), y)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()

                step += 1
                batch_in_epoch += 1
                samples += x.shape[0] * env.world_size
                step_end.append(time.perf_counter() - t0)
                if meter is not None:
                    meter.end_step()
                if batch_in_epoch == steps_per_epoch:
                    epoch, batch_in_epoch = epoch + 1, 0
                if step % config.log_every == 0 or step == total_steps:
                    value = _mean_across(loss.item(), env)
                    losses.append((step, value))
                    if env.is_main:
                        logger.debug("step %d/%d loss %.4f", step, total_steps, value)
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{loss.item():.4f}", refresh=False)
                if ckpt_path is not None and (step % config.checkpoint_every == 0 or step == total_steps):
                    if env.is_main:
                        save_checkpoint(
                            ckpt_path,
                            {
                                "model": model.state_dict(),
                                "optimizer": optimizer.state_dict(),
                                "step": step,
                                "epoch": epoch,
                                "batch_in_epoch": batch_in_epoch,
                                "fingerprint": fingerprint,
                            },
                        )
                    if env.distributed:
                        dist.barrier()
                    saved_step = step
                if step >= total_steps or batch_in_epoch == 0:
                    break
    except Exception as err:
        if not (env.distributed and _is_comm_failure(err)):
            raise
        if bar is not None:
            bar.close()
        raise _lost_peer(err, env, step, ckpt_path, saved_step) from err
    elapsed = time.perf_counter() - t0
    if bar is not None:
        bar.close()
    if env.is_main and step > start_step:
        last = f", last loss {losses[-1][1]:.4f}" if losses else ""
        logger.info(
            "pre-training done: %d steps in %.1f s (%.1f samples/s)%s",
            step - start_step,
            elapsed,
            samples / max(elapsed, 1e-9),
            last,
        )

    state_dict = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    if env.owns_group:
        try:
            dist.barrier()
        except Exception as err:
            if not _is_comm_failure(err):
                raise
            raise _lost_peer(err, env, step, ckpt_path, saved_step) from err
        dist.destroy_process_group()
    return PretrainResult(
        state_dict=state_dict,
        config=bb_config,
        steps=step,
        world_size=env.world_size,
        rank=env.rank,
        lr=lr,
        losses=losses,
        samples=samples,
        elapsed_s=elapsed,
        step_end_s=step_end,
        comm=meter.stats if meter is not None else None,
    )


class TensorPairDataset(Dataset):
    """``(x, y)`` pairs from in-memory arrays: x (N, 12, 6144) or (N, 12, 1, 6144), y (N, C)."""

    def __init__(self, signals: Tensor | Sequence, labels: Tensor | Sequence) -> None:
        x = torch.as_tensor(signals, dtype=torch.float32)
        self.x = x.unsqueeze(2) if x.dim() == 3 else x
        self.y = torch.as_tensor(labels, dtype=torch.float32)
        if len(self.x) != len(self.y):
            raise ValueError(f"{len(self.x)} signals but {len(self.y)} label rows")

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        return self.x[i], self.y[i]
