"""LeRobot v3.0 videos with PyAV: each ``videos/<key>/chunk-*/file-*.mp4`` holds many episodes
back to back, frame i at time i / fps (pts in units of 1 / fps). The writer uses LeRobot's
defaults (AV1 via libsvtav1, yuv420p, GOP 2, CRF 30); PyAV wheels ship the encoder and the
dav1d decoder. Frames are [L, H, W, 3] uint8 RGB.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from fractions import Fraction
from pathlib import Path

import numpy as np


class VideoFile:
    """One mp4 being written: frames get consecutive pts in units of 1 / fps; ``bytes`` counts
    the encoded size so far."""

    def __init__(self, path: Path, fps: int, height: int, width: int, codec: str,
                 options: Mapping[str, str]) -> None:
        import av

        os.environ.setdefault("SVT_LOG", "1")  # SVT-AV1: errors only, not its banner
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path, self.frames, self.bytes = path, 0, 0
        self.container = av.open(str(path), "w")
        self.stream = self.container.add_stream(codec, rate=fps, options=dict(options))
        self.stream.width, self.stream.height = width, height
        self.stream.pix_fmt = "yuv420p"
        self.stream.time_base = Fraction(1, fps)

    def write(self, frames: np.ndarray) -> None:
        import av

        for image in frames:
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(image), format="rgb24")
            frame.pts = self.frames
            self.frames += 1
            packets = self.stream.encode(frame)
            self.bytes += sum(packet.size for packet in packets)
            self.container.mux(packets)

    def close(self) -> None:
        self.container.mux(self.stream.encode())
        self.container.close()


class VideoFrames:
    """Sequential reader of one mp4: ``take(start, n)`` returns frames with index start ..
    start + n - 1 (index = round(time * fps)); requests must not go backwards."""

    def __init__(self, path: Path, fps: int) -> None:
        import av

        self.path, self.fps = path, fps
        self.container = av.open(str(path))
        self.frames = self.container.decode(video=0)

    def _next(self) -> tuple[int, np.ndarray] | None:
        frame = next(self.frames, None)
        if frame is None:
            return None
        return round(float(frame.time) * self.fps), frame.to_ndarray(format="rgb24")

    def take(self, start: int, n: int) -> np.ndarray:
        out = []
        while len(out) < n:
            item = self._next()
            if item is None:
                raise ValueError(f"{self.path}: ends before frame {start + len(out)} "
                                 f"(episode needs frames {start}..{start + n - 1})")
            index, image = item
            if index < start:
                continue
            if index != start + len(out):
                raise ValueError(f"{self.path}: expected frame {start + len(out)}, found "
                                 f"{index} (missing or out-of-order frames)")
            out.append(image)
        return np.stack(out)

    def close(self) -> None:
        self.container.close()
