"""BlockPush (IBC / DP multimodal, pybullet): observation layout, reward events, seeding, the
multimodal oracle, the p1/p2 metric hook and the task config end to end."""

import math

import gymnasium as gym
import numpy as np
import pybullet
import pytest
import torch
from scipy.spatial.transform import Rotation

import envs.blockpush  # noqa: F401  (registers the gymnasium ids)
from drifting_policy.config import compose
from drifting_policy.data import demos as make_demos
from drifting_policy.data.replay_buffer import ReplayBuffer
from drifting_policy.rollout.runner import EnvRunner
from drifting_policy.train import TrainWorkspace
from envs.blockpush.env import (
    EFFECTOR_START,
    OBS_LAYOUT,
    BlockPushMultimodalEnv,
    initial_layout,
)
from envs.blockpush.expert import (
    ASSIGNMENTS,
    MultimodalPushOracle,
    collect_episode,
    draw_assignment,
)
from envs.blockpush.metrics import p1_p2

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def env():
    env = BlockPushMultimodalEnv()
    yield env
    env.close()


def test_observation_matches_the_pybullet_state_in_dps_order(env):
    obs, _ = env.reset(seed=5)
    assert obs.shape == (16,) and obs.dtype == np.float32
    assert list(OBS_LAYOUT) == [  # DP's FlattenObservation order of IBC's state dict
        "block_translation", "block_orientation", "block2_translation", "block2_orientation",
        "effector_translation", "effector_target_translation", "target_translation",
        "target_orientation", "target2_translation", "target2_orientation"]
    obs, *_ = env.step(np.array([0.35, -0.3]))
    c, s = env.scene.client, env.scene
    for i, (xy, yaw) in enumerate(((0, 2), (3, 5))):
        pos, orn = c.getBasePositionAndOrientation(s.blocks[i])
        np.testing.assert_allclose(obs[xy:xy + 2], pos[:2], atol=1e-6)
        dp_yaw = Rotation.from_quat(orn).as_euler("xyz")[-1] % np.pi  # DP's _yaw_from_pose
        assert obs[yaw] == pytest.approx(dp_yaw, abs=1e-6)
    link = c.getLinkState(s.arm, 6)[0]
    np.testing.assert_allclose(obs[6:8], link[:2], atol=1e-6)
    np.testing.assert_allclose(obs[8:10], [0.35, -0.3], atol=1e-6)  # the commanded target
    assert np.linalg.norm(obs[6:8] - obs[8:10]) < 0.01  # the arm tracks the target
    for i, (xy, yaw) in enumerate(((10, 12), (13, 15))):
        x, y, angle = env.layout.targets[i]
        np.testing.assert_allclose(obs[xy:xy + 2], [x, y], atol=1e-6)
        assert obs[yaw] == pytest.approx(angle % math.pi, abs=1e-5)


def test_reset_draws_dps_layout(env):
    for seed in (0, 1, 100000):
        layout = initial_layout(seed)
        blocks, targets = layout.blocks, layout.targets
        assert abs(blocks[0, 0] - blocks[1, 0]) > 0.1  # DP compares x only
        assert np.all(np.abs(blocks[:, 0] - 0.4) <= 0.1)
        assert np.all(np.abs(blocks[:, 1] + 0.2) <= 0.15)
        assert np.all((blocks[:, 2] >= 1.0) & (blocks[:, 2] <= math.pi))
        np.testing.assert_allclose(np.sort(targets[:, 0]), [0.28, 0.52], atol=0.005)
        np.testing.assert_allclose(targets[:, 1], 0.2, atol=0.0075)
        np.testing.assert_allclose(targets[:, 2], math.pi, atol=math.pi / 30)
    rs = np.random.RandomState(7)  # DP's first draws: block x, block y, block yaw
    b0 = [0.4 + rs.uniform(-0.1, 0.1), -0.2 + rs.uniform(-0.15, 0.15), rs.uniform(math.pi)]
    np.testing.assert_array_equal(initial_layout(7).blocks[0], b0)
    obs, _ = env.reset(seed=7)
    np.testing.assert_allclose(obs[0:2], b0[:2], atol=2e-3)  # after 100 settling substeps
    np.testing.assert_allclose(obs[8:10], EFFECTOR_START, atol=1e-6)


def _rollout(env, seed, n_steps=25):
    obs, _ = env.reset(seed=seed)
    actions = np.random.default_rng(0).uniform([0.25, -0.4], [0.55, 0.1], size=(n_steps, 2))
    observations = [obs] + [env.step(a)[0] for a in actions]
    return np.array(observations)


def test_seeded_reset_is_deterministic_and_seeds_differ(env):
    first = _rollout(env, seed=3)
    np.testing.assert_array_equal(first, _rollout(env, seed=3))  # same env, again
    other = gym.make("BlockPushMultimodal-v0", disable_env_checker=True)
    np.testing.assert_array_equal(first, _rollout(other.unwrapped, seed=3))  # fresh env
    other.close()
    assert np.abs(first - _rollout(env, seed=4)).max() > 0.01
    assert np.abs(first[1:, 0:6] - first[0, 0:6]).max() > 1e-3  # the random walk pushed a block


def _settle(env, steps=2):
    """Step with the effector parked at its start, away from the blocks; returns rewards, info."""
    rewards = []
    for _ in range(steps):
        _, reward, terminated, _, info = env.step(np.array(EFFECTOR_START))
        rewards.append(reward)
    return rewards, terminated, info


def test_reward_events_first_block_then_both_in_distinct_targets(env):
    env.reset(seed=11)
    targets = env.layout.targets
    env.scene.place_block(0, targets[1, :2] + [0.02, 0.0])  # 2 cm off target 2's centre
    rewards, terminated, info = _settle(env)
    assert rewards == [0.49, 0.0] and not terminated
    assert info["total_reward"] == pytest.approx(0.49)
    assert info["target_0_1"] == 1 and info["first_in_target_step"] == 1
    env.scene.place_block(1, targets[0, :2] + [0.0, -0.03])
    rewards, terminated, info = _settle(env, steps=1)
    assert rewards == [0.51] and terminated and info["success"]
    assert info["total_reward"] == pytest.approx(1.0) and info["success_step"] == 3
    assert p1_p2(np.array([0.51]), [info])["p2"] == 1.0


def test_same_target_twice_and_outside_the_tolerance_do_not_count(env):
    env.reset(seed=12)
    target = env.layout.targets[0, :2]
    env.scene.place_block(0, target + [0.055, 0.0])  # 5.5 cm: outside the 5 cm tolerance
    rewards, _, info = _settle(env)
    assert rewards == [0.0, 0.0] and info["total_reward"] == 0.0
    env.scene.place_block(0, target + [0.025, 0.0])
    env.scene.place_block(1, target - [0.025, 0.0])  # both blocks in the same target
    rewards, terminated, info = _settle(env, steps=3)
    assert rewards == [0.49, 0.0, 0.0] and not terminated
    assert info["target_0_0"] == 3 and info["target_1_0"] == 3
    assert p1_p2(np.zeros(1), [info]) == {"p1": 1.0, "p2": 0.0, "mean_score": 0.49}


def test_delta_actions_move_the_target_by_the_action():
    env = gym.make("BlockPushMultimodalDelta-v0", disable_env_checker=True).unwrapped
    obs, _ = env.reset(seed=1)
    for _ in range(3):
        obs, *_ = env.step(np.array([0.01, 0.02]))
    np.testing.assert_allclose(obs[8:10], np.add(EFFECTOR_START, [0.03, 0.06]), atol=1e-6)
    env.close()


def test_env_rejects_bad_actions_and_renders(env):
    env.reset(seed=0)
    with pytest.raises(ValueError, match=r"action: expected shape \(2,\), got \(3,\)"):
        env.step(np.zeros(3))
    frame = env.render()
    assert frame.shape == (120, 160, 3) and frame.dtype == np.uint8
    assert frame.std() > 10  # a picture, not a blank buffer
    with pytest.raises(ValueError, match="render_size"):
        BlockPushMultimodalEnv(render_size=(64,))


@pytest.mark.parametrize("seed", [0, 100000])
def test_oracle_solves_both_blocks_into_distinct_targets(seed):
    ep = collect_episode(seed)
    assert ep["success"] and ep["metrics"] == {"p1": 1.0, "p2": 1.0}
    obs, action = ep["obs"], ep["action"]
    assert obs.dtype == action.dtype == np.float32
    assert obs.shape == (len(action), 16) and action.shape[1] == 2
    assert len(action) < 350
    # the recorded actions are the effector targets the next observation reports
    np.testing.assert_allclose(obs[1:, 8:10], action[:-1], atol=1e-6)
    assert ep["assignment"] == draw_assignment(seed)
    (b0, t0), (b1, t1) = ep["assignment"]  # the drawn block went to the drawn target first
    info = ep["final_info"]
    assert 0 < info[f"target_{b0}_{t0}"] == info["first_in_target_step"]
    assert info[f"target_{b0}_{t0}"] < info[f"target_{b1}_{t1}"] == info["success_step"]


def test_dart_demos_execute_noise_and_label_the_oracles_correction():
    sigma = 0.02
    ep = collect_episode(0, action_noise=sigma)
    obs, action = ep["obs"], ep["action"]
    executed = obs[1:, 8:10]  # the effector target the env actually ran after each label
    noise = executed - action[:-1]
    assert 0.5 * sigma < noise.std() < 1.5 * sigma and np.abs(noise.mean()) < sigma / 2
    # each label moves at most 3 cm from the target that was executed, so the oracle continued
    # from the perturbed state (from its own clean command it would be up to 3 cm + noise away)
    assert np.linalg.norm(action[1:] - executed, axis=1).max() <= 0.03 + 1e-5
    assert np.linalg.norm(action[1:] - action[:-1], axis=1).max() > 0.03 + 1e-3  # noise shows
    again = collect_episode(0, action_noise=sigma)  # seeded by the episode seed
    np.testing.assert_array_equal(again["action"], action)
    plain = collect_episode(0, action_noise=0.0)
    np.testing.assert_array_equal(plain["obs"], collect_episode(0)["obs"])
    with pytest.raises(ValueError, match="action_noise: expected sigma >= 0"):
        collect_episode(0, action_noise=-0.01)


def test_oracle_draws_all_four_assignments_across_seeds():
    drawn = [draw_assignment(seed) for seed in range(40)]
    counts = [drawn.count(a) for a in ASSIGNMENTS]
    assert min(counts) >= 5  # uniform over the 4 orders / pairings (40 draws)
    assert draw_assignment(3) == draw_assignment(3)


def test_oracle_travel_goes_around_blocks():
    oracle = MultimodalPushOracle(((0, 0), (1, 1)))
    obs = np.zeros(16, dtype=np.float32)
    obs[0:2], obs[3:5] = [0.4, -0.2], [0.2, -0.3]  # block 0 between effector and its pre-push
    obs[10:12], obs[13:15] = [0.4, 0.2], [0.3, 0.2]
    obs[6:8] = obs[8:10] = [0.4, 0.0]  # effector on the target side of block 0
    path = []
    while oracle.phase == "approach" and len(path) < 30:
        path.append(oracle.act(obs))
    dist = [np.linalg.norm(p - [0.4, -0.2]) for p in path]
    assert min(dist) > 0.055  # never through the block
    assert np.abs(np.diff(path, axis=0)).max() <= 0.03 + 1e-9  # at most 3 cm per step
    np.testing.assert_allclose(path[-1], [0.4, -0.265], atol=0.005)  # then pushes from behind
    assert oracle.phase == "push" and len(path) < 30


def test_metric_fn_against_hand_counts():
    totals = [0.0, 0.49, 1.0, 1.0, 0.49]
    results = [{"total_reward": t} for t in totals] + [{"error": "crashed"}]
    metrics = p1_p2(np.zeros(6), results)
    assert metrics == pytest.approx({"p1": 4 / 6, "p2": 2 / 6, "mean_score": 2.98 / 6})
    with pytest.raises(ValueError, match="rewards: expected 6"):
        p1_p2(np.zeros(5), results)


def test_demos_cli_writes_dps_layout(tmp_path, capsys):
    out = tmp_path / "bp.zarr"
    assert make_demos.main(["blockpush", "--episodes", "2", "--out", str(out),
                            "--workers", "1", "--seed", "3"]) == 0
    printed = capsys.readouterr().out
    assert "blockpush expert over 2 episodes: p1 1.000, p2 1.000" in printed
    buf = ReplayBuffer.load(out, keys=["obs", "action"])
    assert buf.n_episodes == 2
    ep = collect_episode(3)
    np.testing.assert_array_equal(buf["obs"][: len(ep["obs"])], ep["obs"])
    np.testing.assert_array_equal(buf["action"][: len(ep["action"])], ep["action"])
    noisy = tmp_path / "bp_dart.zarr"
    assert make_demos.main(["blockpush", "--episodes", "1", "--out", str(noisy),
                            "--workers", "1", "--seed", "3", "--action-noise", "0.01"]) == 0
    ep = collect_episode(3, action_noise=0.01)
    np.testing.assert_array_equal(ReplayBuffer.load(noisy, keys=["action"])["action"][:],
                                  ep["action"])


def test_task_config_trains_and_evaluates_with_p1_p2(tmp_path):
    buf = ReplayBuffer.empty()
    for seed in (0, 1, 2):
        ep = collect_episode(seed)
        buf.add_episode({"obs": ep["obs"], "action": ep["action"]})
    data = tmp_path / "bp.zarr"
    buf.save(data)
    cfg = compose("train_policy", [
        "task=blockpush_lowdim", "policy=drifting", "size=cpu", f"run_dir={tmp_path / 'run'}",
        f"task.dataset.path={data}", "task.dataset.val_ratio=0.34", "device=cpu",
        "logging.mode=disabled", "training.batch_size=8", "training.num_steps=4",
        "training.lr_warmup_steps=1", "training.checkpoint_every=4", "training.val_every=4",
        "training.rollout_every=4", "training.rollout.n_test=2", "training.rollout.n_videos=0",
        "task.runner.n_envs=1", "task.env.max_steps=6"])
    assert (cfg.task.n_obs_steps, cfg.task.n_action_steps, cfg.task.horizon) == (3, 1, 12)
    metrics = TrainWorkspace(cfg).run()
    assert {"test/p1", "test/p2", "test/mean_score", "val/loss"} <= set(metrics)
    assert metrics["test/p2"] == 0.0  # 6 steps cannot place both blocks
    runner = EnvRunner.from_task(cfg.task, n_test=1, n_envs=1)
    rewards = np.array([0.0, 0.49, 1.0])  # the config's metric name selects BlockPush's p1/p2
    assert runner.metric_fn(rewards, [{}] * 3) == p1_p2(rewards, [{}] * 3)
    assert runner.spec.max_steps == 6


def test_pybullet_is_in_direct_mode(env):
    env.reset(seed=0)
    assert env.scene.client.getConnectionInfo()["connectionMethod"] == pybullet.DIRECT


def test_connecting_prints_nothing_and_python_output_survives(capfd):
    env = BlockPushMultimodalEnv()
    print("before")
    env.reset(seed=0)
    env.reset(seed=1)
    print("after")
    env.close()
    assert capfd.readouterr().out == "before\nafter\n"  # no "argv[0]=" per connect


class _OraclePolicy:
    """The oracle behind the policy API the runner drives: obs {"obs": [N, To, 16]} ->
    {"action": [N, 1, 2]}; env i pushes in the order ASSIGNMENTS[i % 4]."""

    device = torch.device("cpu")

    def reset(self):
        self.oracles = {}

    def predict_action(self, obs_dict):
        obs = obs_dict["obs"][:, -1].numpy()
        actions = [self.oracles.setdefault(i, MultimodalPushOracle(ASSIGNMENTS[i % 4])).act(o)
                   for i, o in enumerate(obs)]
        return {"action": torch.as_tensor(np.array(actions), dtype=torch.float32)[:, None]}


def test_runner_scores_the_oracle_p1_p2_one_in_parallel_envs():
    cfg = compose("train_policy", ["task=blockpush_lowdim"])
    runner = EnvRunner.from_task(cfg.task, n_test=6, n_envs=2, n_videos=0)
    result = runner.run(_OraclePolicy(), progress=False)
    assert (result["p1"], result["p2"], result["mean_score"]) == (1.0, 1.0, 1.0)
    assert [r["seed"] for r in result["per_seed"]] == list(range(100000, 100006))
    for i, r in enumerate(result["per_seed"]):  # each episode took the mode it was given
        (b0, t0), (b1, t1) = ASSIGNMENTS[i % 2]  # env i % n_envs ran this seed
        assert r[f"target_{b0}_{t0}"] == r["first_in_target_step"] < r["success_step"]
        assert r[f"target_{b1}_{t1}"] == r["success_step"]
