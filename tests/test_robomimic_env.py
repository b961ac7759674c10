"""robomimic tasks on robosuite 1.5: env conventions, env_args translation, rendering across
resets, scripted experts, absolute-action replay and train-initial-state rollouts."""

import gc

import gymnasium as gym
import numpy as np
import pytest
import torch
from scipy.spatial.transform import Rotation

import envs.robomimic  # noqa: F401  (registers the gymnasium ids)
from drifting_policy.rollout.runner import EnvRunner
from envs.robomimic import env_args as ea
from envs.robomimic.env import RobomimicEnv, initial_states, make_env_from_env_args
from envs.robomimic.expert import collect_lift

SEED = 0

# A robomimic v0.1 (robosuite 1.2-1.4) env_args as stored in lift/ph/image.hdf5.
OLD_LIFT_IMAGE_ARGS = {
    "env_name": "Lift", "type": 1, "env_version": "1.4.1",
    "env_kwargs": {
        "has_renderer": False, "has_offscreen_renderer": True, "ignore_done": True,
        "use_object_obs": True, "use_camera_obs": True, "control_freq": 20,
        "controller_configs": {
            "type": "OSC_POSE", "input_max": 1, "input_min": -1,
            "output_max": [0.05, 0.05, 0.05, 0.5, 0.5, 0.5],
            "output_min": [-0.05, -0.05, -0.05, -0.5, -0.5, -0.5],
            "kp": 150, "damping": 1, "impedance_mode": "fixed", "kp_limits": [0, 300],
            "damping_limits": [0, 10], "position_limits": None, "orientation_limits": None,
            "uncouple_pos_ori": True, "control_delta": True, "interpolation": None,
            "ramp_ratio": 0.2,
        },
        "robots": ["Panda"], "camera_depths": False, "camera_heights": 84, "camera_widths": 84,
        "reward_shaping": False, "camera_names": ["agentview", "robot0_eye_in_hand"],
    },
}


@pytest.fixture(scope="module")
def lift_env():
    env = gym.make("RobomimicLift-v0", disable_env_checker=True).unwrapped
    yield env
    env.close()


@pytest.fixture(scope="module")
def demo():
    """One delta-action Lift demo by the scripted expert."""
    return collect_lift(SEED)


def test_lowdim_observation_is_the_obs_keys_concatenated(lift_env):
    obs, info = lift_env.reset(seed=1)
    raw = lift_env.raw_obs
    expected = np.concatenate([raw[k] for k in ea.LOWDIM_KEYS]).astype(np.float32)
    assert obs.shape == (19,) == lift_env.observation_space.shape and obs.dtype == np.float32
    np.testing.assert_array_equal(obs, expected)
    assert {k: raw[k].shape for k in ea.LOWDIM_KEYS} == {
        "object": (10,), "robot0_eef_pos": (3,), "robot0_eef_quat": (4,),
        "robot0_gripper_qpos": (2,)}
    # object-state starts with the cube position; eef quat is a unit (x, y, z, w) quaternion
    cube = lift_env.sim_env.sim.data.body_xpos[lift_env.sim_env.cube_body_id]
    np.testing.assert_allclose(raw["object"][:3], cube, atol=1e-9)
    assert np.linalg.norm(raw["robot0_eef_quat"]) == pytest.approx(1.0, abs=1e-6)
    assert lift_env.action_space.shape == (7,) and info == {"success": False}


def test_seeded_reset_is_deterministic(lift_env):
    lift_env.reset(seed=11)
    first = lift_env.get_state()
    lift_env.reset(seed=12)
    other = lift_env.get_state()
    lift_env.step(np.zeros(7))
    lift_env.reset(seed=11)
    np.testing.assert_array_equal(lift_env.get_state(), first)
    assert np.abs(other - first).max() > 1e-3  # another seed, another layout


def test_reset_to_stored_state_reproduces_the_stored_observation(lift_env, demo):
    # after a step robosuite's observations lag the state by one 2 ms physics substep (they
    # are read before the last mj_step's kinematics update): < 1 mm; at reset they are exact
    for t, atol in ((0, 1e-9), (len(demo["actions"]) // 2, 1e-3)):
        obs, _ = lift_env.reset(options={"state": demo["states"][t]})
        np.testing.assert_array_equal(lift_env.get_state(), demo["states"][t])
        for key in ea.LOWDIM_KEYS:
            np.testing.assert_allclose(lift_env.raw_obs[key], demo["obs"][key][t], atol=atol,
                                       err_msg=key)
    with pytest.raises(ValueError, match="options\\['state'\\].*length 32.*got 5"):
        lift_env.reset(options={"state": np.zeros(5)})


def test_a_demo_replays_exactly_from_its_stored_first_state(lift_env, demo):
    """Resetting to a stored state must also restore what lives outside the MuJoCo state: the
    OSC nullspace target and the observables' sampling phase (both were left as the preceding
    random reset made them: 4e-3 m of end-effector drift after 20 steps)."""
    lift_env.reset(seed=SEED + 7)  # another layout and other arm joints first
    lift_env.reset(options={"state": demo["states"][0]})
    controller = lift_env.sim_env.robots[0].composite_controller.part_controllers["right"]
    np.testing.assert_array_equal(controller.initial_joint,
                                  lift_env.sim_env.sim.data.qpos[controller.qpos_index])
    nq = lift_env.sim_env.sim.model.nq
    for t, action in enumerate(demo["actions"]):
        for key in ea.LOWDIM_KEYS:
            np.testing.assert_allclose(lift_env.raw_obs[key], demo["obs"][key][t], atol=1e-5,
                                       rtol=0, err_msg=f"{key} at step {t}")
        np.testing.assert_allclose(lift_env.get_state()[1:1 + nq], demo["states"][t][1:1 + nq],
                                   atol=1e-5, rtol=0, err_msg=f"qpos at step {t}")
        _, _, terminated, _, info = lift_env.step(action)
    assert info["success"] and terminated


def test_lift_expert_succeeds_with_robomimic_episode_layout(demo):
    t = len(demo["actions"])
    assert demo["success"] and 20 < t < 100
    assert demo["actions"].shape == (t, 7) and np.abs(demo["actions"]).max() <= 1.0
    assert demo["states"].shape == (t, 32) and demo["obs"]["object"].shape == (t, 10)
    assert demo["dones"].tolist() == [0] * (t - 1) + [1] and demo["rewards"][-1] == 1.0
    assert demo["rewards"][:-1].sum() == 0  # the episode ends at the first success
    assert demo["env_args"]["env_name"] == "Lift" and "<mujoco" in demo["model_file"]
    other = collect_lift(SEED + 1)
    assert not np.allclose(other["actions"][:10], demo["actions"][:10])  # seeded variation


def test_absolute_actions_replay_the_delta_episode(demo):
    ep = collect_lift(SEED, abs=True)
    np.testing.assert_array_equal(ep["obs"]["robot0_eef_pos"], demo["obs"]["robot0_eef_pos"])
    assert ep["actions"].shape == (len(demo["actions"]), 10)
    env = make_env_from_env_args(ep["env_args"])
    try:
        assert env.abs_actions and env.action_space.shape == (10,)
        env.reset(seed=SEED)
        np.testing.assert_array_equal(env.get_state(), ep["states"][0])
        path = []
        for action in ep["actions"]:
            _, reward, terminated, _, info = env.step(action)
            path.append(env.raw_obs["robot0_eef_pos"])
        np.testing.assert_allclose(path[:-1], ep["obs"]["robot0_eef_pos"][1:], atol=1e-4)
        assert info["success"] and terminated and reward == 1.0
    finally:
        env.close()


def test_absolute_rotation_6d_reaches_robosuite_controller_as_the_same_matrix():
    env = RobomimicEnv("lift", abs_actions=True)
    try:
        env.reset(seed=3)
        controller = env.sim_env.robots[0].composite_controller.part_controllers["right"]
        rng = np.random.default_rng(0)
        for rotvec in Rotation.random(3, random_state=1).as_rotvec():
            target = Rotation.from_rotvec(rotvec).as_matrix()
            pos = env.raw_obs["robot0_eef_pos"] + rng.uniform(-0.01, 0.01, 3)
            # rotation-6d = first two rows; scale the rows to check the Gram-Schmidt step too
            rot6d = np.concatenate([2.0 * target[0], 0.5 * target[1] + 0.1 * target[0]])
            env.step(np.concatenate([pos, rot6d, [-1.0]]))
            np.testing.assert_allclose(controller.goal_ori, target, atol=1e-6)
            np.testing.assert_allclose(controller.goal_pos, pos, atol=1e-6)
        with pytest.raises(ValueError, match="action: expected shape \\(10,\\)"):
            env.step(np.zeros(7))
    finally:
        env.close()


def test_envs_import_no_drifting_policy_code():
    """The dependency runs drifting_policy -> envs only: the simulators, experts and their
    action conversions load without the policy package."""
    import subprocess
    import sys

    modules = ["envs.robomimic.env", "envs.robomimic.expert", "envs.robomimic.rotation",
               "envs.kitchen.env", "envs.kitchen.expert",
               "envs.kitchen.metrics"]
    code = ("import importlib, sys\n"
            f"for m in {modules!r}: importlib.import_module(m)\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] == 'drifting_policy'))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip().splitlines()[-1] == "[]"


def test_old_env_args_translate_to_robosuite_1_5():
    name, kwargs = ea.robosuite_kwargs(OLD_LIFT_IMAGE_ARGS)
    right = kwargs["controller_configs"]["body_parts"]["right"]
    assert name == "Lift" and kwargs["controller_configs"]["type"] == "BASIC"
    assert right["type"] == "OSC_POSE" and right["input_type"] == "delta"
    assert right["input_ref_frame"] == "world" and right["damping_ratio"] == 1
    assert right["damping_ratio_limits"] == [0, 10] and right["kp"] == 150
    assert "damping" not in right and "control_delta" not in right
    assert right["gripper"] == {"type": "GRIP"}
    assert kwargs["camera_names"] == ["agentview", "robot0_eye_in_hand"]
    assert (kwargs["camera_heights"], kwargs["hard_reset"], kwargs["lite_physics"]) == (84, 0, 0)
    old_abs = {**OLD_LIFT_IMAGE_ARGS, "env_kwargs": {
        **OLD_LIFT_IMAGE_ARGS["env_kwargs"],
        "controller_configs": {**OLD_LIFT_IMAGE_ARGS["env_kwargs"]["controller_configs"],
                               "control_delta": False}}}
    assert ea.is_absolute(ea.robosuite_kwargs(old_abs)[1])
    _, small = ea.robosuite_kwargs(OLD_LIFT_IMAGE_ARGS, image=False, abs_actions=True,
                                   camera_size=64)
    assert not small["use_camera_obs"] and ea.is_absolute(small) and small["camera_widths"] == 64
    # our own files' env_args (robosuite 1.5 layout) translate to themselves
    ours = ea.make_env_args("can", image=True, abs_actions=True)
    assert ea.robosuite_kwargs(ours)[1]["controller_configs"] == \
        ours["env_kwargs"]["controller_configs"]
    bad = {**OLD_LIFT_IMAGE_ARGS, "env_kwargs": {"controller_configs": {"type": "JOINT_POSITION"}}}
    with pytest.raises(ValueError, match="controller_configs.type.*OSC_POSE.*JOINT_POSITION"):
        ea.robosuite_kwargs(bad)
    with pytest.raises(ValueError, match="env_name.*'Square'"):
        ea.robosuite_kwargs({**OLD_LIFT_IMAGE_ARGS, "env_name": "Square"})


def test_frames_stay_valid_across_resets_and_garbage_collection():
    """robosuite's silent-garbage bug: after a reset and gc, renders came back as noise/black."""
    env = make_env_from_env_args(OLD_LIFT_IMAGE_ARGS, render_size=96)
    try:
        assert env.image_keys == ("agentview_image", "robot0_eye_in_hand_image")
        first, _ = env.reset(seed=5)
        first_frame = env.render()
        for seed in (6, 7):
            env.reset(seed=seed)
            env.step(np.zeros(7))
            gc.collect()
        again, _ = env.reset(seed=5)
        gc.collect()
        assert again["agentview_image"].shape == (3, 84, 84)
        for key in env.image_keys:
            image = again[key]
            assert 0.0 <= image.min() and image.max() <= 1.0 and image.std() > 0.05, key
            assert np.abs(image - first[key]).max() <= 2 / 255, key
        frame = env.render()
        assert frame.shape == (96, 96, 3) and frame.dtype == np.uint8 and frame.std() > 10
        assert np.abs(frame.astype(int) - first_frame).max() <= 2
        # upright like robomimic's files: the table (bright) fills the lower half of agentview
        agent = again["agentview_image"].mean(axis=0)
        assert agent[60:].mean() > agent[:20].mean()
    finally:
        env.close()


class ReplayPolicy:
    """Plays back a fixed action sequence in chunks of n_action_steps (then holds still)."""

    device = torch.device("cpu")

    def __init__(self, actions: np.ndarray, n_action_steps: int):
        self.actions, self.n = actions, n_action_steps

    def reset(self):
        self.t = 0

    def predict_action(self, obs_dict, n_samples=1):
        chunk = self.actions[self.t : self.t + self.n]
        self.t += self.n
        hold = np.zeros((self.n - len(chunk), 7))
        chunk = np.concatenate([chunk, hold]) if len(chunk) else hold
        return {"action": torch.as_tensor(chunk, dtype=torch.float32)[None]}


def test_runner_rolls_out_train_states_apart_from_test_seeds(tmp_path, demo):
    from drifting_policy.data.robomimic_hdf5 import write_hdf5

    path = tmp_path / "lift.hdf5"
    write_hdf5(path, [demo])
    np.testing.assert_array_equal(initial_states(1, str(path))[0], demo["states"][0])
    runner = EnvRunner(
        env={"id": "RobomimicLift-v0", "max_steps": 80},
        n_obs_steps=2, n_action_steps=8, n_test=1, n_envs=1, n_train=1,
        train_states={"source": "robomimic", "path": str(path)})
    result = runner.run(ReplayPolicy(demo["actions"], 8), progress=False)
    # the demo's actions from the demo's first state succeed again
    assert result["train/mean_score"] == 1.0 and result["per_train"][0]["train_index"] == 0
    assert result["per_train"][0]["success"] is True
    assert result["n_test"] == 1 and result["per_seed"][0]["seed"] == 100_000
    with pytest.raises(ValueError, match="at least n_train=2 states, got 1"):
        EnvRunner(env={"id": "RobomimicLift-v0"}, n_obs_steps=2, n_action_steps=8,
                  n_train=2, train_states=[demo["states"][0]])


@pytest.mark.slow
def test_can_expert_places_the_can_and_abs_actions_replay_it():
    from envs.robomimic.expert import collect_can

    ep = collect_can(4, abs=True)
    assert ep["success"] and ep["actions"].shape[1] == 10 and len(ep["actions"]) < 250
    env = make_env_from_env_args(ep["env_args"])
    try:
        env.reset(seed=4)
        for action in ep["actions"]:
            _, _, _, _, info = env.step(action)
        assert info["success"]
    finally:
        env.close()


@pytest.mark.slow
def test_tool_hang_expert_assembles_the_frame_and_hangs_the_tool():
    from envs.robomimic.expert import collect_tool_hang

    ep = collect_tool_hang(0)
    assert ep["metrics"] == {"success": 1.0, "frame_assembled": 1.0}
    assert ep["success"] and ep["dones"][-1] == 1 and len(ep["actions"]) <= 700
    assert ep["obs"]["object"].shape[1] == 44 and ep["env_args"]["env_name"] == "ToolHang"
