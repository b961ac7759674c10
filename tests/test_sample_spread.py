"""benchmarks/sample_spread.py: its statistics against closed forms, and on a trained checkpoint."""

import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from drifting_policy.checkpoint import load_policy, load_train_config
from drifting_policy.config import compose
from drifting_policy.data.dataset import load_dataset
from drifting_policy.train import TrainWorkspace

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import sample_spread  # noqa: E402

pytestmark = pytest.mark.usefixtures("single_thread")


def test_a_calibrated_gaussian_scores_one_and_its_closed_forms():
    """Expert and K samples iid N(mu_b, s^2): E mse_one = 2 s^2, E mse_mean = s^2 (1 + 1/K)."""
    g = torch.Generator().manual_seed(0)
    b, k, s = 4000, 8, 0.3
    mu = torch.randn(b, 1, 5, 2, generator=g)
    samples = mu + s * torch.randn(b, k, 5, 2, generator=g)
    target = mu[:, 0] + s * torch.randn(b, 5, 2, generator=g)
    st = sample_spread.spread_stats(samples, target)
    assert st["calibration"] == pytest.approx(1.0, rel=0.03)
    assert st["spread"] == pytest.approx(s, rel=0.02)
    assert st["mse_one"] == pytest.approx(2 * s**2, rel=0.03)
    assert st["mse_mean"] == pytest.approx(s**2 * (1 + 1 / k), rel=0.03)
    assert st["best_of_k"] < st["mse_mean"] < st["mse_one"]


def test_a_collapsed_generator_has_no_spread_and_infinite_calibration():
    chunk = torch.randn(3, 1, 4, 2)
    target = torch.zeros(3, 4, 2)
    st = sample_spread.spread_stats(chunk.expand(3, 5, 4, 2), target)
    assert st["spread"] == 0 and st["calibration"] == float("inf")
    assert st["mse_one"] == pytest.approx(chunk.pow(2).mean().item())
    assert st["mse_one"] == pytest.approx(st["mse_mean"]) == pytest.approx(st["best_of_k"])


def test_one_sample_per_observation_is_refused():
    with pytest.raises(ValueError, match=r"expected \[B, K>=2, T, D\].*\(3, 1, 4, 2\)"):
        sample_spread.spread_stats(torch.zeros(3, 1, 4, 2), torch.zeros(3, 4, 2))


def _trained(run_dir: Path, data: Path, val_ratio: float) -> Path:
    cfg = compose("train_policy", [
        "task=pusht_lowdim", "policy=drifting", f"task.dataset.path={data}",
        f"task.dataset.val_ratio={val_ratio}", f"run_dir={run_dir}", "device=cpu",
        "logging.mode=disabled", "policy.down_dims=[16,32]", "policy.diffusion_step_embed_dim=16",
        "training.batch_size=4", "training.num_steps=3", "training.lr_warmup_steps=1",
        "training.checkpoint_every=3", "training.val_every=100", "training.rollout_every=100",
        "training.log_every=100"])
    TrainWorkspace(cfg).run()
    return run_dir / "checkpoints" / "latest"


def test_measure_draws_k_chunks_on_the_validation_windows(tmp_path, random_pusht_zarr):
    ckpt = _trained(tmp_path / "run", random_pusht_zarr, 0.34)
    rows = sample_spread.measure(ckpt, n_obs=6, k=3, seed=5)
    assert [r["weights"] for r in rows] == ["ema", "raw"]
    assert rows[0]["n_obs"] == 6 and rows[0]["mse_one"] != rows[1]["mse_one"]
    # independently: the EMA policy's K seeded chunks on six evenly spaced validation windows
    policy, _ = load_policy(ckpt)
    dataset = OmegaConf.to_container(load_train_config(ckpt).task.dataset, resolve=True)
    val = load_dataset(dataset).get_validation_dataset()
    idx = torch.linspace(0, len(val) - 1, 6).round().long()
    obs = torch.stack([val[int(i)]["obs"] for i in idx])
    action = torch.stack([val[int(i)]["action"] for i in idx])
    target = policy.normalizer["action"].normalize(action)
    chunks = policy.sample_chunks({"obs": obs}, 3, torch.Generator().manual_seed(5))
    err = (chunks - target[:, None]).pow(2).mean((2, 3))
    assert rows[0]["mse_one"] == pytest.approx(err.mean().item(), rel=1e-5)
    assert rows[0]["best_of_k"] == pytest.approx(err.min(1).values.mean().item(), rel=1e-5)


def test_measure_names_a_dataset_without_validation_episodes(tmp_path, random_pusht_zarr):
    ckpt = _trained(tmp_path / "run", random_pusht_zarr, 0)
    with pytest.raises(ValueError, match="val_ratio is 0"):
        sample_spread.measure(ckpt, n_obs=4, k=2, seed=0)
