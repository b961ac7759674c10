"""LeRobot policy plugin: the one-step Drifting Policy as ``--policy.type=drifting``.

Importing the package registers the config (LeRobot's CLIs import every installed
``lerobot_policy_*`` distribution); LeRobot then finds ``DriftingPolicy`` in
``modeling_drifting`` and ``make_drifting_pre_post_processors`` in ``processor_drifting`` by
name. The networks and the drift loss are this project's (``drifting_policy``), imported.
"""

from lerobot_policy_drifting.configuration_drifting import DriftingConfig

__all__ = ["DriftingConfig"]
