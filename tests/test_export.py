"""ONNX export: onnxruntime reproduces predict_action (same noise) to 1e-4 for lowdim and image
policies, at any batch size and any K (the medoid of K chunks, K a batch dimension of the noise);
diffusion checkpoints are refused; the CLI writes a working file.

Parity is measured in the normalised action space (the network's output scale, [-1, 1] for the
data): the actions themselves are in pixels (x ~ 0-512), where float32 rounding alone is ~1e-4.
"""

import numpy as np
import pytest
import torch
from deploy_helpers import policy

from drifting_policy import cli
from drifting_policy.deploy.contract import seeded_noise
from drifting_policy.deploy.export import export_onnx
from drifting_policy.deploy.predictors import OnnxPredictor, ort_session

pytestmark = pytest.mark.usefixtures("single_thread")


def normalised_diff(p, got, ref):
    """max |normalise(got) - normalise(ref)| over the action chunk."""
    a = p.normalizer["action"]
    return float((a.normalize(torch.as_tensor(got)) - a.normalize(ref)).abs().max())


def predict_inputs(p, batch, seed):
    """Observation tensors [B, To, ...] (images in [0, 1], low-dim in the normaliser's range)."""
    rng = np.random.default_rng(seed)
    return {k: torch.from_numpy(rng.random((batch, p.n_obs_steps, *m["shape"]), dtype=np.float32)
                                * (1 if m["type"] == "rgb" else 512))
            for k, m in p.shape_meta["obs"].items()}


@pytest.mark.parametrize("task", ["pusht_lowdim", "pusht_image"])
def test_onnxruntime_matches_predict_action_for_any_batch_and_k(tmp_path, task):
    p = policy(task)
    session = ort_session(export_onnx(p, tmp_path / "policy.onnx"))
    assert [i.name for i in session.get_inputs()] == [*p.shape_meta["obs"], "noise"]
    assert [o.name for o in session.get_outputs()] == ["action", "action_pred"]
    for batch, k in ((1, 1), (3, 1), (1, 4), (2, 3)):  # batch and K are dynamic
        obs = predict_inputs(p, batch, seed=batch)
        # predict_action draws noise [B * K, T, Da] from the generator, observation-major
        noise = seeded_noise(10 * batch + k, batch * k, p.horizon, p.action_dim)
        action, action_pred = session.run(["action", "action_pred"], {
            **{key: v.numpy() for key, v in obs.items()}, "noise": noise.numpy()})
        ref = p.predict_action(obs, n_samples=k,
                               generator=torch.Generator().manual_seed(10 * batch + k))
        assert action.shape == (batch, 8, 2) and action_pred.shape == (batch, 16, 2)
        assert normalised_diff(p, action_pred, ref["action_pred"]) <= 1e-4, (batch, k)
        assert normalised_diff(p, action, ref["action"]) <= 1e-4, (batch, k)


def test_medoid_selection_changes_the_answer_and_picks_one_of_the_candidates(tmp_path):
    """K = 4 returns exactly one of the 4 single-sample chunks drawn from the same noise rows
    (the graph selects, it does not average), the one with the least summed distance."""
    p = policy("blockpush")
    session = ort_session(export_onnx(p, tmp_path / "policy.onnx"))
    obs = predict_inputs(p, 1, seed=0)["obs"].numpy()
    noise = seeded_noise(5, 4, p.horizon, p.action_dim).numpy()
    (picked,) = session.run(["action_pred"], {"obs": obs, "noise": noise})
    (singles,) = session.run(["action_pred"], {"obs": np.repeat(obs, 4, 0), "noise": noise})
    norm = p.normalizer["action"].normalize(torch.from_numpy(singles)).reshape(4, -1)
    cost = torch.cdist(norm, norm).sum(1)
    np.testing.assert_allclose(picked[0], singles[int(cost.argmin())], rtol=0, atol=1e-4)
    assert not np.allclose(singles[0], singles[1])


def test_diffusion_checkpoints_are_refused(tmp_path):
    with pytest.raises(ValueError, match="only the one-step DriftingPolicy .* got DiffusionPolicy"):
        export_onnx(policy("blockpush", kind="diffusion"), tmp_path / "x.onnx")


def test_export_cli_writes_a_working_graph(tmp_path, capsys):
    p = policy("pusht_lowdim")
    p.save_pretrained(tmp_path / "policy")
    out = tmp_path / "deploy" / "policy.onnx"
    assert cli.main(["export", "--checkpoint", str(tmp_path / "policy"), "--format", "onnx",
                     "--out", str(out)]) == 0
    assert "onnxruntime vs torch max |diff|" in capsys.readouterr().out
    obs = predict_inputs(p, 1, seed=7)
    onnx = OnnxPredictor(out)
    assert (onnx.n_obs_steps, onnx.n_action_steps, onnx.horizon) == (2, 8, 16)
    got = onnx.predict({"obs": obs["obs"][0].numpy()}, seed=7)
    ref = p.predict_action(obs, generator=torch.Generator().manual_seed(7))["action_pred"]
    assert got.shape == (15, 2)  # the executable horizon, rows To - 1 ..
    assert normalised_diff(p, got, ref[0, 1:]) <= 1e-4


def test_a_graph_without_the_exported_layout_is_refused(tmp_path):
    import onnx

    path = export_onnx(policy("blockpush"), tmp_path / "policy.onnx")
    model = onnx.load(str(path))
    del model.metadata_props[:]
    onnx.save(model, str(tmp_path / "bare.onnx"))
    with pytest.raises(ValueError, match=r"expected a graph from `drifting-policy export`.* "
                                         r"metadata \[\]"):
        OnnxPredictor(tmp_path / "bare.onnx")
