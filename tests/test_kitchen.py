"""Franka Kitchen: D4RL's 60-d observation, sub-task rewards, the p_n metric, the scripted
expert (its actions replay exactly) and the task config end to end."""

from pathlib import Path

import gymnasium as gym
import mujoco
import numpy as np
import pytest

import envs.kitchen  # noqa: F401  (registers Kitchen-v0)
from envs.kitchen.env import ALL_TASKS, MAX_EPISODE_STEPS, KitchenEnv, d4rl_obs
from envs.kitchen.expert import (
    DOORS,
    MAX_DOORS,
    PLANNERS,
    collect_episode,
    draw_tasks,
    run_expert,
)
from envs.kitchen.metrics import kitchen_metrics

pytestmark = pytest.mark.usefixtures("single_thread")

# D4RL's sub-task definitions (d4rl/kitchen/kitchen_envs.py): obs indices and goal values
D4RL_INDICES = {"bottom burner": [11, 12], "top burner": [15, 16], "light switch": [17, 18],
                "slide cabinet": [19], "hinge cabinet": [20, 21], "microwave": [22],
                "kettle": [23, 24, 25, 26, 27, 28, 29]}
D4RL_GOALS = {"bottom burner": [-0.88, -0.01], "top burner": [-0.92, -0.01],
              "light switch": [-0.69, -0.05], "slide cabinet": [0.37],
              "hinge cabinet": [0.0, 1.45], "microwave": [-0.75],
              "kettle": [-0.23, 0.75, 1.62, 0.99, 0.0, 0.0, -0.06]}


@pytest.fixture(scope="module")
def quiet_env():
    """No observation noise, so the observation equals the simulator state."""
    env = KitchenEnv(robot_noise_ratio=0.0, object_noise_ratio=0.0)
    yield env
    env.close()


def test_d4rl_obs_mapping_of_the_59d_observation():
    obs59 = np.arange(59, dtype=np.float64)  # 9 qpos, 9 qvel, 21 object qpos, 20 object qvel
    obs60 = d4rl_obs(obs59)
    expected = np.concatenate([np.arange(9), np.arange(18, 39), np.zeros(30)])
    np.testing.assert_array_equal(obs60, expected)
    assert obs60.dtype == np.float32
    assert d4rl_obs(np.stack([obs59, obs59])).shape == (2, 60)
    with pytest.raises(ValueError, match="59"):
        d4rl_obs(np.zeros(60))


def test_observation_is_sim_qpos_then_zero_goal(quiet_env):
    obs, info = quiet_env.reset(seed=0)
    qpos = quiet_env.data.qpos
    assert obs.shape == (60,) and obs.dtype == np.float32
    np.testing.assert_allclose(obs[:30], qpos, atol=1e-6)
    np.testing.assert_array_equal(obs[30:], 0.0)
    rng = np.random.default_rng(0)
    for _ in range(5):
        obs, *_ = quiet_env.step(rng.uniform(-1, 1, 9))
        np.testing.assert_allclose(obs[:30], quiet_env.data.qpos, atol=1e-6)
    assert info["n_completed"] == 0


def test_noisy_observation_stays_within_d4rl_noise():
    env = KitchenEnv()  # robot_noise_ratio 0.1: +-0.1 * 0.1 rad on the arm joints
    obs, _ = env.reset(seed=1)
    err = np.abs(obs[:9] - env.data.qpos[:9])
    assert 0 < err.max() <= 0.01 + 1e-6
    env.close()


def _set_qpos(env: KitchenEnv, index, value) -> None:
    env.data.qpos[index] = value
    mujoco.mj_forward(env.model, env.data)


def test_reward_counts_each_completed_subtask_once(quiet_env):
    quiet_env.reset(seed=0)
    hold = np.zeros(9)  # zero joint velocity: the arm stays
    _set_qpos(quiet_env, D4RL_INDICES["microwave"], D4RL_GOALS["microwave"])
    _set_qpos(quiet_env, D4RL_INDICES["slide cabinet"], D4RL_GOALS["slide cabinet"])
    _, reward, terminated, _, info = quiet_env.step(hold)
    assert reward == 2.0 and info["step_completions"] == 2 and not terminated
    assert info["n_completed"] == 2
    expected = [float(t in ("microwave", "slide cabinet")) for t in ALL_TASKS]
    np.testing.assert_array_equal(info["completed"], expected)
    _, reward, _, _, info = quiet_env.step(hold)  # still open: no second reward
    assert reward == 0.0 and info["n_completed"] == 2
    # a sub-task 0.35 away from its goal (threshold 0.3) is not done; 0.25 away is
    light = np.array(D4RL_GOALS["light switch"])
    _set_qpos(quiet_env, D4RL_INDICES["light switch"], light + [0.35, 0.0])
    assert quiet_env.step(hold)[1] == 0.0
    _set_qpos(quiet_env, D4RL_INDICES["light switch"], light + [0.25, 0.0])
    assert quiet_env.step(hold)[1] == 1.0
    done = quiet_env.completed()  # in completion order (within one step: any order)
    assert sorted(done[:2]) == ["microwave", "slide cabinet"] and done[2] == "light switch"


def test_all_seven_subtasks_terminate(quiet_env):
    quiet_env.reset(seed=0)
    for task in ALL_TASKS:
        _set_qpos(quiet_env, D4RL_INDICES[task], D4RL_GOALS[task])
    _, reward, terminated, truncated, info = quiet_env.step(np.zeros(9))
    assert reward == 7.0 and terminated and not truncated and info["n_completed"] == 7


def _rollout(env, seed, n_steps):
    obs, _ = env.reset(seed=seed)
    out = [obs]
    for action in np.random.default_rng(0).uniform(-0.3, 0.3, (n_steps, 9)):
        obs, *_ = env.step(action)
        out.append(obs)
    return np.array(out)


def test_seeded_determinism_and_280_step_truncation():
    env = gym.make("Kitchen-v0")
    a, b = _rollout(env, 3, 20), _rollout(env, 3, 20)
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, _rollout(env, 4, 20))  # another seed: other noise
    env.reset(seed=0)
    steps, truncated = 0, False
    while not truncated:
        _, _, terminated, truncated, _ = env.step(np.zeros(9))
        assert not terminated
        steps += 1
    assert steps == MAX_EPISODE_STEPS == 280
    env.close()


def test_metric_fn_p_n_and_dp_mean_score():
    completed = [0, 1, 2, 4, 7]
    results = [{"n_completed": n} for n in completed] + [{"seed": 5}]  # the last one crashed
    rewards = np.array([0, 1, 1, 1, 1, 0], dtype=float)
    m = kitchen_metrics(rewards, results)
    # by hand over 6 episodes with 0, 1, 2, 4, 7, 0 sub-tasks
    assert m["p1"] == pytest.approx(4 / 6) and m["p2"] == pytest.approx(3 / 6)
    assert m["p3"] == pytest.approx(2 / 6) and m["p4"] == pytest.approx(2 / 6)
    assert m["p5"] == m["p6"] == m["p7"] == pytest.approx(1 / 6)
    assert m["mean_score"] == pytest.approx((0 + 1 + 2 + 4 + 7 + 0) / 7 / 6)
    with pytest.raises(ValueError, match="results"):
        kitchen_metrics(rewards[:2], results)


def test_expert_switches_the_light_and_its_actions_replay_exactly():
    env = KitchenEnv()
    ep = run_expert(env, seed=7, tasks=["light switch"])
    assert ep["completed"] == ["light switch"]
    T = len(ep["action"])
    assert ep["obs"].shape == (T, 60) and ep["action"].shape == (T, 9) and T < 80
    assert np.abs(ep["action"]).max() <= 1.0
    assert ep["reward"].sum() == 1.0
    # the recorded actions are what the env executes: replaying them reproduces the episode
    obs, _ = env.reset(seed=7)
    for t in range(T):
        np.testing.assert_allclose(obs, ep["obs"][t], atol=1e-5)
        obs, *_ = env.step(ep["action"][t])
    assert env.completed() == ["light switch"]
    with pytest.raises(ValueError, match="tasks"):
        run_expert(env, seed=0, tasks=["dishes"])
    env.close()


@pytest.mark.parametrize("task, joint, reached", [
    ("microwave", 22, lambda q: q <= D4RL_GOALS["microwave"][0] + 0.3),
    ("hinge cabinet", 21, lambda q: q >= D4RL_GOALS["hinge cabinet"][1] - 0.3)])
def test_expert_hooks_a_door_handle_and_swings_the_door_open(task, joint, reached):
    """The doors: closed fingers hooked behind the handle bar pull the door along its arc
    (the fingers never open), and the recorded actions replay the episode."""
    env = KitchenEnv()
    ep = run_expert(env, seed=0, tasks=[task])
    assert ep["completed"] == [task] and ep["reward"].sum() == 1.0
    assert reached(env.data.qpos[joint]), env.data.qpos[joint]
    T = len(ep["action"])
    assert T < 150 and np.abs(ep["action"]).max() <= 1.0
    np.testing.assert_array_equal(ep["action"][:, 7:], -1.0)  # a hook, not a grasp
    obs, _ = env.reset(seed=0)
    for t in range(T):  # float32-stored actions; the door contact amplifies the rounding
        np.testing.assert_allclose(obs, ep["obs"][t], atol=5e-4)
        obs, *_ = env.step(ep["action"][t])
    assert env.completed() == [task]
    env.close()


def test_rendering_is_small_and_shows_the_scene():
    env = KitchenEnv(render_size=(48, 64))
    env.reset(seed=0)
    frame = env.render()
    assert frame.shape == (48, 64, 3) and frame.dtype == np.uint8 and frame.std() > 10
    env.close()


def test_task_config_trains_and_its_runner_reports_p_n(tmp_path: Path):
    from drifting_policy.config import compose
    from drifting_policy.data.replay_buffer import ReplayBuffer
    from drifting_policy.rollout.runner import EnvRunner
    from drifting_policy.train import TrainWorkspace

    env = KitchenEnv()
    buf = ReplayBuffer.empty()
    for seed in range(3):  # short random-action episodes in the demo layout
        obs = [env.reset(seed=seed)[0]]
        actions = np.random.default_rng(seed).uniform(-0.5, 0.5, (20, 9)).astype(np.float32)
        for a in actions[:-1]:
            obs.append(env.step(a)[0])
        buf.add_episode({"obs": np.array(obs, np.float32), "action": actions})
    env.close()
    buf.save(tmp_path / "kitchen.zarr")
    cfg = compose("train_policy", [
        "task=kitchen_lowdim", f"task.dataset.path={tmp_path / 'kitchen.zarr'}",
        f"run_dir={tmp_path / 'run'}", "device=cpu", "logging.mode=disabled",
        "task.dataset.val_ratio=0.34", "policy.down_dims=[16,32]",
        "policy.diffusion_step_embed_dim=16", "training.batch_size=8", "training.num_steps=3",
        "training.lr_warmup_steps=1", "training.val_every=3", "training.rollout_every=100",
        "training.final_rollout=false", "training.checkpoint_every=3"])
    assert cfg.task.shape_meta.obs.obs.shape == [60] and cfg.task.env.max_steps == 280
    ws = TrainWorkspace(cfg)
    ws.run()
    assert ws.step == 3
    runner = EnvRunner.from_task(cfg.task, n_test=2, n_envs=1, n_videos=0)
    runner.spec.max_steps = 16
    result = runner.run(ws.eval_policy(), progress=False)
    assert {"p1", "p4", "p7", "mean_score"} <= set(result)
    assert [r["seed"] for r in result["per_seed"]] == [100000, 100001]
    assert all(r["n_completed"] == 0 for r in result["per_seed"])
    assert result["p1"] == 0.0 and result["mean_score"] == 0.0


def test_expert_completes_four_subtasks_in_a_seeded_order():
    ep = collect_episode(0)
    assert ep["success"] and len(ep["obs"]) == len(ep["action"]) <= 280
    assert ep["obs"].shape[1:] == (60,)
    plan = draw_tasks(np.random.default_rng(0))
    metrics = ep["metrics"]
    assert {k: metrics[k] for k in ("p1", "p2", "p3", "p4")} == dict.fromkeys(
        ("p1", "p2", "p3", "p4"), 1.0)
    # per-sub-task report for all seven: tried = in the plan, done = completed
    assert {t for t in ALL_TASKS if metrics[f"{t} tried"]} == set(plan)
    assert {t for t in ALL_TASKS if metrics[f"{t} done"]} == set(plan)
    assert len(metrics) == 4 + 2 * len(ALL_TASKS)
    plans = [tuple(draw_tasks(np.random.default_rng(seed))) for seed in range(40)]
    assert all(len(set(p)) == 4 and set(p) <= set(PLANNERS) for p in plans)
    assert set(PLANNERS) == set(ALL_TASKS)  # the expert covers all seven sub-tasks
    assert all(sum(t in DOORS for t in p) <= MAX_DOORS for p in plans)
    assert {t for p in plans for t in p} == set(ALL_TASKS)
    assert len(set(plans)) >= 30  # seeds choose different sub-tasks and orders: multimodal demos
    assert len({p[0] for p in plans}) >= 5


@pytest.mark.slow
def test_expert_completes_every_subtask_across_episodes():
    """20 seeded episodes: every one of the seven sub-tasks is completed somewhere, most
    attempted sub-tasks succeed, and most episodes finish all four within 280 steps."""
    done = dict.fromkeys(ALL_TASKS, 0.0)
    tried = dict.fromkeys(ALL_TASKS, 0.0)
    p4 = 0.0
    for seed in range(20):
        metrics = collect_episode(seed)["metrics"]
        p4 += metrics["p4"] / 20
        for task in ALL_TASKS:
            done[task] += metrics[f"{task} done"]
            tried[task] += metrics[f"{task} tried"]
    assert all(done[t] >= 1 for t in ALL_TASKS), done
    assert sum(done.values()) / sum(tried.values()) >= 0.8
    assert p4 >= 0.5
