"""chunk_drift_loss: each grouping against a loop of independent drift_loss calls."""

import pytest
import torch

import drifting_policy.policy.drifting as drifting
from drifting_policy.drift import drift_loss
from drifting_policy.policy.drifting import chunk_drift_loss

TEMPS = (0.02, 0.05, 0.2)


def _chunks(seed=0, b=3, g=4, t=5, da=2, dtype=torch.float32):
    """Generated chunks [B, G, T, Da] and expert chunks [B, T, Da] whose steps differ in scale
    (so per-group and shared statistics differ)."""
    gen = torch.Generator().manual_seed(seed)
    step_scale = torch.logspace(-1, 1, t, dtype=dtype)[None, :, None]
    naction = torch.randn(b, t, da, generator=gen, dtype=dtype) * step_scale
    x = naction[:, None] + 0.5 * torch.randn(b, g, t, da, generator=gen, dtype=dtype) * step_scale
    return x, naction


def _problems(x, naction, grouping):
    """The groups as a list of (gen [B, G, S], pos [B, 1, S]), built one by one."""
    _, _, t, da = x.shape
    if grouping == "per_timestep":
        return [(x[:, :, i], naction[:, None, i]) for i in range(t)]
    if grouping == "per_dim":
        return [(x[..., d], naction[:, None, :, d]) for d in range(da)]
    return [(x.flatten(2), naction.flatten(1)[:, None])]


def _loop(x, naction, grouping, normalize):
    """Reference: per_group = one drift_loss call per group, loss = mean over groups of the mean
    over B, info averaged over groups; global = one call on every problem."""
    problems = _problems(x, naction, grouping)
    if normalize == "global":
        loss, info = drift_loss(torch.cat([p[0] for p in problems]),
                                torch.cat([p[1] for p in problems]), temperatures=TEMPS)
        return loss.mean(), info
    calls = [drift_loss(gen, pos, temperatures=TEMPS) for gen, pos in problems]
    loss = torch.stack([c[0].mean() for c in calls]).mean()
    return loss, {k: torch.stack([c[1][k] for c in calls]).mean() for k in calls[0][1]}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("normalize", ["per_group", "global"])
@pytest.mark.parametrize("grouping", ["per_timestep", "per_dim", "flat"])
def test_matches_a_loop_of_independent_drift_loss_calls(grouping, normalize, dtype):
    x, naction = _chunks(dtype=dtype)
    a, b = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    loss, info = chunk_drift_loss(a, naction, grouping=grouping, normalize=normalize,
                                  temperatures=TEMPS, affinity_floor=1e-6)
    ref, ref_info = _loop(b, naction, grouping, normalize)
    assert loss.ndim == 0 and loss.dtype == dtype
    tol = dict(rtol=1e-5, atol=1e-8) if dtype == torch.float32 else dict(rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(loss, ref, **tol)
    assert set(info) == {"scale", *(f"lambda/{r}" for r in TEMPS)}
    for k in ref_info:
        assert not info[k].requires_grad and info[k].ndim == 0
        torch.testing.assert_close(info[k], ref_info[k], **tol)
    loss.backward()
    ref.backward()
    torch.testing.assert_close(a.grad, b.grad, **tol)


@pytest.mark.parametrize("grouping", ["per_timestep", "per_dim"])
def test_per_group_and_global_normalisation_differ(grouping):
    x, naction = _chunks(seed=1)
    losses = [chunk_drift_loss(x, naction, grouping=grouping, normalize=n)[0]
              for n in ("per_group", "global")]
    assert not torch.allclose(losses[0], losses[1], rtol=1e-3)
    # flat has one group: both are the same computation
    flat = [chunk_drift_loss(x, naction, grouping="flat", normalize=n)[0]
            for n in ("per_group", "global")]
    torch.testing.assert_close(flat[0], flat[1])


@pytest.mark.parametrize("grouping", ["per_timestep", "per_dim", "flat"])
def test_one_batched_drift_loss_call(grouping, monkeypatch):
    calls = []

    def spy(gen, pos, **kw):
        calls.append((tuple(gen.shape), kw["groups"]))
        return drift_loss(gen, pos, **kw)

    monkeypatch.setattr(drifting, "drift_loss", spy)
    x, naction = _chunks(b=3, g=4, t=5, da=2)
    chunk_drift_loss(x, naction, grouping=grouping, normalize="per_group")
    expect = {"per_timestep": ((15, 4, 2), 5), "per_dim": ((6, 4, 5), 2),
              "flat": ((3, 4, 10), 1)}[grouping]
    assert calls == [expect]


def test_per_timestep_padding_drops_the_padded_problems():
    x, naction = _chunks(seed=2, b=3, t=4)
    pad = torch.zeros(3, 4, dtype=torch.bool)
    pad[0, 2:] = True  # observation 0: last two steps padded
    pad[1, 3:] = True
    pad[2, 3:] = True  # step 3 is padded everywhere: the group drops out of the mean
    a, b = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    loss, info = chunk_drift_loss(a, naction, grouping="per_timestep", pad_mask=pad)
    calls = []
    for i in range(4):
        keep = ~pad[:, i]
        if keep.any():
            calls.append(drift_loss(b[keep, :, i], naction[keep][:, None, i]))
    ref = torch.stack([c[0].mean() for c in calls]).mean()
    torch.testing.assert_close(loss, ref)
    for k in info:
        torch.testing.assert_close(info[k], torch.stack([c[1][k] for c in calls]).mean())
    loss.backward()
    ref.backward()
    torch.testing.assert_close(a.grad, b.grad)
    assert (a.grad.permute(0, 2, 1, 3)[pad] == 0).all()


@pytest.mark.parametrize("normalize", ["per_group", "global"])
@pytest.mark.parametrize("grouping", ["per_dim", "flat"])
def test_padded_steps_take_no_part(grouping, normalize):
    """Whatever the padded steps hold, the loss is the same and they get no gradient; with
    nothing padded the mask changes nothing."""
    x, naction = _chunks(seed=3, b=3, t=5)
    pad = torch.zeros(3, 5, dtype=torch.bool)
    pad[0, 3:] = True
    pad[2, 1:] = True
    kw = dict(grouping=grouping, normalize=normalize)
    a = x.clone().requires_grad_(True)
    loss, _ = chunk_drift_loss(a, naction, pad_mask=pad, **kw)
    loss.backward()
    assert (a.grad.permute(0, 2, 1, 3)[pad] == 0).all()
    assert a.grad.abs().sum() > 0
    x2, n2 = x.clone(), naction.clone()
    x2.permute(0, 2, 1, 3)[pad] = 100.0
    n2[pad] = -7.0
    torch.testing.assert_close(chunk_drift_loss(x2, n2, pad_mask=pad, **kw)[0], loss)
    unpadded = chunk_drift_loss(x, naction, **kw)[0]
    assert not torch.allclose(unpadded, loss, rtol=1e-3)
    none = torch.zeros(3, 5, dtype=torch.bool)
    torch.testing.assert_close(chunk_drift_loss(x, naction, pad_mask=none, **kw)[0], unpadded)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(x=torch.zeros(2, 4, 3)), r"x:.*\[B, G, T, Da\].*\(2, 4, 3\)"),
        (dict(naction=torch.zeros(2, 6, 2)), r"naction:.*\(2, 5, 2\).*\(2, 6, 2\)"),
        (dict(grouping="per_step"), r"grouping:.*per_timestep.*'per_step'"),
        (dict(normalize="batch"), r"normalize:.*per_group.*'batch'"),
        (dict(pad_mask=torch.zeros(2, 5)), r"pad_mask:.*bool.*\(2, 5\)"),
        (dict(pad_mask=torch.zeros(2, 4, dtype=torch.bool)), r"pad_mask:.*\(2, 5\).*\(2, 4\)"),
    ],
)
def test_bad_inputs_raise_naming_the_argument(kwargs, match):
    args = dict(x=torch.zeros(2, 3, 5, 2), naction=torch.zeros(2, 5, 2)) | kwargs
    with pytest.raises(ValueError, match=match):
        chunk_drift_loss(args.pop("x"), args.pop("naction"), **args)
