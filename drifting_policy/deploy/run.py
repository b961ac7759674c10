"""`drifting-policy run`: a checkpoint's policy drives the task's simulated env in real time.

    drifting-policy run --checkpoint DIR --rate 10 --episodes 3 --out DIR
    drifting-policy run --checkpoint DIR --rate 10 --steps 300 --server tcp://127.0.0.1:5555 ...
    drifting-policy run --checkpoint DIR --rate 10 --steps 300 --onnx policy.onnx ...

The predictor is in-process (default), a policy server (`--server`) or an exported graph
(`--onnx`); all three keep the same contract (`deploy/contract.py`). The env comes from the
checkpoint's training config (task.env). Writes OUT/run.json (`LoopStats.summary()` + settings).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Mapping
from pathlib import Path

from drifting_policy.deploy.control_loop import LoopConfig, run_realtime
from drifting_policy.deploy.predictors import (
    OnnxPredictor,
    PolicyClient,
    add_predictor_arguments,
    load_predictor,
    warm_up,
)
from drifting_policy.deploy.robot import GymRobot


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", type=Path, required=True, help="checkpoint directory")
    p.add_argument("--rate", type=float, default=10.0, help="control rate, Hz")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--steps", type=int, default=None, help="control ticks to run")
    g.add_argument("--episodes", type=int, default=None, help="whole episodes (default 1)")
    p.add_argument("--lead", type=int, default=1,
                   help="control periods the policy has to answer an observation")
    p.add_argument("--temporal-ensemble", action="store_true",
                   help="ACT temporal ensembling instead of receding horizon")
    p.add_argument("--ensemble-coeff", type=float, default=0.01, help="ACT's m in exp(-m i)")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--server", default=None,
                       help="policy server address (tcp://HOST:PORT); default: in-process policy")
    where.add_argument("--onnx", type=Path, default=None,
                       help="run an exported graph (drifting-policy export) with onnxruntime")
    p.add_argument("--timeout-ms", type=int, default=2000, help="server request timeout")
    p.add_argument("--seed", type=int, default=100_000, help="seed of the first episode")
    p.add_argument("--warmup", type=int, default=3, help="untimed predictions before the loop")
    add_predictor_arguments(p)
    p.add_argument("--out", type=Path, required=True, help="writes OUT/run.json")


def main(args: argparse.Namespace) -> int:
    from omegaconf import OmegaConf

    from drifting_policy.checkpoint import load_train_config

    config = load_train_config(args.checkpoint)
    task = OmegaConf.to_container(config.task, resolve=True)
    k = 1 if args.n_samples is None else args.n_samples
    if args.server:
        predictor = PolicyClient(args.server, timeout_ms=args.timeout_ms,
                                 n_samples=args.n_samples)
    elif args.onnx:
        predictor = OnnxPredictor(args.onnx, n_samples=k)
    else:
        predictor = load_predictor(args.checkpoint, not args.no_ema, args.scheduler,
                                   args.num_inference_steps, args.device, k, args.compile)
    warm_up(predictor, args.warmup)
    cfg = LoopConfig(rate=args.rate, lead=args.lead, n_action_steps=predictor.n_action_steps,
                     ensemble_coeff=args.ensemble_coeff if args.temporal_ensemble else None)
    robot = GymRobot.from_task(task)
    episodes = args.episodes if args.steps is None else None
    try:
        stats = run_realtime(robot, predictor, cfg, steps=args.steps,
                             episodes=episodes or (1 if args.steps is None else None),
                             seed=args.seed)
    finally:
        robot.close()
    result = {**stats.summary(), "lead": cfg.lead, "n_action_steps": cfg.n_action_steps,
              "temporal_ensemble": cfg.ensemble_coeff, "checkpoint": str(args.checkpoint),
              "policy": config.policy.type, "task": task["name"], "server": args.server,
              "onnx": None if args.onnx is None else str(args.onnx),
              "n_samples": predictor.n_samples,
              "sampler": [args.scheduler, args.num_inference_steps]}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "run.json").write_text(json.dumps(result, indent=1))
    print(format_summary(result))
    print(f"wrote {args.out / 'run.json'}")
    return 0


def format_summary(r: Mapping) -> str:
    """One human-readable line per run."""
    def ms(x):
        return "-" if x is None else f"{x:.1f}"

    score = "" if r.get("mean_score") is None else f"  score {r['mean_score']:.3f}"
    return (f"{r['ticks']} ticks @ {r['rate_hz']:g} Hz (achieved {r['achieved_hz'] or 0:.2f}): "
            f"{r['deadline_misses']} deadline misses ({100 * r['deadline_miss_rate']:.1f}%), "
            f"{r['faults']} faults, inference p50/p95/p99 "
            f"{ms(r['p50_ms'])}/{ms(r['p95_ms'])}/{ms(r['p99_ms'])} ms, "
            f"min margin {ms(r['margin_min_ms'])} ms{score}")
