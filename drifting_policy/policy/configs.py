"""Typed policy configs: one validated dataclass per policy type (LeRobot's configuration split).

A config is plain data. It is built from keyword arguments, from a training config (hydra composes
``configs/policy/*.yaml``, the trainer converts it once with `config_from_dict`) or from a
checkpoint's ``config.json``; every path goes through the same field validation, so a wrong value
is one error naming the field, the expected type or range and the value found::

    cfg = DriftingConfig(shape_meta={"obs": {"obs": {"shape": [20], "type": "low_dim"}},
                                     "action": {"shape": [2]}},
                         down_dims=(32, 64, 128), gen_per_obs=8)
    cfg.to_dict()   # {"type": "drifting", "shape_meta": {...}, "horizon": 16, ...}

Which policy class a config builds is decided by `drifting_policy.policy.registry`, never by a
string read from a file.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

OBS_TYPES = ("rgb", "low_dim")


class ConfigError(ValueError):
    """A config value (from code or a file) that does not fit its field."""


def _describe(tp: Any) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in args)
    if origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            return f"a list of {_describe(args[0])}"
        return f"a list of {len(args)} ({', '.join(_describe(a) for a in args)})"
    return {type(None): "null", int: "int", float: "number", bool: "bool", str: "str",
            dict: "mapping"}.get(tp, getattr(tp, "__name__", str(tp)))


_NO = object()


def _coerce(tp: Any, value: Any) -> Any:
    """`value` converted to the annotation `tp` (lists -> tuples, int -> float), or _NO."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Literal:
        return value if isinstance(value, str) and value in args else _NO
    if origin in (typing.Union, types.UnionType):
        for a in args:
            out = _coerce(a, value)
            if out is not _NO:
                return out
        return _NO
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            return _NO
        items = args[:1] * len(value) if args[1:] == (Ellipsis,) else args
        if len(items) != len(value):
            return _NO
        out = tuple(_coerce(a, v) for a, v in zip(items, value))
        return _NO if _NO in out else out
    if tp is type(None):
        return None if value is None else _NO
    if tp is bool:
        return value if isinstance(value, bool) else _NO
    if tp is int:
        return value if isinstance(value, int) and not isinstance(value, bool) else _NO
    if tp is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        return float(value) if ok else _NO
    if tp is str:
        return value if isinstance(value, str) else _NO
    if tp is dict:
        return value if isinstance(value, Mapping) else _NO
    raise TypeError(f"unsupported field annotation {tp!r}")


def _shape_meta(name: str, meta: Mapping) -> dict:
    """Canonical {"obs": {key: {"shape": [..], "type": ..}}, "action": {"shape": [Da]}}."""
    where = f"{name}.shape_meta"
    if set(meta) != {"obs", "action"}:
        raise ConfigError(f"{where}: expected keys ['action', 'obs'], got {sorted(meta)}")
    if not isinstance(meta["obs"], Mapping) or not meta["obs"]:
        raise ConfigError(f"{where}.obs: expected a non-empty mapping, got {meta['obs']!r}")

    def shape(key: str, entry: Any, rank: int) -> list[int]:
        s = entry.get("shape") if isinstance(entry, Mapping) else None
        ok = (isinstance(s, (list, tuple)) and len(s) == rank
              and all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in s))
        if not ok:
            raise ConfigError(f"{where}.{key}.shape: expected {rank} positive int(s), got {s!r}")
        return list(s)

    obs = {}
    for key, entry in meta["obs"].items():
        kind = entry.get("type", "low_dim") if isinstance(entry, Mapping) else None
        if kind not in OBS_TYPES:
            raise ConfigError(f"{where}.obs.{key}.type: expected one of {OBS_TYPES}, got {kind!r}")
        obs[str(key)] = {"shape": shape(f"obs.{key}", entry, 3 if kind == "rgb" else 1),
                         "type": kind}
    return {"obs": obs, "action": {"shape": shape("action", meta["action"], 1)}}


@dataclass(kw_only=True)
class PolicyConfig:
    """Fields every action-chunk policy has (Diffusion Policy's names and defaults).

    shape_meta: {"obs": {key: {"shape": [...], "type": "rgb" | "low_dim"}}, "action": {"shape":
        [Da]}}. horizon T, n_obs_steps To, n_action_steps Ta (executed from index To - 1).
    down_dims .. cond_predict_scale: the ConditionalUnet1D. crop_shape .. share_rgb_model: the
    image encoder (ignored without rgb keys).
    """

    type: ClassVar[str] = ""

    shape_meta: dict
    horizon: int = 16
    n_obs_steps: int = 2
    n_action_steps: int = 8
    down_dims: tuple[int, ...] = (256, 512, 1024)
    diffusion_step_embed_dim: int = 256
    kernel_size: int = 5
    n_groups: int = 8
    cond_predict_scale: bool = True
    crop_shape: tuple[int, int] | None = None
    num_kp: int = 32
    feature_dim: int = 64
    share_rgb_model: bool = False

    def __post_init__(self) -> None:
        name = type(self).__name__
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            out = _coerce(hints[f.name], value)
            if out is _NO:
                raise ConfigError(f"{name}.{f.name}: expected {_describe(hints[f.name])}, "
                                  f"got {value!r} ({type(value).__name__})")
            setattr(self, f.name, out)
        self.shape_meta = _shape_meta(name, self.shape_meta)
        self._check(name)

    def _range(self, name: str, field_name: str, ok: bool, expected: str) -> None:
        if not ok:
            raise ConfigError(
                f"{name}.{field_name}: expected {expected}, got {getattr(self, field_name)!r}"
            )

    def _check(self, name: str) -> None:
        """Ranges and relations between fields (types are already checked)."""
        t, to = self.horizon, self.n_obs_steps
        self._range(name, "horizon", t >= 1, ">= 1")
        self._range(name, "n_obs_steps", 1 <= to <= t, f"1..horizon={t}")
        self._range(name, "n_action_steps", 1 <= self.n_action_steps <= t - to + 1,
                    f"1..horizon - n_obs_steps + 1 = {t - to + 1}")
        self._range(name, "down_dims", len(self.down_dims) >= 1 and min(self.down_dims) >= 1,
                    "at least one positive width")
        multiple = 2 ** (len(self.down_dims) - 1)
        self._range(name, "horizon", t % multiple == 0,
                    f"a multiple of 2**(len(down_dims)-1) = {multiple} for down_dims "
                    f"{list(self.down_dims)}")
        for f in ("diffusion_step_embed_dim", "kernel_size", "n_groups", "num_kp", "feature_dim"):
            self._range(name, f, getattr(self, f) >= 1, ">= 1")
        self._range(name, "crop_shape", self.crop_shape is None or min(self.crop_shape) >= 1,
                    "null or two positive ints")

    @property
    def action_dim(self) -> int:
        return self.shape_meta["action"]["shape"][0]

    def to_dict(self) -> dict:
        """{"type": ..., field: value} with tuples as lists (JSON-ready)."""
        def plain(v):
            return [plain(x) for x in v] if isinstance(v, (list, tuple)) else v
        return {"type": self.type,
                **{f.name: plain(getattr(self, f.name)) for f in dataclasses.fields(self)}}

    @classmethod
    def from_dict(cls, data: Mapping) -> PolicyConfig:
        """Build from a mapping of field values (no "type" key); unknown fields are an error."""
        known = {f.name for f in dataclasses.fields(cls)}
        extra = sorted(set(data) - known)
        if extra:
            raise ConfigError(f"{cls.__name__}: unknown field(s) {extra}; "
                              f"expected a subset of {sorted(known)}")
        missing = [f.name for f in dataclasses.fields(cls)
                   if f.name not in data and f.default is dataclasses.MISSING
                   and f.default_factory is dataclasses.MISSING]
        if missing:
            raise ConfigError(f"{cls.__name__}: missing required field(s) {missing}")
        return cls(**dict(data))


@dataclass(kw_only=True)
class DriftingConfig(PolicyConfig):
    """The one-step Drifting Policy.

    gen_per_obs: G, generated chunks per observation (paper: 8; G = 1 gives no repulsion).
    grouping: how a chunk [T, Da] becomes drift problems — "per_timestep" ([B, G, Da] per step,
        the Diffusion Policy fork that reproduces the paper's Table 7), "per_dim" ([B, G, T] per
        action dimension, the LeRobot drifting VLAs), "flat" ([B, G, T * Da]).
    normalize: "per_group" computes the feature scale and each temperature's drift normalisation
        per group, as separate drift_loss calls do (the published semantics); "global" shares them
        across all groups.
    temperatures, affinity_floor: passed to the drift loss.
    """

    type: ClassVar[str] = "drifting"

    gen_per_obs: int = 8
    grouping: Literal["per_timestep", "per_dim", "flat"] = "per_timestep"
    normalize: Literal["per_group", "global"] = "per_group"
    temperatures: tuple[float, ...] = (0.02, 0.05, 0.2)
    affinity_floor: float = 1e-6

    def _check(self, name: str) -> None:
        super()._check(name)
        self._range(name, "gen_per_obs", self.gen_per_obs >= 1, ">= 1")
        self._range(name, "temperatures",
                    len(self.temperatures) >= 1 and min(self.temperatures) > 0,
                    "at least one positive temperature")
        self._range(name, "affinity_floor", self.affinity_floor >= 0, ">= 0")


@dataclass(kw_only=True)
class DiffusionConfig(PolicyConfig):
    """The Diffusion Policy baseline: DDPM training (diffusers), DDPM or DDIM sampling.

    num_train_timesteps, beta_schedule, clip_sample, prediction_type: DDPM training (DP's).
    scheduler: "ddpm" | "ddim" at inference; num_inference_steps: its NFE (DP: 100 / 10-16).
    """

    type: ClassVar[str] = "diffusion"

    num_train_timesteps: int = 100
    beta_schedule: Literal["linear", "scaled_linear", "squaredcos_cap_v2"] = "squaredcos_cap_v2"
    clip_sample: bool = True
    prediction_type: Literal["epsilon", "sample"] = "epsilon"
    scheduler: Literal["ddpm", "ddim"] = "ddpm"
    num_inference_steps: int = 100

    def _check(self, name: str) -> None:
        super()._check(name)
        n = self.num_train_timesteps
        self._range(name, "num_train_timesteps", n >= 1, ">= 1")
        self._range(name, "num_inference_steps", 1 <= self.num_inference_steps <= n,
                    f"1..num_train_timesteps={n}")


CONFIG_TYPES: dict[str, type[PolicyConfig]] = {c.type: c for c in (DriftingConfig, DiffusionConfig)}


def config_from_dict(data: Mapping) -> PolicyConfig:
    """{"type": name, field: value, ...} -> the typed config of that type (validated)."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"policy config: expected a mapping, got {type(data).__name__}")
    data = dict(data)
    kind = data.pop("type", None)
    if kind not in CONFIG_TYPES:
        raise ConfigError(f"policy config 'type': expected one of {sorted(CONFIG_TYPES)}, "
                          f"got {kind!r}")
    return CONFIG_TYPES[kind].from_dict(data)

