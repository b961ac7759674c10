"""`drifting-policy demo`: the main job of `make demo`, end to end on PushT keypoints, on a CPU.

1. PushT expert demonstrations (zarr, DP's layout) unless the file already exists;
2. a CPU-sized one-step drifting policy trained for a fixed number of optimiser steps (the
   result does not depend on the machine's speed; only the time does);
3. evaluation on 50 test seeds (100000 + i) with videos;
4. batch-1 latency of the trained policy;
5. a short report (report.md / report.json) and training curves (training_curves.png).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from drifting_policy.config import compose
from drifting_policy.eval import evaluate
from drifting_policy.plots import plot_training_curves
from drifting_policy.train import TrainWorkspace

# one size=cpu drifting step (batch 32 x G = 8) on an idle 2-core machine, two threads
SECONDS_PER_STEP = 0.19


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", type=Path, default=Path("outputs/demo"))
    p.add_argument("--data", type=Path, default=Path("data/pusht/pusht_expert.zarr"))
    p.add_argument("--episodes", type=int, default=200, help="expert demos to generate if absent")
    p.add_argument("--steps", type=int, default=5000, help="optimiser steps (cosine lr schedule)")
    p.add_argument("--n-test", type=int, default=50)
    p.add_argument("overrides", nargs="*", help="extra hydra overrides for training")


def _latency_ms(policy, obs: dict, calls: int = 30) -> float:
    for _ in range(3):
        policy.predict_action(obs)
    times = []
    for _ in range(calls):
        t0 = time.perf_counter()
        policy.predict_action(obs)
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def main(args: argparse.Namespace) -> int:
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    expert_line = f"existing dataset {args.data}"
    if not args.data.exists():
        from drifting_policy.data import demos as make_demos

        print(f"[1/4] generating {args.episodes} PushT expert demos -> {args.data}")
        if make_demos.main(["pusht", "--episodes", str(args.episodes), "--out", str(args.data)]):
            return 1
        expert_line = f"{args.episodes} expert episodes generated -> {args.data}"
    else:
        print(f"[1/4] using {args.data}")

    print(f"[2/4] training a CPU-sized drifting policy for {args.steps} steps: about "
          f"{args.steps * SECONDS_PER_STEP / 60:.0f} min on an idle 2-core CPU "
          f"({SECONDS_PER_STEP} s/step measured; a busy machine is slower)")
    cfg = compose("train_policy", [
        "task=pusht_lowdim", "policy=drifting", "size=cpu", f"run_dir={out / 'train'}",
        f"task.dataset.path={args.data}", f"training.num_steps={args.steps}",
        "training.rollout_every=0", "training.checkpoint_every=500", "training.val_every=500",
        *args.overrides,
    ])
    ws = TrainWorkspace(cfg)
    ws.run()
    latest = out / "train" / "checkpoints" / "latest"

    print(f"[3/4] evaluating on {args.n_test} test seeds")
    result = evaluate(latest, out / "eval", n_test=args.n_test, n_videos=3)

    print("[4/4] latency and report")
    policy = ws.eval_policy().eval()
    obs = {"obs": torch.as_tensor(ws.dataset[0]["obs"][None, : cfg.task.n_obs_steps])}
    latency = _latency_ms(policy, obs)
    curves = plot_training_curves(out / "train" / "logs.jsonl", out / "training_curves.png",
                                  title=f"drifting policy, PushT keypoints ({ws.step} steps)")
    report = {
        "mean_score": result["mean_score"], "n_test": result["n_test"],
        "train_steps": ws.step, "train_minutes": ws.train_seconds / 60,
        "samples_seen": ws.step * cfg.training.batch_size,
        "latency_ms_batch1": latency, "nfe": 1,
        "checkpoint": str(latest), "eval_json": str(out / "eval" / "eval.json"),
        "videos": result["videos"], "training_curves": str(curves), "data": expert_line,
    }
    (out / "report.json").write_text(json.dumps(report, indent=1))
    lines = [
        "# PushT keypoints, one-step drifting policy (CPU demo)", "",
        f"- mean_score: **{report['mean_score']:.3f}** over {report['n_test']} test seeds "
        "(100000 + i; episode score = max coverage / 0.95, clipped to 1)",
        f"- training: {ws.step} steps, {report['train_minutes']:.1f} min, "
        f"{report['samples_seen']} observation windows x G = {cfg.policy.gen_per_obs} chunks",
        f"- latency: {latency:.2f} ms per action chunk (batch 1, 1 network call, CPU)",
        f"- data: {expert_line}",
        f"- checkpoint: {latest}", f"- evaluation: {report['eval_json']}",
        f"- videos: {', '.join(result['videos'])}", f"- training curves: {curves}",
    ]
    (out / "report.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0
