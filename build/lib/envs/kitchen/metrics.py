"""Kitchen evaluation metrics (Diffusion Policy's KitchenLowdimRunner): p_n and mean_score."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from envs.kitchen.env import ALL_TASKS


def kitchen_metrics(rewards: np.ndarray, results: Sequence[dict]) -> dict[str, float]:
    """The runner's `metric_fn` for Kitchen-v0.

    Args:
        rewards: [N] per-episode max reward (unused: with +1 per sub-task it is not DP's score).
        results: per-episode dicts holding the env's last info, "n_completed" (sub-tasks done);
            an episode without it (the env raised) counts as 0 completed.

    Returns {"mean_score": mean of n_completed / 7 (DP's kitchen mean_score, which replaces the
    runner's max-reward one), "p1".."p7": fraction of episodes with >= n sub-tasks completed}.
    """
    if len(results) != len(rewards):
        raise ValueError(f"results: expected {len(rewards)} episodes (one per reward), "
                         f"got {len(results)}")
    n_done = np.array([int(r.get("n_completed", 0)) for r in results], dtype=float)
    out = {"mean_score": float(np.mean(n_done) / len(ALL_TASKS))}
    out.update({f"p{n}": float(np.mean(n_done >= n)) for n in range(1, len(ALL_TASKS) + 1)})
    return out
