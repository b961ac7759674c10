"""Multi-scale feature sets and the feature-space drift loss of the image generator.

Deng et al., "Generative Modeling via Drifting" sec. 3 and the release (models/mae_model.py
get_activations, train.py feature_loss): the drift loss is a SUM over features; each feature turns
every sample into L vectors of S dims, and each of the L locations of each of the P problems
(class labels) is its own drift problem with the problem's N samples as its set.

Feature names, L and S for x [P, N, C, H, W] and an encoder map [Ci, Hi, Wi] named m (see
ResNetMAE.activation_names):

| name          | L                       | S        | value per sample                          |
|---------------|-------------------------|----------|-------------------------------------------|
| raw/global    | 1                       | C*H*W    | the sample flattened                      |
| raw/rms       | 1                       | C        | sqrt(mean over H, W of x^2 + 1e-6)        |
| m/loc         | Hi*Wi                   | Ci       | the vector at each location               |
| m/mean        | 1                       | Ci       | mean over locations                       |
| m/std         | 1                       | Ci       | sqrt(var over locations + 1e-6)           |
| m/mean{k}     | (Hi/k)*(Wi/k), k = 2, 4 | Ci       | mean over each k x k patch                |
| m/std{k}      | (Hi/k)*(Wi/k), k = 2, 4 | Ci       | sqrt(var over each k x k patch + 1e-6)    |

m/mean{k} and m/std{k} exist only when k divides Hi and Wi (release rule). Statistics are taken
in float32. Rows of each [P * L, N, S] tensor are problem-major: row = p * L + location.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from drifting_policy.drift import drift_loss
from image_gen.mae import ResNetMAE

PATCH_SIZES = (2, 4)  # patch sides of the local mean / std features (release)
_STD_EPS = 1e-6  # inside the square root of every std and rms (release)


def freeze(encoder: ResNetMAE) -> ResNetMAE:
    """Make `encoder` a fixed feature extractor in place (eval mode, no parameter grads)."""
    encoder.eval()
    encoder.requires_grad_(False)
    return encoder


def _map_features(name: str, feat: torch.Tensor, p: int, n: int) -> dict[str, torch.Tensor]:
    """Features of one map feat [P * N, Ci, Hi, Wi] (sample-major) as {name: [P * L, N, Ci]}."""
    f = feat.float()
    _, c, h, w = f.shape

    def rows(t: torch.Tensor) -> torch.Tensor:  # [P * N, Ci, ...L] -> [P * L, N, Ci]
        return t.reshape(p, n, c, -1).permute(0, 3, 1, 2).reshape(-1, n, c)

    def mean_std(mean: torch.Tensor, centred_sq: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return rows(mean), rows((centred_sq + _STD_EPS).sqrt())

    mean = f.mean(dim=(2, 3), keepdim=True)
    out = {f"{name}/loc": rows(f)}
    out[f"{name}/mean"], out[f"{name}/std"] = mean_std(mean, (f - mean).square().mean((2, 3)))
    for k in PATCH_SIZES:
        if h % k or w % k:
            continue
        mean = F.avg_pool2d(f, k)  # two-pass variance, as the release
        centred = f - mean.repeat_interleave(k, 2).repeat_interleave(k, 3)
        out[f"{name}/mean{k}"], out[f"{name}/std{k}"] = mean_std(
            mean, F.avg_pool2d(centred.square(), k))
    return out


def feature_sets(x: torch.Tensor, encoder: ResNetMAE | None) -> dict[str, torch.Tensor]:
    """The multi-scale feature set of x [P, N, C, H, W] (P problems of N samples each).

    Returns {name: [P * L, N, S]} as in the module table: the raw features, plus every encoder
    map's features when `encoder` is given (None: raw only, the ablation). Gradients flow through
    x; the encoder must be frozen (see `freeze`) but is not run under no_grad.
    """
    if x.ndim != 5:
        raise ValueError(f"x: expected [P, N, C, H, W], got shape {tuple(x.shape)}")
    p, n = x.shape[:2]
    xf = x.float()
    out = {
        "raw/global": xf.reshape(p, n, -1),
        "raw/rms": (xf.pow(2).mean(dim=(3, 4)) + _STD_EPS).sqrt(),
    }
    if encoder is None:
        return out
    if any(q.requires_grad for q in encoder.parameters()):
        raise ValueError("encoder: expected a frozen encoder (no parameter with requires_grad; "
                         "call image_gen.features.freeze(encoder)), got trainable parameters")
    maps = encoder.activations(x.reshape(p * n, *x.shape[2:]))
    for name, feat in zip(encoder.activation_names(), maps):
        out.update(_map_features(name, feat, p, n))
    return out


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
    encoder: ResNetMAE | None,
    *,
    weight_neg: torch.Tensor | None = None,
    temperatures: tuple[float, ...] = (0.02, 0.05, 0.2),
    drift_kwargs: dict | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Feature-space drift loss: the sum over features of the row-mean drift loss.

    Args:
        gen: generated samples [P, G, C, H, W]; gradients flow to them.
        pos: positives [P, Np, C, H, W] (same-class real samples); no gradient.
        neg: extra negatives [P, Nn, C, H, W] (unconditional real samples) or None.
        encoder: frozen feature encoder, or None for raw features only.
        weight_neg: per-negative weights [P, Nn] (CFG: (alpha - 1) * (G - 1) / Nn), repeated over
            each feature's L locations; None means 1.
        temperatures: kernel temperatures of the drift loss.
        drift_kwargs: extra keywords passed unchanged to drifting_policy.drift.drift_loss.

    Returns:
        total: scalar loss with grad to gen.
        info: floats {feature name: its row-mean loss, "<info key>/<feature name>": each drift
            statistic ("scale", "lambda/<tau>")}.
    """
    for key, t in (("gen", gen), ("pos", pos)) + ((("neg", neg),) if neg is not None else ()):
        if t.ndim != 5 or t.shape[0] != gen.shape[0] or t.shape[2:] != gen.shape[2:]:
            raise ValueError(f"{key}: expected [P={gen.shape[0]}, N, *{tuple(gen.shape[2:])}], "
                             f"got shape {tuple(t.shape)}")
    if weight_neg is not None and (neg is None or weight_neg.shape != neg.shape[:2]):
        expected = None if neg is None else tuple(neg.shape[:2])
        raise ValueError(f"weight_neg: expected shape {expected} (one weight per negative), got "
                         f"{tuple(weight_neg.shape)}")
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
    # One device-to-host copy for all statistics.
    return total, dict(zip(names, torch.stack(values).tolist()))
