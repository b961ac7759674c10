"""robomimic HDF5: our writer (checked with robomimic's own readers), the reader and datasets
(delta / absolute actions, Diffusion Policy's normalisation), the image cache, the task configs."""

from __future__ import annotations

import inspect
import json
import mmap
import os
import shutil

import h5py
import numpy as np
import pytest
import torch
from scipy.spatial.transform import Rotation

from drifting_policy.config import compose
from drifting_policy.data.dataset import SequenceDataset
from drifting_policy.data.robomimic_hdf5 import action_mode, load_replay, write_hdf5
from drifting_policy.data.sampler import create_indices
from drifting_policy.rollout.runner import EnvRunner
from envs.robomimic.rotation import abs_action_7_to_10, abs_action_10_to_7

pytestmark = pytest.mark.usefixtures("single_thread")

LOWDIM = ["object", "robot0_eef_pos", "robot0_eef_quat", "robot0_gripper_qpos"]
LOWDIM_SCHEMA = {"obs": LOWDIM}
IMAGE_SCHEMA = {
    "obs_keys": {k: [k] for k in LOWDIM[1:]},
    "rgb_keys": {"agentview_image": "agentview_image",
                 "robot0_eye_in_hand_image": "robot0_eye_in_hand_image"},
}
WINDOW = dict(horizon=16, pad_before=1, pad_after=7)


def env_args(abs_actions: bool = False, old: bool = False) -> dict:
    """robomimic env_meta: robosuite 1.4 (flat OSC config with control_delta, as in the v141
    release and Diffusion Policy's *_abs files) or 1.5 (composite config with input_type)."""
    if old:
        controller = {"type": "OSC_POSE", "input_max": 1, "input_min": -1, "kp": 150,
                      "control_delta": not abs_actions, "uncouple_pos_ori": True}
        return {"env_name": "Lift", "env_version": "1.4.1", "type": 1,
                "env_kwargs": {"has_renderer": False, "use_camera_obs": False,
                               "control_freq": 20, "controller_configs": controller,
                               "robots": ["Panda"]}}
    right = {"type": "OSC_POSE", "input_type": "absolute" if abs_actions else "delta",
             "input_ref_frame": "world"}
    return {"env_name": "Lift", "env_version": "1.5.2", "type": 1,
            "env_kwargs": {"controller_configs": {"type": "BASIC", "body_parts": {"right": right}},
                           "robots": ["Panda"], "control_freq": 20}}


def episode(rng, length: int, image: bool = False, abs_actions: bool = False) -> dict:
    """A synthetic episode in the collectors' format (Lift keys and sizes)."""
    obs = {"object": rng.normal(size=(length, 10)),
           "robot0_eef_pos": rng.normal([0.0, 0.0, 1.0], 0.1, size=(length, 3)),
           "robot0_eef_quat": Rotation.random(length, random_state=rng).as_quat(),
           "robot0_gripper_qpos": rng.uniform(-0.04, 0.04, size=(length, 2)),
           "robot0_joint_pos": rng.normal(size=(length, 7))}
    if image:
        for key in IMAGE_SCHEMA["rgb_keys"]:
            obs[key] = rng.integers(0, 256, (length, 84, 84, 3), dtype=np.uint8)
    if abs_actions:
        rot6d = Rotation.random(length, random_state=rng).as_matrix()[:, :2].reshape(length, 6)
        actions = np.concatenate([rng.normal(size=(length, 3)), rot6d,
                                  rng.choice([-1.0, 1.0], (length, 1))], axis=1)
    else:
        actions = rng.uniform(-1, 1, (length, 7))
    dones = np.zeros(length)
    dones[-1] = 1
    return {"obs": obs, "actions": actions, "rewards": dones.copy(), "dones": dones,
            "states": rng.normal(size=(length, 32)), "model_file": "<mujoco model='lift'/>",
            "env_args": env_args(abs_actions), "success": True, "metrics": {"success": 1.0}}


def episodes(n: int, seed: int = 0, **kwargs) -> list[dict]:
    rng = np.random.default_rng(seed)
    return [episode(rng, 17 + 3 * i, **kwargs) for i in range(n)]


@pytest.fixture(scope="module")
def lowdim_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("rm") / "lift_lowdim.hdf5"
    eps = episodes(12)
    assert write_hdf5(path, iter(eps)) == 12
    return path, eps


@pytest.fixture(scope="module")
def image_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("rm") / "lift_image.hdf5"
    eps = episodes(4, seed=1, image=True)
    assert write_hdf5(path, iter(eps), image=True) == 4
    return path, eps


def write_v141(path, eps, abs_actions=False):
    """The layout of robomimic's public v141 files, written with h5py directly (not our
    writer): uncompressed, extra observation keys, 1.4 env_args, masks incl. 20_percent."""
    with h5py.File(path, "w") as f:
        data = f.create_group("data")
        for i, ep in enumerate(eps):
            g = data.create_group(f"demo_{i}")
            for key, value in ep["obs"].items():
                g.create_dataset(f"obs/{key}", data=value)
                g.create_dataset(f"next_obs/{key}", data=np.concatenate([value[1:], value[-1:]]))
            actions = ep["actions"]
            if abs_actions:  # Diffusion Policy's *_abs.hdf5: position, axis-angle, gripper
                actions = abs_action_10_to_7(actions).astype(np.float64)
            for key, value in (("actions", actions), ("rewards", ep["rewards"]),
                               ("dones", ep["dones"]), ("states", ep["states"])):
                g.create_dataset(key, data=value)
            g.attrs["num_samples"] = len(actions)
            g.attrs["model_file"] = ep["model_file"]
        data.attrs["total"] = sum(len(ep["actions"]) for ep in eps)
        data.attrs["env_args"] = json.dumps(env_args(abs_actions, old=True), indent=4)
        f["mask/train"] = np.array([f"demo_{i}" for i in range(len(eps) - 2)], dtype="S")
        f["mask/valid"] = np.array([f"demo_{i}" for i in range(len(eps) - 2, len(eps))], dtype="S")
        f["mask/20_percent"] = np.array(["demo_1", "demo_10"], dtype="S")


# ---------------------------------------------------------------------------- writer
def test_writer_layout_and_attrs(tmp_path, lowdim_file):
    path, eps = lowdim_file
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]  # no temp files left
    with h5py.File(path, "r") as f:
        assert sorted(f.keys()) == ["data", "mask"]
        assert f["data"].attrs["total"] == sum(len(ep["actions"]) for ep in eps)
        assert json.loads(f["data"].attrs["env_args"]) == env_args()
        for i, ep in enumerate(eps):
            g = f[f"data/demo_{i}"]
            assert sorted(g.keys()) == ["actions", "dones", "next_obs", "obs", "rewards", "states"]
            assert g.attrs["num_samples"] == len(ep["actions"])
            assert g.attrs["model_file"] == ep["model_file"]
            for key, value in ep["obs"].items():
                np.testing.assert_array_equal(g[f"obs/{key}"][()], value)
                assert g[f"obs/{key}"].compression == "gzip"
                # next_obs: the observation after each action (last one repeated)
                np.testing.assert_array_equal(g[f"next_obs/{key}"][:-1], value[1:])
                np.testing.assert_array_equal(g[f"next_obs/{key}"][-1], value[-1])
            for key in ("actions", "rewards", "dones", "states"):
                np.testing.assert_array_equal(g[key][()], ep[key])
        ours = {k: sorted(f[f"mask/{k}"][()].tolist()) for k in ("train", "valid")}
    assert all(isinstance(n, bytes) for n in ours["train"] + ours["valid"])
    # the same split robomimic's split_train_val.py (seeded as its script does) makes
    from robomimic.scripts.split_train_val import split_train_val_from_hdf5

    theirs = tmp_path / "split.hdf5"
    shutil.copy(path, theirs)
    np.random.seed(0)
    split_train_val_from_hdf5(str(theirs), val_ratio=0.1)
    with h5py.File(theirs, "r") as f:
        assert ours == {k: sorted(f[f"mask/{k}"][()].tolist()) for k in ("train", "valid")}
    assert len(ours["valid"]) == 1 and len(ours["train"]) == 11


def test_robomimic_readers_accept_our_file(image_file):
    import robomimic.utils.file_utils as file_utils
    import robomimic.utils.obs_utils as obs_utils
    from robomimic.utils.dataset import SequenceDataset as RobomimicSequenceDataset

    path, eps = image_file
    assert file_utils.get_env_metadata_from_dataset(str(path)) == env_args()
    rgb = list(IMAGE_SCHEMA["rgb_keys"])
    obs_utils.initialize_obs_utils_with_obs_specs(
        {"obs": {"low_dim": LOWDIM, "rgb": rgb}})
    shape = file_utils.get_shape_metadata_from_dataset(str(path), all_obs_keys=LOWDIM + rgb)
    assert shape["ac_dim"] == 7 and shape["use_images"]
    assert shape["all_shapes"]["object"] == [10]
    assert shape["all_shapes"]["agentview_image"] == [3, 84, 84]
    theirs = RobomimicSequenceDataset(
        str(path), obs_keys=LOWDIM + rgb, dataset_keys=("actions", "rewards", "dones"),
        seq_length=4, filter_by_attribute="train", hdf5_cache_mode=None)
    item = theirs[0]
    demo = theirs.demos[0]
    ep = eps[int(demo.split("_")[1])]
    np.testing.assert_allclose(item["actions"], ep["actions"][:4])
    np.testing.assert_allclose(item["obs"]["object"], ep["obs"]["object"][:4])
    np.testing.assert_allclose(item["next_obs"]["object"][:3], ep["obs"]["object"][1:4])
    np.testing.assert_array_equal(item["obs"]["agentview_image"], ep["obs"]["agentview_image"][:4])
    theirs.hdf5_file.close()


def test_writer_rejects_bad_episodes(tmp_path):
    path = tmp_path / "bad.hdf5"
    rng = np.random.default_rng(0)

    def fails(eps, match, **flags):
        with pytest.raises(ValueError, match=match):
            write_hdf5(path, eps, **flags)
        assert list(tmp_path.iterdir()) == []  # nothing half-written left behind

    fails([], "no episodes")
    bad = episode(rng, 10)
    bad["actions"] = bad["actions"][:, :6]
    fails([bad], r"'actions': expected \[T, 7\].*got \(10, 6\)")
    bad = episode(rng, 10)
    bad["obs"]["object"] = bad["obs"]["object"][:9]
    fails([bad], r"obs: 'object': expected 10 steps.*got shape \(9, 10\)")
    fails([episode(rng, 10)], r"image=True but no '\*_image' key", image=True)
    fails([episode(rng, 10, image=True)], "image=False but image keys", image=False)
    fails([episode(rng, 10)], "abs=True but env_args' controller config says delta", abs=True)
    second = episode(rng, 12)
    second["obs"]["object"] = second["obs"]["object"][:, :8]
    fails([episode(rng, 10), second], r"episode 1: 'obs/object': expected per-step shape \(10,\)")
    numpy_args = episode(rng, 10)
    numpy_args["env_args"]["env_kwargs"]["camera_heights"] = np.array([84])
    fails([numpy_args], "'env_args' is not JSON-serialisable")
    missing = episode(rng, 10)
    del missing["states"]
    fails([missing], "episode 0: missing 'states'")


# ---------------------------------------------------------------------------- reader / datasets
def test_v141_layout_loads_unchanged(tmp_path):
    eps = episodes(12, seed=2)
    path = tmp_path / "low_dim_v141.hdf5"
    write_v141(path, eps)
    ds = SequenceDataset.from_robomimic(path, LOWDIM_SCHEMA, val_ratio=0.0, **WINDOW)
    assert not ds.obs_as_dict
    # demos in numeric order (demo_2 before demo_10), obs concatenated in DP's key order
    lengths = [len(ep["actions"]) for ep in eps]
    np.testing.assert_array_equal(ds.replay_buffer.episode_lengths, lengths)
    np.testing.assert_array_equal(ds.sampler.indices, create_indices(np.cumsum(lengths), 16, 1, 7))
    expected_obs = np.concatenate([eps[0]["obs"][k] for k in LOWDIM], axis=1).astype(np.float32)
    item = ds[0]
    assert item["obs"].shape == (16, 19) and item["action"].shape == (16, 7)
    np.testing.assert_array_equal(item["obs"][0].numpy(), expected_obs[0])  # padded slot
    np.testing.assert_array_equal(item["obs"][1:].numpy(), expected_obs[:15])
    np.testing.assert_array_equal(item["action"][1:].numpy(),
                                  eps[0]["actions"][:15].astype(np.float32))
    # the last window of the last episode repeats its final step (pad_after)
    last = ds[len(ds) - 1]
    np.testing.assert_array_equal(last["action"][-1].numpy(),
                                  eps[-1]["actions"][-1].astype(np.float32))
    # robomimic filter keys select demos
    small = load_replay(path, ["object"], filter_key="20_percent")
    np.testing.assert_array_equal(small.episode_lengths, [lengths[1], lengths[10]])
    with pytest.raises(ValueError, match="no filter key 'nope'; present: \\['20_percent'"):
        load_replay(path, ["object"], filter_key="nope")
    with pytest.raises(ValueError, match="missing observation 'sideview_image'"):
        load_replay(path, ["sideview_image"])
    with pytest.raises(ValueError, match=r"'object': expected per-step shape \(14,\), got \(10,\)"):
        load_replay(path, ["object"], expect={"object": [14]})
    with pytest.raises(FileNotFoundError, match="robomimic dataset not found"):
        load_replay(tmp_path / "missing.hdf5", ["object"])


def test_normalizers_follow_diffusion_policy(lowdim_file, image_file):
    path, eps = lowdim_file
    ds = SequenceDataset.from_robomimic(path, LOWDIM_SCHEMA, **WINDOW)
    norm = ds.get_normalizer()
    obs = np.concatenate([np.concatenate([ep["obs"][k] for k in LOWDIM], 1) for ep in eps])
    obs = obs.astype(np.float32)[np.repeat(ds.episode_mask, [len(ep["actions"]) for ep in eps])]
    # low-dim obs: one scale 1 / max(max, |min|) for all dims, no offset (DP's normalizer_from_stat)
    peak = max(obs.max(), -obs.min())
    torch.testing.assert_close(norm["obs"].scale, torch.full((19,), 1 / peak))
    torch.testing.assert_close(norm["obs"].offset, torch.zeros(19))
    # delta actions are already in [-1, 1]: identity
    torch.testing.assert_close(norm["action"].scale, torch.ones(7))
    torch.testing.assert_close(norm["action"].offset, torch.zeros(7))
    # a rule can be overridden; unknown keys and rules are named
    limits = SequenceDataset.from_robomimic(path, LOWDIM_SCHEMA, **WINDOW,
                                            normalizer_rules={"action": "limits"})
    y = limits.get_normalizer()["action"].normalize(limits.get_all_actions())
    torch.testing.assert_close(y.min(0).values, -torch.ones(7))
    with pytest.raises(ValueError, match="normalizer_rules\\['obs'\\]: unknown rule 'foo'"):
        SequenceDataset.from_robomimic(path, LOWDIM_SCHEMA, **WINDOW,
                                       normalizer_rules={"obs": "foo"})
    with pytest.raises(ValueError, match="normalizer_rules: unknown key 'object'"):
        SequenceDataset.from_robomimic(path, LOWDIM_SCHEMA, **WINDOW,
                                       normalizer_rules={"object": "identity"})

    path, eps = image_file
    ds = SequenceDataset.from_robomimic(path, **IMAGE_SCHEMA, val_ratio=0.0, **WINDOW)
    norm = ds.get_normalizer()
    assert sorted(norm.keys()) == sorted(["action", *LOWDIM[1:], *IMAGE_SCHEMA["rgb_keys"]])
    for key in ("robot0_eef_pos", "robot0_gripper_qpos"):  # range to [-1, 1]
        x = torch.from_numpy(np.concatenate([ep["obs"][key] for ep in eps]).astype(np.float32))
        y = norm[key].normalize(x)
        torch.testing.assert_close(y.min(0).values, -torch.ones(x.shape[1]))
        torch.testing.assert_close(y.max(0).values, torch.ones(x.shape[1]))
    torch.testing.assert_close(norm["robot0_eef_quat"].scale, torch.ones(4))  # quaternion
    image = ds[0]["obs"]["agentview_image"]  # uint8; the policy scales it to [0, 1] on its device
    unit = image.float() / 255
    torch.testing.assert_close(norm["agentview_image"].normalize(unit), unit * 2 - 1)
    # the image window holds the HDF5 frames as uint8 CHW, bytes unchanged
    b0, _, s0, _ = ds.sampler.indices[0]
    frame = torch.from_numpy(eps[0]["obs"]["agentview_image"][b0]).permute(2, 0, 1)
    assert image.dtype == torch.uint8 and torch.equal(image[s0], frame)


def test_absolute_actions(tmp_path):
    eps = episodes(5, seed=3, abs_actions=True)
    ours, dp = tmp_path / "ours_abs.hdf5", tmp_path / "dp_abs.hdf5"
    write_hdf5(ours, iter(eps), abs=True)
    write_v141(dp, eps, abs_actions=True)
    with h5py.File(ours, "r") as f:  # stored as robosuite executes them: pos, axis-angle, grip
        stored = f["data/demo_0/actions"][()]
    assert stored.shape == (len(eps[0]["actions"]), 7)
    matrix = Rotation.from_rotvec(stored[:, 3:6]).as_matrix()
    np.testing.assert_allclose(matrix[:, :2].reshape(-1, 6), eps[0]["actions"][:, 3:9], atol=1e-6)
    assert action_mode(env_args(True)) == action_mode(env_args(True, old=True)) == "abs"
    assert action_mode(env_args(False)) == action_mode(env_args(False, old=True)) == "delta"
    assert action_mode({"env_kwargs": {}}) is None

    expected = np.concatenate([ep["actions"] for ep in eps]).astype(np.float32)
    for path in (ours, dp):
        ds = SequenceDataset.from_robomimic(path, LOWDIM_SCHEMA, abs_action=True, **WINDOW)
        actions = ds.replay_buffer["action"]
        assert actions.shape == (len(expected), 10)
        np.testing.assert_allclose(actions, expected, atol=1e-5)
        norm = ds.get_normalizer()
        # position to [-1, 1] by its range; rotation-6d and gripper unchanged (DP)
        y = norm["action"].normalize(torch.from_numpy(actions))
        torch.testing.assert_close(y[:, :3].min(0).values, -torch.ones(3))
        torch.testing.assert_close(y[:, :3].max(0).values, torch.ones(3))
        torch.testing.assert_close(y[:, 3:], torch.from_numpy(actions[:, 3:]))
        torch.testing.assert_close(norm["action"].input_stats["min"][3:], -torch.ones(7))
        with pytest.raises(ValueError, match="stores absolute actions, but abs_action=False"):
            load_replay(path, ["object"])
    np.testing.assert_allclose(abs_action_7_to_10(abs_action_10_to_7(expected)), expected,
                               atol=1e-5)

    delta = tmp_path / "delta.hdf5"
    write_v141(delta, episodes(2))
    with pytest.raises(ValueError, match="stores delta actions .* abs_action=True"):
        SequenceDataset.from_robomimic(delta, LOWDIM_SCHEMA, abs_action=True, **WINDOW)
    with pytest.raises(ValueError, match=r"'action': expected per-step shape \(10,\)"):
        load_replay(delta, ["object"], expect={"action": [10]})


# ---------------------------------------------------------------------------- image cache
def test_image_cache_reused_and_invalidated(tmp_path):
    path = tmp_path / "image.hdf5"
    write_hdf5(path, iter(episodes(3, seed=4, image=True)), image=True)
    keys = ["robot0_eef_pos", "agentview_image"]
    first = load_replay(path, keys, rgb_keys=["agentview_image"])
    root = tmp_path / "image.hdf5.cache"
    (entry,) = [p for p in root.iterdir() if p.is_dir()]
    npy = entry / "agentview_image.npy"
    stamp = npy.stat().st_mtime_ns
    images = first["agentview_image"]
    base = images
    while isinstance(base, np.ndarray):
        base = base.base
    assert isinstance(base, mmap.mmap)  # memory-mapped from the cache, not read into memory
    with h5py.File(path, "r") as f:
        np.testing.assert_array_equal(images[: f["data/demo_0/actions"].shape[0]],
                                      f["data/demo_0/obs/agentview_image"][()])

    # reused: same entry, not rewritten; a different key selection gets its own entry
    again = load_replay(path, keys, rgb_keys=["agentview_image"])
    assert npy.stat().st_mtime_ns == stamp
    np.testing.assert_array_equal(again["agentview_image"], images)
    load_replay(path, ["robot0_eye_in_hand_image"], rgb_keys=["robot0_eye_in_hand_image"])
    assert len([p for p in root.iterdir() if p.is_dir()]) == 2

    # the source changes: both old entries are dropped, the new content is served
    new_eps = episodes(2, seed=5, image=True)
    write_hdf5(path, iter(new_eps), image=True)
    os.utime(path, ns=(stamp + 10**9, stamp + 10**9))  # mtime differs even on coarse clocks
    fresh = load_replay(path, keys, rgb_keys=["agentview_image"])
    assert [p.name for p in root.iterdir() if p.is_dir()] != [entry.name]
    assert len([p for p in root.iterdir() if p.is_dir()]) == 1
    np.testing.assert_array_equal(fresh["agentview_image"][: len(new_eps[0]["actions"])],
                                  new_eps[0]["obs"]["agentview_image"])
    # no cache: the same arrays, read into memory
    plain = load_replay(path, keys, rgb_keys=["agentview_image"], use_cache=False)
    np.testing.assert_array_equal(plain["agentview_image"], fresh["agentview_image"])
    np.testing.assert_array_equal(plain["action"], fresh["action"])


# ---------------------------------------------------------------------------- configs
TASK_DIMS = {"lift": 10, "can": 14, "tool_hang": 44}


@pytest.mark.parametrize("task", sorted(TASK_DIMS))
def test_configs_compose(task):
    from envs.robomimic.env import RobomimicEnv

    env_params = set(inspect.signature(RobomimicEnv).parameters)
    size, crop, steps = (240, 216, 700) if task == "tool_hang" else (84, 76, 400)
    low = compose("train_policy", [f"task={task}_lowdim", "policy=drifting", "size=cpu"]).task
    assert low.shape_meta.obs.obs.shape == [TASK_DIMS[task] + 9]
    assert low.shape_meta.action.shape == [7] and not low.dataset.abs_action
    assert low.dataset.expect.object == [TASK_DIMS[task]]
    assert low.env.max_steps == steps and set(low.env.kwargs) <= env_params
    assert set(low.runner) <= set(inspect.signature(EnvRunner).parameters)
    assert low.runner.train_states.path == low.dataset.path  # DP's train-state rollouts
    img = compose("train_policy", [f"task={task}_image", "policy=drifting", "size=cpu"])
    assert img.policy.crop_shape == [crop, crop]
    rgb = [k for k, v in img.task.shape_meta.obs.items() if v.type == "rgb"]
    assert sorted(rgb) == sorted(img.task.dataset.rgb_keys)
    assert all(img.task.shape_meta.obs[k].shape == [3, size, size] for k in rgb)
    assert img.task.env.kwargs.camera_size == size and set(img.task.env.kwargs) <= env_params
    absolute = compose("train_policy", [f"task={task}_image", "task.abs_action=true",
                                        "task.action_dim=10"]).task
    assert absolute.shape_meta.action.shape == [10] and absolute.env.kwargs.abs_actions
    assert absolute.dataset.abs_action and absolute.dataset.expect.action == [10]


@pytest.mark.parametrize("kind", ["lowdim", "image"])
def test_config_trains_a_few_steps(tmp_path, kind, lowdim_file, image_file):
    from drifting_policy.train import TrainWorkspace

    path = (lowdim_file if kind == "lowdim" else image_file)[0]
    cfg = compose("train_policy", [
        f"task=lift_{kind}", "policy=drifting", "size=cpu", f"task.dataset.path={path}",
        f"task.dataset.cache_dir={tmp_path}" if kind == "image" else "task.dataset.val_ratio=0.1",
        f"run_dir={tmp_path / 'run'}", "device=cpu", "logging.mode=disabled",
        "policy.down_dims=[16,32]", "policy.diffusion_step_embed_dim=16",
        "training.batch_size=4", "training.num_steps=2", "training.lr_warmup_steps=1",
        "training.rollout_every=0", "training.checkpoint_every=0", "training.val_every=0",
        "training.log_every=1",
    ])
    ws = TrainWorkspace(cfg)
    before = [p.detach().clone() for p in ws.policy.parameters()]
    ws.run()
    assert ws.step == 2
    assert any(not torch.equal(a, b) for a, b in zip(before, ws.policy.parameters()))
    logs = [json.loads(line) for line in (tmp_path / "run/logs.jsonl").read_text().splitlines()]
    assert all(np.isfinite(r["train/loss"]) for r in logs if "train/loss" in r)
    obs = ws.dataset[0]["obs"]
    batch = ({k: v[None, :2] for k, v in obs.items()} if kind == "image"
             else {"obs": obs[None, :2]})
    assert ws.policy.predict_action(batch)["action"].shape == (1, 8, 7)
