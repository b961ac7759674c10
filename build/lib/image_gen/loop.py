"""The optimisation loop shared by `image-gen train` and `image-gen train-mae`.

AdamW, linear warmup then constant lr, gradient clipping, optional EMA, bf16 autocast on CUDA,
DDP under torchrun, tqdm + wandb (offline by default), and atomic checkpoints that resume exactly:

    <out>/checkpoint/   config.yaml, model.safetensors, ema.safetensors, meta.json and
                        train_state.pt = {step, optimizer, ranks: [per-rank state]} where a rank's
                        state holds its data-stream position, its RNGs and its `extra` objects
                        (the sample queues) - gathered to rank 0, which writes the directory.

A run restarted with the same config and world size continues bit for bit (CPU; CUDA kernels may
not be deterministic).
"""

from __future__ import annotations

import copy
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import torch
import torch.distributed as dist
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from drifting_policy import checkpoint as ckpt

CHECKPOINT = "checkpoint"


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
    NCCL on CUDA, gloo on CPU."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    cuda = torch.cuda.is_available() and device != "cpu"
    if world == 1:
        return Dist(device=torch.device(device or ("cuda" if cuda else "cpu")))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if cuda:
        torch.cuda.set_device(local)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    return Dist(dist.get_rank(), world, torch.device(f"cuda:{local}" if cuda else "cpu"))


class EMA:
    """Exponential moving average of a module's parameters (buffers copied): [same as model]."""

    def __init__(self, model: torch.nn.Module, decay: float) -> None:
        if not 0 <= decay < 1:
            raise ValueError(f"ema: expected a decay in [0, 1), got {decay}")
        self.decay = decay
        self.module = copy.deepcopy(model).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        ema, cur = list(self.module.parameters()), list(model.parameters())
        torch._foreach_lerp_(ema, cur, 1.0 - self.decay)
        for b_ema, b in zip(self.module.buffers(), model.buffers()):
            b_ema.copy_(b)


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
    checkpoint_every: int = 1000
    log_every: int = 50
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
        if kw.get("lr_schedule", "constant") not in ("constant", "cosine"):
            raise ValueError(f"train.lr_schedule: expected constant or cosine, got "
                             f"{kw['lr_schedule']!r}")
        if "betas" in kw:
            kw["betas"] = tuple(kw["betas"])
        return cls(**kw)


def run_loop(
    cfg: DictConfig,
    loop: LoopConfig,
    model: torch.nn.Module,
    loss_fn: Callable[[torch.nn.Module, int], tuple[torch.Tensor, dict[str, float]]],
    stream,
    extra: dict[str, Stateful],
    generators: dict[str, torch.Generator],
    job: Dist,
    before_first_step: Callable[[], None] | None = None,
    find_unused: bool = False,
) -> Path:
    """Train `model` with loss_fn(model_or_ddp, step) until loop.steps; returns the checkpoint.

    `stream` (its `consumed` position), `extra` (e.g. queues) and `generators` are this rank's
    random state, saved and restored per rank. `before_first_step` runs only on a fresh start
    (e.g. to pre-fill queues). `find_unused`: DDP tolerates parameters without gradient."""
    out = Path(loop.out)
    path = out / CHECKPOINT
    model = model.to(job.device)
    ema = EMA(model, loop.ema) if loop.ema is not None else None
    opt = torch.optim.AdamW(model.parameters(), lr=loop.lr, betas=loop.betas,
                            weight_decay=loop.weight_decay)
    step = 0
    if (path / ckpt.STATE).is_file():
        step = _restore(path, model, ema, opt, stream, extra, generators, job)
    elif before_first_step is not None:
        before_first_step()
    net = (torch.nn.parallel.DistributedDataParallel(
        model, device_ids=[job.device.index] if job.device.type == "cuda" else None,
        find_unused_parameters=find_unused) if job.world > 1 else model)
    run = _init_wandb(cfg, loop, out) if job.main else None
    bar = tqdm(total=loop.steps, initial=step, desc="train",
               disable=not (loop.progress and job.main))
    t0, first = time.monotonic(), step
    stop = loop.steps if loop.stop_after is None else min(loop.steps, step + loop.stop_after)
    info: dict[str, float] = {}
    while step < stop:
        lr = learning_rate(loop, step)
        for group in opt.param_groups:
            group["lr"] = lr
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=job.device.type == "cuda"):
            loss, info = loss_fn(net, step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), loop.grad_clip)
        opt.step()
        if ema is not None:
            ema.update(model)
        step += 1
        info = {"loss": float(loss.detach()), "grad_norm": float(grad_norm), "lr": lr, **info}
        bar.update(1)
        if job.main and (step % loop.log_every == 0 or step == stop):
            bar.set_postfix(loss=f"{info['loss']:.4f}")
            if run is not None:
                run.log({f"train/{k}": v for k, v in info.items()}, step=step)
        out_of_time = (loop.max_minutes is not None
                       and time.monotonic() - t0 > 60 * loop.max_minutes)
        if job.world > 1:  # every rank must agree to stop
            flag = torch.tensor([float(out_of_time)], device=job.device)
            dist.all_reduce(flag)
            out_of_time = bool(flag.item() > 0)
        if step % loop.checkpoint_every == 0 or step == stop or out_of_time:
            _save(path, cfg, model, ema, opt, step, stream, extra, generators, job, info)
        if out_of_time:
            break
    bar.close()
    if run is not None:
        run.summary.update({"steps_this_run": step - first})
        run.finish()
    return path


def learning_rate(loop: LoopConfig, step: int) -> float:
    """Linear warmup over loop.warmup steps, then constant or cosine-decayed to 0 at loop.steps."""
    if step < loop.warmup:
        return loop.lr * (step + 1) / loop.warmup
    if loop.lr_schedule == "constant":
        return loop.lr
    progress = (step - loop.warmup) / max(loop.steps - loop.warmup, 1)
    return loop.lr * 0.5 * (1.0 + math.cos(math.pi * progress))


def _rank_state(stream, extra, generators) -> dict:
    return {"consumed": stream.consumed, "rng": ckpt.rng_state(),
            "generators": {k: g.get_state() for k, g in generators.items()},
            "extra": {k: v.state_dict() for k, v in extra.items()}}


def _save(path, cfg, model, ema, opt, step, stream, extra, generators, job, info) -> None:
    mine = _rank_state(stream, extra, generators)
    ranks = [mine]
    if job.world > 1:
        ranks = [None] * job.world if job.main else None
        dist.gather_object(mine, ranks, dst=0)
    if job.main:
        meta = {"step": step, "world": job.world, **{k: v for k, v in info.items()}}
        state = {"step": step, "optimizer": opt.state_dict(), "ranks": ranks}
        ckpt.write_checkpoint(path, cfg, model, ema.module if ema is not None else None,
                              state, meta)
    if job.world > 1:
        dist.barrier()


def _restore(path, model, ema, opt, stream, extra, generators, job) -> int:
    state = ckpt.load_train_state(path)
    if len(state["ranks"]) != job.world:
        raise ValueError(f"resume: {path} was written by {len(state['ranks'])} ranks, this job has "
                         f"{job.world}; resume with the same world size")
    ckpt.load_weights(model, path / ckpt.MODEL)
    if ema is not None:
        ckpt.load_weights(ema.module, path / ckpt.EMA)
    opt.load_state_dict(state["optimizer"])
    mine = state["ranks"][job.rank]
    stream.restart(mine["consumed"])
    ckpt.set_rng_state(mine["rng"])
    for k, g in generators.items():
        g.set_state(mine["generators"][k])
    for k, obj in extra.items():
        obj.load_state_dict(mine["extra"][k])
    return int(state["step"])


def _init_wandb(cfg: DictConfig, loop: LoopConfig, out: Path):
    if loop.wandb_mode == "disabled":
        return None
    import wandb

    out.mkdir(parents=True, exist_ok=True)
    return wandb.init(project=loop.wandb_project, mode=loop.wandb_mode, dir=str(out),
                      config=OmegaConf.to_container(cfg, resolve=True))
