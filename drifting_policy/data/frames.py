"""Image frames as stored for training and video: uint8 RGB, channels last."""

from __future__ import annotations

import numpy as np


def as_uint8(frames: np.ndarray) -> np.ndarray:
    """Frames [..., H, W, 3] as uint8: uint8 as is, floats in 0..255 (Diffusion Policy's PushT zarr
    stores float32 0..255) rounded; ValueError for values outside 0..255."""
    if frames.dtype == np.uint8:
        return frames
    if frames.size and (np.nanmin(frames) < 0 or np.nanmax(frames) > 255):
        raise ValueError(f"image frames must lie in 0..255, got [{np.nanmin(frames)}, "
                         f"{np.nanmax(frames)}] ({frames.dtype})")
    return np.rint(frames).astype(np.uint8)
