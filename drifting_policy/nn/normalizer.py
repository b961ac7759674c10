"""Per-key affine normaliser ``y = x * scale + offset`` (Diffusion Policy's LinearNormalizer).

Parameters live in ``state_dict()`` under the same names as Diffusion Policy's
(``params_dict.<key>.scale``, ``.offset``, ``.input_stats.{min,max,mean,std}``), all of shape [D]
and never trained. A fresh ``LinearNormalizer()`` rebuilds its keys from a state dict, so a
checkpoint restores without refitting.

Devices: the normaliser follows ``.to(device)`` even while it has no keys, and every parameter it
creates later (``fit``, ``set_*``, ``load_state_dict``) is created there; ``load_state_dict``
copies into the existing parameters where a key's shapes match. Tensors to transform must be on
the normaliser's device (a mismatch raises instead of copying the parameters on every call);
NumPy arrays are moved there.

Example::

    normalizer = LinearNormalizer()
    normalizer.fit({"obs": obs, "action": action})        # obs [N, 20], action [N, 2]
    normalizer.set_image("image")                           # [0, 1] -> [-1, 1]
    nobs = normalizer.normalize({"obs": obs_batch})["obs"]  # obs_batch [B, To, 20]
    action = normalizer["action"].unnormalize(naction)      # naction [B, T, 2]
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np
import torch
from torch import Tensor, nn

_STATS = ("min", "max", "mean", "std")


def _as_tensor(x: np.ndarray | Tensor) -> Tensor:
    return torch.from_numpy(np.asarray(x)) if not isinstance(x, Tensor) else x


def _frozen(x: np.ndarray | Tensor | float, like: Tensor) -> nn.Parameter:
    """[D] float parameter (no grad) on `like`'s device, in `like`'s dtype."""
    t = torch.as_tensor(x, dtype=torch.float32).detach().reshape(-1)
    return nn.Parameter(t.to(like.device, like.dtype, copy=True), requires_grad=False)


class FieldNormalizer:
    """One key's parameters, as returned by ``normalizer[key]``; shares them, copies nothing."""

    def __init__(self, key: str, params: nn.ParameterDict) -> None:
        self.key = key
        self.params = params

    @property
    def scale(self) -> Tensor:
        return self.params["scale"]

    @property
    def offset(self) -> Tensor:
        return self.params["offset"]

    @property
    def input_stats(self) -> dict[str, Tensor]:
        """``{"min", "max", "mean", "std"}`` of the fitted data, each [D]."""
        return dict(self.params["input_stats"].items())

    def normalize(self, x: np.ndarray | Tensor) -> Tensor:
        """x [..., D] (or [..., *dims] with prod(dims) == D) -> same shape."""
        return self._transform(x, forward=True)

    def unnormalize(self, x: np.ndarray | Tensor) -> Tensor:
        return self._transform(x, forward=False)

    def _transform(self, x: np.ndarray | Tensor, forward: bool) -> Tensor:
        if not isinstance(x, Tensor):
            x = _as_tensor(x).to(self.scale.device)
        if x.device != self.scale.device:
            raise ValueError(
                f"normalizer key '{self.key}': input on {x.device}, parameters on "
                f"{self.scale.device}; move the input (or the policy: policy.to(device))"
            )
        if not x.is_floating_point():
            x = x.float()
        scale = self.scale.to(dtype=x.dtype)
        offset = self.offset.to(dtype=x.dtype)
        dim = scale.shape[0]
        # the trailing dims must multiply to D exactly (D == 1 applies to any shape)
        trailing = 1
        for size in reversed(x.shape):
            if trailing >= dim:
                break
            trailing *= size
        if dim != 1 and trailing != dim:
            raise ValueError(
                f"normalizer key '{self.key}' has {dim} dims; input shape {tuple(x.shape)} "
                f"does not end in dims of {dim} elements"
            )
        flat = x.reshape(-1, dim)
        out = flat * scale + offset if forward else (flat - offset) / scale
        return out.reshape(x.shape)


class LinearNormalizer(nn.Module):
    """``{key: FieldNormalizer}`` stored as an ``nn.ParameterDict`` named ``params_dict``."""

    def __init__(self) -> None:
        super().__init__()
        self.params_dict = nn.ParameterDict()
        # empty, not saved: holds the device and dtype of `.to()` while there are no keys yet
        self.register_buffer("_placement", torch.empty(0), persistent=False)

    # ------------------------------------------------------------------ building
    @torch.no_grad()
    def fit(
        self,
        data: Mapping[str, np.ndarray | Tensor],
        mode: str = "limits",
        output_max: float = 1.0,
        output_min: float = -1.0,
        range_eps: float = 1e-4,
        last_n_dims: int = 1,
    ) -> None:
        """Fit each key of ``data`` ({key: [..., *dims]}, flattened to [N, prod(last n dims)]).

        limits: each dim's [min, max] maps to [output_min, output_max]; a dim whose range is
            below ``range_eps`` is only shifted, so that its min lands on the middle of the
            output range (scale 1).
        gaussian: each dim to zero mean, unit std; a dim with std below ``range_eps`` is only
            centred.
        Other keys already in the normaliser are kept.
        """
        if mode not in ("limits", "gaussian"):
            raise ValueError(f"mode must be 'limits' or 'gaussian', got {mode!r}")
        if not output_max > output_min:
            raise ValueError(f"output_max {output_max} must exceed output_min {output_min}")
        if last_n_dims < 0:
            raise ValueError(f"last_n_dims must be >= 0, got {last_n_dims}")
        for key, value in data.items():
            x = _as_tensor(value).to(torch.float32)
            dim = math.prod(x.shape[x.ndim - last_n_dims :]) if last_n_dims else 1
            x = x.reshape(-1, dim)
            if x.shape[0] == 0:
                raise ValueError(f"cannot fit key '{key}': no data")
            stats = {"min": x.min(0).values, "max": x.max(0).values,
                     "mean": x.mean(0), "std": x.std(0)}
            if mode == "limits":
                span = stats["max"] - stats["min"]
                constant = span < range_eps
                span[constant] = output_max - output_min
                scale = (output_max - output_min) / span
                offset = output_min - scale * stats["min"]
                offset[constant] = (output_max + output_min) / 2 - stats["min"][constant]
            else:
                std = stats["std"].clone()
                std[std < range_eps] = 1.0
                scale = 1.0 / std
                offset = -stats["mean"] * scale
            self.set_manual(key, scale, offset, stats)

    def set_manual(self, key: str, scale: np.ndarray | Tensor, offset: np.ndarray | Tensor,
                   input_stats: Mapping[str, np.ndarray | Tensor]) -> None:
        """Set key's parameters directly: scale, offset and each of min/max/mean/std are [D]."""
        missing = set(_STATS) - set(input_stats)
        if missing:
            raise ValueError(f"input_stats for '{key}' lacks {sorted(missing)}")
        like = self._placement
        params = nn.ParameterDict({"scale": _frozen(scale, like), "offset": _frozen(offset, like)})
        params["input_stats"] = nn.ParameterDict({s: _frozen(input_stats[s], like)
                                                  for s in _STATS})
        shapes = {name: tuple(p.shape) for name, p in params.named_parameters()}
        if len(set(shapes.values())) != 1:
            raise ValueError(f"parameters of '{key}' differ in shape: {shapes}")
        self.params_dict[key] = params

    def set_identity(self, key: str, dim: int = 1) -> None:
        """key passes through unchanged (dim 1 applies to inputs of any shape)."""
        self.set_manual(key, torch.ones(dim), torch.zeros(dim), {
            "min": -torch.ones(dim), "max": torch.ones(dim),
            "mean": torch.zeros(dim), "std": torch.ones(dim)})

    def set_image(self, key: str) -> None:
        """Images in [0, 1] (any shape) map to [-1, 1]: x * 2 - 1."""
        self.set_manual(key, torch.tensor([2.0]), torch.tensor([-1.0]), {
            "min": torch.tensor([0.0]), "max": torch.tensor([1.0]),
            "mean": torch.tensor([0.5]), "std": torch.tensor([math.sqrt(1 / 12)])})

    # ------------------------------------------------------------------ applying
    def keys(self) -> list[str]:
        return list(self.params_dict.keys())

    def __contains__(self, key: object) -> bool:
        return key in self.params_dict

    def __getitem__(self, key: str) -> FieldNormalizer:
        if key not in self.params_dict:
            raise KeyError(f"normalizer has no key '{key}'; known keys: {self.keys()}")
        return FieldNormalizer(key, self.params_dict[key])

    def normalize(self, x: Mapping[str, np.ndarray | Tensor]) -> dict[str, Tensor]:
        """``{key: [..., D_key]}`` -> same keys and shapes; floating dtypes and devices kept."""
        return self._transform(x, forward=True)

    def unnormalize(self, x: Mapping[str, np.ndarray | Tensor]) -> dict[str, Tensor]:
        return self._transform(x, forward=False)

    def forward(self, x: Mapping[str, np.ndarray | Tensor]) -> dict[str, Tensor]:
        return self.normalize(x)

    def _transform(self, x: Mapping[str, np.ndarray | Tensor], forward: bool) -> dict[str, Tensor]:
        if not isinstance(x, Mapping):
            raise TypeError(
                f"expected a dict of tensors, got {type(x).__name__}; "
                "use normalizer[key].normalize(x) for a single tensor"
            )
        return {key: self[key]._transform(value, forward) for key, value in x.items()}

    # ------------------------------------------------------------------ checkpoints
    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        """Recreate the per-key entries from the state dict before torch copies the values in,
        so that ``LinearNormalizer().load_state_dict(fitted.state_dict())`` works. A key whose
        parameters already exist with the same shapes keeps them (values are copied in place);
        new ones are created on the normaliser's device."""
        head = prefix + "params_dict."
        entries: dict[str, dict[str, Tensor]] = {}
        for name, value in state_dict.items():
            if name.startswith(head):
                key, _, field = name[len(head):].partition(".")
                entries.setdefault(key, {})[field] = value
        if entries:
            rebuilt = nn.ParameterDict()
            for key, fields in entries.items():
                old = (dict(self.params_dict[key].named_parameters())
                       if key in self.params_dict else {})
                params, stats = nn.ParameterDict(), nn.ParameterDict()
                for field, value in fields.items():
                    keep = old.get(field)
                    if keep is None or keep.shape != value.shape:
                        keep = nn.Parameter(
                            torch.empty(value.shape, device=self._placement.device,
                                        dtype=self._placement.dtype), requires_grad=False)
                    if field.startswith("input_stats."):
                        stats[field.removeprefix("input_stats.")] = keep
                    else:
                        params[field] = keep
                params["input_stats"] = stats
                rebuilt[key] = params
            self.params_dict = rebuilt
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)
