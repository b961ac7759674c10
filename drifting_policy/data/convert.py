"""`drifting-policy convert SRC DST`: zarr replay buffer or robomimic HDF5 <-> LeRobotDataset v3.

The direction follows SRC's format (detected like a task's ``dataset.path``):

- zarr -> LeRobot: every episode and key. ``--layout auto`` (default) uses LeRobot's PushT names
  for a PushT buffer (keys state, keypoint, action and img: ``observation.image``,
  ``observation.state`` = agent xy, ``observation.environment_state`` = keypoints), and
  otherwise ``observation.<key>`` / ``observation.images.<key>`` / ``action``
  (:mod:`drifting_policy.data.lerobot_format`). ``--fps`` (default 10) is the control rate.
- robomimic HDF5 -> LeRobot: every demo's observation keys (``*_image`` keys become videos) and
  ``action`` as training reads it (7-d delta, or 10-d position + rotation-6d + gripper for a
  file with absolute actions); fps 20 (robosuite's control rate). The file's env_args are kept
  in info.json (``drifting_policy.robomimic_env_args``).
- LeRobot -> zarr: Diffusion Policy's zarr layout, each feature under the key it was converted
  from (or its LeRobot name for datasets recorded with LeRobot).

DST is written atomically; an existing DST is replaced only with ``--force``.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from drifting_policy.data.dataset import detect_format
from drifting_policy.data.lerobot_format import PUSHT_LAYOUT
from drifting_policy.data.lerobot_reader import read_episodes
from drifting_policy.data.lerobot_writer import write_lerobot
from drifting_policy.data.replay_buffer import ReplayBuffer, write_replay_atomic

ROBOMIMIC_FPS = 20
LAYOUTS = ("auto", "pusht", "generic")


def _episodes(buffer: ReplayBuffer) -> Iterator[dict[str, np.ndarray]]:
    for i in range(buffer.n_episodes):
        yield buffer.get_episode(i)


def _robomimic_buffer(src: Path) -> tuple[ReplayBuffer, dict]:
    import h5py

    from drifting_policy.data import robomimic_hdf5 as rh

    env_meta = rh.read_env_meta(src)
    with h5py.File(src, "r") as f:
        names = rh.demo_names(f)
        if not names:
            raise ValueError(f"{src}: no demos")
        keys = sorted(f[f"data/{names[0]}/obs"].keys())
    images = [k for k in keys if k.endswith("_image")]
    lowdim = [k for k in keys if k not in images]
    buffer = rh.load_replay(src, lowdim, images, abs_action=rh.action_mode(env_meta) == "abs")
    return buffer, env_meta


def convert(src: str | Path, dst: str | Path, fps: int | None = None, layout: str = "auto",
            task: str = "", drop: tuple[str, ...] = ()) -> tuple[str, int]:
    """Convert ``src`` to the other family of formats at ``dst`` (see the module docstring);
    ``drop``: source keys to leave out (zarr / HDF5 -> LeRobot). Returns (what was written,
    number of episodes)."""
    src, dst = Path(src).expanduser(), Path(dst).expanduser()
    if layout not in LAYOUTS:
        raise ValueError(f"--layout: expected one of {LAYOUTS}, got {layout!r}")
    fmt = detect_format(src)
    if fmt == "lerobot":
        if dst.suffix in (".hdf5", ".h5"):
            raise ValueError(f"{dst}: LeRobot -> robomimic HDF5 is not supported (robomimic files "
                             "carry simulator states and env_args a LeRobot dataset does not "
                             "have); write a zarr directory instead")
        return "zarr", write_replay_atomic(dst, read_episodes(src))
    metadata = {}
    if fmt == "robomimic":
        buffer, env_meta = _robomimic_buffer(src)
        metadata = {"robomimic_env_args": env_meta}
        fps = fps or ROBOMIMIC_FPS
    else:
        buffer = ReplayBuffer.load(src)
        fps = fps or 10
    unknown = sorted(set(drop) - set(buffer.keys()))
    if unknown or "action" in drop:
        raise ValueError(f"--drop: {unknown or ['action']} cannot be dropped; keys: "
                         f"{buffer.keys()}")
    buffer = ReplayBuffer({k: v for k, v in buffer.data.items() if k not in drop},
                          buffer.episode_ends)
    pusht = {"state", "keypoint", "action"} <= set(buffer.keys())
    if layout == "pusht" and not pusht:
        raise ValueError(f"--layout pusht: {src} lacks PushT keys (state, keypoint, action); "
                         f"keys: {buffer.keys()}")
    chosen = None
    if layout == "pusht" or (layout == "auto" and pusht):  # the image only when kept
        chosen = {k: v for k, v in PUSHT_LAYOUT.items() if v[0] in buffer}
    n = write_lerobot(dst, _episodes(buffer), fps=fps, layout=chosen, task=task,
                      metadata=metadata)
    return "lerobot", n


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("src", type=Path, help="zarr directory / .zarr.zip, robomimic .hdf5, or a "
                                          "LeRobot v3 directory")
    p.add_argument("dst", type=Path, help="LeRobot v3 directory (from zarr / HDF5) or zarr "
                                          "directory (from LeRobot)")
    p.add_argument("--fps", type=int, default=None,
                   help="control rate for LeRobot (default: 10 for zarr, 20 for robomimic)")
    p.add_argument("--layout", choices=LAYOUTS, default="auto",
                   help="LeRobot feature names: pusht (LeRobot's PushT names), generic "
                        "(observation.<key>), auto (pusht for a PushT buffer)")
    p.add_argument("--task", default="", help="task description stored in meta/tasks.parquet")
    p.add_argument("--drop", nargs="+", default=(), metavar="KEY",
                   help="source keys to leave out, e.g. --drop img for a low-dim LeRobot "
                        "dataset (LeRobot decodes every video of a frame it loads)")
    p.add_argument("--force", action="store_true", help="replace an existing DST")


def main(args: argparse.Namespace) -> int:
    if args.dst.exists() and not args.force:
        print(f"error: {args.dst} already exists; pass --force to replace it", file=sys.stderr)
        return 2
    kind, n = convert(args.src, args.dst, fps=args.fps, layout=args.layout, task=args.task,
                      drop=tuple(args.drop))
    print(f"wrote {args.dst} ({kind}, {n} episodes)")
    return 0
