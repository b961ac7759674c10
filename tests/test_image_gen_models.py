"""Image-generator models: the DiT generator, the ResNet-MAE encoder and the feature-space loss."""

import pytest
import torch
import torch.nn.functional as F
from timm.layers import apply_rot_embed_cat

from image_gen.dit import PRESETS, DiT, count_params, rope_table
from image_gen.features import feature_drift_loss, feature_sets, freeze
from image_gen.mae import ResNetMAE, gn_groups, masked_l2

pytestmark = pytest.mark.usefixtures("single_thread")


# --------------------------------------------------------------------------- DiT


def dit_param_formula(input_size, in_channels, patch_size, hidden, depth, heads, num_classes,
                      n_class_tokens=16, n_style_tokens=32, style_vocab=64, mlp_ratio=4.0):
    """Parameter count of the release's DitGen/LightningDiT, written out layer by layer."""
    d, hd = hidden, hidden // heads

    def lin(i, o):
        return i * o + o

    inner = (int(2 / 3 * d * mlp_ratio) + 31) // 32 * 32
    block = (2 * d  # two RMSNorms
             + lin(d, 3 * d) + 2 * hd + lin(d, d)  # qkv, q/k RMSNorm, proj
             + 2 * lin(d, inner) + lin(inner, d)  # SwiGLU
             + lin(d, 6 * d))  # adaLN
    tokens = (input_size // patch_size) ** 2
    patch_dim = patch_size * patch_size * in_channels
    cond = num_classes * d + n_style_tokens * style_vocab * d + lin(256, d) + lin(d, d) + d
    stem = lin(patch_dim, d) + tokens * d + lin(d, d) + n_class_tokens * d
    final = d + lin(d, 2 * d) + lin(d, patch_dim)
    return cond + stem + depth * block + final


@pytest.mark.parametrize("name, paper", [("B/2", 133e6), ("L/2", 463e6), ("B/16", None),
                                         ("L/16", None)])
def test_preset_parameter_counts(name, paper):
    with torch.device("meta"):
        model = DiT.from_preset(name)
    n = count_params(model)
    assert n == dit_param_formula(**PRESETS[name])
    if paper is not None:  # the paper quotes 133M / 463M
        assert abs(n - paper) / paper < 0.005
    assert PRESETS[name]["num_classes"] == 1000


def test_paper_presets_output_shapes_on_meta():
    """B/2 and L/16 run shape-only on the meta device: latent 32x32x4 and pixel 256x256x3."""
    with torch.device("meta"):
        for name, shape in (("B/2", (2, 4, 32, 32)), ("L/16", (2, 3, 256, 256))):
            model = DiT.from_preset(name)
            noise, style = model.sample_inputs(2, "meta")
            out = model(noise, torch.zeros(2, dtype=torch.long), torch.ones(2), style)
            assert out.shape == noise.shape == shape
            assert style.shape == (2, 32)


def _randomise_zero_layers(model: DiT, seed: int = 0) -> None:
    """Give the zero-initialised adaLN and output layers random weights (a 'trained' model)."""
    g = torch.Generator().manual_seed(seed)
    layers = [b.ada[1] for b in model.blocks] + [model.final.ada[1], model.final.linear]
    with torch.no_grad():
        for layer in layers:
            layer.weight.copy_(0.1 * torch.randn(layer.weight.shape, generator=g))
            layer.bias.copy_(0.1 * torch.randn(layer.bias.shape, generator=g))


@pytest.mark.parametrize("overrides, shape", [
    ({}, (3, 1, 16, 16)),  # tiny latent-like default
    ({"input_size": 32, "in_channels": 3, "patch_size": 8}, (3, 3, 32, 32)),  # tiny pixel
])
def test_tiny_generate_shapes_and_zero_init(overrides, shape):
    torch.manual_seed(0)
    model = DiT.from_preset("tiny", **overrides)
    labels = torch.tensor([0, 3, 9])
    g = torch.Generator().manual_seed(1)
    out = model.generate(labels, 1.5, generator=g)
    assert out.shape == shape
    assert torch.equal(out, torch.zeros(shape))  # zero-initialised output layer

    # Only the output projection gets a gradient at init (adaLN-zero), and it is non-zero.
    (out * torch.randn(shape)).sum().backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    assert grads["final.linear.weight"].abs().sum() > 0
    others = [n for n, gr in grads.items() if not n.startswith("final.linear")
              and gr is not None and gr.abs().sum() > 0]
    assert others == []


def test_generator_conditioning_changes_output_and_is_deterministic():
    torch.manual_seed(0)
    model = DiT.from_preset("tiny")
    _randomise_zero_layers(model)
    noise, style = model.sample_inputs(4, "cpu", torch.Generator().manual_seed(2))
    labels, alpha = torch.tensor([1, 2, 3, 4]), torch.full((4,), 1.0)
    base = model(noise, labels, alpha, style)
    assert torch.equal(base, model(noise, labels, alpha, style))

    def rel_change(out):
        return ((out - base).flatten(1).norm(dim=1) / base.flatten(1).norm(dim=1)).min()

    assert rel_change(model(noise, (labels + 1) % 10, alpha, style)) > 1e-3
    assert rel_change(model(noise, labels, alpha + 2.0, style)) > 1e-3
    assert rel_change(model(noise, labels, alpha, (style + 1) % 64)) > 1e-3
    assert rel_change(model(noise + 0.5, labels, alpha, style)) > 1e-3
    # generate = sample_inputs + forward: the same generator seed reproduces the samples
    out1 = model.generate(labels, 1.0, torch.Generator().manual_seed(2))
    assert torch.equal(out1, base)


def test_grad_checkpointing_gives_the_same_output_and_gradients():
    grads = []
    for ckpt in (False, True):
        torch.manual_seed(0)
        model = DiT.from_preset("tiny", depth=2, grad_checkpointing=ckpt)
        _randomise_zero_layers(model)
        noise, style = model.sample_inputs(2, "cpu", torch.Generator().manual_seed(0))
        out = model(noise, torch.tensor([1, 2]), torch.tensor([1.0, 3.0]), style)
        out.square().sum().backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    assert grads[0].abs().sum() > 0
    assert torch.allclose(grads[0], grads[1], rtol=1e-4, atol=1e-7)


def test_rope_attention_logits_depend_only_on_offset():
    """q_i . k_j after the DiT's (timm) 2-D RoPE is a function of (row_i - row_j, col_i - col_j)
    only, and depends on both axes."""
    grid, hd = 5, 16
    emb = rope_table(hd).get_embed([grid, grid])
    assert emb.shape == (grid * grid, 2 * hd)
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, hd, generator=g).expand(grid * grid, hd)
    k = torch.randn(1, hd, generator=g).expand(grid * grid, hd)
    rq, rk = apply_rot_embed_cat(q, emb, half=True), apply_rot_embed_cat(k, emb, half=True)
    assert torch.allclose(rq.norm(dim=-1), q.norm(dim=-1), atol=1e-5)  # a rotation
    logits = rq @ rk.T
    pos = torch.stack(torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij"), -1)
    pos = pos.reshape(-1, 2)
    by_offset: dict[tuple[int, int], list[float]] = {}
    for i in range(grid * grid):
        for j in range(grid * grid):
            by_offset.setdefault(tuple((pos[i] - pos[j]).tolist()), []).append(float(logits[i, j]))
    spreads = [max(v) - min(v) for v in by_offset.values()]
    assert max(spreads) < 1e-4
    means = torch.tensor([sum(v) / len(v) for v in by_offset.values()])
    assert means.std() > 0.1  # ... and it does depend on the offset, in both axes
    assert by_offset[(1, 0)] != by_offset[(0, 1)]


# The pre-timm implementation, kept here only as the independent reference: linear patch embedding
# of (row, col, channel)-flattened patches, per-axis rotate-half 2-D RoPE (row half, column half),
# nn.RMSNorm, explicit qkv / SDPA / SwiGLU.


def _old_rope(grid, hd, n_prefix):
    q = hd // 4
    freqs = 1.0 / 10000.0 ** (torch.arange(q, dtype=torch.float32) / q)
    rows, cols = torch.meshgrid(torch.arange(grid, dtype=torch.float32),
                                torch.arange(grid, dtype=torch.float32), indexing="ij")
    ang_r, ang_c = rows.reshape(-1, 1) * freqs, cols.reshape(-1, 1) * freqs
    angles = torch.cat([torch.zeros(n_prefix, hd), torch.cat([ang_r, ang_r, ang_c, ang_c], 1)])
    return angles.cos(), angles.sin()


def _old_apply_rope(x, cos, sin):  # x [B, N, heads, hd]
    b, n, h, d = x.shape
    halves = x.reshape(b, n, h, 2, 2, d // 4)
    rotated = torch.stack([-halves[..., 1, :], halves[..., 0, :]], dim=-2).reshape(b, n, h, d)
    return x * cos[:, None] + rotated * sin[:, None]


def _rms(x, weight):
    return F.rms_norm(x, (x.shape[-1],), weight, eps=1e-6)


def _old_block(x, c, cos, sin, blk, perm, heads):
    """The old block's math with the new block's weights (q / k channels in the old layout)."""
    b, n, d = x.shape
    hd = d // heads
    shift1, scale1, gate1, shift2, scale2, gate2 = F.linear(F.silu(c), blk.ada[1].weight,
                                                            blk.ada[1].bias).chunk(6, -1)
    a = blk.attn
    # rows of q and k per head in the old channel order; v unchanged
    idx = torch.arange(3 * d).view(3, heads, hd)
    idx[:2] = idx[:2][..., perm]
    w_qkv, b_qkv = a.qkv.weight[idx.flatten()], a.qkv.bias[idx.flatten()]
    h = _rms(x, blk.norm1.weight) * (1 + scale1[:, None]) + shift1[:, None]
    q, k, v = F.linear(h, w_qkv, b_qkv).reshape(b, n, 3, heads, hd).unbind(2)
    q = _old_apply_rope(_rms(q, a.q_norm.weight[perm]), cos, sin)
    k = _old_apply_rope(_rms(k, a.k_norm.weight[perm]), cos, sin)
    att = F.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v)))
    x = x + gate1[:, None] * a.proj(att.transpose(1, 2).reshape(b, n, d))
    h = _rms(x, blk.norm2.weight) * (1 + scale2[:, None]) + shift2[:, None]
    m = blk.mlp
    mlp = F.linear(F.silu(F.linear(h, m.fc1_g.weight, m.fc1_g.bias))
                   * F.linear(h, m.fc1_x.weight, m.fc1_x.bias), m.fc2.weight, m.fc2.bias)
    return x + gate2[:, None] * mlp


def test_timm_blocks_equal_the_previous_implementation_for_copied_weights():
    """DiT on timm layers = the previous hand-written DiT with the same weights: the patch
    convolution equals a linear map of (row, col, channel)-flattened patches, and timm's
    'half'-layout RoPE pairs channel c with c + hd/2 ([row, col, row, col] quarters) where the
    old one paired c with c + hd/4 inside a row half and a column half ([row, row, col, col]):
    the same rotation after swapping the middle quarters of every q / k head."""
    torch.manual_seed(0)
    model = DiT.from_preset("tiny", depth=2, n_class_tokens=3)
    _randomise_zero_layers(model)
    with torch.no_grad():  # non-trivial norm weights
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.3 * torch.randn(p.shape))
    noise, style = model.sample_inputs(3, "cpu", torch.Generator().manual_seed(1))
    labels, alpha = torch.tensor([0, 4, 9]), torch.tensor([1.0, 2.0, 3.5])
    new = model(noise, labels, alpha, style)

    heads, hd, p, g = model.heads, 128 // model.heads, model.patch_size, model.grid
    q = hd // 4
    perm = torch.cat([torch.arange(q), torch.arange(2 * q, 3 * q), torch.arange(q, 2 * q),
                      torch.arange(3 * q, 4 * q)])
    with torch.no_grad():
        cond = model.condition(labels, alpha, style)
        b, c = noise.shape[:2]
        patches = noise.reshape(b, c, g, p, g, p).permute(0, 2, 4, 3, 5, 1).reshape(b, g * g, -1)
        conv = model.patch_embed.proj
        w_lin = conv.weight.permute(0, 2, 3, 1).reshape(conv.out_channels, -1)  # (row, col, ch)
        x = F.linear(patches, w_lin, conv.bias) + model.pos_embed
        x = torch.cat([model.class_proj(cond)[:, None] + model.class_tokens, x], dim=1)
        cos, sin = _old_rope(g, hd, model.n_class_tokens)
        for blk in model.blocks:
            x = _old_block(x, cond, cos, sin, blk, perm, heads)
        out = model.final(x[:, model.n_class_tokens:], cond)
        old = out.reshape(b, g, g, p, p, c).permute(0, 5, 1, 3, 2, 4).reshape(b, c, g * p, g * p)
    assert new.abs().mean() > 1e-2
    assert torch.allclose(new, old, atol=1e-5, rtol=1e-4)
    # the timm layers in use, with the fused attention kernel
    assert all(blk.attn.fused_attn and blk.attn.num_prefix_tokens == 3 for blk in model.blocks)


@pytest.mark.parametrize("call, key", [
    (lambda m: m(torch.zeros(2, 1, 8, 8), torch.zeros(2, dtype=torch.long), torch.ones(2),
                 torch.zeros(2, 32, dtype=torch.long)), "noise"),
    (lambda m: m.generate(torch.tensor([0, 10]), 1.0), "labels"),
    (lambda m: m(torch.zeros(2, 1, 16, 16), torch.zeros(2, dtype=torch.long), torch.ones(2),
                 torch.full((2, 32), 64)), "style"),
    (lambda m: DiT.from_preset("XL/2"), "preset"),
    (lambda m: DiT.from_preset("tiny", hidden=100), "hidden"),
])
def test_dit_bad_input_names_the_key(call, key):
    model = DiT.from_preset("tiny")
    with pytest.raises(ValueError, match=key):
        call(model)


# --------------------------------------------------------------------------- ResNet-MAE


def tiny_mae(**kw) -> ResNetMAE:
    """16x16x1 inputs, widths 16..128 (GroupNorm: 4 groups at width 16, see gn_groups)."""
    torch.manual_seed(0)
    return ResNetMAE(**{"in_channels": 1, "width": 16, "stages": (1, 1, 1, 1), **kw})


def test_mask_zeroes_half_of_the_2x2_patches():
    mae = tiny_mae()
    x = torch.randn(64, 1, 16, 16)
    x_masked, mask = mae.mask(x, 0.5, torch.Generator().manual_seed(0))
    assert mask.shape == (64, 1, 16, 16)
    coarse = mask[:, :, ::2, ::2]
    assert torch.equal(mask, coarse.repeat_interleave(2, 2).repeat_interleave(2, 3))  # 2x2 blocks
    assert abs(float(coarse.mean()) - 0.5) < 0.03  # 4096 patches: 4 sigma
    assert torch.equal(x_masked, torch.where(mask.bool(), 0.0, x))
    assert mae.mask(x, 0.0)[1].sum() == 0 and mae.mask(x, 1.0)[1].min() == 1


def test_mae_loss_ignores_the_unmasked_region():
    mae = tiny_mae()
    x = torch.randn(4, 1, 16, 16)
    seed = 3
    loss = mae.mae_loss(x, 0.5, torch.Generator().manual_seed(seed))
    _, mask = mae.mask(x, 0.5, torch.Generator().manual_seed(seed))
    # independent: mean over masked pixels (C = 1) per sample, then over the batch
    recon = mae(x * (1 - mask))[0]
    per = [((recon[i] - x[i]) ** 2)[mask[i].bool()].mean() for i in range(4)]
    assert torch.allclose(loss, torch.stack(per).mean(), rtol=1e-5)

    def perturbed_loss(region: torch.Tensor) -> torch.Tensor:
        hook = mae.head.register_forward_hook(lambda mod, inp, out: out + 5.0 * region)
        try:
            return mae.mae_loss(x, 0.5, torch.Generator().manual_seed(seed))
        finally:
            hook.remove()

    assert torch.allclose(perturbed_loss(1 - mask), loss)  # unmasked prediction is free
    assert perturbed_loss(mask) > loss + 1.0
    # channels are summed, masked locations averaged (release)
    pred, target = torch.zeros(1, 3, 2, 2), torch.ones(1, 3, 2, 2)
    one = torch.tensor([[[[1.0, 0.0], [0.0, 0.0]]]])
    assert masked_l2(pred, target, one) == pytest.approx(3.0)


def test_activations_for_resnet34_stages_and_heads():
    torch.manual_seed(0)
    mae = ResNetMAE(in_channels=4, width=8, stages=(3, 4, 6, 3), num_classes=5)
    assert [gn_groups(c, 32) for c in (8, 16, 256, 640, 6)] == [2, 4, 32, 32, 1]
    x = torch.randn(2, 4, 16, 16)
    acts = mae.activations(x)
    names = mae.activation_names()
    assert names == ["stem", "stage1.block2", "stage1", "stage2.block2", "stage2.block4",
                     "stage2", "stage3.block2", "stage3.block4", "stage3.block6", "stage3",
                     "stage4.block2", "stage4"]
    expect = {"stem": (8, 16), "stage1": (8, 16), "stage2": (16, 8), "stage3": (32, 4),
              "stage4": (64, 2)}
    assert len(acts) == 12
    for name, a in zip(names, acts):
        c, s = expect[name.split(".")[0]]
        assert a.shape == (2, c, s, s), name
    # stage outputs are GroupNorm-ed: per-group mean 0 (affine weight 1, bias 0 at init)
    assert acts[-1].reshape(2, 16, -1).mean(-1).abs().max() < 1e-5  # 16 groups of 4
    recon, logits = mae(x)
    assert recon.shape == x.shape and logits.shape == (2, 5)
    assert torch.allclose(mae.cls_loss(x, torch.tensor([1, 4])),
                          F.cross_entropy(logits, torch.tensor([1, 4])))
    with pytest.raises(ValueError, match="x"):
        mae.activations(torch.randn(2, 4, 12, 12))  # not a multiple of 8
    with pytest.raises(ValueError, match="num_classes"):
        tiny_mae().cls_loss(torch.randn(1, 1, 16, 16), torch.tensor([0]))


# --------------------------------------------------------------------------- features


def test_feature_sets_names_shapes_and_values():
    enc = freeze(tiny_mae())
    p, n = 2, 3
    x = torch.randn(p, n, 1, 16, 16)
    feats = feature_sets(x, enc)
    # maps: stem/stage1 16x16x16, stage2 8x8x32, stage3 4x4x64, stage4 2x2x128
    maps = {"stem": (16, 16), "stage1": (16, 16), "stage2": (32, 8), "stage3": (64, 4),
            "stage4": (128, 2)}
    expect = {"raw/global": (p, n, 256), "raw/rms": (p, n, 1)}
    for m, (c, s) in maps.items():
        expect[f"{m}/loc"] = (p * s * s, n, c)
        expect[f"{m}/mean"] = expect[f"{m}/std"] = (p, n, c)
        for k in (2, 4):
            if s % k == 0:
                expect[f"{m}/mean{k}"] = expect[f"{m}/std{k}"] = (p * (s // k) ** 2, n, c)
    assert {k: tuple(v.shape) for k, v in feats.items()} == expect
    assert "stage4/mean4" not in feats  # a 2x2 map has no 4x4 patch
    # a stage output is GroupNorm-ed over groups of several channels: its per-channel global
    # statistics still vary from sample to sample (live features)
    for name in ("stage1/mean", "stage1/std", "stage3/std"):
        assert feats[name].std(dim=1).mean() > 1e-3, name

    # values against independent computations on the encoder's maps
    act = enc.activations(x.reshape(p * n, 1, 16, 16))[2]  # stage2 [6, 32, 8, 8]
    a = act.reshape(p, n, 32, 8, 8)
    row = 1 * 64 + 3 * 8 + 5  # problem 1, location (3, 5): problem-major rows
    assert torch.allclose(feats["stage2/loc"][row], a[1, :, :, 3, 5])
    for k in (2, 4):  # patch by patch, row-major
        blocks = [a[..., i:i + k, j:j + k].flatten(-2) for i in range(0, 8, k)
                  for j in range(0, 8, k)]  # each [P, N, C, k*k]
        mean = torch.stack([b.mean(-1) for b in blocks], 1)  # [P, L, N, C]
        std = torch.stack([(b.var(-1, unbiased=False) + 1e-6).sqrt() for b in blocks], 1)
        assert torch.allclose(feats[f"stage2/mean{k}"], mean.reshape(-1, n, 32), atol=1e-6)
        assert torch.allclose(feats[f"stage2/std{k}"], std.reshape(-1, n, 32), atol=1e-5)
    assert torch.allclose(feats["stage2/std"][1], (a[1].flatten(2).var(-1, unbiased=False)
                                                   + 1e-6).sqrt(), atol=1e-6)
    assert torch.allclose(feats["raw/global"][0, 2], x[0, 2].flatten())
    assert torch.allclose(feats["raw/rms"][1, 0], (x[1, 0] ** 2).mean((1, 2)).add(1e-6).sqrt())


def test_feature_sets_raw_only_without_encoder_and_frozen_check():
    x = torch.randn(2, 3, 4, 8, 8)
    feats = feature_sets(x, None)
    assert set(feats) == {"raw/global", "raw/rms"}
    assert feats["raw/global"].shape == (2, 3, 256) and feats["raw/rms"].shape == (2, 3, 4)
    with pytest.raises(ValueError, match="encoder"):
        feature_sets(torch.randn(1, 2, 1, 16, 16), tiny_mae())  # not frozen
    with pytest.raises(ValueError, match="x"):
        feature_sets(torch.randn(2, 1, 16, 16), None)


def test_feature_drift_loss_gradients_and_weights():
    enc = freeze(tiny_mae())
    g = torch.Generator().manual_seed(0)
    gen = torch.randn(2, 4, 1, 16, 16, generator=g, requires_grad=True)
    pos = torch.randn(2, 5, 1, 16, 16, generator=g, requires_grad=True)
    neg = torch.randn(2, 3, 1, 16, 16, generator=g, requires_grad=True)
    total, info = feature_drift_loss(gen, pos, neg, enc, weight_neg=torch.full((2, 3), 0.7))
    names = list(feature_sets(gen.detach(), enc))
    assert total.item() == pytest.approx(sum(float(info[k]) for k in names), rel=1e-5)
    assert all(f"scale/{k}" in info and f"lambda/0.02/{k}" in info for k in names)
    total.backward()
    assert gen.grad is not None and gen.grad.abs().sum() > 0
    assert pos.grad is None and neg.grad is None
    assert all(q.grad is None for q in enc.parameters())

    # with exact_degenerate, weight 0 removes every negative column: the same as passing no
    # negatives (the release's default arithmetic keeps their share of the row softmax)
    exact = {"exact_degenerate": True}
    with torch.no_grad():
        zero, _ = feature_drift_loss(gen, pos, neg, enc, weight_neg=torch.zeros(2, 3),
                                     drift_kwargs=exact)
        none, _ = feature_drift_loss(gen, pos, None, enc, drift_kwargs=exact)
        raw, raw_info = feature_drift_loss(gen, pos, None, None)
        _, none_info = feature_drift_loss(gen, pos, None, enc)
    assert torch.allclose(zero, none, rtol=1e-4)  # float32 distances via matmul differ slightly
    # raw only: two features, each the same problem as inside the full feature set
    losses = {k: float(v) for k, v in raw_info.items() if not k.startswith(("scale/", "lambda/"))}
    assert set(losses) == {"raw/global", "raw/rms"}
    assert raw.item() == pytest.approx(sum(losses.values()), rel=1e-5)
    assert losses["raw/rms"] == pytest.approx(float(none_info["raw/rms"]), rel=1e-5)
    with pytest.raises(ValueError, match="weight_neg"):
        feature_drift_loss(gen, pos, neg, enc, weight_neg=torch.ones(2, 4))
    with pytest.raises(ValueError, match="pos"):
        feature_drift_loss(gen, pos[:, :, :, :8], neg, enc)
    with pytest.raises(ValueError, match=r"neg.*NaN or Inf"):
        feature_drift_loss(gen, pos, torch.full_like(neg, float("nan")), enc)
    with pytest.raises(ValueError, match=r"weight_neg.*negative"):
        feature_drift_loss(gen, pos, neg, enc, weight_neg=torch.full((2, 3), -1.0))
