"""Observation encoder of Diffusion Policy's hybrid (image) policy, driven by shape_meta.

Per rgb key (Chi et al. 2023, following robomimic's VisualCore):
    crop (random per sample at train, centre at eval) -> ResNet18 conv trunk with every
    BatchNorm replaced by GroupNorm, no pretraining -> SpatialSoftmax (num_kp keypoints)
    -> flatten -> Linear(2 * num_kp, feature_dim).
Low-dim keys are flattened and passed through. Features are concatenated in a fixed order:
rgb keys sorted, then low-dim keys sorted. Images arrive already normalised (the policy maps
[0, 1] to [-1, 1]); nothing here rescales them.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
import torchvision
import torchvision.transforms.v2.functional as TF
from torch import nn

_GN_CHANNELS_PER_GROUP = 16  # DP's replace_bn_with_gn: num_groups = channels // 16
_TRUNK_STRIDE_2_LAYERS = 5  # conv1, maxpool, layer2, layer3, layer4 each halve H and W


class SpatialSoftmax(nn.Module):
    """Keypoints as softmax-weighted mean pixel positions (Finn et al. 2016; robomimic).

    A 1x1 conv maps the C input channels to ``num_kp`` score maps; each map is turned into a
    distribution over its H * W locations by a softmax (scores / temperature), and the keypoint
    is the expected (x, y) location, with x over the width and y over the height both in [-1, 1].

    [B, in_channels, height, width] -> [B, num_kp, 2] as (x, y).
    """

    def __init__(
        self,
        in_channels: int,
        height: int,
        width: int,
        num_kp: int = 32,
        temperature: float = 1.0,
        learnable_temperature: bool = False,
    ) -> None:
        super().__init__()
        self.in_shape = (in_channels, height, width)
        self.num_kp = num_kp
        self.keypoint_conv = nn.Conv2d(in_channels, num_kp, kernel_size=1)
        temp = torch.full((1,), float(temperature))
        if learnable_temperature:
            self.temperature = nn.Parameter(temp)
        else:
            self.register_buffer("temperature", temp)
        # pixel-centre coordinates, flattened row-major like the score maps: [H * W]
        ys, xs = torch.meshgrid(
            torch.linspace(-1.0, 1.0, height), torch.linspace(-1.0, 1.0, width), indexing="ij"
        )
        self.register_buffer("pos_x", xs.reshape(-1), persistent=False)
        self.register_buffer("pos_y", ys.reshape(-1), persistent=False)

    def forward(self, feature: torch.Tensor) -> torch.Tensor:
        if tuple(feature.shape[1:]) != self.in_shape:
            raise ValueError(
                f"feature: expected shape [B, {', '.join(map(str, self.in_shape))}], "
                f"got {tuple(feature.shape)}"
            )
        scores = self.keypoint_conv(feature).flatten(2)  # [B, K, H * W]
        attention = torch.softmax(scores / self.temperature, dim=-1)
        x = (attention * self.pos_x).sum(-1)
        y = (attention * self.pos_y).sum(-1)
        return torch.stack([x, y], dim=-1)


def _replace_batchnorm_with_groupnorm(module: nn.Module) -> None:
    """In place: every BatchNorm2d(c) below `module` becomes GroupNorm(c // 16, c)."""
    for name, child in module.named_children():
        if isinstance(child, nn.BatchNorm2d):
            c = child.num_features
            setattr(module, name, nn.GroupNorm(c // _GN_CHANNELS_PER_GROUP, c))
        else:
            _replace_batchnorm_with_groupnorm(child)


def resnet18_gn_trunk() -> nn.Sequential:
    """torchvision ResNet18 (random init), GroupNorm for BatchNorm, avgpool and fc dropped.

    [B, 3, H, W] -> [B, 512, ceil(H / 32), ceil(W / 32)] (see `trunk_output_hw`).
    """
    resnet = torchvision.models.resnet18(weights=None)
    _replace_batchnorm_with_groupnorm(resnet)
    return nn.Sequential(*list(resnet.children())[:-2])


def trunk_output_hw(height: int, width: int) -> tuple[int, int]:
    """Spatial size of `resnet18_gn_trunk`'s output: every stride-2 stage maps n -> ceil(n/2)."""
    scale = 2**_TRUNK_STRIDE_2_LAYERS
    return math.ceil(height / scale), math.ceil(width / scale)


class CropRandomizer(nn.Module):
    """Crop [N, C, H, W] images to [N, C, crop_height, crop_width].

    Training mode: an independent, uniformly random crop window per sample (DP's
    CropRandomizer with one crop). Eval mode: the centre crop (torchvision's rounding).
    """

    def __init__(self, crop_height: int, crop_width: int) -> None:
        super().__init__()
        self.crop_height = crop_height
        self.crop_width = crop_width

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.ndim != 4:
            raise ValueError(f"images: expected shape [N, C, H, W], got {tuple(images.shape)}")
        n, _, h, w = images.shape
        ch, cw = self.crop_height, self.crop_width
        if ch > h or cw > w:
            raise ValueError(
                f"images: crop ({ch}, {cw}) is larger than the image, got {tuple(images.shape)}"
            )
        if not self.training:
            return TF.center_crop(images, [ch, cw])
        device = images.device
        top = torch.randint(0, h - ch + 1, (n,), device=device)
        left = torch.randint(0, w - cw + 1, (n,), device=device)
        rows = (top[:, None] + torch.arange(ch, device=device))[:, :, None]  # [N, ch, 1]
        cols = (left[:, None] + torch.arange(cw, device=device))[:, None, :]  # [N, 1, cw]
        batch = torch.arange(n, device=device)[:, None, None]
        # advanced indices around the channel slice put their broadcast dims first
        return images[batch, :, rows, cols].permute(0, 3, 1, 2)  # [N, ch, cw, C] -> [N, C, ...]


def _rgb_core(image_hw: tuple[int, int], num_kp: int, feature_dim: int) -> nn.Sequential:
    """ResNet18-GN trunk -> SpatialSoftmax -> Linear; [N, 3, H, W] -> [N, feature_dim]."""
    fh, fw = trunk_output_hw(*image_hw)
    return nn.Sequential(
        resnet18_gn_trunk(),
        SpatialSoftmax(512, fh, fw, num_kp=num_kp),
        nn.Flatten(),
        nn.Linear(2 * num_kp, feature_dim),
    )


class ObsEncoder(nn.Module):
    """Encode a dict of observations into one flat feature vector per sample.

    Args:
        shape_meta: {"obs": {key: {"shape": [...], "type": "rgb" | "low_dim"}}, ...}; plain
            dicts or OmegaConf DictConfig. rgb shapes are [3, H, W]; low-dim shapes any.
        crop_shape: (h, w) crop for every rgb key, or None for no cropping.
        num_kp: SpatialSoftmax keypoints per camera.
        feature_dim: output features per camera.
        share_rgb_model: one visual core for all rgb keys (they must share one shape).

    Attributes:
        rgb_keys, low_dim_keys: sorted key lists, in output order.
        output_dim: n_rgb * feature_dim + sum of the flattened low-dim sizes.
    """

    def __init__(
        self,
        shape_meta: Mapping,
        crop_shape: tuple[int, int] | None = None,
        num_kp: int = 32,
        feature_dim: int = 64,
        share_rgb_model: bool = False,
    ) -> None:
        super().__init__()
        obs_meta = dict(shape_meta["obs"])
        self.key_shapes: dict[str, tuple[int, ...]] = {}
        rgb_keys, low_dim_keys = [], []
        for key, attr in obs_meta.items():
            shape = tuple(int(s) for s in attr["shape"])
            kind = attr.get("type", "low_dim")
            self.key_shapes[key] = shape
            if kind == "rgb":
                if len(shape) != 3 or shape[0] != 3:
                    raise ValueError(
                        f"shape_meta obs '{key}': rgb shape must be [3, H, W], got {list(shape)}"
                    )
                rgb_keys.append(key)
            elif kind == "low_dim":
                low_dim_keys.append(key)
            else:
                raise ValueError(f"shape_meta obs '{key}': unsupported type '{kind}'")
        self.rgb_keys = sorted(rgb_keys)
        self.low_dim_keys = sorted(low_dim_keys)
        self.share_rgb_model = share_rgb_model

        # image size after cropping, per rgb key
        core_hw = {}
        for key in self.rgb_keys:
            _, h, w = self.key_shapes[key]
            if crop_shape is not None:
                ch, cw = (int(s) for s in crop_shape)
                if ch > h or cw > w:
                    raise ValueError(
                        f"crop_shape: ({ch}, {cw}) is larger than rgb obs '{key}' {[3, h, w]}"
                    )
                h, w = ch, cw
            if min(trunk_output_hw(h, w)) < 2:
                raise ValueError(
                    f"shape_meta obs '{key}': images of {h}x{w} (after crop) give a 1-pixel "
                    "keypoint map along one axis, whose SpatialSoftmax coordinate is constant; "
                    "use at least 33 pixels per side"
                )
            core_hw[key] = (h, w)
        self.crops = nn.ModuleDict(
            {
                key: CropRandomizer(*core_hw[key]) if crop_shape is not None else nn.Identity()
                for key in self.rgb_keys
            }
        )
        if share_rgb_model and self.rgb_keys:
            if len({core_hw[k] for k in self.rgb_keys}) > 1:
                raise ValueError(
                    "share_rgb_model: all rgb keys need one image shape, got "
                    f"{ {k: self.key_shapes[k] for k in self.rgb_keys} }"
                )
            self.shared_core = _rgb_core(core_hw[self.rgb_keys[0]], num_kp, feature_dim)
        else:
            self.cores = nn.ModuleDict(
                {k: _rgb_core(core_hw[k], num_kp, feature_dim) for k in self.rgb_keys}
            )
        self.output_dim = len(self.rgb_keys) * feature_dim + sum(
            math.prod(self.key_shapes[k]) for k in self.low_dim_keys
        )

    def _checked(
        self, obs: Mapping[str, torch.Tensor], key: str, batch: int | None
    ) -> torch.Tensor:
        """obs[key] after checking it is present, [N, *shape] and of the common batch size."""
        expected = f"[N, {', '.join(map(str, self.key_shapes[key]))}]"
        if key not in obs:
            raise ValueError(f"obs: missing key '{key}' (expected shape {expected})")
        x = obs[key]
        if x.ndim == 0 or tuple(x.shape[1:]) != self.key_shapes[key]:
            raise ValueError(f"obs['{key}']: expected shape {expected}, got {tuple(x.shape)}")
        if batch is not None and x.shape[0] != batch:
            raise ValueError(
                f"obs['{key}']: batch size {x.shape[0]} differs from the other keys' {batch} "
                f"(shape {tuple(x.shape)})"
            )
        return x

    def forward(self, obs: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """obs: {key: [N, *shape]} (extra keys ignored) -> [N, output_dim]."""
        batch = None
        tensors = {}
        for key in (*self.rgb_keys, *self.low_dim_keys):
            tensors[key] = self._checked(obs, key, batch)
            batch = tensors[key].shape[0]
        features = []
        if self.rgb_keys:
            crops = [self.crops[k](tensors[k]) for k in self.rgb_keys]
            if self.share_rgb_model:
                # one pass over all cameras: [n_rgb * N, D] -> [N, n_rgb * D] (key-major)
                out = self.shared_core(torch.cat(crops, dim=0))
                features.append(torch.cat(out.chunk(len(self.rgb_keys), dim=0), dim=-1))
            else:
                features += [
                    self.cores[k](img) for k, img in zip(self.rgb_keys, crops, strict=True)
                ]
        features += [tensors[k].flatten(1) for k in self.low_dim_keys]
        return torch.cat(features, dim=-1)
