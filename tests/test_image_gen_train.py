"""The image trainer: queues (against a deque reference), training-time CFG, ImageFolder + latent
cache, per-rank checkpoints and exact resume, train -> sample, FID errors and the count-params
CLI. Data parallelism: test_image_gen_dist.py; device placement: test_image_gen_device.py."""

import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from drifting_policy.config import compose
from image_gen.bank import ClassQueues
from image_gen.cli import main as cli
from image_gen.data import MANIFEST, Digits, ImageFolderFlips, LatentCache, adm_center_crop
from image_gen.dit import DiT
from image_gen.guidance import sample_alpha, unconditional_weights
from image_gen.train import train, train_mae

pytestmark = pytest.mark.usefixtures("single_thread")

# A generator run small enough for tests: 3 labels x 4 samples, 4 positives, 2 unconditional.
TINY = ["model.overrides.hidden=32", "model.overrides.depth=1", "model.overrides.heads=2",
        "+model.overrides.n_class_tokens=1",
        "drift.labels_per_step=3", "drift.gen_per_label=4", "drift.pos_per_sample=4",
        "drift.n_unc=2", "drift.push_per_step=16", "drift.queue_per_class=8",
        "drift.queue_global=20", "drift.alpha_max=2.0", "train.warmup=2", "train.progress=false",
        "train.wandb_mode=disabled", "encoder.path=null"]


def _digits_cfg(out, *extra):
    return compose("image_gen/digits", [f"train.out={out}", *TINY, *extra])


# ---------------------------------------------------------------- queues


def test_class_queue_is_fifo_with_caps_and_never_mixes_classes():
    q = ClassQueues(num_classes=3, sample_shape=(2,), per_class=3, global_size=4)
    # value = 10 * label + arrival index (arrival counted per class)
    x = torch.tensor([[0, 0], [10, 10], [1, 1], [2, 2], [3, 3], [4, 4]], dtype=torch.float32)
    q.push(x, torch.tensor([0, 1, 0, 0, 0, 0]))
    assert q.count.tolist() == [3, 1, 0]
    assert sorted(q.items[0, :, 0].tolist()) == [2.0, 3.0, 4.0]  # the two oldest were dropped
    assert sorted(q.global_items[:, 0].tolist()) == [1.0, 2.0, 3.0, 4.0]  # global cap 4, FIFO
    pos = q.sample_positive(torch.tensor([0, 1, 0]), 5, torch.Generator().manual_seed(0))
    assert pos.shape == (3, 5, 2)
    assert set(pos[0, :, 0].tolist()) <= {2.0, 3.0, 4.0} and set(pos[2, :, 0].tolist()) <= {
        2.0, 3.0, 4.0}
    assert (pos[1] == 10).all()  # class 1 holds one sample: drawn with replacement
    distinct = q.sample_positive(torch.tensor([0]), 3, torch.Generator().manual_seed(1))
    assert sorted(distinct[0, :, 0].tolist()) == [2.0, 3.0, 4.0]  # without replacement
    with pytest.raises(ValueError, match=r"class queues \[2\] are empty"):
        q.sample_positive(torch.tensor([2]), 1)
    unc = q.sample_unconditional((2, 3), torch.Generator().manual_seed(0))
    assert unc.shape == (2, 3, 2) and set(unc[..., 0].flatten().tolist()) <= {1.0, 2.0, 3.0, 4.0}
    with pytest.raises(ValueError, match="labels: expected values in"):
        q.push(x[:1], torch.tensor([3]))


def test_queue_state_round_trip():
    q = ClassQueues(4, (3,), per_class=2, global_size=3)
    q.push(torch.randn(7, 3), torch.tensor([0, 1, 1, 1, 2, 0, 3]))
    r = ClassQueues(4, (3,), per_class=2, global_size=3)
    r.load_state_dict(q.state_dict())
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    labels = torch.tensor([0, 1, 2, 3])
    assert torch.equal(q.sample_positive(labels, 2, g1), r.sample_positive(labels, 2, g2))
    with pytest.raises(ValueError, match="queue state items: expected shape"):
        ClassQueues(4, (3,), per_class=5).load_state_dict(q.state_dict())


def _fifo(q, c=None):
    """Queue contents oldest -> newest, read from the ring buffer (class c, or the global one)."""
    items, head, count = ((q.items[c], q.head[c], q.count[c]) if c is not None
                          else (q.global_items, q.global_head, q.global_count))
    cap, head, count = len(items), int(head), int(count)
    slots = range(count) if count < cap else [(head + i) % cap for i in range(cap)]
    return [items[i, 0].item() for i in slots]


def test_vectorised_push_matches_a_deque_reference():
    from collections import deque

    k, per_class, global_size = 5, 4, 7
    q = ClassQueues(k, (2,), per_class=per_class, global_size=global_size)
    ref = [deque(maxlen=per_class) for _ in range(k)]
    ref_global = deque(maxlen=global_size)
    g = torch.Generator().manual_seed(0)
    serial = 0
    for n in [0, 1, 3, 12, 40, 2, 9, 25, 1, 16]:  # batches far larger than a queue, too
        labels = torch.randint(0, 2 if n == 40 else k, (n,), generator=g)  # 40: 2 classes only
        values = torch.arange(serial, serial + n, dtype=torch.float32)
        serial += n
        q.push(torch.stack([values, -values], 1), labels)
        for v, c in zip(values.tolist(), labels.tolist()):
            ref[c].append(v)
            ref_global.append(v)
        for c in range(k):
            assert _fifo(q, c) == list(ref[c]), (n, c)
            assert int(q.count[c]) == len(ref[c])
        assert _fifo(q) == list(ref_global)
    assert torch.equal(q.items[..., 1], -q.items[..., 0])  # whole samples moved together


def test_samplers_draw_uniform_subsets_and_keep_the_storage_dtype():
    q = ClassQueues(2, (1,), per_class=8, global_size=6, dtype=torch.bfloat16)
    q.push(torch.arange(5.0)[:, None], torch.zeros(5, dtype=torch.long))  # class 0: 5 of 8 slots
    q.push(torch.tensor([[7.0]]), torch.tensor([1]))
    g = torch.Generator().manual_seed(0)
    rows = 20000
    sub = q.sample_positive(torch.zeros(rows, dtype=torch.long), 3, g)
    assert sub.dtype == torch.bfloat16 and sub.shape == (rows, 3, 1)
    sub = sub[..., 0].float()
    assert (sub[:, 0] != sub[:, 1]).all() and (sub[:, 1] != sub[:, 2]).all() and (
        sub[:, 0] != sub[:, 2]).all()  # a subset: no repeats within a row
    for position in range(3):  # every filled slot equally likely at every position: 1/5
        freq = torch.stack([(sub[:, position] == v).float().mean() for v in range(5)])
        assert torch.allclose(freq, torch.full((5,), 0.2), atol=0.015)
    repl = q.sample_positive(torch.zeros(rows, dtype=torch.long), 7, g)[..., 0].float()
    freq = torch.stack([(repl == v).float().mean() for v in range(5)])  # 7 > 5: with replacement
    assert torch.allclose(freq, torch.full((5,), 0.2), atol=0.01)
    assert (q.sample_positive(torch.tensor([1, 1]), 3, g) == 7).all()
    unc = q.sample_unconditional((rows // 10, 2, 4), g)  # 6 filled of 6: subsets of the 6
    assert unc.shape == (rows // 10, 2, 4, 1) and unc.dtype == torch.bfloat16
    flat = unc[..., 0].float().reshape(-1, 4)
    assert all(len(set(r)) == 4 for r in flat.tolist())
    freq = torch.stack([(flat == v).float().mean() for v in (1, 2, 3, 4, 7)])
    assert torch.allclose(freq, torch.full((5,), 4 / 6 / 4), atol=0.01)


# ---------------------------------------------------------------- guidance


def test_unconditional_weights_match_hand_computation():
    alpha = torch.tensor([1.0, 1.5, 3.0])
    w = unconditional_weights(alpha, gen_per_label=64, n_unc=32)
    # (alpha - 1) * (G - 1) / N_unc: 0, 0.5 * 63 / 32, 2 * 63 / 32
    expected = torch.tensor([0.0, 0.984375, 3.9375])[:, None].expand(3, 32)
    torch.testing.assert_close(w, expected)
    with pytest.raises(ValueError, match="alpha: expected guidance scales >= 1"):
        unconditional_weights(torch.tensor([0.5]), 4, 2)


@pytest.mark.parametrize("power", [1.0, 3.0, 5.0])
def test_alpha_follows_power_law_and_no_cfg_fraction(power):
    g = torch.Generator().manual_seed(0)
    a = sample_alpha(40000, 1.0, 4.0, power, 0.0, g).double()
    assert a.min() >= 1.0 and a.max() <= 4.0
    for t in (1.5, 2.0, 3.0):  # CDF of density ~ alpha^-p on [1, 4]
        if power == 1.0:
            cdf = np.log(t) / np.log(4.0)
        else:
            e = 1 - power
            cdf = (t**e - 1) / (4.0**e - 1)
        assert abs(float((a <= t).double().mean()) - cdf) < 0.01
    b = sample_alpha(10000, 1.0, 4.0, power, 0.3, torch.Generator().manual_seed(1))
    assert abs(float((b == 1.0).float().mean()) - 0.3) < 0.02


def test_drift_settings_name_the_bad_key():
    from omegaconf import OmegaConf

    from image_gen.train import DriftSettings

    for bad, match in (({"alpha_min": 0.5}, "drift.alpha_min: expected a guidance scale >= 1"),
                       ({"prefill_min_per_class": 0}, "drift.prefill_min_per_class"),
                       ({"labels": 3}, r"drift: unknown keys \['labels'\]")):
        with pytest.raises(ValueError, match=match):
            DriftSettings.from_cfg(OmegaConf.create(bad))
    s = DriftSettings.from_cfg(OmegaConf.create({"labels_per_step": 64}))
    assert [s.labels_per_rank(w) for w in (1, 2, 8, 64)] == [64, 32, 8, 1]
    for world in (3, 128):
        with pytest.raises(ValueError, match=f"multiple of the world size {world}"):
            s.labels_per_rank(world)


# ---------------------------------------------------------------- ImageFolder + latent cache


def _image_folder(root, n_per_class=(3, 2)):
    rng = np.random.default_rng(0)
    for c, n in enumerate(n_per_class):
        (root / f"class_{c}").mkdir(parents=True)
        for i in range(n):
            array = rng.integers(0, 256, (40 + 8 * i, 56, 3), dtype=np.uint8)
            Image.fromarray(array).save(root / f"class_{c}" / f"{i}.png")
    return root


def _tiny_vae():
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    return AutoencoderKL(block_out_channels=(8, 8), down_block_types=("DownEncoderBlock2D",) * 2,
                         up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4,
                         norm_num_groups=4, layers_per_block=1, sample_size=16).eval()


def test_adm_center_crop_and_flips(tmp_path):
    root = _image_folder(tmp_path / "data")
    data = ImageFolderFlips(root, size=16)
    assert len(data) == 10 and data.classes == ["class_0", "class_1"]
    x0, y0 = data[0]
    x1, y1 = data[1]
    assert x0.shape == (3, 16, 16) and y0 == y1 == 0 and torch.equal(x1, x0.flip(-1))
    im = Image.open(root / "class_0" / "0.png").convert("RGB")  # 56 x 40 -> box 28 x 20
    ref = adm_center_crop(im, 16)
    assert ref.size == (16, 16)
    torch.testing.assert_close(x0, torch.from_numpy(np.asarray(ref, np.float32)).permute(
        2, 0, 1) / 127.5 - 1)
    assert float(x0.min()) >= -1 and float(x0.max()) <= 1


def test_latent_cache_round_trip_and_resume_after_interruption(tmp_path, monkeypatch):
    from image_gen import vae as vae_mod

    root = _image_folder(tmp_path / "data")
    vae = _tiny_vae()
    kw = dict(size=16, shard_size=2, batch=2, seed=3, num_workers=0, vae=vae)
    full = vae_mod.cache_latents(root, None, tmp_path / "full", **kw)
    cache = LatentCache(full)
    assert len(cache) == 10 and cache.classes == ["class_0", "class_1"]
    # independent computation: shard k = images 2k, 2k+1, each followed by its mirror, encoded
    # in one batch with shard k's generator
    pixels = ImageFolderFlips(root, 16)
    for k in range(3):
        ids = [i for i in (2 * k, 2 * k + 1) if i < 5]
        x = torch.stack([t for i in ids for t in (pixels.image(i)[0], pixels.image(i)[0].flip(-1))])
        z = vae_mod.encode(vae, x, generator=vae_mod.shard_generator(3, k))
        for j, i in enumerate(ids):
            for f in range(2):
                got, label = cache[2 * i + f]
                assert got.shape == (4, 8, 8) and label == pixels.folder.samples[i][1]
                torch.testing.assert_close(got, z[2 * j + f], rtol=2e-3, atol=2e-3)  # float16

    # interrupted after the first shard's files: rerun resumes and matches the full cache
    calls = {"n": 0}
    real_save = vae_mod._save_npy

    def failing_save(path, array):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt("killed")
        real_save(path, array)

    monkeypatch.setattr(vae_mod, "_save_npy", failing_save)
    part = tmp_path / "part"
    with pytest.raises(KeyboardInterrupt):
        vae_mod.cache_latents(root, None, part, **kw)
    manifest = json.loads((part / MANIFEST).read_text())
    assert [s["index"] for s in manifest["shards"]] == [0] and not manifest["complete"]
    with pytest.raises(ValueError, match="incomplete"):
        LatentCache(part)
    first = (part / "latents_00000.npy").stat().st_mtime_ns
    monkeypatch.setattr(vae_mod, "_save_npy", real_save)
    vae_mod.cache_latents(root, None, part, **kw)
    assert (part / "latents_00000.npy").stat().st_mtime_ns == first  # not recomputed
    for k in range(3):
        for kind in ("latents", "labels"):
            a = np.load(full / f"{kind}_{k:05d}.npy")
            assert np.array_equal(a, np.load(part / f"{kind}_{k:05d}.npy"))
    with pytest.raises(ValueError, match="shard_size"):
        vae_mod.cache_latents(root, None, part, **{**kw, "shard_size": 3})


def test_vae_path_errors_name_the_key(tmp_path):
    from image_gen.vae import load_vae

    with pytest.raises(FileNotFoundError, match="vae: expected a local diffusers AutoencoderKL"):
        load_vae(tmp_path / "missing")


# ---------------------------------------------------------------- training


def _weights(path):
    return {**{f"model.{k}": v for k, v in load_file(path / "model.safetensors").items()},
            **{f"ema.{k}": v for k, v in load_file(path / "ema.safetensors").items()}}


def test_resume_is_bitwise_equal_to_an_uninterrupted_run(tmp_path):
    straight = train(_digits_cfg(tmp_path / "a", "train.steps=4"))
    cfg = _digits_cfg(tmp_path / "b", "train.steps=4", "train.stop_after=2")
    stopped = train(cfg)
    assert json.loads((stopped / "meta.json").read_text())["step"] == 2
    resumed = train(_digits_cfg(tmp_path / "b", "train.steps=4"))
    a, b = _weights(straight), _weights(resumed)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    sa = torch.load(straight / "train_state.pt", weights_only=True)
    sb = torch.load(resumed / "train_state.pt", weights_only=True)
    assert sa["step"] == sb["step"] == 4 and sa["world"] == 1
    assert sa["lr_scheduler"] == sb["lr_scheduler"] and sa["ema_step"] == sb["ema_step"] == 4
    ra, rb = (torch.load(p / "ranks" / "rank_00000.pt", weights_only=True)
              for p in (straight, resumed))
    qa, qb = ra["extra"]["queues"], rb["extra"]["queues"]
    assert all(torch.equal(qa[k], qb[k]) for k in qa)
    assert all(torch.equal(ra["generators"][k], rb["generators"][k]) for k in ("shared", "local"))
    assert ra["consumed"] == rb["consumed"] > 4 * 16
    assert sorted(p.name for p in resumed.iterdir()) == [
        "config.yaml", "ema.safetensors", "meta.json", "model.safetensors", "ranks",
        "train_state.pt"]
    assert not any(p.name.startswith(".") for p in resumed.parent.iterdir())  # nothing staged


def test_a_failed_checkpoint_write_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    from image_gen import checkpoint as ckpt_mod

    path = train(_digits_cfg(tmp_path, "train.steps=3", "train.stop_after=1"))
    before = {p.name: p.read_bytes() for p in path.rglob("*") if p.is_file()}

    def disk_full(*args, **kwargs):
        raise OSError("No space left on device")

    monkeypatch.setattr(ckpt_mod, "save_file", disk_full)  # fails after the rank file
    with pytest.raises(OSError, match="No space left"):
        train(_digits_cfg(tmp_path, "train.steps=3", "train.stop_after=1"))
    assert {p.name: p.read_bytes() for p in path.rglob("*") if p.is_file()} == before
    assert not any(p.name.startswith(".checkpoint.tmp") for p in tmp_path.iterdir())
    monkeypatch.undo()
    resumed = train(_digits_cfg(tmp_path, "train.steps=3"))
    assert json.loads((resumed / "meta.json").read_text())["step"] == 3


def test_checkpoint_of_another_world_size_or_layout_is_refused(tmp_path):
    cfg = _digits_cfg(tmp_path, "train.steps=2", "train.stop_after=1")
    path = train(cfg)
    state = torch.load(path / "train_state.pt", weights_only=True)
    torch.save({**state, "world": 2}, path / "train_state.pt")
    with pytest.raises(ValueError, match=r"written by 2 ranks, this job has 1; resume with the "
                                         r"same world size \(torchrun --nproc_per_node 2\)"):
        train(_digits_cfg(tmp_path, "train.steps=2"))
    old = {k: v for k, v in state.items() if k != "world"}  # the gathered layout of before
    torch.save({**old, "ranks": [{}]}, path / "train_state.pt")
    with pytest.raises(ValueError, match="older image-gen"):
        train(_digits_cfg(tmp_path, "train.steps=2"))


def test_mae_then_generator_then_sample_end_to_end(tmp_path, capsys):
    mae = train_mae(compose("image_gen/digits_mae", [
        f"train.out={tmp_path / 'mae'}", "train.steps=3", "mae_train.cls_steps=1",
        "mae_train.batch=8", "mae.width=4", "train.progress=false"]))
    meta = json.loads((mae / "meta.json").read_text())
    assert np.isfinite(meta["mae_loss"]) and np.isfinite(meta["cls_loss"])
    gen_cfg = _digits_cfg(tmp_path / "gen", "train.steps=2", f"encoder.path={mae}")
    ckpt = train(gen_cfg)
    meta = json.loads((ckpt / "meta.json").read_text())
    assert any(k.startswith("stem/loc") for k in meta) and np.isfinite(meta["loss"])

    out = tmp_path / "samples"
    assert cli(["sample", "--checkpoint", str(ckpt), "--alpha", "1.5", "--n", "25",
                "--out", str(out)]) == 0
    paths = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    with np.load(paths["npz"]) as f:
        assert f["samples"].shape == (25, 1, 16, 16) and np.isfinite(f["samples"]).all()
        assert f["labels"].tolist() == [i % 10 for i in range(25)]
        assert f["images"].shape == (25, 16, 16, 3) and f["images"].dtype == np.uint8
        assert float(f["alpha"]) == 1.5
    with Image.open(paths["png"]) as im:
        assert im.size[0] >= 256  # 10 classes x up to 10 samples, upscaled
    with pytest.raises(ValueError, match="alpha: expected a guidance scale >= 1"):
        cli(["sample", "--checkpoint", str(ckpt), "--alpha", "0.5", "--n", "2",
             "--out", str(out)])


def test_data_mismatch_is_named(tmp_path):
    cfg = _digits_cfg(tmp_path, "train.steps=1", "+model.overrides.in_channels=3")
    with pytest.raises(ValueError, match="model: expected samples"):
        train(cfg)


def test_digits_halves_split_every_class_and_have_unit_variance():
    a, b, every = Digits(part="a"), Digits(part="b"), Digits()
    assert len(a) + len(b) == len(every) == 1797
    assert abs(float(every.x.std()) - 1) < 1e-4 and abs(float(every.x.mean())) < 1e-4
    counts = [torch.bincount(d.y, minlength=10) for d in (a, b, every)]
    assert torch.equal(counts[0] + counts[1], counts[2])
    assert (counts[0] - counts[1]).abs().max() <= 1


# ---------------------------------------------------------------- metrics and CLI


def test_fid_without_inception_weights_errors_clearly(tmp_path, capsys):
    npz = tmp_path / "s.npz"
    np.savez(npz, images=np.zeros((2, 8, 8, 3), np.uint8))
    with pytest.raises(FileNotFoundError, match="feature_extractor_weights_path"):
        cli(["fid", "--samples", str(npz), "--reference", str(npz)])
    with pytest.raises(FileNotFoundError, match="no such file"):
        cli(["fid", "--samples", str(npz), "--reference", str(npz),
             "--inception", str(tmp_path / "nope.pth")])


def test_proxy_fd_separates_real_from_shuffled():
    from image_gen.metrics import frechet_distance

    rng = np.random.default_rng(0)
    a = torch.from_numpy(rng.normal(size=(500, 4)))
    b = torch.from_numpy(rng.normal(size=(500, 4)))
    shifted = b + torch.tensor([1.0, 0, 0, 0], dtype=torch.float64)
    assert frechet_distance(a, b) < 0.1
    assert abs(frechet_distance(a, shifted) - 1.0) < 0.2  # |mu1 - mu2|^2 = 1


@pytest.mark.parametrize("preset", ["B/2", "L/2"])
def test_count_params_cli_prints_the_preset_size(preset, capsys):
    assert cli(["count-params", "--preset", preset]) == 0
    printed = capsys.readouterr().out.strip()
    with torch.device("meta"):
        model = DiT.from_preset(preset)
    assert printed == str(sum(p.numel() for p in model.parameters()))
    paper = {"B/2": 133e6, "L/2": 463e6}[preset]
    assert abs(int(printed) / paper - 1) < 0.01
