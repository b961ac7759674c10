"""Figures people look at: training curves from a run's logs.jsonl."""

from __future__ import annotations

import json
from pathlib import Path


def read_logs(path: str | Path) -> list[dict]:
    """Records of a logs.jsonl; a resumed run's repeated steps keep their last record."""
    by_key: dict[tuple, dict] = {}
    for line in Path(path).read_text().splitlines():
        if line.strip():
            r = json.loads(line)
            by_key[(r["step"], tuple(sorted(r)))] = r
    return sorted(by_key.values(), key=lambda r: r["step"])


def plot_training_curves(logs: str | Path, out: str | Path, title: str = "") -> Path:
    """Loss, drift magnitudes lambda_R, validation action MSE and test score against step: one
    panel per quantity the run logged (a panel without data is left out)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_logs(logs)
    panels = [("train/loss", "train loss", False),
              ("train/lambda/", "drift magnitude lambda_R", True),
              ("val/action_mse", "val action MSE (normalised)", True),
              ("test/mean_score", "test mean_score", False)]
    logged = [(sorted({k for r in records for k in r if k.startswith(key)}), label, log)
              for key, label, log in panels]
    logged = [panel for panel in logged if panel[0]]
    fig, axes = plt.subplots(1, len(logged), figsize=(4.2 * len(logged), 3.4), squeeze=False)
    for ax, (keys, label, log) in zip(axes[0], logged):
        for k in keys:
            pts = [(r["step"], r[k]) for r in records if k in r]
            ax.plot(*zip(*pts), marker="o" if len(pts) < 30 else None, lw=1,
                    label=k.removeprefix("train/") if len(keys) > 1 else None)
        if log:
            ax.set_yscale("log")
        if len(keys) > 1:
            ax.legend(fontsize=7)
        ax.set_title(label)
        ax.set_xlabel("step")
    fig.suptitle(title)
    fig.tight_layout()
    out = Path(out)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
