"""Checks that need LeRobot, run by tests/test_lerobot_plugin.py inside the LeRobot virtualenv
(`make venv-lerobot`): `python tests/lerobot_checks.py CHECK ARGS...` prints one JSON object.

    open DIR                 LeRobotDataset(repo_id, root=DIR): metadata, frame 0, video frames
    train DATA OUT STEPS     lerobot-train --policy.type=drifting (tiny UNet, CPU), then resume
                             to STEPS + 10 from the last checkpoint
    policy CKPT DATA         from_pretrained, select_action (network passes counted), the window
                             count and normaliser stats lerobot-train uses, action_is_pad masking
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
REPO_ID = "local/pusht"
TINY = ["--policy.down_dims=[16,32]", "--policy.diffusion_step_embed_dim=16"]


def check_open(root: str) -> dict:
    from lerobot.datasets.lerobot_dataset import LeRobotDataset

    ds = LeRobotDataset(REPO_ID, root=root)
    out = {"num_frames": ds.num_frames, "num_episodes": ds.num_episodes, "fps": ds.fps,
           "video_keys": ds.meta.video_keys, "features": sorted(ds.meta.features),
           "stats_action_max": np.asarray(ds.meta.stats["action"]["max"]).tolist(),
           "tasks": list(ds.meta.tasks.index)}
    lowdim = [k for k in ds.meta.features if k.startswith("observation.")
              and k not in ds.meta.video_keys]
    row = ds.hf_dataset[5]  # LeRobot's own row transform (parquet -> torch)
    out["frame"] = {k: row[k].tolist() for k in [*lowdim, "action", "episode_index"]}
    try:  # LeRobot decodes videos with torchcodec, else torchvision's VideoReader (gone in 0.24+)
        item = ds[5]
        out["video_frame"] = {k: item[k].numpy().tolist() for k in ds.meta.video_keys}
    except (ImportError, AttributeError, RuntimeError) as e:
        out["video_error"] = f"{type(e).__name__}: {e}"
    return out


def _train(args: list[str], log: Path) -> str:
    cmd = [str(Path(sys.executable).with_name("lerobot-train")), *args]
    run = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ,
                                                                    "OMP_NUM_THREADS": "1"})
    log.write_text(run.stdout + run.stderr)
    if run.returncode:
        tail = (run.stdout + run.stderr)[-3000:]
        raise SystemExit(f"lerobot-train failed ({run.returncode}):\n{tail}")
    return run.stdout + run.stderr


def check_train(data: str, out: str, steps: str) -> dict:
    out_dir, steps = Path(out), int(steps)
    first = _train(["--policy.type=drifting", f"--dataset.repo_id={REPO_ID}",
                    f"--dataset.root={data}", f"--output_dir={out_dir}", f"--steps={steps}",
                    "--batch_size=8", "--policy.device=cpu", "--policy.push_to_hub=false",
                    "--wandb.enable=false", f"--save_freq={steps}", "--log_freq=1",
                    "--num_workers=0", "--eval_freq=0", *TINY], out_dir.parent / "train.log")
    config = out_dir / "checkpoints" / "last" / "pretrained_model" / "train_config.json"
    second = _train([f"--config_path={config}", "--resume=true", f"--steps={steps + 10}",
                     f"--save_freq={steps + 10}"], out_dir.parent / "resume.log")

    def losses(text: str) -> dict[int, float]:
        found = {}
        for line in text.splitlines():
            if " step:" in line and " loss:" in line:
                step = line.split(" step:")[1].split()[0]
                loss = line.split(" loss:")[1].split()[0]
                mult = 1000 if step.endswith("K") else 1
                found[int(float(step.rstrip("K")) * mult)] = float(loss)
        return found

    return {"losses": losses(first), "resumed_losses": losses(second),
            "checkpoints": sorted(p.name for p in (out_dir / "checkpoints").iterdir())}


def check_policy(ckpt: str, data: str) -> dict:
    from lerobot.datasets.lerobot_dataset import LeRobotDataset, LeRobotDatasetMetadata
    from lerobot.datasets.sampler import EpisodeAwareSampler
    from lerobot.datasets.utils import dataset_to_policy_features
    from lerobot.policies.factory import make_pre_post_processors

    from lerobot_policy_drifting.modeling_drifting import DriftingPolicy

    policy = DriftingPolicy.from_pretrained(ckpt)
    policy.eval()
    pre, post = make_pre_post_processors(policy.config, pretrained_path=ckpt)
    calls = []
    policy.core.model.register_forward_hook(lambda *_: calls.append(1))
    meta = LeRobotDatasetMetadata(REPO_ID, root=data)
    ds = LeRobotDataset(REPO_ID, root=data)
    frame = ds[0]
    obs = {k: frame[k].float() for k in policy.config.input_features}
    actions = []
    for _ in range(2 * policy.config.n_action_steps):
        actions.append(post(policy.select_action(pre(dict(obs)))).tolist())
    network_calls = len(calls)
    policy.config.n_samples = 4  # medoid of 4 candidates: still one pass per chunk
    policy.reset()
    for _ in range(policy.config.n_action_steps):
        medoid_action = post(policy.select_action(pre(dict(obs)))).tolist()
    medoid_calls = len(calls) - network_calls

    # the windows lerobot-train draws: every frame of each episode but its last drop_n_last
    episodes = meta.episodes
    sampler = EpisodeAwareSampler(episodes["dataset_from_index"], episodes["dataset_to_index"],
                                  drop_n_last_frames=policy.config.drop_n_last_frames)
    stats = {k: {s: np.asarray(v).tolist() for s, v in meta.stats[k].items()
                 if s in ("min", "max")}
             for k in dataset_to_policy_features(meta.features) if k in meta.stats}

    # action_is_pad: replacing padded actions by anything leaves the loss unchanged
    fps = meta.fps
    delta = {"action": [i / fps for i in policy.config.action_delta_indices],
             **{k: [i / fps for i in policy.config.observation_delta_indices]
                for k in policy.config.input_features}}
    windows = LeRobotDataset(REPO_ID, root=data, delta_timestamps=delta)
    end = int(episodes["dataset_to_index"][0])
    items = [windows[end - 9 - i] for i in range(4)]  # near the end: some steps padded
    batch = {k: torch.stack([it[k] for it in items]) for k in items[0]
             if isinstance(items[0][k], torch.Tensor)}
    batch = pre(batch)
    policy.train()
    torch.manual_seed(0)
    loss = policy.forward(batch)[0].item()
    garbled = dict(batch)
    pad = batch["action_is_pad"]
    garbled["action"] = torch.where(pad[..., None], torch.full_like(batch["action"], 50.0),
                                    batch["action"])
    torch.manual_seed(0)
    loss_garbled = policy.forward(garbled)[0].item()
    garbled["action_is_pad"] = torch.zeros_like(pad)
    torch.manual_seed(0)
    loss_unmasked = policy.forward(garbled)[0].item()
    return {"network_calls": network_calls, "medoid_calls": medoid_calls,
            "medoid_action": medoid_action, "actions": actions, "windows": len(sampler),
            "stats": stats, "padded_steps": int(pad.sum()), "loss": loss,
            "loss_garbled_padding": loss_garbled, "loss_garbled_unmasked": loss_unmasked}


if __name__ == "__main__":
    check, *args = sys.argv[1:]
    torch.set_num_threads(1)
    result = {"open": check_open, "train": check_train, "policy": check_policy}[check](*args)
    print(json.dumps(result))
