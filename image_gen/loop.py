"""The optimisation loop shared by `image-gen train` and `image-gen train-mae`.

The same utilities as the policy trainer (drifting_policy/train.py): AdamW (fused on CUDA),
diffusers' `get_scheduler` (linear warmup, then constant or cosine to 0), gradient clipping,
diffusers' `EMAModel` (foreach update, constant decay), plus bf16 autocast and TF32 matmuls on
CUDA, DDP under torchrun, tqdm + wandb (offline by default), and per-rank checkpoints that resume
exactly (image_gen/checkpoint.py).

The hot path never waits for the device: the loss function returns its statistics as device
tensors, and they are copied to the host in one transfer only on logging and checkpoint steps,
which are also the steps that validate their inputs' values (`validate=True` is passed to the loss
function on the first step of a run and on the step before each log). Train time is read from the
clock after a device synchronize on those steps.

A run restarted with the same config and world size continues bit for bit on CPU (CUDA kernels
may not be deterministic).
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Protocol

import torch
import torch.distributed as dist
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from drifting_policy.persist import rng_state, set_rng_state
from image_gen import checkpoint as ckpt

CHECKPOINT = "checkpoint"
SCHEDULES = {"constant": "constant_with_warmup", "cosine": "cosine"}  # -> diffusers names
PRECISIONS = ("bf16", "fp32")
PROCESS_GROUP_TIMEOUT = timedelta(minutes=30)  # a rank may wait while rank 0 writes a checkpoint

# loss_fn(net, step, validate) -> (scalar loss, {name: 0-d device tensor})
LossFn = Callable[[torch.nn.Module, int, bool], tuple[torch.Tensor, dict[str, torch.Tensor]]]


@dataclass
class Dist:
    """This process's place in a (possibly single-process) job."""

    rank: int = 0
    world: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup_dist(device: str | None = None) -> Dist:
    """Join the torchrun job described by the environment (WORLD_SIZE > 1), else one process.
    NCCL on CUDA (one GPU per local rank), gloo on CPU."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    cuda = torch.cuda.is_available() and device != "cpu"
    if world == 1:
        return Dist(device=torch.device(device or ("cuda" if cuda else "cpu")))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if cuda:
        torch.cuda.set_device(local)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo", timeout=PROCESS_GROUP_TIMEOUT)
    return Dist(dist.get_rank(), world, torch.device(f"cuda:{local}" if cuda else "cpu"))


class Stateful(Protocol):
    """Anything with state_dict() / load_state_dict() whose state goes into a checkpoint."""

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


@dataclass
class LoopConfig:
    """Optimisation and bookkeeping settings (the `train` section of a config)."""

    out: str
    steps: int
    lr: float = 2e-4
    warmup: int = 0
    lr_schedule: str = "constant"  # after the warmup: constant (release) | cosine (to 0 at steps)
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = 0.01
    grad_clip: float = 2.0
    ema: float | None = 0.999
    precision: str = "bf16"  # bf16: autocast of the networks on CUDA (the drift loss stays fp32)
    checkpoint_every: int = 1000
    log_every: int = 50  # host copies of the statistics, value checks and the time budget check
    stop_after: int | None = None  # stop (with a checkpoint) after this many steps of this run
    max_minutes: float | None = None
    wandb_mode: str = "offline"  # offline | online | disabled
    wandb_project: str = "image-gen"
    progress: bool = True

    @classmethod
    def from_cfg(cls, t: DictConfig) -> LoopConfig:
        keys = {f for f in cls.__dataclass_fields__}
        unknown = sorted(set(t.keys()) - keys)
        if unknown:
            raise ValueError(f"train: unknown keys {unknown}; expected some of {sorted(keys)}")
        kw = OmegaConf.to_container(t, resolve=True)
        if "betas" in kw:
            kw["betas"] = tuple(kw["betas"])
        loop = cls(**kw)
        for key, value, allowed in (("lr_schedule", loop.lr_schedule, tuple(SCHEDULES)),
                                    ("precision", loop.precision, PRECISIONS)):
            if value not in allowed:
                raise ValueError(f"train.{key}: expected one of {allowed}, got {value!r}")
        if loop.ema is not None and not 0 <= loop.ema < 1:
            raise ValueError(f"train.ema: expected a decay in [0, 1) or null, got {loop.ema}")
        for key in ("steps", "log_every", "checkpoint_every"):
            if getattr(loop, key) < 1:
                raise ValueError(f"train.{key}: expected >= 1, got {getattr(loop, key)}")
        return loop


class StepTimer:
    """Seconds spent in training steps. The clock is read only after synchronising the device,
    so kernels still queued when a step's Python returns are counted."""

    def __init__(self, device: torch.device, seconds: float = 0.0) -> None:
        self.device, self.seconds = device, seconds
        self.restart()

    def _now(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def restart(self) -> None:
        """Start counting from now (after time that must not count, e.g. a checkpoint write)."""
        self._mark = self._now()

    def lap(self) -> float:
        """Add the time since the last mark; returns the total."""
        now = self._now()
        self.seconds += now - self._mark
        self._mark = now
        return self.seconds


def build_optimizer(model: torch.nn.Module, loop: LoopConfig, device: torch.device):
    """(AdamW, diffusers lr scheduler, diffusers EMAModel or None) for `model` (already on
    `device`). AdamW is fused on CUDA; the EMA decay is constant (min_decay = decay; diffusers
    copies the weights on its first update)."""
    opt = torch.optim.AdamW(model.parameters(), lr=loop.lr, betas=loop.betas,
                            weight_decay=loop.weight_decay,
                            fused=True if device.type == "cuda" else None)
    sched = get_scheduler(SCHEDULES[loop.lr_schedule], opt, num_warmup_steps=loop.warmup,
                          num_training_steps=loop.steps)
    ema = (EMAModel(model.parameters(), decay=loop.ema, min_decay=loop.ema, foreach=True)
           if loop.ema is not None else None)
    return opt, sched, ema


def train_step(
    net: torch.nn.Module,
    model: torch.nn.Module,
    opt: torch.optim.Optimizer,
    sched,
    ema: EMAModel | None,
    loss_fn: LossFn,
    step: int,
    validate: bool,
    grad_clip: float,
    bf16: bool,
) -> dict[str, torch.Tensor]:
    """One optimisation step of `model` (through `net`, its DDP wrapper or itself): the loss
    under bf16 autocast when `bf16` (CUDA), backward, clipping, AdamW, lr schedule, EMA.
    Returns the step's statistics as 0-d device tensors (loss, grad_norm and loss_fn's)."""
    device_type = next(model.parameters()).device.type
    autocast = torch.autocast(device_type, dtype=torch.bfloat16) if bf16 else nullcontext()
    with autocast:
        loss, info = loss_fn(net, step, validate)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    opt.step()
    sched.step()
    if ema is not None:
        ema.step(model.parameters())
    return {"loss": loss.detach(), "grad_norm": grad_norm, **info}


def host_values(stats: dict[str, torch.Tensor]) -> dict[str, float]:
    """0-d tensors -> floats in one device-to-host copy (a synchronisation point)."""
    if not stats:
        return {}
    values = torch.stack([v.detach().float().reshape(()) for v in stats.values()]).tolist()
    return dict(zip(stats, values))


def run_loop(
    cfg: DictConfig,
    loop: LoopConfig,
    model: torch.nn.Module,
    loss_fn: LossFn,
    stream,
    extra: dict[str, Stateful],
    generators: dict[str, torch.Generator],
    job: Dist,
    before_first_step: Callable[[], None] | None = None,
    find_unused: bool = False,
) -> Path:
    """Train `model` with loss_fn until loop.steps; returns the checkpoint directory.

    `stream` (its `consumed` position), `extra` (e.g. queues) and `generators` are this rank's
    state, saved to and restored from this rank's file. `before_first_step` runs only on a fresh
    start (e.g. to pre-fill queues). `find_unused`: DDP tolerates parameters without gradient."""
    out = Path(loop.out)
    path = out / CHECKPOINT
    cuda = job.device.type == "cuda"
    if cuda:  # TF32 for the networks' float32 matmuls and convolutions
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    model = model.to(job.device)
    opt, sched, ema = build_optimizer(model, loop, job.device)
    step, seconds = 0, 0.0
    if ckpt.has_checkpoint(path):
        step, seconds = _restore(path, model, ema, opt, sched, stream, extra, generators, job)
    elif before_first_step is not None:
        before_first_step()
    net = model
    if job.world > 1:  # buffers are constants (no batch norm): no per-step broadcast
        net = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[job.device.index] if cuda else None,
            find_unused_parameters=find_unused, broadcast_buffers=False)
    run = _init_wandb(cfg, loop, out) if job.main else None
    bar = tqdm(total=loop.steps, initial=step, desc="train",
               disable=not (loop.progress and job.main))
    bf16 = cuda and loop.precision == "bf16"
    first = step
    stop = loop.steps if loop.stop_after is None else min(loop.steps, step + loop.stop_after)
    timer, t0 = StepTimer(job.device, seconds), time.monotonic()
    model.train()
    while step < stop:
        validate = step == first or (step + 1) % loop.log_every == 0 or step + 1 == stop
        stats = train_step(net, model, opt, sched, ema, loss_fn, step, validate,
                           loop.grad_clip, bf16)
        step += 1
        bar.update(1)
        log_now = step % loop.log_every == 0 or step == stop
        save_now = step % loop.checkpoint_every == 0 or step == stop
        if not (log_now or save_now):
            continue
        record = {**host_values(stats), "lr": sched.get_last_lr()[0],
                  "train_seconds": timer.lap()}
        record["s_per_step"] = (timer.seconds - seconds) / (step - first)
        if not math.isfinite(record["loss"]):
            raise FloatingPointError(f"step {step}: the loss is {record['loss']}")
        if job.main and log_now:
            bar.set_postfix(loss=f"{record['loss']:.4f}")
            if run is not None:
                run.log({f"train/{k}": v for k, v in record.items()}, step=step)
        out_of_time = log_now and _out_of_time(t0, loop.max_minutes, job)
        if save_now or out_of_time:
            _save(path, cfg, model, ema, opt, sched, step, timer.seconds, stream, extra,
                  generators, job, record)
            timer.restart()
        if out_of_time:
            break
    bar.close()
    if run is not None:
        run.summary.update({"steps_this_run": step - first})
        run.finish()
    return path


def _out_of_time(t0: float, max_minutes: float | None, job: Dist) -> bool:
    """Wall-clock budget of this invocation reached; under DDP rank 0 decides for every rank
    (a device tensor broadcast, on logging steps only)."""
    if max_minutes is None:
        return False
    over = time.monotonic() - t0 > 60.0 * max_minutes
    if job.world == 1:
        return over
    flag = torch.tensor([float(over)], device=job.device)
    dist.broadcast(flag, src=0)
    return bool(flag.item() > 0)


def _ema_state(model: torch.nn.Module, ema: EMAModel) -> dict[str, torch.Tensor]:
    """The EMA weights as a state dict of `model` (buffers from the model)."""
    names = [name for name, _ in model.named_parameters()]
    return {**model.state_dict(), **dict(zip(names, ema.shadow_params))}


def _save(path, cfg, model, ema, opt, sched, step, seconds, stream, extra, generators, job,
          record) -> None:
    mine = {"consumed": stream.consumed, "rng": rng_state(),
            "generators": {k: g.get_state() for k, g in generators.items()},
            "extra": {k: v.state_dict() for k, v in extra.items()}}
    shared = {}
    if job.main:
        state = {"step": step, "train_seconds": seconds, "optimizer": opt.state_dict(),
                 "lr_scheduler": sched.state_dict(),
                 "ema_step": ema.optimization_step if ema is not None else 0}
        shared = {"config": cfg, "model": model.state_dict(), "state": state,
                  "ema": _ema_state(model, ema) if ema is not None else None,
                  "meta": {"step": step, **record}}
    ckpt.write_checkpoint(path, job.rank, job.world, job.device, mine, **shared)


def _restore(path, model, ema, opt, sched, stream, extra, generators, job) -> tuple[int, float]:
    state, mine = ckpt.load_train_state(path, job.rank, job.world)
    ckpt.load_weights(model, path / ckpt.MODEL)
    if ema is not None:
        weights = ckpt.read_weights(path / ckpt.EMA)
        ckpt.check_keys(path / ckpt.EMA, model.state_dict(), weights)
        names = [name for name, _ in model.named_parameters()]
        for name, shadow in zip(names, ema.shadow_params):
            shadow.copy_(weights[name])
        ema.optimization_step = int(state["ema_step"])
    opt.load_state_dict(state["optimizer"])
    sched.load_state_dict(state["lr_scheduler"])
    stream.restart(mine["consumed"])
    set_rng_state(mine["rng"])
    for k, g in generators.items():
        g.set_state(mine["generators"][k])
    for k, obj in extra.items():
        obj.load_state_dict(mine["extra"][k])
    return int(state["step"]), float(state["train_seconds"])


def _init_wandb(cfg: DictConfig, loop: LoopConfig, out: Path):
    if loop.wandb_mode == "disabled":
        return None
    import wandb

    out.mkdir(parents=True, exist_ok=True)
    return wandb.init(project=loop.wandb_project, mode=loop.wandb_mode, dir=str(out),
                      config=OmegaConf.to_container(cfg, resolve=True))
