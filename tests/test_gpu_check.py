"""scripts/gpu_check.py (`make gpu-check`): its parsing of the commands' output, and (slow) the
whole check end to end at CPU sizes (`--cpu-smoke`)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "gpu_check.py"


def _module():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_summary_and_seconds_per_step_are_read_from_the_commands_output(tmp_path):
    gc = _module()
    out = 'loading...\n{"a": {"b": 1}}\nnoise {not json\n{\n "step": 200,\n "x": [1]\n}\n'
    assert gc._last_json(out) == {"step": 200, "x": [1]}
    assert gc._last_json("no summary") is None
    rows = [{"step": s, "train/loss": 1.0, "train_seconds": 0.5 * s} for s in (10, 20, 30)]
    rows.insert(1, {"step": 20, "val/loss": 2.0, "train_seconds": 99.0})  # not a train record
    (tmp_path / "logs.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    assert gc._s_per_step(tmp_path, skip=5) == pytest.approx(0.5)
    assert gc._s_per_step(tmp_path, skip=25) is None  # one record left: no interval


@pytest.mark.slow
@pytest.mark.timeout(1500)
def test_cpu_smoke_runs_every_step(tmp_path):
    out = tmp_path / "check.json"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--cpu-smoke", "--work", str(tmp_path),
                           "--out", str(out)], capture_output=True, text=True, timeout=1450)
    assert out.is_file(), proc.stdout[-2000:] + proc.stderr[-2000:]
    result = json.loads(out.read_text())
    assert result["failed"] == [], json.dumps([s for s in result["steps"]
                                                if s["status"] != "ok"], indent=1)[-4000:]
    assert proc.returncode == 0
    names = {s["name"] for s in result["steps"]}
    assert {"demos_pusht", "train_lowdim_drifting", "train_lowdim_drifting_resumed",
            "train_image_drifting", "train_lowdim_diffusion", "bench_latency", "eval", "run",
            "serve", "serve_run_client", "export_onnx", "image_gen_mae", "image_gen_generator",
            "image_gen_resume", "image_gen_sample", "dit_throughput"} <= names
    r = result["results"]
    assert r["train_lowdim_drifting_resumed"]["steps"] == 2 * r["train_lowdim_drifting"]["steps"]
    assert all(r[name]["s_per_step"] > 0 for name in (
        "train_lowdim_drifting", "train_lowdim_drifting_resumed", "train_image_drifting",
        "train_lowdim_diffusion"))
    assert {(row["policy"], row["obs"]) for row in r["latency"]} == {
        (p, o) for p in ("drifting", "ddpm100", "ddim10") for o in ("lowdim", "image")}
    assert r["dit_throughput"]["images_per_s"] > 0
    assert result["versions"]["torch"]
