"""The README's rollout animations: an mp4 rollout becomes a small looping GIF."""

import sys
from pathlib import Path

import imageio.v2 as imageio
import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import rollout_gif  # noqa: E402


def test_gif_keeps_every_nth_frame_of_the_first_seconds_at_the_video_pace(tmp_path):
    video = tmp_path / "seed_0.mp4"
    with imageio.get_writer(video, fps=10, codec="libx264", macro_block_size=1) as w:
        for i in range(40):  # 4 s; a bright square moving right
            frame = np.zeros((96, 128, 3), np.uint8)
            frame[40:56, 3 * i:3 * i + 16] = 255
            w.append_data(frame)
    n = rollout_gif.to_gif(video, tmp_path / "out" / "a.gif", size=64, every=2, seconds=3.0)
    assert n == 15  # frames 0, 2, .., 28 of the first 30
    gif = Image.open(tmp_path / "out" / "a.gif")
    assert gif.size == (64, 48) and gif.n_frames == 15
    assert gif.info["duration"] == 200 and gif.info["loop"] == 0
    gif.seek(14)  # the square has moved right: frame 28 at x = 84..100 of 128 -> 42..50 of 64
    column = np.asarray(gif.convert("L"))[24]
    assert column[46] > 128 and column[10] < 64
