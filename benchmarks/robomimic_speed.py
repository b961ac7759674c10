"""Simulation + rendering throughput of the robomimic envs (one process, zero actions).

    python benchmarks/robomimic_speed.py [--steps 100]

Prints steps/s per task without cameras and with the task's two cameras (84x84 for Lift/Can,
240x240 for ToolHang, and ToolHang at 84x84), with robosuite's default offscreen rendering and
with the env's `fast_render` settings, after a warm-up reset.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from envs.robomimic.env import RobomimicEnv
from envs.robomimic.env_args import TASKS

# (task, cameras on, camera size (None: the task's), fast_render)
CONFIGS = (("lift", False, None, True), ("lift", True, None, False), ("lift", True, None, True),
           ("can", False, None, True), ("can", True, None, False), ("can", True, None, True),
           ("tool_hang", False, None, True), ("tool_hang", True, None, False),
           ("tool_hang", True, None, True), ("tool_hang", True, 84, True))


def steps_per_second(task: str, image: bool, camera_size: int | None, fast: bool,
                     steps: int) -> float:
    """Env steps per second (zero delta actions) after one seeded reset."""
    env = RobomimicEnv(task, image=image, camera_size=camera_size, fast_render=fast)
    try:
        env.reset(seed=0)
        start = time.perf_counter()
        for _ in range(steps):
            env.step(np.zeros(7))
        return steps / (time.perf_counter() - start)
    finally:
        env.close()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=100)
    args = parser.parse_args(argv)
    for task, image, size, fast in CONFIGS:
        rate = steps_per_second(task, image, size, fast, args.steps)
        side = size or TASKS[task].camera_size
        cams = f"2 x {side}x{side} {'fast' if fast else 'default'}" if image else "none"
        print(f"{task:>9}  cameras {cams:<20} {rate:7.1f} steps/s", flush=True)


if __name__ == "__main__":
    main()
