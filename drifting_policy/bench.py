"""`drifting-policy bench latency`: batch-1 time per action chunk, drifting vs DDPM-100 vs DDIM-10.

All three policies share one network architecture (same UNet widths, same observation encoder);
only the generator loop differs. For each (policy, obs) the network calls per predict_action are
counted (NFE) and the median wall time of `--calls` timed calls after warm-up is reported, with the
ratio to the drifting policy measured in the same run.

    drifting-policy bench latency --out benchmarks/results/latency_cpu.json          # paper sizes
    drifting-policy bench latency --quick --out /tmp/latency.json                     # CPU sizes
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch
from tqdm import tqdm

from drifting_policy.checkpoint import build_policy
from drifting_policy.config import compose
from drifting_policy.nn.normalizer import LinearNormalizer

# rows: name -> (policy config, overrides of its sampler)
POLICIES = {
    "drifting": ("drifting", []),
    "ddpm100": ("diffusion", ["policy.scheduler=ddpm", "policy.num_inference_steps=100"]),
    "ddim10": ("diffusion", ["policy.scheduler=ddim", "policy.num_inference_steps=10"]),
}
TASKS = {"lowdim": "pusht_lowdim", "image": "pusht_image"}
SIZES = {"cpu": {"lowdim": "cpu", "image": "cpu"},
         "paper": {"lowdim": "paper", "image": "paper_image"}}


def build(policy: str, obs: str, size: str) -> torch.nn.Module:
    """The PushT policy the training configs define (configs/policy, configs/size), untrained,
    with an identity-like normaliser: latency does not depend on the weights."""
    config, sampler = POLICIES[policy]
    cfg = compose("train_policy", [f"task={TASKS[obs]}", f"policy={config}",
                                   f"size={SIZES[size][obs]}", *sampler])
    p = build_policy(cfg)
    norm = LinearNormalizer()
    for key, m in p.shape_meta["obs"].items():
        norm.set_image(key) if m["type"] == "rgb" else norm.set_identity(key, m["shape"][0])
    norm.set_identity("action", p.action_dim)
    p.set_normalizer(norm)
    return p.eval()


def example_obs(obs: str) -> dict[str, torch.Tensor]:
    """Batch-1 observation with To = 2 frames."""
    if obs == "lowdim":
        return {"obs": torch.rand(1, 2, 20) * 512}
    return {"image": torch.rand(1, 2, 3, 96, 96), "agent_pos": torch.rand(1, 2, 2) * 512}


def count_nfe(policy, obs_dict) -> int:
    calls = []
    handle = policy.model.register_forward_hook(lambda *_: calls.append(1))
    policy.predict_action(obs_dict)
    handle.remove()
    return len(calls)


def time_ms(fn, calls: int, warmup: int) -> list[float]:
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(calls):
        t0 = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t0) * 1e3)
    return out


def latency(size: str, calls: int, warmup: int, obs_types: list[str], device: str) -> list[dict]:
    rows = []
    jobs = [(o, p) for o in obs_types for p in POLICIES]
    for obs, name in tqdm(jobs, desc="latency"):
        policy = build(name, obs, size).to(device)
        x = {k: v.to(device) for k, v in example_obs(obs).items()}

        def call(policy=policy, x=x):
            policy.predict_action(x)
            if device.startswith("cuda"):
                torch.cuda.synchronize()

        times = time_ms(call, calls, warmup)
        rows.append({"policy": name, "obs": obs, "nfe": count_nfe(policy, x),
                     "median_ms": statistics.median(times),
                     "p90_ms": statistics.quantiles(times, n=10)[-1],
                     "params": sum(p.numel() for p in policy.parameters()), "size": size})
    for r in rows:
        base = next(b for b in rows if b["obs"] == r["obs"] and b["policy"] == "drifting")
        r["ratio_to_drifting"] = r["median_ms"] / base["median_ms"]
    return rows


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("which", choices=["latency"])
    p.add_argument("--quick", action="store_true", help="size=cpu networks instead of the paper's")
    p.add_argument("--calls", type=int, default=30, help="timed calls per row (median reported)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--obs", nargs="+", default=["lowdim", "image"], choices=list(TASKS))
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/latency.json"))


def main(args: argparse.Namespace) -> int:
    torch.manual_seed(0)
    size = "cpu" if args.quick else "paper"
    with torch.inference_mode():
        rows = latency(size, args.calls, args.warmup, args.obs, args.device)
    print(f"{'policy':<10} {'obs':<7} {'NFE':>4} {'median ms':>10} {'p90 ms':>9} "
          f"{'x drifting':>11}")
    for r in rows:
        print(f"{r['policy']:<10} {r['obs']:<7} {r['nfe']:>4} {r['median_ms']:>10.2f} "
              f"{r['p90_ms']:>9.2f} {r['ratio_to_drifting']:>11.1f}")
    meta = {"size": size, "device": args.device, "calls": args.calls, "torch": torch.__version__,
            "threads": torch.get_num_threads(), "machine": platform.machine(),
            "processor": platform.processor()}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    print(f"wrote {args.out}")
    return 0
