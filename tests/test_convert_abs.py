"""`drifting-policy convert-abs`: robomimic delta actions -> absolute OSC targets, checked against
the controller's formula, by executing them with absolute control, and with robomimic's reader."""

import json

import h5py
import numpy as np
import pytest
from scipy.spatial.transform import Rotation

from drifting_policy.cli import main as cli
from drifting_policy.data.convert_abs import convert_file, replay_deviation
from drifting_policy.data.robomimic_hdf5 import action_mode, load_replay, write_hdf5
from envs.robomimic import env_args as ea
from envs.robomimic.env import RobomimicEnv, make_env_from_env_args
from envs.robomimic.expert import collect_lift
from envs.robomimic.rotation import abs_action_7_to_10

SEEDS = (0, 1)
POS_LIMIT, ROT_LIMIT = 0.05, 0.5  # OSC output limits of one unit of delta action


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """A two-demo Lift file with delta actions, its episodes, and its absolute conversion."""
    root = tmp_path_factory.mktemp("convert_abs")
    episodes = [collect_lift(seed) for seed in SEEDS]
    src, dst = root / "lift_delta.hdf5", root / "lift_abs.hdf5"
    write_hdf5(src, episodes)
    assert cli(["convert-abs", str(src), str(dst)]) == 0
    return src, dst, episodes


def test_absolute_actions_are_the_controller_goals_of_the_deltas(converted):
    """Independent computation: goal = grip-site pose at the stored state moved by the clipped,
    scaled delta (world frame), read off MuJoCo directly."""
    _, dst, episodes = converted
    env = RobomimicEnv("lift")
    site = env.sim_env.robots[0].eef_site_id["right"]
    data = env.sim_env.sim.data
    try:
        with h5py.File(dst, "r") as f:
            for i, ep in enumerate(episodes):
                absolute = f[f"data/demo_{i}/actions"][()]
                assert absolute.shape == (len(ep["actions"]), 7) and absolute.dtype == np.float64
                np.testing.assert_array_equal(absolute[:, 6], ep["actions"][:, 6])
                for t in range(0, len(absolute), 5):
                    env.sim_env.sim.set_state_from_flattened(ep["states"][t])
                    env.sim_env.sim.forward()
                    delta = np.clip(ep["actions"][t], -1, 1)
                    pos = data.site_xpos[site] + POS_LIMIT * delta[:3]
                    rot = (Rotation.from_rotvec(ROT_LIMIT * delta[3:6])
                           * Rotation.from_matrix(data.site_xmat[site].reshape(3, 3)))
                    np.testing.assert_allclose(absolute[t, :3], pos, atol=1e-9)
                    gap = Rotation.from_rotvec(absolute[t, 3:6]) * rot.inv()
                    assert gap.magnitude() < 1e-6  # robosuite's quat2mat rounds to float32
    finally:
        env.close()


def test_absolute_control_reproduces_the_delta_rollout(converted):
    """The converted actions, executed with absolute control (as 10-d rotation-6d actions)
    from the demo's first state, retrace the delta rollout and the recorded demo."""
    src, dst, episodes = converted
    with h5py.File(dst, "r") as f:
        env_args = json.loads(f["data"].attrs["env_args"])
        absolute = [f[f"data/demo_{i}/actions"][()] for i in range(len(episodes))]
    for ep, actions in zip(episodes, absolute):
        gap = replay_deviation(ep["env_args"], ep["states"][0], ep["actions"], actions)
        assert gap["steps"] == len(actions)
        assert gap["pos"] < 1e-5 and gap["rot"] < 1e-4, gap
    # the converted file's own env_args build the absolute env, which succeeds from the stored
    # first state and follows the recorded end-effector path
    env = make_env_from_env_args(env_args)
    try:
        assert env.abs_actions and env.action_space.shape == (10,)
        ep, actions = episodes[0], absolute[0]
        env.reset(options={"state": ep["states"][0]})
        for t, action in enumerate(abs_action_7_to_10(actions)):
            np.testing.assert_allclose(env.raw_obs["robot0_eef_pos"],
                                       ep["obs"]["robot0_eef_pos"][t], atol=1e-5,
                                       err_msg=f"step {t}")
            _, _, _, _, info = env.step(action)
        assert info["success"]
    finally:
        env.close()


def test_everything_but_actions_and_env_args_is_copied(converted):
    src, dst, _ = converted
    with h5py.File(src, "r") as a, h5py.File(dst, "r") as b:
        assert sorted(a) == sorted(b) and sorted(a["data"]) == sorted(b["data"])
        assert a["data"].attrs["total"] == b["data"].attrs["total"]
        for key in ("train", "valid"):
            assert a[f"mask/{key}"][()].tolist() == b[f"mask/{key}"][()].tolist()
        for name in a["data"]:
            demo_a, demo_b = a[f"data/{name}"], b[f"data/{name}"]
            assert demo_a.attrs["model_file"] == demo_b.attrs["model_file"]
            for key in ("states", "rewards", "dones", "obs/object", "next_obs/robot0_eef_pos"):
                np.testing.assert_array_equal(demo_a[key][()], demo_b[key][()])
        old = json.loads(a["data"].attrs["env_args"])
        new = json.loads(b["data"].attrs["env_args"])
    assert action_mode(old) == "delta" and action_mode(new) == "abs"
    right = new["env_kwargs"]["controller_configs"]["body_parts"]["right"]
    assert (right["input_type"], right["input_ref_frame"]) == ("absolute", "world")
    new["env_kwargs"]["controller_configs"] = old["env_kwargs"]["controller_configs"] = None
    assert new == old  # nothing else in env_args changed


def test_readers_open_the_converted_file(converted):
    import robomimic.utils.file_utils as file_utils
    import robomimic.utils.obs_utils as obs_utils
    from robomimic.utils.dataset import SequenceDataset as RobomimicSequenceDataset

    _, dst, _ = converted
    meta = file_utils.get_env_metadata_from_dataset(str(dst))
    assert meta["env_kwargs"]["controller_configs"]["body_parts"]["right"]["input_type"] == \
        "absolute"
    keys = list(ea.LOWDIM_KEYS)
    obs_utils.initialize_obs_utils_with_obs_specs({"obs": {"low_dim": keys}})
    shape = file_utils.get_shape_metadata_from_dataset(str(dst), all_obs_keys=keys)
    assert shape["ac_dim"] == 7
    with h5py.File(dst, "r") as f:
        expected = f["data/demo_0/actions"][:3]
    theirs = RobomimicSequenceDataset(str(dst), obs_keys=keys, dataset_keys=("actions",),
                                      seq_length=3, hdf5_cache_mode=None)
    np.testing.assert_allclose(theirs[0]["actions"], expected)
    theirs.hdf5_file.close()
    # our reader: 10-d absolute actions (position, rotation-6d, gripper) only with abs_action
    buf = load_replay(dst, keys, abs_action=True)
    assert buf["action"].shape[1] == 10
    with pytest.raises(ValueError, match="stores absolute actions"):
        load_replay(dst, keys, abs_action=False)


def test_absolute_env_args_in_both_file_layouts():
    old = {"env_name": "Lift", "type": 1, "env_kwargs": {"controller_configs": {
        "type": "OSC_POSE", "control_delta": True, "kp": 150}}}
    converted = ea.absolute_env_args(old)
    assert converted["env_kwargs"]["controller_configs"]["control_delta"] is False
    assert old["env_kwargs"]["controller_configs"]["control_delta"] is True  # a copy
    assert action_mode(converted) == "abs" and ea.is_absolute(ea.robosuite_kwargs(converted)[1])
    ours = ea.absolute_env_args(ea.make_env_args("can"))
    assert ea.is_absolute(ea.robosuite_kwargs(ours)[1]) and action_mode(ours) == "abs"
    with pytest.raises(ValueError, match="controller_configs.type.*OSC_POSE"):
        ea.absolute_env_args({**old, "env_kwargs": {"controller_configs": {"type": "JOINT"}}})


def test_bad_input_fails_clearly_and_writes_nothing(converted, tmp_path, capsys):
    src, dst, episodes = converted
    out = tmp_path / "out.hdf5"
    # an absolute file is refused
    assert cli(["convert-abs", str(dst), str(out)]) == 2
    assert "already says absolute" in capsys.readouterr().err and not out.exists()
    # an existing output is kept without --force
    out.write_bytes(b"keep")
    assert cli(["convert-abs", str(src), str(out)]) == 2
    assert "--force" in capsys.readouterr().err and out.read_bytes() == b"keep"
    # a demo whose states do not fit the env: one clear error, the old output untouched
    bad = tmp_path / "bad.hdf5"
    ep = dict(episodes[0], states=episodes[0]["states"][:, :5])
    write_hdf5(bad, [ep])
    with pytest.raises(ValueError, match="length 32.*got 5"):
        convert_file(bad, out)
    assert out.read_bytes() == b"keep" and sorted(p.name for p in tmp_path.iterdir()) == \
        ["bad.hdf5", "out.hdf5"]
    assert cli(["convert-abs", str(src), str(out), "--force"]) == 0
    with h5py.File(out, "r") as f:
        assert f["data/demo_0/actions"].shape == (len(episodes[0]["actions"]), 7)
