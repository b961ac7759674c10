"""ONNX export: onnxruntime reproduces predict_action (same noise) to 1e-4 for lowdim and image
policies, at any batch size; diffusion checkpoints are refused; the CLI writes a working file.

Parity is measured in the normalised action space (the network's output scale, [-1, 1] for the
data): the actions themselves are in pixels (x ~ 100-500), where float32 rounding alone is ~1e-4.
"""

import numpy as np
import pytest
import torch

from drifting_policy import cli
from drifting_policy.bench import build
from drifting_policy.checkpoint import write_checkpoint
from drifting_policy.config import compose
from drifting_policy.export import OnnxPredictor, export_onnx, ort_session
from drifting_policy.rollout.realtime import LocalPredictor

pytestmark = pytest.mark.usefixtures("single_thread")


def with_fitted_normalizer(policy):
    """Non-trivial normaliser for the low-dim keys and the action (images keep [0,1]->[-1,1])."""
    norm = policy.normalizer
    g = torch.Generator().manual_seed(1)
    for key in norm.keys():
        p = norm.params_dict[key]
        if key != "image":
            p["scale"].data = torch.rand(p["scale"].shape, generator=g) * 0.01 + 0.002
            p["offset"].data = torch.randn(p["offset"].shape, generator=g)
    return policy


def normalised_diff(policy, got, ref):
    """max |normalise(got) - normalise(ref)| over the action chunk."""
    a = policy.normalizer["action"]
    return float((a.normalize(torch.as_tensor(got)) - a.normalize(ref)).abs().max())


def predict_inputs(policy, batch, seed):
    """Observation tensors plus the noise predict_action draws from torch.Generator(seed)."""
    rng = np.random.default_rng(seed)
    obs = {k: torch.from_numpy(rng.random((batch, policy.n_obs_steps, *m["shape"]),
                                          dtype=np.float32) * (1 if m["type"] == "rgb" else 512))
           for k, m in policy.shape_meta["obs"].items()}
    noise = torch.randn(batch, policy.horizon, policy.action_dim,
                        generator=torch.Generator().manual_seed(seed))
    return obs, noise


@pytest.mark.parametrize("obs_type", ["lowdim", "image"])
def test_onnxruntime_matches_predict_action(tmp_path, obs_type):
    torch.manual_seed(0)
    policy = with_fitted_normalizer(build("drifting", obs_type, "cpu"))
    session = ort_session(export_onnx(policy, tmp_path / "policy.onnx"))
    assert [i.name for i in session.get_inputs()] == [*policy.shape_meta["obs"], "noise"]
    for batch in (1, 3):  # the batch dimension is dynamic
        obs, noise = predict_inputs(policy, batch, seed=batch)
        got = session.run(["action"], {**{k: v.numpy() for k, v in obs.items()},
                                       "noise": noise.numpy()})[0]
        ref = policy.predict_action(obs, generator=torch.Generator().manual_seed(batch))["action"]
        assert got.shape == (batch, 8, 2)
        assert normalised_diff(policy, got, ref) <= 1e-4


def test_diffusion_checkpoints_are_refused(tmp_path):
    with pytest.raises(ValueError, match="only the one-step DriftingPolicy .* got DiffusionPolicy"):
        export_onnx(build("ddim10", "lowdim", "cpu"), tmp_path / "x.onnx")


def test_export_cli_writes_a_working_graph(tmp_path, capsys):
    cfg = compose("train_policy", ["task=pusht_lowdim", "policy=drifting", "size=cpu"])
    policy = with_fitted_normalizer(build("drifting", "lowdim", "cpu"))
    ckpt = write_checkpoint(tmp_path / "ckpt", cfg, policy)
    out = tmp_path / "deploy" / "policy.onnx"
    assert cli.main(["export", "--checkpoint", str(ckpt), "--format", "onnx",
                     "--out", str(out)]) == 0
    assert "onnxruntime vs torch max |diff|" in capsys.readouterr().out
    obs, noise = predict_inputs(policy, 1, seed=7)
    got = ort_session(out).run(["action"], {"obs": obs["obs"].numpy(), "noise": noise.numpy()})
    ref = policy.predict_action(obs, generator=torch.Generator().manual_seed(7))["action"]
    assert normalised_diff(policy, got[0], ref) <= 1e-4


def test_onnx_predictor_matches_the_local_predictor(tmp_path):
    torch.manual_seed(0)
    policy = with_fitted_normalizer(build("drifting", "lowdim", "cpu"))
    onnx = OnnxPredictor(export_onnx(policy, tmp_path / "policy.onnx"))
    assert (onnx.n_obs_steps, onnx.n_action_steps, onnx.horizon) == (2, 8, 16)
    obs = {"obs": np.random.default_rng(0).uniform(0, 512, (2, 20)).astype(np.float32)}
    got = onnx.predict(obs, seed=11)
    ref = LocalPredictor(policy).predict(obs, seed=11)[:8]  # the Ta executed rows
    assert got.shape == (8, 2)
    assert normalised_diff(policy, got, torch.from_numpy(ref)) <= 1e-4
