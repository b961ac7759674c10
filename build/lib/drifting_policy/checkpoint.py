"""Checkpoints: a directory per checkpoint, written atomically, loaded without unpickling code.

    <dir>/config.yaml        the resolved training config (policy `_target_` + task)
    <dir>/model.safetensors  policy state dict (normaliser included)
    <dir>/ema.safetensors    EMA policy state dict (when EMA is on)
    <dir>/train_state.pt     optimiser, lr scheduler, step, data position, RNG states;
                             plain tensors/containers, loaded with torch.load(weights_only=True)
    <dir>/meta.json          step and scores, for humans and for top-k bookkeeping

A directory is built under a temporary name and renamed into place, so a kill at any moment
leaves either the previous checkpoint or the new one, never a mix.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from safetensors.torch import load_file, save_file
from torch import nn

CONFIG, MODEL, EMA, STATE, META = (
    "config.yaml", "model.safetensors", "ema.safetensors", "train_state.pt", "meta.json"
)


def _tensors(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().contiguous().cpu() for k, v in module.state_dict().items()}


def write_checkpoint(
    path: Path,
    config: DictConfig | Mapping,
    policy: nn.Module,
    ema_policy: nn.Module | None = None,
    train_state: Mapping | None = None,
    meta: Mapping | None = None,
) -> Path:
    """Write a checkpoint directory atomically (replacing an existing one at `path`)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        cfg = config if isinstance(config, DictConfig) else OmegaConf.create(dict(config))
        (tmp / CONFIG).write_text(OmegaConf.to_yaml(cfg, resolve=True))
        save_file(_tensors(policy), str(tmp / MODEL))
        if ema_policy is not None:
            save_file(_tensors(ema_policy), str(tmp / EMA))
        if train_state is not None:
            torch.save(dict(train_state), tmp / STATE)
        (tmp / META).write_text(json.dumps(dict(meta or {}), indent=1))
        for f in tmp.iterdir():  # make the bytes durable before the rename publishes them
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        if path.exists():
            old = path.with_name(f".{path.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def _require(path: Path, name: str) -> Path:
    f = path / name
    if not f.is_file():
        present = sorted(p.name for p in path.iterdir()) if path.is_dir() else "no such directory"
        raise FileNotFoundError(f"checkpoint {path}: missing {name} (found: {present})")
    return f


def load_config(path: str | Path) -> DictConfig:
    """The training config stored with a checkpoint."""
    return OmegaConf.load(_require(Path(path), CONFIG))


def build_policy(config: DictConfig) -> nn.Module:
    """Instantiate the policy described by config.policy (weights not loaded)."""
    from hydra.utils import instantiate

    return instantiate(config.policy, _convert_="all")


def load_weights(module: nn.Module, file: Path) -> None:
    """Load a safetensors state dict; missing/unexpected keys and shape mismatches raise."""
    try:
        state = load_file(str(file))
    except Exception as e:  # safetensors raises its own error types for corrupt files
        raise ValueError(f"{file}: not a readable safetensors file ({e})") from e
    own = module.state_dict()
    bad = [f"{k}: expected {tuple(own[k].shape)}, got {tuple(v.shape)}"
           for k, v in state.items() if k in own and own[k].shape != v.shape]
    if bad:
        raise ValueError(f"{file}: shape mismatch for " + "; ".join(bad))
    module.load_state_dict(state, strict=True)


def load_policy(path: str | Path, ema: bool = True, device: str | torch.device = "cpu"):
    """Rebuild a policy from a checkpoint directory (EMA weights when present and `ema`)."""
    path = Path(path)
    config = load_config(path)
    policy = build_policy(config)
    weights = path / EMA if ema and (path / EMA).is_file() else _require(path, MODEL)
    load_weights(policy, weights)
    return policy.to(device).eval(), config


def load_train_state(path: str | Path) -> dict:
    """train_state.pt loaded with weights_only=True (no pickled code runs)."""
    return torch.load(_require(Path(path), STATE), map_location="cpu", weights_only=True)


def rng_state() -> dict:
    """Python, NumPy and torch RNG states as weights_only-loadable containers."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": list(random.getstate()[1]),
        "python_version": random.getstate()[0],
        "python_gauss": random.getstate()[2],
        "numpy": {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": pos,
                  "has_gauss": has_gauss, "cached": cached},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Mapping) -> None:
    random.setstate((state["python_version"], tuple(state["python"]), state["python_gauss"]))
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"],
                         n["has_gauss"], n["cached"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
