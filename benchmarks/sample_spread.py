"""How spread out a policy's action chunks are, per observation, next to how far they land from
the expert's: a check for a generator collapsing onto one chunk as training goes on.

For each checkpoint (EMA and raw weights) and up to --n-obs windows of the held-out validation
episodes, K = --k chunks are drawn per observation (one batched pass of K noises) and compared in
the normalised action space ([-1, 1], as val/action_mse):

- mse_one:    MSE of one sample to the expert's chunk (the training log's val/action_mse)
- mse_mean:   MSE of the mean of the K samples to the expert's chunk
- best_of_k:  MSE of the closest of the K samples (low when some sample covers the expert's mode)
- spread:     RMS over elements of the std across the K samples (0 = one chunk whatever the noise)
- calibration = mse_one / (2 spread^2): if the expert's chunk were one more draw from the policy's
  distribution, E[mse_one] = 2 Var and this is 1. Above 1 the policy is too sure (its samples
  cluster tighter than they miss by); below 1 it is too spread out.

    python benchmarks/sample_spread.py --out benchmarks/results/sample_spread_can_cpu.json \
        outputs/table/can_lowdim/drifting_seed42/checkpoints/*
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

import torch
from omegaconf import OmegaConf
from tqdm import tqdm

from drifting_policy.checkpoint import load_policy, load_train_config
from drifting_policy.data.dataset import load_dataset
from drifting_policy.persist import atomic_path


def spread_stats(samples: torch.Tensor, target: torch.Tensor) -> dict[str, float]:
    """samples [B, K, T, D] (K >= 2 draws per observation), target [B, T, D] -> the module
    docstring's statistics, each averaged over the B observations."""
    if samples.ndim != 4 or samples.shape[1] < 2 or samples.shape[0] != target.shape[0]:
        raise ValueError(f"samples: expected [B, K>=2, T, D] matching target [B, T, D], got "
                         f"{tuple(samples.shape)} and {tuple(target.shape)}")
    err = (samples - target[:, None]).pow(2).flatten(2).mean(-1)  # [B, K]
    var = samples.var(dim=1, unbiased=True).flatten(1).mean(-1)  # [B]
    mse_one = err.mean().item()
    spread2 = var.mean().item()
    return {
        "mse_one": mse_one,
        "mse_mean": (samples.mean(1) - target).pow(2).flatten(1).mean(-1).mean().item(),
        "best_of_k": err.min(1).values.mean().item(),
        "spread": spread2 ** 0.5,
        "calibration": mse_one / (2 * spread2) if spread2 > 0 else float("inf"),
    }


def measure(checkpoint: Path, n_obs: int, k: int, seed: int) -> list[dict]:
    """The statistics of a checkpoint's EMA and raw weights on the same validation windows."""
    cfg = load_train_config(checkpoint)
    val = load_dataset(OmegaConf.to_container(cfg.task.dataset, resolve=True))
    val = val.get_validation_dataset()
    if len(val) == 0:
        raise ValueError(f"{checkpoint}: its dataset has no validation episodes "
                         f"(task.dataset.val_ratio is 0)")
    picks = torch.linspace(0, len(val) - 1, min(n_obs, len(val))).round().long().unique()
    batch = torch.utils.data.default_collate([val[int(i)] for i in picks])
    obs = batch["obs"] if isinstance(batch["obs"], dict) else {"obs": batch["obs"]}
    rows = []
    for ema in (True, False):
        policy, _ = load_policy(checkpoint, ema=ema)
        target = policy.normalizer["action"].normalize(batch["action"])
        samples = policy.sample_chunks(obs, k, torch.Generator().manual_seed(seed))
        rows.append({"checkpoint": str(checkpoint), "weights": "ema" if ema else "raw",
                     "n_obs": len(picks), "k": k, **spread_stats(samples, target)})
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoints", type=Path, nargs="+", help="training checkpoint directories")
    p.add_argument("--n-obs", type=int, default=256, help="validation windows, evenly spaced")
    p.add_argument("--k", type=int, default=16, help="samples per observation")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args()
    rows = []
    for ckpt in tqdm(args.checkpoints, desc="checkpoints", unit="ckpt"):
        rows += measure(ckpt, args.n_obs, args.k, args.seed)
    print(f"{'checkpoint':60s} {'w':3s} {'mse_one':>8s} {'mse_mean':>8s} {'best_k':>8s} "
          f"{'spread':>7s} {'calib':>6s}")
    for r in rows:
        print(f"{r['checkpoint'][-60:]:60s} {r['weights']:3s} {r['mse_one']:8.4f} "
              f"{r['mse_mean']:8.4f} {r['best_of_k']:8.4f} {r['spread']:7.4f} "
              f"{r['calibration']:6.2f}")
    with atomic_path(args.out) as tmp:
        tmp.write_text(json.dumps({
            "machine": platform.machine(), "torch": torch.__version__,
            "command": "python benchmarks/sample_spread.py " + " ".join(sys.argv[1:]),
            "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
