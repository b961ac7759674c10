"""PushT as a gymnasium environment, with Diffusion Policy's physics and conventions.

A circular pusher (radius 15, kinematic) follows a PD controller (k_p=100, k_v=20) towards the
action, an absolute target in the 512x512 pixel workspace; it pushes a T-shaped block (mass 1,
frictionless contacts, space damping 0 so the block only moves while pushed) onto the goal
pose (256, 256, pi/4). Physics runs at 100 Hz, control at 10 Hz. Everything here follows
Diffusion Policy's `PushTEnv` / `PushTKeypointsEnv` / `PushTImageEnv`
(github real-stanford/diffusion_policy, diffusion_policy/env/pusht), including:

- reset distribution: `reset(seed=s)` draws DP's initial state for seed s (legacy
  `np.random.RandomState(s)`: agent xy in [50, 450), block xy in [100, 400), block angle
  randn * 2pi - pi), so DP's train/test seeds give the same initial conditions;
  `reset()` without a seed draws a fresh layout seed from the env's gymnasium RNG.
- reward = clip(coverage / 0.95, 0, 1), coverage = area(block ∩ goal T) / area(goal T);
  `terminated` once coverage > 0.95.
- episode length: the env itself returns `truncated=True` at step `max_episode_steps`
  (300), so a directly constructed env and one from `gymnasium.make` both stop there
  (the gymnasium ids are registered without a TimeLimit wrapper).
- observations (`obs_type`):
    "keypoints": float32 (20,) = 9 block keypoints (x, y) flattened, then agent xy; equals
                 DP's `concat(keypoint.reshape(-1, 18), state[:, :2])` on its zarr arrays.
    "state":     float32 (5,) = agent xy, block xy, block angle mod 2pi (DP's `state`).
    "image":     {"image": float32 (3, 96, 96) in [0, 1], "agent_pos": float32 (2,)}.
- info: pos_agent, vel_agent, block_pose (x, y, angle), goal_pose, n_contacts (contact
  points per physics step during the last control step, rounded up, counted over every
  colliding pair as DP does: in practice pusher-block and block-wall), coverage.
"""

from __future__ import annotations

import math

import gymnasium as gym
import numpy as np
import pymunk
import shapely.geometry as sg
from gymnasium import spaces

WINDOW_SIZE = 512
SIM_HZ = 100
CONTROL_HZ = 10
SUBSTEPS = SIM_HZ // CONTROL_HZ
K_P, K_V = 100, 20  # PD gains of the pusher's controller
AGENT_RADIUS = 15
GOAL_POSE = np.array([256.0, 256.0, math.pi / 4])
SUCCESS_THRESHOLD = 0.95
MAX_EPISODE_STEPS = 300
IMAGE_SIZE = 96

# The T in its body frame (pixels, y down): a 120x30 bar with a 30x90 stem below its middle.
T_BAR = np.array([[-60.0, 30.0], [60.0, 30.0], [60.0, 0.0], [-60.0, 0.0]])
T_STEM = np.array([[-15.0, 30.0], [-15.0, 120.0], [15.0, 120.0], [15.0, 30.0]])
T_PARTS = (T_BAR, T_STEM)
T_AREA = 120.0 * 30.0 + 30.0 * 90.0

# DP's 9 block keypoints in the body frame. DP derives them at start-up: it rasterises the T at
# angle 0 with its pygame drawing (fill + 2 px outline), runs farthest-point sampling over the
# covered pixels from a start pixel drawn by np.random.default_rng(0), then adds uniform(0, 1)
# jitter from the same generator. These are the values of that procedure (re-derived in
# tests/test_pusht_env.py with envs.pusht.render), so keypoint observations match DP's data.
BLOCK_KEYPOINTS = np.array([
    [9.269786713763871, 90.04097352393619],
    [-60.983472364471474, -1.1867297607997276],
    [60.91275557727772, -1.3933642242328201],
    [-0.2705034390160016, 25.54362499146542],
    [-14.064927576212233, 122.81585355412153],
    [39.002738500170146, 32.857404276587566],
    [-39.966414424694534, 32.729655446429945],
    [-16.82434437939744, 62.86317892234989],
    [23.54146122024909, -1.7002881094626152],
])


def rotation(angle: float) -> np.ndarray:
    c, s = math.cos(angle), math.sin(angle)
    return np.array([[c, -s], [s, c]])


def body_to_world(points: np.ndarray, pose) -> np.ndarray:
    """Body-frame points (..., 2) to world pixels for pose (x, y, angle) of the body origin."""
    return np.asarray(points) @ rotation(pose[2]).T + np.asarray(pose[:2])


def block_keypoints(block_pose) -> np.ndarray:
    """The 9 keypoints (9, 2) of a block at pose (x, y, angle), world pixels."""
    return body_to_world(BLOCK_KEYPOINTS, block_pose)


def coverage(block_pose, goal_pose=GOAL_POSE) -> float:
    """Fraction of the goal T's area covered by the block (the T's two parts never overlap)."""
    block = [sg.Polygon(body_to_world(p, block_pose)) for p in T_PARTS]
    goal = [sg.Polygon(body_to_world(p, goal_pose)) for p in T_PARTS]
    return sum(b.intersection(g).area for b in block for g in goal) / T_AREA


class _ContactCounter:
    """Contact points seen by the collision callback since the last reset of `count`."""

    count = 0


def _count_contacts(arbiter: pymunk.Arbiter, space: pymunk.Space, counter: _ContactCounter):
    counter.count += len(arbiter.contact_point_set.points)


class PushTPhysics:
    """The pymunk world of one episode: four walls, the pusher and the T block.

    Built in DP's order (walls, agent, block) so contact solving matches it step for step.
    The expert builds its own instances to try pushes without touching the env's.
    """

    def __init__(self) -> None:
        self.space = space = pymunk.Space()
        space.gravity = (0, 0)
        space.damping = 0  # bodies lose all velocity every step: quasi-static pushing
        walls = [((5, 506), (5, 5)), ((5, 5), (506, 5)), ((506, 5), (506, 506)),
                 ((5, 506), (506, 506))]
        space.add(*[pymunk.Segment(space.static_body, a, b, 2) for a, b in walls])

        self.agent = pymunk.Body(body_type=pymunk.Body.KINEMATIC)
        self.agent.position = (256, 400)
        space.add(self.agent, pymunk.Circle(self.agent, AGENT_RADIUS))

        # DP sums the bar's moment twice (a quirk kept for identical dynamics) and puts the
        # centre of gravity halfway between the two parts' centroids. Shapes keep pymunk's
        # default friction 0 (DP's `body.friction = 1` sets no shape property).
        self.block = pymunk.Body(1, 2 * pymunk.moment_for_poly(1, T_BAR.tolist()))
        bar = pymunk.Poly(self.block, T_BAR.tolist())
        stem = pymunk.Poly(self.block, T_STEM.tolist())
        self.block.center_of_gravity = (bar.center_of_gravity + stem.center_of_gravity) / 2
        self.block.position = (256, 300)
        space.add(self.block, bar, stem)

        self._contacts = _ContactCounter()
        space.on_collision(0, 0, post_solve=_count_contacts, data=self._contacts)

    def set_state(self, state) -> None:
        """Agent xy, block xy, block angle (DP's non-legacy order: angle before position)."""
        state = [float(v) for v in state]
        self.agent.position = (state[0], state[1])
        self.block.angle = state[4]
        self.block.position = (state[2], state[3])
        self.space.step(1.0 / SIM_HZ)  # let the solver settle the new configuration

    def get_state(self) -> np.ndarray:
        """float64 (5,): agent xy, block xy, block angle mod 2pi."""
        return np.array([*self.agent.position, *self.block.position,
                         self.block.angle % (2 * math.pi)])

    @property
    def block_pose(self) -> np.ndarray:
        return np.array([*self.block.position, self.block.angle])

    def step(self, action) -> int:
        """One control step towards target `action`; returns contact points per physics step."""
        target_x, target_y = float(action[0]), float(action[1])
        dt = 1.0 / SIM_HZ
        self._contacts.count = 0
        for _ in range(SUBSTEPS):
            (x, y), (vx, vy) = self.agent.position, self.agent.velocity
            ax = K_P * (target_x - x) + K_V * (0 - vx)
            ay = K_P * (target_y - y) + K_V * (0 - vy)
            self.agent.velocity = (vx + ax * dt, vy + ay * dt)
            self.space.step(dt)
        return math.ceil(self._contacts.count / SUBSTEPS)


class PushTEnv(gym.Env):
    """Diffusion Policy's PushT; see the module docstring for the conventions."""

    metadata = {"render_modes": ["rgb_array"], "render_fps": CONTROL_HZ}
    OBS_TYPES = ("keypoints", "state", "image")

    def __init__(self, obs_type: str = "keypoints", render_size: int = 96,
                 render_action: bool = True, max_episode_steps: int = MAX_EPISODE_STEPS,
                 render_mode: str = "rgb_array") -> None:
        if obs_type not in self.OBS_TYPES:
            raise ValueError(f"obs_type must be one of {self.OBS_TYPES}, got {obs_type!r}")
        self.obs_type = obs_type
        self.render_size = render_size
        self.render_action = render_action
        self.max_episode_steps = max_episode_steps
        self.render_mode = render_mode
        self.goal_pose = GOAL_POSE.copy()

        ws = float(WINDOW_SIZE)
        self.action_space = spaces.Box(0.0, ws, shape=(2,), dtype=np.float32)
        if obs_type == "keypoints":
            self.observation_space = spaces.Box(0.0, ws, shape=(20,), dtype=np.float32)
        elif obs_type == "state":
            self.observation_space = spaces.Box(
                np.zeros(5, np.float32), np.array([ws, ws, ws, ws, 2 * math.pi], np.float32),
                dtype=np.float32)
        else:
            self.observation_space = spaces.Dict({
                "image": spaces.Box(0.0, 1.0, shape=(3, IMAGE_SIZE, IMAGE_SIZE),
                                    dtype=np.float32),
                "agent_pos": spaces.Box(0.0, ws, shape=(2,), dtype=np.float32),
            })

        self.physics: PushTPhysics | None = None
        self.latest_action: np.ndarray | None = None
        self.n_contacts = 0
        self.elapsed_steps = 0
        self._frame_cache: tuple[int, np.ndarray] | None = None  # (physics tick, 512 px frame)
        self._tick = 0

    # ---- episode control -------------------------------------------------------------
    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        if options and options.get("reset_to_state") is not None:
            state = np.asarray(options["reset_to_state"], dtype=np.float64)
        else:
            layout_seed = seed if seed is not None else int(self.np_random.integers(2**31))
            state = self.initial_state(layout_seed)
        self.physics = PushTPhysics()
        self.physics.set_state(state)
        self.latest_action = None
        self.n_contacts = 0
        self.elapsed_steps = 0
        self._tick += 1
        return self._get_obs(), self._get_info()

    def reset_to_state(self, state):
        """Start an episode from a 5-d state (agent xy, block xy, block angle)."""
        return self.reset(options={"reset_to_state": state})

    @staticmethod
    def initial_state(seed: int) -> np.ndarray:
        """DP's initial state for `seed` (its legacy RandomState draw order)."""
        rs = np.random.RandomState(seed=seed)
        return np.array([rs.randint(50, 450), rs.randint(50, 450),
                         rs.randint(100, 400), rs.randint(100, 400),
                         rs.randn() * 2 * np.pi - np.pi])

    def step(self, action):
        if self.physics is None:
            raise RuntimeError("call reset() before step()")
        action = np.asarray(action, dtype=np.float64).reshape(2)
        self.latest_action = action
        self.n_contacts = self.physics.step(action)
        self.elapsed_steps += 1
        self._tick += 1
        info = self._get_info()
        reward = float(np.clip(info["coverage"] / SUCCESS_THRESHOLD, 0.0, 1.0))
        terminated = info["coverage"] > SUCCESS_THRESHOLD
        truncated = self.elapsed_steps >= self.max_episode_steps
        return self._get_obs(), reward, terminated, truncated, info

    def get_state(self) -> np.ndarray:
        """float64 (5,): agent xy, block xy, block angle mod 2pi."""
        return self.physics.get_state()

    # ---- observations ------------------------------------------------------------------
    def _get_obs(self):
        agent_pos = np.array(self.physics.agent.position, dtype=np.float32)
        if self.obs_type == "keypoints":
            kps = block_keypoints(self.physics.block_pose).astype(np.float32)
            return np.concatenate([kps.reshape(18), agent_pos])
        if self.obs_type == "state":
            return self.get_state().astype(np.float32)
        image = self.render_frame(IMAGE_SIZE).astype(np.float32) / 255.0
        return {"image": np.moveaxis(image, -1, 0), "agent_pos": agent_pos}

    def _get_info(self) -> dict:
        block_pose = self.physics.block_pose
        return {
            "pos_agent": np.array(self.physics.agent.position),
            "vel_agent": np.array(self.physics.agent.velocity),
            "block_pose": block_pose,
            "goal_pose": self.goal_pose.copy(),
            "n_contacts": self.n_contacts,
            "coverage": coverage(block_pose, self.goal_pose),
        }

    # ---- rendering ---------------------------------------------------------------------
    def render_frame(self, size: int) -> np.ndarray:
        """(size, size, 3) uint8 picture of the scene without the action marker (DP's obs)."""
        from envs.pusht import render

        if self._frame_cache is None or self._frame_cache[0] != self._tick:
            goal = [body_to_world(p, self.goal_pose) for p in T_PARTS]
            self._frame_cache = (self._tick, render.draw_space(self.physics.space, goal))
        return render.resize(self._frame_cache[1], size)

    def render(self) -> np.ndarray:
        """(render_size, render_size, 3) uint8; with a red cross at the last target if
        `render_action` (as DP's videos)."""
        img = self.render_frame(self.render_size)
        if self.render_action and self.latest_action is not None:
            from envs.pusht import render

            render.draw_action_marker(img, self.latest_action)
        return img
