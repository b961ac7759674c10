"""Policy type name -> (config class, policy class): the only way a file's "type" becomes code.

    policy = make_policy(DriftingConfig(shape_meta=..., ...))
    policy.save_pretrained("out/my_policy")
    policy = POLICIES["drifting"].from_pretrained("out/my_policy")
    # drifting_policy.load_policy(dir) does the same for any type and for training checkpoints
"""

from __future__ import annotations

from drifting_policy.policy.base import ChunkPolicy
from drifting_policy.policy.configs import CONFIG_TYPES, PolicyConfig
from drifting_policy.policy.diffusion import DiffusionPolicy
from drifting_policy.policy.drifting import DriftingPolicy

POLICIES: dict[str, type[ChunkPolicy]] = {c.config_class.type: c
                                          for c in (DriftingPolicy, DiffusionPolicy)}
assert set(POLICIES) == set(CONFIG_TYPES), "every config type needs a policy class"


def make_policy(config: PolicyConfig) -> ChunkPolicy:
    """The untrained policy a typed config describes."""
    if not isinstance(config, PolicyConfig) or config.type not in POLICIES:
        raise TypeError(f"make_policy: expected a DriftingConfig or DiffusionConfig, "
                        f"got {type(config).__name__}")
    return POLICIES[config.type](config)
