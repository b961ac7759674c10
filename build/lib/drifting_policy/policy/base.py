"""Diffusion Policy's policy API, shared by the drifting policy and the diffusion baseline.

A policy predicts an action chunk [B, T, Da] from the last To observations:

    obs dict --normaliser--> obs encoder (per step) --flatten To--> global cond [B, To * D]
             --generator (subclass: one pass or a denoising loop)--> normalised chunk [B, T, Da]
             --unnormalise--> action_pred; action = action_pred[:, To - 1 : To - 1 + Ta]

Lowdim tasks use one low_dim key `obs` (obs_dict = {"obs": [B, To, Do]}, as in DP's lowdim
policies); image tasks use one entry per shape_meta key (rgb [B, To, 3, H, W] in [0, 1]).
Both go through the same ObsEncoder (a low_dim key passes straight through).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from drifting_policy.nn.normalizer import LinearNormalizer
from drifting_policy.nn.obs_encoder import ObsEncoder
from drifting_policy.nn.unet1d import ConditionalUnet1D


class ChunkPolicy(nn.Module):
    """Base of the action-chunk policies: normaliser, observation encoder and a ConditionalUnet1D.

    Args:
        shape_meta: {"obs": {key: {"shape": [...], "type": "rgb" | "low_dim"}}, "action":
            {"shape": [Da]}}.
        horizon: T, length of the predicted chunk (divisible by 2 ** (len(down_dims) - 1)).
        n_obs_steps: To, observation frames used as conditioning.
        n_action_steps: Ta, actions executed per chunk (starting at index To - 1).
        down_dims, diffusion_step_embed_dim, kernel_size, n_groups, cond_predict_scale: UNet.
        crop_shape, num_kp, feature_dim, share_rgb_model: image encoder (ignored without rgb).
    """

    def __init__(
        self,
        shape_meta: Mapping,
        horizon: int,
        n_obs_steps: int,
        n_action_steps: int,
        down_dims: tuple[int, ...] = (256, 512, 1024),
        diffusion_step_embed_dim: int = 256,
        kernel_size: int = 5,
        n_groups: int = 8,
        cond_predict_scale: bool = True,
        crop_shape: tuple[int, int] | None = None,
        num_kp: int = 32,
        feature_dim: int = 64,
        share_rgb_model: bool = False,
    ) -> None:
        super().__init__()
        if not 1 <= n_obs_steps <= horizon:
            raise ValueError(f"n_obs_steps: expected 1..horizon={horizon}, got {n_obs_steps}")
        if not 1 <= n_action_steps <= horizon - n_obs_steps + 1:
            raise ValueError(
                f"n_action_steps: expected 1..horizon - n_obs_steps + 1 = "
                f"{horizon - n_obs_steps + 1}, got {n_action_steps}"
            )
        self.shape_meta = {
            "obs": {k: {"shape": list(v["shape"]), "type": v.get("type", "low_dim")}
                    for k, v in shape_meta["obs"].items()},
            "action": {"shape": list(shape_meta["action"]["shape"])},
        }
        self.action_dim = int(self.shape_meta["action"]["shape"][0])
        self.horizon, self.n_obs_steps, self.n_action_steps = horizon, n_obs_steps, n_action_steps
        self.normalizer = LinearNormalizer()
        self.obs_encoder = ObsEncoder(
            self.shape_meta, crop_shape=tuple(crop_shape) if crop_shape else None, num_kp=num_kp,
            feature_dim=feature_dim, share_rgb_model=share_rgb_model,
        )
        self.model = ConditionalUnet1D(
            self.action_dim, self.obs_encoder.output_dim * n_obs_steps,
            diffusion_step_embed_dim=diffusion_step_embed_dim, down_dims=tuple(down_dims),
            kernel_size=kernel_size, n_groups=n_groups, cond_predict_scale=cond_predict_scale,
        )
        if horizon % self.model.horizon_multiple:
            raise ValueError(
                f"horizon: {horizon} must be divisible by {self.model.horizon_multiple} "
                f"for down_dims {tuple(down_dims)}"
            )

    # ------------------------------------------------------------------ DP API
    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    def set_normalizer(self, normalizer: LinearNormalizer) -> None:
        """Copy a fitted normaliser (keys: each obs key and "action") into the policy."""
        needed = [*self.shape_meta["obs"], "action"]
        missing = [k for k in needed if k not in normalizer]
        if missing:
            raise ValueError(f"normalizer: missing keys {missing}; has {normalizer.keys()}")
        self.normalizer.load_state_dict(normalizer.state_dict())
        self.normalizer.to(self.device)

    def reset(self) -> None:
        """Stateless between calls; kept for API compatibility with stateful policies."""

    @torch.no_grad()
    def predict_action(
        self, obs_dict: Mapping[str, torch.Tensor], generator: torch.Generator | None = None
    ) -> dict[str, torch.Tensor]:
        """obs_dict {key: [B, >=To, *shape]} -> {"action": [B, Ta, Da], "action_pred": [B, T, Da]}.

        `generator` seeds the initial noise (optional; defaults to torch's global RNG).
        """
        cond = self._encode(self._check_obs(obs_dict))
        noise = torch.randn(
            cond.shape[0], self.horizon, self.action_dim, device=cond.device, dtype=cond.dtype,
            generator=generator,
        )
        naction = self.sample(noise, cond, generator=generator)
        action_pred = self.normalizer["action"].unnormalize(naction)
        start = self.n_obs_steps - 1
        return {"action": action_pred[:, start : start + self.n_action_steps],
                "action_pred": action_pred}

    def compute_loss(self, batch: Mapping) -> torch.Tensor:
        """batch {"obs": ..., "action": [B, T, Da]} -> scalar training loss."""
        return self.compute_loss_and_info(batch)[0]

    def forward(self, batch: Mapping) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Same as compute_loss_and_info; lets DistributedDataParallel wrap the policy."""
        return self.compute_loss_and_info(batch)

    def compute_loss_and_info(self, batch: Mapping) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Scalar loss plus detached scalars to log."""
        obs = batch["obs"] if isinstance(batch["obs"], Mapping) else {"obs": batch["obs"]}
        action = batch["action"]
        expected = (self.horizon, self.action_dim)
        if action.ndim != 3 or tuple(action.shape[1:]) != expected:
            raise ValueError(
                f"batch['action']: expected shape [B, {expected[0]}, {expected[1]}], "
                f"got {tuple(action.shape)}"
            )
        cond = self._encode(self._check_obs(obs))
        naction = self.normalizer["action"].normalize(action)
        return self.loss(naction, cond)

    # ------------------------------------------------------------------ subclasses
    def sample(
        self, noise: torch.Tensor, cond: torch.Tensor, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """noise [B, T, Da], cond [B, C] -> normalised action chunk [B, T, Da]."""
        raise NotImplementedError

    def loss(
        self, naction: torch.Tensor, cond: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """naction [B, T, Da] (normalised expert chunk), cond [B, C] -> (loss, info)."""
        raise NotImplementedError

    # ------------------------------------------------------------------ helpers
    def _check_obs(self, obs_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Validate {key: [B, >=To, *shape]} and keep the first To steps of each key."""
        out, batch = {}, None
        for key, meta in self.shape_meta["obs"].items():
            if key not in obs_dict:
                raise ValueError(f"obs: missing key '{key}'; got keys {sorted(obs_dict)}")
            x = obs_dict[key]
            shape = tuple(meta["shape"])
            bad_rank = x.ndim != 2 + len(shape) or tuple(x.shape[2:]) != shape
            if bad_rank or x.shape[1] < self.n_obs_steps:
                raise ValueError(
                    f"obs['{key}']: expected shape [B, >={self.n_obs_steps}, "
                    f"{', '.join(map(str, shape))}], got {tuple(x.shape)}"
                )
            if batch is not None and x.shape[0] != batch:
                raise ValueError(f"obs['{key}']: batch {x.shape[0]} differs from {batch}")
            batch = x.shape[0]
            out[key] = x[:, : self.n_obs_steps].to(self.device, self.dtype)
        return out

    def _encode(self, obs: dict[str, torch.Tensor]) -> torch.Tensor:
        """{key: [B, To, *shape]} -> global conditioning [B, To * D]."""
        nobs = self.normalizer.normalize(obs)
        b = next(iter(nobs.values())).shape[0]
        flat = {k: v.reshape(b * self.n_obs_steps, *v.shape[2:]) for k, v in nobs.items()}
        return self.obs_encoder(flat).reshape(b, -1)
