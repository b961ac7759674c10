"""robomimic tasks (Lift, PickPlaceCan, ToolHang) on robosuite 1.5 as gymnasium environments.

`RobomimicEnv` wraps one robosuite env built from robomimic env metadata (`env_args`, see
`envs.robomimic.env_args`), so our datasets and robomimic's public ones (robosuite 1.2-1.4
layouts included) evaluate in the same env:

- observations: robomimic key names (`object` = robosuite's `object-state`, `robot0_eef_pos`,
  `robot0_eef_quat` (x, y, z, w), `robot0_gripper_qpos`, ..., `<camera>_image`). Without
  cameras the observation is one float32 vector, the concatenation of `obs_keys` in order
  (Diffusion Policy's low-dim layout, default object | eef_pos | eef_quat | gripper_qpos:
  Lift 19, Can 23, ToolHang 53). With cameras it is a dict: images float32 [3, H, W] in [0, 1]
  (upright, as robomimic stores them) plus the low-dim keys, each float32.
- actions: delta (7: position delta, axis-angle delta, both scaled by the OSC output limits
  5 cm / 0.5 rad per unit, gripper -1 open / +1 close) or absolute (10: world position,
  rotation-6d (first two rows of the rotation matrix), gripper), converted to robosuite 1.5's
  absolute OSC input (world position, rotation vector, gripper).
- reward 1.0 while the task's success check holds, else 0.0 (the runner's max reward is the
  success rate); `info["success"]`. The episode terminates on success (`terminate_on_success`)
  and truncates after `max_episode_steps` (Lift/Can 400, ToolHang 700, as Diffusion Policy).
- `reset(seed=s)` re-seeds robosuite's generator (object placement and robot joint noise) with
  s, so a seed always gives the same initial state; `reset(options={"state": flat})` starts
  from a stored MuJoCo state (robomimic's `reset_to`: time, qpos, qvel flattened).
- rendering: MUJOCO_GL defaults to egl; `hard_reset=False` always (robosuite's hard resets let
  the garbage collector free the GL context and later frames come back as noise or black).
"""

from __future__ import annotations

import os

os.environ.setdefault("MUJOCO_GL", "egl")

import gymnasium as gym  # noqa: E402
import numpy as np  # noqa: E402
from gymnasium import spaces  # noqa: E402
from scipy.spatial.transform import Rotation  # noqa: E402

from envs.robomimic import env_args as ea  # noqa: E402
from envs.robomimic.rotation import abs_action_10_to_7  # noqa: E402

_RENAMED_OBS = {"object-state": "object"}
IMAGE_LOWDIM_KEYS = ("robot0_eef_pos", "robot0_eef_quat", "robot0_gripper_qpos")
CONSTRUCTION_SEED = 0  # fixes the model (e.g. Lift's cube size) across processes


def robomimic_obs(raw: dict) -> dict[str, np.ndarray]:
    """robosuite observation dict -> robomimic names; images flipped upright ([H, W, 3] uint8)."""
    out = {}
    for key, value in raw.items():
        if key.endswith("_image"):
            out[key] = np.ascontiguousarray(np.asarray(value)[::-1])
        else:
            out[_RENAMED_OBS.get(key, key)] = np.asarray(value)
    return out


def make_robosuite(env_args: dict, *, image: bool | None = None, abs_actions: bool | None = None,
                   camera_size: int | None = None):
    """The robosuite 1.5 env an env_args describes (robosuite imported here, MUJOCO_GL set)."""
    import robosuite
    from robosuite.utils.log_utils import ROBOSUITE_DEFAULT_LOGGER

    ROBOSUITE_DEFAULT_LOGGER.setLevel("ERROR")
    env_name, kwargs = ea.robosuite_kwargs(env_args, image=image, abs_actions=abs_actions,
                                           camera_size=camera_size)
    kwargs.setdefault("seed", CONSTRUCTION_SEED)
    return robosuite.make(env_name, **kwargs), kwargs


class RobomimicEnv(gym.Env):
    """One robomimic task; see the module docstring for observations, actions and resets.

    Args:
        task: "lift" | "can" | "tool_hang" (ignored when `env_args` is given).
        env_args: robomimic env metadata to build from instead (any robosuite layout).
        image: cameras on/off (None: what env_args says; False for a task name).
        abs_actions: 10-d absolute actions (None: what env_args says; False for a task name).
        camera_size: camera resolution override (default: the task's, 84 or 240).
        obs_keys: low-dim keys in the observation (default object + eef pos/quat + gripper
            without cameras; eef pos/quat + gripper with them).
        render_size: side of render() frames (videos); render_camera: their camera.
        fast_render: camera observations without multisampling or reflections, in a buffer of
            the camera's size: ~3.5x faster, pixels differ from robosuite's defaults by ~1.6/255
            on average (edges more). Use the same setting for a dataset and its evaluation
            (our demos use the default, True; robomimic's public image files: False).
        max_episode_steps: truncation (default: the task's rollout length).
        terminate_on_success: end the episode at the first successful step.
    """

    metadata = {"render_modes": ["rgb_array"], "render_fps": ea.CONTROL_FREQ}

    def __init__(self, task: str = "lift", *, env_args: dict | None = None,
                 image: bool | None = None, abs_actions: bool | None = None,
                 camera_size: int | None = None, obs_keys: list[str] | None = None,
                 render_size: int = 256, render_camera: str | None = None,
                 max_episode_steps: int | None = None, terminate_on_success: bool = True,
                 fast_render: bool = True, render_mode: str = "rgb_array") -> None:
        if env_args is None:
            env_args = ea.make_env_args(task, image=bool(image), abs_actions=bool(abs_actions),
                                        camera_size=camera_size)
        self.env_args = env_args
        self.task = ea.task_of(env_args.get("env_name"))
        spec = ea.TASKS[self.task]
        self.sim_env, kwargs = make_robosuite(env_args, image=image, abs_actions=abs_actions,
                                              camera_size=camera_size)
        self.image = bool(kwargs.get("use_camera_obs"))
        self.abs_actions = ea.is_absolute(kwargs)
        self.cameras = tuple(kwargs.get("camera_names") or ()) if self.image else ()
        if isinstance(kwargs.get("camera_names"), str):
            self.cameras = (kwargs["camera_names"],)
        self.image_keys = tuple(f"{cam}_image" for cam in self.cameras)
        default_keys = IMAGE_LOWDIM_KEYS if self.image else ea.LOWDIM_KEYS
        self.obs_keys = tuple(obs_keys) if obs_keys is not None else default_keys
        self.render_size = render_size
        self.render_camera = render_camera or spec.cameras[0]
        self.max_episode_steps = max_episode_steps or spec.max_steps
        self.terminate_on_success = terminate_on_success
        self.render_mode = render_mode
        self._render_context = None
        self.elapsed_steps = 0
        self.raw_obs: dict[str, np.ndarray] = {}  # the last robomimic-named observation

        raw = robomimic_obs(self.sim_env.reset())
        if self.image and fast_render:
            _fast_offscreen(self.sim_env.sim, kwargs["camera_heights"], kwargs["camera_widths"])
        missing = [k for k in self.obs_keys if k not in raw]
        if missing:
            raise ValueError(f"obs_keys: {missing} not observed by {spec.env_name} "
                             f"(available: {sorted(k for k in raw if not k.endswith('_image'))})")
        self.obs_dims = {k: int(np.prod(raw[k].shape)) for k in self.obs_keys}
        self.observation_space = self._observation_space(raw)
        dim = 10 if self.abs_actions else 7
        bound = np.inf if self.abs_actions else 1.0
        self.action_space = spaces.Box(-bound, bound, shape=(dim,), dtype=np.float32)
        self.state_dim = self.get_state().shape[0]

    # ---- episode control -----------------------------------------------------------------
    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        if seed is not None:  # the placement sampler and robot noise share this generator
            self.sim_env.rng.bit_generator.state = np.random.default_rng(seed).bit_generator.state
        raw = self.sim_env.reset()
        state = (options or {}).get("state")
        if state is not None:
            raw = self.reset_to_state(state)
        self.elapsed_steps = 0
        self.raw_obs = robomimic_obs(raw)
        return self._observation(self.raw_obs), {"success": self.success()}

    def reset_to_state(self, state: np.ndarray) -> dict:
        """Set the MuJoCo state (robomimic's flattened time, qpos, qvel) and return the raw
        robosuite observation there (no env.reset() here; reset() calls it first).

        Two pieces of robosuite state live outside the MuJoCo state, and a plain
        set-state-and-forward (robomimic 0.3's `reset_to`) leaves both as the preceding random
        reset made them; they are restored here as a reset at `state` would have made them:
        - the OSC controller's nullspace target (`initial_joint`: the arm joints at reset) and
          its goal (the current pose);
        - the observables' sampling clocks (a reset restarts them and samples once; a second
          forced sample would move every later observation one 2 ms substep earlier).
        Replaying a demo's actions from its first stored state then reproduces it (Lift:
        end-effector path within 1e-7 m; without this 4e-3 m after 20 steps).
        """
        state = np.asarray(state, dtype=np.float64).reshape(-1)
        if state.shape[0] != self.state_dim:
            raise ValueError(f"options['state']: expected a flat sim state of length "
                             f"{self.state_dim} for {self.task}, got {state.shape[0]}")
        env = self.sim_env
        env.sim.set_state_from_flattened(state)
        env.sim.forward()
        for robot in env.robots:
            robot.composite_controller.update_state()
            for controller in robot.composite_controller.part_controllers.values():
                controller.update(force=True)
                controller.update_initial_joints(controller.joint_pos)
        env._obs_cache = {}
        for observable in env._observables.values():
            observable.reset()
        return env._get_observations(force_update=True)

    def step(self, action):
        action = np.asarray(action, dtype=np.float64)
        if action.shape != self.action_space.shape:
            raise ValueError(f"action: expected shape {self.action_space.shape} "
                             f"({'absolute' if self.abs_actions else 'delta'}), got {action.shape}")
        if self.abs_actions:
            action = abs_action_10_to_7(action).astype(np.float64)
        raw, _, _, _ = self.sim_env.step(action)
        self.raw_obs = robomimic_obs(raw)
        self.elapsed_steps += 1
        success = self.success()
        terminated = success and self.terminate_on_success
        truncated = self.elapsed_steps >= self.max_episode_steps
        return (self._observation(self.raw_obs), float(success), terminated, truncated,
                {"success": success})

    def absolute_action(self, action: np.ndarray) -> np.ndarray:
        """float64 [7]: the absolute action (world position, rotation vector, gripper) that
        drives the arm like the delta `action` [7] would from the current state: the OSC goal
        pose the delta sets (goal = current grip-site pose + scaled, clipped delta, world
        frame), the gripper command unchanged. Diffusion Policy's robomimic_abs_action
        conversion. Sets the arm controller's goal (the next step sets it again); the
        simulator state and the gripper's rate-limited command are untouched."""
        if self.abs_actions:
            raise ValueError("absolute_action: this env already takes absolute actions; "
                             "build it with abs_actions=False")
        action = np.asarray(action, dtype=np.float64)
        if action.shape != (7,):
            raise ValueError(f"action: expected a delta action of shape (7,), got {action.shape}")
        arm = self.sim_env.robots[0].composite_controller.part_controllers["right"]
        arm.update(force=True)
        arm.set_goal(action[:6])
        rotvec = Rotation.from_matrix(arm.goal_ori).as_rotvec()
        return np.concatenate([arm.goal_pos, rotvec, action[6:]])

    def success(self) -> bool:
        return bool(self.sim_env._check_success())

    def get_state(self) -> np.ndarray:
        """float64 [S]: the flattened MuJoCo state (time, qpos, qvel)."""
        return np.asarray(self.sim_env.sim.get_state().flatten())

    def model_xml(self) -> str:
        """The MJCF of the current model (robomimic's `model_file`)."""
        return self.sim_env.sim.model.get_xml()

    # ---- observations and frames ---------------------------------------------------------
    def _observation_space(self, raw: dict) -> spaces.Space:
        lowdim = {k: spaces.Box(-np.inf, np.inf, shape=raw[k].shape, dtype=np.float32)
                  for k in self.obs_keys}
        if not self.image:
            return spaces.Box(-np.inf, np.inf, shape=(sum(self.obs_dims.values()),),
                              dtype=np.float32)
        images = {k: spaces.Box(0.0, 1.0, shape=(3, *raw[k].shape[:2]), dtype=np.float32)
                  for k in self.image_keys}
        return spaces.Dict({**images, **lowdim})

    def _observation(self, obs: dict[str, np.ndarray]):
        if not self.image:
            return np.concatenate([np.asarray(obs[k], np.float32).reshape(-1)
                                   for k in self.obs_keys])
        out = {k: np.moveaxis(obs[k], -1, 0).astype(np.float32) / 255.0 for k in self.image_keys}
        out.update({k: np.asarray(obs[k], np.float32) for k in self.obs_keys})
        return out

    def render(self) -> np.ndarray:
        """[render_size, render_size, 3] uint8 frame of `render_camera`, upright."""
        sim = self.sim_env.sim
        if sim._render_context_offscreen is None:  # a low-dim env: make one context, keep it
            from robosuite.utils.binding_utils import MjRenderContextOffscreen

            self._render_context = MjRenderContextOffscreen(sim, device_id=-1)
            self._render_context.vopt.geomgroup[0] = 0  # visual meshes, not collision ones
        frame = sim.render(width=self.render_size, height=self.render_size,
                           camera_name=self.render_camera)
        return np.ascontiguousarray(frame[::-1])

    def close(self) -> None:
        self.sim_env.close()


def _fast_offscreen(sim, height: int, width: int) -> None:
    """No multisampling, no reflections, an offscreen buffer of the camera's size (robosuite's
    context enlarges it again if render() asks for bigger frames)."""
    import mujoco

    context = sim._render_context_offscreen
    sim.model.vis.quality.offsamples = 0
    sim.model.vis.global_.offwidth, sim.model.vis.global_.offheight = width, height
    context.con.free()
    context._set_mujoco_context_and_buffers()
    context.scn.flags[mujoco.mjtRndFlag.mjRND_REFLECTION] = 0


def make_env_from_env_args(env_args: dict, *, image: bool | None = None,
                           abs_actions: bool | None = None, render_size: int | None = None,
                           **kwargs) -> RobomimicEnv:
    """Our evaluation env for a robomimic dataset's env metadata (`json.loads(
    f["data"].attrs["env_args"])`); robosuite 1.2-1.4 controller/camera layouts are translated.
    `image` / `abs_actions` None keep what the metadata says; other keywords go to
    `RobomimicEnv` (e.g. fast_render=False for image files rendered with robosuite's defaults)."""
    if render_size is not None:
        kwargs["render_size"] = render_size
    return RobomimicEnv(env_args=env_args, image=image, abs_actions=abs_actions, **kwargs)


def initial_states(n: int, path: str) -> list[np.ndarray]:
    """The first simulator state [S] of the first n demos (by index) of a robomimic HDF5 file:
    the runner's `train_states` (Diffusion Policy's train-initial-condition rollouts)."""
    import h5py

    with h5py.File(path, "r") as f:
        if "data" not in f:
            raise ValueError(f"{path}: expected a robomimic HDF5 file with group 'data'")
        demos = sorted(f["data"], key=lambda name: int(name.rsplit("_", 1)[-1]))
        if len(demos) < n:
            raise ValueError(f"{path}: expected at least n={n} demos, got {len(demos)}")
        return [np.asarray(f[f"data/{d}/states"][0]) for d in demos[:n]]
