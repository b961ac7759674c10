"""A rollout video (mp4, as `drifting-policy eval` writes them) as a small looping GIF for the
README: every `--every`-th frame, resized to `--size` pixels wide, the first `--seconds` of the
episode, palette-quantised so it stays well under 1 MB.

    python scripts/rollout_gif.py outputs/demo/eval/videos/seed_100000.mp4 docs/media/pusht.gif
"""

from __future__ import annotations

import argparse
from pathlib import Path

import imageio.v2 as imageio
from PIL import Image


def to_gif(video: Path, gif: Path, size: int = 160, every: int = 2, seconds: float = 10.0) -> int:
    """Write `gif` from `video`; returns the number of frames kept."""
    reader = imageio.get_reader(video)
    fps = float(reader.get_meta_data().get("fps", 10.0))
    frames = []
    for i, frame in enumerate(reader):
        if i >= seconds * fps:
            break
        if i % every == 0:
            image = Image.fromarray(frame)
            height = round(image.height * size / image.width)
            frames.append(image.resize((size, height), Image.LANCZOS)
                          .quantize(colors=64, method=Image.Quantize.MEDIANCUT))
    reader.close()
    if not frames:
        raise SystemExit(f"error: {video} has no frames")
    gif.parent.mkdir(parents=True, exist_ok=True)
    frames[0].save(gif, save_all=True, append_images=frames[1:], loop=0, optimize=True,
                   duration=round(1000 * every / fps))
    return len(frames)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("video", type=Path)
    p.add_argument("gif", type=Path)
    p.add_argument("--size", type=int, default=160, help="width in pixels")
    p.add_argument("--every", type=int, default=2, help="keep every n-th frame")
    p.add_argument("--seconds", type=float, default=10.0, help="episode seconds to keep")
    args = p.parse_args()
    n = to_gif(args.video, args.gif, args.size, args.every, args.seconds)
    print(f"wrote {args.gif}: {n} frames, {args.gif.stat().st_size / 1e3:.0f} kB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
