"""SD-VAE (diffusers AutoencoderKL) from a local directory, and the resumable latent cache.

Latent = VAE posterior sample * 0.18215 (Stable Diffusion's scale), [4, H/8, W/8] per image
(H/2^(levels-1) for other VAE configs).
The cache (`image-gen cache-latents`) walks the ImageFolder in its sorted order in shards of
`shard_size` images; shard k holds the latents of images [k*S, (k+1)*S) and of their mirrors:

    <out>/manifest.json           classes, latent shape, n_shards, finished shards, complete
    <out>/latents_00000.npy       float16 [n, 2, 4, h, w]   (index 1 = horizontally flipped)
    <out>/labels_00000.npy        int64 [n]

Each shard file is written under a temporary name and renamed; the manifest lists a shard only
after its files are in place, so a killed run resumes at the first unlisted shard. The posterior
noise of shard k is seeded by (seed, k), so a resumed cache equals an uninterrupted one.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from drifting_policy.persist import atomic_path
from image_gen.data import MANIFEST, ImageFolderFlips

SCALE = 0.18215  # Stable Diffusion latent scale


def load_vae(path: str | Path | None, device: str | torch.device = "cpu"):
    """A diffusers AutoencoderKL from a local directory (e.g. a download of
    stabilityai/sd-vae-ft-mse: config.json + diffusion_pytorch_model.safetensors). No hub access."""
    from diffusers import AutoencoderKL

    if path is None or not (Path(path) / "config.json").is_file():
        raise FileNotFoundError(
            f"vae: expected a local diffusers AutoencoderKL directory with config.json and "
            f"weights (e.g. a download of stabilityai/sd-vae-ft-mse), got {path!r} "
            f"({'not given' if path is None else 'no config.json there'})")
    vae = AutoencoderKL.from_pretrained(str(path), local_files_only=True)
    return vae.to(device).eval().requires_grad_(False)


@torch.no_grad()
def encode(vae, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Pixels [B, 3, H, W] in [-1, 1] -> scaled latents [B, 4, H/8, W/8] (posterior sample)."""
    return vae.encode(x).latent_dist.sample(generator=generator) * SCALE


def decode_pixels(vae, z: torch.Tensor) -> torch.Tensor:
    """Scaled latents [B, 4, h, w] -> pixels [B, 3, 8h, 8w] (about [-1, 1], not clamped), with
    gradients to z: the pixel-space features of latent generators (release `postprocess_fn` with
    `has_clip=False`)."""
    return vae.decode(z / SCALE).sample


@torch.no_grad()
def decode(vae, z: torch.Tensor) -> torch.Tensor:
    """Scaled latents [B, 4, h, w] -> pixels [B, 3, 8h, 8w] clamped to [-1, 1]."""
    return decode_pixels(vae, z).clamp(-1, 1)


def shard_generator(seed: int, shard: int, device: str | torch.device = "cpu") -> torch.Generator:
    """The generator of shard k's posterior noise (images in order, each followed by its mirror,
    encoded in batches of `batch` pairs)."""
    return torch.Generator(device=device).manual_seed(seed * 1_000_003 + shard)


def _save_npy(path: Path, array: np.ndarray) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.save(f, array)


def _write_manifest(out: Path, manifest: dict) -> None:
    with atomic_path(out / MANIFEST) as tmp:
        tmp.write_text(json.dumps(manifest, indent=1))


def cache_latents(
    root: str | Path,
    vae_path: str | Path | None,
    out: str | Path,
    *,
    size: int = 256,
    shard_size: int = 4096,
    batch: int = 64,
    seed: int = 0,
    num_workers: int = 4,
    device: str = "cpu",
    vae=None,
) -> Path:
    """Encode every image of the ImageFolder `root` and its mirror into a sharded cache at `out`
    (resumes a partial one). `vae` overrides `vae_path` with an already loaded model."""
    from torch.utils.data import DataLoader, Subset

    data = ImageFolderFlips(root, size)
    n_img = len(data.folder)
    n_shards = -(-n_img // shard_size)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    vae = vae if vae is not None else load_vae(vae_path, device)
    factor = 2 ** (len(vae.config.block_out_channels) - 1)  # 8 for the SD-VAE
    latent_shape = [vae.config.latent_channels, size // factor, size // factor]
    expect = {"root": str(Path(root).resolve()), "classes": data.classes, "size": size,
              "shard_size": shard_size, "n_images": n_img, "seed": seed}
    if (out / MANIFEST).is_file():
        manifest = json.loads((out / MANIFEST).read_text())
        for key, value in expect.items():
            if manifest.get(key) != value:
                raise ValueError(f"cache-latents: {out} holds a cache with {key}="
                                 f"{manifest.get(key)!r}, expected {value!r}; use a new --out")
    else:
        manifest = {**expect, "latent_shape": latent_shape, "scale": SCALE,
                    "n_shards": n_shards, "shards": [], "complete": n_shards == 0}
        _write_manifest(out, manifest)
    done = {s["index"] for s in manifest["shards"]}
    bar = tqdm(total=n_img, desc="cache-latents", unit="img",
               initial=sum(min(shard_size, n_img - k * shard_size) for k in done))
    for k in range(n_shards):
        if k in done:
            continue
        ids = list(range(k * shard_size, min((k + 1) * shard_size, n_img)))
        loader = DataLoader(Subset(_Mirrored(data), ids), batch_size=batch,
                            num_workers=num_workers)
        g = shard_generator(seed, k, device)
        latents, labels = [], []
        for x, y in loader:  # x [b, 2, 3, H, W]
            z = encode(vae, x.flatten(0, 1).to(device), generator=g)
            latents.append(z.view(len(y), 2, *z.shape[1:]).cpu().half().numpy())
            labels.append(y.numpy().astype(np.int64))
            bar.update(len(y))
        names = {"latents": f"latents_{k:05d}.npy", "labels": f"labels_{k:05d}.npy"}
        _save_npy(out / names["latents"], np.concatenate(latents))
        _save_npy(out / names["labels"], np.concatenate(labels))
        manifest["shards"] = sorted(manifest["shards"] + [{"index": k, **names}],
                                    key=lambda s: s["index"])
        manifest["complete"] = len(manifest["shards"]) == n_shards
        _write_manifest(out, manifest)
    bar.close()
    return out


class _Mirrored(torch.utils.data.Dataset):
    """Image i and its mirror stacked: ([2, 3, H, W], label)."""

    def __init__(self, data: ImageFolderFlips) -> None:
        self.data = data

    def __len__(self) -> int:
        return len(self.data.folder)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        x, label = self.data.image(i)
        return torch.stack([x, x.flip(-1)]), label
