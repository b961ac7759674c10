"""benchmarks/selection.py keeps the task's own scores (BlockPush p1/p2, Kitchen p1..p7)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import selection  # noqa: E402


def test_task_metrics_are_the_runners_scores_without_timing_or_counts():
    result = {"mean_score": 0.01, "p1": 0.02, "p2": 0.0, "n_test": 50, "per_seed": [],
              "videos": [], "checkpoint": "c", "policy": "drifting", "task": "blockpush_lowdim",
              "ema": True, "n_samples": 4, "eval_seconds": 81.5}
    assert selection.task_metrics(result) == {"mean_score": 0.01, "p1": 0.02, "p2": 0.0}
