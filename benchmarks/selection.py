"""Test-time selection: success and latency of the K-sample medoid (K = 1 is the plain policy).

For one trained checkpoint and each K: `drifting-policy eval --n-samples K` over the task's test
seeds (the same seeds for every K: the env's randomness is fixed, the policy's noise is not), and
the batch-1 latency of the in-process predictor (`LocalPredictor(n_samples=K)`, median and p90
of `--calls` calls after warm-up on the task's first observation; one batched network pass of
K chunks + the medoid).

    python benchmarks/selection.py \
        --checkpoint outputs/train/drifting_pusht_lowdim/checkpoints/latest \
        --k 1 4 16 --n-test 50 --out benchmarks/results/selection_pusht_cpu.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
from pathlib import Path

import torch
from omegaconf import OmegaConf

from drifting_policy.bench import time_ms
from drifting_policy.checkpoint import load_train_config
from drifting_policy.deploy.contract import resolve_device
from drifting_policy.deploy.predictors import load_predictor
from drifting_policy.deploy.robot import GymRobot
from drifting_policy.eval import evaluate


def latency(checkpoint: Path, k: int, device: str, calls: int, warmup: int) -> dict:
    """Median / p90 ms of predictor.predict at batch 1 on the task's first observation."""
    predictor = load_predictor(checkpoint, device=device, n_samples=k)
    task = OmegaConf.to_container(load_train_config(checkpoint).task, resolve=True)
    robot = GymRobot.from_task(task)
    robot.reset(100_000)
    obs = robot.get_observation()
    robot.close()
    times = time_ms(lambda: predictor.predict(obs), calls, warmup)
    return {"median_ms": statistics.median(times),
            "p90_ms": statistics.quantiles(times, n=10)[-1]}


def task_metrics(result: dict) -> dict[str, float]:
    """The runner's scores in an eval result: mean_score and the task's own (BlockPush p1/p2,
    Kitchen p1..p7), without its timing."""
    return {k: v for k, v in result.items() if isinstance(v, float) and k != "eval_seconds"}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", type=Path, required=True)
    p.add_argument("--k", type=int, nargs="+", default=[1, 4, 16])
    p.add_argument("--n-test", type=int, default=None, help="test episodes (default: task's)")
    p.add_argument("--n-envs", type=int, default=None)
    p.add_argument("--device", default="auto")
    p.add_argument("--calls", type=int, default=50)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--work", type=Path, default=Path("outputs/selection"),
                   help="eval outputs (WORK/k<K>/eval.json)")
    p.add_argument("--out", type=Path, required=True, help="the summary JSON")
    args = p.parse_args()
    device = str(resolve_device(args.device))
    rows = []
    for k in args.k:
        r = evaluate(args.checkpoint, args.work / f"k{k}", args.n_test, args.n_envs,
                     n_videos=0, device=device, n_samples=k, progress=False)
        metrics = task_metrics(r)
        row = {"k": k, **metrics, "n_test": r["n_test"],
               "scores": [s["score"] for s in r["per_seed"]], "eval_seconds": r["eval_seconds"],
               **latency(args.checkpoint, k, device, args.calls, args.warmup)}
        rows.append(row)
        scores = "  ".join(f"{name} {value:.3f}" for name, value in metrics.items())
        print(f"K={k:>3}  {scores} over {row['n_test']}  "
              f"latency median {row['median_ms']:.2f} ms  p90 {row['p90_ms']:.2f} ms", flush=True)
    base = rows[0]
    for r in rows:
        r["latency_ratio_to_first"] = r["median_ms"] / base["median_ms"]
    meta = {"checkpoint": str(args.checkpoint), "device": device, "torch": torch.__version__,
            "threads": torch.get_num_threads(), "machine": platform.machine(),
            "calls": args.calls, "warmup": args.warmup}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
