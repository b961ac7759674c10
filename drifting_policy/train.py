"""`drifting-policy train`: the training workspace (hydra entry point).

    drifting-policy train task=pusht_lowdim policy=drifting size=cpu training.num_steps=5000

One loop for every policy and task: AdamW + warmup/cosine (diffusers' get_scheduler), EMA
(DP's warmup schedule), tqdm, JSONL + wandb (offline by default) logs, validation loss,
periodic rollouts of the EMA policy (test/mean_score), checkpoints (latest + top-k by score),
exact resume (`resume=true`), a wall-clock budget (`training.max_minutes`) for equal-time
comparisons, and DistributedDataParallel under torchrun.
"""

from __future__ import annotations

import copy
import json
import math
import os
import shutil
import time
from pathlib import Path

import torch
import torch.distributed as dist
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from drifting_policy import checkpoint as ckpt
from drifting_policy.config import compose
from drifting_policy.data.dataset import load_dataset
from drifting_policy.persist import rng_state, set_rng_state
from drifting_policy.policy import config_from_dict, make_policy
from drifting_policy.rollout.runner import EnvRunner


class EpochBatches:
    """Seeded, resumable batch order: epoch e shuffles with seed + e; ranks take strided shards.

    State = (epoch, batches consumed in it), so a resumed run sees exactly the batches the
    uninterrupted run would have seen.
    """

    def __init__(self, n: int, batch_size: int, seed: int, rank: int = 0, world: int = 1):
        self.n, self.batch_size, self.seed, self.rank, self.world = n, batch_size, seed, rank, world
        self.epoch, self.consumed = 0, 0

    def epoch_batches(self) -> list[list[int]]:
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        usable = self.n - self.n % self.world  # every rank gets the same number of batches
        order = torch.randperm(self.n, generator=g)[:usable][self.rank :: self.world].tolist()
        n_full = max(1, len(order) // self.batch_size)
        return [order[i * self.batch_size : (i + 1) * self.batch_size] for i in range(n_full)]

    def remaining(self) -> list[list[int]]:
        return self.epoch_batches()[self.consumed :]

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "consumed": self.consumed}

    def load_state_dict(self, s: dict) -> None:
        self.epoch, self.consumed = int(s["epoch"]), int(s["consumed"])


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _to(batch, device):
    if isinstance(batch, dict):
        return {k: _to(v, device) for k, v in batch.items()}
    return batch.to(device, non_blocking=True)


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
            if not dist.is_initialized():
                dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo")
        torch.manual_seed(cfg.seed + self.rank)

        t = cfg.training
        self.dataset = load_dataset(OmegaConf.to_container(cfg.task.dataset, resolve=True))
        self.val_dataset = self.dataset.get_validation_dataset()
        # hydra's composed policy section -> the typed config, once; the registry builds it
        self.policy_config = config_from_dict(OmegaConf.to_container(cfg.policy, resolve=True))
        self.policy = make_policy(self.policy_config).to(self.device)
        self.policy.set_normalizer(self.dataset.get_normalizer(**cfg.task.get("normalizer", {})))
        self.ema_policy = copy.deepcopy(self.policy).eval() if t.use_ema else None
        # diffusers' EMA counts steps from 1; update_after_step=1 reproduces DP's schedule
        # decay = 1 - (1 + step)^-power (capped), with decay 0 on the first two updates.
        self.ema = (EMAModel(self.policy.parameters(), decay=t.ema.max_value, min_decay=0.0,
                             update_after_step=1, use_ema_warmup=True, inv_gamma=t.ema.inv_gamma,
                             power=t.ema.power) if t.use_ema else None)
        self.optimizer = torch.optim.AdamW(self.policy.parameters(), lr=t.lr,
                                           betas=tuple(t.betas), weight_decay=t.weight_decay)
        self.lr_scheduler = get_scheduler(t.lr_scheduler, self.optimizer,
                                          num_warmup_steps=t.lr_warmup_steps,
                                          num_training_steps=t.num_steps)
        self.batches = EpochBatches(len(self.dataset), t.batch_size, cfg.seed, self.rank,
                                    self.world)
        self.step, self.train_seconds, self.topk = 0, 0.0, []
        self.scores: list[list[float]] = []  # [step, test/mean_score] of every rollout
        self.rollout_seconds = 0.0  # wall-clock spent in rollouts (not in train_seconds)
        self.wandb_id = None
        if cfg.resume and (self.run_dir / "checkpoints" / "latest").is_dir():
            self._load(self.run_dir / "checkpoints" / "latest")
        self.model = self.policy
        if self.world > 1:
            self.model = torch.nn.parallel.DistributedDataParallel(
                self.policy, device_ids=[self.device.index] if self.device.type == "cuda" else None
            )

    # ------------------------------------------------------------------ state
    def _train_state(self) -> dict:
        return {
            "step": self.step, "train_seconds": self.train_seconds,
            "batches": self.batches.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "lr_scheduler": self.lr_scheduler.state_dict(),
            "ema_step": self.ema.optimization_step if self.ema else 0,
            "rng": rng_state(), "topk": self.topk, "scores": self.scores,
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
            self.ema = EMAModel(self.ema_policy.parameters(), decay=self.ema.decay, min_decay=0.0,
                                update_after_step=1, use_ema_warmup=True,
                                inv_gamma=self.ema.inv_gamma, power=self.ema.power)
            self.ema.optimization_step = int(s["ema_step"])
        self.batches.load_state_dict(s["batches"])
        self.step, self.train_seconds = int(s["step"]), float(s["train_seconds"])
        self.topk, self.wandb_id = list(s["topk"]), s["wandb_id"]
        self.scores = [list(r) for r in s.get("scores", [])]
        self.rollout_seconds = float(s.get("rollout_seconds", 0.0))
        set_rng_state(s["rng"])

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
        policy, losses, mses = self.eval_policy(), [], []
        for i, batch in enumerate(loader):
            if i >= cfg.val_batches:
                break
            batch = _to(batch, self.device)
            losses.append(policy.compute_loss(batch).item())
            obs = batch["obs"] if isinstance(batch["obs"], dict) else {"obs": batch["obs"]}
            norm = policy.normalizer["action"]
            pred = norm.normalize(policy.predict_action(obs)["action_pred"])
            mses.append(torch.nn.functional.mse_loss(pred, norm.normalize(batch["action"])).item())
        return {"val/loss": sum(losses) / len(losses), "val/action_mse": sum(mses) / len(mses)}

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
        while self.step < stop_at and not self._out_of_time(budget):
            loader = torch.utils.data.DataLoader(
                self.dataset, batch_sampler=self.batches.remaining(), num_workers=t.num_workers,
                pin_memory=self.device.type == "cuda",
                generator=torch.Generator(),  # keeps the global RNG untouched (exact resume)
            )
            for batch in loader:
                t0 = time.perf_counter()
                loss, info = self.model(_to(batch, self.device))
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if t.grad_clip:
                    torch.nn.utils.clip_grad_norm_(self.policy.parameters(), t.grad_clip)
                self.optimizer.step()
                self.lr_scheduler.step()
                if self.ema is not None:
                    self.ema.step(self.policy.parameters())
                self.step += 1
                self.batches.consumed += 1
                self.train_seconds += time.perf_counter() - t0
                bar.update(1)
                record = {"step": self.step, "train/loss": loss.item(),
                          "lr": self.lr_scheduler.get_last_lr()[0],
                          "train_seconds": self.train_seconds,
                          **{f"train/{k}": float(v) for k, v in info.items()}}
                if self.step % t.log_every == 0:
                    bar.set_postfix(loss=f"{record['train/loss']:.4g}")
                    self._log(record, wandb_run)
                self._periodic(wandb_run, last_metrics)
                if self.step >= stop_at or self._out_of_time(budget):
                    break
            else:
                self.batches.epoch, self.batches.consumed = self.batches.epoch + 1, 0
        bar.close()
        if until_step is None:
            self._finish(wandb_run, last_metrics)
        if wandb_run is not None:
            wandb_run.finish()
        return last_metrics

    def _out_of_time(self, budget: float) -> bool:
        """Wall-clock budget reached; under DDP rank 0 decides for all (ranks' clocks differ)."""
        if math.isinf(budget):
            return False
        over = torch.tensor([float(self.train_seconds >= budget)])
        if self.world > 1:
            dist.broadcast(over, src=0)
        return bool(over.item())

    def _periodic(self, wandb_run, last_metrics: dict) -> None:
        """Validation, rollouts and checkpoints that fall due at this step (rank 0 does them)."""
        t, step = self.cfg.training, self.step
        val, rollout, checkpoint = (bool(every and step % every == 0)
                                    for every in (t.val_every, t.rollout_every, t.checkpoint_every))
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
        if t.rollout_every and self.step % t.rollout_every != 0 and t.final_rollout:
            self.save("latest")  # the trained weights are safe even if the rollout fails
            metrics = self._rollout_metrics()
            self._log({"step": self.step, "train_seconds": self.train_seconds, **metrics},
                      wandb_run)
            last_metrics.update(metrics)
        self.save("latest", last_metrics)
        if self.world > 1:
            dist.barrier()


def main(overrides: list[str] | None = None) -> int:
    """Compose configs/train_policy.yaml with hydra overrides and train."""
    ws = TrainWorkspace(compose("train_policy", overrides))
    metrics = ws.run()
    if ws.rank == 0:
        print(json.dumps({"run_dir": str(ws.run_dir), "step": ws.step,
                          "train_seconds": round(ws.train_seconds, 1), **metrics}, indent=1))
    if dist.is_initialized():
        dist.destroy_process_group()
    return 0
