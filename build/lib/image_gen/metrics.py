"""Sample quality: FID / IS with torch-fidelity's Inception (weights supplied by the user), and an
offline proxy — the Frechet distance in the penultimate features of a small CNN classifier
trained here on scikit-learn's bundled digits — for tests and the CPU demo.

Both Frechet distances use torch-fidelity's statistics and formula (mean + covariance of the
features; |mu1 - mu2|^2 + tr(S1 + S2 - 2 (S1 S2)^1/2)).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch_fidelity.metric_fid import fid_features_to_statistics, fid_statistics_to_metric
from torch_fidelity.metric_isc import isc_features_to_metric

INCEPTION_HINT = ("the Inception-v3 weights torch-fidelity uses, pt_inception-2015-12-05-"
                  "6726825d.pth from github.com/toshas/torch-fidelity/releases")


def frechet_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """Frechet distance between Gaussians fitted to features a [N, D] and b [M, D]."""
    stats = [fid_features_to_statistics(t.detach().double().cpu()) for t in (a, b)]
    return fid_statistics_to_metric(*stats, verbose=False)["frechet_inception_distance"]


def _check_weights(path: str | Path | None) -> Path:
    if path is None or not Path(path).is_file():
        raise FileNotFoundError(f"feature_extractor_weights_path: expected a file with "
                                f"{INCEPTION_HINT}; got {path!r} "
                                f"({'not given' if path is None else 'no such file'})")
    return Path(path)


class _Uint8Images(torch.utils.data.Dataset):
    def __init__(self, images: np.ndarray) -> None:
        self.images = images  # [N, H, W, 3] uint8

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(self.images[i])).permute(2, 0, 1)


def inception_features(images: np.ndarray, weights: str | Path, cuda: bool,
                       batch: int = 100) -> dict[str, torch.Tensor]:
    """Inception pool features '2048' [N, 2048] and 'logits_unbiased' [N, 1008] of uint8 images
    [N, H, W, 3]."""
    from torch_fidelity.utils import create_feature_extractor, get_featuresdict_from_dataset

    fe = create_feature_extractor("inception-v3-compat", ["2048", "logits_unbiased"], cuda=cuda,
                                  feature_extractor_weights_path=str(_check_weights(weights)),
                                  verbose=False)
    return get_featuresdict_from_dataset(_Uint8Images(images), fe, batch, cuda, False, True)


def _images_of(path: Path) -> np.ndarray:
    """uint8 [N, H, W, 3] from an npz of `image-gen sample` (key images) or ADM's reference batch
    (key arr_0)."""
    with np.load(path) as f:
        for key in ("images", "arr_0"):
            if key in f:
                images = f[key]
                break
        else:
            raise ValueError(f"{path}: expected an array 'images' or 'arr_0' of uint8 "
                             f"[N, H, W, 3], found keys {sorted(f.keys())}")
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"{path}: expected uint8 [N, H, W, 3] images, got {images.dtype} "
                         f"{images.shape}")
    return images


def fid_is(samples: str | Path, reference: str | Path, weights: str | Path | None,
           cuda: bool | None = None) -> dict[str, float]:
    """FID of samples (an npz from `image-gen sample`) against reference statistics (an npz with
    'mu' and 'sigma', as ADM's VIRTUAL_imagenet256_labeled.npz, or reference images in 'arr_0'),
    and the Inception Score of the samples. `weights`: the Inception weights file."""
    weights = _check_weights(weights)
    cuda = torch.cuda.is_available() if cuda is None else cuda
    feats = inception_features(_images_of(Path(samples)), weights, cuda)
    stats_gen = fid_features_to_statistics(feats["2048"].double())
    with np.load(reference) as f:
        if "mu" in f and "sigma" in f:
            stats_ref = {"mu": f["mu"].astype(np.float64), "sigma": f["sigma"].astype(np.float64)}
        else:
            ref_feats = inception_features(_images_of(Path(reference)), weights, cuda)
            stats_ref = fid_features_to_statistics(ref_feats["2048"].double())
    fid = fid_statistics_to_metric(stats_gen, stats_ref, verbose=False)
    isc = isc_features_to_metric(feats["logits_unbiased"])
    return {"fid": fid["frechet_inception_distance"], "is": isc["inception_score_mean"],
            "is_std": isc["inception_score_std"], "n": len(feats["2048"])}


class DigitsClassifier(nn.Module):
    """A small CNN on [B, 1, 16, 16] digits: features() -> [B, 64], forward() -> logits [B, 10]."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear(64 * 16, 64), nn.ReLU(),
        )
        self.head = nn.Linear(64, 10)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


def train_digits_classifier(x: torch.Tensor, y: torch.Tensor, epochs: int = 30,
                            seed: int = 0) -> DigitsClassifier:
    """Fit the proxy classifier on digits x [N, 1, 16, 16] (model space), labels y [N]."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    net = DigitsClassifier()
    opt = torch.optim.Adam(net.parameters(), lr=2e-3)
    for _ in range(epochs):
        for idx in torch.randperm(len(y), generator=g).split(64):
            loss = nn.functional.cross_entropy(net(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return net.eval().requires_grad_(False)


@torch.no_grad()
def proxy_fd(net: DigitsClassifier, a: torch.Tensor, b: torch.Tensor) -> float:
    """Frechet distance between digit sets a and b [N, 1, 16, 16] in the classifier's features."""
    return frechet_distance(net.features(a), net.features(b))


@torch.no_grad()
def accuracy(net: DigitsClassifier, x: torch.Tensor, y: torch.Tensor) -> float:
    """Fraction of x [N, 1, 16, 16] the classifier assigns to labels y [N]."""
    return float((net(x).argmax(1) == y).float().mean())
