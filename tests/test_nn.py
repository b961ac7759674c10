"""Network building blocks: the conditional 1-D U-Net and the shape_meta observation encoder."""

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from drifting_policy.nn.obs_encoder import (
    CropRandomizer,
    ObsEncoder,
    SpatialSoftmax,
    resnet18_gn_trunk,
    trunk_output_hw,
)
from drifting_policy.nn.unet1d import ConditionalUnet1D

pytestmark = pytest.mark.usefixtures("single_thread")

TINY = dict(
    input_dim=3,
    global_cond_dim=6,
    diffusion_step_embed_dim=16,
    down_dims=(16, 32),
    kernel_size=3,
    n_groups=4,
)



def n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


# --------------------------------------------------------------------------- ConditionalUnet1D


def unet_param_formula(
    input_dim, global_cond_dim, diffusion_step_embed_dim, down_dims, kernel_size, scale
):
    """Parameter count of DP's ConditionalUnet1D written out layer by layer."""
    d, k = diffusion_step_embed_dim, kernel_size
    cond = d + global_cond_dim

    def conv(i, o, kk):  # Conv1d / ConvTranspose1d weight + bias
        return i * o * kk + o

    def conv_block(i, o):  # conv + GroupNorm affine
        return conv(i, o, k) + 2 * o

    def res_block(i, o):
        film = (2 if scale else 1) * o
        residual = conv(i, o, 1) if i != o else 0
        return conv_block(i, o) + conv_block(o, o) + cond * film + film + residual

    total = (d * 4 * d + 4 * d) + (4 * d * d + d)  # step MLP
    chans = [input_dim, *down_dims]
    pairs = list(zip(chans[:-1], chans[1:], strict=True))
    for n, (i, o) in enumerate(pairs):
        total += res_block(i, o) + res_block(o, o)
        total += conv(o, o, 3) if n < len(pairs) - 1 else 0  # downsample
    total += 2 * res_block(chans[-1], chans[-1])
    for i, o in reversed(pairs[1:]):
        total += res_block(2 * o, i) + res_block(i, i) + conv(i, i, 4)  # upsample
    total += conv_block(down_dims[0], down_dims[0]) + conv(down_dims[0], input_dim, 1)
    return total


@pytest.mark.parametrize("scale", [True, False])
def test_unet_param_count_matches_formula(scale):
    net = ConditionalUnet1D(**TINY, cond_predict_scale=scale)
    cfg = {k: v for k, v in TINY.items() if k != "n_groups"}
    assert n_params(net) == unet_param_formula(**cfg, scale=scale)


def test_unet_param_count_dp_pusht_lowdim():
    cfg = dict(input_dim=2, global_cond_dim=2 * 20, diffusion_step_embed_dim=256)
    cfg.update(down_dims=(256, 512, 1024), kernel_size=5)
    with torch.device("meta"):
        net = ConditionalUnet1D(**cfg, n_groups=8, cond_predict_scale=True)
    # 65,783,298 is also what Diffusion Policy's own ConditionalUnet1D reports for this config
    assert n_params(net) == unet_param_formula(**cfg, scale=True) == 65_783_298


def test_unet_output_shape_and_timestep_forms():
    torch.manual_seed(0)
    net = ConditionalUnet1D(**TINY).eval()
    x, c = torch.randn(5, 8, 3), torch.randn(5, 6)
    with torch.no_grad():
        ref = net(x, torch.full((5,), 7), c)
        assert ref.shape == (5, 8, 3)
        for t in (7, 7.0, torch.tensor(7), torch.tensor([7])):
            torch.testing.assert_close(net(x, t, c), ref)


def test_unet_output_depends_on_cond_and_timestep():
    torch.manual_seed(0)
    net = ConditionalUnet1D(**TINY).eval()
    x, c = torch.randn(4, 8, 3), torch.randn(4, 6)
    with torch.no_grad():
        base = net(x, 3, c)
        assert (net(x, 3, c + 1.0) - base).abs().max() > 1e-4
        assert (net(x, 50, c) - base).abs().max() > 1e-4
        # each sample sees only its own condition
        c2 = c.clone()
        c2[0] += 1.0
        out = net(x, 3, c2)
        assert (out[0] - base[0]).abs().max() > 1e-4
        torch.testing.assert_close(out[1:], base[1:])


def test_film_scale_doubles_cond_encoder_params():
    def cond_encoder_params(net):
        return sum(n_params(m.cond_encoder) for m in net.modules() if hasattr(m, "cond_encoder"))

    with_scale = ConditionalUnet1D(**TINY, cond_predict_scale=True)
    bias_only = ConditionalUnet1D(**TINY, cond_predict_scale=False)
    assert cond_encoder_params(with_scale) == 2 * cond_encoder_params(bias_only)
    assert n_params(with_scale) - n_params(bias_only) == cond_encoder_params(bias_only)


def test_unet_shape_errors():
    net = ConditionalUnet1D(**TINY)  # two levels: T must be even
    c = torch.randn(2, 6)
    with pytest.raises(ValueError, match=r"horizon T=7 must be divisible by .* = 2"):
        net(torch.randn(2, 7, 3), 0, c)
    with pytest.raises(ValueError, match=r"sample: expected shape \[B, T, 3\].*\(2, 8, 4\)"):
        net(torch.randn(2, 8, 4), 0, c)
    with pytest.raises(ValueError, match=r"global_cond: expected shape \(2, 6\).*\(2, 5\)"):
        net(torch.randn(2, 8, 3), 0, torch.randn(2, 5))
    with pytest.raises(ValueError, match=r"timestep: .*got shape \(3,\)"):
        net(torch.randn(2, 8, 3), torch.zeros(3), c)


def test_unet_overfits_fixed_mapping():
    torch.manual_seed(0)
    net = ConditionalUnet1D(**TINY)
    x, c = torch.randn(16, 8, 3), torch.randn(16, 6)
    t = torch.randint(0, 100, (16,))
    target = torch.randn(16, 8, 3)
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    losses = []
    for _ in range(150):
        loss = (net(x, t, c) - target).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] / 10, (losses[0], losses[-1])


# --------------------------------------------------------------------------- SpatialSoftmax


def test_spatial_softmax_hot_spot_coordinates():
    h, w = 5, 7
    ss = SpatialSoftmax(in_channels=2, height=h, width=w, num_kp=2, temperature=0.1)
    with torch.no_grad():  # keypoint k reads input channel k
        ss.keypoint_conv.weight.copy_(torch.eye(2)[:, :, None, None])
        ss.keypoint_conv.bias.zero_()
    spots = [(1, 5), (4, 0)]  # (row, col) of the hot pixel per channel
    feat = torch.zeros(3, 2, h, w)
    for k, (r, col) in enumerate(spots):
        feat[:, k, r, col] = 10.0
    out = ss(feat)
    assert out.shape == (3, 2, 2)
    for k, (r, col) in enumerate(spots):
        expected = torch.tensor([-1 + 2 * col / (w - 1), -1 + 2 * r / (h - 1)])
        torch.testing.assert_close(out[:, k], expected.expand(3, 2), atol=1e-4, rtol=0)


def test_spatial_softmax_uniform_map_gives_centre_and_learnable_temperature():
    ss = SpatialSoftmax(8, 4, 6, num_kp=3, learnable_temperature=True)
    assert isinstance(ss.temperature, nn.Parameter)
    out = ss(torch.zeros(2, 8, 4, 6))
    torch.testing.assert_close(out, torch.zeros(2, 3, 2), atol=1e-6, rtol=0)
    assert "temperature" not in dict(SpatialSoftmax(8, 4, 6).named_parameters())


# --------------------------------------------------------------------------- ResNet18-GN trunk


def test_trunk_has_groupnorm_only_and_documented_output_size():
    trunk = resnet18_gn_trunk()
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in trunk.modules())
    gns = [m for m in trunk.modules() if isinstance(m, nn.GroupNorm)]
    assert len(gns) == 20  # one per BatchNorm of torchvision's resnet18
    assert all(g.num_groups == g.num_channels // 16 for g in gns)
    assert not any(isinstance(m, (nn.Linear, nn.AdaptiveAvgPool2d)) for m in trunk.modules())
    with torch.no_grad():
        for hw in [(32, 32), (40, 70)]:
            out = trunk(torch.randn(1, 3, *hw))
            assert out.shape == (1, 512, *trunk_output_hw(*hw))
    assert trunk_output_hw(84, 84) == (3, 3) and trunk_output_hw(76, 76) == (3, 3)


# --------------------------------------------------------------------------- crops


def index_image(n, h, w):
    """[n, 2, h, w] images whose pixel value encodes its own (row, col): 1000 * row + col."""
    r = torch.arange(h, dtype=torch.float32)[:, None] * 1000
    c = torch.arange(w, dtype=torch.float32)[None, :]
    return (r + c).expand(n, 2, h, w).clone()


def test_crop_train_random_per_sample_windows():
    torch.manual_seed(0)
    crop = CropRandomizer(6, 5).train()
    img = index_image(32, 12, 10)
    out = crop(img)
    assert out.shape == (32, 2, 6, 5)
    tops, lefts = (out[:, 0, 0, 0] // 1000).long(), (out[:, 0, 0, 0] % 1000).long()
    for i in range(32):  # every crop is an exact window of its own image
        torch.testing.assert_close(
            out[i], img[i, :, tops[i] : tops[i] + 6, lefts[i] : lefts[i] + 5], rtol=0, atol=0
        )
    assert len(set(zip(tops.tolist(), lefts.tolist(), strict=True))) > 1  # per-sample offsets
    assert not torch.equal(crop(img), out)  # and fresh ones each call


def test_crop_eval_is_deterministic_centre_crop():
    crop = CropRandomizer(6, 4).eval()
    img = index_image(3, 12, 10)
    out = crop(img)
    torch.testing.assert_close(out, img[:, :, 3:9, 3:7], rtol=0, atol=0)
    assert torch.equal(crop(img), out)


# --------------------------------------------------------------------------- ObsEncoder


SHAPE_META = {
    "obs": {
        "wrist_image": {"shape": [3, 48, 48], "type": "rgb"},
        "agentview_image": {"shape": [3, 48, 48], "type": "rgb"},
        "keypoint": {"shape": [9, 2], "type": "low_dim"},
        "agent_pos": {"shape": [2], "type": "low_dim"},
    },
    "action": {"shape": [2]},
}


def make_obs(n=3):
    torch.manual_seed(1)
    return {
        "wrist_image": torch.rand(n, 3, 48, 48) * 2 - 1,
        "agentview_image": torch.rand(n, 3, 48, 48) * 2 - 1,
        "keypoint": torch.randn(n, 9, 2),
        "agent_pos": torch.randn(n, 2),
    }


@pytest.fixture(scope="module")
def encoder():
    torch.manual_seed(0)
    return ObsEncoder(SHAPE_META, crop_shape=(40, 40))


def test_encoder_layout_and_output_dim(encoder):
    assert encoder.rgb_keys == ["agentview_image", "wrist_image"]
    assert encoder.low_dim_keys == ["agent_pos", "keypoint"]
    assert encoder.output_dim == 2 * 64 + 2 + 18
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in encoder.modules())
    obs = make_obs()
    encoder.eval()
    with torch.no_grad():
        out = encoder(obs)
    assert out.shape == (3, encoder.output_dim)
    torch.testing.assert_close(out[:, 128:130], obs["agent_pos"])  # low-dim passed through
    torch.testing.assert_close(out[:, 130:], obs["keypoint"].flatten(1))


def test_encoder_train_random_eval_deterministic(encoder):
    obs = make_obs()
    with torch.no_grad():
        encoder.train()
        a, b = encoder(obs), encoder(obs)
        encoder.eval()
        c, d = encoder(obs), encoder(obs)
    assert (a[:, :128] - b[:, :128]).abs().max() > 1e-6
    torch.testing.assert_close(c, d, rtol=0, atol=0)


def test_encoder_errors_name_key_and_shapes(encoder):
    obs = make_obs()
    del obs["agent_pos"]
    with pytest.raises(ValueError, match=r"missing key 'agent_pos'.*\[N, 2\]"):
        encoder(obs)
    obs = make_obs()
    obs["wrist_image"] = torch.zeros(3, 3, 36, 48)
    with pytest.raises(ValueError, match=r"'wrist_image'.*\[N, 3, 48, 48\].*\(3, 3, 36, 48\)"):
        encoder(obs)
    obs = make_obs()
    obs["keypoint"] = torch.zeros(2, 9, 2)
    with pytest.raises(ValueError, match=r"'keypoint'.*batch size 2"):
        encoder(obs)
    with pytest.raises(ValueError, match=r"'img'.*unsupported type 'depth'"):
        ObsEncoder({"obs": {"img": {"shape": [1, 8, 8], "type": "depth"}}})
    with pytest.raises(ValueError, match=r"crop_shape.*'img'"):
        ObsEncoder({"obs": {"img": {"shape": [3, 40, 40], "type": "rgb"}}}, crop_shape=(41, 9))
    with pytest.raises(ValueError, match=r"'img'.*32x40 .*at least 33 pixels"):
        ObsEncoder({"obs": {"img": {"shape": [3, 40, 40], "type": "rgb"}}}, crop_shape=(32, 40))


def test_encoder_shared_rgb_model_and_dictconfig():
    torch.manual_seed(0)
    meta = OmegaConf.create(SHAPE_META)
    shared = ObsEncoder(meta, crop_shape=(40, 40), share_rgb_model=True).eval()
    assert shared.output_dim == 148
    assert n_params(shared) == n_params(shared.shared_core)
    obs = make_obs()
    with torch.no_grad():
        out = shared(obs)
        for i, key in enumerate(shared.rgb_keys):  # key-major layout, centre crop at eval
            ref = shared.shared_core(obs[key][:, :, 4:44, 4:44])
            torch.testing.assert_close(out[:, 64 * i : 64 * (i + 1)], ref)
    # torchvision resnet18 without fc (GroupNorm affine = BatchNorm affine), 1x1 conv, Linear
    assert n_params(shared.shared_core) == (11_689_512 - 513_000) + (512 * 32 + 32) + (64 * 64 + 64)
