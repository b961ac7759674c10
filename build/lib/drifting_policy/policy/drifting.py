"""The one-step Drifting Policy (Deng et al. 2026, sec. 5.3): one network pass per action chunk.

Training: for each observation the generator maps G independent noise chunks (same conditioning,
step input 0) to G action chunks; `drift_loss` attracts them to the expert chunk (the one positive)
and repels them from each other. Inference: one forward pass from fresh noise.
"""

from __future__ import annotations

import torch

from drifting_policy.drift import drift_loss
from drifting_policy.policy.base import ChunkPolicy

LOSS_MODES = ("per_timestep", "flat")


class DriftingPolicy(ChunkPolicy):
    """ChunkPolicy trained with the drift loss.

    Args (besides ChunkPolicy's):
        gen_per_obs: G, generated chunks per observation (paper: 8).
        loss_mode: "per_timestep" (default): one drift problem per (observation, timestep) with
            S = Da — the variant that reproduces the paper's table; "flat": one problem per
            observation with S = T * Da.
        temperatures, affinity_floor: passed to drift_loss.
    """

    def __init__(
        self,
        *args,
        gen_per_obs: int = 8,
        loss_mode: str = "per_timestep",
        temperatures: tuple[float, ...] = (0.02, 0.05, 0.2),
        affinity_floor: float = 1e-6,
        **kwargs,
    ) -> None:
        super().__init__(*args, **kwargs)
        if gen_per_obs < 1:
            raise ValueError(f"gen_per_obs: expected >= 1, got {gen_per_obs}")
        if loss_mode not in LOSS_MODES:
            raise ValueError(f"loss_mode: expected one of {LOSS_MODES}, got {loss_mode!r}")
        self.gen_per_obs, self.loss_mode = gen_per_obs, loss_mode
        self.temperatures, self.affinity_floor = tuple(temperatures), affinity_floor

    def sample(self, noise, cond, generator=None):
        return self.model(noise, 0, cond)

    def loss(self, naction, cond):
        b, t, da = naction.shape
        g = self.gen_per_obs
        noise = torch.randn(b * g, t, da, device=naction.device, dtype=naction.dtype)
        x = self.model(noise, 0, cond.repeat_interleave(g, dim=0)).reshape(b, g, t, da)
        if self.loss_mode == "per_timestep":
            gen = x.permute(0, 2, 1, 3).reshape(b * t, g, da)  # [B*T, G, Da]
            pos = naction.reshape(b * t, 1, da)
        else:
            gen, pos = x.reshape(b, g, t * da), naction.reshape(b, 1, t * da)
        loss, info = drift_loss(
            gen, pos, temperatures=self.temperatures, affinity_floor=self.affinity_floor
        )
        return loss.mean(), info
