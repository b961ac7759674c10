"""The one-step drifting policy's inference as a pure function of (observation, noise).

    OneStepGraph(policy)(*obs in shape_meta order, noise) -> (action, action_pred)
        obs    [B, To, *shape] per obs key (lowdim: "obs" [B, To, Do]; images in [0, 1])
        noise  [B * K, T, Da]: K initial noise chunks per observation, observation-major (rows
               i * K .. i * K + K - 1 belong to observation i), as predict_action draws them
        action_pred [B, T, Da]: unnormalise(medoid over K of generator(noise, 0, cond)); K = 1
               is the plain one-step sample
        action [B, Ta, Da] = action_pred[:, To - 1 : To - 1 + Ta]

No randomness inside: the same function is exported to ONNX (`deploy/export.py`) and compiled
for the in-process predictor (`LocalPredictor(compile=...)`). K is read from the shapes
(noise rows / observation rows), so one graph serves any K.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from drifting_policy.policy.base import medoid


class StaticCenterCrop(nn.Module):
    """Eval-mode CropRandomizer with fixed offsets: [N, C, H, W] -> [N, C, crop_h, crop_w]."""

    def __init__(self, height: int, width: int, crop_height: int, crop_width: int) -> None:
        super().__init__()
        self.top = int(round((height - crop_height) / 2.0))  # torchvision's center_crop anchor
        self.left = int(round((width - crop_width) / 2.0))
        self.crop_height, self.crop_width = crop_height, crop_width

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return images[:, :, self.top : self.top + self.crop_height,
                      self.left : self.left + self.crop_width]


class OneStepGraph(nn.Module):
    """A DriftingPolicy's inference from given noise (see the module docstring).

    `traceable`: run on a copy of the policy whose centre crops have static offsets (torchvision
    computes them from traced sizes, which the ONNX tracer cannot keep)."""

    def __init__(self, policy, traceable: bool = False) -> None:
        super().__init__()
        from drifting_policy.nn.obs_encoder import CropRandomizer
        from drifting_policy.policy.drifting import DriftingPolicy

        if not isinstance(policy, DriftingPolicy):
            raise ValueError(
                f"only the one-step DriftingPolicy runs as one graph (ONNX export, compile), "
                f"got {type(policy).__name__} (a diffusion sampler is a multi-step loop; serve "
                f"it with `drifting-policy serve` instead)")
        if traceable:
            policy = copy.deepcopy(policy)
            enc = policy.obs_encoder
            for key, crop in enc.crops.items():
                if isinstance(crop, CropRandomizer):
                    _, h, w = enc.key_shapes[key]
                    enc.crops[key] = StaticCenterCrop(h, w, crop.crop_height, crop.crop_width)
        self.policy = policy.eval()
        self.keys = list(policy.shape_meta["obs"])

    def forward(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        *obs, noise = inputs
        p = self.policy
        cond = p._encode(dict(zip(self.keys, obs)))
        b = cond.shape[0]
        k = noise.shape[0] // b
        naction = p.sample(noise, cond.repeat_interleave(k, dim=0))
        naction = medoid(naction.reshape(b, k, p.horizon, p.action_dim))
        action_pred = p.normalizer["action"].unnormalize(naction)
        start = p.n_obs_steps - 1
        return action_pred[:, start : start + p.n_action_steps], action_pred
