"""The `save_pretrained` layout of a policy, read as data only (LeRobot's file names).

    <dir>/config.json        {"type": "drifting" | "diffusion", field: value, ...}
    <dir>/model.safetensors  the policy's state dict (normaliser included)

Reading never resolves an import path or a callable: the type name selects a config class from a
fixed table, unknown types and fields are errors, and the weights must match the built policy
exactly (no missing, extra or misshaped tensor).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from drifting_policy.persist import atomic_path
from drifting_policy.policy.configs import ConfigError, PolicyConfig, config_from_dict

CONFIG, WEIGHTS = "config.json", "model.safetensors"
_NORMALIZER = "normalizer.params_dict."
_NORMALIZER_FIELDS = {"scale", "offset", "input_stats.min", "input_stats.max", "input_stats.mean",
                      "input_stats.std"}


class CheckpointError(ValueError):
    """A checkpoint file that is missing, unreadable, or does not match the policy it describes."""


def require(directory: str | Path, name: str) -> Path:
    """`directory`/`name`, or a CheckpointError listing what the directory holds."""
    f = Path(directory) / name
    if not f.is_file():
        d = Path(directory)
        found = sorted(p.name for p in d.iterdir()) if d.is_dir() else "no such directory"
        raise CheckpointError(f"checkpoint {d}: missing {name} (found: {found})")
    return f


def state_tensors(module: nn.Module) -> dict[str, torch.Tensor]:
    """The module's state dict as contiguous CPU tensors (what safetensors stores)."""
    return {k: v.detach().contiguous().cpu() for k, v in module.state_dict().items()}


def write(directory: Path, config: PolicyConfig, tensors: dict[str, torch.Tensor]) -> None:
    """config.json + model.safetensors into an existing (temporary) directory."""
    (directory / CONFIG).write_text(json.dumps(config.to_dict(), indent=1))
    save_file(tensors, str(directory / WEIGHTS))


def save(policy: nn.Module, directory: str | Path) -> Path:
    """Write `policy` (with a `.config`) to `directory` atomically; returns the directory."""
    with atomic_path(directory) as tmp:
        tmp.mkdir()
        write(tmp, policy.config, state_tensors(policy))
    return Path(directory)


def read_config(directory: str | Path) -> PolicyConfig:
    """The typed config in `directory`/config.json (validated; errors name the file)."""
    f = require(directory, CONFIG)
    try:
        data = json.loads(f.read_text())
        return config_from_dict(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{f}: not a JSON file ({e})") from e
    except ConfigError as e:
        raise CheckpointError(f"{f}: {e}") from e


def _check_normalizer(name: str, state: dict[str, torch.Tensor], policy: nn.Module) -> list[str]:
    """Problems with the normaliser entries: one per obs key and "action", six [D] tensors each."""
    meta = policy.shape_meta
    dims = {k: (1 if m["type"] == "rgb" else m["shape"][0]) for k, m in meta["obs"].items()}
    dims["action"] = meta["action"]["shape"][0]
    entries: dict[str, dict[str, torch.Tensor]] = {}
    for k, v in state.items():
        if k.startswith(_NORMALIZER):
            key, _, field = k[len(_NORMALIZER):].partition(".")
            entries.setdefault(key, {})[field] = v
    problems = []
    if set(entries) != set(dims):
        problems.append(f"normaliser keys: expected {sorted(dims)}, got {sorted(entries)}")
    for key in set(entries) & set(dims):
        fields = entries[key]
        if set(fields) != _NORMALIZER_FIELDS:
            problems.append(f"normaliser '{key}': expected fields {sorted(_NORMALIZER_FIELDS)}, "
                            f"got {sorted(fields)}")
        bad = {f: tuple(v.shape) for f, v in fields.items() if tuple(v.shape) not in
               {(dims[key],), (1,)}}
        if bad:
            problems.append(f"normaliser '{key}': expected shape ({dims[key]},), got {bad}")
    return problems


def load_weights(policy: nn.Module, file: str | Path) -> None:
    """Load a safetensors state dict into `policy`; anything missing, extra or misshaped (or a
    normaliser that does not fit the policy's shape_meta) raises CheckpointError, loading
    nothing."""
    file = Path(file)
    if not file.is_file():
        raise CheckpointError(f"checkpoint {file.parent}: missing {file.name}")
    try:
        state = load_file(str(file))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{file}: not a readable safetensors file ({e})") from e
    own = {k: v for k, v in policy.state_dict().items() if not k.startswith(_NORMALIZER)}
    theirs = {k for k in state if not k.startswith(_NORMALIZER)}
    problems = _check_normalizer(file.name, state, policy)
    if missing := sorted(set(own) - theirs):
        problems.append(f"missing tensors {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    if extra := sorted(theirs - set(own)):
        problems.append(f"unexpected tensors {extra[:5]}{' ...' if len(extra) > 5 else ''}")
    problems += [f"{k}: expected shape {tuple(own[k].shape)}, got {tuple(state[k].shape)}"
                 for k in sorted(theirs & set(own)) if own[k].shape != state[k].shape]
    if problems:
        raise CheckpointError(f"{file}: does not match the policy: " + "; ".join(problems))
    policy.load_state_dict(state, strict=True)
