"""`drifting-policy demos <task> --episodes N --out PATH`: scripted expert -> dataset file.

Each task is one entry of `TASKS`: where its per-episode collector lives (imported lazily, in
the worker processes), which writer produces its native dataset format, and the task's own
boolean flags (e.g. robomimic's --image / --abs), passed as keywords to both. With
`--format lerobot` the same episodes are written as a LeRobotDataset v3 directory instead
(`drifting_policy.data.lerobot_writer`: the task's feature layout, its control rate as fps).
Episodes run with seeds S, S+1, ... in parallel processes; only successful ones are kept, in
seed order. The file is written to a hidden sibling directory and renamed into place at the
end, so an interrupted run never leaves a half-written dataset, and an existing PATH is only
replaced with --force.
"""

from __future__ import annotations

import argparse
import functools
import importlib
import multiprocessing
import os
import sys
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np


def write_zarr_replay(path: str | os.PathLike, episodes: Iterable[dict]) -> int:
    """Diffusion Policy's zarr replay buffer (format 2) from the episodes' per-step arrays;
    non-array entries (flags such as `success`) are not stored. Streams, so memory stays flat."""
    from drifting_policy.data.replay_buffer import write_replay_atomic

    arrays = ({k: v for k, v in ep.items() if isinstance(v, np.ndarray)} for ep in episodes)
    return write_replay_atomic(path, arrays)


@dataclass(frozen=True)
class DemoTask:
    """How to make one task's demos.

    collect: "module:function", (seed, **flags) -> episode dict with per-step arrays, a
        `success` flag (only successful episodes are written), whatever else the writer needs,
        and optional scalar `metrics` {name: number} (e.g. BlockPush p1/p2) that are averaged
        over all episodes run and printed next to the success rate.
    write: the writer, (path, episodes, **flags) -> number written, or "module:function".
    flags: the task's boolean options, {name: help}; `--name` on the command line.
    options: the collector's numeric options, {name: help}; `--name X` (float, default 0),
        passed to `collect` only (they change how episodes are run, not how they are written).
    """

    collect: str
    write: Callable[..., int] | str
    help: str
    flags: dict[str, str] = field(default_factory=dict)
    options: dict[str, str] = field(default_factory=dict)
    fps: int = 10
    layout: str = "generic"  # LeRobot feature layout: "pusht" or "generic"
    arrays: Callable[..., dict] | None = None  # episode -> {key: [L, ...]} for --format lerobot

    def writer(self) -> Callable[..., int]:
        return resolve(self.write) if isinstance(self.write, str) else self.write


_ROBOMIMIC_WRITER = "drifting_policy.data.robomimic_hdf5:write_hdf5"
_ROBOMIMIC_FLAGS = {
    "image": "also render the camera observations (agentview + eye-in-hand; ToolHang: sideview)",
    "abs": "store absolute actions (10-d: position, rotation-6d, gripper) instead of deltas (7-d)",
}


def _robomimic_arrays(episode: dict, image: bool = False, abs: bool = False) -> dict:
    """A robomimic episode as flat arrays: its observation keys plus ``action`` (7-d delta, or
    with ``abs`` 10-d position, rotation-6d, gripper: what training reads)."""
    from envs.robomimic.rotation import abs_action_7_to_10

    action = np.asarray(episode["actions"], dtype=np.float32)
    if abs and action.shape[-1] == 7:
        action = abs_action_7_to_10(action).astype(np.float32)
    return {**{k: np.asarray(v) for k, v in episode["obs"].items()}, "action": action}


_ROBOMIMIC = {"flags": _ROBOMIMIC_FLAGS, "fps": 20, "arrays": _robomimic_arrays}

TASKS: dict[str, DemoTask] = {
    "pusht": DemoTask(
        collect="envs.pusht.expert:collect_episode",
        write=write_zarr_replay, layout="pusht",
        help="PushT: zarr replay buffer with img, state, keypoint, action, n_contacts "
             "(the layout of Diffusion Policy's pusht_cchi_v7_replay.zarr)"),
    "blockpush": DemoTask(
        collect="envs.blockpush.expert:collect_episode",
        write=write_zarr_replay,
        help="BlockPush (two blocks, two targets; multimodal oracle): zarr replay buffer with "
             "obs (16) and action (2); prints the oracle's p1/p2",
        options={"action_noise": "DART demos: execute the oracle's target plus N(0, X^2) "
                                 "metres per axis, record the oracle's clean target (default 0)"}),
    "kitchen": DemoTask(
        collect="envs.kitchen.expert:collect_episode",
        write=write_zarr_replay, fps=12,  # 12.5 Hz; LeRobot stores an integer fps
        help="Franka Kitchen (4 sub-tasks in varied orders): zarr replay buffer with obs (60, "
             "D4RL layout) and action (9); prints the expert's p1..p4"),
    "lift": DemoTask(
        collect="envs.robomimic.expert:collect_lift", write=_ROBOMIMIC_WRITER,
        help="robomimic Lift: robomimic HDF5 (data/demo_i/...)", **_ROBOMIMIC),
    "can": DemoTask(
        collect="envs.robomimic.expert:collect_can", write=_ROBOMIMIC_WRITER,
        help="robomimic PickPlaceCan: robomimic HDF5 (data/demo_i/...)", **_ROBOMIMIC),
    "tool_hang": DemoTask(
        collect="envs.robomimic.expert:collect_tool_hang", write=_ROBOMIMIC_WRITER,
        help="robomimic ToolHang: robomimic HDF5 (data/demo_i/...)", **_ROBOMIMIC),
}


def write_lerobot_demos(path: str | os.PathLike, episodes: Iterable[dict], task: DemoTask,
                        name: str, **flags: bool) -> int:
    """The task's episodes as a LeRobotDataset v3 directory (atomic, see write_lerobot)."""
    from drifting_policy.data.lerobot_format import PUSHT_LAYOUT
    from drifting_policy.data.lerobot_writer import write_lerobot

    arrays = (task.arrays(ep, **flags) if task.arrays else ep for ep in episodes)
    layout = PUSHT_LAYOUT if task.layout == "pusht" else None
    return write_lerobot(path, arrays, fps=task.fps, layout=layout, task=name)


def resolve(name: str) -> Callable:
    """'package.module:function' -> the function (imported now)."""
    module, function = name.split(":")
    return getattr(importlib.import_module(module), function)


def _run_episode(collect: str, kwargs: dict[str, bool | float], seed: int) -> dict:
    """Worker entry point: import the collector named `collect` and run episode `seed`."""
    return resolve(collect)(seed, **kwargs)


def _episodes(task: DemoTask, seeds: list[int], workers: int,
              kwargs: dict[str, bool | float]) -> Iterator[dict]:
    """Collected episodes in seed order; a process pool when workers > 1."""
    run = functools.partial(_run_episode, task.collect, kwargs)
    if workers <= 1:
        yield from map(run, seeds)
        return
    pool = ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn"))
    try:
        yield from pool.map(run, seeds)
    finally:  # on an error or Ctrl-C, drop the episodes not started yet instead of waiting
        pool.shutdown(wait=True, cancel_futures=True)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="drifting-policy demos",
        description="Run a task's scripted expert and write its demonstrations in the "
                    "task's native dataset format (failed episodes are dropped).")
    tasks = parser.add_subparsers(dest="task", required=True, metavar="TASK")
    for name, task in TASKS.items():
        sub = tasks.add_parser(name, help=task.help, description=task.help)
        sub.add_argument("--episodes", type=int, required=True,
                         help="episodes to run (seeds SEED .. SEED+N-1)")
        sub.add_argument("--out", type=Path, required=True, help="dataset path to create")
        sub.add_argument("--seed", type=int, default=0, help="first episode seed (default 0)")
        sub.add_argument("--force", action="store_true", help="replace an existing --out")
        sub.add_argument("--format", choices=("native", "lerobot"), default="native",
                         help="native: the task's own format (default); lerobot: a "
                              "LeRobotDataset v3 directory (videos for image observations)")
        sub.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                         help="parallel processes (default: all cores)")
        for flag, flag_help in task.flags.items():
            sub.add_argument(f"--{flag}", action="store_true", help=flag_help)
        for option, option_help in task.options.items():
            sub.add_argument(f"--{option.replace('_', '-')}", dest=option, type=float,
                             default=0.0, metavar="X", help=option_help)
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        args = _parser().parse_args(argv)
    except SystemExit as exit_:  # --help or a usage error: argparse already printed why
        return int(exit_.code or 0)
    task = TASKS[args.task]
    flags = {name: getattr(args, name) for name in task.flags}
    options = {name: getattr(args, name) for name in task.options}
    out: Path = args.out
    if args.episodes < 1:
        print("error: --episodes must be at least 1", file=sys.stderr)
        return 2
    if out.exists() and not args.force:
        print(f"error: {out} already exists; pass --force to replace it", file=sys.stderr)
        return 2

    from tqdm import tqdm

    seeds = list(range(args.seed, args.seed + args.episodes))
    workers = max(1, min(args.workers, len(seeds)))
    out.parent.mkdir(parents=True, exist_ok=True)
    counts = {"run": 0, "kept": 0}
    metric_sums: dict[str, float] = {}

    def successful(episodes: Iterable[dict]) -> Iterator[dict]:
        bar = tqdm(episodes, total=len(seeds), desc=f"{args.task} expert", unit="episode")
        for episode in bar:
            counts["run"] += 1
            for name, value in episode.get("metrics", {}).items():
                metric_sums[name] = metric_sums.get(name, 0.0) + float(value)
            if episode["success"]:
                counts["kept"] += 1
                yield episode
            bar.set_postfix(success=f"{counts['kept']}/{counts['run']}")

    try:  # the writer builds the file under a temporary name and moves it into place
        episodes = successful(_episodes(task, seeds, workers, {**flags, **options}))
        if args.format == "lerobot":
            write_lerobot_demos(out, episodes, task, args.task, **flags)
        else:
            task.writer()(out, episodes, **flags)
    except ValueError:
        if counts["kept"] == 0:
            print(f"error: the expert succeeded in none of {counts['run']} episodes; "
                  "nothing written", file=sys.stderr)
            return 1
        raise
    rate = counts["kept"] / counts["run"]
    print(f"{args.task}: expert succeeded in {counts['kept']}/{counts['run']} episodes "
          f"({rate:.1%}); keeping only the successful ones")
    if metric_sums:
        print(f"{args.task} expert over {counts['run']} episodes: " + ", ".join(
            f"{name} {total / counts['run']:.3f}" for name, total in metric_sums.items()))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
