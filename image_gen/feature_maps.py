"""Per-sample statistics of one feature map, the building block of every drift feature.

A map feat [B, C, H, W] (C channels on an H x W grid) becomes named vectors [B, L, C], L the
number of locations the statistic is taken at (release `get_activations`):

| suffix   | L                       | value per sample                             |
|----------|-------------------------|----------------------------------------------|
| loc      | H*W                     | the vector at each location (row-major)      |
| mean     | 1                       | mean over all locations                      |
| std      | 1                       | sqrt(variance over all locations + 1e-6)     |
| mean{k}  | (H/k)*(W/k)             | mean over each k x k patch                   |
| std{k}   | (H/k)*(W/k)             | sqrt(variance over each k x k patch + 1e-6)  |

mean{k} / std{k} exist only when k divides H and W. Statistics are taken in float32.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

STD_EPS = 1e-6  # inside the square root of every std and rms (release)


def map_features(feat: torch.Tensor, patch_sizes: tuple[int, ...] = (2, 4), loc: bool = True
                 ) -> dict[str, torch.Tensor]:
    """{suffix: [B, L, C]} of feat [B, C, H, W] (module table); `loc=False` drops the
    per-location vectors."""
    f = feat.float()
    b, c, h, w = f.shape

    def rows(t: torch.Tensor) -> torch.Tensor:  # [B, C, ...L] -> [B, L, C]
        return t.reshape(b, c, -1).transpose(1, 2)

    mean = f.mean(dim=(2, 3), keepdim=True)
    out = {"loc": rows(f)} if loc else {}
    out["mean"] = rows(mean)
    out["std"] = rows(((f - mean).square().mean((2, 3)) + STD_EPS).sqrt())
    for k in patch_sizes:
        if h % k or w % k:
            continue
        mean = F.avg_pool2d(f, k)  # two-pass variance, as the release
        centred = f - mean.repeat_interleave(k, 2).repeat_interleave(k, 3)
        out[f"mean{k}"] = rows(mean)
        out[f"std{k}"] = rows((F.avg_pool2d(centred.square(), k) + STD_EPS).sqrt())
    return out
