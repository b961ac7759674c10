"""gymnasium wrappers of the rollout protocol (Diffusion Policy's MultiStepWrapper semantics).

- `MultiStepWrapper`: observations are the last To frames [To, ...] (padded with the first frame
  after reset); one step executes an action sequence [Ta, Da]; reward = max over executed steps;
  the episode ends at termination, truncation or `max_episode_steps` low-level steps.
- `FailureAsTermination`: an exception inside the env ends the episode as a failure (reward 0,
  info["error"]) instead of killing the whole evaluation.
- `FrameRecorder`: keeps env.render() frames every `every` low-level steps when enabled.
"""

from __future__ import annotations

import traceback
from collections import deque

import gymnasium as gym
import numpy as np


def _stack(frames: list, space: gym.Space):
    if isinstance(space, gym.spaces.Dict):
        return {k: np.stack([f[k] for f in frames]) for k in space.spaces}
    return np.stack(frames)


def _stacked_space(space: gym.Space, n: int) -> gym.Space:
    if isinstance(space, gym.spaces.Dict):
        return gym.spaces.Dict({k: _stacked_space(s, n) for k, s in space.spaces.items()})
    low = np.repeat(space.low[None], n, axis=0)
    high = np.repeat(space.high[None], n, axis=0)
    return gym.spaces.Box(low=low, high=high, dtype=space.dtype)


class FailureAsTermination(gym.Wrapper):
    """Turn an exception in step() into a terminated, zero-reward transition with info["error"]."""

    def reset(self, **kwargs):
        self._last_obs, info = self.env.reset(**kwargs)
        return self._last_obs, info

    def step(self, action):
        try:
            obs, reward, terminated, truncated, info = self.env.step(action)
        except Exception as e:  # noqa: BLE001 - any env failure is a failed episode
            err = f"{type(e).__name__}: {e}\n{traceback.format_exc(limit=3)}"
            return self._last_obs, 0.0, True, False, {"error": err}
        self._last_obs = obs
        return obs, reward, terminated, truncated, info


class MultiStepWrapper(gym.Wrapper):
    """Execute [Ta, Da] action sequences and observe [To, ...] frame stacks."""

    def __init__(self, env: gym.Env, n_obs_steps: int, n_action_steps: int, max_episode_steps: int):
        super().__init__(env)
        self.n_obs_steps, self.n_action_steps = n_obs_steps, n_action_steps
        self.max_episode_steps = max_episode_steps
        self.observation_space = _stacked_space(env.observation_space, n_obs_steps)
        a = env.action_space
        self.action_space = gym.spaces.Box(
            low=np.repeat(a.low[None], n_action_steps, 0),
            high=np.repeat(a.high[None], n_action_steps, 0), dtype=a.dtype,
        )
        self._obs: deque = deque(maxlen=n_obs_steps)

    def reset(self, **kwargs):
        obs, info = self.env.reset(**kwargs)
        self._obs.clear()
        self._obs.extend([obs] * self.n_obs_steps)
        self._steps, self._done, self._max_reward = 0, False, 0.0
        return _stack(list(self._obs), self.env.observation_space), info

    def step(self, actions):
        actions = np.asarray(actions)
        if actions.ndim != 2 or actions.shape[0] > self.n_action_steps:
            raise ValueError(
                f"action: expected shape [<= {self.n_action_steps}, Da], got {actions.shape}"
            )
        info: dict = {}
        terminated = truncated = False
        for act in actions:
            if self._done:
                break
            obs, reward, terminated, truncated, info = self.env.step(act)
            self._obs.append(obs)
            self._steps += 1
            self._max_reward = max(self._max_reward, float(reward))
            truncated = truncated or self._steps >= self.max_episode_steps
            self._done = terminated or truncated
        obs = _stack(list(self._obs), self.env.observation_space)
        return obs, self._max_reward, terminated, truncated, info


class FrameRecorder(gym.Wrapper):
    """Collect rgb frames (env.render()) after reset and every `every` steps while `recording`."""

    def __init__(self, env: gym.Env, every: int = 1):
        super().__init__(env)
        self.every, self.recording, self.frames = every, False, []
        self._t = 0

    def take_frames(self) -> list[np.ndarray]:
        frames, self.frames = self.frames, []
        return frames

    def reset(self, **kwargs):
        out = self.env.reset(**kwargs)
        self.frames, self._t = [], 0
        if self.recording:
            self.frames.append(self.env.render())
        return out

    def step(self, action):
        out = self.env.step(action)
        self._t += 1
        if self.recording and self._t % self.every == 0:
            self.frames.append(self.env.render())
        return out
