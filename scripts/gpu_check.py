"""GPU smoke check (`make gpu-check`): every GPU code path once, timed, in one JSON.

For a machine with one GPU, no network and its own torch (run from the source tree):

    PYTHONPATH=. python scripts/gpu_check.py                    # ~5 min on one GPU
    PYTHONPATH=. python scripts/gpu_check.py --cpu-smoke        # tiny sizes on the CPU (~3 min)

Each step is a separate process (the project's own command lines), so one failure is recorded and
the rest still run:
 1. PushT expert demonstrations (zarr with images, keypoints and states), written here;
 2. paper-size PushT lowdim drifting policy: 100 steps, then resumed to 200;
 3. PushT image drifting policy (paper image sizes), 100 steps, DataLoader workers;
 4. PushT lowdim diffusion policy, 100 steps;
 5. `bench latency` on the device: drifting vs DDIM-10 vs DDPM-100, lowdim and image;
 6. eval / run (eager and, on a GPU, compiled with CUDA graphs) / serve (+ a client) / export
    of the lowdim drifting checkpoint;
 7. image_gen on digits: MAE, generator, resume, sample;
 8. a DiT-B/2 throughput probe (generator forward + backward, bf16; no drift loss, no MAE).

It writes benchmarks/results/gpu_check_<device>.json (or --out): versions, per-step status,
seconds and rc (with the output's tail on failure), s/step and peak memory of each training,
the latency table and B/2 images/s. Exit status 1 if any step failed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PORT = 5587


@dataclass(frozen=True)
class Budget:
    """What one mode runs: step counts and sizes."""

    episodes: int
    size_lowdim: str
    size_image: str
    steps: int            # lowdim drifting: this many, then resumed to 2x
    steps_image: int
    steps_diffusion: int
    overrides: tuple[str, ...]  # extra training overrides
    latency: tuple[str, ...]
    n_test: int
    ticks: int
    image_gen: tuple[str, ...]
    image_gen_steps: int
    probe: str            # DiT preset of the throughput probe
    probe_batch: int
    probe_iters: int
    timeout: int          # seconds per step
    device: str
    workers: int          # DataLoader workers of the image run


GPU = Budget(episodes=40, size_lowdim="paper", size_image="paper_image", steps=100,
             steps_image=100, steps_diffusion=100,
             overrides=("training.log_every=10", "training.val_every=100"),
             latency=("--size", "paper", "--calls", "20", "--warmup", "5"),
             n_test=4, ticks=100, image_gen=("device=null",), image_gen_steps=100,
             probe="B/2", probe_batch=256, probe_iters=20, timeout=420, device="cuda",
             workers=4)
CPU_SMOKE = Budget(episodes=3, size_lowdim="cpu", size_image="cpu", steps=4, steps_image=3,
                   steps_diffusion=3,
                   overrides=("training.log_every=1", "training.val_every=2",
                              "training.batch_size=8", "policy.down_dims=[16,32]",
                              "policy.diffusion_step_embed_dim=16", "task.env.max_steps=16"),
                   latency=("--size", "cpu", "--calls", "3", "--warmup", "1"),
                   n_test=1, ticks=8, image_gen=("device=cpu",), image_gen_steps=2,
                   probe="tiny", probe_batch=4, probe_iters=2, timeout=300, device="cpu",
                   workers=2)


@dataclass
class Check:
    """Results collected so far (the JSON's content)."""

    budget: Budget
    work: Path
    steps: list[dict] = field(default_factory=list)
    results: dict = field(default_factory=dict)

    def run(self, name: str, args: list[str], timeout: int | None = None) -> dict:
        """Run one command (python -m ...), record status, seconds, rc and on failure the
        output's tail; returns the record with `stdout`."""
        t0 = time.perf_counter()
        try:
            proc = subprocess.run([sys.executable, *args], cwd=ROOT, env=_env(),
                                  capture_output=True, text=True,
                                  timeout=timeout or self.budget.timeout)
            status = "ok" if proc.returncode == 0 else "failed"
            rc, stdout, out = proc.returncode, proc.stdout, proc.stdout + proc.stderr
        except subprocess.TimeoutExpired as e:
            status, rc = "timeout", None
            stdout, out = _text(e.stdout), _text(e.stdout) + _text(e.stderr)
        record = {"name": name, "status": status, "rc": rc,
                  "seconds": round(time.perf_counter() - t0, 2),
                  "command": " ".join(args)}
        if status != "ok":
            record["tail"] = out[-3000:]
        print(f"[{status:>7}] {name} ({record['seconds']:.1f} s)", flush=True)
        self.steps.append(record)
        return {**record, "stdout": stdout}



def _text(x) -> str:
    return x.decode(errors="replace") if isinstance(x, bytes) else (x or "")


def _env() -> dict:
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1", "MPLBACKEND": "Agg"}
    return env


def _last_json(text: str) -> dict | None:
    """The last JSON object printed at the start of a line (a command's summary)."""
    for start in reversed([i for i, c in enumerate(text) if c == "{" and
                           (i == 0 or text[i - 1] == "\n")]):
        try:
            return json.JSONDecoder().raw_decode(text[start:])[0]
        except json.JSONDecodeError:
            continue
    return None


def _s_per_step(run_dir: Path, skip: int) -> float | None:
    """Seconds per optimisation step from logs.jsonl, after the first `skip` steps (warm-up,
    allocator growth); train_seconds is measured after a device synchronize."""
    path = run_dir / "logs.jsonl"
    if not path.is_file():
        return None
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    rows = [r for r in rows if "train/loss" in r and r["step"] > skip]
    if len(rows) < 2:
        return None
    first, last = rows[0], rows[-1]
    return (last["train_seconds"] - first["train_seconds"]) / (last["step"] - first["step"])


# ---------------------------------------------------------------------------------- steps
def demos(c: Check) -> Path:
    data = c.work / "pusht.zarr"
    c.run("demos_pusht", ["-m", "drifting_policy.cli", "demos", "pusht", "--episodes",
                          str(c.budget.episodes), "--out", str(data), "--force"])
    return data


def train(c: Check, name: str, run_dir: Path, task: str, policy: str, size: str, steps: int,
          data: Path, extra: tuple[str, ...] = (), skip: int = 0) -> Path:
    """One training run to `steps`; records s/step (over the steps after `skip` + 10) and peak
    memory under results[name]; returns its checkpoints/latest."""
    b = c.budget
    args = ["-m", "drifting_policy.cli", "train", f"task={task}", f"policy={policy}",
            f"size={size}", f"run_dir={run_dir}", f"task.dataset.path={data}",
            f"device={b.device}", "logging.mode=disabled", f"training.num_steps={steps}",
            "training.rollout_every=0", f"training.checkpoint_every={steps}",
            "training.lr_warmup_steps=10", *b.overrides, *extra]
    out = c.run(name, args)
    summary = _last_json(out["stdout"]) or {}
    c.results[name] = {"steps": summary.get("step"), "train_seconds": summary.get("train_seconds"),
                       "peak_memory_gb": summary.get("peak_memory_gb"),
                       "s_per_step": _s_per_step(run_dir, skip + min(10, (steps - skip) // 2))}
    return run_dir / "checkpoints" / "latest"


def bench_latency(c: Check) -> None:
    out = c.work / "latency.json"
    c.run("bench_latency", ["-m", "drifting_policy.cli", "bench", "latency", "--device",
                            c.budget.device, *c.budget.latency, "--out", str(out)])
    if out.is_file():
        rows = json.loads(out.read_text())["rows"]
        c.results["latency"] = [{k: r[k] for k in ("policy", "obs", "nfe", "median_ms", "p90_ms",
                                                    "ratio_to_drifting")} for r in rows]


def deploy(c: Check, ckpt: Path) -> None:
    """eval, run, serve + run through the server, export of one checkpoint."""
    b = c.budget
    cli = ["-m", "drifting_policy.cli"]
    c.run("eval", [*cli, "eval", "--checkpoint", str(ckpt), "--n-test", str(b.n_test),
                   "--n-envs", "1", "--n-videos", "0", "--out", str(c.work / "eval"),
                   "--device", b.device])
    c.run("run", [*cli, "run", "--checkpoint", str(ckpt), "--steps", str(b.ticks), "--rate",
                  "50", "--out", str(c.work / "run"), "--device", b.device])
    if b.device == "cuda":  # the one-step graph under CUDA graphs (torch.compile reduce-overhead)
        c.run("run_compiled", [*cli, "run", "--checkpoint", str(ckpt), "--steps", str(b.ticks),
                               "--rate", "50", "--out", str(c.work / "run_compiled"),
                               "--device", b.device, "--compile", "reduce-overhead"])
    server = subprocess.Popen(
        [sys.executable, *cli, "serve", "--checkpoint", str(ckpt), "--bind",
         f"tcp://127.0.0.1:{PORT}", "--device", b.device],
        cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        c.run("serve_run_client", [*cli, "run", "--checkpoint", str(ckpt), "--server",
                                   f"tcp://127.0.0.1:{PORT}", "--timeout-ms", "60000",
                                   "--steps", str(b.ticks), "--rate", "50",
                                   "--out", str(c.work / "run_served")])
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            tail = server.communicate(timeout=60)[0]
        except subprocess.TimeoutExpired:
            server.kill()
            tail = server.communicate()[0]
    c.steps.append({"name": "serve", "status": "ok" if server.returncode == 0 else "failed",
                    "rc": server.returncode, "seconds": None, "tail": tail[-2000:]})
    c.run("export_onnx", [*cli, "export", "--checkpoint", str(ckpt), "--out",
                          str(c.work / "policy.onnx")])


def image_gen(c: Check) -> None:
    b = c.budget
    cli = ["-m", "image_gen.cli"]
    mae, gen = c.work / "ig_mae", c.work / "ig_generator"
    common = [*b.image_gen, "train.wandb_mode=disabled", "train.progress=false"]
    out = c.run("image_gen_mae", [*cli, "train-mae", "--config", "digits_mae",
                                  f"train.out={mae}", f"train.steps={b.image_gen_steps}",
                                  "mae_train.cls_steps=2", *common])
    mae_ckpt = _printed_path(out) or mae
    gen_args = [*cli, "train", "--config", "digits", f"train.out={gen}",
                f"encoder.path={mae_ckpt}", *common]
    c.run("image_gen_generator", [*gen_args, f"train.steps={b.image_gen_steps}"])
    out = c.run("image_gen_resume", [*gen_args, f"train.steps={2 * b.image_gen_steps}"])
    c.run("image_gen_sample", [*cli, "sample", "--checkpoint", _printed_path(out) or str(gen),
                               "--n", "20",
                               "--out", str(c.work / "ig_samples"), "--device", b.device])


def _printed_path(out: dict) -> str | None:
    """The checkpoint path `image-gen train` / `train-mae` print on their last stdout line."""
    lines = out["stdout"].strip().splitlines()
    return lines[-1].strip() if out["status"] == "ok" and lines else None


def probe(c: Check) -> None:
    b = c.budget
    out = c.run("dit_throughput", [str(Path(__file__).resolve()), "--probe", b.probe,
                                   "--probe-batch", str(b.probe_batch), "--probe-iters",
                                   str(b.probe_iters), "--device", b.device])
    result = _last_json(out["stdout"])
    if result:
        c.results["dit_throughput"] = result


def run_probe(preset: str, batch: int, iters: int, device: str) -> dict:
    """DiT generator forward + backward (bf16 autocast on CUDA) on random inputs: images/s."""
    import torch

    from image_gen.dit import DiT

    dev = torch.device(device)
    cuda = dev.type == "cuda"
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    model = DiT.from_preset(preset).to(dev).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True if cuda else None)
    labels = torch.randint(0, model.num_classes, (batch,), device=dev)
    alpha = torch.ones(batch, device=dev)

    def step() -> None:
        noise, style = model.sample_inputs(batch, dev)
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=cuda):
            out = model(noise, labels, alpha, style, validate=False)
        loss = out.float().square().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for _ in range(3):
        step()
    if cuda:
        torch.cuda.synchronize(dev)
        torch.cuda.reset_peak_memory_stats(dev)
    t0 = time.perf_counter()
    for _ in range(iters):
        step()
    if cuda:
        torch.cuda.synchronize(dev)
    seconds = time.perf_counter() - t0
    return {"preset": preset, "batch": batch, "iters": iters,
            "params_m": sum(p.numel() for p in model.parameters()) / 1e6,
            "s_per_step": seconds / iters, "images_per_s": batch * iters / seconds,
            "peak_memory_gb": torch.cuda.max_memory_allocated(dev) / 2**30 if cuda else None,
            "what": "generator forward + backward + AdamW only (no drift loss, no MAE)"}


# ---------------------------------------------------------------------------------- main
def versions() -> dict:
    import numpy
    import torch

    info = {"python": platform.python_version(), "torch": torch.__version__,
            "numpy": numpy.__version__, "cuda": torch.version.cuda,
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "machine": platform.machine(), "cpus": os.cpu_count()}
    for name in ("diffusers", "torchvision", "onnxruntime", "zarr"):
        try:
            info[name] = __import__(name).__version__
        except Exception as e:  # noqa: BLE001 - a missing package is a result, not a crash
            info[name] = f"unavailable: {type(e).__name__}"
    return info


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cpu-smoke", action="store_true", help="tiny sizes on the CPU")
    p.add_argument("--out", type=Path, default=None,
                   help="JSON (default benchmarks/results/gpu_check_<gpu|cpu_smoke>.json)")
    p.add_argument("--work", type=Path, default=None,
                   help="scratch folder; each run writes a fresh subfolder (default "
                        "outputs/gpu_check)")
    p.add_argument("--probe", default=None, help=argparse.SUPPRESS)
    p.add_argument("--probe-batch", type=int, default=256, help=argparse.SUPPRESS)
    p.add_argument("--probe-iters", type=int, default=20, help=argparse.SUPPRESS)
    p.add_argument("--device", default="cuda", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.probe:  # the throughput probe's own process
        print(json.dumps(run_probe(args.probe, args.probe_batch, args.probe_iters, args.device)))
        return 0

    b = CPU_SMOKE if args.cpu_smoke else GPU
    mode = "cpu_smoke" if args.cpu_smoke else "gpu"
    info = versions()
    if not args.cpu_smoke and info["gpu"] is None:
        print("no CUDA device: use --cpu-smoke on a machine without a GPU", file=sys.stderr)
        return 2
    work = (args.work or ROOT / "outputs" / "gpu_check") / time.strftime("%Y%m%d-%H%M%S")
    work.mkdir(parents=True)
    out = args.out or ROOT / "benchmarks" / "results" / f"gpu_check_{mode}.json"
    c = Check(b, work)
    t0 = time.perf_counter()

    data = demos(c)
    lowdim = work / "lowdim_drifting"
    train(c, "train_lowdim_drifting", lowdim, "pusht_lowdim", "drifting", b.size_lowdim, b.steps,
          data)
    ckpt = train(c, "train_lowdim_drifting_resumed", lowdim, "pusht_lowdim", "drifting",
                 b.size_lowdim, 2 * b.steps, data, ("resume=true",), skip=b.steps)
    train(c, "train_image_drifting", work / "image_drifting", "pusht_image", "drifting",
          b.size_image, b.steps_image, data, (f"training.num_workers={b.workers}",))
    train(c, "train_lowdim_diffusion", work / "lowdim_diffusion", "pusht_lowdim", "diffusion",
          b.size_lowdim, b.steps_diffusion, data)
    bench_latency(c)
    deploy(c, ckpt)
    image_gen(c)
    probe(c)

    failed = [s["name"] for s in c.steps if s["status"] != "ok"]
    result = {"mode": mode, "versions": info, "total_seconds": round(time.perf_counter() - t0, 1),
              "failed": failed, "steps": c.steps, "results": c.results}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(f"wrote {out}; {len(c.steps) - len(failed)}/{len(c.steps)} steps ok"
          + (f"; failed: {failed}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
