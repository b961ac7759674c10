"""The one rollout runner for every task: vectorised envs, DP's protocol, per-seed scores, videos.

Each test episode i starts from seed `test_start_seed + i` (DP: 100000 + i). Episodes run in
batches of `n_envs` gymnasium envs (async processes when n_envs > 1); the policy sees obs stacks of
To frames and returns Ta actions per call. An episode's score is its max reward (DP's mean_score
is the mean over episodes); tasks with extra metrics (BlockPush p1/p2, Kitchen p1..p4) add them
through `metric_fn`. An env that raises counts as a failed episode (score 0) and the run goes on.

Optionally (DP's robomimic runners) `n_train` more episodes start from stored simulator states,
e.g. the first states of training demos: the env is reset with options={"state": state}, and
these episodes are reported apart ("train/mean_score", "per_train"), never mixed into the test
metrics.
"""

from __future__ import annotations

import multiprocessing
import os
import sys
import time
import types
from collections.abc import Callable, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import gymnasium as gym
import numpy as np
import torch
from tqdm import tqdm

# importing the task packages only registers their gymnasium ids; no simulator loads here
import envs.blockpush  # noqa: F401
import envs.kitchen  # noqa: F401
import envs.pusht  # noqa: F401
import envs.robomimic  # noqa: F401
from drifting_policy.rollout.wrappers import FailureAsTermination, FrameRecorder, MultiStepWrapper


def _kitchen_metrics(rewards, results):
    from envs.kitchen.metrics import kitchen_metrics

    return kitchen_metrics(rewards, results)


def _blockpush_metrics(rewards, results):
    from envs.blockpush.metrics import p1_p2

    return p1_p2(rewards, results)


def _robomimic_states(n: int, path: str) -> list:
    from envs.robomimic.env import initial_states

    return initial_states(n=n, path=path)


# names a task config may use (runner.metric, runner.train_states.source): fixed in code, so a
# config read from a checkpoint selects among these and never names a function to import
METRICS: dict[str, Callable] = {"kitchen": _kitchen_metrics, "blockpush": _blockpush_metrics}
TRAIN_STATE_SOURCES: dict[str, Callable] = {"robomimic": _robomimic_states}


@dataclass
class EnvSpec:
    """What to build per env process: a gymnasium id (the project's ids are registered by
    importing `envs`, which loads no simulator) + kwargs."""

    id: str
    kwargs: dict = field(default_factory=dict)
    max_steps: int = 300
    render_every: int = 1


class ResetToState(gym.Wrapper):
    """Reset with options={"state": reset_state} while `reset_state` (set per env through the
    vector env's set_attr) is not None."""

    reset_state = None

    def reset(self, **kwargs):
        if self.reset_state is not None:
            kwargs["options"] = {**(kwargs.get("options") or {}), "state": self.reset_state}
        return self.env.reset(**kwargs)


def make_env(spec: EnvSpec, n_obs_steps: int, n_action_steps: int) -> gym.Env:
    """The env the runner steps (and the real-time loop's GymRobot drives): `spec`'s gymnasium
    env with reset-to-state, failure-as-termination, frame recording and To/Ta multistep."""
    env = gym.make(spec.id, disable_env_checker=True, **spec.kwargs)
    env = FrameRecorder(FailureAsTermination(ResetToState(env)), every=spec.render_every)
    return MultiStepWrapper(env, n_obs_steps, n_action_steps, spec.max_steps)


class EnvRunner:
    """Evaluate a policy on `n_test` seeded episodes.

    Args:
        env: EnvSpec (or its fields as a mapping).
        n_obs_steps, n_action_steps: To / Ta of the policy.
        n_test: number of test episodes; test_start_seed: seed of the first.
        n_envs: parallel envs (processes when > 1); defaults to min(n_test, cpu count).
        n_videos: record the first n_videos episodes as mp4 under `video_dir`.
        metric: a name in METRICS (or a callable): (rewards [N], final infos) -> extra metrics.
        fps: video frame rate.
        n_train: episodes started from `train_states` (0: none).
        train_states: the initial simulator states, a sequence of arrays or a mapping
            {"source": name in TRAIN_STATE_SOURCES, **kwargs} (e.g. {"source": "robomimic",
            "path": the dataset} reads the first demos' initial states).
    """

    def __init__(
        self,
        env: EnvSpec | Mapping,
        n_obs_steps: int,
        n_action_steps: int,
        n_test: int = 50,
        test_start_seed: int = 100_000,
        n_envs: int | None = None,
        n_videos: int = 0,
        metric: str | Callable | None = None,
        fps: int = 10,
        n_train: int = 0,
        train_states: Sequence | Mapping | None = None,
    ) -> None:
        self.spec = env if isinstance(env, EnvSpec) else EnvSpec(**dict(env))
        self.n_obs_steps, self.n_action_steps = n_obs_steps, n_action_steps
        self.n_test, self.test_start_seed = n_test, test_start_seed
        self.n_envs = max(1, min(n_test, n_envs or os.cpu_count() or 1))
        self.n_videos, self.fps = n_videos, fps
        self.metric_fn = _choose(METRICS, metric, "runner.metric")
        self.train_states = _initial_states(train_states, n_train)

    @classmethod
    def from_task(cls, task: Mapping, **overrides) -> EnvRunner:
        """The runner a task config describes (task.env, task.runner, To/Ta); `overrides`
        replace task.runner entries that are not None."""
        container = task if isinstance(task, dict) else _to_container(task)
        env_id = str(container["env"].get("id", ""))
        if ":" in env_id:  # gymnasium would import the module named before the colon
            raise ValueError(f"task.env.id: expected a registered gymnasium id, got {env_id!r} "
                             "(a 'module:id' names code to import; task configs hold data only)")
        runner = {**container["runner"], **{k: v for k, v in overrides.items() if v is not None}}
        return cls(env=container["env"], n_obs_steps=container["n_obs_steps"],
                   n_action_steps=container["n_action_steps"], **runner)

    def _vector_env(self) -> gym.vector.VectorEnv:
        fns = [lambda: make_env(self.spec, self.n_obs_steps, self.n_action_steps)] * self.n_envs
        kw = dict(autoreset_mode=gym.vector.AutoresetMode.DISABLED)
        if self.n_envs == 1:
            return gym.vector.SyncVectorEnv(fns, **kw)
        # forkserver, not fork: a worker forked from the trainer inherits every lock another
        # thread (wandb, tqdm, torch, the dynamic loader) held at that moment, and robosuite's
        # EGL context creation then hangs forever; forkserver children start from a clean
        # single-threaded process
        with _workers_skip_caller_main():
            return gym.vector.AsyncVectorEnv(fns, context="forkserver", **kw)

    @torch.no_grad()
    def run(self, policy, video_dir: str | Path | None = None, progress: bool = True,
            n_samples: int = 1) -> dict:
        """Roll out; returns {"mean_score", extra metrics, "per_seed": [...], "videos": [...]}
        and, with train states, {"train/mean_score", "per_train": [...]}. `n_samples` = K > 1
        executes the medoid of K sampled chunks (predict_action's test-time selection)."""
        seeds = [self.test_start_seed + i for i in range(self.n_test)]
        n_train = len(self.train_states)
        videos: list[str] = []
        venv = self._vector_env()
        bar = tqdm(total=n_train + self.n_test, desc="rollout", disable=not progress,
                   leave=False)
        try:
            train = self._run_all(venv, policy, [None] * n_train, self.train_states, bar,
                                  n_samples=n_samples)
            venv.set_attr("reset_state", [None] * self.n_envs)
            results = self._run_all(venv, policy, seeds, [None] * self.n_test, bar,
                                    video_dir, videos, n_samples)
        finally:
            bar.close()
            venv.close()
        rewards = np.array([r["score"] for r in results])
        metrics = {"mean_score": float(np.mean(rewards))}  # DP: mean of episodes' max reward
        if self.metric_fn is not None:
            metrics.update(self.metric_fn(rewards, results))
        out = {**metrics, "n_test": self.n_test, "per_seed": results, "videos": videos}
        if train:
            for i, r in enumerate(train):
                r["train_index"] = i
            out.update({"train/mean_score": float(np.mean([r["score"] for r in train])),
                        "per_train": train})
        return out

    def _run_all(self, venv, policy, seeds: list, states: list, bar, video_dir=None,
                 videos: list | None = None, n_samples: int = 1) -> list[dict]:
        """Episodes in batches of n_envs; episode i resets with seeds[i] and, unless None,
        options={"state": states[i]}; the first n_videos are recorded when video_dir is set."""
        results: list[dict] = []
        for start in range(0, len(seeds), self.n_envs):
            batch = seeds[start : start + self.n_envs]
            record = [video_dir is not None and start + i < self.n_videos
                      for i in range(self.n_envs)]
            venv.set_attr("recording", record)
            if any(s is not None for s in states):
                batch_states = states[start : start + self.n_envs]
                venv.set_attr("reset_state", _pad(batch_states, self.n_envs))
            batch_results = self._run_batch(venv, policy, batch, n_samples)
            if video_dir is not None and any(record):
                frames = venv.call("take_frames")
                for i, seed in enumerate(batch):
                    if record[i] and frames[i]:
                        videos.append(_write_video(Path(video_dir), seed, frames[i], self.fps))
            results += batch_results
            bar.update(len(batch))
        return results

    def _run_batch(self, venv, policy, seeds: list[int | None], n_samples: int = 1
                   ) -> list[dict]:
        n = len(seeds)
        # envs beyond this batch's seeds re-run the last seed; their results are dropped
        obs, _ = venv.reset(seed=_pad(seeds, self.n_envs))
        policy.reset()
        done = np.zeros(self.n_envs, dtype=bool)
        done[n:] = True
        score = np.zeros(self.n_envs)
        errors: list[str | None] = [None] * self.n_envs
        info_last: list[dict] = [{} for _ in range(self.n_envs)]
        t0 = time.perf_counter()
        while not done.all():
            obs_dict = _to_policy_obs(obs, policy.device)
            # K = 1 calls the plain Diffusion Policy API, which any DP-style policy has
            kw = {"n_samples": n_samples} if n_samples > 1 else {}
            action = policy.predict_action(obs_dict, **kw)["action"]
            action = action.float().cpu().numpy()
            obs, reward, term, trunc, info = venv.step(action)
            for i in np.flatnonzero(~done):
                score[i] = max(score[i], float(reward[i]))
                info_i = {k: v[i] for k, v in info.items() if not k.startswith("_")
                          and info.get("_" + k, np.ones(self.n_envs, bool))[i]}
                if info_i:
                    info_last[i] = info_i
                if "error" in info_i:
                    errors[i], score[i] = str(info_i["error"]), 0.0
                if term[i] or trunc[i]:
                    done[i] = True
        seconds = time.perf_counter() - t0
        out = []
        for i, seed in enumerate(seeds):
            r = {"seed": seed, "score": float(score[i]), "seconds": seconds}
            r.update({k: _plain(v) for k, v in info_last[i].items() if k != "error"})
            if errors[i]:
                r["error"] = errors[i]
            out.append(r)
        return out


def _pad(items: list, n: int) -> list:
    """`items` (1 <= len <= n) padded to n with its last element."""
    return items + [items[-1]] * (n - len(items))


def _initial_states(source: Sequence | Mapping | None, n: int) -> list[np.ndarray]:
    """The first n initial states from a sequence or a {"source": name, **kwargs}."""
    if n <= 0:
        return []
    if source is None:
        raise ValueError(f"n_train={n} needs train_states (a list of states or "
                         f"{{'source': one of {sorted(TRAIN_STATE_SOURCES)}, ...}}), got None")
    if isinstance(source, Mapping):
        kwargs = dict(source)
        read = _choose(TRAIN_STATE_SOURCES, kwargs.pop("source", None),
                       "runner.train_states.source")
        source = read(n=n, **kwargs)
    states = [np.asarray(s) for s in source]
    if len(states) < n:
        raise ValueError(f"train_states: expected at least n_train={n} states, got {len(states)}")
    return states[:n]


@contextmanager
def _workers_skip_caller_main():
    """Start worker processes without re-running the caller's script.

    multiprocessing (spawn and forkserver) re-imports the parent's `__main__` in every child, so
    a script without an `if __name__ == "__main__":` guard that trains and then rolls out would
    train again inside each env worker. The workers need only this module (their env factory
    and spec are data), so while they start `__main__` is a bare module with no file to
    re-import, and the forkserver preloads this module instead of `__main__`.
    """
    multiprocessing.get_context("forkserver").set_forkserver_preload([__name__])
    caller = sys.modules["__main__"]
    sys.modules["__main__"] = types.ModuleType("__main__")
    try:
        yield
    finally:
        sys.modules["__main__"] = caller


def _choose(table: Mapping[str, Callable], choice: str | Callable | None, key: str):
    """A callable given directly, or the entry `choice` names in `table` (None: none)."""
    if choice is None or callable(choice):
        return choice
    if choice not in table:
        raise ValueError(f"{key}: expected one of {sorted(table)}, got {choice!r}")
    return table[choice]


def _to_container(cfg) -> dict:
    from omegaconf import OmegaConf

    return OmegaConf.to_container(cfg, resolve=True)


def _plain(v):
    v = np.asarray(v)
    return v.item() if v.ndim == 0 else v.tolist()


def _to_policy_obs(obs, device) -> dict[str, torch.Tensor]:
    """Vector-env obs ([N, To, ...] array or dict of them) -> the policy's obs dict."""
    if isinstance(obs, Mapping):
        return {k: torch.as_tensor(np.asarray(v), dtype=torch.float32, device=device)
                for k, v in obs.items()}
    return {"obs": torch.as_tensor(np.asarray(obs), dtype=torch.float32, device=device)}


def _write_video(video_dir: Path, seed: int, frames: list[np.ndarray], fps: int) -> str:
    import imageio.v2 as imageio

    video_dir.mkdir(parents=True, exist_ok=True)
    path = video_dir / f"seed_{seed}.mp4"
    with imageio.get_writer(path, fps=fps, codec="libx264", macro_block_size=1) as w:
        for f in frames:
            w.append_data(np.asarray(f, dtype=np.uint8))
    return str(path)
