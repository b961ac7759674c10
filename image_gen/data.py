"""Datasets of the image trainer and a resumable infinite sample stream.

Every dataset is map-style and returns (x [C, H, W] float32, label int):
- ImageFolderFlips: an ImageFolder tree (root/<class>/<image>) with ADM's centre crop; index
  2i + f is image i, horizontally flipped when f = 1; pixels in [-1, 1].
- LatentCache: the output of `image-gen cache-latents` (SD-VAE latents of each image and its flip,
  already times 0.18215); index 2i + f as above.
- Digits: scikit-learn's bundled 8x8 digits, upsampled to 16x16, 1 channel, ~unit variance.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Sampler

MANIFEST = "manifest.json"


def adm_center_crop(image: Image.Image, size: int) -> Image.Image:
    """ADM's centre crop: halve with a box filter while the short side is >= 2 * size, resize
    bicubically so the short side is `size`, then crop the centre size x size."""
    while min(image.size) >= 2 * size:
        image = image.resize(tuple(s // 2 for s in image.size), resample=Image.BOX)
    ratio = size / min(image.size)
    image = image.resize(tuple(round(s * ratio) for s in image.size), resample=Image.BICUBIC)
    left, top = (image.size[0] - size) // 2, (image.size[1] - size) // 2
    return image.crop((left, top, left + size, top + size))


class ImageFolderFlips(Dataset):
    """ImageFolder images, ADM centre-cropped to `size`, each present as itself and its mirror.

    Items: (pixels [3, size, size] float32 in [-1, 1], class index)."""

    def __init__(self, root: str | Path, size: int = 256) -> None:
        from torchvision.datasets import ImageFolder

        root = Path(root)
        if not root.is_dir():
            raise FileNotFoundError(f"data.path: expected an ImageFolder directory "
                                    f"(root/<class>/<image>), got {root} (not a directory)")
        self.folder = ImageFolder(str(root))
        self.size = size
        self.classes = self.folder.classes

    def __len__(self) -> int:
        return 2 * len(self.folder)

    def image(self, i: int) -> tuple[torch.Tensor, int]:
        """Image i (not flipped) as [3, size, size] in [-1, 1], and its label."""
        path, label = self.folder.samples[i]
        with Image.open(path) as im:
            im = adm_center_crop(im.convert("RGB"), self.size)
        x = torch.from_numpy(np.asarray(im, dtype=np.float32)).permute(2, 0, 1)
        return x / 127.5 - 1.0, label

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        x, label = self.image(index // 2)
        return (x.flip(-1) if index % 2 else x), label


class LatentCache(Dataset):
    """Cached SD-VAE latents (see vae.cache_latents). Items: (latent [4, h, w] float32, label)."""

    def __init__(self, path: str | Path) -> None:
        path = Path(path)
        manifest = read_manifest(path)
        if not manifest["complete"]:
            raise ValueError(f"data.path: latent cache {path} is incomplete "
                             f"({len(manifest['shards'])} of {manifest['n_shards']} shards); "
                             "rerun `image-gen cache-latents` to finish it")
        self.classes = manifest["classes"]
        self.latents = [np.load(path / s["latents"], mmap_mode="r") for s in manifest["shards"]]
        self.labels = np.concatenate([np.load(path / s["labels"]) for s in manifest["shards"]])
        self.offsets = np.cumsum([0] + [len(a) for a in self.latents])

    def __len__(self) -> int:
        return 2 * int(self.offsets[-1])

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        i, flip = divmod(index, 2)
        shard = int(np.searchsorted(self.offsets, i, side="right")) - 1
        z = torch.from_numpy(np.array(self.latents[shard][i - self.offsets[shard], flip]))
        return z.float(), int(self.labels[i])


def read_manifest(path: Path) -> dict:
    f = Path(path) / MANIFEST
    if not f.is_file():
        raise FileNotFoundError(f"data.path: expected a latent cache directory with {MANIFEST} "
                                f"(written by `image-gen cache-latents`), got {path}")
    return json.loads(f.read_text())


class Digits(Dataset):
    """scikit-learn's bundled digits (1,797 images, 10 classes) as [1, size, size] float32 with
    zero mean and unit variance over the whole set; `part` selects one of two disjoint halves
    ("a" / "b", a seeded split stratified by class) or everything (None)."""

    def __init__(self, size: int = 16, part: str | None = None, seed: int = 0) -> None:
        from sklearn.datasets import load_digits

        d = load_digits()
        x = torch.from_numpy(d.images.astype(np.float32))[:, None] / 16.0
        x = torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear",
                                            align_corners=False)
        self.mean, self.std = float(x.mean()), float(x.std())
        x, y = (x - self.mean) / self.std, torch.from_numpy(d.target).long()
        if part is not None:
            if part not in ("a", "b"):
                raise ValueError(f"part: expected 'a', 'b' or None, got {part!r}")
            g = torch.Generator().manual_seed(seed)
            keep = []
            for c in range(10):
                idx = (y == c).nonzero().flatten()
                idx = idx[torch.randperm(len(idx), generator=g)]
                keep.append(idx[: len(idx) // 2] if part == "a" else idx[len(idx) // 2:])
            keep = torch.cat(keep).sort().values
            x, y = x[keep], y[keep]
        self.x, self.y = x, y
        self.classes = [str(c) for c in range(10)]

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.x[index], int(self.y[index])

    def to_unit(self, x: torch.Tensor) -> torch.Tensor:
        """Model space -> [0, 1] intensities (for pictures)."""
        return (x * self.std + self.mean).clamp(0, 1)


class StreamSampler(Sampler[int]):
    """Endless indices: epoch e is a permutation seeded by (seed, e), rank r of `world` takes
    every world-th index from position r. Starts after `consumed` indices of this rank."""

    def __init__(self, n: int, seed: int, consumed: int = 0, rank: int = 0, world: int = 1):
        per_rank = n // world
        if per_rank < 1:
            raise ValueError(f"dataset: expected at least {world} items (one per rank), got {n}")
        self.n, self.seed, self.consumed, self.rank, self.world = n, seed, consumed, rank, world
        self.per_rank = per_rank

    def __iter__(self) -> Iterator[int]:
        epoch, pos = divmod(self.consumed, self.per_rank)
        while True:
            g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
            order = torch.randperm(self.n, generator=g)[self.rank :: self.world][: self.per_rank]
            yield from order[pos:].tolist()
            epoch, pos = epoch + 1, 0


class DataStream:
    """Endless batches (x [N, C, H, W], labels Long[N]) whose position survives a restart:
    `consumed` counts the samples handed out, and a stream rebuilt with it continues exactly.
    One DataLoader per (re)start: its workers persist, and `pin_memory` pins the batches so the
    trainer's copies to the GPU are asynchronous."""

    def __init__(self, dataset: Dataset, batch: int, seed: int, consumed: int = 0,
                 rank: int = 0, world: int = 1, num_workers: int = 0,
                 pin_memory: bool = False) -> None:
        self.dataset, self.batch, self.seed = dataset, batch, seed
        self.rank, self.world, self.num_workers = rank, world, num_workers
        self.pin_memory = pin_memory
        self.restart(consumed)

    def restart(self, consumed: int) -> None:
        """Continue after `consumed` samples of this rank (as if they had just been handed out)."""
        self.consumed = consumed
        sampler = StreamSampler(len(self.dataset), self.seed, consumed, self.rank, self.world)
        loader = DataLoader(self.dataset, batch_size=self.batch, sampler=sampler,
                            num_workers=self.num_workers, persistent_workers=self.num_workers > 0,
                            pin_memory=self.pin_memory)
        self._it = iter(loader)

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = next(self._it)
        self.consumed += len(y)
        return x, y.long()
