"""The one-step drifting generator: a DiT (LightningDiT-style) mapping noise to a sample.

Deng et al., "Generative Modeling via Drifting" sec. 4 and the authors' release (models/
generator.py): patch embedding, adaLN-zero blocks with qk-RMSNorm, SwiGLU MLPs and rotary position
embedding, RMSNorm everywhere, 16 in-context class tokens, a "style" code (the sum of 32 embeddings
each looked up by a random integer in a 64-entry table) and the CFG scale alpha embedded like a
diffusion timestep. The output layer is zero-initialised, so a fresh generator outputs exactly 0.

Built on timm's layers where they compute the same function: `PatchEmbed` (a p x p stride-p
convolution), `AttentionRope` (fused qkv with bias, per-head q/k `RmsNorm`, rotary embedding on
the image tokens only, `F.scaled_dot_product_attention`), `SwiGLU`, `RmsNorm`, the axial rotary
table of `RotaryEmbeddingCat` and the 2-D sin-cos table of `build_sincos2d_pos_embed`. What timm
does not have is written here: adaLN-zero modulation, the in-context class tokens, the style and
alpha embeddings and the final layer.

One forward pass generates: x = f(noise, label, alpha, style).

Shapes: noise and output [B, C, H, W] (H = W = input_size), labels [B] int64, alpha [B] float,
style [B, n_style_tokens] int64 in [0, style_vocab).

Differences from the release (documented in docs/image_gen_models.md): RoPE is 2-D (row and
column of each image token, class tokens unrotated) where the release rotates by the 1-D token
index; the in-context class tokens are omitted from the final layer instead of sliced off after it.
Both leave the parameter count unchanged.
"""

from __future__ import annotations

import math
from functools import partial

import torch
from timm.layers import (
    AttentionRope,
    PatchEmbed,
    RmsNorm,
    RotaryEmbeddingCat,
    SwiGLU,
    build_sincos2d_pos_embed,
)
from torch import nn
from torch.utils.checkpoint import checkpoint

# Paper sizes (latent 32x32x4, patch 2; pixel 256x256x3, patch 16) and a CPU test/demo size.
PRESETS: dict[str, dict] = {
    "B/2": dict(input_size=32, in_channels=4, patch_size=2, hidden=768, depth=12, heads=12,
                num_classes=1000),
    "L/2": dict(input_size=32, in_channels=4, patch_size=2, hidden=1024, depth=24, heads=16,
                num_classes=1000),
    "B/16": dict(input_size=256, in_channels=3, patch_size=16, hidden=768, depth=12, heads=12,
                 num_classes=1000),
    "L/16": dict(input_size=256, in_channels=3, patch_size=16, hidden=1024, depth=24, heads=16,
                 num_classes=1000),
    "tiny": dict(input_size=16, in_channels=1, patch_size=2, hidden=128, depth=4, heads=4,
                 num_classes=10, n_class_tokens=4),
}

_NORM_EPS = 1e-6
_EMBED_STD = 0.02  # normal init of embedding tables, class-token offsets and the alpha MLP
_ALPHA_FREQ_DIM = 256  # sinusoidal features of alpha before its MLP
_ALPHA_COND_SCALE = 0.02  # the normalised alpha embedding enters the condition scaled by this
_ROPE_BASE = 10000.0


def count_params(model: nn.Module) -> int:
    """Number of parameter elements in `model` (trainable or not; works on the meta device)."""
    return sum(p.numel() for p in model.parameters())


def _swiglu_hidden(hidden: int, mlp_ratio: float) -> int:
    """SwiGLU width: 2/3 of the plain MLP width, rounded up to a multiple of 32 (release rule)."""
    return (int(2 / 3 * hidden * mlp_ratio) + 31) // 32 * 32


def _modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN: x [B, N, D] * (1 + scale [B, D]) + shift [B, D]."""
    return x * (1 + scale[:, None]) + shift[:, None]


def rope_table(head_dim: int) -> RotaryEmbeddingCat:
    """timm's axial 2-D rotary table for integer token coordinates: `get_embed([g, g])` gives
    [g * g, 2 * head_dim] (sin | cos). Each of the head_dim / 4 frequencies 10000^(-k / (head_dim
    / 4)) rotates a channel pair (c, c + head_dim / 2) ("half" layout) by the token's row
    (c < head_dim / 4) or column angle."""
    return RotaryEmbeddingCat(head_dim, temperature=_ROPE_BASE, in_pixels=False, rotate_half=True)


class Block(nn.Module):
    """adaLN-zero transformer block: x [B, N, D], condition c [B, D], rotary table rope
    [N - n_prefix, 2 * head_dim] -> [B, N, D]. The n_prefix leading (class) tokens are not
    rotated."""

    def __init__(self, hidden: int, heads: int, mlp_ratio: float, n_prefix: int) -> None:
        super().__init__()
        norm = partial(RmsNorm, eps=_NORM_EPS)
        self.norm1 = norm(hidden)
        self.attn = AttentionRope(hidden, heads, qkv_bias=True, num_prefix_tokens=n_prefix,
                                  norm_layer=norm, qk_norm=True, rotate_half=True)
        self.norm2 = norm(hidden)
        self.mlp = SwiGLU(hidden, _swiglu_hidden(hidden, mlp_ratio))
        self.ada = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 6 * hidden))

    def forward(self, x: torch.Tensor, c: torch.Tensor, rope: torch.Tensor) -> torch.Tensor:
        shift1, scale1, gate1, shift2, scale2, gate2 = self.ada(c).chunk(6, dim=-1)
        x = x + gate1[:, None] * self.attn(_modulate(self.norm1(x), shift1, scale1), rope=rope)
        return x + gate2[:, None] * self.mlp(_modulate(self.norm2(x), shift2, scale2))


class FinalLayer(nn.Module):
    """adaLN-modulated RMSNorm and a zero-initialised projection: [B, T, D] -> [B, T, p*p*C]."""

    def __init__(self, hidden: int, out_dim: int) -> None:
        super().__init__()
        self.norm = RmsNorm(hidden, eps=_NORM_EPS)
        self.ada = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 2 * hidden))
        self.linear = nn.Linear(hidden, out_dim)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.ada(c).chunk(2, dim=-1)
        return self.linear(_modulate(self.norm(x), shift, scale))


class AlphaEmbedder(nn.Module):
    """CFG scale alpha [B] -> [B, D]: sinusoidal features (like a diffusion timestep), a 2-layer
    SiLU MLP, RMSNorm, times 0.02 (release)."""

    def __init__(self, hidden: int) -> None:
        super().__init__()
        half = _ALPHA_FREQ_DIM // 2
        freqs = torch.exp(-math.log(_ROPE_BASE) * torch.arange(half, dtype=torch.float32) / half)
        self.register_buffer("freqs", freqs, persistent=False)
        self.mlp = nn.Sequential(
            nn.Linear(_ALPHA_FREQ_DIM, hidden), nn.SiLU(), nn.Linear(hidden, hidden)
        )
        self.norm = RmsNorm(hidden, eps=_NORM_EPS)

    def forward(self, alpha: torch.Tensor) -> torch.Tensor:
        args = alpha.float()[:, None] * self.freqs
        feats = torch.cat([args.cos(), args.sin()], dim=-1).to(self.mlp[0].weight.dtype)
        return _ALPHA_COND_SCALE * self.norm(self.mlp(feats))


class DiT(nn.Module):
    """One-step generator f(noise, label, alpha, style) -> sample, all [B, C, H, W] images.

    Args:
        input_size: H = W of noise and output; a multiple of patch_size.
        in_channels: C of noise and output (4 for SD-VAE latents, 3 for pixels).
        patch_size: side of the square patch that becomes one token.
        hidden, depth, heads: transformer width, number of blocks, attention heads
            (hidden / heads must be a multiple of 4 for the 2-D RoPE).
        num_classes: label vocabulary; labels are in [0, num_classes).
        n_class_tokens: in-context tokens prepended to the image tokens, each a projection of the
            condition vector plus its own learned offset.
        n_style_tokens, style_vocab: the style code is n_style_tokens integers in
            [0, style_vocab), each indexing its own embedding table; the embeddings are summed.
        mlp_ratio: plain-MLP width / hidden; the SwiGLU width is 2/3 of it rounded up to 32.
        grad_checkpointing: recompute each block in the backward pass while training (less
            activation memory for large batches, about one extra forward of compute; the
            release's `use_remat` of its pixel models).
    """

    def __init__(
        self,
        *,
        input_size: int,
        in_channels: int,
        patch_size: int,
        hidden: int,
        depth: int,
        heads: int,
        num_classes: int,
        n_class_tokens: int = 16,
        n_style_tokens: int = 32,
        style_vocab: int = 64,
        mlp_ratio: float = 4.0,
        grad_checkpointing: bool = False,
    ) -> None:
        super().__init__()
        if patch_size < 1 or input_size % patch_size:
            raise ValueError(f"input_size: expected a multiple of patch_size={patch_size}, "
                             f"got {input_size}")
        if hidden % heads or (hidden // heads) % 4:
            raise ValueError(f"hidden: expected a multiple of 4 * heads={4 * heads} (2-D RoPE), "
                             f"got {hidden}")
        for key, val in (("depth", depth), ("num_classes", num_classes), ("in_channels",
                         in_channels), ("n_style_tokens", n_style_tokens),
                         ("style_vocab", style_vocab)):
            if val < 1:
                raise ValueError(f"{key}: expected >= 1, got {val}")
        if n_class_tokens < 0:
            raise ValueError(f"n_class_tokens: expected >= 0, got {n_class_tokens}")
        self.input_size, self.in_channels, self.patch_size = input_size, in_channels, patch_size
        self.num_classes, self.n_class_tokens = num_classes, n_class_tokens
        self.n_style_tokens, self.style_vocab = n_style_tokens, style_vocab
        self.heads, self.grid = heads, input_size // patch_size
        self.grad_checkpointing = grad_checkpointing

        # Condition vector c = class + sum of style embeddings + embedded alpha.
        self.class_embed = nn.Embedding(num_classes, hidden)
        # n_style_tokens tables of style_vocab rows, stored as one table with per-token offsets.
        self.style_embed = nn.Embedding(n_style_tokens * style_vocab, hidden)
        self.register_buffer(
            "style_offsets", torch.arange(n_style_tokens) * style_vocab, persistent=False
        )
        self.alpha_embed = AlphaEmbedder(hidden)

        self.patch_embed = PatchEmbed(input_size, patch_size, in_channels, hidden)
        self.pos_embed = nn.Parameter(torch.zeros(1, self.grid * self.grid, hidden))
        self.rope = rope_table(hidden // heads)
        self.class_proj = nn.Linear(hidden, hidden)
        self.class_tokens = nn.Parameter(torch.zeros(1, n_class_tokens, hidden))
        self.blocks = nn.ModuleList(Block(hidden, heads, mlp_ratio, n_class_tokens)
                                    for _ in range(depth))
        self.final = FinalLayer(hidden, patch_size * patch_size * in_channels)
        self._init_weights()

    @classmethod
    def from_preset(cls, name: str, **overrides) -> DiT:
        """Build a preset of PRESETS, with any constructor keyword overridden."""
        if name not in PRESETS:
            raise ValueError(f"preset: expected one of {sorted(PRESETS)}, got {name!r}")
        return cls(**{**PRESETS[name], **overrides})

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        # the patch convolution is a linear map of the flattened patch: xavier over (C*p*p, D)
        nn.init.xavier_uniform_(self.patch_embed.proj.weight.view(self.patch_embed.proj.out_channels,
                                                                  -1))
        nn.init.zeros_(self.patch_embed.proj.bias)
        for m in (self.class_embed, self.style_embed, *self.alpha_embed.mlp[::2]):
            nn.init.normal_(m.weight, std=_EMBED_STD)
        nn.init.normal_(self.class_tokens, std=_EMBED_STD)
        with torch.no_grad():
            self.pos_embed.copy_(build_sincos2d_pos_embed(
                [self.grid, self.grid], self.pos_embed.shape[-1], _ROPE_BASE)[None])
        # adaLN-zero: every block starts as the identity and the output is exactly 0.
        for layer in [b.ada[1] for b in self.blocks] + [self.final.ada[1], self.final.linear]:
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def _check_inputs(self, noise: torch.Tensor, labels: torch.Tensor, alpha: torch.Tensor,
                      style: torch.Tensor, values: bool) -> None:
        b, c, s = noise.shape[0], self.in_channels, self.input_size
        if noise.shape != (b, c, s, s):
            raise ValueError(f"noise: expected shape [B, {c}, {s}, {s}], got {tuple(noise.shape)}")
        if labels.shape != (b,) or labels.dtype != torch.long:
            raise ValueError(f"labels: expected int64 [{b}], got {labels.dtype} "
                             f"{tuple(labels.shape)}")
        if alpha.shape != (b,):
            raise ValueError(f"alpha: expected shape [{b}], got {tuple(alpha.shape)}")
        if style.shape != (b, self.n_style_tokens) or style.dtype != torch.long:
            raise ValueError(f"style: expected int64 [{b}, {self.n_style_tokens}], got "
                             f"{style.dtype} {tuple(style.shape)}")
        if not values or labels.device.type == "meta" or b == 0 or torch.compiler.is_compiling():
            return
        # Value ranges: one host sync for all four extremes.
        lo, hi, s_lo, s_hi = torch.stack(
            [labels.min(), labels.max(), style.min(), style.max()]
        ).tolist()
        if lo < 0 or hi >= self.num_classes:
            raise ValueError(f"labels: expected values in [0, {self.num_classes}), got "
                             f"[{lo}, {hi}]")
        if s_lo < 0 or s_hi >= self.style_vocab:
            raise ValueError(f"style: expected values in [0, {self.style_vocab}), got "
                             f"[{s_lo}, {s_hi}]")

    def condition(self, labels: torch.Tensor, alpha: torch.Tensor, style: torch.Tensor
                  ) -> torch.Tensor:
        """Condition vector c [B, hidden] from labels [B], alpha [B] and style [B, n_style]."""
        style_sum = self.style_embed(style + self.style_offsets).sum(dim=1)
        return self.class_embed(labels) + style_sum + self.alpha_embed(alpha)

    def forward(self, noise: torch.Tensor, labels: torch.Tensor, alpha: torch.Tensor,
                style: torch.Tensor, validate: bool = True) -> torch.Tensor:
        """noise [B, C, H, W], labels [B], alpha [B], style [B, n_style] -> sample [B, C, H, W].
        Shapes are always checked; `validate` also checks the label and style ranges (one
        device-to-host copy; the trainer passes False on its hot path)."""
        self._check_inputs(noise, labels, alpha, style, validate)
        b, c, p, g = noise.shape[0], self.in_channels, self.patch_size, self.grid
        cond = self.condition(labels, alpha, style)

        x = self.patch_embed(noise) + self.pos_embed  # [B, g*g, D], row-major tokens
        tokens = self.class_proj(cond)[:, None] + self.class_tokens  # [B, n_class_tokens, D]
        x = torch.cat([tokens, x], dim=1)

        rope = self.rope.get_embed([g, g])  # [g*g, 2 * head_dim], float32
        for block in self.blocks:
            if self.grad_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(block, x, cond, rope, use_reentrant=False)
            else:
                x = block(x, cond, rope)
        out = self.final(x[:, self.n_class_tokens :], cond)  # [B, g*g, p*p*C]
        return out.reshape(b, g, g, p, p, c).permute(0, 5, 1, 3, 2, 4).reshape(b, c, g * p, g * p)

    def sample_inputs(self, n: int, device: torch.device | str,
                      generator: torch.Generator | None = None
                      ) -> tuple[torch.Tensor, torch.Tensor]:
        """Fresh generator inputs: noise [n, C, H, W] ~ N(0, I) and style [n, n_style_tokens]
        uniform in [0, style_vocab). `generator` must live on `device`."""
        s = self.input_size
        noise = torch.randn(n, self.in_channels, s, s, device=device, generator=generator)
        style = torch.randint(0, self.style_vocab, (n, self.n_style_tokens), device=device,
                              generator=generator)
        return noise, style

    def generate(self, labels: torch.Tensor, alpha: torch.Tensor | float,
                 generator: torch.Generator | None = None) -> torch.Tensor:
        """One forward pass from fresh noise and style: labels [B], alpha [B] or a float ->
        samples [B, C, H, W]."""
        noise, style = self.sample_inputs(labels.shape[0], labels.device, generator)
        alpha = torch.as_tensor(alpha, dtype=torch.float32, device=labels.device)
        return self(noise, labels, alpha.expand(labels.shape[0]), style)
