"""Long end to end (`pytest -m slow`, ~20 min on 2 cores): expert demos -> CPU-sized drifting
policy -> a real PushT score on held-out test seeds."""

import pytest

from drifting_policy.config import compose
from drifting_policy.data import demos as make_demos
from drifting_policy.eval import evaluate
from drifting_policy.train import TrainWorkspace


@pytest.mark.slow
def test_drifting_policy_reaches_a_real_pusht_score(tmp_path):
    data = tmp_path / "pusht.zarr"
    assert make_demos.main(["pusht", "--episodes", "100", "--out", str(data)]) == 0
    cfg = compose("train_policy", [
        "task=pusht_lowdim", "policy=drifting", "size=cpu", f"run_dir={tmp_path / 'run'}",
        f"task.dataset.path={data}", "training.num_steps=100000", "training.max_minutes=12",
        "training.rollout_every=0", "training.final_rollout=false", "logging.mode=disabled",
    ])
    TrainWorkspace(cfg).run()
    result = evaluate(tmp_path / "run/checkpoints/latest", tmp_path / "eval", n_test=20,
                      n_envs=4, n_videos=0, progress=False)
    # an untrained or collapsed policy scores ~0.05 (the block's initial overlap with the goal)
    assert result["mean_score"] > 0.4
