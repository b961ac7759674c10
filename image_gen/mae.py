"""The frozen feature encoder of the drift loss: a ResNet masked autoencoder (latent-MAE).

Deng et al., "Generative Modeling via Drifting" sec. 3 / A and the authors' release
(models/mae_model.py): a GroupNorm ResNet encoder (3x3 stem, basic-block stages of widths
C, 2C, 4C, 8C, stride 2 between stages, a GroupNorm after each stage) and a U-Net decoder back to
the input resolution, trained to reconstruct 2x2 patches that were zeroed with probability 0.5
(L2 on the masked region only), optionally fine-tuned with a linear classifier on the mean-pooled
last stage.

The pixel variant (release `input_patch_size=8`, configs/mae/pixel_640) first rearranges each
8 x 8 pixel cell into channels (space-to-depth: 256x256x3 -> 32x32x192) and runs the same network
on that grid: masking zeroes 2 x 2 cells of the grid (16 x 16 pixels), the decoder predicts the
192 channels and the loss is taken on the grid. `input_patch=1` is the latent MAE.

Shapes: x [B, C_in, H, W] with H, W multiples of `min_multiple` = input_patch *
lcm(2^(len(stages) - 1), patch) (latents: 32x32x4; pixels: 256x256x3 with input_patch 8; the tests
use 16x16x1). Every stage keeps at least a 1x1 map.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

_MASK_EPS = 1e-8  # guards the masked-pixel count of an unmasked sample
_GN_EPS = 1e-6  # GroupNorm epsilon (flax default, as released)
_MIN_GROUP_SIZE = 4  # channels per GroupNorm group, at least (see gn_groups)


def gn_groups(channels: int, max_groups: int) -> int:
    """Largest group count that divides `channels`, is <= max_groups and leaves >= 4 channels per
    group (1 for fewer than 8 channels). The release takes the largest divisor <= max_groups, which
    is the same for its widths (>= 128); on narrow test / demo widths one channel per group would
    make every stage output's per-channel mean and std input-independent constants, i.e. dead
    features."""
    g = max(1, min(max_groups, channels // _MIN_GROUP_SIZE))
    while channels % g:
        g -= 1
    return g


def _norm(channels: int, max_groups: int) -> nn.GroupNorm:
    return nn.GroupNorm(gn_groups(channels, max_groups), channels, eps=_GN_EPS)


class BasicBlock(nn.Module):
    """relu(proj(x) + GN(conv(relu(GN(conv(x)))))); [B, Cin, H, W] -> [B, Cout, H/s, W/s]."""

    def __init__(self, c_in: int, c_out: int, stride: int, groups: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.gn1 = _norm(c_out, groups)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.gn2 = _norm(c_out, groups)
        self.proj = None
        if stride != 1 or c_in != c_out:
            self.proj = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False),
                                      _norm(c_out, groups))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.gn2(self.conv2(F.relu(self.gn1(self.conv1(x)))))
        return F.relu(y + (x if self.proj is None else self.proj(x)))


def space_to_depth(x: torch.Tensor, p: int) -> torch.Tensor:
    """x [B, C, H, W] -> [B, p * p * C, H / p, W / p]: each p x p cell becomes one location,
    channel (i * p + j) * C + c holding pixel (i, j) of channel c (release `patch_input` order)."""
    if p == 1:
        return x
    b, c, h, w = x.shape
    x = x.reshape(b, c, h // p, p, w // p, p).permute(0, 3, 5, 1, 2, 4)
    return x.reshape(b, p * p * c, h // p, w // p)


def depth_to_space(x: torch.Tensor, p: int) -> torch.Tensor:
    """Inverse of `space_to_depth`: [B, p * p * C, h, w] -> [B, C, h * p, w * p]."""
    if p == 1:
        return x
    b, pc, h, w = x.shape
    c = pc // (p * p)
    x = x.reshape(b, p, p, c, h, w).permute(0, 3, 4, 1, 5, 2)
    return x.reshape(b, c, h * p, w * p)


def _conv_gn_relu(c_in: int, c_out: int, groups: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, 1, 1, bias=False), _norm(c_out, groups),
                         nn.ReLU())


class UpBlock(nn.Module):
    """Bilinear upsample to the skip's size, concat, GroupNorm, two conv-GN-ReLU:
    x [B, Cx, h, w], skip [B, Cs, H, W] -> [B, Cout, H, W]."""

    def __init__(self, c_x: int, c_skip: int, c_out: int, groups: int) -> None:
        super().__init__()
        self.norm = _norm(c_x + c_skip, groups)
        self.convs = nn.Sequential(_conv_gn_relu(c_x + c_skip, c_out, groups),
                                   _conv_gn_relu(c_out, c_out, groups))

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=False)
        return self.convs(self.norm(torch.cat([x, skip], dim=1)))


class ResNetMAE(nn.Module):
    """ResNet-GN masked autoencoder; its encoder activations are the drift loss's features.

    Args:
        in_channels: C_in of the input (4 for SD-VAE latents, 3 for pixels).
        width: C, the stem and first-stage width; stage i has width C * 2^i.
        stages: basic blocks per stage (release: (3, 4, 6, 3)).
        num_classes: > 0 adds a linear head on the mean-pooled last stage (`cls_loss`).
        patch: side of the square patches that `mask` zeroes, in cells of the encoder's grid.
        groups: maximum GroupNorm group count (per width: see `gn_groups`).
        input_patch: space-to-depth factor before the encoder (release `input_patch_size`: 8 for
            the pixel MAE, 1 for latents); the network sees C_in * input_patch^2 channels.
    """

    def __init__(self, *, in_channels: int, width: int, stages: tuple[int, ...] = (3, 4, 6, 3),
                 num_classes: int = 0, patch: int = 2, groups: int = 32,
                 input_patch: int = 1) -> None:
        super().__init__()
        if not stages or min(stages) < 1:
            raise ValueError(f"stages: expected a non-empty tuple of block counts >= 1, got "
                             f"{tuple(stages)}")
        for key, val in (("in_channels", in_channels), ("width", width), ("patch", patch),
                         ("groups", groups), ("input_patch", input_patch)):
            if val < 1:
                raise ValueError(f"{key}: expected >= 1, got {val}")
        if num_classes < 0:
            raise ValueError(f"num_classes: expected >= 0, got {num_classes}")
        self.in_channels, self.patch, self.stages = in_channels, patch, tuple(stages)
        self.input_patch = input_patch
        grid_channels = in_channels * input_patch**2
        widths = [width * 2**i for i in range(len(stages))]

        self.stem = nn.Sequential(nn.Conv2d(grid_channels, width, 3, 1, 1, bias=False),
                                  _norm(width, groups), nn.ReLU())
        self.layers = nn.ModuleList()
        self.stage_norms = nn.ModuleList()
        c_prev = width
        for i, (n_blocks, c) in enumerate(zip(stages, widths)):
            blocks = [BasicBlock(c_prev if j == 0 else c, c, 2 if (i > 0 and j == 0) else 1,
                                 groups) for j in range(n_blocks)]
            self.layers.append(nn.ModuleList(blocks))
            self.stage_norms.append(_norm(c, groups))
            c_prev = c

        # U-Net decoder: bridge on the last stage, then up through every stage and the stem.
        self.bridge = _conv_gn_relu(widths[-1], widths[-1], groups)
        # Each up block outputs its skip's width: deepest stage first, ending at the stem.
        self.ups = nn.ModuleList()
        c_x = widths[-1]
        for c_skip in widths[:-1][::-1] + [width]:
            self.ups.append(UpBlock(c_x, c_skip, c_skip, groups))
            c_x = c_skip
        self.head = nn.Conv2d(c_x, grid_channels, 1)
        self.fc = nn.Linear(widths[-1], num_classes) if num_classes > 0 else None

    @property
    def min_multiple(self) -> int:
        """H and W must be multiples of this (space-to-depth, stride-2 stages, mask patch)."""
        return self.input_patch * math.lcm(2 ** (len(self.stages) - 1), self.patch)

    def encoder_input(self, x: torch.Tensor) -> torch.Tensor:
        """What the encoder sees: x [B, C, H, W] -> space_to_depth [B, C * q^2, H / q, W / q]
        (q = input_patch; x itself for q = 1)."""
        self._check(x)
        return space_to_depth(x, self.input_patch)

    def activation_names(self) -> list[str]:
        """Names of the maps `activations` returns, in its order: "stem", then per stage i
        (1-based) its every-2nd block outputs "stage{i}.block{j}" followed by "stage{i}"."""
        names = ["stem"]
        for i, n_blocks in enumerate(self.stages, start=1):
            names += [f"stage{i}.block{j}" for j in range(2, n_blocks + 1, 2)] + [f"stage{i}"]
        return names

    def _check(self, x: torch.Tensor) -> None:
        m = self.min_multiple
        if x.ndim != 4 or x.shape[1] != self.in_channels or x.shape[2] % m or x.shape[3] % m:
            raise ValueError(f"x: expected [B, {self.in_channels}, H, W] with H, W multiples of "
                             f"{m}, got {tuple(x.shape)}")

    def _encode(self, x: torch.Tensor, keep_blocks: bool
                ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """(activations in `activation_names` order, [stem, stage outputs]) of x [B, C, H, W]."""
        h = self.stem(self.encoder_input(x))
        acts, skips = [h], [h]
        for blocks, norm in zip(self.layers, self.stage_norms):
            for j, block in enumerate(blocks, start=1):
                h = block(h)
                if keep_blocks and j % 2 == 0:
                    acts.append(h)
            h = norm(h)
            acts.append(h)
            skips.append(h)
        return acts, skips

    def activations(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Encoder feature maps of x [B, C, H, W]: the stem output [B, width, H / q, W / q]
        (q = input_patch), every 2nd block output of each stage (blocks 2, 4, ...; before the stage
        norm) and each stage's GroupNorm-ed output [B, width * 2^i, H / (q 2^i), W / (q 2^i)];
        names in `activation_names()`."""
        return self._encode(x, keep_blocks=True)[0]

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Reconstruction [B, C, H, W] of (masked) x [B, C, H, W], and class logits [B, K] from
        the mean-pooled last stage (None without a head). One encoder pass serves both; the
        decoder predicts the space-to-depth grid, rearranged back to pixels."""
        skips = self._encode(x, keep_blocks=False)[1]
        h = self.bridge(skips[-1])
        for up, skip in zip(self.ups, skips[-2::-1]):
            h = up(h, skip)
        logits = None if self.fc is None else self.fc(skips[-1].mean(dim=(2, 3)))
        return depth_to_space(self.head(h), self.input_patch), logits

    def mask(self, x: torch.Tensor, ratio: float = 0.5,
             generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Zero each block of patch x patch grid cells (patch * input_patch pixels square)
        independently with probability `ratio`.

        Returns x_masked [B, C, H, W] and mask [B, 1, H, W] (1 = masked).
        """
        self._check(x)
        if not 0.0 <= ratio <= 1.0:
            raise ValueError(f"ratio: expected a value in [0, 1], got {ratio}")
        b, _, h, w = x.shape
        p = self.patch * self.input_patch
        u = torch.rand(b, 1, h // p, w // p, device=x.device, generator=generator)
        mask = (u < ratio).to(x.dtype).repeat_interleave(p, 2).repeat_interleave(p, 3)
        return x * (1 - mask), mask

    def mae_loss(self, x: torch.Tensor, ratio: float = 0.5,
                 generator: torch.Generator | None = None) -> torch.Tensor:
        """Masked-reconstruction loss (scalar) of x [B, C, H, W]: see `recon_loss`."""
        x_masked, mask = self.mask(x, ratio, generator)
        return self.recon_loss(self(x_masked)[0], x, mask)

    def recon_loss(self, recon: torch.Tensor, x: torch.Tensor, mask: torch.Tensor
                   ) -> torch.Tensor:
        """`masked_l2` on the encoder's grid (release): recon, x [B, C, H, W] and mask
        [B, 1, H, W] of `mask` are rearranged by space-to-depth first, so each masked cell counts
        once with its C * input_patch^2 squared errors summed."""
        q = self.input_patch
        return masked_l2(space_to_depth(recon, q), space_to_depth(x, q), mask[:, :, ::q, ::q])

    def cls_loss(self, x: torch.Tensor, labels: torch.Tensor, *, ratio: float = 0.0,
                 generator: torch.Generator | None = None) -> torch.Tensor:
        """Cross-entropy (scalar) of the linear head on x [B, C, H, W] against labels [B]; the
        input is masked with `ratio` first (the release fine-tunes on masked inputs, 0.5)."""
        if self.fc is None:
            raise ValueError("num_classes: cls_loss needs a classification head, built with "
                             "num_classes > 0, got num_classes=0")
        if ratio > 0:
            x = self.mask(x, ratio, generator)[0]
        return F.cross_entropy(self(x)[1].float(), labels)


def masked_l2(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Release reconstruction loss: per sample, the squared error summed over channels and averaged
    over masked locations; then the batch mean. pred, target [B, C, H, W]; mask [B, 1, H, W]."""
    per_loc = ((pred.float() - target.float()) ** 2).sum(dim=1, keepdim=True) * mask
    per_sample = per_loc.sum(dim=(1, 2, 3)) / (mask.sum(dim=(1, 2, 3)) + _MASK_EPS)
    return per_sample.mean()
