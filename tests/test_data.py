"""Replay buffer (zarr), sequence sampler, normaliser and dataset."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import zarr
from safetensors.torch import load_file, save_file

from drifting_policy.data.dataset import SequenceDataset, parse_obs_keys
from drifting_policy.data.frames import as_uint8
from drifting_policy.data.replay_buffer import ReplayBuffer
from drifting_policy.data.sampler import (
    SequenceSampler,
    create_indices,
    downsample_mask,
    get_val_mask,
)
from drifting_policy.nn.normalizer import LinearNormalizer


def pusht_like_buffer(lengths=(5, 7, 4, 6), seed=0, img=8) -> ReplayBuffer:
    """Synthetic buffer with PushT's keys and dtypes (images kept small)."""
    rng = np.random.default_rng(seed)
    buf = ReplayBuffer.empty()
    for n in lengths:
        buf.add_episode({
            "img": rng.integers(0, 256, (n, img, img, 3)).astype(np.uint8),
            "state": rng.uniform(0, 512, (n, 5)).astype(np.float32),
            "keypoint": rng.uniform(0, 512, (n, 9, 2)).astype(np.float32),
            "action": rng.uniform(0, 512, (n, 2)).astype(np.float32),
            "n_contacts": rng.integers(0, 3, (n, 1)).astype(np.float64),
        })
    return buf


# ---------------------------------------------------------------------------- replay buffer
def test_round_trip_writes_zarr_v2(tmp_path):
    buf = pusht_like_buffer()
    path = tmp_path / "demo.zarr"
    buf.save(path, chunk_length=4)

    assert (path / ".zgroup").is_file()
    assert (path / "data" / "img" / ".zarray").is_file()
    assert (path / "meta" / "episode_ends" / ".zarray").is_file()
    assert not list(path.rglob("zarr.json"))
    meta = json.loads((path / "data" / "img" / ".zarray").read_text())
    assert meta["zarr_format"] == 2 and meta["chunks"] == [4, 8, 8, 3]  # chunked along time only
    assert sorted(p.name for p in tmp_path.iterdir()) == ["demo.zarr"]  # no temp dirs left

    loaded = ReplayBuffer.load(path)
    assert loaded.episode_ends.dtype == np.int64
    np.testing.assert_array_equal(loaded.episode_ends, [5, 12, 16, 22])
    np.testing.assert_array_equal(loaded.episode_lengths, [5, 7, 4, 6])
    assert sorted(loaded.keys()) == sorted(buf.keys())
    for key in buf.keys():
        assert loaded[key].dtype == buf[key].dtype
        np.testing.assert_array_equal(loaded[key], buf[key])
    np.testing.assert_array_equal(loaded.get_episode(-1)["action"], buf["action"][16:])

    buf.add_episode(buf.get_episode(0))  # saving again replaces the old copy
    buf.save(path)
    assert ReplayBuffer.load(path, keys=["action"]).n_episodes == 5
    assert sorted(p.name for p in tmp_path.iterdir()) == ["demo.zarr"]


def test_zip_round_trip(tmp_path):
    buf = pusht_like_buffer(lengths=(3, 2))
    buf.save(tmp_path / "demo.zarr.zip")
    loaded = ReplayBuffer.load(tmp_path / "demo.zarr.zip", keys=["state"])
    np.testing.assert_array_equal(loaded["state"], buf["state"])


def test_load_v3_group(tmp_path):
    root = zarr.open_group(tmp_path / "v3.zarr", mode="w")  # zarr-python 3 default: format 3
    action = np.arange(12, dtype=np.float32).reshape(6, 2)
    root.create_group("data").create_array("action", data=action, chunks=(4, 2))
    root.create_group("meta").create_array("episode_ends", data=np.array([2, 6]))
    assert (tmp_path / "v3.zarr" / "zarr.json").is_file()

    loaded = ReplayBuffer.load(tmp_path / "v3.zarr", expect={"action": (2,)})
    np.testing.assert_array_equal(loaded["action"], action)
    np.testing.assert_array_equal(loaded.episode_ends, [2, 6])


def test_load_errors_name_the_problem(tmp_path):
    buf = pusht_like_buffer(lengths=(3, 4))
    path = tmp_path / "demo.zarr"
    buf.save(path)

    with pytest.raises(FileNotFoundError, match="nope.zarr"):
        ReplayBuffer.load(tmp_path / "nope.zarr")
    with pytest.raises(ValueError, match=r"missing key 'obs'.*'action'.*'state'"):
        ReplayBuffer.load(path, keys=["obs"])
    with pytest.raises(ValueError, match=r"missing key 'obs'"):
        ReplayBuffer.load(path, expect={"obs": None})
    message = r"key 'action': expected per-step shape \(3,\), got \(2,\)"
    with pytest.raises(ValueError, match=message):
        ReplayBuffer.load(path, expect={"action": (3,), "keypoint": (9, 2)})

    garbage = tmp_path / "garbage"
    garbage.mkdir()
    (garbage / "notes.txt").write_text("hello")
    with pytest.raises(ValueError, match="garbage.*not a readable zarr group"):
        ReplayBuffer.load(garbage)
    (path / ".zgroup").write_text("{not json")
    with pytest.raises(ValueError, match="demo.zarr.*not a readable zarr group"):
        ReplayBuffer.load(path)


def test_load_rejects_inconsistent_layout(tmp_path):
    root = zarr.open_group(tmp_path / "short.zarr", mode="w", zarr_format=2)
    root.create_group("data").create_array("action", data=np.zeros((5, 2)))
    meta = root.create_group("meta")
    meta.create_array("episode_ends", data=np.array([3, 7]))
    with pytest.raises(ValueError, match=r"'action' has shape \(5, 2\).*7 steps"):
        ReplayBuffer.load(tmp_path / "short.zarr")

    root = zarr.open_group(tmp_path / "nometa.zarr", mode="w", zarr_format=2)
    root.create_group("data").create_array("action", data=np.zeros((5, 2)))
    root.create_group("meta")
    with pytest.raises(ValueError, match="missing 'meta/episode_ends'"):
        ReplayBuffer.load(tmp_path / "nometa.zarr")


def test_add_episode_checks_keys_and_lengths():
    buf = ReplayBuffer.empty()
    buf.add_episode({"obs": np.zeros((3, 4)), "action": np.zeros((3, 2))})
    with pytest.raises(ValueError, match="different lengths"):
        buf.add_episode({"obs": np.zeros((3, 4)), "action": np.zeros((2, 2))})
    with pytest.raises(ValueError, match="buffer keys"):
        buf.add_episode({"obs": np.zeros((3, 4))})
    with pytest.raises(ValueError, match=r"'obs': expected per-step shape \(4,\), got \(5,\)"):
        buf.add_episode({"obs": np.zeros((3, 5)), "action": np.zeros((3, 2))})
    for _ in range(10):  # geometric growth keeps the filled part intact
        buf.add_episode({"obs": np.ones((2, 4)), "action": np.ones((2, 2))})
    assert buf.n_steps == 23 and buf["obs"].shape == (23, 4) and buf["obs"][:3].sum() == 0


# ---------------------------------------------------------------------------- sampler
def reference_indices(episode_ends, T, pad_before, pad_after):
    """Windows enumerated one by one from Diffusion Policy's padding rules."""
    rows, start = [], 0
    for end in episode_ends:
        length = end - start
        for s in range(-pad_before, length - T + pad_after + 1):
            lo, hi = max(s, 0), min(s + T, length)
            rows.append([start + lo, start + hi, lo - s, hi - s])
        start = end
    return np.array(rows, dtype=np.int64).reshape(-1, 4)


def test_create_indices_hand_example():
    # one episode of 3 frames, T=4, pad 1 before and 1 after: windows "a a b c" and "a b c c"
    idx = create_indices(np.array([3]), sequence_length=4, pad_before=1, pad_after=1)
    np.testing.assert_array_equal(idx, [[0, 3, 1, 4], [0, 3, 0, 3]])

    buf = ReplayBuffer({"x": np.array([[10], [11], [12]])}, np.array([3]))
    sampler = SequenceSampler(buf, sequence_length=4, pad_before=1, pad_after=1)
    windows = [sampler.sample_sequence(i)["x"][:, 0].tolist() for i in range(len(sampler))]
    assert windows == [[10, 10, 11, 12], [10, 11, 12, 12]]


@pytest.mark.parametrize("T,pad_before,pad_after", [(16, 1, 7), (4, 0, 0), (5, 10, 10), (1, 0, 0)])
def test_create_indices_matches_reference(T, pad_before, pad_after):
    ends = np.cumsum([5, 20, 1, 16, 9])
    idx = create_indices(ends, T, pad_before, pad_after)
    pb, pa = min(pad_before, T - 1), min(pad_after, T - 1)
    np.testing.assert_array_equal(idx, reference_indices(ends, T, pb, pa))
    lengths = np.diff(ends, prepend=0)
    assert len(idx) == np.maximum(lengths - T + pb + pa + 1, 0).sum()

    mask = np.array([True, False, True, False, True])
    masked = create_indices(ends, T, pad_before, pad_after, episode_mask=mask)
    assert np.all(np.isin(masked[:, 0], idx[:, 0]))
    assert not np.any((masked[:, 0] >= 5) & (masked[:, 0] < 25))  # episode 1 skipped
    assert create_indices(ends, T, 0, 0, np.zeros(5, bool)).shape == (0, 4)


def test_sampler_pads_with_edge_frames():
    buf = pusht_like_buffer(lengths=(6, 3))
    sampler = SequenceSampler(buf, sequence_length=5, pad_before=2, pad_after=2)
    state = buf["state"]
    for i in range(len(sampler)):
        b0, b1, s0, s1 = sampler.indices[i]
        window = sampler.sample_sequence(i)["state"]
        assert window.shape == (5, 5) and window.dtype == np.float32
        np.testing.assert_array_equal(window[s0:s1], state[b0:b1])
        assert np.all(window[:s0] == state[b0]) and np.all(window[s1:] == state[b1 - 1])


def test_key_first_k_reads_only_first_frames():
    buf = pusht_like_buffer(lengths=(6,))
    full = SequenceSampler(buf, 4, pad_before=1, pad_after=3, keys=["img", "state"])
    first = SequenceSampler(buf, 4, pad_before=1, pad_after=3, keys=["img", "state"],
                            key_first_k={"state": 2, "img": 2})
    # window 0 starts with one padded frame: slots 0..2 hold buffer frames 0, 0, 1; slot 3 unread
    a, b = full.sample_sequence(0), first.sample_sequence(0)
    np.testing.assert_array_equal(b["state"][:3], a["state"][:3])
    assert np.isnan(b["state"][3:]).all()
    np.testing.assert_array_equal(b["img"][:3], a["img"][:3])
    assert (b["img"][3:] == 0).all()  # integer dtypes get 0 where Diffusion Policy gets NaN->0
    # window 4 reads frames 3, 4, (5 unread) then pads after the end by copying the unread slot
    np.testing.assert_array_equal(first.indices[4], [3, 6, 0, 3])
    late = first.sample_sequence(4)["state"]
    np.testing.assert_array_equal(late[:2], buf["state"][3:5])
    assert np.isnan(late[2:]).all()
    # the last window has one frame left, fewer than k: it is read and repeated as usual
    np.testing.assert_array_equal(first.sample_sequence(len(first) - 1)["state"],
                                  full.sample_sequence(len(full) - 1)["state"])


def test_val_mask_counts_and_determinism():
    assert get_val_mask(10, 0.0, seed=1).sum() == 0
    assert get_val_mask(10, 0.02, seed=1).sum() == 1  # at least one
    assert get_val_mask(206, 0.02, seed=42).sum() == 4  # round(4.12)
    assert get_val_mask(3, 0.9, seed=1).sum() == 2  # leaves one for training
    assert get_val_mask(1, 0.5, seed=1).sum() == 0
    np.testing.assert_array_equal(get_val_mask(50, 0.2, seed=7), get_val_mask(50, 0.2, seed=7))
    assert not np.array_equal(get_val_mask(50, 0.2, seed=7), get_val_mask(50, 0.2, seed=8))

    mask = ~get_val_mask(50, 0.2, seed=7)
    small = downsample_mask(mask, max_n=5, seed=3)
    assert small.sum() == 5 and not np.any(small & ~mask)
    np.testing.assert_array_equal(small, downsample_mask(mask, max_n=5, seed=3))
    np.testing.assert_array_equal(downsample_mask(mask, None), mask)


# ---------------------------------------------------------------------------- normaliser
def test_normalizer_limits_round_trip_and_constant_dim():
    rng = np.random.default_rng(0)
    obs = rng.uniform(-3, 7, (200, 4)).astype(np.float32)
    obs[:, 2] = 5.0  # constant: only shifted
    action = rng.normal(size=(10, 20, 2)).astype(np.float32)
    norm = LinearNormalizer()
    norm.fit({"obs": obs, "action": action})

    nobs = norm.normalize({"obs": torch.from_numpy(obs)})["obs"]
    cols = [0, 1, 3]
    torch.testing.assert_close(nobs[:, cols].min(0).values, -torch.ones(3))
    torch.testing.assert_close(nobs[:, cols].max(0).values, torch.ones(3))
    assert torch.all(nobs[:, 2] == 0.0)  # 5 -> middle of [-1, 1]
    assert norm["obs"].scale[2] == 1.0
    naction = norm["action"].normalize(action)  # [10, 20, 2] flattened over leading dims
    assert naction.shape == (10, 20, 2)
    assert torch.allclose(naction.reshape(-1, 2).abs().max(0).values, torch.ones(2))

    back = norm.unnormalize(norm.normalize({"obs": obs, "action": action}))
    torch.testing.assert_close(back["obs"], torch.from_numpy(obs))
    torch.testing.assert_close(back["action"], torch.from_numpy(action))
    assert all(not p.requires_grad for p in norm.parameters())

    x64 = torch.from_numpy(obs).double()
    assert norm["obs"].normalize(x64).dtype == torch.float64
    with pytest.raises(KeyError, match=r"'image'.*known keys.*'obs'"):
        norm.normalize({"image": obs})
    with pytest.raises(ValueError, match="4 dims"):
        norm["obs"].normalize(torch.zeros(3, 5))


def test_normalizer_gaussian_image_identity():
    rng = np.random.default_rng(1)
    keypoint = rng.normal(3.0, 2.0, (500, 9, 2)).astype(np.float32)
    norm = LinearNormalizer()
    norm.fit({"keypoint": keypoint}, mode="gaussian", last_n_dims=2)
    assert norm["keypoint"].scale.shape == (18,)
    out = norm["keypoint"].normalize(keypoint).reshape(-1, 18)
    assert out.mean(0).abs().max() < 1e-4 and (out.std(0) - 1).abs().max() < 1e-4

    norm.set_image("image")
    img = torch.rand(2, 3, 3, 8, 8)
    torch.testing.assert_close(norm["image"].normalize(img), img * 2 - 1)
    norm.set_identity("pos", 3)
    pos = torch.randn(4, 3)
    torch.testing.assert_close(norm.normalize({"pos": pos})["pos"], pos)


def test_fresh_normalizer_loads_state_dict(tmp_path):
    rng = np.random.default_rng(2)
    fitted = LinearNormalizer()
    fitted.fit({"obs": rng.normal(size=(50, 20)), "action": rng.uniform(0, 512, (50, 2))})
    fitted.set_image("image")
    assert "params_dict.obs.input_stats.min" in fitted.state_dict()  # Diffusion Policy's names
    save_file(fitted.state_dict(), tmp_path / "normalizer.safetensors")  # checkpoint format
    state = load_file(tmp_path / "normalizer.safetensors")

    fresh = LinearNormalizer()
    fresh.load_state_dict(state)
    assert sorted(fresh.keys()) == ["action", "image", "obs"] and "obs" in fresh
    batch = {"obs": torch.randn(4, 2, 20), "action": torch.randn(4, 16, 2) * 100,
             "image": torch.rand(4, 2, 3, 8, 8)}
    for key, value in fitted.normalize(batch).items():
        assert torch.equal(fresh.normalize(batch)[key], value)
    assert all(not p.requires_grad for p in fresh.parameters())

    class Policy(torch.nn.Module):  # nested under a prefix, as in a policy checkpoint
        def __init__(self):
            super().__init__()
            self.normalizer = LinearNormalizer()
            self.head = torch.nn.Linear(2, 2)

    trained = Policy()
    trained.normalizer.load_state_dict(state)
    restored = Policy()
    restored.load_state_dict(trained.state_dict())
    assert torch.equal(restored.normalizer["action"].offset, fitted["action"].offset)


# ---------------------------------------------------------------------------- dataset
PUSHT_LOWDIM = {"obs": ["keypoint", {"key": "state", "cols": [0, 2]}]}
PUSHT_IMAGE = {"obs_keys": {"agent_pos": [("state", [0, 2])]}, "rgb_keys": {"image": "img"}}


def test_parse_obs_keys_forms():
    expected = {"obs": [("keypoint", None), ("state", (0, 2))]}
    assert parse_obs_keys(PUSHT_LOWDIM) == expected
    assert parse_obs_keys({"obs": [("keypoint", None), ["state", [0, 2]]]}) == expected
    with pytest.raises(ValueError, match="list of sources"):
        parse_obs_keys({"obs": "keypoint"})


def test_pusht_lowdim_dataset():
    buf = pusht_like_buffer(lengths=(20, 31, 17))
    ds = SequenceDataset(buf, horizon=16, pad_before=1, pad_after=7, obs_keys=PUSHT_LOWDIM)
    assert not ds.obs_as_dict
    item = ds[0]
    assert item["obs"].shape == (16, 20) and item["obs"].dtype == torch.float32
    assert item["action"].shape == (16, 2) and item["action"].dtype == torch.float32
    # first window: slot 0 pads frame 0, slot 1.. are frames 0..
    np.testing.assert_array_equal(item["obs"][1, :18].numpy(), buf["keypoint"][0].reshape(18))
    np.testing.assert_array_equal(item["obs"][1, 18:].numpy(), buf["state"][0, :2])
    lengths = buf.episode_lengths
    assert len(ds) == np.maximum(lengths - 16 + 1 + 7 + 1, 0).sum()

    norm = ds.get_normalizer()
    assert sorted(norm.keys()) == ["action", "obs"]
    nobs = norm["obs"].normalize(torch.from_numpy(np.concatenate(
        [buf["keypoint"].reshape(-1, 18), buf["state"][:, :2]], axis=1)))
    assert math.isclose(nobs.min().item(), -1, abs_tol=1e-5)
    assert math.isclose(nobs.max().item(), 1, abs_tol=1e-5)
    assert ds.get_all_actions().shape == (buf.n_steps, 2)


def test_pusht_image_dataset(tmp_path):
    buf = pusht_like_buffer(lengths=(20, 31, 17))
    buf.save(tmp_path / "pusht.zarr")
    ds = SequenceDataset.from_zarr(tmp_path / "pusht.zarr", horizon=16, pad_before=1,
                                   pad_after=7, expect={"img": (8, 8, 3), "state": (5,)},
                                   **PUSHT_IMAGE)
    assert ds.obs_as_dict and sorted(ds.replay_buffer.keys()) == ["action", "img", "state"]
    item = ds[3]
    assert item["obs"]["image"].shape == (16, 3, 8, 8)
    assert item["obs"]["agent_pos"].shape == (16, 2)
    image = item["obs"]["image"]  # bytes, scaled to [0, 1] on the policy's device
    assert image.dtype == torch.uint8
    b0, _, s0, _ = ds.sampler.indices[3]
    assert torch.equal(image[s0], torch.from_numpy(buf["img"][b0]).permute(2, 0, 1))

    norm = ds.get_normalizer()
    assert sorted(norm.keys()) == ["action", "agent_pos", "image"]
    unit = image.float() / 255
    torch.testing.assert_close(norm["image"].normalize(unit), unit * 2 - 1)

    first = SequenceDataset.from_zarr(tmp_path / "pusht.zarr", horizon=16, pad_before=1,
                                      pad_after=7, first_k={"img": 2, "state": 2}, **PUSHT_IMAGE)
    assert first[3]["obs"]["image"].shape == (2, 3, 8, 8)  # only the To frames travel
    assert torch.equal(first[3]["obs"]["image"], image[:2])


def test_validation_split_is_disjoint_and_seeded():
    buf = pusht_like_buffer(lengths=[5 + i % 4 for i in range(20)])
    kwargs = dict(horizon=4, pad_before=1, pad_after=3, obs_keys={"obs": ["keypoint"]},
                  val_ratio=0.2)
    ds = SequenceDataset(buf, seed=3, **kwargs)
    val = ds.get_validation_dataset()
    assert ds.episode_mask.sum() == 16 and val.episode_mask.sum() == 4
    assert not np.any(ds.episode_mask & val.episode_mask)
    train_steps = set(ds.sampler.indices[:, 0].tolist())
    assert not train_steps & set(val.sampler.indices[:, 0].tolist())
    assert len(ds) + len(val) == len(SequenceDataset(buf, **{**kwargs, "val_ratio": 0.0}))
    np.testing.assert_array_equal(SequenceDataset(buf, seed=3, **kwargs).val_mask, ds.val_mask)
    assert ds.get_all_actions().shape[0] == buf.episode_lengths[ds.episode_mask].sum()

    small = SequenceDataset(buf, seed=3, max_train_episodes=5, **kwargs)
    assert small.episode_mask.sum() == 5
    assert not np.any(small.episode_mask & small.get_validation_dataset().episode_mask)


def test_as_uint8_rounds_floats_and_rejects_out_of_range():
    frames = np.array([[0.0, 0.4, 0.6], [127.5, 254.6, 255.0]], np.float32)
    assert as_uint8(frames).tolist() == [[0, 0, 1], [128, 255, 255]]
    raw = np.arange(6, dtype=np.uint8).reshape(2, 3)
    assert as_uint8(raw) is raw
    with pytest.raises(ValueError, match=r"0\.\.255, got \[-1\.0, 3\.0\]"):
        as_uint8(np.array([-1.0, 3.0]))
    with pytest.raises(ValueError, match="256"):
        as_uint8(np.array([256.0]))
