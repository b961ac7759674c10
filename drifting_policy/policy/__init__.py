"""Action-chunk policies: typed configs, the registry, and the two policy types."""

from drifting_policy.policy.configs import (
    ConfigError,
    DiffusionConfig,
    DriftingConfig,
    PolicyConfig,
    config_from_dict,
)
from drifting_policy.policy.registry import POLICIES, make_policy

__all__ = ["ConfigError", "DiffusionConfig", "DriftingConfig", "PolicyConfig", "POLICIES",
           "config_from_dict", "make_policy"]
