"""Scripted Franka Kitchen expert (privileged: reads the MuJoCo state) and the demo recorder.

Each episode draws an ordered choice of `N_SUBTASKS` (4) of all seven sub-tasks with a seeded
RNG, at most MAX_DOORS (1) of them a door (microwave, hinge cabinet: ~130 of the episode's 280
steps each): 600 possible orders, so the demos are multimodal like D4RL's. Each sub-task is a
short list of end-effector waypoints computed from the objects' current poses: in front of the
knob / lever / handle / kettle, engage (grasp the knob, touch the lever, straddle the slide
handle, touch the kettle's back, hook a door handle), move (turn, push, slide, swing the door
along its arc), let go, back off. The door handles are bars 4-4.4 cm thick standing 3.8 cm
(microwave) and 6.1 cm (hinge cabinet) off the door: the closed fingers, their closing axis
vertical, slide into that gap from the side, so the pull is a form closure (grasping the bar
instead holds only by the fingers' ~11 N of squeeze and slipped within 0.5 rad).

Control. A sub-task starts with a straight joint-space move to the IK solution (from the
well-conditioned READY_Q) of its first waypoint, so no sub-task inherits a posture near the
joint limits from the previous one. Then, every step, a commanded pose moves towards the current
waypoint at the waypoint's speed and damped least-squares IK (`mujoco.mj_jacSite` on a scratch
copy of the model, joint limits enforced) turns it into commanded joint positions q_cmd. The
action is the joint velocity that FrankaKitchen-v1 integrates into exactly that servo target:
target = q_obs + 2 rad/s * action * dt, with q_obs the observed (noisy) joint positions and
q_cmd offset by gravity / kp so the position servos do not sag; the fingers get +1 (open) or -1
(close). The recorded actions are what the env executes, all in [-1, 1].
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import mujoco
import numpy as np

from envs.kitchen.env import ALL_TASKS, KitchenEnv

N_SUBTASKS = 4
ACTION_SCALE = 2.0  # rad/s (arm) or m/s (fingers) per unit action
OPEN, CLOSE = 1.0, -1.0
DAMPING = 1e-4  # damped least squares lambda^2 of the IK
IK_ITERS = 20
LIMIT_MARGIN = 0.02  # rad kept from the joint limits
MAX_ROT_SPEED = 1.0  # rad/s of the commanded orientation
ROT_TOL = 0.1  # rad
# Start posture of every sub-task and null-space posture of the IK: site at (-0.15, 0.40, 2.40)
# pointing at the counter, clear of all handles, away from the joint limits. (FrankaKitchen-v1's
# start posture has joint 2 at its limit, from which the IK cannot reach the low kettle.)
READY_Q = np.array([-0.38, -1.03, 0.6, -2.8, -0.12, 1.88, 0.62])
POSTURE_GAIN = 0.05  # per IK iteration
JOINT_STEP = 0.15  # rad per control step of joint-space moves
APPROACH_IK_ITERS = 300  # IK iterations for a sub-task's first waypoint (from READY_Q)
MAX_LAG = 0.03  # m the commanded position may run ahead of the site


@dataclass
class Waypoint:
    """A target pose of the end-effector site: position (3,) and rotation (3, 3), world frame.

    grip: finger command on the way (OPEN / CLOSE); speed: m/s cap; tol: m to count as reached;
    hold: extra steps to stay once reached (fingers closing); max_steps: give up after this;
    posture: (7,) joint positions, on a sub-task's first waypoint: the IK's start and
    null-space posture for the whole sub-task (default READY_Q); until_done: skipped once the
    env counts the sub-task as completed (the rest of a door's swing); relative: `pos` is an
    offset in the end-effector frame from where it is when the waypoint starts (`rot` unused:
    the orientation is kept).
    """

    pos: np.ndarray
    rot: np.ndarray
    grip: float = OPEN
    speed: float = 0.5
    tol: float = 0.01
    hold: int = 0
    max_steps: int = 40
    posture: np.ndarray | None = None
    until_done: bool = False
    relative: bool = False


def rot_about(axis: str, angle: float) -> np.ndarray:
    """(3, 3) rotation by `angle` rad about world axis 'x', 'y' or 'z'."""
    c, s = np.cos(angle), np.sin(angle)
    i, j = {"x": (1, 2), "y": (2, 0), "z": (0, 1)}[axis]
    r = np.eye(3)
    r[i, i], r[i, j], r[j, i], r[j, j] = c, -s, s, c
    return r


def rotation_error(target: np.ndarray, current: np.ndarray) -> np.ndarray:
    """Rotation vector (3,) taking `current` to `target` (both (3, 3), world frame)."""
    quat = np.empty(4)
    mujoco.mju_mat2Quat(quat, (target @ current.T).ravel())
    vel = np.empty(3)
    mujoco.mju_quat2Vel(vel, quat, 1.0)
    return vel


class Controller:
    """Joint-velocity actions that move the end-effector site to waypoints (module docstring).

    State: the commanded pose (pos_cmd (3,), rot_cmd (3, 3)) and joint positions q_cmd (7,),
    each IK warm-started from the previous q_cmd.
    """

    def __init__(self, env: KitchenEnv) -> None:
        self.env = env
        self.model, self.data = env.model, env.data
        self.scratch = mujoco.MjData(self.model)
        self.site = self.model.site("end_effector").id
        self.kp = self.model.actuator_gainprm[:7, 0].copy()  # arm position-servo gains
        self.low = self.model.jnt_range[:7, 0] + LIMIT_MARGIN
        self.high = self.model.jnt_range[:7, 1] - LIMIT_MARGIN
        self.jacp, self.jacr = np.zeros((3, self.model.nv)), np.zeros((3, self.model.nv))
        self.q_cmd = np.clip(self.data.qpos[:7], self.low, self.high)
        self.posture = READY_Q
        self.pos_cmd, self.rot_cmd = self.pose()

    def pose(self) -> tuple[np.ndarray, np.ndarray]:
        """End-effector site position (3,) and rotation (3, 3) in the live simulator."""
        return (self.data.site_xpos[self.site].copy(),
                self.data.site_xmat[self.site].reshape(3, 3).copy())

    def start(self) -> None:
        """Begin a new waypoint from where the site actually is (a blocked push leaves the
        commanded pose ahead of the arm)."""
        self.pos_cmd = self.pose()[0]

    def _advance(self, wp: Waypoint) -> None:
        """Move the commanded pose towards `wp` by at most one step of its speed."""
        dt = self.env.dt
        if np.linalg.norm(self.pos_cmd - self.pose()[0]) > MAX_LAG:
            return  # let the arm catch up: keeps the executed path close to the straight line
        delta = wp.pos - self.pos_cmd
        dist = np.linalg.norm(delta)
        self.pos_cmd = self.pos_cmd + delta * min(1.0, wp.speed * dt / max(dist, 1e-9))
        rotvec = rotation_error(wp.rot, self.rot_cmd)
        angle = np.linalg.norm(rotvec)
        frac = min(1.0, MAX_ROT_SPEED * dt / max(angle, 1e-9))
        step = np.empty(9)
        quat = np.empty(4)
        mujoco.mju_axisAngle2Quat(quat, rotvec / max(angle, 1e-9), angle * frac)
        mujoco.mju_quat2Mat(step, quat)
        self.rot_cmd = step.reshape(3, 3) @ self.rot_cmd

    def ik(self, pos: np.ndarray, rot: np.ndarray, q: np.ndarray,
           iters: int = IK_ITERS) -> np.ndarray:
        """(7,) arm joint positions putting the site at (pos, rot), by damped least squares
        from `q` on a scratch copy of the model (joint limits enforced; the redundancy pulled
        towards `self.posture`)."""
        m, d = self.model, self.scratch
        d.qpos[:] = self.data.qpos
        d.qpos[:7] = q
        for _ in range(iters):
            mujoco.mj_kinematics(m, d)
            mujoco.mj_comPos(m, d)
            err = np.concatenate([
                pos - d.site_xpos[self.site],
                rotation_error(rot, d.site_xmat[self.site].reshape(3, 3))])
            if np.linalg.norm(err) < 1e-4:
                break
            mujoco.mj_jacSite(m, d, self.jacp, self.jacr, self.site)
            jac = np.vstack([self.jacp[:, :7], self.jacr[:, :7]])
            pinv = jac.T @ np.linalg.inv(jac @ jac.T + DAMPING * np.eye(6))
            null = POSTURE_GAIN * (self.posture - d.qpos[:7])
            dq = pinv @ err + (np.eye(7) - pinv @ jac) @ null
            d.qpos[:7] = np.clip(d.qpos[:7] + dq, self.low, self.high)
        return d.qpos[:7].copy()

    def joint_action(self, goal: np.ndarray, obs: np.ndarray,
                     grip: float = OPEN) -> tuple[np.ndarray, bool]:
        """(9,) env action moving the arm straight towards joint positions `goal` (7,), at most
        JOINT_STEP rad per step, and whether it is there (within 0.05 rad)."""
        delta = goal - self.q_cmd
        self.q_cmd = self.q_cmd + delta / max(1.0, np.abs(delta).max() / JOINT_STEP)
        self.pos_cmd, self.rot_cmd = self.pose()
        done = bool(np.abs(goal - self.data.qpos[:7]).max() < 0.05)
        return self._servo(obs, grip), done

    def action(self, wp: Waypoint, obs: np.ndarray) -> np.ndarray:
        """(9,) env action towards `wp`; `obs` is the env's last 60-d observation."""
        self._advance(wp)
        self.q_cmd = self.ik(self.pos_cmd, self.rot_cmd, self.q_cmd)
        return self._servo(obs, wp.grip)

    def _servo(self, obs: np.ndarray, grip: float) -> np.ndarray:
        """The action that puts the servo targets at q_cmd (+ the gravity offset)."""
        target = self.q_cmd + self.data.qfrc_bias[:7] / self.kp
        arm = (target - obs[:7]) / (ACTION_SCALE * self.env.dt)
        arm /= max(1.0, np.abs(arm).max())  # saturate as a whole: same direction in joint space
        return np.concatenate([arm, [grip, grip]])

    def reached(self, wp: Waypoint) -> bool:
        """The commanded pose is at `wp` and the site within `wp.tol` (m) and ROT_TOL of it."""
        pos, rot = self.pose()
        return bool(np.allclose(self.pos_cmd, wp.pos) and np.allclose(self.rot_cmd, wp.rot)
                    and np.linalg.norm(wp.pos - pos) < wp.tol
                    and np.linalg.norm(rotation_error(wp.rot, rot)) < ROT_TOL)


# ---------------------------------------------------------------------------- sub-task plans
# Gripper orientations (columns: site x, y, z = approach). FORWARD points the fingers at the
# counter (+y) with the fingers side by side along x, FrankaKitchen-v1's start orientation.
FORWARD = np.array([[0.0, 1.0, 0.0], [0.0, 0.0, 1.0], [1.0, 0.0, 0.0]])
KNOB_YAW = -0.2  # rad about z: keeps the knob grasp and its turn inside the joint limits
KNOB_TURN = 1.3  # rad about +y (the knobs' qpos goes to -0.88 about their -y axis)
KETTLE_PITCH = -0.8  # rad about x: fingers tilted down to push the kettle's back face
TIP = 0.045  # m from the site to the middle of the finger pads, along the approach axis
DOOR_STEP = 0.07  # rad of door swing between waypoints
DOOR_SPEED = 0.25  # m/s of the handle along its arc
MICROWAVE_Q = np.array([0.348, 1.546, 0.708, -1.008, 1.575, 0.804, -1.132])
HOOK_DEPTH = 0.02  # m along the fingers from the site to where they cross behind the bar


def _site(model: mujoco.MjModel, data: mujoco.MjData, name: str) -> np.ndarray:
    return data.site_xpos[model.site(name).id].copy()


def _knob(site: str, rng: np.random.Generator):
    """Grasp a burner knob's bar from the front, turn it KNOB_TURN about +y, let go."""
    def plan(model, data) -> list[Waypoint]:
        knob = _site(model, data, site)
        rot = rot_about("z", KNOB_YAW) @ FORWARD
        turned = rot_about("y", KNOB_TURN) @ rot
        grasp = knob + [0.0, 0.03 - TIP - 0.048, 0.0]  # pads 3 cm onto the 4.8 cm-deep bar
        front = grasp + [0.0, -0.12, 0.0]
        return [Waypoint(front, rot, OPEN, speed=rng.uniform(0.5, 0.7), tol=0.03),
                Waypoint(grasp, rot, OPEN, speed=0.3),
                Waypoint(grasp, rot, CLOSE, hold=2),
                Waypoint(grasp, turned, CLOSE, tol=0.02),
                Waypoint(grasp, turned, OPEN, hold=1, tol=0.02),
                Waypoint(front, turned, OPEN, tol=0.03)]
    return plan


def _light_switch(rng: np.random.Generator):
    """Fingers closed, from the right of the lever, push it left to its stop."""
    def plan(model, data) -> list[Waypoint]:
        lever = _site(model, data, "light_site")
        right = lever + [0.07, -TIP - 0.01, 0.0]
        return [Waypoint(right + [0, -0.13, 0], FORWARD, CLOSE, speed=rng.uniform(0.5, 0.7),
                         tol=0.03),
                Waypoint(right, FORWARD, CLOSE, speed=0.3),
                Waypoint(right + [-0.10, 0.0, 0.0], FORWARD, CLOSE, speed=0.3, tol=0.02,
                         max_steps=15),
                Waypoint(right + [-0.08, -0.15, 0.0], FORWARD, CLOSE, tol=0.03)]
    return plan


def _slide_cabinet(rng: np.random.Generator):
    """Open fingers around the slide door's handle (low end), slide it 0.27 m to the right."""
    def plan(model, data) -> list[Waypoint]:
        handle = _site(model, data, "slide_site") + [0.0, -TIP, -rng.uniform(0.08, 0.12)]
        return [Waypoint(handle + [0, -0.14, 0], FORWARD, OPEN, speed=rng.uniform(0.5, 0.7),
                         tol=0.03),
                Waypoint(handle, FORWARD, OPEN, speed=0.3),
                Waypoint(handle + [0.27, 0, 0], FORWARD, OPEN, speed=0.35, tol=0.02),
                Waypoint(handle + [0.25, -0.08, 0], FORWARD, OPEN, tol=0.03, max_steps=15)]
    return plan


def _kettle(rng: np.random.Generator):
    """Closed fingers tilted down, push the kettle's back face 0.39 m forward onto the
    top-left burner."""
    def plan(model, data) -> list[Waypoint]:
        kettle = data.qpos[23:26].copy()  # body origin: bottom centre
        rot = rot_about("x", KETTLE_PITCH) @ FORWARD
        contact = kettle + [rng.uniform(-0.01, 0.01), -0.18, 0.13]
        return [Waypoint(contact + [0, -0.05, 0.15], rot, CLOSE, speed=rng.uniform(0.5, 0.7),
                         tol=0.03),
                Waypoint(contact, rot, CLOSE, speed=0.4, tol=0.015),
                Waypoint(contact + [0, 0.39, 0], rot, CLOSE, speed=0.3, tol=0.02),
                Waypoint(contact + [0, 0.22, 0.12], rot, CLOSE, tol=0.03)]
    return plan


def _door(site: str, hinge_body: str, toward_hinge: float, gap: tuple[float, float],
          tilt: float, opening: tuple[float, float], posture: np.ndarray | None,
          clearance: float, rng: np.random.Generator):
    """Hook a door's vertical handle bar and swing the door open about its vertical hinge.

    The closed fingers (thin across the door, their closing axis vertical) come in from the
    handle's free-edge side, parallel to the door (the hand tilted `tilt` away from it),
    into the gap between the bar and the door, so the fingers lie behind the bar; the hand then
    moves along the door's arc, turning with it, by a drawn angle in `opening` (rad, signed):
    the bar is pulled by the fingers behind it (a form closure, no grip friction needed).
    Then the fingers slide out sideways and the hand backs off. `toward_hinge`: +1 / -1, the
    side of the handle the hinge is on along the door's x axis; `gap`: (bar radius, gap depth
    behind the bar) in m; `tilt`: rad between the fingers and the door's plane; `posture`: the
    arm's posture for it (None: READY_Q; MICROWAVE_Q was found by a search over IK starts for
    one that follows the whole arc inside the joint limits); `clearance`: m in front of the
    door of an extra first waypoint (0: the joint-space move goes straight beside the bar).
    """
    def plan(model, data) -> list[Waypoint]:
        bar = _site(model, data, site)
        door = data.xmat[model.body(hinge_body).id].reshape(3, 3)
        hinge = data.xpos[model.body(hinge_body).id].copy()
        ex, ey = door[:, 0], door[:, 1]  # along the door; into it (the bar stands out at -ey)
        tilt_drawn = tilt + rng.uniform(-0.05, 0.05)
        approach = np.cos(tilt_drawn) * toward_hinge * ex + np.sin(tilt_drawn) * ey
        closing = np.array([0.0, 0.0, -1.0])  # the fingers' closing axis: vertical
        rot = np.column_stack([np.cross(closing, approach), closing, approach])
        behind = bar + ey * (gap[0] + gap[1] * rng.uniform(0.4, 0.6))  # middle of the gap
        behind[2] += rng.uniform(-0.04, 0.04)  # anywhere along the bar
        hook = behind - HOOK_DEPTH * approach  # the site: the bar lies across the fingers
        outside = hook - 0.12 * toward_hinge * ex  # beside the bar, at the hook's depth
        waypoints = [Waypoint(outside - clearance * ey, rot, CLOSE, tol=0.03, posture=posture)]
        if clearance:
            waypoints.append(Waypoint(outside, rot, CLOSE, speed=0.4, tol=0.015, max_steps=15))
        waypoints.append(Waypoint(hook, rot, CLOSE, speed=0.3, tol=0.012, max_steps=20))
        angle = rng.uniform(*opening)
        for theta in np.linspace(0.0, angle, int(np.ceil(abs(angle) / DOOR_STEP)) + 1)[1:]:
            turn = rot_about("z", theta)
            waypoints.append(Waypoint(hinge + turn @ (hook - hinge), turn @ rot, CLOSE,
                                      speed=DOOR_SPEED, tol=0.04, max_steps=8,
                                      until_done=True))
        # done (or swung the drawn angle): back out along the fingers, sideways from the bar
        return [*waypoints, Waypoint(np.array([0.0, 0.0, -0.12]), rot, CLOSE, tol=0.04,
                                     max_steps=6, relative=True)]
    return plan


DOORS = ("microwave", "hinge cabinet")
MAX_DOORS = 1  # per episode
PLANNERS = {  # the expert's repertoire: sub-task -> (rng -> plan(model, data) -> waypoints)
    "kettle": _kettle,
    "microwave": lambda rng: _door("microhandle_site", "microdoorroot", -1.0, (0.02, 0.038),
                                   0.35, (-0.7, -0.6), MICROWAVE_Q, 0.05, rng),
    "hinge cabinet": lambda rng: _door("hinge_site2", "hingerightdoor", -1.0, (0.022, 0.061),
                                       0.6, (1.35, 1.5), None, 0.0, rng),
    "bottom burner": lambda rng: _knob("knob2_site", rng),
    "top burner": lambda rng: _knob("knob4_site", rng),
    "light switch": _light_switch,
    "slide cabinet": _slide_cabinet,
}


def draw_tasks(rng: np.random.Generator, n_subtasks: int = N_SUBTASKS) -> list[str]:
    """An ordered choice of `n_subtasks` distinct sub-tasks of PLANNERS, at most MAX_DOORS of
    them doors (a door takes ~130 of the episode's 280 steps, the others ~50)."""
    plan: list[str] = []
    for task in rng.permutation(sorted(PLANNERS)):
        if len(plan) < n_subtasks and (task not in DOORS
                                       or sum(t in DOORS for t in plan) < MAX_DOORS):
            plan.append(str(task))
    return plan


def run_expert(env: KitchenEnv, seed: int, tasks: list[str] | None = None,
               n_subtasks: int = N_SUBTASKS) -> dict:
    """One expert episode in `env` (reset with `seed`); `tasks` (default: a seeded ordered
    draw of `n_subtasks` from PLANNERS) are attempted in order until the 280-step limit.

    Returns {"obs": [T, 60] float32, "action": [T, 9] float32, "reward": [T] float32,
    "n_completed": int, "completed": list of sub-task names, "plan": list of sub-task names}.
    """
    rng = np.random.default_rng(seed)
    if tasks is None:
        tasks = draw_tasks(rng, n_subtasks)
    unknown = [t for t in tasks if t not in PLANNERS]
    if unknown:
        raise ValueError(f"tasks: expected names from {sorted(PLANNERS)}, got {unknown}")
    obs, _ = env.reset(seed=seed)
    ctrl = Controller(env)
    observations, actions, rewards = [], [], []
    done = False

    def act(action: np.ndarray) -> None:
        nonlocal obs, done
        observations.append(obs)
        actions.append(action)
        obs, reward, terminated, truncated, _ = env.step(action)
        rewards.append(reward)
        done = terminated or truncated

    for task in tasks:
        waypoints = PLANNERS[task](rng)(env.model, env.data)
        # joint-space move to the IK solution (from the sub-task's posture) of the first
        # waypoint: a fresh, well-conditioned posture for every sub-task, whatever the
        # previous one ended in
        ctrl.posture = READY_Q if waypoints[0].posture is None else waypoints[0].posture
        goal = ctrl.ik(waypoints[0].pos, waypoints[0].rot, ctrl.posture, iters=APPROACH_IK_ITERS)
        for _ in range(waypoints[0].max_steps):
            if done:
                break
            action, arrived = ctrl.joint_action(goal, obs, waypoints[0].grip)
            act(action)
            if arrived:
                break
        for wp in waypoints[1:]:
            if wp.until_done and task in env.completed():
                continue
            if wp.relative:  # an offset in the site frame from where the site is now
                pos, rot = ctrl.pose()
                wp = replace(wp, pos=pos + rot @ wp.pos, rot=rot, relative=False)
            ctrl.start()
            held = 0
            for _ in range(wp.max_steps):
                if done:
                    break
                act(ctrl.action(wp, obs))
                held = held + 1 if ctrl.reached(wp) else 0
                if held > wp.hold:
                    break
        if done:
            break
    return {"obs": np.asarray(observations, np.float32),
            "action": np.asarray(actions, np.float32),
            "reward": np.asarray(rewards, np.float32),
            "n_completed": len(env.completed()), "completed": env.completed(), "plan": tasks}


def collect_episode(seed: int) -> dict:
    """`drifting-policy demos kitchen` collector: {"obs" [T, 60], "action" [T, 9] (float32),
    "success" (>= N_SUBTASKS sub-tasks done), "metrics"}: "p1".."p4" (0/1) and, for each of
    the seven sub-tasks, "<task> tried" (in this episode's plan) and "<task> done" (completed),
    0/1; averaged over episodes, done / tried is the expert's success rate per sub-task."""
    env = KitchenEnv()
    try:
        ep = run_expert(env, seed)
    finally:
        env.close()
    n = ep["n_completed"]
    metrics = {f"p{k}": float(n >= k) for k in range(1, N_SUBTASKS + 1)}
    for task in ALL_TASKS:
        metrics[f"{task} tried"] = float(task in ep["plan"])
        metrics[f"{task} done"] = float(task in ep["completed"])
    return {"obs": ep["obs"], "action": ep["action"], "success": n >= N_SUBTASKS,
            "metrics": metrics}
