"""The one env runner: DP's multistep protocol, per-seed results, env failures don't stop it."""

import threading

import gymnasium as gym
import numpy as np
import pytest
import torch

from drifting_policy.rollout.runner import EnvRunner
from drifting_policy.rollout.wrappers import MultiStepWrapper


class CounterEnv(gym.Env):
    """obs = [t, seed]; reward = t / 10; seeds ending in 3 raise at t = 4; ends at t = 10."""

    observation_space = gym.spaces.Box(-np.inf, np.inf, (2,), np.float32)
    action_space = gym.spaces.Box(-1, 1, (1,), np.float32)
    metadata = {"render_modes": ["rgb_array"]}
    render_mode = "rgb_array"

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.t, self.seed_ = 0, seed
        return np.array([0, seed], np.float32), {}

    def step(self, action):
        self.t += 1
        if self.seed_ % 10 == 3 and self.t == 4:
            raise RuntimeError("simulator exploded")
        obs = np.array([self.t, self.seed_], np.float32)
        return obs, self.t / 10, self.t >= 10, False, {"t": self.t}

    def render(self):
        return np.full((16, 16, 3), 10 * self.t, np.uint8)


gym.register("Counter-v0", entry_point=CounterEnv)
# vector-env workers start from a clean process: gymnasium's "module:id" imports this module
# (and its registrations) there; task configs cannot do this (from_task refuses such ids)
COUNTER = {"id": "test_runner:Counter-v0", "max_steps": 20}
SIM_LOCK = threading.Lock()  # stands in for a lock inside a simulator's renderer (EGL)
RENDER_THREAD_STOP: list[threading.Event] = []  # set when this process's render thread runs


def _render_thread(ready: threading.Event, stop: threading.Event) -> None:
    with SIM_LOCK:  # a driver thread that holds the renderer's lock while it works
        ready.set()
        stop.wait()


class LockedInitCounterEnv(CounterEnv):
    """Takes SIM_LOCK while it is built; the first env of a process then starts a background
    render thread that holds SIM_LOCK, as an EGL driver does (the vector env builds one env in
    the parent for its spaces, so the parent has that thread when the workers start)."""

    def __init__(self):
        with SIM_LOCK:
            super().__init__()
        if not RENDER_THREAD_STOP:
            ready, stop = threading.Event(), threading.Event()
            threading.Thread(target=_render_thread, args=(ready, stop), daemon=True).start()
            ready.wait()
            RENDER_THREAD_STOP.append(stop)


gym.register("LockedInitCounter-v0", entry_point=LockedInitCounterEnv)


class RecordingPolicy:
    """Returns zeros; remembers the observation stacks it was given."""

    device = torch.device("cpu")

    def __init__(self):
        self.seen = []

    def reset(self):
        pass

    def predict_action(self, obs_dict):
        self.seen.append(obs_dict["obs"].clone())
        n = obs_dict["obs"].shape[0]
        return {"action": torch.zeros(n, 3, 1)}


def test_multistep_wrapper_stacks_pads_and_takes_max_reward():
    env = MultiStepWrapper(CounterEnv(), n_obs_steps=2, n_action_steps=3, max_episode_steps=7)
    obs, _ = env.reset(seed=0)
    np.testing.assert_array_equal(obs[:, 0], [0, 0])  # padded with the first frame
    obs, reward, term, trunc, _ = env.step(np.zeros((3, 1)))
    np.testing.assert_array_equal(obs[:, 0], [2, 3])
    assert reward == pytest.approx(0.3) and not (term or trunc)
    env.step(np.zeros((3, 1)))
    obs, reward, term, trunc, _ = env.step(np.zeros((3, 1)))  # stops at 7 low-level steps
    assert trunc and obs[-1, 0] == 7 and reward == pytest.approx(0.7)


@pytest.mark.parametrize("n_envs", [1, 2])
def test_runner_scores_seeds_and_survives_env_errors(tmp_path, n_envs):
    runner = EnvRunner(env=COUNTER, n_obs_steps=2,
                       n_action_steps=3, n_test=5, test_start_seed=100, n_envs=n_envs,
                       n_videos=1)
    policy = RecordingPolicy()
    result = runner.run(policy, video_dir=tmp_path, progress=False)
    by_seed = {r["seed"]: r for r in result["per_seed"]}
    assert sorted(by_seed) == [100, 101, 102, 103, 104]
    assert "simulator exploded" in by_seed[103]["error"] and by_seed[103]["score"] == 0.0
    for seed in (100, 101, 102, 104):
        assert by_seed[seed]["score"] == pytest.approx(1.0) and "error" not in by_seed[seed]
    assert result["mean_score"] == pytest.approx(0.8)
    # the policy saw To-frame stacks of the right seeds
    first = policy.seen[0]
    assert first.shape[1:] == (2, 2) and set(first[:, 0, 1].tolist()) <= {100.0, 101.0}
    assert len(result["videos"]) == 1 and result["videos"][0].endswith("seed_100.mp4")


@pytest.mark.timeout(120)
def test_workers_do_not_inherit_locks_held_by_parent_threads():
    """A forked worker copies SIM_LOCK in its locked state, without the thread that would release
    it, and hangs in the env's __init__ (how robosuite image rollouts hung after training).
    The runner's workers start from a clean process instead."""
    runner = EnvRunner(env={**COUNTER, "id": "test_runner:LockedInitCounter-v0"}, n_obs_steps=2,
                       n_action_steps=3, n_test=2, n_envs=2)
    try:
        result = runner.run(RecordingPolicy(), progress=False)
    finally:
        for stop in RENDER_THREAD_STOP:
            stop.set()
    assert RENDER_THREAD_STOP, "the parent built an env (gymnasium's space probe)"
    assert result["mean_score"] == pytest.approx(1.0)


@pytest.mark.timeout(120)
def test_a_script_without_main_guard_is_not_rerun_by_the_workers(tmp_path):
    """multiprocessing re-imports the caller's __main__ in workers by default: a plain script
    that trains and then rolls out would retrain in every env worker. It must run once."""
    import subprocess
    import sys
    from pathlib import Path

    log = tmp_path / "runs.log"
    script = tmp_path / "train_then_eval.py"
    script.write_text(
        "import sys\n"
        f"sys.path.insert(0, {str(Path(__file__).parent)!r})\n"
        f"open({str(log)!r}, 'a').write('training\\n')  # stands for a training run\n"
        "from drifting_policy.rollout.runner import EnvRunner\n"
        "from test_runner import COUNTER, RecordingPolicy\n"
        "runner = EnvRunner(env=COUNTER, n_obs_steps=2, n_action_steps=3, n_test=2, n_envs=2)\n"
        "print(runner.run(RecordingPolicy(), progress=False)['mean_score'])\n"
    )
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                          timeout=110, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().splitlines()[-1] == "1.0"
    assert log.read_text() == "training\n"


def test_task_configs_cannot_name_modules_to_import():
    task = {"env": {"id": "os:PushT-v0"}, "runner": {}, "n_obs_steps": 2, "n_action_steps": 8}
    with pytest.raises(ValueError, match=r"task.env.id: expected a registered gymnasium id"):
        EnvRunner.from_task(task)
    with pytest.raises(ValueError, match=r"runner.metric: expected one of \['blockpush', "):
        EnvRunner.from_task({**task, "env": {"id": "PushT-v0"}, "runner": {"metric": "os:system"}})
