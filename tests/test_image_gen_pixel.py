"""The pixel-space recipe: the pixel MAE (space-to-depth), ConvNeXt-V2 features on timm, pixel
features of latent generators through the VAE decoder, and the pixel configs end to end."""

import json

import numpy as np
import pytest
import timm
import torch
from omegaconf import OmegaConf
from PIL import Image
from safetensors.torch import save_file

from drifting_policy.config import compose
from image_gen.cli import main as cli
from image_gen.convnext import ConvNeXtFeatures, load_convnext
from image_gen.dit import DiT, count_params
from image_gen.features import (
    DriftFeatures,
    build_drift_features,
    feature_drift_loss,
    feature_sets,
    freeze,
)
from image_gen.mae import ResNetMAE, depth_to_space, space_to_depth
from image_gen.train import train, train_mae
from image_gen.vae import decode_pixels

pytestmark = pytest.mark.usefixtures("single_thread")


# --------------------------------------------------------------------------- pixel MAE


def mae_param_formula(in_channels, width, stages, num_classes=0, input_patch=1):
    """Parameters of the release MAEResNetJAX, layer by layer (bias-free convs, GroupNorm scale
    and bias, a projection shortcut on the first block of stages 2..4)."""
    grid = in_channels * input_patch**2

    def conv(i, o, k):
        return i * o * k * k

    def gn(c):
        return 2 * c

    widths = [width * 2**i for i in range(len(stages))]
    n = conv(grid, width, 3) + gn(width)  # conv1 + gn1
    c_prev = width
    for i, (blocks, c) in enumerate(zip(stages, widths)):
        for j in range(blocks):
            c_in = c_prev if j == 0 else c
            n += conv(c_in, c, 3) + gn(c) + conv(c, c, 3) + gn(c)
            if i > 0 and j == 0:
                n += conv(c_in, c, 1) + gn(c)
        n += gn(c)  # layer{i}_norm
        c_prev = c
    n += conv(widths[-1], widths[-1], 3) + gn(widths[-1])  # bridge
    c_x = widths[-1]
    for c_skip in widths[:-1][::-1] + [width]:  # up43, up32, up21, up10
        n += gn(c_x + c_skip) + conv(c_x + c_skip, c_skip, 3) + gn(c_skip)
        n += conv(c_skip, c_skip, 3) + gn(c_skip)
        c_x = c_skip
    n += conv(width, grid, 1) + grid  # head (with bias)
    return n + (widths[-1] * num_classes + num_classes if num_classes else 0)


@pytest.mark.parametrize("kw", [
    dict(in_channels=3, width=640, stages=(3, 4, 6, 3), num_classes=1000, input_patch=8),
    dict(in_channels=4, width=256, stages=(3, 4, 6, 3), num_classes=1000),
    dict(in_channels=1, width=8, stages=(1, 1), num_classes=10, input_patch=2),
])
def test_mae_parameter_counts_equal_the_release_formula(kw):
    with torch.device("meta"):
        mae = ResNetMAE(**kw)
    assert count_params(mae) == mae_param_formula(**kw)
    # the decoder predicts every value of a grid cell: C * input_patch^2 channels
    assert mae.head.out_channels == kw["in_channels"] * kw.get("input_patch", 1) ** 2


def test_space_to_depth_order_and_round_trip():
    x = torch.randn(2, 3, 8, 12)
    y = space_to_depth(x, 4)
    assert y.shape == (2, 48, 2, 3)
    for i, j, c, r, s in ((0, 0, 0, 0, 0), (1, 3, 2, 1, 2), (3, 2, 1, 0, 1)):
        # release `patch_input`: channel (i * p + j) * C + c holds pixel (i, j) of channel c
        assert torch.equal(y[:, (i * 4 + j) * 3 + c, r, s], x[:, c, r * 4 + i, s * 4 + j])
    assert torch.equal(depth_to_space(y, 4), x)


def tiny_pixel_mae(**kw) -> ResNetMAE:
    torch.manual_seed(0)
    return ResNetMAE(**{"in_channels": 3, "width": 8, "stages": (1, 1), "input_patch": 4,
                        "num_classes": 2, **kw})


def test_pixel_mae_masks_grid_cells_and_takes_the_loss_on_the_grid():
    mae = tiny_pixel_mae()
    assert mae.min_multiple == 8  # input_patch 4 x lcm(2, patch 2)
    x = torch.randn(16, 3, 32, 32)
    x_masked, mask = mae.mask(x, 0.5, torch.Generator().manual_seed(0))
    coarse = mask[:, :, ::8, ::8]  # 2x2 cells of the 8x8 grid = 8x8 pixel blocks
    assert torch.equal(mask, coarse.repeat_interleave(8, 2).repeat_interleave(8, 3))
    assert abs(float(coarse.mean()) - 0.5) < 0.07  # 256 blocks
    assert torch.equal(x_masked, torch.where(mask.bool(), 0.0, x))

    recon, logits = mae(x_masked)
    assert recon.shape == x.shape and logits.shape == (16, 2)
    # release: per sample, squared errors summed over each masked 4x4x3 cell, averaged over the
    # masked cells (= pixels / 16), then the batch mean
    per = ((recon - x) ** 2 * mask).sum((1, 2, 3)) / (mask.sum((1, 2, 3)) / 16)
    loss = mae.recon_loss(recon, x, mask)
    assert torch.allclose(loss, per.mean(), rtol=1e-5)
    assert torch.allclose(mae.mae_loss(x, 0.5, torch.Generator().manual_seed(0)), loss)

    # the encoder runs on the 8x8 grid of 48 channels
    acts = dict(zip(mae.activation_names(), mae.activations(x[:2])))
    assert {k: tuple(v.shape) for k, v in acts.items()} == {
        "stem": (2, 8, 8, 8), "stage1": (2, 8, 8, 8), "stage2": (2, 16, 4, 4)}
    with pytest.raises(ValueError, match="x"):
        mae.activations(torch.randn(1, 3, 20, 20))  # not a multiple of 8
    with pytest.raises(ValueError, match="input_patch"):
        ResNetMAE(in_channels=3, width=8, input_patch=0)


def test_pixel_mae_features_take_rms_on_the_grid():
    mae = freeze(tiny_pixel_mae(num_classes=0))
    x = torch.randn(2, 3, 3, 16, 16)
    feats = feature_sets(x, mae)
    assert feats["raw/global"].shape == (2, 3, 768)
    cells = space_to_depth(x.reshape(6, 3, 16, 16), 4)  # [6, 48, 4, 4]
    rms = (cells.square().mean((2, 3)) + 1e-6).sqrt().reshape(2, 3, 48)
    assert torch.allclose(feats["raw/rms"], rms, atol=1e-6)  # release norm_x of the MAE input
    assert feats["stem/loc"].shape == (2 * 16, 3, 8) and feats["stage2/loc"].shape == (2 * 4, 3, 16)


# --------------------------------------------------------------------------- ConvNeXt-V2


def tiny_convnext(num_classes=0):
    """A randomly initialised ConvNeXt-V2-Atto (timm, no weights downloaded)."""
    torch.manual_seed(0)
    return timm.create_model("convnextv2_atto", pretrained=False, num_classes=num_classes)


def test_convnext_features_names_shapes_and_values():
    enc = freeze(ConvNeXtFeatures(tiny_convnext(), resolution=64))
    x = torch.rand(3, 3, 32, 32) * 2 - 1
    feats = enc(x)
    widths, sides = (40, 80, 160, 320), (16, 8, 4, 2)  # 64 px: stem /4, then /2 per stage
    expect = {"convnext/global": (3, 1, 320)}
    for i, (c, s) in enumerate(zip(widths, sides)):
        expect[f"convnext/stage{i}/mean"] = expect[f"convnext/stage{i}/std"] = (3, 1, c)
        if i > 0:  # the release keeps no per-location vectors of the 56x56 first stage
            expect[f"convnext/stage{i}/loc"] = (3, s * s, c)
    assert {k: tuple(v.shape) for k, v in feats.items()} == expect

    # values against timm's own intermediate outputs, without a resize
    enc.resolution = None
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    feats = enc(x)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    with torch.no_grad():
        stages = enc.model.forward_intermediates(((x + 1) / 2 - mean) / std,
                                                 intermediates_only=True)
        pooled = enc.model.forward_head(enc.model.forward_features(((x + 1) / 2 - mean) / std),
                                        pre_logits=True)
    y = stages[2]  # [2, 160, 4, 4]
    y = (y - y.mean(1, keepdim=True)) / (y.var(1, unbiased=False, keepdim=True).sqrt() + 1e-3)
    assert torch.allclose(feats["convnext/stage2/loc"][1, 5], y[1, :, 1, 1], atol=1e-4)
    assert torch.allclose(feats["convnext/stage2/mean"][:, 0], y.mean((2, 3)), atol=1e-5)
    assert torch.allclose(feats["convnext/stage2/std"][:, 0],
                          (y.var((2, 3), unbiased=False) + 1e-6).sqrt(), atol=1e-4)
    assert torch.allclose(feats["convnext/global"][:, 0], pooled, atol=1e-5)


def test_convnext_and_pixel_mae_gradients_reach_the_generator_only():
    torch.manual_seed(0)
    gen_net = DiT.from_preset("tiny", input_size=32, in_channels=3, patch_size=8, hidden=32,
                              depth=1, heads=2, n_class_tokens=1)
    with torch.no_grad():
        gen_net.final.linear.weight.normal_(0, 0.1)  # a generator past its zero init
    features = freeze(DriftFeatures(tiny_pixel_mae(num_classes=0),
                                    ConvNeXtFeatures(tiny_convnext(), resolution=32)))
    p, g = 2, 3
    gen = gen_net.generate(torch.tensor([0, 0, 0, 1, 1, 1]), 1.0).view(p, g, 3, 32, 32)
    pos = torch.rand(p, 4, 3, 32, 32) * 2 - 1
    neg = torch.rand(p, 2, 3, 32, 32) * 2 - 1
    total, info = feature_drift_loss(gen, pos, neg, features, weight_neg=torch.full((p, 2), 0.5))
    names = [k for k in info if not k.startswith(("scale/", "lambda/"))]
    assert {"stage1/mean4", "stage2/std4", "stage2/loc"} <= set(names)  # MAE maps 8x8, 4x4
    assert {n for n in names if n.startswith("convnext/")} >= {
        "convnext/stage0/mean", "convnext/stage3/loc", "convnext/global"}
    assert total.item() == pytest.approx(sum(float(info[k]) for k in names), rel=1e-5)
    total.backward()
    assert gen_net.final.linear.weight.grad.abs().sum() > 0
    assert all(q.grad is None and not q.requires_grad for q in features.parameters())
    # sum over parts: dropping ConvNeXt leaves exactly the MAE's features
    mae_only = feature_sets(pos, features.mae)
    full = feature_sets(pos, features)
    assert set(full) - set(mae_only) == {n for n in full if n.startswith("convnext/")}
    assert all(torch.equal(full[k], v) for k, v in mae_only.items())


def test_load_convnext_reads_a_local_file_and_names_errors(tmp_path):
    src = tiny_convnext(num_classes=7)  # a classifier head, dropped on load
    save_file(src.state_dict(), tmp_path / "model.safetensors")
    torch.save(src.state_dict(), tmp_path / "pytorch_model.bin")
    for name in ("model.safetensors", "pytorch_model.bin"):
        model = load_convnext("convnextv2_atto", tmp_path / name)
        assert model.num_classes == 0
        theirs = src.state_dict()
        assert all(torch.equal(v, theirs[k]) for k, v in model.state_dict().items())
    with pytest.raises(FileNotFoundError, match="encoder.convnext.weights: expected a local"):
        load_convnext("convnextv2_atto", tmp_path / "missing.safetensors")
    with pytest.raises(FileNotFoundError, match="not given"):
        load_convnext("convnextv2_atto", None)
    with pytest.raises(ValueError, match="encoder.convnext.model"):
        load_convnext("resnet50", tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match="does not fit convnextv2_femto"):
        load_convnext("convnextv2_femto", tmp_path / "model.safetensors")


def test_build_drift_features_from_the_encoder_section(tmp_path):
    save_file(tiny_convnext().state_dict(), tmp_path / "c.safetensors")
    conv = {"model": "convnextv2_atto", "weights": str(tmp_path / "c.safetensors"),
            "resolution": 32}
    feats = build_drift_features(OmegaConf.create({"path": None, "convnext": conv}), "pixel",
                                 None)
    assert feats.convnext.resolution == 32 and feats.mae is None and feats.vae is None
    assert not any(q.requires_grad for q in feats.parameters()) and not feats.training
    raw = build_drift_features(OmegaConf.create({"path": None}), "digits", None)
    assert raw.convnext is None and set(feature_sets(torch.randn(1, 2, 1, 8, 8), raw)) == {
        "raw/global", "raw/rms"}
    for cfg, kind, key in (({"convnext": {**conv, "size": 3}}, "pixel", "encoder.convnext"),
                           ({"convnext": conv}, "digits", "encoder.convnext"),
                           ({"convnext": conv}, "latent", "encoder.vae"),
                           ({"convnext": conv, "vae": str(tmp_path)}, "pixel", "encoder.vae"),
                           ({"vae": str(tmp_path)}, "latent", "encoder.vae")):
        with pytest.raises((ValueError, FileNotFoundError), match=key):
            build_drift_features(OmegaConf.create(cfg), kind, None)


# --------------------------------------------------------------------------- latent -> pixels


def _tiny_vae():
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    return AutoencoderKL(block_out_channels=(8, 8), down_block_types=("DownEncoderBlock2D",) * 2,
                         up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4,
                         norm_num_groups=4, layers_per_block=1, sample_size=16)


def test_latent_generator_gets_pixel_features_through_the_frozen_decoder():
    vae = _tiny_vae()
    torch.manual_seed(1)
    latent_mae = ResNetMAE(in_channels=4, width=8, stages=(1, 1))
    features = freeze(DriftFeatures(latent_mae, ConvNeXtFeatures(tiny_convnext(), 32), vae))
    z = torch.randn(2, 3, 4, 8, 8, requires_grad=True)  # generator output: latents
    pos, neg = torch.randn(2, 4, 4, 8, 8), torch.randn(2, 2, 4, 8, 8)
    total, info = feature_drift_loss(z, pos, neg, features, weight_neg=torch.ones(2, 2))
    assert "convnext/stage3/loc" in info and "stage2/loc" in info and "raw/global" in info
    total.backward()
    assert z.grad.abs().sum() > 0
    assert all(q.grad is None for q in features.parameters())

    # the ConvNeXt features are those of the decoded pixels [B, 3, 16, 16]
    with torch.no_grad():
        pixels = decode_pixels(vae, z.detach().reshape(6, 4, 8, 8))
        assert pixels.shape == (6, 3, 16, 16)
        direct = features.convnext(pixels)["convnext/stage1/loc"]  # [6, 16, 80] (32 px / 8)
        ours = feature_sets(z.detach(), features)["convnext/stage1/loc"]  # [2 * 16, 3, 80]
    assert torch.allclose(ours, direct.reshape(2, 3, 16, 80).transpose(1, 2).reshape(32, 3, 80))
    # the gradient through the decoder alone is non-zero
    only_pixels = freeze(DriftFeatures(None, features.convnext, vae))
    z.grad = None
    feature_drift_loss(z, pos, neg, only_pixels, weight_neg=torch.ones(2, 2))[0].backward()
    assert z.grad.abs().sum() > 0


# --------------------------------------------------------------------------- end to end


def _image_folder(root, n_classes=2, n=6):
    rng = np.random.default_rng(0)
    for c in range(n_classes):
        (root / f"c{c}").mkdir(parents=True)
        for i in range(n):
            Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(
                root / f"c{c}" / f"{i}.png")
    return root


def test_pixel_configs_run_the_release_recipe_end_to_end(tmp_path, capsys):
    """mae_pixel (space-to-depth MAE) -> pixel_b16 (MAE + ConvNeXt-V2 features) -> sample, on a
    tiny ImageFolder at 32x32 with a random ConvNeXt-V2-Atto from a local weights file."""
    root = _image_folder(tmp_path / "data")
    common = [f"data.path={root}", "data.image_size=32", "data.num_workers=0", "device=cpu",
              "train.progress=false", "train.wandb_mode=disabled"]
    mae = train_mae(compose("image_gen/mae_pixel", [
        *common, f"train.out={tmp_path / 'mae'}", "train.steps=2", "train.warmup=1",
        "mae.width=8", "mae.stages=[1,1]", "mae.num_classes=2", "mae.input_patch=4",
        "mae_train.batch=4", "mae_train.cls_steps=1"]))
    save_file(tiny_convnext().state_dict(), tmp_path / "convnext.safetensors")
    cfg = compose("image_gen/pixel_b16", [
        *common, f"train.out={tmp_path / 'gen'}", "train.steps=2", "train.warmup=1",
        "model.preset=tiny", "+model.overrides.input_size=32", "+model.overrides.in_channels=3",
        "+model.overrides.patch_size=8", "+model.overrides.hidden=32", "+model.overrides.depth=1",
        "+model.overrides.heads=2", "+model.overrides.num_classes=2",
        "+model.overrides.n_class_tokens=1",
        f"encoder.path={mae}", "encoder.convnext.model=convnextv2_atto",
        f"encoder.convnext.weights={tmp_path / 'convnext.safetensors'}",
        "encoder.convnext.resolution=32",
        "drift.labels_per_step=2", "drift.gen_per_label=3", "drift.pos_per_sample=3",
        "drift.n_unc=2", "drift.push_per_step=8", "drift.queue_per_class=8",
        "drift.queue_global=16", "drift.queue_dtype=float32"])
    ckpt = train(cfg)
    meta = json.loads((ckpt / "meta.json").read_text())
    assert np.isfinite(meta["loss"])
    assert any(k.startswith("convnext/stage3/loc") for k in meta)  # ConvNeXt features logged
    assert any(k.startswith("stem/loc") for k in meta)  # and the pixel MAE's
    out = tmp_path / "samples"
    assert cli(["sample", "--checkpoint", str(ckpt), "--alpha", "1.5", "--n", "4",
                "--out", str(out)]) == 0
    paths = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    with np.load(paths["npz"]) as f:
        assert f["samples"].shape == (4, 3, 32, 32) and np.isfinite(f["samples"]).all()
        assert f["images"].shape == (4, 32, 32, 3)
    # the pixel recipe refuses to run without the user's ConvNeXt weights
    with pytest.raises(FileNotFoundError, match="encoder.convnext.weights"):
        train(compose("image_gen/pixel_b16", [*common, f"train.out={tmp_path / 'x'}",
                                              f"encoder.path={mae}",
                                              f"encoder.convnext.weights={tmp_path / 'no'}",
                                              "model.preset=tiny",
                                              "+model.overrides.input_size=32",
                                              "+model.overrides.in_channels=3",
                                              "+model.overrides.patch_size=8",
                                              "+model.overrides.num_classes=2"]))


def test_digits_demo_writes_both_recipes(tmp_path, monkeypatch):
    """`image-gen demo` at a toy budget: the latent-style and the pixel (space-to-depth MAE) runs
    and the raw-only ablation, their proxy FDs in metrics.json, and both sample grids."""
    from image_gen import demo

    monkeypatch.setattr(demo, "QUICK", demo.Budget(mae_steps=2, mae_cls_steps=1, gen_steps=2,
                                                   ablation_steps=2, classifier_epochs=1))
    metrics = demo.run_demo(tmp_path, quick=True)  # quick: no anti-symmetry ablation
    saved = json.loads((tmp_path / "metrics.json").read_text())
    for key in ("proxy_fd", "proxy_fd_pixel", "proxy_fd_raw_only", "proxy_fd_real_baseline"):
        assert np.isfinite(saved[key]) and saved[key] == metrics[key]
    assert "proxy_fd_broken_antisymmetry" not in saved
    assert compose("image_gen/digits_mae_pixel").mae.input_patch == 2  # the pixel run's MAE
    assert (tmp_path / "mae_pixel").is_dir() and (tmp_path / "generator_pixel").is_dir()
    for name in ("samples.png", "samples_pixel.png"):
        with Image.open(tmp_path / name) as im:
            assert im.size[0] >= 256
