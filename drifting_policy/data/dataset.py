"""One windowed dataset for every task; what differs between tasks is configuration.

``obs_keys`` maps each output observation name to a list of *sources*: replay-buffer keys whose
per-step values are flattened and concatenated. A source is a key name, or a key with a column
range ``cols: [start, stop]`` taken after flattening. ``rgb_keys`` maps output image names to
buffer keys holding [N, H, W, C] images in 0..255, returned as uint8 [T, C, H, W] — only the
first k frames when ``first_k`` names the buffer key (the To conditioning frames), so a sample
carries To frames of bytes, not T of float32; the policy scales them to [0, 1] on its device.

Output modes (``obs_as_dict``; by default dict mode unless the only entry is ``obs`` and there
are no images):
- lowdim: ``batch["obs"]`` is one tensor [T, Do] (normaliser key ``"obs"``);
- dict: ``batch["obs"] = {name: [T, ...]}`` (one normaliser key per name).
``batch["action"]`` is [T, Da]; everything but images is float32.

PushT, state observations (Do = 9 keypoints x 2 + agent xy = 20)::

    dataset:
      _target_: drifting_policy.data.dataset.SequenceDataset.from_zarr
      path: data/pusht/pusht_cchi_v7_replay.zarr
      horizon: 16
      pad_before: 1          # To - 1
      pad_after: 7           # Ta - 1
      obs_keys:
        obs: [keypoint, {key: state, cols: [0, 2]}]
      val_ratio: 0.02

PushT, image observations (image [T, 3, 96, 96] and agent_pos [T, 2])::

      obs_keys:
        agent_pos: [{key: state, cols: [0, 2]}]
      rgb_keys:
        image: img

BlockPush / Kitchen: ``obs_keys: {obs: [obs]}``.

robomimic (:meth:`SequenceDataset.from_robomimic`, an HDF5 file; buffer keys are robomimic's
observation keys plus ``action``): lowdim ``obs_keys: {obs: [object, robot0_eef_pos,
robot0_eef_quat, robot0_gripper_qpos]}``; image ``obs_keys: {robot0_eef_pos: [robot0_eef_pos],
...}`` with ``rgb_keys: {agentview_image: agentview_image, ...}``.

Normalisation (:meth:`SequenceDataset.get_normalizer`): every key is fitted with the given mode
(``limits`` by default) unless ``normalizer_rules`` names a rule for it (see ``RULES``); images
always map [0, 1] -> [-1, 1].

In Python the (key, cols) pair may also be a tuple: ``{"obs": [("keypoint", None),
("state", [0, 2])]}``.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from drifting_policy.data.frames import as_uint8
from drifting_policy.data.replay_buffer import ReplayBuffer
from drifting_policy.data.sampler import SequenceSampler, downsample_mask, get_val_mask
from drifting_policy.nn.normalizer import LinearNormalizer

Source = tuple[str, tuple[int, int] | None]


def _stats(x: np.ndarray) -> dict[str, np.ndarray]:
    return {"min": x.min(0), "max": x.max(0), "mean": x.mean(0), "std": x.std(0)}


def _fit_rule(mode: str):
    def rule(normalizer: LinearNormalizer, key: str, x: np.ndarray, range_eps: float) -> None:
        normalizer.fit({key: x}, mode=mode, range_eps=range_eps)
    return rule


def _identity(normalizer: LinearNormalizer, key: str, x: np.ndarray, range_eps: float) -> None:
    """Pass through (data already in about [-1, 1], e.g. quaternions, robomimic delta actions)."""
    normalizer.set_manual(key, np.ones(x.shape[1]), np.zeros(x.shape[1]), _stats(x))


def _max_abs(normalizer: LinearNormalizer, key: str, x: np.ndarray, range_eps: float) -> None:
    """One scale for every dim, 1 / max(max of maxima, max |minima|), no offset (Diffusion
    Policy's robomimic low-dim observation normaliser)."""
    peak = max(float(x.max()), float(np.abs(x.min())))
    scale = 1.0 / peak if peak > range_eps else 1.0
    normalizer.set_manual(key, np.full(x.shape[1], scale), np.zeros(x.shape[1]), _stats(x))


def _abs_pose(normalizer: LinearNormalizer, key: str, x: np.ndarray, range_eps: float) -> None:
    """Absolute pose actions [N, 3 + k]: position (first 3 dims) to [-1, 1] by its limits, the
    rest (rotation-6d, gripper, already in [-1, 1]) unchanged, recorded with stats -1/1/0/1
    (Diffusion Policy's robomimic_abs_action_only_normalizer)."""
    if x.shape[1] <= 3:
        raise ValueError(f"normalizer rule 'abs_pose' for '{key}': expected more than 3 dims, "
                         f"got {x.shape[1]}")
    pos = LinearNormalizer()
    pos.fit({key: x[:, :3]}, mode="limits", range_eps=range_eps)
    rest = x.shape[1] - 3
    stats = {name: np.concatenate([_stats(x[:, :3])[name], np.full(rest, value)])
             for name, value in (("min", -1.0), ("max", 1.0), ("mean", 0.0), ("std", 1.0))}
    normalizer.set_manual(key, np.concatenate([pos[key].scale.numpy(), np.ones(rest)]),
                          np.concatenate([pos[key].offset.numpy(), np.zeros(rest)]), stats)


# normalizer_rules values: fn(normalizer, key, x [N, D] float32, range_eps) sets `key`.
RULES = {
    "limits": _fit_rule("limits"),
    "gaussian": _fit_rule("gaussian"),
    "identity": _identity,
    "max_abs": _max_abs,
    "abs_pose": _abs_pose,
}


def _robomimic_rules(schema: Mapping[str, Any], rgb: Mapping[str, str], abs_action: bool,
                     obs_as_dict: bool | None) -> dict[str, str]:
    """Diffusion Policy's robomimic normalisation: delta actions identity, absolute actions
    ``abs_pose``; the concatenated low-dim ``obs`` ``max_abs``; in dict mode keys ending in
    ``quat`` identity (the others: the default mode)."""
    rules = {"action": "abs_pose" if abs_action else "identity"}
    if not rgb and list(schema) == ["obs"] and obs_as_dict in (None, False):
        rules["obs"] = "max_abs"
    else:
        rules.update({name: "identity" for name in schema if name.endswith("quat")})
    return rules


def parse_obs_keys(obs_keys: Mapping[str, Sequence[Any]]) -> dict[str, list[Source]]:
    """Normalise the schema to ``{name: [(buffer_key, (start, stop) or None), ...]}``.

    Each source may be ``"key"``, ``("key", cols)`` / ``["key", cols]`` or
    ``{"key": "key", "cols": cols}`` with cols ``None`` or ``[start, stop]``.
    """
    parsed = {}
    for name, sources in obs_keys.items():
        if isinstance(sources, (str, Mapping)):
            raise ValueError(f"obs_keys['{name}'] must be a list of sources, got {sources!r}")
        parsed[name] = []
        for source in sources:
            if isinstance(source, str):
                key, cols = source, None
            elif isinstance(source, Mapping) and set(source) <= {"key", "cols"} and "key" in source:
                key, cols = source["key"], source.get("cols")
            elif isinstance(source, Sequence) and len(source) == 2:
                key, cols = source
            else:
                raise ValueError(
                    f"obs_keys['{name}']: bad source {source!r}; use 'key', "
                    "{key: k, cols: [start, stop]} or (key, [start, stop])"
                )
            if cols is not None:
                if len(cols) != 2:
                    raise ValueError(f"obs_keys['{name}']: cols must be [start, stop], got {cols}")
                cols = (int(cols[0]), int(cols[1]))
            parsed[name].append((str(key), cols))
        if not parsed[name]:
            raise ValueError(f"obs_keys['{name}'] has no sources")
    return parsed


class SequenceDataset(torch.utils.data.Dataset):
    """Windows of ``horizon`` steps from the training episodes of a replay buffer.

    replay_buffer: the episodes (see :class:`ReplayBuffer`).
    horizon, pad_before, pad_after: window length and edge padding (see SequenceSampler).
    obs_keys / rgb_keys / obs_as_dict: the observation schema (module docstring).
    val_ratio, seed: held-out episodes (Diffusion Policy's rule, seeded).
    max_train_episodes: keep a seeded random subset of the training episodes.
    first_k: ``{buffer_key: k}`` read only the first k steps of each window for that key
        (the rest is NaN/0: only safe when the model uses just the first k observations).
    normalizer_rules: ``{normaliser key: rule name in RULES}`` for keys not fitted with the
        ``mode`` of :meth:`get_normalizer` (e.g. ``{"action": "identity"}``).
    """

    def __init__(
        self,
        replay_buffer: ReplayBuffer,
        horizon: int,
        pad_before: int,
        pad_after: int,
        obs_keys: Mapping[str, Sequence[Any]],
        action_key: str = "action",
        val_ratio: float = 0.0,
        seed: int = 42,
        max_train_episodes: int | None = None,
        first_k: dict[str, int] | None = None,
        rgb_keys: Mapping[str, str] | None = None,
        obs_as_dict: bool | None = None,
        normalizer_rules: Mapping[str, str] | None = None,
    ) -> None:
        self.obs_keys = parse_obs_keys(obs_keys)
        self.rgb_keys = dict(rgb_keys or {})
        names = [*self.obs_keys, *self.rgb_keys]
        if len(set(names)) != len(names) or "action" in names:
            raise ValueError(f"observation names must be unique and not 'action', got {names}")
        if obs_as_dict is None:
            obs_as_dict = bool(self.rgb_keys) or list(self.obs_keys) != ["obs"]
        if not obs_as_dict and (self.rgb_keys or len(self.obs_keys) != 1):
            raise ValueError("obs_as_dict=False needs exactly one obs_keys entry and no rgb_keys")
        self.obs_as_dict = obs_as_dict
        self.action_key = action_key
        self.normalizer_rules = dict(normalizer_rules or {})
        lowdim = list(self.obs_keys) if obs_as_dict else ["obs"]
        for key, rule in self.normalizer_rules.items():
            if key not in [*lowdim, "action"]:
                raise ValueError(f"normalizer_rules: unknown key '{key}'; expected one of "
                                 f"{[*lowdim, 'action']} (images are always [0, 1] -> [-1, 1])")
            if rule not in RULES:
                raise ValueError(f"normalizer_rules['{key}']: unknown rule '{rule}'; "
                                 f"expected one of {sorted(RULES)}")

        self.replay_buffer = replay_buffer
        buffer_keys = {key for srcs in self.obs_keys.values() for key, _ in srcs}
        buffer_keys |= set(self.rgb_keys.values()) | {action_key}
        missing = sorted(k for k in buffer_keys if k not in replay_buffer)
        if missing:
            raise ValueError(f"replay buffer lacks {missing}; keys: {replay_buffer.keys()}")
        self._buffer_keys = sorted(buffer_keys)
        self._first_k = dict(first_k or {})

        self.horizon, self.pad_before, self.pad_after = horizon, pad_before, pad_after
        self.val_mask = get_val_mask(replay_buffer.n_episodes, val_ratio, seed)
        self.episode_mask = downsample_mask(~self.val_mask, max_train_episodes, seed)
        self.sampler = self._make_sampler(self.episode_mask)

    @classmethod
    def from_zarr(
        cls,
        path: str | os.PathLike,
        obs_keys: Mapping[str, Sequence[Any]],
        expect: Mapping[str, tuple | None] | None = None,
        **kwargs: Any,
    ) -> SequenceDataset:
        """Load only the keys the schema uses from a zarr file, check ``expect`` ({buffer key:
        per-step shape}, see ReplayBuffer.load), then build the dataset from the other
        arguments of ``__init__``."""
        keys = {key for srcs in parse_obs_keys(obs_keys).values() for key, _ in srcs}
        keys |= set((kwargs.get("rgb_keys") or {}).values()) | {kwargs.get("action_key", "action")}
        buffer = ReplayBuffer.load(path, keys=sorted(keys), expect=expect)
        return cls(buffer, obs_keys=obs_keys, **kwargs)

    @classmethod
    def from_robomimic(
        cls,
        path: str | os.PathLike,
        obs_keys: Mapping[str, Sequence[Any]],
        abs_action: bool = False,
        expect: Mapping[str, Sequence[int] | None] | None = None,
        filter_key: str | None = None,
        use_cache: bool | None = None,
        cache_dir: str | os.PathLike | None = None,
        normalizer_rules: Mapping[str, str] | None = None,
        **kwargs: Any,
    ) -> SequenceDataset:
        """A robomimic HDF5 file (robomimic's v141 release, Diffusion Policy's *_abs.hdf5, or
        ``drifting-policy demos lift|can|tool_hang``), read by
        :func:`drifting_policy.data.robomimic_hdf5.load_replay` (abs_action, expect,
        filter_key, use_cache, cache_dir: see there). ``action`` is [T, 7] delta or, with
        abs_action, [T, 10] (position, rotation-6d, gripper).

        Normalisation follows Diffusion Policy's robomimic datasets unless ``normalizer_rules``
        overrides a key: delta actions identity, absolute actions ``abs_pose``; the
        concatenated low-dim ``obs`` ``max_abs``; in dict mode keys ending in ``quat``
        identity, the others limits.
        """
        from drifting_policy.data.robomimic_hdf5 import load_replay

        schema = parse_obs_keys(obs_keys)
        rgb = dict(kwargs.get("rgb_keys") or {})
        lowdim = [key for sources in schema.values() for key, _ in sources]
        buffer = load_replay(path, lowdim, list(rgb.values()), abs_action=abs_action,
                             filter_key=filter_key, expect=expect, use_cache=use_cache,
                             cache_dir=cache_dir)
        rules = _robomimic_rules(schema, rgb, abs_action, kwargs.get("obs_as_dict"))
        rules.update(normalizer_rules or {})
        return cls(buffer, obs_keys=obs_keys, normalizer_rules=rules, **kwargs)

    @classmethod
    def from_lerobot(
        cls,
        path: str | os.PathLike,
        obs_keys: Mapping[str, Sequence[Any]],
        rgb_keys: Mapping[str, str] | None = None,
        expect: Mapping[str, Sequence[int] | None] | None = None,
        first_k: Mapping[str, int] | None = None,
        lerobot: Mapping[str, Any] | None = None,
        abs_action: bool | None = None,
        filter_key: str | None = None,
        use_cache: bool | None = None,
        cache_dir: str | os.PathLike | None = None,
        normalizer_rules: Mapping[str, str] | None = None,
        **kwargs: Any,
    ) -> SequenceDataset:
        """A LeRobotDataset v3 directory, read by
        :func:`drifting_policy.data.lerobot_reader.load_replay` (videos decoded once into the
        image cache; use_cache, cache_dir: see there). Windows, padding and normalisation are
        those of the same episodes in the task's own format.

        Which LeRobot feature feeds which observation:
        - ``lerobot`` (the task config's mapping, for datasets with LeRobot's own names):
          ``{obs_keys: {name: [feature, {key: feature, cols: [a, b]}, ...]}, rgb_keys: {name:
          feature}, expect: {feature: shape}, first_k: {feature: k}}`` replaces the four
          arguments of the same names (``action`` is the feature ``action``);
        - otherwise the task's own schema, each buffer key K read from the feature K,
          ``observation.K`` or ``observation.images.K`` (what ``drifting-policy convert`` and
          ``demos --format lerobot`` write for a task without its own layout); features stored
          flattened are reshaped to the ``expect`` shape of their key.
        abs_action (robomimic tasks): the action dimension the config expects, and robomimic's
        normalisation rules (see :meth:`from_robomimic`). filter_key must be None (LeRobot
        datasets have no robomimic masks).
        """
        from drifting_policy.data import lerobot_format, lerobot_reader

        if filter_key is not None:
            raise ValueError(f"dataset.filter_key: {filter_key!r} selects robomimic HDF5 masks; "
                             f"a LeRobot dataset ({path}) has none, use null")
        rgb_keys = dict(rgb_keys or {})
        rename: dict[str, str] = {}
        if lerobot is not None:
            unknown = sorted(set(lerobot) - {"obs_keys", "rgb_keys", "expect", "first_k"})
            if unknown or "obs_keys" not in lerobot:
                raise ValueError("dataset.lerobot: expected obs_keys and optionally rgb_keys, "
                                 f"expect, first_k; got {sorted(lerobot)}")
            obs_keys, rgb_keys = lerobot["obs_keys"], dict(lerobot.get("rgb_keys") or {})
            expect, first_k = lerobot.get("expect"), lerobot.get("first_k")
        else:
            names = lerobot_reader.read_info(path)["features"]
            keys = {key for srcs in parse_obs_keys(obs_keys).values() for key, _ in srcs}
            keys |= set(rgb_keys.values()) | {"action"}
            for key in sorted(keys):
                rename[key] = lerobot_format.feature_name(key, names)
                if rename[key] is None:
                    raise ValueError(
                        f"{path}: no LeRobot feature for '{key}' (tried '{key}', "
                        f"'observation.{key}', 'observation.images.{key}'); features: "
                        f"{sorted(names)}. Map LeRobot's names in task.dataset.lerobot")
        schema = parse_obs_keys(obs_keys)
        keys = {key for srcs in schema.values() for key, _ in srcs}
        keys = sorted(keys | set(rgb_keys.values()) | {"action"})
        buffer = lerobot_reader.load_replay(path, [rename.get(k, k) for k in keys],
                                            use_cache=use_cache, cache_dir=cache_dir,
                                            expect=None if rename else expect)
        arrays = {}
        for key in keys:
            value = buffer[rename.get(key, key)]
            shape = (expect or {}).get(key)
            if rename and shape is not None:
                if int(np.prod(value.shape[1:])) != int(np.prod(shape)):
                    raise ValueError(f"{path}: feature '{rename[key]}' (for '{key}'): expected "
                                     f"per-step shape {tuple(shape)}, got {value.shape[1:]}")
                value = value.reshape(len(value), *shape)
            arrays[key] = value
        buffer = ReplayBuffer(arrays, buffer.episode_ends)
        rules = {}
        if abs_action is not None:
            rules = _robomimic_rules(schema, rgb_keys, abs_action, kwargs.get("obs_as_dict"))
        rules.update(normalizer_rules or {})
        return cls(buffer, obs_keys=obs_keys, rgb_keys=rgb_keys, first_k=first_k,
                   normalizer_rules=rules, **kwargs)

    def _make_sampler(self, episode_mask: np.ndarray) -> SequenceSampler:
        return SequenceSampler(
            self.replay_buffer, self.horizon, self.pad_before, self.pad_after,
            keys=self._buffer_keys, key_first_k=self._first_k, episode_mask=episode_mask,
        )

    def get_validation_dataset(self) -> SequenceDataset:
        """The same data restricted to the held-out episodes (empty when val_ratio is 0).

        Unlike Diffusion Policy, episodes dropped by ``max_train_episodes`` are not added to it.
        """
        val = copy.copy(self)
        val.episode_mask = self.val_mask.copy()
        val.val_mask = self.episode_mask.copy()
        val.sampler = self._make_sampler(val.episode_mask)
        return val

    # ------------------------------------------------------------------ arrays
    def _steps(self, array: np.ndarray) -> np.ndarray:
        """The steps of this dataset's episodes: [N, ...] -> [N_selected, ...]."""
        if self.episode_mask.all():
            return array
        episode = np.repeat(np.arange(self.replay_buffer.n_episodes),
                            self.replay_buffer.episode_lengths)
        return array[self.episode_mask[episode]]

    def _lowdim(self, sample: Mapping[str, np.ndarray], name: str) -> np.ndarray:
        """Concatenate obs_keys[name]'s sources: {key: [T, ...]} -> [T, D] float32."""
        parts = []
        for key, cols in self.obs_keys[name]:
            flat = sample[key].reshape(len(sample[key]), -1)
            parts.append(flat if cols is None else flat[:, cols[0] : cols[1]])
        return np.concatenate(parts, axis=-1).astype(np.float32)

    def _to_obs(self, sample: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        obs = {name: self._lowdim(sample, name) for name in self.obs_keys}
        for name, key in self.rgb_keys.items():
            frames = as_uint8(sample[key][: self._first_k.get(key)])  # the frames read
            obs[name] = np.ascontiguousarray(np.moveaxis(frames, -1, 1))
        return obs

    def get_normalizer(self, mode: str = "limits", range_eps: float = 1e-4) -> LinearNormalizer:
        """Fit on every step of this dataset's episodes (not on windows): one key per lowdim
        observation (``"obs"`` in lowdim mode) plus ``"action"``, each with ``mode`` or its
        ``normalizer_rules`` entry; images map [0, 1] -> [-1, 1]."""
        steps = {key: self._steps(self.replay_buffer[key]) for key in self._buffer_keys
                 if key not in self.rgb_keys.values()}
        data = {name: self._lowdim(steps, name) for name in self.obs_keys}
        if not self.obs_as_dict:
            data = {"obs": next(iter(data.values()))}
        data["action"] = steps[self.action_key]
        normalizer = LinearNormalizer()
        normalizer.fit({k: v for k, v in data.items() if k not in self.normalizer_rules},
                       mode=mode, range_eps=range_eps)
        for key, rule in self.normalizer_rules.items():
            x = np.asarray(data[key], dtype=np.float32)
            RULES[rule](normalizer, key, x.reshape(len(x), -1), range_eps)
        for name in self.rgb_keys:
            normalizer.set_image(name)
        return normalizer

    def get_all_actions(self) -> torch.Tensor:
        """[N_selected, Da] float32: every action of this dataset's episodes."""
        return torch.from_numpy(self._steps(self.replay_buffer[self.action_key]).astype(np.float32))

    def __len__(self) -> int:
        return len(self.sampler)

    def __getitem__(self, idx: int) -> dict[str, Any]:
        """``{"obs": [T, Do] or {name: [T, ...]}, "action": [T, Da]}``: float32 tensors, images
        uint8 [k or T, C, H, W]."""
        sample = self.sampler.sample_sequence(idx)
        obs = {name: torch.from_numpy(v) for name, v in self._to_obs(sample).items()}
        action = torch.from_numpy(sample[self.action_key].astype(np.float32))
        return {"obs": obs if self.obs_as_dict else next(iter(obs.values())), "action": action}


DATASET_FORMATS = ("zarr", "robomimic", "lerobot")


def detect_format(path: str | os.PathLike) -> str:
    """The on-disk format of a dataset path: "robomimic" (an HDF5 file), "lerobot" (a
    directory with meta/info.json) or "zarr" (a replay buffer directory or zip store)."""
    p = os.fspath(path)
    if os.path.isfile(os.path.join(p, "meta", "info.json")):
        return "lerobot"
    if os.path.isfile(p) and p.endswith((".hdf5", ".h5")):
        return "robomimic"
    if os.path.exists(p):
        return "zarr"
    raise FileNotFoundError(f"dataset.path: no such file or directory: {p}")


def load_dataset(config: Mapping[str, Any]) -> SequenceDataset:
    """The training dataset a task config's ``dataset:`` section describes (plain data:
    ``format`` — auto | zarr | robomimic — and the arguments of the matching constructor)."""
    kwargs = dict(config)
    fmt = kwargs.pop("format", "auto")
    lerobot = kwargs.pop("lerobot", None)  # LeRobot feature names, used for LeRobot datasets
    if "path" not in kwargs:
        raise ValueError("dataset.path: required, got no path")
    if fmt == "auto":
        fmt = detect_format(kwargs["path"])
    if fmt not in DATASET_FORMATS:
        raise ValueError(f"dataset.format: expected auto or one of {DATASET_FORMATS}, got {fmt!r}")
    if fmt == "lerobot":
        return SequenceDataset.from_lerobot(**kwargs, lerobot=lerobot)
    build = SequenceDataset.from_robomimic if fmt == "robomimic" else SequenceDataset.from_zarr
    return build(**kwargs)
