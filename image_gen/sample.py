"""`image-gen sample`: one-step generation at any guidance scale from a training checkpoint.

Writes <out>/samples.npz (samples [N, C, H, W] float32 in model space, labels [N], alpha, and
images [N, H, W, 3] uint8 when they can be rendered) and <out>/samples.png (a grid: one row per
class, up to `rows` classes x `per_row` samples). Latent checkpoints need the SD-VAE (--vae) to
render; pixel and digits checkpoints render directly.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig
from PIL import Image
from tqdm import tqdm

from image_gen import checkpoint as ckpt
from image_gen.data import Digits
from image_gen.train import build_generator


def load_generator(path: str | Path, ema: bool = True, device: str | torch.device = "cpu"):
    """(DiT with the checkpoint's EMA weights when present and `ema`, its config)."""
    path = Path(path)
    cfg = ckpt.load_config(path)
    model = build_generator(cfg.model)
    weights = path / ckpt.EMA if ema and (path / ckpt.EMA).is_file() else path / ckpt.MODEL
    ckpt.load_weights(model, weights)
    return model.to(device).eval(), cfg


@torch.no_grad()
def generate(model, labels: torch.Tensor, alpha: float, seed: int = 0,
             batch: int = 256) -> torch.Tensor:
    """One forward pass per batch: labels Long[N] -> samples [N, C, H, W] float32 (CPU).

    Noise and style are drawn on the CPU from `seed` and then moved to the model's device, so a
    seed gives the same inputs on every device; bf16 autocast on CUDA."""
    device = next(model.parameters()).device
    g = torch.Generator().manual_seed(seed)
    out = []
    for chunk in tqdm(labels.split(batch), desc="sample", disable=len(labels) <= batch):
        noise, style = model.sample_inputs(len(chunk), "cpu", generator=g)
        alpha_t = torch.full((len(chunk),), float(alpha))
        inputs = [t.to(device, non_blocking=True) for t in (noise, chunk, alpha_t, style)]
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"):
            out.append(model(*inputs).float().cpu())
    return torch.cat(out)


def to_images(x: torch.Tensor, cfg: DictConfig, vae=None) -> np.ndarray:
    """Model-space samples [N, C, H, W] -> uint8 [N, H', W', 3] for the data kind of cfg."""
    kind = cfg.data.kind
    if kind == "digits":
        unit = Digits(int(cfg.data.image_size)).to_unit(x).expand(-1, 3, -1, -1)
    elif kind == "pixel":
        unit = (x.clamp(-1, 1) + 1) / 2
    elif kind == "latent":
        if vae is None:
            raise ValueError("vae: rendering latent samples needs the SD-VAE; pass --vae DIR "
                             "(a local diffusers AutoencoderKL directory)")
        from image_gen.vae import decode

        device = next(vae.parameters()).device
        unit = torch.cat([(decode(vae, z.to(device)).float().cpu() + 1) / 2
                          for z in x.split(32)])
    else:
        raise ValueError(f"data.kind: expected latent, pixel or digits, got {kind!r}")
    return (unit.clamp(0, 1) * 255).round().byte().permute(0, 2, 3, 1).numpy()


def grid(images: np.ndarray, labels: np.ndarray, rows: int = 10, per_row: int = 10,
         pad: int = 2) -> np.ndarray:
    """uint8 grid [rows*(h+pad), per_row*(w+pad), 3]: row r = the first samples of the r-th
    class present in labels (sorted)."""
    h, w = images.shape[1:3]
    classes = np.unique(labels)[:rows]
    out = np.full((len(classes) * (h + pad) + pad, per_row * (w + pad) + pad, 3), 255, np.uint8)
    for r, c in enumerate(classes):
        for j, i in enumerate(np.flatnonzero(labels == c)[:per_row]):
            y, x = pad + r * (h + pad), pad + j * (w + pad)
            out[y : y + h, x : x + w] = images[i]
    return out


def save_png(array: np.ndarray, path: Path, min_side: int = 256) -> None:
    """Write a uint8 image, upscaled (nearest) so its short side is at least min_side."""
    im = Image.fromarray(array)
    k = max(1, -(-min_side // min(im.size)))
    im.resize((im.size[0] * k, im.size[1] * k), Image.NEAREST).save(path)


def sample(checkpoint: str | Path, alpha: float, n: int, out: str | Path, *, seed: int = 0,
           vae_path: str | None = None, ema: bool = True, device: str | None = None,
           per_row: int = 10) -> dict[str, Path]:
    """n samples (labels 0, 1, ..., K-1 repeated) at guidance alpha -> samples.npz + samples.png."""
    if n < 1:
        raise ValueError(f"n: expected >= 1 samples, got {n}")
    if alpha < 1:
        raise ValueError(f"alpha: expected a guidance scale >= 1, got {alpha}")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model, cfg = load_generator(checkpoint, ema, device)
    labels = torch.arange(n) % model.num_classes
    x = generate(model, labels, alpha, seed)
    if not torch.isfinite(x).all():
        raise FloatingPointError(f"checkpoint {checkpoint}: generated non-finite samples")
    vae = None
    if cfg.data.kind == "latent":
        from image_gen.vae import load_vae

        vae = load_vae(vae_path, device)
    images = to_images(x, cfg, vae)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"npz": out / "samples.npz", "png": out / "samples.png"}
    np.savez(paths["npz"], samples=x.numpy(), labels=labels.numpy(), alpha=np.float32(alpha),
             images=images)
    save_png(grid(images, labels.numpy(), per_row=per_row), paths["png"])
    return paths
