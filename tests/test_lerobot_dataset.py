"""LeRobotDataset v3 in and out: the on-disk layout we write, lossless round trips, and the same
training windows and normaliser whether a task reads its episodes from zarr / robomimic HDF5 or
from a LeRobot directory. (LeRobot's own reader opening these files: test_lerobot_plugin.py.)"""

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from omegaconf import OmegaConf

from drifting_policy.config import compose
from drifting_policy.data.convert import convert
from drifting_policy.data.dataset import detect_format, load_dataset
from drifting_policy.data.lerobot_reader import load_replay, read_info
from drifting_policy.data.lerobot_writer import write_lerobot
from drifting_policy.data.replay_buffer import ReplayBuffer, write_replay_atomic

pytestmark = pytest.mark.usefixtures("single_thread")


def pusht_episodes(n: int = 3, seed: int = 0) -> list[dict]:
    """PushT-shaped episodes in Diffusion Policy's zarr keys (img float32 0..255 like DP's
    file); frames are smooth (a moving square on a gradient) so video decoding error is small."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:96, 0:96]
    out = []
    for i in range(n):
        length = 20 + 5 * i
        img = np.empty((length, 96, 96, 3), np.float32)
        for t in range(length):
            img[t] = (xx * 2.0)[..., None]
            img[t, (yy // 16 == t % 6) & (xx // 16 == i % 6)] = (250.0, 40.0, 40.0)
        out.append({
            "img": img,
            "state": rng.uniform(0, 512, (length, 5)).astype(np.float32),
            "keypoint": rng.uniform(0, 512, (length, 9, 2)).astype(np.float32),
            "action": rng.uniform(0, 512, (length, 2)).astype(np.float32),
            "n_contacts": rng.integers(0, 3, (length, 1)).astype(np.float32),
        })
    return out


@pytest.fixture(scope="module")
def pusht_pair(tmp_path_factory) -> tuple[Path, Path, list[dict]]:
    """The same episodes as a zarr replay buffer and as a LeRobot dataset (via convert)."""
    root = tmp_path_factory.mktemp("pusht")
    eps = pusht_episodes(4)
    write_replay_atomic(root / "pusht.zarr", iter(eps))
    assert convert(root / "pusht.zarr", root / "pusht_lerobot") == ("lerobot", 4)
    return root / "pusht.zarr", root / "pusht_lerobot", eps


def test_layout_on_disk(pusht_pair):
    _, path, eps = pusht_pair
    info = json.loads((path / "meta/info.json").read_text())
    assert info["codebase_version"] == "v3.0" and info["fps"] == 10
    assert info["total_episodes"] == 4
    assert info["total_frames"] == sum(len(e["action"]) for e in eps)
    features = info["features"]
    assert features["observation.image"]["dtype"] == "video"
    assert features["observation.image"]["shape"] == [96, 96, 3]
    assert features["observation.state"]["shape"] == [2]
    assert features["observation.environment_state"]["shape"] == [18]
    assert {"state", "n_contacts", "timestamp", "frame_index", "episode_index", "index",
            "task_index"} <= set(features)
    assert (path / "videos/observation.image/chunk-000/file-000.mp4").is_file()
    data = pq.read_table(path / "data/chunk-000/file-000.parquet")
    assert "observation.image" not in data.column_names
    assert data.column("index").to_pylist() == list(range(info["total_frames"]))
    episodes = pq.read_table(path / "meta/episodes/chunk-000/file-000.parquet").to_pylist()
    ends = np.cumsum([len(e["action"]) for e in eps])
    assert [e["dataset_to_index"] for e in episodes] == ends.tolist()
    assert [e["videos/observation.image/from_timestamp"] for e in episodes] == \
        pytest.approx(np.concatenate([[0], ends[:-1]]) / 10)
    tasks = pq.read_table(path / "meta/tasks.parquet")
    assert tasks.column("task_index").to_pylist() == [0]
    # stats: independent numpy computation over all frames
    stats = json.loads((path / "meta/stats.json").read_text())
    actions = np.concatenate([e["action"] for e in eps])
    assert stats["action"]["min"] == pytest.approx(actions.min(0))
    assert stats["action"]["max"] == pytest.approx(actions.max(0))
    assert stats["action"]["q50"] == pytest.approx(np.quantile(actions, 0.5, axis=0))
    agent = np.concatenate([e["state"][:, :2] for e in eps])
    assert stats["observation.state"]["mean"] == pytest.approx(agent.mean(0), rel=1e-6)
    assert np.asarray(stats["observation.image"]["mean"]).shape == (3, 1, 1)
    assert stats["action"]["count"] == [len(actions)]


def test_round_trip_back_to_zarr(pusht_pair, tmp_path):
    _, path, eps = pusht_pair
    assert convert(path, tmp_path / "back.zarr") == ("zarr", 4)
    back = ReplayBuffer.load(tmp_path / "back.zarr")
    assert sorted(back.keys()) == sorted(eps[0])
    for i, ep in enumerate(eps):
        got = back.get_episode(i)
        for key in ("state", "keypoint", "action", "n_contacts"):
            assert got[key].dtype == ep[key].dtype and np.array_equal(got[key], ep[key]), key
        # lossy video (AV1, yuv420p): close to the source frames, not equal
        err = np.abs(got["img"] - ep["img"])
        assert got["img"].shape == ep["img"].shape and err.mean() < 3.0, err.mean()


@pytest.mark.parametrize("task", ["pusht_lowdim", "pusht_image"])
def test_windows_and_normaliser_match_zarr(pusht_pair, task):
    zarr_path, lerobot_path, _ = pusht_pair
    assert detect_format(lerobot_path) == "lerobot" and detect_format(zarr_path) == "zarr"
    datasets = [
        load_dataset(OmegaConf.to_container(compose("train_policy", [
            f"task={task}", f"task.dataset.path={path}", "task.dataset.val_ratio=0.25"]
        ).task.dataset, resolve=True))
        for path in (zarr_path, lerobot_path)
    ]
    ours, theirs = datasets
    assert len(ours) == len(theirs) > 0
    assert np.array_equal(ours.val_mask, theirs.val_mask)
    val = [d.get_validation_dataset() for d in datasets]
    assert len(val[0]) == len(val[1]) > 0
    to = 2
    for i in range(len(ours)):
        a, b = ours[i], theirs[i]
        assert torch.equal(a["action"], b["action"])
        if task == "pusht_lowdim":
            assert torch.equal(a["obs"], b["obs"])
        else:
            assert torch.equal(a["obs"]["agent_pos"][:to], b["obs"]["agent_pos"][:to])
            err = (a["obs"]["image"][:to].float() - b["obs"]["image"][:to].float()).abs().mean()
            assert err < 3.0, err  # uint8 levels
    n_ours, n_theirs = ours.get_normalizer(), theirs.get_normalizer()
    assert n_ours.keys() == n_theirs.keys()
    for key in n_ours.keys():
        assert torch.equal(n_ours[key].scale, n_theirs[key].scale), key
        assert torch.equal(n_ours[key].offset, n_theirs[key].offset), key


def test_generic_names_serve_a_task_without_a_mapping(tmp_path):
    """BlockPush's config has no `lerobot` mapping: its zarr keys are found as observation.<key>."""
    rng = np.random.default_rng(1)
    eps = [{"obs": rng.normal(size=(n, 16)).astype(np.float32),
            "action": rng.normal(size=(n, 2)).astype(np.float32)} for n in (30, 41, 25)]
    write_replay_atomic(tmp_path / "bp.zarr", iter(eps))
    convert(tmp_path / "bp.zarr", tmp_path / "bp")
    features = read_info(tmp_path / "bp")["features"]
    assert {"observation.obs", "action"} <= set(features)
    built = [load_dataset(OmegaConf.to_container(compose("train_policy", [
        "task=blockpush_lowdim", f"task.dataset.path={p}"]).task.dataset, resolve=True))
        for p in (tmp_path / "bp.zarr", tmp_path / "bp")]
    assert len(built[0]) == len(built[1]) > 0
    for i in range(len(built[0])):
        assert torch.equal(built[0][i]["obs"], built[1][i]["obs"])
        assert torch.equal(built[0][i]["action"], built[1][i]["action"])


def test_robomimic_hdf5_to_lerobot_keeps_windows_and_rules(tmp_path):
    from test_robomimic_data import episodes as robomimic_episodes

    from drifting_policy.data.robomimic_hdf5 import write_hdf5

    write_hdf5(tmp_path / "lift.hdf5", iter(robomimic_episodes(5)))
    assert convert(tmp_path / "lift.hdf5", tmp_path / "lift") == ("lerobot", 5)
    info = read_info(tmp_path / "lift")
    assert info["fps"] == 20 and info["features"]["action"]["shape"] == [7]
    assert info["drifting_policy"]["robomimic_env_args"]["env_name"] == "Lift"
    built = [load_dataset(OmegaConf.to_container(compose("train_policy", [
        "task=lift_lowdim", f"task.dataset.path={p}"]).task.dataset, resolve=True))
        for p in (tmp_path / "lift.hdf5", tmp_path / "lift")]
    assert len(built[0]) == len(built[1]) > 0
    for i in (0, len(built[0]) // 2, len(built[0]) - 1):
        assert torch.equal(built[0][i]["obs"], built[1][i]["obs"])
        assert torch.equal(built[0][i]["action"], built[1][i]["action"])
    norms = [b.get_normalizer() for b in built]
    for key in ("obs", "action"):  # robomimic's rules: obs max_abs, delta actions identity
        assert torch.equal(norms[0][key].scale, norms[1][key].scale)
    assert torch.equal(norms[1]["action"].scale, torch.ones(7))


def test_bad_input_is_one_clear_error(pusht_pair, tmp_path):
    _, path, eps = pusht_pair
    with pytest.raises(ValueError, match="fps"):
        write_lerobot(tmp_path / "a", iter(eps), fps=12.5)
    odd = [{"img": np.zeros((3, 95, 96, 3), np.uint8), "action": np.zeros((3, 2), np.float32)}]
    with pytest.raises(ValueError, match="even height and width"):
        write_lerobot(tmp_path / "b", iter(odd), fps=10)
    assert not (tmp_path / "b").exists()  # atomic: nothing left behind
    with pytest.raises(ValueError, match="no episodes"):
        write_lerobot(tmp_path / "c", iter([]), fps=10)
    with pytest.raises(ValueError, match="missing feature 'observation.velocity'"):
        load_replay(path, ["observation.velocity"])
    with pytest.raises(ValueError, match=r"expected per-step shape \(3,\)"):
        load_replay(path, ["action"], expect={"action": [3]})
    with pytest.raises(ValueError, match="filter_key"):
        load_dataset({"path": str(path), "obs_keys": {"obs": ["keypoint"]}, "horizon": 16,
                      "pad_before": 1, "pad_after": 7, "filter_key": "train"})
    with pytest.raises(ValueError, match="no LeRobot feature for 'velocity'"):
        load_dataset({"path": str(path), "obs_keys": {"obs": ["velocity"]}, "horizon": 16,
                      "pad_before": 1, "pad_after": 7})
    old = tmp_path / "old"
    (old / "meta").mkdir(parents=True)
    (old / "meta/info.json").write_text(json.dumps({"codebase_version": "v2.1", "fps": 10,
                                                    "features": {}, "data_path": "x"}))
    with pytest.raises(ValueError, match="codebase_version 'v2.1'"):
        load_replay(old, ["action"])


def test_demos_cli_writes_lerobot_and_train_reads_it(tmp_path):
    """The contract: `demos pusht --episodes 2 --format lerobot --out DIR`, then
    `train task=pusht_lowdim task.dataset.path=DIR` trains from it."""
    from drifting_policy.cli import main
    from drifting_policy.train import TrainWorkspace

    out = tmp_path / "pusht"
    assert main(["demos", "pusht", "--episodes", "2", "--format", "lerobot", "--out", str(out),
                 "--workers", "2"]) == 0
    assert json.loads((out / "meta/info.json").read_text())["codebase_version"] == "v3.0"
    cfg = compose("train_policy", [
        "task=pusht_lowdim", f"task.dataset.path={out}", f"run_dir={tmp_path / 'run'}",
        "device=cpu", "logging.mode=disabled", "policy.down_dims=[16,32]",
        "policy.diffusion_step_embed_dim=16", "training.batch_size=8", "training.num_steps=3",
        "training.lr_warmup_steps=1", "training.rollout_every=0", "training.final_rollout=false",
        "training.val_every=0", "training.checkpoint_every=3"])
    ws = TrainWorkspace(cfg)
    ws.run()
    assert ws.step == 3 and (tmp_path / "run/checkpoints/latest").is_dir()


def test_image_features_stored_as_png_are_read(tmp_path):
    """LeRobot datasets recorded without videos keep frames as PNG bytes in the parquet rows."""
    import io

    import pyarrow as pa
    from PIL import Image

    rng = np.random.default_rng(2)
    eps = [{"action": rng.normal(size=(n, 2)).astype(np.float32)} for n in (4, 3)]
    write_lerobot(tmp_path / "d", iter(eps), fps=10)
    frames = rng.integers(0, 256, (7, 8, 10, 3), dtype=np.uint8)

    def png(image: np.ndarray) -> bytes:
        buf = io.BytesIO()
        Image.fromarray(image).save(buf, format="PNG")
        return buf.getvalue()

    file = tmp_path / "d/data/chunk-000/file-000.parquet"
    table = pq.read_table(file)
    column = pa.array([{"bytes": png(f), "path": None} for f in frames],
                      pa.struct([("bytes", pa.binary()), ("path", pa.string())]))
    pq.write_table(table.append_column("observation.cam", column), file)
    info = json.loads((tmp_path / "d/meta/info.json").read_text())
    info["features"]["observation.cam"] = {"dtype": "image", "shape": [8, 10, 3],
                                           "names": ["height", "width", "channels"]}
    (tmp_path / "d/meta/info.json").write_text(json.dumps(info))
    buffer = load_replay(tmp_path / "d", ["observation.cam", "action"])
    assert np.array_equal(buffer["observation.cam"], frames)
    assert buffer.episode_ends.tolist() == [4, 7]


@pytest.mark.parametrize("abs_actions", [False, True])
def test_robomimic_demos_in_lerobot_format(tmp_path, abs_actions):
    """`demos lift --format lerobot [--abs]`: the collectors' episodes -> LeRobot at 20 fps, action
    as training reads it (7-d delta or 10-d rotation-6d), readable by the lift_lowdim config."""
    from test_robomimic_data import episodes as robomimic_episodes

    from drifting_policy.data.demos import TASKS, write_lerobot_demos

    eps = robomimic_episodes(3, abs_actions=abs_actions)
    assert write_lerobot_demos(tmp_path / "lift", iter(eps), TASKS["lift"], "lift",
                               image=False, abs=abs_actions) == 3
    info = read_info(tmp_path / "lift")
    dim = 10 if abs_actions else 7
    assert info["fps"] == 20 and info["features"]["action"]["shape"] == [dim]
    buffer = load_replay(tmp_path / "lift", ["action", "observation.robot0_eef_pos"])
    np.testing.assert_allclose(buffer["action"][: len(eps[0]["actions"])], eps[0]["actions"],
                               rtol=1e-6, atol=1e-6)
    ds = load_dataset(OmegaConf.to_container(compose("train_policy", [
        "task=lift_lowdim", f"task.dataset.path={tmp_path / 'lift'}",
        f"task.abs_action={str(abs_actions).lower()}", f"task.action_dim={dim}"]
    ).task.dataset, resolve=True))
    assert ds[0]["obs"].shape == (16, 19) and ds[0]["action"].shape == (16, dim)


def test_robomimic_image_file_to_lerobot_videos(tmp_path):
    """lift_image from LeRobot: both cameras become videos and feed the same windows."""
    from test_robomimic_data import episodes as robomimic_episodes

    from drifting_policy.data.robomimic_hdf5 import write_hdf5

    write_hdf5(tmp_path / "lift.hdf5", iter(robomimic_episodes(3, image=True)), image=True)
    convert(tmp_path / "lift.hdf5", tmp_path / "lift")
    info = read_info(tmp_path / "lift")
    for camera in ("agentview_image", "robot0_eye_in_hand_image"):
        assert info["features"][f"observation.images.{camera}"]["dtype"] == "video"
    built = [load_dataset(OmegaConf.to_container(compose("train_policy", [
        "task=lift_image", f"task.dataset.path={p}"]).task.dataset, resolve=True))
        for p in (tmp_path / "lift.hdf5", tmp_path / "lift")]
    assert len(built[0]) == len(built[1]) > 0
    a, b = built[0][3], built[1][3]
    assert torch.equal(a["action"], b["action"])
    for key, value in a["obs"].items():
        assert value.shape == b["obs"][key].shape and value.dtype == b["obs"][key].dtype, key
        if value.dtype != torch.uint8:  # low-dim (the To steps read): exact; frames: lossy
            assert torch.equal(value[:2], b["obs"][key][:2]), key
