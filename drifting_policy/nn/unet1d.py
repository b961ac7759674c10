"""Temporal 1-D U-Net conditioned by FiLM — Diffusion Policy's ``ConditionalUnet1D``.

Same layers, same layout and the same parameter count as the Diffusion Policy network
(Chi et al., RSS 2023) with global conditioning and no local conditioning:

- the step t goes through a sinusoidal embedding and an MLP (d -> 4d -> Mish -> d);
- the conditioning vector is concat(step embedding, global_cond) [B, d + global_cond_dim];
- every residual block has two Conv1d-GroupNorm-Mish blocks; between them the condition sets a
  per-channel scale and bias (FiLM; bias only when ``cond_predict_scale`` is False);
- the down path halves the horizon after every level but the last (stride-2 conv), two blocks sit
  in the middle, the up path concatenates the skip and doubles the horizon (transposed conv),
  and a Conv1d block plus a 1x1 conv map back to ``input_dim`` channels.

Tensors are [B, T, C] at the interface (time-major, as actions are stored) and [B, C, T] inside.
Module names follow Diffusion Policy's, so its state_dict keys load here unchanged.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn


class SinusoidalStepEmbedding(nn.Module):
    """Transformer-style sinusoidal embedding of a scalar step: [B] -> [B, dim] as (sin, cos)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        if dim % 2 != 0 or dim < 4:
            raise ValueError(f"diffusion_step_embed_dim: expected an even number >= 4, got {dim}")
        half = dim // 2
        # frequencies 10000^(-i / (half - 1)), i = 0 .. half-1: from 1 down to 1/10000
        freqs = torch.exp(torch.arange(half) * (-math.log(10000.0) / (half - 1)))
        self.register_buffer("freqs", freqs, persistent=False)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        """t [B] (any real dtype) -> [B, dim]."""
        angles = t.to(self.freqs.dtype)[:, None] * self.freqs[None, :]
        return torch.cat([angles.sin(), angles.cos()], dim=-1)


class Conv1dBlock(nn.Module):
    """Conv1d (same padding) -> GroupNorm -> Mish: [B, C_in, T] -> [B, C_out, T]."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, n_groups: int):
        super().__init__()
        self.block = nn.Sequential(
            nn.Conv1d(in_channels, out_channels, kernel_size, padding=kernel_size // 2),
            nn.GroupNorm(n_groups, out_channels),
            nn.Mish(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(x)


class Downsample1d(nn.Module):
    """Halve the horizon with a stride-2 conv: [B, C, T] -> [B, C, T / 2]."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv1d(channels, channels, kernel_size=3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class Upsample1d(nn.Module):
    """Double the horizon with a transposed conv: [B, C, T] -> [B, C, 2 T]."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.ConvTranspose1d(channels, channels, kernel_size=4, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class ConditionalResidualBlock1D(nn.Module):
    """Two Conv1d blocks with FiLM from the condition in between, plus a residual path.

    x [B, C_in, T], cond [B, cond_dim] -> [B, C_out, T].
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        cond_dim: int,
        kernel_size: int,
        n_groups: int,
        cond_predict_scale: bool,
    ) -> None:
        super().__init__()
        self.out_channels = out_channels
        self.cond_predict_scale = cond_predict_scale
        self.blocks = nn.ModuleList(
            [
                Conv1dBlock(in_channels, out_channels, kernel_size, n_groups),
                Conv1dBlock(out_channels, out_channels, kernel_size, n_groups),
            ]
        )
        film_channels = 2 * out_channels if cond_predict_scale else out_channels
        self.cond_encoder = nn.Sequential(nn.Mish(), nn.Linear(cond_dim, film_channels))
        # 1x1 conv only where the channel count changes
        self.residual_conv = (
            nn.Conv1d(in_channels, out_channels, 1)
            if in_channels != out_channels
            else nn.Identity()
        )

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        h = self.blocks[0](x)
        film = self.cond_encoder(cond)[:, :, None]  # [B, film_channels, 1]
        if self.cond_predict_scale:
            scale, bias = film.split(self.out_channels, dim=1)
            h = scale * h + bias
        else:
            h = h + film
        return self.blocks[1](h) + self.residual_conv(x)


class ConditionalUnet1D(nn.Module):
    """Diffusion Policy's conditional temporal U-Net (global conditioning only).

    Args:
        input_dim: channels of the sample (the action dimension Da).
        global_cond_dim: size of the flat conditioning vector (e.g. To * obs feature size).
        diffusion_step_embed_dim: size d of the step embedding (DP: 256 lowdim, 128 image).
        down_dims: channels per U-Net level; the horizon is halved len(down_dims) - 1 times,
            so T must be divisible by 2 ** (len(down_dims) - 1).
        kernel_size: temporal kernel of every Conv1d block (DP configs: 5).
        n_groups: GroupNorm groups; must divide every entry of down_dims. (DP's final block
            always uses 8 groups; here n_groups applies everywhere — identical at the default.)
        cond_predict_scale: FiLM with scale and bias (True, DP configs) or bias only.
    """

    def __init__(
        self,
        input_dim: int,
        global_cond_dim: int,
        diffusion_step_embed_dim: int = 256,
        down_dims: Sequence[int] = (256, 512, 1024),
        kernel_size: int = 5,
        n_groups: int = 8,
        cond_predict_scale: bool = True,
    ) -> None:
        super().__init__()
        down_dims = tuple(int(d) for d in down_dims)
        if len(down_dims) < 1:
            raise ValueError("down_dims: expected at least one level, got an empty sequence")
        self.input_dim = int(input_dim)
        self.global_cond_dim = int(global_cond_dim)
        self.down_dims = down_dims
        self.horizon_multiple = 2 ** (len(down_dims) - 1)

        d = diffusion_step_embed_dim
        self.diffusion_step_encoder = nn.Sequential(
            SinusoidalStepEmbedding(d),
            nn.Linear(d, 4 * d),
            nn.Mish(),
            nn.Linear(4 * d, d),
        )
        cond_dim = d + self.global_cond_dim

        def res_block(c_in: int, c_out: int) -> ConditionalResidualBlock1D:
            return ConditionalResidualBlock1D(
                c_in, c_out, cond_dim, kernel_size, n_groups, cond_predict_scale
            )

        # level i maps channels[i] -> channels[i + 1]
        channels = (self.input_dim, *down_dims)
        levels = list(zip(channels[:-1], channels[1:], strict=True))

        self.down_modules = nn.ModuleList()
        for i, (c_in, c_out) in enumerate(levels):
            is_deepest = i == len(levels) - 1
            self.down_modules.append(
                nn.ModuleList(
                    [
                        res_block(c_in, c_out),
                        res_block(c_out, c_out),
                        nn.Identity() if is_deepest else Downsample1d(c_out),
                    ]
                )
            )

        mid = down_dims[-1]
        self.mid_modules = nn.ModuleList([res_block(mid, mid), res_block(mid, mid)])

        # the up path mirrors every level except the first: input = upsampled + skip channels
        self.up_modules = nn.ModuleList()
        for c_in, c_out in reversed(levels[1:]):
            self.up_modules.append(
                nn.ModuleList(
                    [
                        res_block(2 * c_out, c_in),
                        res_block(c_in, c_in),
                        Upsample1d(c_in),
                    ]
                )
            )

        self.final_conv = nn.Sequential(
            Conv1dBlock(down_dims[0], down_dims[0], kernel_size, n_groups),
            nn.Conv1d(down_dims[0], self.input_dim, 1),
        )

    def _step_tensor(
        self, timestep: torch.Tensor | int | float, sample: torch.Tensor
    ) -> torch.Tensor:
        """Timestep as a float tensor [B]: python numbers and 0-d / [1] tensors are broadcast.

        A number or a one-element CPU tensor (a scheduler's timestep) is filled in on the
        sample's device: no host-to-device copy, so no sync per denoising step on a GPU.
        """
        batch = sample.shape[0]
        host = not isinstance(timestep, torch.Tensor) or (
            timestep.device.type == "cpu" and timestep.numel() == 1)
        if host:
            t = sample.new_full((1,), float(timestep))
        else:
            t = timestep.to(sample.device)
        if t.ndim == 0:
            t = t[None]
        if t.ndim != 1 or t.shape[0] not in (1, batch):
            raise ValueError(
                f"timestep: expected a number, a 0-d tensor or shape [{batch}] (B), "
                f"got shape {tuple(t.shape)}"
            )
        return t.to(sample.dtype).expand(batch)

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor | int | float,
        global_cond: torch.Tensor,
    ) -> torch.Tensor:
        """Predict a [B, T, input_dim] tensor.

        Args:
            sample: [B, T, input_dim], T divisible by 2 ** (len(down_dims) - 1).
            timestep: [B] tensor, 0-d tensor or python number (broadcast over the batch).
            global_cond: [B, global_cond_dim].

        Returns:
            [B, T, input_dim].
        """
        if sample.ndim != 3 or sample.shape[2] != self.input_dim:
            raise ValueError(
                f"sample: expected shape [B, T, {self.input_dim}] (input_dim={self.input_dim}), "
                f"got {tuple(sample.shape)}"
            )
        batch, horizon = sample.shape[:2]
        if horizon % self.horizon_multiple != 0:
            raise ValueError(
                f"sample: horizon T={horizon} must be divisible by "
                f"2**(len(down_dims)-1) = {self.horizon_multiple} (down_dims={self.down_dims}), "
                f"got shape {tuple(sample.shape)}"
            )
        if tuple(global_cond.shape) != (batch, self.global_cond_dim):
            raise ValueError(
                f"global_cond: expected shape {(batch, self.global_cond_dim)} "
                f"(B, global_cond_dim), got {tuple(global_cond.shape)}"
            )
        t = self._step_tensor(timestep, sample)
        cond = torch.cat([self.diffusion_step_encoder(t), global_cond], dim=-1)

        x = sample.transpose(1, 2)  # [B, C, T]
        skips = []
        for block1, block2, downsample in self.down_modules:
            x = block2(block1(x, cond), cond)
            skips.append(x)
            x = downsample(x)
        for block in self.mid_modules:
            x = block(x, cond)
        for block1, block2, upsample in self.up_modules:
            x = torch.cat([x, skips.pop()], dim=1)
            x = upsample(block2(block1(x, cond), cond))
        return self.final_conv(x).transpose(1, 2)
