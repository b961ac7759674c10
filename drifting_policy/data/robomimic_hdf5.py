"""robomimic's HDF5 demonstration format: the writer for our scripted experts and the reader.

Layout (robomimic 0.3 and its v141 release; what robomimic's dataset_states_to_obs.py writes)::

    data                    attrs: total (sum of num_samples), env_args (JSON env_meta:
                            env_name, env_version, type (1 = robosuite), env_kwargs)
    data/demo_<i>           attrs: num_samples (T), model_file (the episode's MJCF xml)
        obs/<key>           [T, ...] object [T, 10|14|44], robot0_eef_pos [T, 3],
                            robot0_eef_quat [T, 4] (xyzw), robot0_gripper_qpos [T, 2], ...,
                            agentview_image / robot0_eye_in_hand_image / sideview_image
                            [T, H, W, 3] uint8
        next_obs/<key>      [T, ...] the observation after each action
        actions             [T, 7] delta (OSC_POSE: dpos, drot axis-angle, gripper) or absolute
                            (pos, axis-angle, gripper; env_args says control_delta false /
                            input_type absolute, as in Diffusion Policy's *_abs.hdf5 files)
        rewards, dones      [T]
        states              [T, S] flattened MuJoCo state
    mask/<filter key>       demo names as byte strings, e.g. train / valid

Our writer gzips obs/next_obs (robomimic's --compress); the public v141 files are uncompressed;
h5py reads both the same way.

Reading: :func:`load_replay` turns a file into a :class:`ReplayBuffer` with one key per
observation key plus ``action`` ([N, 7] delta, or [N, 10] absolute: position, rotation-6d,
gripper; see :mod:`envs.robomimic.rotation`). Images go through the on-disk cache of
:mod:`drifting_policy.data.image_cache`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import h5py
import numpy as np
from tqdm import tqdm

from drifting_policy.data.image_cache import cached_arrays
from drifting_policy.data.replay_buffer import ReplayBuffer
from drifting_policy.persist import atomic_path
from envs.robomimic.rotation import abs_action_7_to_10, abs_action_10_to_7

# Diffusion Policy's low-dim observation, in its concatenation order.
LOWDIM_KEYS = ("object", "robot0_eef_pos", "robot0_eef_quat", "robot0_gripper_qpos")
VAL_RATIO = 0.1  # robomimic split_train_val's default: mask/train and mask/valid


# ---------------------------------------------------------------------------- env_args
def action_mode(env_meta: Mapping[str, Any]) -> str | None:
    """"abs", "delta", or None when env_meta's controller config does not say.

    robosuite 1.4 configs carry ``control_delta`` (bool); 1.5 composite configs carry
    ``input_type`` ("delta" / "absolute") per body part. Any absolute arm makes it "abs".
    """
    found: list[str] = []

    def walk(node: Any) -> None:
        if isinstance(node, Mapping):
            for key, value in node.items():
                if key == "control_delta" and isinstance(value, bool):
                    found.append("delta" if value else "abs")
                elif key == "input_type" and value in ("delta", "absolute"):
                    found.append("delta" if value == "delta" else "abs")
                else:
                    walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(env_meta.get("env_kwargs", {}).get("controller_configs"))
    if not found:
        return None
    return "abs" if "abs" in found else "delta"


def _check_env_args(env_args: Any, where: str) -> dict:
    if not isinstance(env_args, Mapping):
        raise ValueError(f"{where}: 'env_args' must be a dict, got {type(env_args).__name__}")
    missing = [k for k in ("env_name", "type", "env_kwargs") if k not in env_args]
    if missing:
        raise ValueError(f"{where}: 'env_args' lacks {missing}; has {sorted(env_args)}")
    return dict(env_args)


# ---------------------------------------------------------------------------- writer
def write_hdf5(path: str | os.PathLike, episodes: Iterable[dict], image: bool = False,
               abs: bool = False) -> int:
    """Write ``episodes`` (successful ones, in seed order) as a robomimic HDF5 file.

    Each episode: ``obs`` {key: [T, ...]} (image keys ``*_image`` uint8 [T, H, W, 3], present
    iff ``image``), optional ``next_obs`` (same keys; by default obs shifted by one step with the
    last step repeated), ``actions`` [T, 7] (delta) or with ``abs`` [T, 7] axis-angle or [T, 10]
    rotation-6d (stored as 7-d axis-angle, robomimic's and Diffusion Policy's layout),
    ``rewards`` [T], ``dones`` [T], ``states`` [T, S], ``model_file`` (xml str) and ``env_args``
    (robomimic env_meta; its controller config must agree with ``abs``). Other entries are
    ignored. The file is built under a temporary name and renamed into place; also writes
    mask/train and mask/valid (robomimic's 10 % split, seeded). Returns the number of demos;
    raises ValueError when there are none or an episode is malformed.
    """
    path = Path(path).expanduser()
    with atomic_path(path) as tmp, h5py.File(tmp, "w") as f:
        writer = _DemoWriter(f, image=image, abs_action=abs)
        for episode in episodes:
            writer.add(episode)
        if writer.n == 0:
            raise ValueError(f"{path}: no episodes to write")
        writer.close()
    return writer.n


class _DemoWriter:
    """Streams demos into an open file; the first episode fixes keys, shapes and env_args."""

    def __init__(self, f: h5py.File, image: bool, abs_action: bool) -> None:
        self.f, self.image, self.abs_action = f, image, abs_action
        self.data = f.create_group("data")
        self.n, self.total = 0, 0
        self.env_args: dict | None = None
        self.env_json = ""
        self.shapes: dict[str, tuple] | None = None

    def add(self, episode: Mapping[str, Any]) -> None:
        where = f"episode {self.n}"
        for key in ("obs", "actions", "rewards", "dones", "states", "model_file", "env_args"):
            if key not in episode:
                raise ValueError(f"{where}: missing '{key}'; has {sorted(episode)}")
        actions = self._actions(np.asarray(episode["actions"]), where)
        length = len(actions)
        obs = self._obs(episode["obs"], length, f"{where}: obs")
        next_obs = (self._obs(episode["next_obs"], length, f"{where}: next_obs")
                    if "next_obs" in episode else
                    {k: np.concatenate([v[1:], v[-1:]]) for k, v in obs.items()})
        arrays = {"actions": actions}
        for key in ("rewards", "dones", "states"):
            arrays[key] = np.asarray(episode[key])
            expected_ndim = 2 if key == "states" else 1
            if arrays[key].ndim != expected_ndim or len(arrays[key]) != length:
                raise ValueError(f"{where}: '{key}': expected {expected_ndim}-d with {length} "
                                 f"steps (len(actions)), got shape {arrays[key].shape}")
        self._check_consistent(obs, arrays["states"], where)
        env_args = _check_env_args(episode["env_args"], where)
        if self.env_args is None:
            self._check_mode(env_args, where)
            try:
                self.env_json = json.dumps(env_args, indent=4)
            except TypeError as exc:
                raise ValueError(f"{where}: 'env_args' is not JSON-serialisable ({exc})") from exc
            self.env_args = env_args
        elif env_args != self.env_args:
            raise ValueError(f"{where}: 'env_args' differs from episode 0's")
        if not isinstance(episode["model_file"], str):
            raise ValueError(f"{where}: 'model_file' must be the MJCF xml string, "
                             f"got {type(episode['model_file']).__name__}")

        demo = self.data.create_group(f"demo_{self.n}")
        for group, values in (("obs", obs), ("next_obs", next_obs)):
            for key, value in values.items():
                demo.create_dataset(f"{group}/{key}", data=value, compression="gzip")
        for key, value in arrays.items():
            demo.create_dataset(key, data=value)
        demo.attrs["num_samples"] = length
        demo.attrs["model_file"] = episode["model_file"]
        self.n += 1
        self.total += length

    def _actions(self, actions: np.ndarray, where: str) -> np.ndarray:
        dims = (7, 10) if self.abs_action else (7,)
        if actions.ndim != 2 or actions.shape[-1] not in dims or len(actions) == 0:
            raise ValueError(f"{where}: 'actions': expected [T, {' or '.join(map(str, dims))}] "
                             f"with T >= 1 (abs={self.abs_action}), got {actions.shape}")
        return abs_action_10_to_7(actions) if actions.shape[-1] == 10 else actions

    def _obs(self, obs: Any, length: int, where: str) -> dict[str, np.ndarray]:
        if not isinstance(obs, Mapping) or not obs:
            raise ValueError(f"{where}: expected a non-empty dict of arrays, got {obs!r:.80}")
        obs = {str(k): np.asarray(v) for k, v in obs.items()}
        for key, value in obs.items():
            if value.ndim == 0 or len(value) != length:
                raise ValueError(f"{where}: '{key}': expected {length} steps (len(actions)), "
                                 f"got shape {value.shape}")
            if key.endswith("_image") and (value.dtype != np.uint8 or value.ndim != 4
                                           or value.shape[-1] != 3):
                raise ValueError(f"{where}: '{key}': expected uint8 [T, H, W, 3], "
                                 f"got {value.dtype} {value.shape}")
        images = sorted(k for k in obs if k.endswith("_image"))
        if self.image and not images:
            raise ValueError(f"{where}: image=True but no '*_image' key; keys: {sorted(obs)}")
        if not self.image and images:
            raise ValueError(f"{where}: image=False but image keys {images} are present")
        return obs

    def _check_consistent(self, obs: Mapping[str, np.ndarray], states: np.ndarray,
                          where: str) -> None:
        shapes = {f"obs/{k}": v.shape[1:] for k, v in obs.items()} | {"states": states.shape[1:]}
        if self.shapes is None:
            self.shapes = shapes
            return
        if set(shapes) != set(self.shapes):
            raise ValueError(f"{where}: keys {sorted(shapes)} != episode 0's {sorted(self.shapes)}")
        for key, shape in shapes.items():
            if shape != self.shapes[key]:
                raise ValueError(f"{where}: '{key}': expected per-step shape "
                                 f"{self.shapes[key]} (episode 0), got {shape}")

    def _check_mode(self, env_args: dict, where: str) -> None:
        mode = action_mode(env_args)
        wanted = "abs" if self.abs_action else "delta"
        if mode == wanted or (mode is None and not self.abs_action):
            return
        raise ValueError(
            f"{where}: abs={self.abs_action} but env_args' controller config says "
            f"{mode or 'nothing'} (expected control_delta / input_type for {wanted} actions)")

    def close(self) -> None:
        self.data.attrs["total"] = self.total
        self.data.attrs["env_args"] = self.env_json
        names = sorted(self.data.keys())  # robomimic's split: string order, numpy seed 0
        mask = np.zeros(len(names))
        mask[: int(VAL_RATIO * len(names))] = 1
        np.random.RandomState(0).shuffle(mask)
        for key, chosen in (("train", mask == 0), ("valid", mask == 1)):
            self.f[f"mask/{key}"] = np.array([n for n, c in zip(names, chosen) if c], dtype="S")


# ---------------------------------------------------------------------------- reader
def read_env_meta(path: str | os.PathLike) -> dict:
    """The file's env_meta (data attrs env_args, JSON)."""
    path = Path(path).expanduser()
    with _open(path) as f:
        return _env_meta(f, path)


def _open(path: Path) -> h5py.File:
    if not path.is_file():
        raise FileNotFoundError(f"robomimic dataset not found: {path}")
    try:
        return h5py.File(path, "r")
    except OSError as exc:
        raise ValueError(f"{path}: not a readable HDF5 file ({exc})") from exc


def _env_meta(f: h5py.File, path: Path) -> dict:
    if "data" not in f or "env_args" not in f["data"].attrs:
        raise ValueError(f"{path}: not a robomimic dataset (no 'data' group with an env_args "
                         f"attribute); top-level keys: {sorted(f.keys())}")
    return _check_env_args(json.loads(f["data"].attrs["env_args"]), str(path))


def demo_names(f: h5py.File, filter_key: str | None = None) -> list[str]:
    """Demo group names in numeric order (demo_0, demo_1, ..., demo_10), all or those listed
    under mask/<filter_key>."""
    if filter_key is None:
        names = list(f["data"].keys())
    else:
        if f"mask/{filter_key}" not in f:
            masks = sorted(f["mask"].keys()) if "mask" in f else []
            raise ValueError(f"{f.filename}: no filter key '{filter_key}'; present: {masks}")
        names = [n.decode() for n in f[f"mask/{filter_key}"][()]]
    return sorted(names, key=lambda n: int(n.rsplit("_", 1)[-1]))


def load_replay(
    path: str | os.PathLike,
    obs_keys: Sequence[str],
    rgb_keys: Sequence[str] = (),
    abs_action: bool = False,
    filter_key: str | None = None,
    expect: Mapping[str, Sequence[int] | None] | None = None,
    use_cache: bool | None = None,
    cache_dir: str | os.PathLike | None = None,
) -> ReplayBuffer:
    """Read observation keys and actions into a ReplayBuffer (one episode per demo).

    obs_keys: observation keys (low-dim and image) to load; rgb_keys: those that are images
        (memory-mapped from the cache when ``use_cache``, the default when there are any).
    abs_action: the ``action`` key is [N, 10] absolute (position, rotation-6d, gripper) instead
        of the stored [N, 7] delta; only for files that store absolute actions.
    expect: ``{key: per-step shape}`` (obs keys or ``action``), checked with one clear error.
    """
    path = Path(path).expanduser()
    keys = list(dict.fromkeys([*obs_keys, *rgb_keys]))
    with _open(path) as f:
        env_meta = _env_meta(f, path)
        demos = demo_names(f, filter_key)
        if not demos:
            raise ValueError(f"{path}: no demos" + (f" under mask/{filter_key}" * bool(filter_key)))
        first = f[f"data/{demos[0]}"]
        present = sorted(first["obs"].keys())
        for key in keys:
            if key not in present:
                raise ValueError(f"{path}: missing observation '{key}'; present: {present}")
        for key, shape in (expect or {}).items():
            if key == "action" or shape is None:
                continue
            if key not in present:
                raise ValueError(f"{path}: missing observation '{key}'; present: {present}")
            if first[f"obs/{key}"].shape[1:] != tuple(shape):
                raise ValueError(f"{path}: '{key}': expected per-step shape {tuple(shape)}, "
                                 f"got {first[f'obs/{key}'].shape[1:]}")
        layout = {k: (first[f"obs/{k}"].shape[1:], first[f"obs/{k}"].dtype.name) for k in keys}
        layout["actions"] = (first["actions"].shape[1:], first["actions"].dtype.name)
        _check_action_request(path, env_meta, layout["actions"][0], abs_action)
        lengths = np.array([f[f"data/{d}/actions"].shape[0] for d in demos], dtype=np.int64)

    def episodes() -> Iterator[dict[str, np.ndarray]]:
        with h5py.File(path, "r") as f:
            for d in demos:
                demo = f[f"data/{d}"]
                yield {"actions": demo["actions"][()], **{k: demo[f"obs/{k}"][()] for k in keys}}

    if rgb_keys and (use_cache is None or use_cache):
        arrays = cached_arrays(path, layout, int(lengths.sum()), episodes,
                               extra={"filter_key": filter_key}, cache_dir=cache_dir)
        arrays = {k: (v if k in rgb_keys else np.array(v)) for k, v in arrays.items()}
    else:
        parts: dict[str, list[np.ndarray]] = {k: [] for k in layout}
        for episode in tqdm(episodes(), total=len(demos), desc=f"reading {path.name}",
                            unit="demo"):
            for key, value in episode.items():
                parts[key].append(value)
        arrays = {k: np.concatenate(v) for k, v in parts.items()}
    raw = arrays.pop("actions").astype(np.float32)
    arrays["action"] = abs_action_7_to_10(raw) if abs_action and raw.shape[-1] == 7 else raw
    shape = (expect or {}).get("action")
    if shape is not None and arrays["action"].shape[1:] != tuple(shape):
        raise ValueError(f"{path}: 'action': expected per-step shape {tuple(shape)} "
                         f"(abs_action={abs_action}), got {arrays['action'].shape[1:]}")
    return ReplayBuffer(arrays, np.cumsum(lengths))


def _check_action_request(path: Path, env_meta: dict, shape: tuple, abs_action: bool) -> None:
    """The stored actions must be what the config asks for: delta 7-d, or absolute 7-d
    (axis-angle) / 10-d (rotation-6d)."""
    stored = action_mode(env_meta) or ("abs" if shape == (10,) else "delta")
    if shape not in ((7,), (10,)) or (stored == "delta" and shape != (7,)):
        raise ValueError(f"{path}: 'actions': expected per-step shape (7,) (or (10,) when "
                         f"absolute), got {shape}")
    if abs_action and stored == "delta":
        raise ValueError(
            f"{path} stores delta actions (env_args controller config), but abs_action=True. "
            "Converting them needs a replay of the states through the simulator, which this "
            f"reader does not do: convert the file once (`drifting-policy convert-abs {path} "
            "OUT.hdf5`), use a file with absolute actions (`drifting-policy demos TASK --abs`, "
            "or Diffusion Policy's *_abs.hdf5) or train on deltas (task.abs_action=false).")
    if not abs_action and stored == "abs":
        raise ValueError(
            f"{path} stores absolute actions, but abs_action=False: pass task.abs_action=true "
            "task.action_dim=10 (the policy then predicts position, rotation-6d, gripper).")
