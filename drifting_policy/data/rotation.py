"""Absolute-action rotation conversions for the dataset code: the env's own functions
(`envs.robomimic.rotation`, where the conventions are documented), so a file's actions are
converted exactly as the env executes them."""

from envs.robomimic.rotation import (
    abs_action_7_to_10,
    abs_action_10_to_7,
    axis_angle_to_rot6d,
    rot6d_to_axis_angle,
)

__all__ = ["abs_action_7_to_10", "abs_action_10_to_7", "axis_angle_to_rot6d",
           "rot6d_to_axis_angle"]
