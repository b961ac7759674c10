"""Drifting (1 NFE) vs the Diffusion Policy baseline on one task, same data, same budget.

Both policies use the same ConditionalUnet1D size, the same generated expert demos, the same
optimiser settings and the same training budget: wall-clock minutes of optimisation (--minutes,
the default) or optimiser steps (--steps; drifting costs more per step, G chunks per
observation). Each is then evaluated on the same test seeds (100000 + i); the diffusion policy
with DDPM-100 (as trained) and DDIM-10 (same weights). Reports mean_score and the task's extra
metrics (BlockPush p1/p2, Kitchen p1..p4, ...), steps, observation windows and generated chunks
seen, train minutes and batch-1 latency; writes JSON and a training-curve figure per policy.

Scoring follows Diffusion Policy: with --rollout-every N the EMA policy is rolled out every N
steps during training (with the policy's own sampler: DDPM-100 for diffusion unless overridden,
e.g. `policy.scheduler=ddim policy.num_inference_steps=10`), and each run reports the max and the
mean of its last k rollouts (--last-k, 10); --seeds S trains S seeds per policy and the summary
gives mean +- std over seeds of the final score, the max and the mean of the last k.

    python benchmarks/compare.py --task pusht_lowdim --minutes 12 \
        --out benchmarks/results/pusht_compare_cpu.json
    python benchmarks/compare.py --task blockpush_lowdim --data data/blockpush.zarr ...
    python benchmarks/compare.py --task lift_lowdim --steps 3000   # equal optimiser steps
    python benchmarks/compare.py --task tool_hang_lowdim --policies drifting --minutes 10
    python benchmarks/compare.py --task lift_lowdim --steps 3000 --seeds 2 --rollout-every 500
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import statistics
import sys
from functools import partial
from pathlib import Path

import torch

from drifting_policy.bench import time_ms
from drifting_policy.checkpoint import load_policy
from drifting_policy.config import compose
from drifting_policy.eval import evaluate
from drifting_policy.plots import plot_training_curves
from drifting_policy.train import TrainWorkspace


def _sampler(name: str) -> tuple[str, int]:
    """'ddim10' -> ('ddim', 10)."""
    match = re.fullmatch(r"(ddpm|ddim)(\d+)", name)
    if match is None:
        raise ValueError(f"--diffusion-samplers: expected ddpmN or ddimN, got {name!r}")
    return match[1], int(match[2])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--task", default="pusht_lowdim", help="configs/task/<TASK>.yaml")
    p.add_argument("--data", type=Path, default=None, help="dataset (default: the task's path)")
    budget_args = p.add_mutually_exclusive_group()
    budget_args.add_argument("--minutes", type=float, default=None,
                        help="training budget per policy in minutes (default 12)")
    budget_args.add_argument("--steps", type=int, default=None,
                        help="training budget per policy in optimiser steps")
    p.add_argument("--policies", default="drifting,diffusion",
                   help="comma-separated subset of drifting,diffusion")
    p.add_argument("--n-test", type=int, default=50)
    p.add_argument("--n-envs", type=int, default=10)
    p.add_argument("--size", default="cpu")
    p.add_argument("--work", type=Path, default=None, help="default: outputs/compare_<TASK>")
    p.add_argument("--out", type=Path, default=None,
                   help="default: benchmarks/results/<TASK>_compare_cpu.json")
    p.add_argument("--diffusion-samplers", default="ddpm100,ddim10",
                   help="samplers to evaluate the diffusion weights with (ddpmN / ddimN)")
    p.add_argument("--seeds", type=int, default=1, help="training seeds per policy (42, 43, ..)")
    p.add_argument("--rollout-every", type=int, default=0,
                   help="periodic rollouts of the EMA policy every N steps (0: final eval only)")
    p.add_argument("--last-k", type=int, default=10, help="DP's mean of the last k rollouts")
    p.add_argument("overrides", nargs="*", help="extra hydra overrides for both policies")
    args = p.parse_args()
    policies = args.policies.split(",")
    if not policies or not set(policies) <= {"drifting", "diffusion"}:
        p.error(f"--policies: expected a subset of drifting,diffusion, got {args.policies!r}")
    if args.steps is None and args.minutes is None:
        args.minutes = 12.0
    budget = ([f"training.num_steps={args.steps}", "training.max_minutes=null"]
              if args.steps else ["training.num_steps=1000000",
                                  f"training.max_minutes={args.minutes}"])
    budget_name = f"{args.steps} steps" if args.steps else f"{args.minutes:g} min"
    args.work = args.work or Path(f"outputs/compare_{args.task}")
    args.out = args.out or Path(f"benchmarks/results/{args.task}_compare_cpu.json")
    data = [f"task.dataset.path={args.data}"] if args.data else []

    rows = []
    for seed, policy_name in [(42 + i, name) for i in range(args.seeds) for name in policies]:
        run_dir = args.work / f"{policy_name}_seed{seed}"
        cfg = compose("train_policy", [
            f"task={args.task}", f"policy={policy_name}", f"size={args.size}", f"seed={seed}",
            f"run_dir={run_dir}", *data, *budget, f"training.rollout_every={args.rollout_every}",
            f"training.rollout.n_test={args.n_test}", f"task.runner.n_envs={args.n_envs}",
            f"training.score_last_k={args.last_k}", "training.final_rollout=false",
            "training.checkpoint_every=1000", "training.val_every=500", "logging.mode=disabled",
            *args.overrides,
        ])
        ws = TrainWorkspace(cfg)
        ws.run()
        protocol = ws.score_summary()
        plot_training_curves(run_dir / "logs.jsonl",
                             args.work / f"{policy_name}_seed{seed}_curves.png",
                             title=f"{policy_name}, {args.task}, {budget_name}, seed {seed}")
        ckpt = run_dir / "checkpoints" / "latest"
        variants = [("drifting", None)] if policy_name == "drifting" else [
            (name, _sampler(name)) for name in args.diffusion_samplers.split(",")]
        for name, sampler in variants:
            policy, _ = load_policy(ckpt)
            if sampler:  # same weights, chosen sampler
                policy.set_inference(*sampler)
            result = evaluate(ckpt, args.work / f"eval_{name}", n_test=args.n_test,
                              n_envs=args.n_envs, n_videos=2, policy=policy)
            sample = ws.dataset[0]["obs"]
            sample = sample if isinstance(sample, dict) else {"obs": sample}
            obs = {k: v[None, : cfg.task.n_obs_steps] for k, v in sample.items()}
            with torch.inference_mode():
                latency = statistics.median(time_ms(partial(policy.predict_action, obs), 30, 3))
            extra = {k: v for k, v in result.items()  # the task's metric hook (p1, p2, ...)
                     if isinstance(v, float) and k not in ("mean_score", "eval_seconds")}
            rows.append({
                "policy": name, "seed": seed, "mean_score": result["mean_score"], **extra,
                "score_max": protocol.get("test/max_score"),
                "score_mean_last_k": protocol.get("test/mean_last_k"), "k": protocol.get("test/k"),
                "n_test": result["n_test"],
                "train_steps": ws.step, "train_minutes": ws.train_seconds / 60,
                "obs_windows_seen": ws.step * cfg.training.batch_size,
                "chunks_generated_in_training": ws.step * cfg.training.batch_size * (
                    cfg.policy.gen_per_obs if policy_name == "drifting" else 1),
                "latency_ms": latency, "eval_seconds": result["eval_seconds"],
            })

    metric_keys = ["mean_score"] + [k for k in rows[0] if re.fullmatch(r"p\d+", k)]
    print(f"{'policy':<9} {'seed':>4} " + " ".join(f"{k[:10]:>10}" for k in metric_keys)
          + f" {'max':>6} {'last-k':>6} {'steps':>7} {'minutes':>8} {'latency ms':>11}")
    for r in rows:
        protocol = " ".join("     -" if r[k] is None else f"{r[k]:>6.3f}"
                            for k in ("score_max", "score_mean_last_k"))
        print(f"{r['policy']:<9} {r['seed']:>4} " + " ".join(f"{r[k]:>10.3f}" for k in metric_keys)
              + f" {protocol} {r['train_steps']:>7} {r['train_minutes']:>8.1f} "
              f"{r['latency_ms']:>11.2f}")
    summary = summarise(rows, ["mean_score", "score_max", "score_mean_last_k", *metric_keys[1:]])
    for name, stats in summary.items():
        print(f"{name:<9} over {stats['n_seeds']} seed(s): " + ", ".join(
            f"{k} {v['mean']:.3f} +- {v['std']:.3f}" for k, v in stats.items() if k != "n_seeds"))
    meta = {"task": args.task, "data": str(args.data or cfg.task.dataset.path),
            "minutes_per_policy": args.minutes, "steps_per_policy": args.steps,
            "size": args.size,
            "n_test": args.n_test, "torch": torch.__version__, "threads": torch.get_num_threads(),
            "machine": platform.machine(),
            "command": "python benchmarks/compare.py " + " ".join(sys.argv[1:])}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    meta.update(seeds=[42 + i for i in range(args.seeds)], rollout_every=args.rollout_every,
                last_k=args.last_k)
    args.out.write_text(json.dumps({"meta": meta, "rows": rows, "summary": summary}, indent=1))
    print(f"wrote {args.out}")


def summarise(rows: list[dict], keys: list[str]) -> dict[str, dict]:
    """{policy: {key: {"mean", "std"} over seeds, "n_seeds"}} (std 0 for one seed)."""
    out: dict[str, dict] = {}
    for name in dict.fromkeys(r["policy"] for r in rows):
        mine = [r for r in rows if r["policy"] == name]
        out[name] = {"n_seeds": len(mine)}
        for k in keys:
            values = [r[k] for r in mine if r.get(k) is not None]
            if values:
                out[name][k] = {"mean": statistics.fmean(values),
                                "std": statistics.pstdev(values) if len(values) > 1 else 0.0}
    return out


if __name__ == "__main__":
    main()
