"""Robot adapters for the control loop (`deploy/control_loop.py`'s `Robot` protocol)."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from drifting_policy.rollout.runner import EnvSpec, make_env


class GymRobot:
    """A gymnasium env as a robot (the simulator stands in for hardware).

    The env is built like the EnvRunner builds it (same wrappers), with Ta = 1: every
    `send_action` steps the env once, and `get_observation` returns the last To frames, padded
    with the first frame after reset (MultiStepWrapper). `score` is the episode's max reward.
    """

    def __init__(self, env: EnvSpec | Mapping, n_obs_steps: int) -> None:
        spec = env if isinstance(env, EnvSpec) else EnvSpec(**dict(env))
        self.env = make_env(spec, n_obs_steps, 1)
        self.n_obs_steps = n_obs_steps
        self.done, self.score, self.info = True, 0.0, {}
        self._obs = None

    @classmethod
    def from_task(cls, task: Mapping) -> GymRobot:
        """The robot for a task config (task.env and task.n_obs_steps)."""
        return cls(dict(task["env"]), int(task["n_obs_steps"]))

    def reset(self, seed: int | None = None) -> None:
        self._obs, self.info = self.env.reset(seed=seed)
        self.done, self.score = False, 0.0

    def get_observation(self) -> dict[str, np.ndarray]:
        if self._obs is None:
            raise RuntimeError("GymRobot: call reset() before get_observation()")
        if isinstance(self._obs, Mapping):
            return {k: np.asarray(v, np.float32) for k, v in self._obs.items()}
        return {"obs": np.asarray(self._obs, np.float32)}

    def send_action(self, action: np.ndarray) -> None:
        if self.done:
            return  # the episode is over; further commands are ignored
        self._obs, reward, term, trunc, info = self.env.step(np.asarray(action)[None])
        self.score, self.info = float(reward), info  # MultiStepWrapper: max reward so far
        self.done = bool(term or trunc)

    def close(self) -> None:
        self.env.close()
