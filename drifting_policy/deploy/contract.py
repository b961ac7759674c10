"""The Predictor contract every deployment path keeps (in-process, ONNX, served).

    predictor.predict({key: float32 [To, *shape]}, seed=None, n_samples=None) -> float32 [H, Da]

The answer is the executable horizon: H = T - To + 1 rows of the policy's chunk starting at index
To - 1 (action_pred[0, To - 1:]), i.e. the actions for the observation's tick and the H - 1 ticks
after it; the control loop executes Ta of them. For the same observation, seed and n_samples every
predictor returns the same rows (to ONNX tolerance): seeded noise is drawn on the CPU by
`seeded_noise` (or `torch.Generator()` on the CPU inside predict_action, which draws the same
numbers) and then moved to the policy's device. `n_samples` = K > 1 draws K chunks and returns
the medoid (`drifting_policy.policy.base.medoid`); None means the predictor's default.

Nothing non-finite crosses the contract: a predictor refuses a non-finite observation and checks
its answer (`require_finite`, raising `NonFiniteError`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol

import numpy as np
import torch


class NonFiniteError(ValueError):
    """An observation or an action chunk holds NaN or inf."""


class Predictor(Protocol):
    """A policy behind a call: observation frames in, the executable horizon out."""

    n_obs_steps: int  # To
    n_action_steps: int  # Ta
    horizon: int  # T
    n_samples: int  # K, the default of predict()
    obs_shapes: dict[str, list[int]]  # {key: [To, *shape]} of predict()'s observation

    def predict(self, obs: Mapping[str, np.ndarray], seed: int | None = None,
                n_samples: int | None = None) -> np.ndarray:
        """{key: [To, *shape]} -> actions [T - To + 1, Da] (row 0: the observation's tick)."""


def require_finite(x: np.ndarray, what: str) -> np.ndarray:
    """x unchanged if every value is finite, else NonFiniteError naming `what` and the count."""
    bad = int(np.size(x) - np.count_nonzero(np.isfinite(x)))
    if bad:
        raise NonFiniteError(f"{what}: expected finite values, got {bad} NaN/inf of "
                             f"{np.size(x)} (shape {list(np.shape(x))})")
    return x


def check_obs(obs: Mapping[str, np.ndarray], obs_shapes: Mapping[str, list[int]]
              ) -> dict[str, np.ndarray]:
    """{key: [To, *shape]} as float32 arrays, checked against `obs_shapes` (keys, shapes) and for
    finite values; a mismatch is a ValueError naming the key, the expected and the actual."""
    if sorted(obs) != sorted(obs_shapes):
        raise ValueError(f"obs: expected keys {sorted(obs_shapes)}, got {sorted(obs)}")
    out = {}
    for key, shape in obs_shapes.items():
        x = np.asarray(obs[key], dtype=np.float32)
        if list(x.shape) != list(shape):
            raise ValueError(f"obs['{key}']: expected shape {list(shape)}, got {list(x.shape)}")
        out[key] = require_finite(x, f"obs['{key}']")
    return out


def check_samples(n_samples: int) -> int:
    """n_samples if it is an int >= 1, else a ValueError naming it."""
    if not isinstance(n_samples, int) or isinstance(n_samples, bool) or n_samples < 1:
        raise ValueError(f"n_samples: expected an integer >= 1, got {n_samples!r}")
    return n_samples


def seeded_noise(seed: int | None, n: int, horizon: int, action_dim: int) -> torch.Tensor:
    """Initial noise [n, T, Da] float32 drawn on the CPU: from torch.Generator().manual_seed(seed)
    (the numbers predict_action draws with that generator), or the global RNG when seed is None."""
    gen = None if seed is None else torch.Generator().manual_seed(int(seed))
    return torch.randn(n, horizon, action_dim, generator=gen)


def resolve_device(name: str | torch.device) -> torch.device:
    """"auto" -> cuda when one is visible, else cpu; anything else as torch.device(name)."""
    if str(name) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)
