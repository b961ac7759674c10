"""Scripted experts for the robomimic tasks, driven by privileged simulator state.

Each expert is a list of end-effector waypoints (position, orientation, gripper) that may track
the object; a proportional controller turns the gap to the current waypoint into robosuite's
7-d delta OSC action (position / 5 cm, rotation vector / 0.5 rad, clipped to [-1, 1]). Per-seed
randomness (approach height, grasp depth, speed, gripper wait, small offsets) keeps the demos
from being identical. An episode ends at the first successful step (robomimic's convention:
`dones` is 1 there) or after the task's rollout length.

Collectors (`collect_lift`, `collect_can`, `collect_tool_hang`; signature (seed, image=False,
abs=False)) return one episode for `drifting-policy demos`, in robomimic's layout:
    obs: {key: [T, ...]} robomimic names, the observation BEFORE each action (images uint8
         [T, H, W, 3], upright); actions [T, 7] delta or, with abs=True, [T, 10] absolute world
         targets (position, rotation-6d, gripper) = the OSC goal each delta action set, so they
         replay the same trajectory through the absolute-action env; rewards [T] (success
         after the action); dones [T]; states [T, S] (MuJoCo state before each action);
    model_file (MJCF), env_args (robomimic env_meta of the env that replays the actions),
    success, metrics {"success"}.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from scipy.spatial.transform import Rotation

from envs.robomimic import env_args as ea
from envs.robomimic.env import RobomimicEnv
from envs.robomimic.rotation import abs_action_7_to_10

POS_SCALE, ROT_SCALE = 0.05, 0.5  # OSC output limits: metres / radians per unit action
POS_GAIN = 2.0  # > 1 makes up for the OSC's sag under gravity and payload
OPEN, CLOSED = -1.0, 1.0
RECORD_KEYS = ("object", "robot0_eef_pos", "robot0_eef_quat", "robot0_gripper_qpos",
               "robot0_gripper_qvel", "robot0_joint_pos", "robot0_joint_pos_cos",
               "robot0_joint_pos_sin", "robot0_joint_vel")
# Gripper pointing down, fingers closing along world x (the Panda's pose at reset, untilted).
GRIPPER_DOWN = np.array([[0.0, 1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, -1.0]])

Target = Callable[[], np.ndarray] | np.ndarray


@dataclass
class Waypoint:
    """Go to `pos` (world, or a function of the sim evaluated every step) with orientation
    `rot` [3, 3] and gripper command `gripper`; done after at least `min_steps` steps once
    within `tol` metres (and 0.05 rad), or after `max_steps`."""

    pos: Target
    rot: Target
    gripper: float
    tol: float = 0.01
    min_steps: int = 0
    max_steps: int = 80


def down(yaw: float) -> np.ndarray:
    """[3, 3] gripper-down orientation turned by `yaw` about world z."""
    return Rotation.from_euler("z", yaw).as_matrix() @ GRIPPER_DOWN


def yaw_of(quat_xyzw: np.ndarray, symmetry: float) -> float:
    """Yaw of a body about world z, folded into [-symmetry/2, symmetry/2)."""
    m = Rotation.from_quat(quat_xyzw).as_matrix()
    yaw = np.arctan2(m[1, 0], m[0, 0])
    return float((yaw + symmetry / 2) % symmetry - symmetry / 2)


class EpisodeRecorder:
    """Runs delta actions in `env` and records a robomimic episode (see module docstring)."""

    def __init__(self, env: RobomimicEnv, seed: int, abs_actions: bool) -> None:
        self.env, self.abs_actions = env, abs_actions
        env.reset(seed=seed)
        self.site_id = env.sim_env.robots[0].eef_site_id["right"]
        self.keys = [k for k in RECORD_KEYS if k in env.raw_obs] + list(env.image_keys)
        self.obs: dict[str, list] = {k: [] for k in self.keys}
        self.actions, self.abs, self.rewards, self.states = [], [], [], []
        self.success = False

    @property
    def steps(self) -> int:
        return len(self.actions)

    def eef(self) -> tuple[np.ndarray, np.ndarray]:
        """Grip-site position [3] and orientation [3, 3] (what the OSC controller tracks)."""
        data = self.env.sim_env.sim.data
        return data.site_xpos[self.site_id].copy(), data.site_xmat[self.site_id].reshape(3, 3)

    def act(self, pos: np.ndarray, rot: np.ndarray, gripper: float, speed: float) -> None:
        """One delta action towards pose (pos, rot); `speed` caps the largest axis (<= 1)."""
        cur_pos, cur_rot = self.eef()
        dpos = POS_GAIN * (pos - cur_pos) / POS_SCALE
        dpos *= min(1.0, speed / max(np.abs(dpos).max(), 1e-9))
        drot = np.clip(Rotation.from_matrix(rot @ cur_rot.T).as_rotvec() / ROT_SCALE, -1, 1)
        self.step(np.concatenate([dpos, drot, [gripper]]))

    def step(self, action: np.ndarray) -> None:
        for k in self.keys:
            self.obs[k].append(self.env.raw_obs[k])
        self.states.append(self.env.get_state())
        # the world-frame OSC target this action sets, as robosuite's absolute input
        self.abs.append(self.env.absolute_action(action))
        _, reward, _, _, info = self.env.step(action)
        self.actions.append(action)
        self.rewards.append(reward)
        self.success = bool(info["success"])

    def follow(self, waypoints: list[Waypoint], speed: float, max_steps: int) -> bool:
        """Track the waypoints in order; stop at success or `max_steps`. Returns success."""
        for wp in waypoints:
            for i in range(wp.max_steps):
                if self.success or self.steps >= max_steps:
                    return self.success
                target = wp.pos() if callable(wp.pos) else wp.pos
                rot = wp.rot() if callable(wp.rot) else wp.rot
                cur_pos, cur_rot = self.eef()
                ang = np.linalg.norm(Rotation.from_matrix(rot @ cur_rot.T).as_rotvec())
                if i >= wp.min_steps and np.linalg.norm(target - cur_pos) < wp.tol and ang < 0.05:
                    break
                self.act(target, rot, wp.gripper, speed)
        return self.success

    def episode(self, env_args: dict) -> dict:
        """The recorded episode (robomimic layout; see the module docstring)."""
        actions = (abs_action_7_to_10(np.stack(self.abs)) if self.abs_actions
                   else np.stack(self.actions))
        dones = np.zeros(self.steps, dtype=np.int64)
        if self.success:
            dones[-1] = 1
        return {
            "obs": {k: np.stack(v) for k, v in self.obs.items()},
            "actions": actions, "rewards": np.asarray(self.rewards, dtype=np.float64),
            "dones": dones, "states": np.stack(self.states), "model_file": self.env.model_xml(),
            "env_args": env_args, "success": self.success,
            "metrics": {"success": float(self.success)},
        }


def _collect(task: str, plan: Callable[[EpisodeRecorder, np.random.Generator], None],
             seed: int, image: bool, abs: bool) -> dict:  # noqa: A002 - the CLI flag's name
    """Run `plan` in a fresh delta-action env for `seed`; the stored env_args describe the env
    that replays the recorded actions (absolute ones with abs=True)."""
    env = RobomimicEnv(task, image=image, abs_actions=False)
    try:
        rec = EpisodeRecorder(env, seed, abs_actions=abs)
        plan(rec, np.random.default_rng([seed, 2024]))
        return rec.episode(ea.make_env_args(task, image=image, abs_actions=abs))
    finally:
        env.close()


def _body(rec: EpisodeRecorder, body_id: int) -> tuple[np.ndarray, np.ndarray]:
    """World position [3] and quaternion (x, y, z, w) of a body."""
    data = rec.env.sim_env.sim.data
    return data.body_xpos[body_id].copy(), data.body_xquat[body_id][[1, 2, 3, 0]].copy()


def _grasp_from_above(obj, rot, offset: np.ndarray, hover: float, grasp: dict,
                      rng: np.random.Generator) -> list[Waypoint]:
    """Hover `hover` m above the object (obj() -> position [3]), descend to obj() + offset,
    close; the grasp position is stored in grasp["at"] when the gripper starts closing."""
    return [
        Waypoint(lambda: obj() + [0, 0, hover], rot, OPEN, tol=0.015),
        Waypoint(lambda: obj() + offset, rot, OPEN, tol=0.01, max_steps=30),
        Waypoint(lambda: grasp.setdefault("at", obj() + offset), rot, CLOSED, tol=np.inf,
                 min_steps=int(rng.integers(6, 12))),
    ]


def _lift_plan(rec: EpisodeRecorder, rng: np.random.Generator) -> None:
    """Above the cube, down, close, lift (success: cube 4 cm above the table)."""
    env = rec.env.sim_env
    cube = lambda: _body(rec, env.cube_body_id)[0]  # noqa: E731
    rot = down(yaw_of(_body(rec, env.cube_body_id)[1], np.pi / 2) + rng.uniform(-0.15, 0.15))
    offset = np.array([*rng.uniform(-0.004, 0.004, 2), rng.uniform(-0.012, 0.0)])
    hover = rng.uniform(0.05, 0.11)
    grasp = {}
    waypoints = [
        *_grasp_from_above(cube, rot, offset, hover, grasp, rng),
        Waypoint(lambda: grasp["at"] + [0, 0, 0.25], rot, CLOSED, max_steps=150),
    ]
    rec.follow(waypoints, speed=rng.uniform(0.7, 1.0), max_steps=ea.TASKS["lift"].max_steps)


def _can_plan(rec: EpisodeRecorder, rng: np.random.Generator) -> None:
    """Above the can, down, close, lift, over the can's bin, lower, release, retreat."""
    env = rec.env.sim_env
    can_id = env.obj_body_id[env.obj_to_use]
    can = lambda: _body(rec, can_id)[0]  # noqa: E731
    # the can's bin quadrant is its x > bin2_x, y > bin2_y corner: drop near that corner, the
    # part of it closest to the robot (the quadrant's centre is at the arm's reach)
    goal = env.bin2_pos[:2] + [0.045, 0.05] + rng.uniform(-0.012, 0.012, 2)
    rot = down(rng.uniform(-0.3, 0.3))
    hover, carry_z = rng.uniform(0.07, 0.12), rng.uniform(1.0, 1.06)
    offset = np.array([*rng.uniform(-0.004, 0.004, 2), rng.uniform(-0.005, 0.015)])
    drop_z = env.bin2_pos[2] + rng.uniform(0.13, 0.16)
    grasp = {}
    waypoints = [
        *_grasp_from_above(can, rot, offset, hover, grasp, rng),
        Waypoint(lambda: np.array([*grasp["at"][:2], carry_z]), rot, CLOSED, tol=0.03),
        Waypoint(np.array([*goal, carry_z]), rot, CLOSED, tol=0.02, max_steps=120),
        Waypoint(np.array([*goal, drop_z]), rot, CLOSED, tol=0.015),
        Waypoint(np.array([*goal, drop_z]), rot, OPEN, tol=np.inf,
                 min_steps=int(rng.integers(4, 8))),
        Waypoint(np.array([*goal, drop_z + 0.12]), rot, OPEN),
    ]
    rec.follow(waypoints, speed=rng.uniform(0.7, 1.0), max_steps=ea.TASKS["can"].max_steps)


def _carry(rec: EpisodeRecorder, body_id: int, point: Callable[[], np.ndarray],
           rot: np.ndarray, target: Target) -> tuple[Callable, Callable]:
    """Waypoint (pos, rot) functions that put a grasped object's `point` (world, [3]) at
    `target` (or target()) with the object's body orientation `rot` [3, 3], re-measuring the
    grasp (object pose in the gripper frame) every step, so slip in the fingers is corrected."""
    data = rec.env.sim_env.sim.data

    def pose() -> tuple[np.ndarray, np.ndarray]:
        eef_pos, eef_rot = rec.eef()
        obj_rot = data.body_xmat[body_id].reshape(3, 3)
        eef_target = rot @ (eef_rot.T @ obj_rot).T
        goal = target() if callable(target) else target
        return goal - eef_target @ (eef_rot.T @ (point() - eef_pos)), eef_target

    return (lambda: pose()[0]), (lambda: pose()[1])


class _ToolHangScene:
    """Named poses of the ToolHang objects (world frame), read live from the simulator."""

    def __init__(self, rec: EpisodeRecorder) -> None:
        self.env = rec.env.sim_env
        self.model, self.data = self.env.sim.model, self.env.sim.data
        self.frame_id = self.model.body_name2id("frame_root")
        self.tool_id = self.model.body_name2id("tool_root")

    def site(self, name: str) -> np.ndarray:
        return self.data.site_xpos[self.env.obj_site_id[name]].copy()

    def geom(self, name: str) -> np.ndarray:
        return self.data.geom_xpos[self.model.geom_name2id(name)].copy()

    def rot(self, body_id: int) -> np.ndarray:
        return self.data.body_xmat[body_id].reshape(3, 3).copy()


def _tool_hang_plan(rec: EpisodeRecorder, rng: np.random.Generator) -> None:
    """Put the frame into the stand, then hang the tool on the frame's hook arm."""
    scene, speed = _ToolHangScene(rec), rng.uniform(0.8, 1.0)
    _insert_frame(rec, scene, rng, speed)
    _hang_tool(rec, scene, rng, speed)


def _insert_frame(rec: EpisodeRecorder, scene: _ToolHangScene, rng: np.random.Generator,
                  speed: float) -> None:
    """Grasp the frame's grip from above, turn it upright (rod vertical, hook arm pointing away
    from the robot, rod faces parallel to the stand's square cavity: turned 45 degrees it
    jams), lower its tip into the cavity, let go, back off and up."""
    site, geom, frame_id = scene.site, scene.geom, scene.frame_id
    max_steps = ea.TASKS["tool_hang"].max_steps
    # grasp across the rod (fingers close along gripper x), the yaw nearest the start
    rod = site("frame_intersection_site") - site("frame_mount_site")
    rod_yaw = np.arctan2(rod[1], rod[0])
    grasp_rot = down(min((rod_yaw + k * np.pi for k in (-1, 0, 1)), key=abs))
    upright = (Rotation.from_euler("z", -np.pi / 2 - rod_yaw)  # rod along -y, then up about x
               .as_matrix())
    upright = Rotation.from_rotvec([-np.pi / 2, 0, 0]).as_matrix() @ upright
    frame_rot = upright @ scene.rot(frame_id)
    walls = np.mean([geom(f"stand_wall{i}") for i in range(4)], axis=0)
    cavity = np.array([*walls[:2], site("stand_mount_site")[2]])  # its top centre
    tip = lambda: site("frame_tip_site")  # noqa: E731
    grip = lambda: geom("frame_grip_frame")  # noqa: E731
    hover = rng.uniform(0.06, 0.1)
    stages = [
        Waypoint(lambda: grip() + [0, 0, hover], grasp_rot, OPEN, tol=0.015),
        Waypoint(grip, grasp_rot, OPEN, tol=0.008, max_steps=40),
        Waypoint(lambda: rec.eef()[0], grasp_rot, CLOSED, tol=np.inf,
                 min_steps=int(rng.integers(8, 12))),
        Waypoint(lambda: np.array([*grip()[:2], 1.1]), grasp_rot, CLOSED, tol=0.03),
    ]
    for offset, tol, steps in ((0.06, 0.01, 150), (0.01, 0.001, 60), (-0.14, 0.01, 80)):
        pos, rot = _carry(rec, frame_id, tip, frame_rot, cavity + [0, 0, offset])
        stages.append(Waypoint(pos, rot, CLOSED, tol=tol, max_steps=steps))
    stages.append(Waypoint(lambda: rec.eef()[0], lambda: rec.eef()[1], OPEN, tol=np.inf,
                           min_steps=8))
    rec.follow(stages, speed, max_steps)
    if rec.steps < max_steps:
        eef_pos, eef_rot = rec.eef()  # back off along the gripper axis, then up
        rec.follow([Waypoint(eef_pos - 0.08 * eef_rot[:, 2], eef_rot, OPEN, max_steps=30),
                    Waypoint(lambda: np.array([*rec.eef()[0][:2], 1.25]), lambda: rec.eef()[1],
                             OPEN, tol=0.02, max_steps=30)], speed, max_steps)


def _hang_tool(rec: EpisodeRecorder, scene: _ToolHangScene, rng: np.random.Generator,
               speed: float) -> None:
    """Grasp the tool across its grip, turn its large hole's axis along the frame's hook arm,
    put the hole on over the arm's end hook (tilted, see below), let go, back off."""
    site, geom, tool_id = scene.site, scene.geom, scene.tool_id
    max_steps = ea.TASKS["tool_hang"].max_steps
    tool_grip = lambda: geom("tool_grip_g0")  # noqa: E731
    hole = lambda: site("tool_hole1_center")  # noqa: E731
    handle = hole() - tool_grip()  # the tool lies flat: handle horizontal, hole axis +z
    handle_yaw = np.arctan2(handle[1], handle[0])
    tool_rot0 = scene.rot(tool_id)
    tool_grasp = down(min((handle_yaw + k * np.pi for k in (-2, -1, 0, 1)), key=abs))
    rec.follow([
        Waypoint(lambda: np.array([*tool_grip()[:2], 1.25]), tool_grasp, OPEN, tol=0.02),
        Waypoint(lambda: tool_grip() + [0, 0, 0.08], tool_grasp, OPEN, tol=0.015),
        Waypoint(tool_grip, tool_grasp, OPEN, tol=0.008, max_steps=40),
        Waypoint(lambda: rec.eef()[0], tool_grasp, CLOSED, tol=np.inf, min_steps=10),
        Waypoint(lambda: np.array([*tool_grip()[:2], 1.15]), tool_grasp, CLOSED, tol=0.03),
    ], speed, max_steps)
    # the hook arm, measured after the grasp (the frame may have been nudged)
    hang = site("frame_hang_site")
    arm_dir = (hang - site("frame_intersection_site")) * [1, 1, 0]
    arm_dir /= np.linalg.norm(arm_dir)
    # hole axis along the arm (gripper pointing along it), handle hanging 35 degrees off vertical
    # (wrist clear of its joint limits)
    handle_dir = Rotation.from_rotvec(np.radians(-35) * arm_dir).apply([0, 0, -1])
    align, _ = Rotation.align_vectors([handle_dir, -arm_dir],
                                      [handle / np.linalg.norm(handle), [0, 0, 1.0]])
    tool_rot = align.as_matrix() @ tool_rot0
    tilt_axis = np.cross([0, 0, 1.0], arm_dir)

    def hole_at(along: float, up: float, tilt: float, tol: float = 0.0015,
                max_steps: int = 80) -> Waypoint:
        """Hole centre `along` the arm from its free end and `up` from its axis, the hole's
        top tilted `tilt` degrees towards the frame."""
        rot = Rotation.from_rotvec(-np.radians(tilt) * tilt_axis).as_matrix() @ tool_rot

        def target() -> np.ndarray:  # follows the frame if the tool or hand nudges it
            end, arm_z = site("frame_hang_site"), geom("frame_horizontal_frame")[2]
            return np.array([*(end[:2] + along * arm_dir[:2]), arm_z + up])

        return Waypoint(*_carry(rec, tool_id, hole, rot, target), CLOSED, tol=tol,
                        max_steps=max_steps)

    # The hole (inner apothem 9.7 mm) clears arm + end hook (19.3 mm) by 0.05 mm a side when
    # coaxial, so it goes on tilted: its top bar over the hook while the bottom bar is still
    # beyond the arm's end, the top bar lowered to just above the arm behind the hook, then
    # the tilt halved about the top bar (the bottom bar swings under the arm's end), and the
    # tool is let go to hang there (bar centres ring_r from the hole centre).
    tilt, ring_r = rng.uniform(55, 65), 0.0129
    top_x = -0.003 - ring_r * np.sin(np.radians(tilt))
    slide = [
        hole_at(0.06, 0.016, 0.0, tol=0.01, max_steps=150),
        hole_at(0.03, 0.016, tilt), hole_at(-0.003, 0.016, tilt),
        # the top bar down to just above the arm, then the tilt halved in 5-degree-ish steps
        # with the top bar held (the controller alone would not keep it on that pivot)
        *(hole_at(top_x + ring_r * np.sin(b), 0.009 - ring_r * np.cos(b), np.degrees(b))
          for b in np.linspace(np.radians(tilt), np.radians(tilt / 2), 7)),
        # around the arm now: in along it, away from the hook, before letting go
        hole_at(top_x + ring_r * np.sin(np.radians(tilt / 2)) - rng.uniform(0.02, 0.03),
                0.009 - ring_r * np.cos(np.radians(tilt / 2)), tilt / 2),
        Waypoint(lambda: rec.eef()[0], lambda: rec.eef()[1], OPEN, tol=np.inf, min_steps=10),
    ]
    rec.follow(slide, 0.3, max_steps)
    if rec.steps < max_steps and not rec.success:  # back off, wait for the tool to settle
        eef_pos, eef_rot = rec.eef()
        away = eef_pos - 0.1 * eef_rot[:, 2]
        rec.follow([Waypoint(away, eef_rot, OPEN, max_steps=40),
                    Waypoint(away, eef_rot, OPEN, tol=np.inf, min_steps=40)], 0.5, max_steps)


def collect_lift(seed: int, image: bool = False, abs: bool = False) -> dict:  # noqa: A002
    """One Lift demo (see the module docstring)."""
    return _collect("lift", _lift_plan, seed, image, abs)


def collect_can(seed: int, image: bool = False, abs: bool = False) -> dict:  # noqa: A002
    """One PickPlaceCan demo (see the module docstring)."""
    return _collect("can", _can_plan, seed, image, abs)


def collect_tool_hang(seed: int, image: bool = False, abs: bool = False) -> dict:  # noqa: A002
    """One ToolHang attempt (see `_tool_hang_plan`); metrics add `frame_assembled`."""
    frame_assembled = {}

    def plan(rec: EpisodeRecorder, rng: np.random.Generator) -> None:
        _tool_hang_plan(rec, rng)
        frame_assembled["value"] = float(rec.env.sim_env._check_frame_assembled())

    episode = _collect("tool_hang", plan, seed, image, abs)
    episode["metrics"]["frame_assembled"] = frame_assembled["value"]
    return episode
