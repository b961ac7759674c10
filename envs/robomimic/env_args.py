"""robomimic env metadata (`env_args`) <-> robosuite 1.5 constructor arguments.

robomimic stores how a dataset's env was built as `env_meta = {"env_name", "type": 1,
"env_version", "env_kwargs"}` (HDF5 attribute `data.attrs["env_args"]`, JSON). The public
robomimic v0.1 datasets were made with robosuite 1.2-1.4, whose `env_kwargs` carry a flat
controller config (`{"type": "OSC_POSE", "control_delta": true, "damping": 1, ...}`);
robosuite 1.5 wants a composite config (`{"type": "BASIC", "body_parts": {"right": {...,
"input_type": "delta" | "absolute", "input_ref_frame": ...}}}`) and silently ignores
`control_delta`. `robosuite_kwargs` translates either layout. Old OSC semantics are world-frame
(goal = current eef pose + delta in world axes), so translated controllers use
`input_ref_frame = "world"` (for the Panda, whose base is not rotated, "base" gives the same
deltas but offsets absolute targets by the base position).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

# The same constants the robomimic datasets were recorded with.
CONTROL_FREQ = 20
_OLD_TO_NEW_CONTROLLER_KEYS = {"damping": "damping_ratio", "damping_limits": "damping_ratio_limits"}
_DROPPED_CONTROLLER_KEYS = ("type", "control_delta")
_FORCED_KWARGS = {  # our evaluation env: no window, no auto-done, sparse reward, 1.5 fixes
    "has_renderer": False, "ignore_done": True, "reward_shaping": False,
    "hard_reset": False,  # hard resets let GC free the GL context: silent garbage frames
    "lite_physics": False,  # the physics the datasets were recorded with
}


@dataclass(frozen=True)
class TaskSpec:
    """One robomimic task: robosuite env name, cameras (observation keys `<camera>_image`),
    camera resolution, rollout length and the low-dim keys Diffusion Policy's configs use."""

    env_name: str
    cameras: tuple[str, ...]
    camera_size: int
    max_steps: int
    extra_kwargs: tuple[tuple[str, object], ...] = ()


LOWDIM_KEYS = ("object", "robot0_eef_pos", "robot0_eef_quat", "robot0_gripper_qpos")
TASKS: dict[str, TaskSpec] = {
    "lift": TaskSpec("Lift", ("agentview", "robot0_eye_in_hand"), 84, 400),
    "can": TaskSpec("PickPlaceCan", ("agentview", "robot0_eye_in_hand"), 84, 400),
    "tool_hang": TaskSpec("ToolHang", ("sideview", "robot0_eye_in_hand"), 240, 700),
}
ENV_NAME_TO_TASK = {spec.env_name: name for name, spec in TASKS.items()}


def task_of(env_name: str) -> str:
    """robosuite env name ('Lift', 'PickPlaceCan', 'ToolHang') -> our task name."""
    if env_name not in ENV_NAME_TO_TASK:
        raise ValueError(f"env_args['env_name']: expected one of {sorted(ENV_NAME_TO_TASK)}, "
                         f"got {env_name!r}")
    return ENV_NAME_TO_TASK[env_name]


def controller_config(abs_actions: bool = False) -> dict:
    """robosuite 1.5's default Panda OSC_POSE composite config, world-frame input,
    delta (7-d actions scaled to 5 cm / 0.5 rad) or absolute (world position + rotation vector)."""
    from robosuite.controllers import load_composite_controller_config

    config = load_composite_controller_config(robot="Panda")
    right = config["body_parts"]["right"]
    right["input_type"] = "absolute" if abs_actions else "delta"
    right["input_ref_frame"] = "world"
    return config


def make_env_args(task: str, *, image: bool = False, abs_actions: bool = False,
                  camera_size: int | None = None) -> dict:
    """The env_args (robomimic env_meta) our own datasets store for `task`."""
    import robosuite

    spec = _spec(task)
    size = camera_size or spec.camera_size
    kwargs = {
        "has_renderer": False, "has_offscreen_renderer": image, "ignore_done": True,
        "use_object_obs": True, "use_camera_obs": image, "control_freq": CONTROL_FREQ,
        "controller_configs": controller_config(abs_actions), "robots": ["Panda"],
        "camera_depths": False, "camera_heights": size, "camera_widths": size,
        "camera_names": list(spec.cameras), "reward_shaping": False,
        "hard_reset": False, "lite_physics": False, **dict(spec.extra_kwargs),
    }
    return {"env_name": spec.env_name, "type": 1, "env_version": robosuite.__version__,
            "env_kwargs": kwargs}


def robosuite_kwargs(env_args: dict, *, image: bool | None = None,
                     abs_actions: bool | None = None,
                     camera_size: int | None = None) -> tuple[str, dict]:
    """env_args (robomimic env_meta, robosuite 1.2-1.5 layouts) -> (env_name, kwargs for
    robosuite 1.5's `robosuite.make`). `image`, `abs_actions`, `camera_size` override what the
    file says (None keeps it)."""
    for key in ("env_name", "env_kwargs"):
        if key not in env_args:
            raise ValueError(f"env_args: missing key {key!r} (have {sorted(env_args)})")
    env_name = env_args["env_name"]
    task_of(env_name)
    kwargs = copy.deepcopy(dict(env_args["env_kwargs"]))
    kwargs["controller_configs"] = _translate_controller(kwargs.get("controller_configs"))
    right = kwargs["controller_configs"]["body_parts"]["right"]
    if abs_actions is not None:
        right["input_type"] = "absolute" if abs_actions else "delta"
        right["input_ref_frame"] = "world"
    if image is not None:
        kwargs["use_camera_obs"] = kwargs["has_offscreen_renderer"] = image
    if kwargs.get("use_camera_obs"):
        kwargs.setdefault("camera_names", list(TASKS[task_of(env_name)].cameras))
    if camera_size is not None:
        kwargs["camera_heights"] = kwargs["camera_widths"] = camera_size
    kwargs.update(_FORCED_KWARGS)
    return env_name, kwargs


def absolute_env_args(env_args: dict) -> dict:
    """A copy of `env_args` whose arm takes absolute actions (world position, rotation vector,
    gripper), in the file's own layout: a robosuite 1.2-1.4 flat OSC_POSE config gets
    `control_delta: false` (as Diffusion Policy's *_abs.hdf5 files), a 1.5 composite config
    `input_type: "absolute"`, `input_ref_frame: "world"` on its arm part."""
    task_of(env_args.get("env_name"))
    out = copy.deepcopy(dict(env_args))
    kwargs = out.setdefault("env_kwargs", {})
    config = kwargs.get("controller_configs")
    if config is None or "body_parts" in config:
        config = _translate_controller(config)
        right = config["body_parts"]["right"]
        right["input_type"], right["input_ref_frame"] = "absolute", "world"
    else:
        _translate_controller(config)  # refuses anything but OSC_POSE
        config = {**config, "control_delta": False}
    kwargs["controller_configs"] = config
    return out


def is_absolute(kwargs: dict) -> bool:
    """Whether translated robosuite kwargs drive the arm with absolute targets."""
    return kwargs["controller_configs"]["body_parts"]["right"]["input_type"] == "absolute"


def _translate_controller(config: dict | None) -> dict:
    """A 1.2-1.4 flat OSC_POSE config or a 1.5 composite one -> a 1.5 composite config."""
    if config is None:
        return controller_config(abs_actions=False)
    config = copy.deepcopy(dict(config))
    if "body_parts" in config:  # 1.5 layout; robomimic-era parts may still say control_delta
        for part in config["body_parts"].values():
            if "control_delta" in part:
                part.setdefault("input_type", "delta" if part.pop("control_delta") else "absolute")
                part.setdefault("input_ref_frame", "world")
        if "right" not in config["body_parts"]:
            raise ValueError("env_args controller_configs.body_parts: expected an arm part "
                             f"'right', got {sorted(config['body_parts'])}")
        return config
    if config.get("type") != "OSC_POSE":
        raise ValueError(f"env_args controller_configs.type: expected 'OSC_POSE' (or a "
                         f"robosuite 1.5 composite config), got {config.get('type')!r}")
    new = controller_config(abs_actions=not config.get("control_delta", True))
    right = new["body_parts"]["right"]
    for key, value in config.items():
        if key not in _DROPPED_CONTROLLER_KEYS:
            right[_OLD_TO_NEW_CONTROLLER_KEYS.get(key, key)] = value
    right["input_ref_frame"] = "world"
    return new


def _spec(task: str) -> TaskSpec:
    if task not in TASKS:
        raise ValueError(f"task: expected one of {sorted(TASKS)}, got {task!r}")
    return TASKS[task]
