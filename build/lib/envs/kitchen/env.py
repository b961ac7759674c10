"""Franka Kitchen (gymnasium-robotics `FrankaKitchen-v1`) with D4RL's / Diffusion Policy's
60-d observation, all seven sub-tasks, +1 reward per completed sub-task and cheap rendering.

The simulator is gymnasium-robotics' `FrankaKitchen-v1` (MuJoCo, the relay-policy-learning
kitchen): a 9-DoF Franka (7 arm joints + 2 fingers) at 12.5 Hz (40 physics steps of 2 ms per
control step). Actions are 9-d joint velocities in [-1, 1] (the env scales them by 2 rad/s or
m/s and integrates them from the last observed joint positions into position targets, exactly as
D4RL). The initial state is fixed (D4RL's `init_qpos`); seeds only change the observation noise.

Observation mapping. FrankaKitchen-v1's `observation` is 59-d:

    [0:9]   robot qpos   (7 arm joints, 2 fingers; with observation noise)
    [9:18]  robot qvel
    [18:39] object qpos  (21: sim qpos[9:30], see below; with observation noise)
    [39:59] object qvel  (20: sim qvel[9:29])

D4RL's kitchen observation (`KitchenV0._get_obs`: concat(qp, obj_qp, goal)) and Diffusion
Policy's kitchen datasets use 60-d:

    obs60[0:9]   = obs59[0:9]     robot qpos            = sim qpos[0:9]  (+ noise)
    obs60[9:30]  = obs59[18:39]   object qpos           = sim qpos[9:30] (+ noise)
    obs60[30:60] = 0              goal (D4RL masks it: `goal_masking=True` returns zeros; DP's
                                  mjl loader also writes zeros there)

so obs60[i] for i < 30 is sim qpos[i], and D4RL's OBS_ELEMENT_INDICES index obs60 directly.
Object qpos, in sim order: 9 knob 1 (bottom right), 10 its burner, 11 knob 2 (bottom left),
12 its burner, 13 knob 3 (top right), 14 its burner, 15 knob 4 (top left), 16 its burner,
17 light switch, 18 light, 19 slide cabinet, 20 left hinge door, 21 right hinge door,
22 microwave door, 23:26 kettle xyz, 26:30 kettle quaternion (w, x, y, z).

Sub-tasks (D4RL's goals, distance threshold 0.3 on the listed qpos):
    microwave [22] -> -0.75         kettle [23:30] -> top-left burner pose
    bottom burner [11, 12]          top burner [15, 16]        light switch [17, 18]
    slide cabinet [19] -> 0.37      hinge cabinet [20, 21] -> (0, 1.45)
Reward: the number of sub-tasks completed at this step (+1 each, each counted once);
`terminated` once all requested sub-tasks are done; `truncated` at `max_episode_steps` (280).
info (every step): "n_completed" (int, sub-tasks completed so far), "completed" (7 floats, 1 for
each completed sub-task in `ALL_TASKS` order), "step_completions" (int, completed this step).

Observation noise follows Diffusion Policy's evaluation (`robot_noise_ratio=0.1`, D4RL's value:
+-0.01 rad on the arm joints); FrankaKitchen-v1's own default is 0.01.
"""

from __future__ import annotations

import importlib
import importlib.util
import os

os.environ.setdefault("MUJOCO_GL", "egl")  # headless offscreen rendering (read at mujoco import)

import gymnasium as gym  # noqa: E402
import mujoco  # noqa: E402
import numpy as np  # noqa: E402
from gymnasium import spaces  # noqa: E402

ALL_TASKS = ("bottom burner", "top burner", "light switch", "slide cabinet", "hinge cabinet",
             "microwave", "kettle")  # D4RL's / DP's KitchenBase.ALL_TASKS order
OBS_DIM, ACTION_DIM = 60, 9
MAX_EPISODE_STEPS = 280
CONTROL_HZ = 12.5
N_ROBOT_QPOS, N_OBJECT_QPOS = 9, 21
# D4RL / DP video camera (KitchenTaskRelaxV1.render): free camera looking at the counter
CAMERA = {"distance": 2.2, "azimuth": 70.0, "elevation": -35.0, "lookat": (-0.2, 0.5, 2.0)}


def d4rl_obs(observation: np.ndarray) -> np.ndarray:
    """FrankaKitchen-v1 `observation` [..., 59] -> D4RL / DP kitchen obs [..., 60] (float32):
    robot qpos, object qpos, 30 zero (masked) goal dims."""
    observation = np.asarray(observation)
    if observation.shape[-1] != 59:
        raise ValueError(f"observation: expected last dim 59 (FrankaKitchen-v1), "
                         f"got shape {observation.shape}")
    robot_qpos = observation[..., :N_ROBOT_QPOS]
    object_qpos = observation[..., 18:18 + N_OBJECT_QPOS]
    goal = np.zeros((*observation.shape[:-1], OBS_DIM - N_ROBOT_QPOS - N_OBJECT_QPOS))
    return np.concatenate([robot_qpos, object_qpos, goal], axis=-1).astype(np.float32)


def _prepare_offscreen_gl() -> None:
    """Make the first offscreen context safe to create.

    - MuJoCo picks its GL backend once, when first imported. Where mujoco was imported before
      this module set MUJOCO_GL and there is no display, its default (GLFW) cannot make an
      offscreen context: switch the bindings to EGL (Mesa llvmpipe or a GPU).
    - Mesa's llvmpipe and triton (imported by torch / diffusers) each load their own LLVM;
      triton loaded after Mesa segfaults, the other order works. Load triton first.
    """
    if importlib.util.find_spec("triton") is not None:
        importlib.import_module("triton")
    from mujoco import gl_context

    backend = gl_context.GLContext
    if not os.environ.get("DISPLAY") and backend is not None and "glfw" in backend.__module__:
        from mujoco.egl import GLContext

        gl_context.GLContext = GLContext


class KitchenEnv(gym.Env):
    """FrankaKitchen-v1 with the 60-d D4RL observation; see the module docstring.

    Args:
        tasks: sub-tasks to complete (default all seven, as DP's `kitchen-all-v0`).
        robot_noise_ratio, object_noise_ratio: observation noise scales (FrankaKitchen-v1's).
        render_size: (height, width) of `render()` frames (DP videos: 240 x 360).
        max_episode_steps: the env returns truncated=True at this step.
    """

    metadata = {"render_modes": ["rgb_array"], "render_fps": CONTROL_HZ}

    def __init__(self, tasks: tuple[str, ...] | list[str] = ALL_TASKS,
                 robot_noise_ratio: float = 0.1, object_noise_ratio: float = 0.1,
                 render_size: tuple[int, int] | list[int] = (240, 360),
                 max_episode_steps: int = MAX_EPISODE_STEPS,
                 render_mode: str = "rgb_array") -> None:
        unknown = sorted(set(tasks) - set(ALL_TASKS))
        if unknown:
            raise ValueError(f"tasks: expected names from {ALL_TASKS}, got unknown {unknown}")
        import gymnasium_robotics

        gym.register_envs(gymnasium_robotics)
        self.kitchen = gym.make(
            "FrankaKitchen-v1", tasks_to_complete=list(tasks), terminate_on_tasks_completed=True,
            remove_task_when_completed=True, robot_noise_ratio=robot_noise_ratio,
            object_noise_ratio=object_noise_ratio, disable_env_checker=True,
        ).unwrapped
        self.tasks = tuple(tasks)
        self.render_size = tuple(int(s) for s in render_size)
        self.render_mode = render_mode
        self.max_episode_steps = max_episode_steps
        self.observation_space = spaces.Box(-np.inf, np.inf, (OBS_DIM,), np.float32)
        self.action_space = spaces.Box(-1.0, 1.0, (ACTION_DIM,), np.float32)
        self._renderer: mujoco.Renderer | None = None
        self._steps = 0

    @property
    def model(self) -> mujoco.MjModel:
        return self.kitchen.model

    @property
    def data(self) -> mujoco.MjData:
        """The live simulator state (privileged; what the scripted expert reads)."""
        return self.kitchen.data

    @property
    def dt(self) -> float:
        """Seconds per control step (0.08)."""
        return self.kitchen.robot_env.dt

    def completed(self) -> list[str]:
        """Sub-tasks completed so far, in completion order."""
        return list(self.kitchen.episode_task_completions)

    def _info(self, step_completions: int) -> dict:
        done = set(self.kitchen.episode_task_completions)
        return {"n_completed": len(done),
                "completed": np.array([float(t in done) for t in ALL_TASKS]),
                "step_completions": step_completions}

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        obs, _ = self.kitchen.reset(seed=seed)
        self._steps = 0
        return d4rl_obs(obs["observation"]), self._info(0)

    def step(self, action):
        action = np.asarray(action, dtype=np.float64)
        if action.shape != (ACTION_DIM,):
            raise ValueError(f"action: expected shape ({ACTION_DIM},), got {action.shape}")
        obs, reward, terminated, _, info = self.kitchen.step(action)
        self._steps += 1
        truncated = self._steps >= self.max_episode_steps
        n_new = len(info["step_task_completions"])
        return (d4rl_obs(obs["observation"]), float(reward), bool(terminated), truncated,
                self._info(n_new))

    def render(self) -> np.ndarray:
        """(H, W, 3) uint8 from DP's video camera; no shadows or reflections, an offscreen
        buffer of exactly the frame size (the model's default 2560x1920 one is ~7x slower)."""
        if self._renderer is None:
            _prepare_offscreen_gl()
            height, width = self.render_size
            self.model.vis.global_.offwidth = max(width, 1)
            self.model.vis.global_.offheight = max(height, 1)
            self._renderer = mujoco.Renderer(self.model, height, width)
            for flag in (mujoco.mjtRndFlag.mjRND_SHADOW, mujoco.mjtRndFlag.mjRND_REFLECTION,
                         mujoco.mjtRndFlag.mjRND_SKYBOX):
                self._renderer.scene.flags[flag] = 0
            self._camera = mujoco.MjvCamera()
            self._camera.type = mujoco.mjtCamera.mjCAMERA_FREE
            self._camera.distance = CAMERA["distance"]
            self._camera.azimuth = CAMERA["azimuth"]
            self._camera.elevation = CAMERA["elevation"]
            self._camera.lookat[:] = CAMERA["lookat"]
        self._renderer.update_scene(self.data, camera=self._camera)
        return self._renderer.render().copy()

    def close(self) -> None:
        if self._renderer is not None:
            self._renderer.close()
            self._renderer = None
        self.kitchen.close()
