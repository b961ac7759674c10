"""BlockPush's p1 / p2: the runner's `metric_fn` hook (configs/task/blockpush_lowdim.yaml)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

P1_THRESHOLD, P2_THRESHOLD = 0.4, 0.9  # DP: total reward > 0.4 (one block in), > 0.9 (both)


def p1_p2(rewards: np.ndarray, results: Sequence[dict]) -> dict[str, float]:
    """Diffusion Policy's BlockPush metrics from the episodes' final infos.

    Args:
        rewards: [N] per-episode max step reward (the runner's score; unused: the metrics need
            the episode totals).
        results: N per-seed dicts holding the env's last info, including `total_reward`; a dict
            without it (an episode whose env raised) counts as total 0.
    Returns:
        {"p1": fraction of episodes with total > 0.4, "p2": ... > 0.9,
         "mean_score": mean total reward} -- DP's BlockPush mean_score is the mean of the
        episode totals (0, 0.49 or 1.0), which replaces the runner's mean of max step rewards.
    """
    if len(rewards) != len(results):
        raise ValueError(f"rewards: expected {len(results)} episodes (one per result), "
                         f"got {len(rewards)}")
    if not results:
        raise ValueError("results: expected at least one episode, got none")
    totals = np.array([float(r.get("total_reward", 0.0)) for r in results])
    return {"p1": float(np.mean(totals > P1_THRESHOLD)),
            "p2": float(np.mean(totals > P2_THRESHOLD)),
            "mean_score": float(np.mean(totals))}
