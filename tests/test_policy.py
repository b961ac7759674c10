"""Policy API (Diffusion Policy's), network-call counts and what the drift loss teaches."""

import pytest
import torch

from drifting_policy.bench import build, count_nfe, example_obs
from drifting_policy.nn.normalizer import LinearNormalizer
from drifting_policy.policy import ConfigError, DiffusionConfig, DriftingConfig, make_policy

pytestmark = pytest.mark.usefixtures("single_thread")



@pytest.mark.parametrize("obs", ["lowdim", "image"])
@pytest.mark.parametrize("name, nfe", [("drifting", 1), ("ddpm100", 100), ("ddim10", 10)])
def test_predict_action_api_and_network_calls(obs, name, nfe):
    policy = build(name, obs, "cpu")
    x = example_obs(obs)
    out = policy.predict_action({k: v.repeat(3, *[1] * (v.ndim - 1)) for k, v in x.items()})
    assert out["action"].shape == (3, 8, 2) and out["action_pred"].shape == (3, 16, 2)
    # the executed slice starts at To - 1
    torch.testing.assert_close(out["action"], out["action_pred"][:, 1:9])
    assert count_nfe(policy, x) == nfe
    assert policy.device == torch.device("cpu") and policy.dtype == torch.float32


LOWDIM = {"obs": {"obs": {"shape": [20], "type": "low_dim"}}, "action": {"shape": [2]}}


def _lowdim_policy(config_class=DriftingConfig, **kw):
    p = make_policy(config_class(shape_meta=LOWDIM, horizon=8, n_obs_steps=2, n_action_steps=4,
                                 down_dims=(16, 32), diffusion_step_embed_dim=16, **kw))
    norm = LinearNormalizer()
    norm.fit({"obs": torch.rand(100, 20) * 10, "action": torch.rand(100, 2) * 4 - 2})
    p.set_normalizer(norm)
    return p


def test_actions_are_unnormalised():
    p = _lowdim_policy()
    x = {"obs": torch.rand(4, 2, 20)}
    torch.manual_seed(0)
    naction = p.sample(torch.randn(4, 8, 2), p._encode(p._check_obs(x)))
    torch.manual_seed(0)
    pred = p.predict_action(x)["action_pred"]
    # same noise through two call paths (inference mode, batch layout): float32 round-off only
    torch.testing.assert_close(pred, p.normalizer["action"].unnormalize(naction),
                               rtol=1e-4, atol=1e-5)
    # normalised [-1, 1] maps to the data range [-2, 2]
    one = torch.ones(1, 1, 2)
    torch.testing.assert_close(p.normalizer["action"].unnormalize(one), 2 * one, atol=0.1, rtol=0)


@pytest.mark.parametrize("grouping", ["per_timestep", "per_dim", "flat"])
@pytest.mark.parametrize("normalize", ["per_group", "global"])
def test_policy_loss_is_the_chunk_drift_loss_of_its_config(grouping, normalize, monkeypatch):
    """The policy hands its G generated chunks [B, G, T, Da] and the expert chunk [B, T, Da] to
    chunk_drift_loss with the config's grouping, normalisation and temperatures; gradients reach
    every trainable network parameter."""
    import drifting_policy.policy.drifting as mod

    seen = {}
    real = mod.chunk_drift_loss

    def spy(x, naction, **kw):
        seen.update(x=x.shape, naction=naction.shape, **kw)
        return real(x, naction, **kw)

    monkeypatch.setattr(mod, "chunk_drift_loss", spy)
    p = _lowdim_policy(gen_per_obs=5, grouping=grouping, normalize=normalize,
                       temperatures=(0.05, 0.2))
    batch = {"obs": torch.rand(3, 8, 20), "action": torch.rand(3, 8, 2)}
    loss, info = p.compute_loss_and_info(batch)
    loss.backward()
    assert (seen["x"], seen["naction"]) == ((3, 5, 8, 2), (3, 8, 2))
    assert (seen["grouping"], seen["normalize"]) == (grouping, normalize)
    assert seen["temperatures"] == (0.05, 0.2) and loss.ndim == 0
    assert all(q.grad is not None for q in p.model.parameters() if q.requires_grad)


def test_medoid_selection_keeps_the_executed_chunk_inside_one_mode():
    """K candidates in one batched pass; the returned chunk is the candidate with the least
    summed distance to the others (checked against a direct computation)."""
    from drifting_policy.policy.base import medoid

    chunks = torch.randn(4, 7, 8, 2)
    expect = torch.stack([c[min(range(7), key=lambda i: sum(
        float((c[i] - c[j]).norm()) for j in range(7)))] for c in chunks])
    torch.testing.assert_close(medoid(chunks), expect)
    # a bimodal candidate set: 5 near +1, 2 near -1 -> a +1 candidate is returned
    two = torch.cat([torch.ones(1, 5, 8, 2), -torch.ones(1, 2, 8, 2)], 1) + 0.01 * torch.randn(
        1, 7, 8, 2)
    assert medoid(two).mean() > 0.9

    p = _lowdim_policy()
    x = {"obs": torch.rand(3, 2, 20)}
    calls = []
    handle = p.model.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
    g = torch.Generator().manual_seed(0)
    out = p.predict_action(x, generator=g, n_samples=16)
    handle.remove()
    assert calls == [48] and out["action_pred"].shape == (3, 8, 2)  # one pass, B * K rows
    # K = 1 is the plain one-sample prediction with the same seed
    a = p.predict_action(x, generator=torch.Generator().manual_seed(1))["action_pred"]
    b = p.predict_action(x, generator=torch.Generator().manual_seed(1), n_samples=1)
    torch.testing.assert_close(a, b["action_pred"])
    with pytest.raises(ValueError, match="n_samples: expected >= 1, got 0"):
        p.predict_action(x, n_samples=0)


def test_bad_observations_and_config_raise_clear_errors():
    p = _lowdim_policy()
    with pytest.raises(ValueError, match=r"missing key 'obs'"):
        p.predict_action({"state": torch.zeros(1, 2, 20)})
    with pytest.raises(ValueError, match=r"obs\['obs'\].*\[B, >=2, 20\].*\(1, 2, 19\)"):
        p.predict_action({"obs": torch.zeros(1, 2, 19)})
    with pytest.raises(ValueError, match=r"batch\['action'\].*\[B, 8, 2\].*\(2, 8, 3\)"):
        p.compute_loss({"obs": torch.zeros(2, 8, 20), "action": torch.zeros(2, 8, 3)})
    with pytest.raises(ValueError, match="missing keys"):
        p.set_normalizer(LinearNormalizer())
    with pytest.raises(ConfigError, match=r"DriftingConfig.grouping: expected one of "
                       r"'per_timestep', 'per_dim', 'flat', got 'bogus'"):
        _lowdim_policy(grouping="bogus")
    with pytest.raises(ConfigError, match=r"horizon: expected a multiple of .* = 4 .*got 10"):
        DriftingConfig(shape_meta=LOWDIM, horizon=10, n_obs_steps=2, n_action_steps=4,
                       down_dims=(16, 32, 64))


@pytest.mark.slow
@pytest.mark.parametrize("cls", [DriftingConfig, DiffusionConfig])
def test_policy_learns_a_bimodal_chunk_distribution(cls):
    """Expert chunks are +1 or -1 ramps for the same observation: one-step drifting must keep
    both modes (not average them to 0), like the multi-step diffusion baseline."""
    torch.manual_seed(0)
    kw = dict(num_inference_steps=10, scheduler="ddim") if cls is DiffusionConfig else {}
    p = _lowdim_policy(cls, **kw)
    opt = torch.optim.AdamW(p.parameters(), lr=3e-3)
    obs = torch.rand(1, 1, 20).expand(64, 8, 20)
    ramp = torch.linspace(0.2, 1.0, 8)[None, :, None].expand(64, 8, 2)
    for _ in range(300):
        sign = torch.randint(0, 2, (64, 1, 1)) * 2.0 - 1.0
        loss = p.compute_loss({"obs": obs, "action": sign * ramp * 1.5})
        opt.zero_grad()
        loss.backward()
        opt.step()
    p.eval()
    pred = p.predict_action({"obs": obs[:1, :2].expand(256, 2, 20)})["action_pred"]
    end = pred[:, -1, 0]  # last step of the chunk: +-1.5 for the two modes
    assert (end > 0.75).float().mean() > 0.2 and (end < -0.75).float().mean() > 0.2
    assert (end.abs() < 0.5).float().mean() < 0.2  # no averaged, in-between chunks
