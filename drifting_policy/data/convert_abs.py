"""`drifting-policy convert-abs IN.hdf5 OUT.hdf5`: robomimic delta actions -> absolute actions.

Diffusion Policy's robomimic `*_abs` variants train on absolute end-effector targets, made from
the delta-action files by its robomimic_abs_action conversion; this is that conversion on our
env. For every step t of every demo the simulator is set to the stored `states[t]` and the
delta action's OSC goal is read off the controller (`RobomimicEnv.absolute_action`: grip-site
pose at states[t] + the scaled, clipped delta, world frame):

    actions [T, 7] float64 = [x, y, z, rx, ry, rz, gripper]   (position, rotation vector, the
                                                               gripper command unchanged)

The goal depends only on the robot's pose in the stored state, so it is the goal the recorded
delta action set, whatever the objects' models (robomimic's public robosuite 1.4 files work
too). Everything else (obs, next_obs, states, rewards, dones, masks, attributes) is copied;
`data.attrs["env_args"]` switches the arm controller to absolute world-frame input in the
file's own layout (`envs.robomimic.env_args.absolute_env_args`: `control_delta: false` for
1.4 files, `input_type: "absolute"` for 1.5 ones), so robomimic's readers, our reader
(`abs_action=True` -> 10-d rotation-6d actions) and our env all see absolute control. The
output is written atomically (`drifting_policy.persist.atomic_path`).

`replay_deviation` checks a converted demo: the delta actions in the delta env and the absolute
ones in the absolute env (as 10-d rotation-6d actions, what a policy sends), both from the
demo's first state; `--verify N` prints it for the first N demos.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import h5py
import numpy as np
from scipy.spatial.transform import Rotation
from tqdm import tqdm

from drifting_policy.data.robomimic_hdf5 import action_mode, demo_names, read_env_meta
from drifting_policy.persist import atomic_path
from envs.robomimic.env import RobomimicEnv, make_env_from_env_args
from envs.robomimic.env_args import absolute_env_args
from envs.robomimic.rotation import abs_action_7_to_10


def convert_actions(env: RobomimicEnv, states: np.ndarray, actions: np.ndarray) -> np.ndarray:
    """Delta actions [T, 7] taken from `states` [T, S] -> absolute actions [T, 7] float64
    (position, rotation vector, gripper); `env` is a delta-action env of the file's task."""
    actions = np.asarray(actions, dtype=np.float64)
    if actions.ndim != 2 or actions.shape[1] != 7 or len(actions) != len(states):
        raise ValueError(f"actions: expected delta actions [T, 7] with T = len(states) = "
                         f"{len(states)}, got {actions.shape}")
    out = np.empty_like(actions)
    for t, (state, action) in enumerate(zip(states, actions)):
        env.reset_to_state(state)
        out[t] = env.absolute_action(action)
    return out


def convert_file(src: str | os.PathLike, dst: str | os.PathLike, progress: bool = True) -> int:
    """Write `dst`: `src` (a robomimic file with delta actions) with absolute actions and
    absolute-control env_args (module docstring). Returns the number of demos converted."""
    src, dst = Path(src).expanduser(), Path(dst).expanduser()
    env_meta = read_env_meta(src)
    if action_mode(env_meta) == "abs":
        raise ValueError(f"{src}: env_args' controller config already says absolute actions "
                         "(control_delta false / input_type absolute); nothing to convert")
    env = make_env_from_env_args(env_meta, image=False, abs_actions=False)
    try:
        with h5py.File(src, "r") as fin, atomic_path(dst) as tmp:
            with h5py.File(tmp, "w") as fout:
                for key, value in fin.attrs.items():
                    fout.attrs[key] = value
                for key in fin:
                    fin.copy(fin[key], fout, name=key)
                demos = demo_names(fin)
                for name in tqdm(demos, desc=f"convert-abs {src.name}", unit="demo",
                                 disable=not progress):
                    demo = fin[f"data/{name}"]
                    for key in ("states", "actions"):
                        if key not in demo:
                            raise ValueError(f"{src}: data/{name} has no '{key}' "
                                             f"(has {sorted(demo)})")
                    absolute = convert_actions(env, demo["states"][()], demo["actions"][()])
                    del fout[f"data/{name}/actions"]
                    fout[f"data/{name}/actions"] = absolute
                fout["data"].attrs["env_args"] = json.dumps(absolute_env_args(env_meta),
                                                            indent=4)
    finally:
        env.close()
    return len(demos)


def replay_deviation(env_args: dict, state: np.ndarray, delta_actions: np.ndarray,
                     abs_actions: np.ndarray) -> dict[str, float]:
    """Run `delta_actions` [T, 7] in the delta env and `abs_actions` [T, 7] (position, rotation
    vector, gripper; sent as 10-d rotation-6d actions) in the absolute env, both from `state`.

    Returns {"pos": max end-effector position gap (m), "rot": max orientation gap (rad),
    "steps": T}, over the T steps."""
    paths = []
    for absolute, actions in ((False, delta_actions), (True, abs_action_7_to_10(abs_actions))):
        env = make_env_from_env_args(env_args, image=False, abs_actions=absolute,
                                     terminate_on_success=False, max_episode_steps=len(actions))
        try:
            env.reset(options={"state": state})
            path = []
            for action in actions:
                env.step(action)
                path.append((env.raw_obs["robot0_eef_pos"], env.raw_obs["robot0_eef_quat"]))
            paths.append(path)
        finally:
            env.close()
    (pos_d, quat_d), (pos_a, quat_a) = (tuple(np.array(x) for x in zip(*p)) for p in paths)
    rot = (Rotation.from_quat(quat_d) * Rotation.from_quat(quat_a).inv()).magnitude()
    return {"pos": float(np.linalg.norm(pos_d - pos_a, axis=-1).max()),
            "rot": float(rot.max()), "steps": len(delta_actions)}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("src", type=Path, help="robomimic HDF5 file with delta actions")
    p.add_argument("dst", type=Path, help="robomimic HDF5 file to write (absolute actions)")
    p.add_argument("--force", action="store_true", help="replace an existing DST")
    p.add_argument("--verify", type=int, default=0, metavar="N",
                   help="replay the first N demos both ways and print the end-effector gap")


def main(args: argparse.Namespace) -> int:
    if args.dst.exists() and not args.force:
        raise FileExistsError(f"{args.dst} already exists; pass --force to replace it")
    n = convert_file(args.src, args.dst)
    print(f"wrote {args.dst}: {n} demos with absolute actions [T, 7] (position, axis-angle, "
          "gripper), env_args set to absolute control")
    if args.verify > 0:
        with h5py.File(args.src, "r") as fin, h5py.File(args.dst, "r") as fout:
            env_meta = json.loads(fin["data"].attrs["env_args"])
            for name in demo_names(fin)[: args.verify]:
                gap = replay_deviation(env_meta, fin[f"data/{name}/states"][0],
                                       fin[f"data/{name}/actions"][()],
                                       fout[f"data/{name}/actions"][()])
                print(f"{name}: absolute vs delta replay over {gap['steps']} steps: "
                      f"end-effector within {gap['pos']:.2e} m, {gap['rot']:.2e} rad")
    return 0
