"""`drifting-policy train`: the training workspace (hydra entry point).

    drifting-policy train task=pusht_lowdim policy=drifting size=cpu training.num_steps=5000

One loop for every policy and task: AdamW + warmup/cosine (diffusers' get_scheduler), EMA
(DP's warmup schedule), tqdm, JSONL + wandb (offline by default) logs, validation loss,
periodic rollouts of the EMA policy (test/mean_score), checkpoints (latest + top-k by score),
exact resume (`resume=true`), a wall-clock budget (`training.max_minutes`) for equal-time
comparisons, and DistributedDataParallel under torchrun.

On a GPU: bf16 autocast of the networks (`training.precision`; the drift loss stays float32),
TF32 matmuls, fused AdamW, foreach EMA, pinned persistent DataLoader workers fed by one endless
resumable batch sampler, image frames as uint8 scaled on the device, optional `torch.compile` of
the networks (`training.compile`), and no host sync on the hot path: the step's statistics are
copied to the host only on logging steps, which is also when the clock is read (after a device
synchronize) and the time budget checked. Under DDP the drifting policy's drift statistics are
all-reduced over the ranks (the objective of one process on the global batch), every collective
uses device tensors, the process-group timeout covers rank 0's rollouts, and each rank's RNG
state is checkpointed (resume with the same number of processes).
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import shutil
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from drifting_policy import checkpoint as ckpt
from drifting_policy.config import compose, config_choices
from drifting_policy.data.dataset import load_dataset
from drifting_policy.data.sampler import EpochBatchSampler
from drifting_policy.persist import rng_state, set_rng_state
from drifting_policy.policy import config_from_dict, make_policy
from drifting_policy.policy.drifting import DriftingPolicy
from drifting_policy.rollout.runner import EnvRunner


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _to(batch, device):
    if isinstance(batch, dict):
        return {k: _to(v, device) for k, v in batch.items()}
    return batch.to(device, non_blocking=True)


PRECISIONS = ("auto", "bf16", "fp32")


def _bf16(precision: str, device: torch.device) -> bool:
    """training.precision: auto (bf16 autocast on CUDA, fp32 elsewhere) | bf16 | fp32."""
    if precision not in PRECISIONS:
        raise ValueError(f"training.precision: expected one of {PRECISIONS}, got {precision!r}")
    return device.type == "cuda" if precision == "auto" else precision == "bf16"


def _num_workers(value: int | str, device: torch.device) -> int:
    """training.num_workers: a count, or auto: 0 on the CPU (the cores train), on CUDA up to 8
    per process of this node, one core left to each training process."""
    if value != "auto":
        return int(value)
    if device.type != "cuda":
        return 0
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    return max(1, min(8, (os.cpu_count() or 1) // local - 1))


def _host(values: dict[str, torch.Tensor]) -> dict[str, float]:
    """0-d tensors -> floats in one device-to-host copy (the step's only sync)."""
    stacked = torch.stack([v.detach().float().reshape(()) for v in values.values()])
    return dict(zip(values, stacked.tolist()))


class TrainWorkspace:
    """Everything one training run holds; `run()` trains until num_steps or the time budget."""

    def __init__(self, cfg: DictConfig):
        self.cfg = cfg
        self.run_dir = Path(cfg.run_dir)
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.device = _device(cfg.device)
        if self.world > 1:
            if self.device.type == "cuda":
                self.device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
                torch.cuda.set_device(self.device)
            if not dist.is_initialized():  # the others wait in a barrier while rank 0 rolls out
                dist.init_process_group(
                    "nccl" if self.device.type == "cuda" else "gloo",
                    timeout=timedelta(minutes=cfg.training.dist_timeout_minutes))
        torch.manual_seed(cfg.seed + self.rank)

        t = cfg.training
        cuda = self.device.type == "cuda"
        if cuda:  # TF32 for the networks (drift_loss keeps its distances in full float32)
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        self.bf16 = _bf16(t.precision, self.device)
        self.dataset = load_dataset(OmegaConf.to_container(cfg.task.dataset, resolve=True))
        self.val_dataset = self.dataset.get_validation_dataset()
        # hydra's composed policy section -> the typed config, once; the registry builds it
        self.policy_config = config_from_dict(OmegaConf.to_container(cfg.policy, resolve=True))
        self.policy = make_policy(self.policy_config).to(self.device)
        self.policy.set_normalizer(self.dataset.get_normalizer(**cfg.task.get("normalizer", {})))
        self.ema_policy = copy.deepcopy(self.policy).eval() if t.use_ema else None
        self.ema = self._make_ema(self.policy) if t.use_ema else None
        self.optimizer = torch.optim.AdamW(self.policy.parameters(), lr=t.lr,
                                           betas=tuple(t.betas), weight_decay=t.weight_decay,
                                           fused=True if cuda else None)
        self.lr_scheduler = get_scheduler(t.lr_scheduler, self.optimizer,
                                          num_warmup_steps=t.lr_warmup_steps,
                                          num_training_steps=t.num_steps)
        self.batches = EpochBatchSampler(len(self.dataset), t.batch_size, cfg.seed, self.rank,
                                         self.world)
        workers = _num_workers(t.num_workers, self.device)
        self.loader = torch.utils.data.DataLoader(  # one loader for the run: workers persist
            self.dataset, batch_sampler=self.batches, num_workers=workers, pin_memory=cuda,
            persistent_workers=workers > 0,
            generator=torch.Generator(),  # keeps the global RNG untouched (exact resume)
        )
        self._peer_rng: list[dict] = []  # every rank's RNG state at the last gather
        self.step, self.train_seconds, self.topk = 0, 0.0, []
        self.scores: list[list[float]] = []  # [step, test/mean_score] of every rollout
        self.rollout_seconds = 0.0  # wall-clock spent in rollouts (not in train_seconds)
        self.wandb_id = None
        if cfg.resume and (self.run_dir / "checkpoints" / "latest").is_dir():
            self._load(self.run_dir / "checkpoints" / "latest")
        if isinstance(self.policy, DriftingPolicy):
            self.policy.validate_drift = bool(t.check_values)  # value checks: host syncs
            self.policy.all_reduce_drift = self.world > 1  # scale and lambdas of the global batch
        if t.compile:  # in place: parameter names (checkpoints) unchanged
            self.policy.model.compile()
            self.policy.obs_encoder.compile()
        self.model = self.policy
        if self.world > 1:  # no buffer needs a per-step broadcast (GroupNorm, no batch norm)
            self.model = torch.nn.parallel.DistributedDataParallel(
                self.policy, device_ids=[self.device.index] if cuda else None,
                broadcast_buffers=False,
            )

    def _make_ema(self, policy) -> EMAModel:
        """diffusers' EMA (foreach update) of `policy`'s parameters. It counts steps from 1;
        update_after_step=1 reproduces DP's schedule decay = 1 - (1 + step)^-power (capped),
        with decay 0 on the first two updates."""
        e = self.cfg.training.ema
        return EMAModel(policy.parameters(), decay=e.max_value, min_decay=0.0,
                        update_after_step=1, use_ema_warmup=True, inv_gamma=e.inv_gamma,
                        power=e.power, foreach=True)

    # ------------------------------------------------------------------ state
    def _train_state(self) -> dict:
        return {
            "step": self.step, "train_seconds": self.train_seconds,
            "batches": self.batches.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "lr_scheduler": self.lr_scheduler.state_dict(),
            "ema_step": self.ema.optimization_step if self.ema else 0,
            "rng": [rng_state(), *self._peer_rng[1:]], "topk": self.topk, "scores": self.scores,
            "rollout_seconds": self.rollout_seconds,
            "wandb_id": self.wandb_id,
        }

    def _load(self, path: Path) -> None:
        s = ckpt.load_train_state(path)
        ckpt.load_raw_weights(self.policy, path)
        self.optimizer.load_state_dict(s["optimizer"])
        self.lr_scheduler.load_state_dict(s["lr_scheduler"])
        if self.ema is not None:
            ckpt.load_ema_weights(self.ema_policy, path)
            self.ema = self._make_ema(self.ema_policy)
            self.ema.optimization_step = int(s["ema_step"])
        self.batches.load_state_dict(s["batches"])
        self.step, self.train_seconds = int(s["step"]), float(s["train_seconds"])
        self.topk, self.wandb_id = list(s["topk"]), s["wandb_id"]
        self.scores = [list(r) for r in s.get("scores", [])]
        self.rollout_seconds = float(s.get("rollout_seconds", 0.0))
        rngs = [s["rng"]] if isinstance(s["rng"], dict) else list(s["rng"])
        if len(rngs) != self.world:
            raise ValueError(f"{path}: the train state holds the RNG of {len(rngs)} rank(s), this "
                             f"run has {self.world}; resume with the same number of processes")
        set_rng_state(rngs[self.rank])

    def _gather_rng(self) -> None:
        """Every rank's RNG state to every rank, for the checkpoints rank 0 writes next (all
        ranks call it; the others do not draw until the next step)."""
        self._peer_rng = [None] * self.world
        dist.all_gather_object(self._peer_rng, rng_state())

    def save(self, name: str, meta: dict | None = None) -> Path | None:
        if self.rank != 0:
            return None
        if self.ema is not None:
            self.ema.copy_to(self.ema_policy.parameters())
        return ckpt.write_checkpoint(
            self.run_dir / "checkpoints" / name, self.cfg, self.policy, self.ema_policy,
            self._train_state(), {"step": self.step, **(meta or {})},
        )

    # ------------------------------------------------------------------ evaluation
    def eval_policy(self):
        if self.ema is not None:
            self.ema.copy_to(self.ema_policy.parameters())
            return self.ema_policy
        return self.policy

    @torch.no_grad()
    def validate(self) -> dict[str, float]:
        """Validation loss and the MSE of predict_action's chunk against the expert's (both
        normalised to [-1, 1], so tasks compare)."""
        cfg = self.cfg.training
        if len(self.val_dataset) == 0:
            return {}
        loader = torch.utils.data.DataLoader(self.val_dataset, batch_size=cfg.batch_size)
        policy, losses, mses = self.eval_policy().eval(), [], []
        for i, batch in enumerate(loader):
            if i >= cfg.val_batches:
                break
            batch = _to(batch, self.device)
            losses.append(policy.compute_loss(batch))
            obs = batch["obs"] if isinstance(batch["obs"], dict) else {"obs": batch["obs"]}
            norm = policy.normalizer["action"]
            pred = norm.normalize(policy.predict_action(obs)["action_pred"])
            mses.append(torch.nn.functional.mse_loss(pred, norm.normalize(batch["action"])))
        return _host({"val/loss": torch.stack(losses).mean(),
                      "val/action_mse": torch.stack(mses).mean()})

    def rollout(self, video_dir: Path | None) -> dict:
        cfg = self.cfg
        runner = EnvRunner.from_task(cfg.task, **cfg.training.rollout)
        return runner.run(self.eval_policy(), video_dir=video_dir, progress=False)

    def _keep_topk(self, score: float) -> None:
        k = self.cfg.checkpoint.topk
        name = f"step_{self.step:07d}-score_{score:.3f}"
        ranked = sorted(self.topk + [[score, self.step, name]], key=lambda r: (-r[0], -r[1]))
        keep, drop = ranked[:k], ranked[k:]
        if [score, self.step, name] in keep:
            self.topk = keep  # stored before the write so this checkpoint lists itself
            self.save(name, {"test/mean_score": score})
        for _, _, old in drop:
            shutil.rmtree(self.run_dir / "checkpoints" / old, ignore_errors=True)
        self.topk = keep

    # ------------------------------------------------------------------ training
    def _log(self, record: dict, wandb_run) -> None:
        if self.rank != 0:
            return
        with open(self.run_dir / "logs.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
        if wandb_run is not None:
            wandb_run.log(record, step=record["step"])

    def _init_wandb(self):
        mode = self.cfg.logging.mode
        if self.rank != 0 or mode == "disabled":
            return None
        import wandb

        run = wandb.init(project=self.cfg.logging.project, name=self.cfg.name, mode=mode,
                         dir=str(self.run_dir), id=self.wandb_id, resume="allow",
                         config=OmegaConf.to_container(self.cfg, resolve=True))
        self.wandb_id = run.id
        return run

    def run(self, until_step: int | None = None) -> dict:
        """Train to training.num_steps (or `until_step`, which stops without a final save)."""
        cfg, t = self.cfg, self.cfg.training
        self.run_dir.mkdir(parents=True, exist_ok=True)
        wandb_run = self._init_wandb()
        budget = math.inf if t.max_minutes is None else 60.0 * t.max_minutes
        last_metrics: dict = {}
        bar = tqdm(total=t.num_steps, initial=self.step, desc=cfg.name, disable=self.rank != 0)
        stop_at = t.num_steps if until_step is None else min(until_step, t.num_steps)
        self.policy.train()
        batches = iter(self.loader)  # starts at the sampler's position; never ends
        stop, mark = self._out_of_time(budget), self._clock()
        while not stop and self.step < stop_at:
            stats = self.train_step(_to(next(batches), self.device))
            self.step += 1
            self.batches.advance()
            bar.update(1)
            log, due = self.step % t.log_every == 0, self._due()
            if not (log or any(due) or self.step == stop_at):
                continue  # the hot path: nothing above waited for the device
            self.train_seconds += self._clock() - mark
            if log:
                values = _host(stats)
                record = {"step": self.step, "train/loss": values.pop("loss"),
                          "lr": self.lr_scheduler.get_last_lr()[0],
                          "train_seconds": self.train_seconds,
                          **{f"train/{k}": v for k, v in values.items()}}
                bar.set_postfix(loss=f"{record['train/loss']:.4g}")
                self._log(record, wandb_run)
            if any(due):
                self._periodic(wandb_run, last_metrics, *due)
            stop = (log or any(due)) and self._out_of_time(budget)  # same steps on every rank
            mark = self._clock()  # validation, rollouts and checkpoints are not train time
        bar.close()
        if until_step is None:
            self._finish(wandb_run, last_metrics)
        if wandb_run is not None:
            wandb_run.finish()
        return last_metrics

    def _clock(self) -> float:
        """perf_counter once the device has run everything queued (kernels count where they
        run, not where Python launched them)."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def train_step(self, batch: dict) -> dict[str, torch.Tensor]:
        """One optimisation step on a batch already on the device: loss (bf16 autocast when
        on), backward, clipping, AdamW, lr schedule, EMA. Returns {"loss", **info} as detached
        device tensors; nothing here waits for the device."""
        t = self.cfg.training
        autocast = (torch.autocast(self.device.type, dtype=torch.bfloat16) if self.bf16
                    else contextlib.nullcontext())
        with autocast:
            loss, info = self.model(batch)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if t.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.policy.parameters(), t.grad_clip)
        self.optimizer.step()
        self.lr_scheduler.step()
        if self.ema is not None:
            self.ema.step(self.policy.parameters())
        return {"loss": loss.detach(), **info}

    def _out_of_time(self, budget: float) -> bool:
        """Wall-clock budget reached; under DDP rank 0 decides for all (ranks' clocks differ)."""
        if math.isinf(budget):
            return False
        if self.world == 1:
            return self.train_seconds >= budget
        over = torch.tensor([float(self.train_seconds >= budget)], device=self.device)
        dist.broadcast(over, src=0)
        return bool(over.item())

    def _due(self) -> tuple[bool, bool, bool]:
        """(validation, rollout, checkpoint) due after this step."""
        t = self.cfg.training
        return tuple(bool(every and self.step % every == 0)
                     for every in (t.val_every, t.rollout_every, t.checkpoint_every))

    def _periodic(self, wandb_run, last_metrics: dict, val: bool, rollout: bool,
                  checkpoint: bool) -> None:
        """Validation, rollouts and checkpoints that fall due at this step (rank 0 does them)."""
        step = self.step
        if self.world > 1 and (rollout or checkpoint):
            self._gather_rng()
        metrics = {}
        if val and self.rank == 0:
            metrics.update(self.validate())
            self.policy.train()
        if rollout:
            metrics.update(self._rollout_metrics())
        if metrics:
            self._log({"step": step, "train_seconds": self.train_seconds, **metrics}, wandb_run)
            last_metrics.update(metrics)
        if checkpoint:
            self.save("latest")
        if self.world > 1 and (val or rollout or checkpoint):
            dist.barrier()  # the other ranks wait here, not inside the next allreduce

    def _rollout_metrics(self) -> dict:
        if self.rank != 0:
            return {}
        video_dir = self.run_dir / "media" / f"step_{self.step:07d}"
        t0 = time.perf_counter()
        result = self.rollout(video_dir if self.cfg.training.rollout.n_videos else None)
        self.rollout_seconds += time.perf_counter() - t0
        self.policy.train()
        metrics = {(k if "/" in k else f"test/{k}"): v for k, v in result.items()
                   if isinstance(v, (int, float)) and k != "n_test"}
        metrics["rollout_seconds"] = self.rollout_seconds
        self._keep_topk(result["mean_score"])
        self.scores.append([self.step, float(result["mean_score"])])
        metrics.update(self.score_summary())
        return metrics

    def score_summary(self) -> dict:
        """Diffusion Policy's protocol over this run's rollouts of the EMA policy: the max and
        the mean of the last k test scores (k = training.score_last_k, fewer when fewer
        rollouts exist; `test/k` says how many were averaged)."""
        if not self.scores:
            return {}
        last = [score for _, score in self.scores[-self.cfg.training.score_last_k:]]
        return {"test/max_score": max(score for _, score in self.scores),
                "test/mean_last_k": sum(last) / len(last), "test/k": len(last)}

    def _finish(self, wandb_run, last_metrics: dict) -> None:
        t = self.cfg.training
        if self.world > 1:
            self._gather_rng()
        if t.rollout_every and self.step % t.rollout_every != 0 and t.final_rollout:
            self.save("latest")  # the trained weights are safe even if the rollout fails
            metrics = self._rollout_metrics()
            self._log({"step": self.step, "train_seconds": self.train_seconds, **metrics},
                      wandb_run)
            last_metrics.update(metrics)
        self.save("latest", last_metrics)
        if self.world > 1:
            dist.barrier()


def usage() -> str:
    """`drifting-policy train --help`: the command line and the configs each group offers."""
    groups = "\n".join(f"  {group:<7} {' | '.join(config_choices(group))}"
                       for group in ("task", "policy", "size"))
    return (f"usage: drifting-policy train [key=value ...]   (hydra overrides)\n\n"
            f"{__doc__.strip()}\n\nconfig groups (configs/<group>/<name>.yaml):\n{groups}\n"
            f"\nevery other key of configs/train_policy.yaml is overridden as key=value, "
            f"e.g. training.batch_size=64 seed=43 run_dir=outputs/my_run\n")


def main(overrides: list[str] | None = None) -> int:
    """Compose configs/train_policy.yaml with hydra overrides and train (``-h`` / ``--help``:
    print `usage()` instead)."""
    if overrides and {"-h", "--help"} & set(overrides):
        print(usage())
        return 0
    ws = TrainWorkspace(compose("train_policy", overrides))
    metrics = ws.run()
    if ws.rank == 0:
        peak = (round(torch.cuda.max_memory_allocated(ws.device) / 2**30, 2)
                if ws.device.type == "cuda" else None)
        print(json.dumps({"run_dir": str(ws.run_dir), "step": ws.step,
                          "train_seconds": round(ws.train_seconds, 1), "peak_memory_gb": peak,
                          **metrics}, indent=1))
    if dist.is_initialized():
        dist.destroy_process_group()
    return 0
