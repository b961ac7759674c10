"""`drifting-policy bench {latency,control,export}`: drifting vs DDPM-100 vs DDIM-10 on PushT.

All three policies share one network architecture (same UNet widths, same observation encoder);
only the generator loop differs. Policies are built from the training configs, untrained (timing
does not depend on the weights).

latency: for each (policy, obs) the network calls per predict_action are counted (NFE) and the
    median wall time of `--calls` timed batch-1 calls after warm-up is reported, with the ratio to
    the drifting policy measured in the same run.
control: each policy drives the simulated PushT through the real-time loop
    (drifting_policy.deploy.control_loop, receding horizon, `--lead` periods to answer) for a fixed
    number of ticks at 10 / 50 / 100 Hz: deadline-miss rate, inference p50/p99, achieved rate;
    `sustainable_hz` is the highest tested rate without a miss.
export: the drifting policy in PyTorch vs its ONNX graph in onnxruntime (CPU, batch 1).

    drifting-policy bench latency --out benchmarks/results/latency_cpu.json          # paper sizes
    drifting-policy bench latency --quick --out /tmp/latency.json                     # CPU sizes
    drifting-policy bench control --size cpu --out benchmarks/results/control_cpu.json
    drifting-policy bench export --out benchmarks/results/export_latency_cpu.json
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import time
from pathlib import Path

import torch
from tqdm import tqdm

from drifting_policy.config import compose
from drifting_policy.nn.normalizer import LinearNormalizer
from drifting_policy.policy import config_from_dict, make_policy

# rows: name -> (policy config, overrides of its sampler)
POLICIES = {
    "drifting": ("drifting", []),
    "ddpm100": ("diffusion", ["policy.scheduler=ddpm", "policy.num_inference_steps=100"]),
    "ddim10": ("diffusion", ["policy.scheduler=ddim", "policy.num_inference_steps=10"]),
}
TASKS = {"lowdim": "pusht_lowdim", "image": "pusht_image"}
SIZES = {"cpu": {"lowdim": "cpu", "image": "cpu"},
         "paper": {"lowdim": "paper", "image": "paper_image"}}


def task_config(obs: str) -> dict:
    """The PushT task config (configs/task) of an obs type, as a plain dict."""
    from omegaconf import OmegaConf

    cfg = compose("train_policy", [f"task={TASKS[obs]}"])
    return OmegaConf.to_container(cfg.task, resolve=True)


def build(policy: str, obs: str, size: str) -> torch.nn.Module:
    """The PushT policy the training configs define (configs/policy, configs/size), untrained,
    with an identity-like normaliser: latency does not depend on the weights."""
    config, sampler = POLICIES[policy]
    cfg = compose("train_policy", [f"task={TASKS[obs]}", f"policy={config}",
                                   f"size={SIZES[size][obs]}", *sampler])
    from omegaconf import OmegaConf

    p = make_policy(config_from_dict(OmegaConf.to_container(cfg.policy, resolve=True)))
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


def control(size: str, obs_types: list[str], rates: list[float], seconds: float,
            min_ticks: int, lead: int, warmup: int) -> list[dict]:
    """Real-time loop rows: every (obs, policy, rate) runs max(min_ticks, seconds * rate) ticks
    of PushT from seed 100000 (the robot resets when an episode ends), after `warmup` untimed
    predictions."""
    from drifting_policy.deploy.control_loop import LoopConfig, run_realtime
    from drifting_policy.deploy.predictors import LocalPredictor
    from drifting_policy.deploy.robot import GymRobot

    rows = []
    jobs = [(o, p) for o in obs_types for p in POLICIES]
    for obs, name in tqdm(jobs, desc="control"):
        predictor = LocalPredictor(build(name, obs, size))
        robot = GymRobot.from_task(task_config(obs))
        robot.reset(0)
        for _ in range(warmup):
            predictor.predict(robot.get_observation())
        try:
            for rate in rates:
                cfg = LoopConfig(rate=rate, lead=lead, n_action_steps=predictor.n_action_steps)
                ticks = max(min_ticks, round(seconds * rate))
                stats = run_realtime(robot, predictor, cfg, steps=ticks, progress=False)
                summary = {k: v for k, v in stats.summary().items() if k != "scores"}
                p99 = summary["p99_ms"]
                need = None if p99 is None else math.ceil(p99 * rate / 1e3)
                rows.append({"policy": name, "obs": obs, **summary, "lead": lead,
                             "lead_needed_p99": need, "size": size})
        finally:
            robot.close()
    return rows


def sustainable(rows: list[dict]) -> dict[str, float | None]:
    """{"policy/obs": highest rate_hz of its rows with zero deadline misses (None: none)}."""
    out: dict[str, float | None] = {}
    for r in rows:
        key = f"{r['policy']}/{r['obs']}"
        ok = r["deadline_misses"] == 0
        out[key] = max(out.get(key) or 0, r["rate_hz"]) if ok else out.get(key)
    return out


def export_latency(size: str, calls: int, warmup: int, obs_types: list[str]) -> list[dict]:
    """Drifting policy, batch 1: PyTorch (the exported computation) vs onnxruntime, both with
    torch's thread count; max |difference| of their actions on the timed input."""
    import tempfile

    from drifting_policy.deploy.export import example_inputs, export_onnx
    from drifting_policy.deploy.graph import OneStepGraph
    from drifting_policy.deploy.predictors import ort_session

    rows = []
    for obs in tqdm(obs_types, desc="export"):
        policy = build("drifting", obs, size)
        graph = OneStepGraph(policy)
        inputs = example_inputs(policy)
        args = [torch.from_numpy(inputs[k]) for k in [*graph.keys, "noise"]]
        with tempfile.TemporaryDirectory() as tmp:
            path = export_onnx(policy, Path(tmp) / "policy.onnx")
            session = ort_session(path, threads=torch.get_num_threads())
            mb = path.stat().st_size / 1e6
            ort_ms = time_ms(lambda s=session, x=inputs: s.run(["action"], x), calls, warmup)
            diff = float(abs(session.run(["action"], inputs)[0] - graph(*args)[0].numpy()).max())
        torch_ms = time_ms(lambda g=graph, a=args: g(*a), calls, warmup)
        rows.append({"obs": obs, "size": size, "torch_median_ms": statistics.median(torch_ms),
                     "ort_median_ms": statistics.median(ort_ms),
                     "torch_p90_ms": statistics.quantiles(torch_ms, n=10)[-1],
                     "ort_p90_ms": statistics.quantiles(ort_ms, n=10)[-1],
                     "speedup": statistics.median(torch_ms) / statistics.median(ort_ms),
                     "max_abs_diff": diff, "onnx_mb": mb})
    return rows


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("which", choices=["latency", "control", "export"])
    p.add_argument("--quick", action="store_true",
                   help="size=cpu networks instead of the paper's (control: fewer ticks too)")
    p.add_argument("--size", choices=list(SIZES), default=None,
                   help="network sizes (default: cpu with --quick, else paper)")
    p.add_argument("--calls", type=int, default=30, help="timed calls per row (median reported)")
    p.add_argument("--warmup", type=int, default=3, help="untimed calls first")
    p.add_argument("--obs", nargs="+", default=["lowdim", "image"], choices=list(TASKS))
    p.add_argument("--device", default="auto",
                   help="latency only: auto (cuda when present) | cpu | cuda[:N]")
    p.add_argument("--rates", nargs="+", type=float, default=[10.0, 50.0, 100.0],
                   help="control: rates (Hz)")
    p.add_argument("--seconds", type=float, default=None,
                   help="control: seconds of control per row (default 6, --quick 2)")
    p.add_argument("--lead", type=int, default=1, help="control: periods the policy has to answer")
    p.add_argument("--out", type=Path, default=None,
                   help="JSON file (default benchmarks/results/<which>.json)")


def _meta(args: argparse.Namespace, size: str) -> dict:
    return {"size": size, "device": args.device, "calls": args.calls, "torch": torch.__version__,
            "threads": torch.get_num_threads(), "machine": platform.machine(),
            "processor": platform.processor()}


def _print_latency(rows: list[dict]) -> None:
    print(f"{'policy':<10} {'obs':<7} {'NFE':>4} {'median ms':>10} {'p90 ms':>9} "
          f"{'x drifting':>11}")
    for r in rows:
        print(f"{r['policy']:<10} {r['obs']:<7} {r['nfe']:>4} {r['median_ms']:>10.2f} "
              f"{r['p90_ms']:>9.2f} {r['ratio_to_drifting']:>11.1f}")


def _print_control(rows: list[dict]) -> None:
    print(f"{'policy':<10} {'obs':<7} {'Hz':>5} {'ticks':>6} {'miss %':>7} {'p50 ms':>8} "
          f"{'p99 ms':>8} {'achieved Hz':>12}")
    for r in rows:
        p50 = "-" if r["p50_ms"] is None else f"{r['p50_ms']:.1f}"
        p99 = "-" if r["p99_ms"] is None else f"{r['p99_ms']:.1f}"
        print(f"{r['policy']:<10} {r['obs']:<7} {r['rate_hz']:>5g} {r['ticks']:>6} "
              f"{100 * r['deadline_miss_rate']:>7.1f} {p50:>8} {p99:>8} "
              f"{r['achieved_hz'] or 0:>12.2f}")


def _print_export(rows: list[dict]) -> None:
    print(f"{'obs':<7} {'torch ms':>9} {'onnxruntime ms':>15} {'speedup':>8} {'max |diff|':>11}")
    for r in rows:
        print(f"{r['obs']:<7} {r['torch_median_ms']:>9.2f} {r['ort_median_ms']:>15.2f} "
              f"{r['speedup']:>8.2f} {r['max_abs_diff']:>11.1e}")


def main(args: argparse.Namespace) -> int:
    from drifting_policy.deploy.contract import resolve_device

    torch.manual_seed(0)
    args.device = str(resolve_device(args.device))
    size = args.size or ("cpu" if args.quick else "paper")
    out = args.out or Path(f"benchmarks/results/{args.which}.json")
    meta = _meta(args, size)
    with torch.inference_mode(args.which != "export"):  # export traces: plain no_grad
        if args.which == "latency":
            rows = latency(size, args.calls, args.warmup, args.obs, args.device)
            _print_latency(rows)
            result = {"meta": meta, "rows": rows}
        elif args.which == "control":
            seconds = args.seconds or (2.0 if args.quick else 6.0)
            rows = control(size, args.obs, args.rates, seconds, 20 if args.quick else 60,
                           args.lead, args.warmup)
            _print_control(rows)
            meta.update(seconds=seconds, lead=args.lead, device="cpu")
            result = {"meta": meta, "rows": rows, "sustainable_hz": sustainable(rows)}
            print("sustainable (no deadline miss):", result["sustainable_hz"])
        else:
            with torch.no_grad():
                rows = export_latency(size, args.calls, args.warmup, args.obs)
            _print_export(rows)
            result = {"meta": {**meta, "device": "cpu"}, "rows": rows}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(f"wrote {out}")
    return 0
