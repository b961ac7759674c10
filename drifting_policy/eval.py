"""`drifting-policy eval --checkpoint DIR --n-test 50 --out DIR`: roll out a checkpoint.

Builds the policy (pretrained_model/, through the registry) and the task's env runner (the
checkpoint's train_config.yaml, read as data), runs the test
seeds (100000 + i), and writes OUT/eval.json (mean_score, per-seed results, timing) plus mp4
videos of the first episodes under OUT/videos.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from drifting_policy.checkpoint import load_policy, load_train_config
from drifting_policy.rollout.runner import EnvRunner


def evaluate(checkpoint: Path, out: Path, n_test: int | None = None, n_envs: int | None = None,
             n_videos: int | None = None, ema: bool = True, device: str = "cpu",
             progress: bool = True, policy=None, n_samples: int = 1) -> dict:
    """Evaluate; returns (and writes to out/eval.json) the runner's result.

    `policy` replaces the checkpoint's weights when given (e.g. the same weights with another
    sampler); the task and runner still come from the checkpoint's config. `n_samples` = K > 1
    executes the medoid of K sampled chunks per step (test-time selection).
    """
    cfg = load_train_config(checkpoint)
    loaded, policy_config = load_policy(checkpoint, ema=ema, device=device)
    policy = policy if policy is not None else loaded
    runner = EnvRunner.from_task(cfg.task, n_test=n_test, n_envs=n_envs, n_videos=n_videos)
    t0 = time.perf_counter()
    result = runner.run(policy, video_dir=out / "videos", progress=progress, n_samples=n_samples)
    result.update(checkpoint=str(checkpoint), policy=policy_config.type, task=cfg.task.name,
                  ema=ema, n_samples=n_samples, eval_seconds=time.perf_counter() - t0)
    out.mkdir(parents=True, exist_ok=True)
    (out / "eval.json").write_text(json.dumps(result, indent=1))
    return result


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", type=Path, required=True, help="checkpoint directory")
    p.add_argument("--out", type=Path, default=None, help="default: <checkpoint>/eval")
    p.add_argument("--n-test", type=int, default=None, help="test episodes (default: task's 50)")
    p.add_argument("--n-envs", type=int, default=None, help="parallel env processes")
    p.add_argument("--n-videos", type=int, default=None)
    p.add_argument("--no-ema", action="store_true", help="use the raw weights, not the EMA")
    p.add_argument("--device", default="auto", help="auto (cuda when present) | cpu | cuda[:N]")
    p.add_argument("--n-samples", type=int, default=1,
                   help="K: execute the medoid of K chunks sampled in one batched pass")


def main(args: argparse.Namespace) -> int:
    out = args.out or args.checkpoint / "eval"
    from drifting_policy.deploy.contract import resolve_device

    r = evaluate(args.checkpoint, out, args.n_test, args.n_envs, args.n_videos,
                 ema=not args.no_ema, device=resolve_device(args.device),
                 n_samples=args.n_samples)
    errors = sum("error" in s for s in r["per_seed"])
    print(f"mean_score {r['mean_score']:.4f} over {r['n_test']} episodes "
          f"({errors} env errors) -> {out / 'eval.json'}")
    return 0
