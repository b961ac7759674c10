"""Diffusion Policy's policy API, shared by the drifting policy and the diffusion baseline.

A policy predicts an action chunk [B, T, Da] from the last To observations:

    obs dict --normaliser--> obs encoder (per step) --flatten To--> global cond [B, To * D]
             --generator (subclass: one pass or a denoising loop)--> normalised chunk [B, T, Da]
             --unnormalise--> action_pred; action = action_pred[:, To - 1 : To - 1 + Ta]

Lowdim tasks use one low_dim key `obs` (obs_dict = {"obs": [B, To, Do]}, as in DP's lowdim
policies); image tasks use one entry per shape_meta key (rgb [B, To, 3, H, W]: float in [0, 1]
or uint8 in 0..255, scaled on the policy's device).
Both go through the same ObsEncoder (a low_dim key passes straight through).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import ClassVar

import torch
from torch import nn

import drifting_policy.policy.pretrained as pretrained
from drifting_policy.nn.normalizer import LinearNormalizer
from drifting_policy.nn.obs_encoder import ObsEncoder
from drifting_policy.nn.unet1d import ConditionalUnet1D
from drifting_policy.policy.configs import PolicyConfig

SELECTIONS = ("medoid",)


def medoid(chunks: torch.Tensor) -> torch.Tensor:
    """chunks [B, K, T, Da] -> [B, T, Da]: per row, the candidate whose summed L2 distance to
    the other candidates (flattened chunks) is least; ties go to the lowest index."""
    b, k, t, da = chunks.shape
    flat = chunks.reshape(b, k, t * da)
    cost = (flat[:, :, None] - flat[:, None]).square().sum(-1).sqrt().sum(-1)  # [B, K]
    index = cost.argmin(-1)[:, None, None, None].expand(b, 1, t, da)  # gather: ONNX-exportable
    return chunks.gather(1, index).squeeze(1)


class ChunkPolicy(nn.Module):
    """Base of the action-chunk policies: normaliser, observation encoder and a ConditionalUnet1D,
    all sized by a typed config (`drifting_policy.policy.configs`).

    Subclasses set `config_class` and implement `sample` (noise -> chunk) and `loss`.
    """

    config_class: ClassVar[type[PolicyConfig]] = PolicyConfig

    def __init__(self, config: PolicyConfig) -> None:
        super().__init__()
        if not isinstance(config, self.config_class):
            raise TypeError(f"{type(self).__name__}: expected a {self.config_class.__name__}, "
                            f"got {type(config).__name__}")
        self.config = config
        self.shape_meta = config.shape_meta
        self.action_dim = config.action_dim
        self.horizon, self.n_obs_steps = config.horizon, config.n_obs_steps
        self.n_action_steps = config.n_action_steps
        self.normalizer = LinearNormalizer()
        self.obs_encoder = ObsEncoder(
            self.shape_meta, crop_shape=config.crop_shape, num_kp=config.num_kp,
            feature_dim=config.feature_dim, share_rgb_model=config.share_rgb_model,
        )
        self.model = ConditionalUnet1D(
            self.action_dim, self.obs_encoder.output_dim * config.n_obs_steps,
            diffusion_step_embed_dim=config.diffusion_step_embed_dim,
            down_dims=config.down_dims, kernel_size=config.kernel_size,
            n_groups=config.n_groups, cond_predict_scale=config.cond_predict_scale,
        )

    # ------------------------------------------------------------------ DP API
    @property
    def device(self) -> torch.device:
        """Where the networks live (the normaliser follows them in `set_normalizer`)."""
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def set_normalizer(self, normalizer: LinearNormalizer) -> None:
        """Copy a fitted normaliser (keys: each obs key and "action") onto the policy's device."""
        needed = [*self.shape_meta["obs"], "action"]
        missing = [k for k in needed if k not in normalizer]
        if missing:
            raise ValueError(f"normalizer: missing keys {missing}; has {normalizer.keys()}")
        self.normalizer.load_state_dict(normalizer.state_dict())
        self.normalizer.to(self.device)

    def reset(self) -> None:
        """Stateless between calls; kept for API compatibility with stateful policies."""

    # ------------------------------------------------------------------ checkpoints
    def save_pretrained(self, directory: str | Path) -> Path:
        """Write `directory`/config.json ({"type": ..., fields}) + model.safetensors, atomically."""
        return pretrained.save(self, directory)

    @classmethod
    def from_pretrained(cls, directory: str | Path) -> ChunkPolicy:
        """Rebuild from a `save_pretrained` directory (data only: config.json + safetensors)."""
        config = pretrained.read_config(directory)
        if not isinstance(config, cls.config_class):
            raise pretrained.CheckpointError(
                f"{Path(directory) / pretrained.CONFIG}: 'type' is {config.type!r}, "
                f"but {cls.__name__} loads {cls.config_class.type!r}")
        policy = cls(config)
        pretrained.load_weights(policy, Path(directory) / pretrained.WEIGHTS)
        return policy

    # ------------------------------------------------------------------ inference
    @torch.no_grad()
    def predict_action(
        self, obs_dict: Mapping[str, torch.Tensor], generator: torch.Generator | None = None,
        n_samples: int = 1, select: str = "medoid",
    ) -> dict[str, torch.Tensor]:
        """obs_dict {key: [B, >=To, *shape]} -> {"action": [B, Ta, Da], "action_pred": [B, T, Da]}.

        `generator` seeds the initial noise; it is drawn on the generator's device (a CPU
        generator gives the same noise whatever the policy's device) and then moved.
        `n_samples` = K > 1 draws K chunks per observation in one batched pass and returns, per
        observation, the one `select` picks: "medoid" = the candidate with the least summed
        distance (normalised space) to the other K - 1, so the executed chunk stays in one mode.
        """
        if select not in SELECTIONS:
            raise ValueError(f"select: expected one of {SELECTIONS}, got {select!r}")
        chunks = self.sample_chunks(obs_dict, n_samples, generator)
        naction = medoid(chunks) if n_samples > 1 else chunks[:, 0]
        action_pred = self.normalizer["action"].unnormalize(naction)
        start = self.n_obs_steps - 1
        return {"action": action_pred[:, start : start + self.n_action_steps],
                "action_pred": action_pred}

    @torch.no_grad()
    def sample_chunks(
        self, obs_dict: Mapping[str, torch.Tensor], n_samples: int = 1,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """obs_dict {key: [B, >=To, *shape]} -> K = `n_samples` normalised chunks per
        observation [B, K, T, Da], drawn in one batched pass (noise as in predict_action)."""
        if n_samples < 1:
            raise ValueError(f"n_samples: expected >= 1, got {n_samples}")
        cond = self._encode(self._check_obs(obs_dict))
        b = cond.shape[0]
        shape = (b * n_samples, self.horizon, self.action_dim)
        noise_device = generator.device if generator is not None else cond.device
        noise = torch.randn(shape, device=noise_device, dtype=cond.dtype, generator=generator)
        cond = cond.repeat_interleave(n_samples, dim=0) if n_samples > 1 else cond
        naction = self.sample(noise.to(cond.device), cond, generator=generator)
        return naction.reshape(b, n_samples, self.horizon, self.action_dim)

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
        """Validate {key: [B, >=To, *shape]} and keep the first To steps of each key, on the
        policy's device; uint8 rgb (0..255) becomes float in [0, 1] there."""
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
            x = x[:, : self.n_obs_steps].to(self.device, non_blocking=True)
            if meta["type"] == "rgb" and x.dtype == torch.uint8:
                x = x.to(self.dtype) / 255.0  # uint8 frames travel as bytes, scaled here
            out[key] = x.to(self.dtype)
        return out

    def _encode(self, obs: dict[str, torch.Tensor]) -> torch.Tensor:
        """{key: [B, To, *shape]} -> global conditioning [B, To * D]."""
        nobs = self.normalizer.normalize(obs)
        b = next(iter(nobs.values())).shape[0]
        flat = {k: v.reshape(b * self.n_obs_steps, *v.shape[2:]) for k, v in nobs.items()}
        return self.obs_encoder(flat).reshape(b, -1)
