"""drifting-policy: one-step Drifting Policy for robot learning on a shared drifting-field core.

    from drifting_policy import load_policy
    policy, config = load_policy("outputs/train/drifting_pusht_lowdim/checkpoints/latest")

`load_policy` is imported on first use, so `import drifting_policy.drift` stays light.
"""

from __future__ import annotations

__all__ = ["load_policy"]


def __getattr__(name: str):
    if name == "load_policy":
        from drifting_policy.checkpoint import load_policy

        return load_policy
    raise AttributeError(f"module 'drifting_policy' has no attribute {name!r}")
