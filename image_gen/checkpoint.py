"""Checkpoints of `image-gen train` / `train-mae`: one directory, shared files plus one file per
rank, published atomically; read back without unpickling code.

    <dir>/config.yaml          the resolved training config (data only)
    <dir>/model.safetensors    the model's state dict
    <dir>/ema.safetensors      the EMA weights in the same layout (when EMA is on)
    <dir>/train_state.pt       {step, world, optimizer, lr_scheduler, ema_step, train_seconds}
    <dir>/ranks/rank_RRRRR.pt  what differs per rank: data-stream position, global RNG states,
                               the trainer's generators and its `extra` objects (sample queues)
    <dir>/meta.json            step, world and the last logged values, for humans

Saving is collective: every rank writes its own rank file (its queues never leave its device's
host), rank 0 writes the shared files and renames the assembled directory into place
(`drifting_policy.persist.atomic_path`), so a kill at any moment leaves the previous checkpoint
or the new one. The directory must be on a filesystem every rank sees. A checkpoint resumes only
on the world size that wrote it: rank r reads ranks/rank_r.pt.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Mapping
from pathlib import Path

import torch
import torch.distributed as dist
from omegaconf import DictConfig, OmegaConf
from safetensors.torch import load_file, save_file

from drifting_policy.persist import atomic_path

CONFIG, MODEL, EMA, STATE, META, RANKS = (
    "config.yaml", "model.safetensors", "ema.safetensors", "train_state.pt", "meta.json", "ranks"
)


def rank_file(rank: int) -> str:
    """Name of rank `rank`'s file under <dir>/ranks."""
    return f"rank_{rank:05d}.pt"


def _staging(path: Path) -> Path:
    return path.with_name(f".{path.name}.ranks")


def _barrier(device: torch.device) -> None:
    if not (dist.is_available() and dist.is_initialized()):
        return
    if device.type == "cuda":  # NCCL: name the rank's GPU
        dist.barrier(device_ids=[device.index])
    else:
        dist.barrier()


def _cpu(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().contiguous().cpu() for k, v in tensors.items()}


def write_checkpoint(
    path: str | Path,
    rank: int,
    world: int,
    device: torch.device,
    rank_state: Mapping,
    *,
    config: DictConfig | None = None,
    model: Mapping[str, torch.Tensor] | None = None,
    ema: Mapping[str, torch.Tensor] | None = None,
    state: Mapping | None = None,
    meta: Mapping | None = None,
) -> Path:
    """Collective: every rank of the job calls it with its own `rank_state` (plain tensors and
    containers); rank 0 also passes the shared config, model / EMA state dicts, train state and
    meta. Returns the checkpoint directory once it is complete (on every rank)."""
    path = Path(path)
    staging = _staging(path) / RANKS
    staging.mkdir(parents=True, exist_ok=True)
    with atomic_path(staging / rank_file(rank)) as tmp:
        torch.save(dict(rank_state), tmp)
    _barrier(device)  # every rank file is on disk
    if rank == 0:
        if config is None or model is None or state is None:
            raise ValueError("write_checkpoint: rank 0 must pass config, model and state")
        with atomic_path(path) as tmp:
            (tmp / RANKS).mkdir(parents=True)
            (tmp / CONFIG).write_text(OmegaConf.to_yaml(config, resolve=True))
            save_file(_cpu(model), str(tmp / MODEL))
            if ema is not None:
                save_file(_cpu(ema), str(tmp / EMA))
            torch.save({**state, "world": world}, tmp / STATE)
            (tmp / META).write_text(json.dumps({**(meta or {}), "world": world}, indent=1))
            for r in range(world):  # only this world's ranks (a crashed run's extras are dropped)
                os.replace(staging / rank_file(r), tmp / RANKS / rank_file(r))
        shutil.rmtree(_staging(path), ignore_errors=True)
    _barrier(device)  # nobody reads or rewrites the checkpoint before it is published
    return path


def _require(path: Path, name: str) -> Path:
    f = path / name
    if not f.is_file():
        present = sorted(p.name for p in path.iterdir()) if path.is_dir() else "no such directory"
        raise FileNotFoundError(f"checkpoint {path}: missing {name} (found: {present})")
    return f


def has_checkpoint(path: str | Path) -> bool:
    """Whether `path` holds a complete training checkpoint (its train state was written)."""
    return (Path(path) / STATE).is_file()


def load_config(path: str | Path) -> DictConfig:
    """The training config stored with a checkpoint (YAML data; nothing is instantiated)."""
    return OmegaConf.load(_require(Path(path), CONFIG))


def read_weights(file: Path) -> dict[str, torch.Tensor]:
    """A safetensors state dict (CPU tensors); a missing or corrupt file is a clear error."""
    file = _require(Path(file).parent, Path(file).name)
    try:
        return load_file(str(file))
    except Exception as e:  # safetensors raises its own error types for corrupt files
        raise ValueError(f"{file}: not a readable safetensors file ({e})") from e


def check_keys(file: Path, own: Mapping[str, torch.Tensor],
               state: Mapping[str, torch.Tensor]) -> None:
    """Missing / unexpected keys and shape mismatches of `state` against `own` (a state dict)
    raise one ValueError naming them."""
    missing, extra = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    bad = [f"{k}: expected {tuple(own[k].shape)}, got {tuple(v.shape)}"
           for k, v in state.items() if k in own and own[k].shape != v.shape]
    if missing or extra or bad:
        raise ValueError(f"{file}: state does not match the model (missing {missing}, "
                         f"unexpected {extra}, shape mismatches {bad})")


def load_weights(module: torch.nn.Module, file: Path) -> None:
    """Load a safetensors state dict into `module` (copied onto the module's device)."""
    state = read_weights(file)
    check_keys(file, module.state_dict(), state)
    module.load_state_dict(state, strict=True)


def load_train_state(path: str | Path, rank: int, world: int) -> tuple[dict, dict]:
    """(shared train state, rank `rank`'s state) of a checkpoint written by `world` ranks, both
    loaded with weights_only=True on the CPU. Another world size is a ValueError."""
    path = Path(path)
    state = torch.load(_require(path, STATE), map_location="cpu", weights_only=True)
    if "world" not in state:
        raise ValueError(f"resume: {path} was written by an older image-gen that gathered every "
                         "rank's state into train_state.pt; its weights still sample, but "
                         "training cannot resume from it (use a new train.out)")
    if state["world"] != world:
        raise ValueError(f"resume: {path} was written by {state['world']} ranks, this job has "
                         f"{world}; resume with the same world size (torchrun --nproc_per_node "
                         f"{state['world']}) or start a new train.out")
    mine = torch.load(_require(path / RANKS, rank_file(rank)), map_location="cpu",
                      weights_only=True)
    return state, mine
