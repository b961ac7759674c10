"""ConvNeXt-V2 drift features of the pixel-space generators, on timm's ConvNeXt.

Deng et al., "Generative Modeling via Drifting" sec. 4 (pixel space relies on the stronger
ConvNeXt-V2 encoder) and the release (models/convnext.py `get_activations`, models/mae_model.py
`build_activation_function`, configs/gen/pixel_sota_*.yaml: `use_convnext: true` next to the pixel
MAE; the features of both are summed in one loss). The release loads the ImageNet-22k fine-tuned
ConvNeXt-V2-Base (`facebook/convnextv2-base-22k-224`); here any timm `convnextv2_*` architecture
is built with `pretrained=False` and its weights are read from a local file the user gives
(nothing is downloaded).

Per sample x [3, H, W] in [-1, 1] (the generator's pixel space, or VAE-decoded latents):
1. (x + 1) / 2, then ImageNet mean / std normalisation, bilinear (antialiased) resize to
   `resolution` x `resolution` (224, as released);
2. the stem and the 4 stages; each stage output [C_i, h_i, w_i] is normalised over channels at
   every location, (y - mean_c) / (std_c + 1e-3);
3. features (name: [L, S]): `convnext/stage{i}/mean`, `convnext/stage{i}/std` (over locations)
   for i = 0..3, `convnext/stage{i}/loc` (h_i * w_i locations) for i = 1..3, and
   `convnext/global` = the model's head LayerNorm of the mean-pooled last stage [1, C_3].

The release also lists a `global_std` that is the same tensor as stage 3's std (so its loss is
counted twice); it is kept once here.
"""

from __future__ import annotations

from pathlib import Path

import timm
import torch
import torch.nn.functional as F
from timm.models.convnext import ConvNeXt, checkpoint_filter_fn
from torch import nn

from image_gen.feature_maps import map_features

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_CHANNEL_NORM_EPS = 1e-3  # added to the channel std of each stage output (release)


def load_convnext(name: str, weights: str | Path | None) -> ConvNeXt:
    """timm.create_model(name, pretrained=False, num_classes=0) with the weights of a local file
    (a timm `model.safetensors` / `pytorch_model.bin` of e.g. convnextv2_base.fcmae_ft_in22k_in1k,
    or an original ConvNeXt-V2 `.pt` checkpoint); the classifier weights are dropped. No hub
    access."""
    if not str(name).startswith("convnextv2_"):
        raise ValueError(f"encoder.convnext.model: expected a timm ConvNeXt-V2 name "
                         f"(convnextv2_base, convnextv2_tiny, ...), got {name!r}")
    if weights is None or not Path(weights).is_file():
        raise FileNotFoundError(
            f"encoder.convnext.weights: expected a local file with the {name} weights (timm "
            f"model.safetensors / pytorch_model.bin, or an original ConvNeXt-V2 .pt), got "
            f"{weights!r} ({'not given' if weights is None else 'no such file'}); nothing is "
            f"downloaded")
    model = timm.create_model(name, pretrained=False, num_classes=0)
    if str(weights).endswith(".safetensors"):
        from safetensors.torch import load_file

        state = load_file(str(weights))
    else:
        state = torch.load(weights, map_location="cpu", weights_only=True)
    state = checkpoint_filter_fn(state, model)
    state = {k: v for k, v in state.items() if not k.startswith("head.fc.")}
    ours = model.state_dict()
    missing = sorted(set(ours) - set(state))
    wrong = sorted(k for k in set(state) & set(ours) if state[k].shape != ours[k].shape)
    unexpected = sorted(set(state) - set(ours))
    if missing or wrong or unexpected:
        raise ValueError(f"encoder.convnext.weights: {weights} does not fit {name}: missing "
                         f"{missing[:3]}, other shapes {wrong[:3]}, unexpected {unexpected[:3]}")
    model.load_state_dict(state)
    return model


def _channel_normalise(y: torch.Tensor) -> torch.Tensor:
    """(y - mean_c) / (std_c + 1e-3) over the channels of y [B, C, h, w] at every location."""
    y = y.float()
    mean = y.mean(dim=1, keepdim=True)
    return (y - mean) / (y.std(dim=1, keepdim=True, unbiased=False) + _CHANNEL_NORM_EPS)


class ConvNeXtFeatures(nn.Module):
    """The release's ConvNeXt-V2 feature set of pixels x [B, 3, H, W] in [-1, 1] (module doc):
    forward -> {name: [B, L, S]}.

    Args:
        model: a timm ConvNeXt (frozen by the caller, see features.freeze).
        resolution: side the images are resized to first (release: 224); None keeps H x W.
    """

    def __init__(self, model: ConvNeXt, resolution: int | None = 224) -> None:
        super().__init__()
        if not isinstance(model, ConvNeXt):
            raise ValueError(f"model: expected a timm ConvNeXt, got {type(model).__name__}")
        self.model, self.resolution = model, resolution
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1),
                             persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1),
                             persistent=False)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"x: expected pixels [B, 3, H, W] in [-1, 1], got {tuple(x.shape)}")
        x = ((x + 1) / 2 - self.mean) / self.std
        if self.resolution is not None and x.shape[-2:] != (self.resolution,) * 2:
            x = F.interpolate(x, size=(self.resolution,) * 2, mode="bilinear",
                              align_corners=False, antialias=True)
        h = self.model.stem(x)
        out = {}
        for i, stage in enumerate(self.model.stages):
            h = stage(h)
            stats = map_features(_channel_normalise(h), patch_sizes=(), loc=i > 0)
            out.update({f"convnext/stage{i}/{k}": v for k, v in stats.items()})
        out["convnext/global"] = self.model.forward_head(self.model.norm_pre(h),
                                                         pre_logits=True).float()[:, None]
        return out
