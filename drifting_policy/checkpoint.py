"""Training checkpoints: a directory per checkpoint, written atomically, read as data only.

    <dir>/pretrained_model/      the deployable policy in `save_pretrained` layout (config.json +
                                 model.safetensors; the EMA weights when trained with EMA)
    <dir>/raw_model.safetensors  the optimised (non-EMA) weights, when trained with EMA
    <dir>/train_config.yaml      the resolved training config (task, training, seed, ...)
    <dir>/train_state.pt         optimiser, lr scheduler, step, data position, RNG states; plain
                                 tensors/containers, loaded with torch.load(weights_only=True)
    <dir>/meta.json              step and scores, for humans and for top-k bookkeeping

`load_policy(dir)` accepts such a directory or a plain `save_pretrained` directory. Nothing read
here is instantiated: the policy comes from the typed config through the registry, and a config
file that names a callable (a hydra `_target_`) is refused before anything else happens.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import torch
import yaml
from omegaconf import DictConfig, OmegaConf
from torch import nn

from drifting_policy.persist import atomic_path
from drifting_policy.policy import pretrained
from drifting_policy.policy.base import ChunkPolicy
from drifting_policy.policy.configs import PolicyConfig
from drifting_policy.policy.pretrained import CheckpointError
from drifting_policy.policy.registry import POLICIES

PRETRAINED, RAW, TRAIN_CONFIG, STATE, META = (
    "pretrained_model", "raw_model.safetensors", "train_config.yaml", "train_state.pt", "meta.json"
)

__all__ = ["CheckpointError", "write_checkpoint", "load_policy", "load_train_config",
           "load_train_state", "load_raw_weights", "load_ema_weights"]


def write_checkpoint(
    path: str | Path,
    train_config: DictConfig | Mapping,
    policy: ChunkPolicy,
    ema_policy: ChunkPolicy | None = None,
    train_state: Mapping | None = None,
    meta: Mapping | None = None,
) -> Path:
    """Write a checkpoint directory atomically (replacing an existing one at `path`)."""
    with atomic_path(path) as tmp:
        (tmp / PRETRAINED).mkdir(parents=True)
        deployable = ema_policy if ema_policy is not None else policy
        pretrained.write(tmp / PRETRAINED, deployable.config, pretrained.state_tensors(deployable))
        if ema_policy is not None:
            from safetensors.torch import save_file

            save_file(pretrained.state_tensors(policy), str(tmp / RAW))
        cfg = train_config if isinstance(train_config, DictConfig) else OmegaConf.create(
            dict(train_config))
        (tmp / TRAIN_CONFIG).write_text(OmegaConf.to_yaml(cfg, resolve=True))
        if train_state is not None:
            torch.save(dict(train_state), tmp / STATE)
        (tmp / META).write_text(json.dumps(dict(meta or {}), indent=1))
    return Path(path)


def _callables(node, where: str = "") -> list[str]:
    """Places in a parsed YAML/JSON tree that name a callable (hydra's `_target_`/`_partial_`)."""
    if isinstance(node, Mapping):
        found = [f"{where}.{k}".lstrip(".") for k in node if k in ("_target_", "_partial_")]
        return found + [x for k, v in node.items() for x in _callables(v, f"{where}.{k}")]
    if isinstance(node, list):
        return [x for i, v in enumerate(node) for x in _callables(v, f"{where}[{i}]")]
    return []


def _read_yaml(file: Path) -> dict:
    """A YAML mapping read with the safe loader; callables named in it are an error."""
    try:
        data = yaml.safe_load(file.read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{file}: not a YAML file ({e})") from e
    if not isinstance(data, dict):
        raise CheckpointError(f"{file}: expected a mapping, got {type(data).__name__}")
    if found := _callables(data):
        raise CheckpointError(f"{file}: names callables at {found}; checkpoints hold data only "
                              "and are never instantiated")
    return data


def load_train_config(path: str | Path) -> DictConfig:
    """The training config stored with a checkpoint (data only; refused if it names callables)."""
    return OmegaConf.create(_read_yaml(pretrained.require(path, TRAIN_CONFIG)))


def load_policy(
    path: str | Path, ema: bool = True, device: str | torch.device = "cpu"
) -> tuple[ChunkPolicy, PolicyConfig]:
    """(policy in eval mode on `device`, its typed config) from a training checkpoint or a
    save_pretrained directory. `ema=False` loads a training checkpoint's optimised weights
    instead of its EMA (the two are the same without EMA)."""
    path = Path(path)
    if (path / TRAIN_CONFIG).is_file():
        load_train_config(path)  # refuses a checkpoint whose config names callables
    directory = path / PRETRAINED if (path / PRETRAINED).is_dir() else path
    config = pretrained.read_config(directory)
    policy = POLICIES[config.type](config)
    raw = path / RAW
    weights = raw if not ema and raw.is_file() else directory / pretrained.WEIGHTS
    pretrained.load_weights(policy, weights)
    return policy.to(device).eval(), config


def load_raw_weights(policy: nn.Module, path: str | Path) -> None:
    """Load a training checkpoint's optimised weights (the deployable ones without EMA)."""
    raw = Path(path) / RAW
    pretrained.load_weights(policy, raw if raw.is_file() else _deployable(path))


def load_ema_weights(policy: nn.Module, path: str | Path) -> None:
    """Load a training checkpoint's deployable (EMA) weights."""
    pretrained.load_weights(policy, _deployable(path))


def _deployable(path: str | Path) -> Path:
    return Path(path) / PRETRAINED / pretrained.WEIGHTS


def load_train_state(path: str | Path) -> dict:
    """train_state.pt loaded with weights_only=True (no pickled code runs)."""
    return torch.load(pretrained.require(path, STATE), map_location="cpu", weights_only=True)
