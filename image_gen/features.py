"""Multi-scale feature sets and the feature-space drift loss of the image generator.

Deng et al., "Generative Modeling via Drifting" sec. 3-4 and the release (models/mae_model.py
get_activations / build_activation_function, models/convnext.py, train.py feature_loss): the drift
loss is a SUM over features; each feature turns every sample into L vectors of S dims, and each of
the L locations of each of the P problems (class labels) is its own drift problem with the
problem's N samples as its set.

`DriftFeatures(mae, convnext, vae)` is the feature map phi of one generator. For a sample x
[C, H, W] it gives (name: L x S):

| name                   | from                                                              |
|------------------------|-------------------------------------------------------------------|
| raw/global             | x flattened: 1 x C*H*W                                            |
| raw/rms                | sqrt(mean over locations of u^2 + 1e-6), 1 x C_u, u = what the MAE |
|                        | encoder sees (x after its space-to-depth; x itself without an MAE) |
| {m}/{stat}             | every MAE activation m (ResNetMAE.activation_names) with the       |
|                        | statistics loc, mean, std, mean2, std2, mean4, std4 of             |
|                        | image_gen.feature_maps                                            |
| convnext/...           | ConvNeXt-V2 features of x's pixels (image_gen.convnext): x itself  |
|                        | for pixel generators, the VAE decoding of x for latent ones        |

Rows of each [P * L, N, S] tensor of `feature_sets` are problem-major: row = p * L + location.
"""

from __future__ import annotations

from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from drifting_policy.drift import drift_loss
from image_gen.convnext import ConvNeXtFeatures, load_convnext
from image_gen.feature_maps import STD_EPS, map_features
from image_gen.mae import ResNetMAE
from image_gen.vae import decode_pixels, load_vae

PATCH_SIZES = (2, 4)  # patch sides of the MAE maps' local mean / std features (release)
CONVNEXT_KEYS = ("model", "weights", "resolution")
_VAE_WITHOUT_CONVNEXT = ("encoder.vae: the VAE decoder only feeds pixel-space (ConvNeXt) features; "
                         "expected encoder.convnext to be set, got none")


def freeze(encoder: nn.Module) -> nn.Module:
    """Make `encoder` a fixed feature extractor in place (eval mode, no parameter grads)."""
    encoder.eval()
    encoder.requires_grad_(False)
    return encoder


class DriftFeatures(nn.Module):
    """phi(x) [B, C, H, W] -> {name: [B, L, S]} (module table); every part optional, none of them
    (all None) is the raw-only ablation.

    Args:
        mae: frozen ResNetMAE on x (latent or pixel MAE).
        convnext: frozen ConvNeXtFeatures on x's pixels.
        vae: frozen diffusers AutoencoderKL; when given, x are SD-VAE latents and ConvNeXt sees
            their decoding (gradients flow through the decoder into x).
    Gradients flow to x through every part; the parts must be frozen but are not run under
    no_grad.
    """

    def __init__(self, mae: ResNetMAE | None = None, convnext: ConvNeXtFeatures | None = None,
                 vae: nn.Module | None = None) -> None:
        super().__init__()
        if vae is not None and convnext is None:
            raise ValueError(_VAE_WITHOUT_CONVNEXT)
        self.mae, self.convnext, self.vae = mae, convnext, vae

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        b = x.shape[0]
        u = (x if self.mae is None else self.mae.encoder_input(x)).float()
        out = {"raw/global": x.float().reshape(b, 1, -1),
               "raw/rms": (u.pow(2).mean(dim=(2, 3)) + STD_EPS).sqrt()[:, None]}
        if self.mae is not None:
            for name, feat in zip(self.mae.activation_names(), self.mae.activations(x)):
                out.update({f"{name}/{k}": v for k, v in map_features(feat, PATCH_SIZES).items()})
        if self.convnext is not None:
            out.update(self.convnext(x if self.vae is None else decode_pixels(self.vae, x)))
        return out


def as_features(encoder: DriftFeatures | ResNetMAE | None) -> DriftFeatures:
    """A ResNetMAE (or None: raw only) as the DriftFeatures of that MAE alone."""
    if isinstance(encoder, DriftFeatures):
        return encoder
    if encoder is None or isinstance(encoder, ResNetMAE):
        return DriftFeatures(mae=encoder)
    raise ValueError(f"encoder: expected DriftFeatures, ResNetMAE or None, got "
                     f"{type(encoder).__name__}")


def build_drift_features(enc_cfg: DictConfig, data_kind: str, mae: ResNetMAE | None,
                         device: torch.device | str = "cpu") -> DriftFeatures:
    """The `encoder` config section as frozen DriftFeatures on `device`: `mae` (the loaded
    encoder.path MAE, or None), `encoder.convnext` ({model, weights, resolution} or null) and
    `encoder.vae` (a local AutoencoderKL directory for latent data with ConvNeXt features, or
    null). Nothing is downloaded."""
    conv_cfg, vae_path = enc_cfg.get("convnext"), enc_cfg.get("vae")
    if vae_path is not None and conv_cfg is None:
        raise ValueError(_VAE_WITHOUT_CONVNEXT)
    convnext = vae = None
    if conv_cfg is not None:
        conv = OmegaConf.to_container(conv_cfg, resolve=True)
        unknown = sorted(set(conv) - set(CONVNEXT_KEYS))
        if unknown:
            raise ValueError(f"encoder.convnext: unknown keys {unknown}; expected some of "
                             f"{list(CONVNEXT_KEYS)}")
        if data_kind not in ("pixel", "latent"):
            raise ValueError(f"encoder.convnext: ConvNeXt features need RGB pixels (data.kind "
                             f"pixel, or latent with encoder.vae), got data.kind={data_kind!r}")
        model = load_convnext(conv.get("model", "convnextv2_base"), conv.get("weights"))
        convnext = ConvNeXtFeatures(model, conv.get("resolution", 224))
    if convnext is not None and (data_kind == "latent") != (vae_path is not None):
        need = "a local AutoencoderKL dir" if data_kind == "latent" else "null (pixels as they are)"
        raise ValueError(f"encoder.vae: ConvNeXt features of data.kind={data_kind!r} expect "
                         f"{need}, got {vae_path!r}")
    if vae_path is not None:
        vae = load_vae(Path(vae_path), device)
    return freeze(DriftFeatures(mae, convnext, vae).to(device))


def feature_sets(x: torch.Tensor, encoder: DriftFeatures | ResNetMAE | None
                 ) -> dict[str, torch.Tensor]:
    """The multi-scale feature set of x [P, N, C, H, W] (P problems of N samples each).

    Returns {name: [P * L, N, S]} as in the module table (`encoder` None: raw only, the
    ablation; a ResNetMAE: that MAE alone). Gradients flow through x; the encoder must be frozen
    (see `freeze`) but is not run under no_grad.
    """
    if x.ndim != 5:
        raise ValueError(f"x: expected [P, N, C, H, W], got shape {tuple(x.shape)}")
    features = as_features(encoder)
    if any(q.requires_grad for q in features.parameters()):
        raise ValueError("encoder: expected a frozen encoder (no parameter with requires_grad; "
                         "call image_gen.features.freeze(encoder)), got trainable parameters")
    p, n = x.shape[:2]
    out = features(x.reshape(p * n, *x.shape[2:]))
    # [P * N, L, S] -> [P, L, N, S] -> [P * L, N, S]
    return {k: v.reshape(p, n, *v.shape[1:]).transpose(1, 2).reshape(-1, n, v.shape[-1])
            for k, v in out.items()}


def _check_values(
    gen: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor | None, weight_neg: torch.Tensor | None
) -> None:
    """Finite samples and finite, non-negative weights, in one device-to-host copy."""
    named = {"gen": gen.detach(), "pos": pos, "neg": neg, "weight_neg": weight_neg}
    checks = [(k, "NaN or Inf", torch.isfinite(t).all()) for k, t in named.items() if t is not None]
    if weight_neg is not None:
        checks.append(("weight_neg", "negative values", (weight_neg >= 0).all()))
    for (key, what, _), good in zip(checks, torch.stack([c for *_, c in checks]).tolist()):
        if not good:
            raise ValueError(f"{key}: expected finite values (weights >= 0), got {what} "
                             f"(shape {tuple(named[key].shape)})")


def feature_drift_loss(
    gen: torch.Tensor,
    pos: torch.Tensor,
    neg: torch.Tensor | None,
    encoder: DriftFeatures | ResNetMAE | None,
    *,
    weight_neg: torch.Tensor | None = None,
    temperatures: tuple[float, ...] = (0.02, 0.05, 0.2),
    drift_kwargs: dict | None = None,
    validate: bool = True,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Feature-space drift loss: the sum over features of the row-mean drift loss.

    Args:
        gen: generated samples [P, G, C, H, W]; gradients flow to them.
        pos: positives [P, Np, C, H, W] (same-class real samples); no gradient.
        neg: extra negatives [P, Nn, C, H, W] (unconditional real samples) or None.
        encoder: frozen DriftFeatures (or a ResNetMAE alone), or None for raw features only.
        weight_neg: per-negative weights [P, Nn] (CFG: (alpha - 1) * (G - 1) / Nn), repeated over
            each feature's L locations; None means 1.
        temperatures: kernel temperatures of the drift loss.
        drift_kwargs: extra keywords passed unchanged to drifting_policy.drift.drift_loss.
        validate: check the values (finite samples, weights >= 0) in one device-to-host copy;
            False skips it, and the call never waits for the device (the trainer's hot path).

    Returns:
        total: scalar loss with grad to gen.
        info: detached 0-d float32 tensors {feature name: its row-mean loss,
            "<info key>/<feature name>": each drift statistic ("scale", "lambda/<tau>")}.
    """
    for key, t in (("gen", gen), ("pos", pos)) + ((("neg", neg),) if neg is not None else ()):
        if t.ndim != 5 or t.shape[0] != gen.shape[0] or t.shape[2:] != gen.shape[2:]:
            raise ValueError(f"{key}: expected [P={gen.shape[0]}, N, *{tuple(gen.shape[2:])}], "
                             f"got shape {tuple(t.shape)}")
    if weight_neg is not None and (neg is None or weight_neg.shape != neg.shape[:2]):
        expected = None if neg is None else tuple(neg.shape[:2])
        raise ValueError(f"weight_neg: expected shape {expected} (one weight per negative), got "
                         f"{tuple(weight_neg.shape)}")
    if validate:
        _check_values(gen, pos, neg, weight_neg)
    gen_f = feature_sets(gen, encoder)
    with torch.no_grad():
        pos_f = feature_sets(pos, encoder)
        neg_f = feature_sets(neg, encoder) if neg is not None else {}

    total = gen.new_zeros((), dtype=torch.float32)
    names, values = [], []
    for name, g in gen_f.items():
        locations = g.shape[0] // gen.shape[0]
        w = None if weight_neg is None else weight_neg.repeat_interleave(locations, dim=0)
        # inputs checked once above: no per-feature host syncs
        loss, info = drift_loss(g, pos_f[name], neg_f.get(name), weight_neg=w,
                                temperatures=temperatures, validate=False,
                                **(drift_kwargs or {}))
        loss = loss.mean()
        total = total + loss
        names += [name] + [f"{k}/{name}" for k in info]
        values += [loss.detach()] + [v.detach().float() for v in info.values()]
    return total, dict(zip(names, values))
