"""BlockPush (multimodal): an xArm pushes two blocks into two target zones, on pybullet.

The task of IBC's `BlockPushMultimodal` as Diffusion Policy evaluates it (github
google-research/ibc environments/block_pushing, real-stanford/diffusion_policy
diffusion_policy/env/block_pushing), rebuilt on pybullet in DIRECT mode with our own geometry:

- scene: the xArm 6 of `pybullet_data/xarm/xarm6_robot.urdf` (fixed base at the origin, IBC's
  initial joint angles); a cylindrical pusher (radius 1 cm, 5 cm long) held under the arm's last
  link by a fixed constraint; two 4 cm cubes (10 g, friction 1) on a floor plane; two flat
  target zones (visual only). Lengths in metres, the frame is the robot base's.
- control: an action sets the effector target xy (height fixed at 6 cm), solved by pybullet's
  IK into joint position targets; one step = 0.1 s = 24 physics substeps of 1/240 s (10 Hz).
  `abs_action=True` (default): the action is the target xy; False: a displacement of the
  previous target (DP's `abs_action=False`). Targets are clipped to the workspace
  x in [0.15, 0.7], y in [-0.5, 0.5].
- reset(seed=s): DP's layout for seed s (same `np.random.RandomState(s)` draws in the same
  order): blocks at x = 0.4 +- 0.1, y = -0.2 +- 0.15 (their x at least 0.1 apart), yaw drawn
  in [1, pi) (DP's `uniform(pi)` call); targets at y = 0.2, x = 0.4 -+ 0.12 (which side first is
  random) plus up to 5 mm / 7.5 mm of noise, yaw pi +- pi/30; the effector starts at
  (0.3, -0.4). `reset()` without a seed draws one from the env's gymnasium RNG.
- observation, float32 (16,), DP's order (its `FlattenObservation` of IBC's state dict):
      [0:2] block xy      [2] block yaw      [3:5] block2 xy    [5] block2 yaw
      [6:8] effector xy   [8:10] effector target xy (the last commanded target)
      [10:12] target xy   [12] target yaw    [13:15] target2 xy  [15] target2 yaw
  yaws are DP's: the z Euler angle modulo pi.
- reward: a block is *in* a target when its centre is within 5 cm of the target's (DP's
  `goal_dist_tolerance`). 0.49 on the step a block first enters a target, 0.51 on the step
  both blocks are in distinct targets (each in its nearest target), which also ends the
  episode (`terminated`). So the episode's total is 0, 0.49 or 1.0, and DP's p1 = total > 0.4,
  p2 = total > 0.9 (see envs.blockpush.metrics). DP instead pays 0.49 per (block, target) pair
  entered and sums the distinct values: the same outcome except that DP can count one block
  visiting both targets, or both blocks visiting the same one, as two events; here a second
  block in an occupied target earns nothing.
- info (flat, so vector envs can batch it): `total_reward` (episode sum so far),
  `reach_b` (first step block b moved more than 1 mm, else -1), `target_b_t` (first step block b
  was within tolerance of target t, else -1), `first_in_target_step`, `success_step` (-1 until
  the 0.49 / 0.51 events), `success` (bool).
- episodes are truncated at `max_episode_steps` (350, DP's max_steps) by the env itself.
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass

import gymnasium as gym
import numpy as np
import pybullet
import pybullet_data
from gymnasium import spaces
from pybullet_utils import bullet_client

CONTROL_HZ = 10
SIM_HZ = 240
SUBSTEPS = SIM_HZ // CONTROL_HZ
MAX_EPISODE_STEPS = 350
WORKSPACE_BOUNDS = np.array([[0.15, -0.5], [0.7, 0.5]])  # (min xy, max xy) of effector targets
EFFECTOR_HEIGHT = 0.06  # z of the arm's last link (the pusher hangs below it)
EFFECTOR_START = (0.3, -0.4)
GOAL_TOLERANCE = 0.05  # a block whose centre is this close to a target's is in it
FIRST_REWARD, BOTH_REWARD = 0.49, 0.51
BLOCK_SIZE = 0.04
BLOCK_MASS = 0.01
PUSHER_RADIUS, PUSHER_LENGTH = 0.01, 0.05
ZONE_SIZE = 0.1  # side of the square zone drawn at each target (visual only)
MIN_BLOCK_DIST, MIN_TARGET_DIST = 0.1, 0.12  # DP: x distances between the two blocks / targets
RESET_ATTEMPTS = 1000
MOVED_EPS = 1e-3  # a block moved once its distance from the origin changed by this (DP)
ARM_FORCE = 5 * 240.0  # joint motor force limit (IBC)
# IBC's initial joint angles (the arm holds the effector at about EFFECTOR_START)
INITIAL_JOINTS = (-0.9254632489674508, 0.6990770671568564, -1.106629064060494,
                  0.0006653351931553931, 0.3987969742311386, -4.063402065624296)
EFFECTOR_LINK = 6
EFFECTOR_DOWN = pybullet.getQuaternionFromEuler((0.0, math.pi, 0.0))  # tool pointing down

OBS_LAYOUT = {  # name -> slice of the 16-d observation
    "block_translation": slice(0, 2), "block_orientation": slice(2, 3),
    "block2_translation": slice(3, 5), "block2_orientation": slice(5, 6),
    "effector_translation": slice(6, 8), "effector_target_translation": slice(8, 10),
    "target_translation": slice(10, 12), "target_orientation": slice(12, 13),
    "target2_translation": slice(13, 15), "target2_orientation": slice(15, 16),
}
BLOCK_SLICES = ((slice(0, 2), 2), (slice(3, 5), 5))  # (xy, yaw index) of each block
TARGET_SLICES = ((slice(10, 12), 12), (slice(13, 15), 15))  # (xy, yaw index) of each target


@dataclass(frozen=True)
class Layout:
    """An episode's initial poses: blocks and targets as (x, y, yaw), float64 [2, 3] each."""

    blocks: np.ndarray
    targets: np.ndarray


def initial_layout(seed: int) -> Layout:
    """DP's reset draws for `seed`, in its order (`BlockPushMultimodal._reset_object_poses`)."""
    rs = np.random.RandomState(seed)
    center_x = 0.4

    def block_xy():
        return np.array([center_x + rs.uniform(-0.1, 0.1), -0.2 + rs.uniform(-0.15, 0.15)])

    for _ in range(RESET_ATTEMPTS):
        b0 = block_xy()
        yaw0 = rs.uniform(math.pi, 1.0)  # DP calls uniform(pi): low=pi, high=1 -> [1, pi)
        for _ in range(RESET_ATTEMPTS):  # DP compares the x coordinates only
            b1 = block_xy()
            if abs(b1[0] - b0[0]) > MIN_BLOCK_DIST:
                break
        yaw1 = rs.uniform(math.pi, 1.0)
        if abs(b1[0] - b0[0]) > MIN_BLOCK_DIST:
            break
    else:
        raise RuntimeError(f"seed {seed}: no block layout after {RESET_ATTEMPTS} attempts")

    def target_xy(offset: float) -> np.ndarray:
        return np.array([center_x + offset + rs.uniform(-0.005, 0.005),
                         0.2 + rs.uniform(-0.0075, 0.0075)])

    def target_yaw() -> float:
        return math.pi + rs.uniform(-math.pi / 30, math.pi / 30)

    for _ in range(RESET_ATTEMPTS):
        offset = 0.12 * rs.choice([-1, 1])
        t0 = np.array([*target_xy(offset), target_yaw()])
        for _ in range(RESET_ATTEMPTS):
            t1 = target_xy(-offset)
            if abs(t1[0] - t0[0]) > MIN_TARGET_DIST:
                break
        t1 = np.array([*t1, target_yaw()])
        if abs(t1[0] - t0[0]) > MIN_TARGET_DIST:
            break
    else:
        raise RuntimeError(f"seed {seed}: no target layout after {RESET_ATTEMPTS} attempts")
    return Layout(blocks=np.array([[*b0, yaw0], [*b1, yaw1]]), targets=np.stack([t0, t1]))


def dp_yaw(quaternion) -> float:
    """DP's yaw of an orientation: the last of scipy's 'xyz' Euler angles, modulo pi.
    pybullet's getEulerFromQuaternion uses the same convention."""
    return pybullet.getEulerFromQuaternion(quaternion)[2] % math.pi


def yaw_quaternion(yaw: float) -> tuple[float, float, float, float]:
    return pybullet.getQuaternionFromEuler((0.0, 0.0, float(yaw)))


@contextlib.contextmanager
def _silent_c_stdout() -> Iterator[None]:
    """Point file descriptor 1 at /dev/null for the block: pybullet's C code prints "argv[0]="
    on every connect, one line per episode in evaluation logs."""
    sys.stdout.flush()
    saved = os.dup(1)
    with open(os.devnull, "w") as null:
        os.dup2(null.fileno(), 1)
    try:
        yield
    finally:
        os.dup2(saved, 1)
        os.close(saved)


class BlockPushScene:
    """The pybullet world of one episode (its own DIRECT client), objects placed at `layout`.

    A fresh world per episode keeps rollouts bit-for-bit reproducible from the seed alone
    (pybullet's saveState/restoreState leaves solver caches behind that perturb the next
    episode by ~1e-4 m).
    """

    def __init__(self, layout: Layout) -> None:
        with _silent_c_stdout():
            self.client = c = bullet_client.BulletClient(connection_mode=pybullet.DIRECT)
        c.setPhysicsEngineParameter(fixedTimeStep=1.0 / SIM_HZ)
        c.setGravity(0, 0, -9.8)
        floor = c.createMultiBody(
            baseMass=0,
            baseCollisionShapeIndex=c.createCollisionShape(pybullet.GEOM_PLANE),
            baseVisualShapeIndex=c.createVisualShape(
                pybullet.GEOM_BOX, halfExtents=(0.45, 0.7, 0.0005), rgbaColor=(0.2, 0.2, 0.2, 1),
                visualFramePosition=(0.4, 0.0, -0.0005)))
        c.changeDynamics(floor, -1, lateralFriction=1.0)

        self.arm = c.loadURDF(f"{pybullet_data.getDataPath()}/xarm/xarm6_robot.urdf",
                              (0, 0, 0), useFixedBase=True)
        self.joints = [j for j in range(c.getNumJoints(self.arm))
                       if c.getJointInfo(self.arm, j)[2] == pybullet.JOINT_REVOLUTE]
        for j, q in zip(self.joints, INITIAL_JOINTS, strict=True):
            c.resetJointState(self.arm, j, q)
            c.changeDynamics(self.arm, j, linearDamping=0, angularDamping=0)

        link_pos, link_orn = c.getLinkState(self.arm, EFFECTOR_LINK)[:2]
        offset = (0.0, 0.0, PUSHER_LENGTH / 2)  # along the link's z axis, i.e. downwards
        pos, orn = c.multiplyTransforms(link_pos, link_orn, offset, (0, 0, 0, 1))
        self.pusher = c.createMultiBody(
            baseMass=0.1,
            baseCollisionShapeIndex=c.createCollisionShape(
                pybullet.GEOM_CYLINDER, radius=PUSHER_RADIUS, height=PUSHER_LENGTH),
            baseVisualShapeIndex=c.createVisualShape(
                pybullet.GEOM_CYLINDER, radius=PUSHER_RADIUS, length=PUSHER_LENGTH,
                rgbaColor=(0.18, 0.5, 0.77, 1)),
            basePosition=pos, baseOrientation=orn)
        c.changeDynamics(self.pusher, -1, lateralFriction=1.0)
        for link in range(-1, c.getNumJoints(self.arm)):
            c.setCollisionFilterPair(self.pusher, self.arm, -1, link, 0)
        constraint = c.createConstraint(
            self.arm, EFFECTOR_LINK, self.pusher, -1, pybullet.JOINT_FIXED, (0, 0, 0),
            parentFramePosition=offset, childFramePosition=(0, 0, 0))
        c.changeConstraint(constraint, maxForce=50)

        half = BLOCK_SIZE / 2
        self.blocks = []
        for color in ((1.0, 0.34, 0.35, 1), (0.34, 1.0, 0.35, 1)):
            block = c.createMultiBody(
                baseMass=BLOCK_MASS,
                baseCollisionShapeIndex=c.createCollisionShape(
                    pybullet.GEOM_BOX, halfExtents=(half, half, half)),
                baseVisualShapeIndex=c.createVisualShape(
                    pybullet.GEOM_BOX, halfExtents=(half, half, half), rgbaColor=color),
                basePosition=(0.4, 0.0, half))
            c.changeDynamics(block, -1, lateralFriction=1.0, rollingFriction=1e-4)
            self.blocks.append(block)
        self.zones = [
            c.createMultiBody(
                baseMass=0,
                baseVisualShapeIndex=c.createVisualShape(
                    pybullet.GEOM_BOX, halfExtents=(ZONE_SIZE / 2, ZONE_SIZE / 2, 0.0005),
                    rgbaColor=color),
                basePosition=(0.4, 0.2, 0.0005))
            for color in ((0.0, 0.8, 0.0, 1), (0.8, 0.0, 0.0, 1))]
        self.effector_target = np.array(EFFECTOR_START, dtype=np.float64)
        self._place(layout)

    def close(self) -> None:
        self.client.disconnect()

    def _place(self, layout: Layout) -> None:
        """Effector target at the start, objects at `layout`, then 100 substeps to settle (IBC)."""
        c = self.client
        self.set_effector_target(EFFECTOR_START)
        for block, (x, y, yaw) in zip(self.blocks, layout.blocks, strict=True):
            c.resetBasePositionAndOrientation(block, (x, y, BLOCK_SIZE / 2), yaw_quaternion(yaw))
            c.resetBaseVelocity(block, (0, 0, 0), (0, 0, 0))
        for zone, (x, y, yaw) in zip(self.zones, layout.targets, strict=True):
            c.resetBasePositionAndOrientation(zone, (x, y, 0.0005), yaw_quaternion(yaw))
        for _ in range(100):
            c.stepSimulation()

    def set_effector_target(self, xy) -> None:
        """IK joint targets for the effector at (x, y, EFFECTOR_HEIGHT), pointing down."""
        c = self.client
        self.effector_target = np.asarray(xy, dtype=np.float64).copy()
        position = (*self.effector_target, EFFECTOR_HEIGHT)
        current = [s[0] for s in c.getJointStates(self.arm, self.joints)]
        joints = c.calculateInverseKinematics(
            self.arm, EFFECTOR_LINK, position, EFFECTOR_DOWN,
            lowerLimits=[-17] * 6, upperLimits=[17] * 6, jointRanges=[17] * 6,
            restPoses=[0, 0] + current[2:], maxNumIterations=100, residualThreshold=1e-10)
        c.setJointMotorControlArray(self.arm, self.joints, pybullet.POSITION_CONTROL,
                                    targetPositions=joints, forces=[ARM_FORCE] * 6)

    def step(self) -> None:
        """Advance one control period (SUBSTEPS physics steps)."""
        for _ in range(SUBSTEPS):
            self.client.stepSimulation()

    def effector_xy(self) -> np.ndarray:
        """xy of the arm's last link (IBC's forward kinematics: the link's world position)."""
        return np.array(self.client.getLinkState(self.arm, EFFECTOR_LINK)[0][:2])

    def block_pose(self, i: int) -> np.ndarray:
        """(x, y, z, qx, qy, qz, qw) of block i, float64 (7,)."""
        pos, orn = self.client.getBasePositionAndOrientation(self.blocks[i])
        return np.array([*pos, *orn])

    def zone_pose(self, i: int) -> np.ndarray:
        """(x, y, z, qx, qy, qz, qw) of target zone i, float64 (7,)."""
        pos, orn = self.client.getBasePositionAndOrientation(self.zones[i])
        return np.array([*pos, *orn])

    def place_block(self, i: int, xy, yaw: float = 0.0) -> None:
        """Teleport block i (at rest) to (x, y) with `yaw`; for tests and tools."""
        self.client.resetBasePositionAndOrientation(
            self.blocks[i], (float(xy[0]), float(xy[1]), BLOCK_SIZE / 2), yaw_quaternion(yaw))
        self.client.resetBaseVelocity(self.blocks[i], (0, 0, 0), (0, 0, 0))

    def render(self, width: int, height: int) -> np.ndarray:
        """(height, width, 3) uint8 frame from a fixed camera in front of the workspace
        (TinyRenderer, no shadows)."""
        c = self.client
        view = c.computeViewMatrix(cameraEyePosition=(0.8, 0.0, 0.8),
                                   cameraTargetPosition=(0.4, 0.0, 0.0), cameraUpVector=(0, 0, 1))
        proj = c.computeProjectionMatrixFOV(fov=48, aspect=width / height, nearVal=0.05,
                                            farVal=3.0)
        _, _, rgba, _, _ = c.getCameraImage(width, height, view, proj, shadow=0,
                                            renderer=pybullet.ER_TINY_RENDERER)
        return np.asarray(rgba, dtype=np.uint8).reshape(height, width, 4)[..., :3].copy()


class RewardTracker:
    """IBC/DP multimodal reward events of one episode (see the module docstring)."""

    def __init__(self, tolerance: float = GOAL_TOLERANCE) -> None:
        self.tolerance = tolerance
        self.total = 0.0
        self.first_in_target_step = -1
        self.success_step = -1
        self.reach = [-1, -1]
        self.entered = -np.ones((2, 2), dtype=np.int64)  # [block, target] -> first step
        self._start: np.ndarray | None = None

    def update(self, step: int, obs: np.ndarray) -> float:
        """Reward of the transition that produced `obs` (16,); `step` counts from 1."""
        blocks = np.stack([obs[s] for s, _ in BLOCK_SLICES]).astype(np.float64)
        targets = np.stack([obs[s] for s, _ in TARGET_SLICES]).astype(np.float64)
        radius = np.linalg.norm(blocks, axis=1)  # DP's "moved" test: distance from the origin
        if self._start is None:
            self._start = radius
        for b in range(2):
            if self.reach[b] < 0 and abs(radius[b] - self._start[b]) > MOVED_EPS:
                self.reach[b] = step
        dist = np.linalg.norm(blocks[:, None] - targets[None], axis=-1)  # [block, target]
        inside = dist < self.tolerance
        self.entered[(self.entered < 0) & inside] = step
        reward = 0.0
        if self.first_in_target_step < 0 and inside.any():
            self.first_in_target_step = step
            reward += FIRST_REWARD
        nearest = dist.argmin(axis=1)
        both = inside[[0, 1], nearest].all() and nearest[0] != nearest[1]
        if self.success_step < 0 and both:
            self.success_step = step
            reward += BOTH_REWARD
        self.total += reward
        return reward

    @property
    def success(self) -> bool:
        return self.success_step >= 0

    def info(self) -> dict:
        info = {"total_reward": self.total, "first_in_target_step": self.first_in_target_step,
                "success_step": self.success_step, "success": self.success}
        info.update({f"reach_{b}": self.reach[b] for b in range(2)})
        info.update({f"target_{b}_{t}": int(self.entered[b, t]) for b in range(2)
                     for t in range(2)})
        return info


class BlockPushMultimodalEnv(gym.Env):
    """IBC/DP's multimodal BlockPush as a gymnasium env; see the module docstring."""

    metadata = {"render_modes": ["rgb_array"], "render_fps": CONTROL_HZ}

    def __init__(self, abs_action: bool = True, max_episode_steps: int = MAX_EPISODE_STEPS,
                 render_size: tuple[int, int] | list[int] = (160, 120),
                 goal_tolerance: float = GOAL_TOLERANCE, render_mode: str = "rgb_array") -> None:
        if len(render_size) != 2:
            raise ValueError(f"render_size: expected (width, height), got {render_size!r}")
        self.abs_action = abs_action
        self.max_episode_steps = max_episode_steps
        self.render_size = (int(render_size[0]), int(render_size[1]))
        self.goal_tolerance = goal_tolerance
        self.render_mode = render_mode
        if abs_action:
            self.action_space = spaces.Box(WORKSPACE_BOUNDS[0].astype(np.float32),
                                           WORKSPACE_BOUNDS[1].astype(np.float32), dtype=np.float32)
        else:
            self.action_space = spaces.Box(-0.1, 0.1, shape=(2,), dtype=np.float32)
        self.observation_space = spaces.Box(-5.0, 5.0, shape=(16,), dtype=np.float32)
        self.scene: BlockPushScene | None = None
        self.layout: Layout | None = None
        self.rewards = RewardTracker(goal_tolerance)
        self.elapsed_steps = 0

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        layout_seed = seed if seed is not None else int(self.np_random.integers(2**31))
        self.layout = initial_layout(layout_seed)
        self.close()
        self.scene = BlockPushScene(self.layout)
        self.elapsed_steps = 0
        self.rewards = RewardTracker(self.goal_tolerance)
        obs = self._get_obs()
        self.rewards.update(0, obs)  # records the start; a block cannot start in a target
        return obs, self.rewards.info()

    def step(self, action):
        if self.scene is None:
            raise RuntimeError("call reset() before step()")
        action = np.asarray(action, dtype=np.float64)
        if action.shape != (2,):
            raise ValueError(f"action: expected shape (2,), got {action.shape}")
        target = action if self.abs_action else self.scene.effector_target + action
        self.scene.set_effector_target(np.clip(target, WORKSPACE_BOUNDS[0], WORKSPACE_BOUNDS[1]))
        self.scene.step()
        self.elapsed_steps += 1
        obs = self._get_obs()
        reward = self.rewards.update(self.elapsed_steps, obs)
        terminated = self.rewards.success
        truncated = self.elapsed_steps >= self.max_episode_steps
        return obs, reward, terminated, truncated, self.rewards.info()

    def _get_obs(self) -> np.ndarray:
        s = self.scene
        parts = []
        for i in range(2):
            pose = s.block_pose(i)
            parts += [pose[:2], [dp_yaw(pose[3:])]]
        parts += [s.effector_xy(), s.effector_target]
        for i in range(2):
            pose = s.zone_pose(i)
            parts += [pose[:2], [dp_yaw(pose[3:])]]
        return np.concatenate(parts).astype(np.float32)

    def render(self) -> np.ndarray:
        """(height, width, 3) uint8 frame of the scene (render_size = (width, height))."""
        if self.scene is None:
            raise RuntimeError("call reset() before render()")
        return self.scene.render(*self.render_size)

    def close(self) -> None:
        if self.scene is not None:
            self.scene.close()
            self.scene = None
