"""PushT env (Diffusion Policy's conventions), its scripted expert and the demo writer."""

import json
import math
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest

import envs.pusht  # noqa: F401  (registers the gymnasium ids)
from drifting_policy.data import demos as make_demos
from envs.pusht.env import (
    BLOCK_KEYPOINTS,
    GOAL_POSE,
    T_BAR,
    T_STEM,
    PushTEnv,
    block_keypoints,
)
from envs.pusht.expert import collect_episode

QUICK_SEEDS = (8, 46, 79)  # seeds the expert solves in < 75 steps


def _rollout(env, seed, n_steps=40):
    """Observations and rewards under a fixed pseudo-random action sequence."""
    obs, _ = env.reset(seed=seed)
    actions = np.random.default_rng(0).uniform(100, 400, size=(n_steps, 2))
    observations, rewards = [obs], []
    for action in actions:
        obs, reward, *_ = env.step(action)
        observations.append(obs)
        rewards.append(reward)
    return np.array(observations), np.array(rewards)


def test_same_seed_same_trajectory_other_seed_differs():
    obs_a, rew_a = _rollout(PushTEnv(obs_type="keypoints"), seed=3)
    obs_b, rew_b = _rollout(PushTEnv(obs_type="keypoints"), seed=3)
    np.testing.assert_array_equal(obs_a, obs_b)
    np.testing.assert_array_equal(rew_a, rew_b)
    obs_c, _ = _rollout(PushTEnv(obs_type="keypoints"), seed=4)
    assert not np.allclose(obs_a, obs_c)


def test_reset_uses_diffusion_policys_initial_states():
    env = PushTEnv(obs_type="state")
    for seed in range(40):
        rs = np.random.RandomState(seed)  # DP's draw: agent xy, block xy, block angle
        agent = [rs.randint(50, 450), rs.randint(50, 450)]
        block = [rs.randint(100, 400), rs.randint(100, 400)]
        angle = rs.randn() * 2 * np.pi - np.pi
        _, info = env.reset(seed=seed)
        state = env.get_state()
        np.testing.assert_array_equal(state[:2], agent)  # the pusher is never pushed back
        assert 0 <= state[4] < 2 * np.pi
        if np.linalg.norm(np.subtract(agent, block)) > 150:  # pusher clear of the T
            np.testing.assert_allclose(info["block_pose"], [*block, angle], atol=1e-9)
    first, _ = env.reset()
    second, _ = env.reset()
    assert not np.array_equal(first, second)  # unseeded resets draw new layouts


def test_keypoint_obs_is_dp_dataset_construction():
    env = PushTEnv(obs_type="keypoints")
    obs, info = env.reset(seed=5)
    keypoints, states, observations = [], [], [obs]
    for action in np.random.default_rng(1).uniform(150, 350, size=(15, 2)):
        keypoints.append(block_keypoints(info["block_pose"]).astype(np.float32))
        states.append(env.get_state().astype(np.float32))
        obs, _, _, _, info = env.step(action)
        observations.append(obs)
    keypoint, state = np.stack(keypoints), np.stack(states)  # DP's zarr arrays
    dataset_obs = np.concatenate([keypoint.reshape(-1, 18), state[:, :2]], axis=-1)
    np.testing.assert_array_equal(np.stack(observations[:-1]), dataset_obs)
    assert obs.dtype == np.float32 and obs.shape == (20,)
    np.testing.assert_allclose(obs[18:], info["pos_agent"], atol=1e-4)


def test_block_keypoints_are_dps_farthest_point_samples():
    """Re-derive DP's keypoints: rasterise the T (angle 0 at (256, 300)) with DP's drawing,
    farthest-point-sample 9 covered pixels from a start drawn by default_rng(0), add its
    uniform(0, 1) jitter. Equality also shows our pygame drawing of the T matches DP's."""
    import pymunk

    from envs.pusht import render

    space = pymunk.Space()
    body = pymunk.Body(1, 1)
    body.position = (256, 300)
    space.add(body, pymunk.Poly(body, T_BAR.tolist()), pymunk.Poly(body, T_STEM.tolist()))
    ys, xs = np.nonzero((render.draw_space(space) != 255).any(-1))
    pixels = np.stack([xs, ys], -1) - np.array([256.0, 300.0])
    rng = np.random.default_rng(0)
    chosen = [pixels[rng.choice(len(pixels))]]
    while len(chosen) < 9:
        gaps = np.linalg.norm(pixels[:, None] - np.array(chosen)[None], axis=-1).min(1)
        chosen.append(pixels[np.argmax(gaps)])
    np.testing.assert_allclose(np.array(chosen) + rng.uniform(0, 1, (9, 2)), BLOCK_KEYPOINTS,
                               atol=1e-9)


def test_coverage_reward_and_termination():
    env = PushTEnv(obs_type="state")
    _, info = env.reset_to_state([100, 100, *GOAL_POSE])
    assert info["coverage"] == pytest.approx(1.0)
    _, reward, terminated, truncated, info = env.step([100, 100])
    assert info["coverage"] > 0.999 and reward == 1.0 and terminated and not truncated

    env.reset_to_state([400, 400, 120, 400, 0.0])
    _, reward, terminated, _, info = env.step([400, 400])
    assert info["coverage"] < 0.05 and reward < 0.06 and not terminated
    for key in ("pos_agent", "vel_agent", "block_pose", "goal_pose", "n_contacts", "coverage"):
        assert key in info
    np.testing.assert_allclose(info["goal_pose"], [256, 256, math.pi / 4])


def test_pushing_counts_contacts():
    env = PushTEnv(obs_type="state")
    env.reset_to_state([256, 200, 256, 300, 0.0])  # pusher above the T's bar
    contacts = [env.step([256, 330])[4]["n_contacts"] for _ in range(5)]
    assert max(contacts) > 0
    assert env.get_state()[3] > 305  # the block was pushed down


@pytest.mark.parametrize("env_id", ["PushT-v0", "PushTState-v0"])
def test_episode_ends_at_300_steps(env_id):
    env = gym.make(env_id)
    env.reset(seed=0)
    park = env.unwrapped.get_state()[:2]  # hold still: nothing happens, no success
    steps, truncated = 0, False
    while not truncated and steps < 400:
        _, _, terminated, truncated, _ = env.step(park)
        assert not terminated
        steps += 1
    assert steps == 300


def test_images_are_dp_like_and_follow_the_block():
    env = gym.make("PushTImage-v0")
    obs, _ = env.reset(seed=0)
    image = obs["image"]
    assert image.shape == (3, 96, 96) and image.dtype == np.float32
    assert 0.0 <= image.min() and image.max() <= 1.0 and image.std() > 0.05
    assert obs["agent_pos"].shape == (2,) and obs["agent_pos"].dtype == np.float32
    frame = env.render()
    assert frame.shape == (96, 96, 3) and frame.dtype == np.uint8
    np.testing.assert_array_equal(frame, np.moveaxis(np.round(image * 255), 0, -1))
    assert (frame == 255).all(-1).mean() > 0.5  # white background
    assert (frame == [144, 238, 144]).all(-1).any()  # DP's light-green goal T

    moved, _ = env.unwrapped.reset_to_state([400, 400, 150, 150, 1.0])
    assert np.abs(moved["image"] - image).max() > 0.5
    big = PushTEnv(obs_type="state", render_size=256)
    big.reset(seed=0)
    big.step([250, 250])
    frame = big.render()
    assert frame.shape == (256, 256, 3)
    assert (frame == [255, 0, 0]).all(-1).any()  # the action marker


def test_expert_solves_seeds():
    for seed in QUICK_SEEDS:
        episode = collect_episode(seed, obs_types=("keypoints", "state"))
        assert episode["success"], f"seed {seed}: coverage {episode['coverage_max']:.3f}"
        n = len(episode["action"])
        assert n < 300 and episode["coverage_max"] > 0.95
        assert episode["state"].shape == (n, 5) and episode["keypoint"].shape == (n, 9, 2)
        assert episode["n_contacts"].shape == (n, 1) and episode["action"].dtype == np.float32
        assert "img" not in episode


def test_demo_cli_writes_dp_zarr_v2(tmp_path: Path, capsys):
    out = tmp_path / "demos" / "pusht.zarr"
    seed = QUICK_SEEDS[0]
    argv = ["pusht", "--episodes", "2", "--seed", str(seed), "--out", str(out)]
    assert make_demos.main([*argv, "--workers", "2"]) == 0
    assert "2/2" in capsys.readouterr().out

    for meta_file in (".zgroup", "data/.zgroup", "meta/.zgroup", "meta/episode_ends/.zarray"):
        assert (out / meta_file).is_file()
    shapes = {"img": (96, 96, 3), "state": (5,), "keypoint": (9, 2), "action": (2,),
              "n_contacts": (1,)}
    lengths = set()
    for key, tail in shapes.items():
        zarray = json.loads((out / "data" / key / ".zarray").read_text())
        assert zarray["zarr_format"] == 2 and zarray["dtype"] == "<f4"
        assert tuple(zarray["shape"][1:]) == tail and tuple(zarray["chunks"][1:]) == tail
        lengths.add(zarray["shape"][0])
    zarr = pytest.importorskip("zarr")
    root = zarr.open_group(str(out), mode="r")
    ends = root["meta/episode_ends"][:]
    assert ends.dtype == np.int64 and len(ends) == 2 and lengths == {int(ends[-1])}
    first = collect_episode(seed, obs_types=("state",))
    assert ends[0] == len(first["action"])  # seed order, same episodes as in-process
    np.testing.assert_array_equal(root["data/state"][: ends[0]], first["state"])
    img = root["data/img"][: ends[0]]
    assert img.min() >= 0 and img.max() == 255 and img.std() > 10

    # an existing path is refused (exit code 2) and left alone; --force replaces it
    before = sorted(p.relative_to(out) for p in out.rglob("*"))
    assert make_demos.main(argv) == 2
    assert "--force" in capsys.readouterr().err
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == before
    argv[2] = "1"
    assert make_demos.main([*argv, "--workers", "1", "--force"]) == 0
    assert len(zarr.open_group(str(out), mode="r")["meta/episode_ends"][:]) == 1
    assert [p.name for p in out.parent.iterdir()] == ["pusht.zarr"]  # no temporaries left
