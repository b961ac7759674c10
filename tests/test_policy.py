"""Policy API (Diffusion Policy's), network-call counts and what the drift loss teaches."""

import pytest
import torch

from drifting_policy.bench import build, count_nfe, example_obs
from drifting_policy.nn.normalizer import LinearNormalizer
from drifting_policy.policy.diffusion import DiffusionPolicy
from drifting_policy.policy.drifting import DriftingPolicy

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


def _lowdim_policy(cls=DriftingPolicy, **kw):
    p = cls(shape_meta=LOWDIM, horizon=8, n_obs_steps=2, n_action_steps=4,
            down_dims=(16, 32), diffusion_step_embed_dim=16, **kw)
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
    torch.testing.assert_close(pred, p.normalizer["action"].unnormalize(naction))
    # normalised [-1, 1] maps to the data range [-2, 2]
    one = torch.ones(1, 1, 2)
    torch.testing.assert_close(p.normalizer["action"].unnormalize(one), 2 * one, atol=0.1, rtol=0)


@pytest.mark.parametrize("mode", ["per_timestep", "flat"])
def test_drift_loss_layout(mode, monkeypatch):
    """per_timestep: B*T problems of G samples with S = Da; flat: B problems with S = T*Da."""
    import drifting_policy.policy.drifting as mod

    seen = {}
    real = mod.drift_loss

    def spy(gen, pos, **kw):
        seen["gen"], seen["pos"] = gen.shape, pos.shape
        return real(gen, pos, **kw)

    monkeypatch.setattr(mod, "drift_loss", spy)
    p = _lowdim_policy(gen_per_obs=5, loss_mode=mode)
    batch = {"obs": torch.rand(3, 8, 20), "action": torch.rand(3, 8, 2)}
    loss, info = p.compute_loss_and_info(batch)
    loss.backward()
    expect = ((24, 5, 2), (24, 1, 2)) if mode == "per_timestep" else ((3, 5, 16), (3, 1, 16))
    assert (seen["gen"], seen["pos"]) == expect
    assert "lambda/0.02" in info
    assert all(q.grad is not None for q in p.model.parameters() if q.requires_grad)


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
    with pytest.raises(ValueError, match="loss_mode"):
        _lowdim_policy(loss_mode="bogus")
    with pytest.raises(ValueError, match="horizon"):
        DriftingPolicy(shape_meta=LOWDIM, horizon=10, n_obs_steps=2,
                       n_action_steps=4, down_dims=(16, 32, 64))


@pytest.mark.slow
@pytest.mark.parametrize("cls", [DriftingPolicy, DiffusionPolicy])
def test_policy_learns_a_bimodal_chunk_distribution(cls):
    """Expert chunks are +1 or -1 ramps for the same observation: one-step drifting must keep
    both modes (not average them to 0), like the multi-step diffusion baseline."""
    torch.manual_seed(0)
    kw = dict(num_inference_steps=10, scheduler="ddim") if cls is DiffusionPolicy else {}
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
