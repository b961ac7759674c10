"""Multimodal scripted oracle for BlockPush (privileged: reads the full 16-d state) and the
per-episode demo recorder used by `drifting-policy demos blockpush`.

Per episode the oracle draws (seeded) one of the four assignments IBC's multimodal oracle
draws from: which block goes first and to which target, the other block to the other target.
It then pushes each block in turn with a reactive, waypoint-following controller working on
the absolute effector target (one command per 10 Hz control step, at most `TRAVEL_SPEED`
per step, as IBC's 0.3 m/s):

1. approach: go to the pre-push point `PRE_PUSH` behind the block on the line target -> block.
   The straight line is followed unless it passes within `CLEARANCE` of a block; then the next
   waypoint is a point on a circle around that block, rotated from the effector's bearing
   towards the goal's by at most `DETOUR_STEP` radians (the shorter way round).
2. push: aim at a point `PUSH_DEPTH` behind the block's centre on the line target -> block.
   Re-aiming at the block's current position every step steers it back onto the line; the
   command advances at most `PUSH_SPEED` per step (`FINE_SPEED` within `SLOW_RADIUS` of the
   target). The push is abandoned (back to 1) when the effector falls off the line
   (bearing error > `MAX_PUSH_ANGLE`) or loses the block (`LOST_DIST`).
3. when the block's centre is within `DONE_DIST` of its target: back off along the push line
   by `BACK_OFF`, then the next block (the placed block is an obstacle from then on).

`collect_episode(seed)` runs the env from seed `seed` (its DP layout) with the oracle.
"""

from __future__ import annotations

import math

import numpy as np

from envs.blockpush.env import (
    BLOCK_SLICES,
    MAX_EPISODE_STEPS,
    OBS_LAYOUT,
    TARGET_SLICES,
    WORKSPACE_BOUNDS,
    BlockPushMultimodalEnv,
)

ASSIGNMENTS = (((0, 0), (1, 1)), ((0, 1), (1, 0)), ((1, 0), (0, 1)), ((1, 1), (0, 0)))
TRAVEL_SPEED = 0.03  # m per control step while travelling
PUSH_SPEED = 0.02  # m per control step while pushing
FINE_SPEED = 0.01  # ... within SLOW_RADIUS of the target
SLOW_RADIUS = 0.05
PRE_PUSH = 0.065  # m behind the block's centre where a push starts
PUSH_DEPTH = 0.01  # the push aims this far behind the block's centre (inside the block)
CLEARANCE = 0.06  # least distance between a travel path and a block's centre
DETOUR_STEP = 0.7  # radians of bearing around a block per detour waypoint
ARRIVE_DIST = 0.005  # m: close enough to the pre-push point to start pushing
MAX_PUSH_ANGLE = math.radians(35)
LOST_DIST = 0.09
DONE_DIST = 0.015
BACK_OFF = 0.05


def _unit(v: np.ndarray) -> np.ndarray:
    n = float(np.linalg.norm(v))
    return v / n if n > 1e-9 else np.zeros_like(v)


def _step_towards(current: np.ndarray, goal: np.ndarray, max_step: float) -> np.ndarray:
    delta = goal - current
    n = float(np.linalg.norm(delta))
    return goal.copy() if n <= max_step else current + delta * (max_step / n)


def _segment_distance(p: np.ndarray, q: np.ndarray, c: np.ndarray) -> float:
    """Distance from point c to the segment p-q."""
    d = q - p
    t = 0.0 if float(d @ d) < 1e-12 else float(np.clip((c - p) @ d / (d @ d), 0.0, 1.0))
    return float(np.linalg.norm(p + t * d - c))


def travel_waypoint(start: np.ndarray, goal: np.ndarray, obstacles: list[np.ndarray]) -> np.ndarray:
    """Next waypoint from `start` towards `goal` (xy) around circular obstacles (centres xy) of
    radius CLEARANCE: `goal` itself if the straight segment is clear, else a point on a circle
    around the nearest blocking obstacle, turned towards the goal's bearing."""
    blocking = [c for c in obstacles if _segment_distance(start, goal, c) < CLEARANCE
                and np.linalg.norm(goal - c) >= CLEARANCE - 1e-6]
    if not blocking:
        return goal
    c = min(blocking, key=lambda o: float(np.linalg.norm(o - start)))
    a_start = math.atan2(*(start - c)[::-1])
    a_goal = math.atan2(*(goal - c)[::-1])
    turn = (a_goal - a_start + math.pi) % (2 * math.pi) - math.pi  # shorter way round
    a = a_start + float(np.clip(turn, -DETOUR_STEP, DETOUR_STEP))
    return c + (CLEARANCE + 0.01) * np.array([math.cos(a), math.sin(a)])


class MultimodalPushOracle:
    """Closed-loop oracle; `act(obs)` -> absolute effector target (2,) float64.

    Args:
        assignment: ((block, target), (block, target)), the pushing order and pairing;
            see ASSIGNMENTS.
    """

    def __init__(self, assignment) -> None:
        self.assignment = tuple(tuple(int(i) for i in pair) for pair in assignment)
        self.stage = 0  # index into assignment; 2 = all done
        self.phase = "approach"
        self.back_off_goal: np.ndarray | None = None
        self.command: np.ndarray | None = None

    def act(self, obs: np.ndarray) -> np.ndarray:
        obs = np.asarray(obs, dtype=np.float64)
        if self.command is None:
            self.command = obs[OBS_LAYOUT["effector_target_translation"]].copy()
        blocks = [obs[s] for s, _ in BLOCK_SLICES]
        targets = [obs[s] for s, _ in TARGET_SLICES]
        if self.stage < 2:
            b, t = self.assignment[self.stage]
            if self.phase != "back_off" and np.linalg.norm(blocks[b] - targets[t]) < DONE_DIST:
                self.phase = "back_off"
                self.back_off_goal = self.command - BACK_OFF * _unit(targets[t] - blocks[b])
        if self.phase == "back_off":
            goal = self.back_off_goal
            self.command = _step_towards(self.command, goal, TRAVEL_SPEED)
            if np.linalg.norm(self.command - goal) < 1e-9:
                self.stage += 1
                self.phase = "approach"
            return self._clipped()
        if self.stage >= 2:  # both placed: hold still
            return self._clipped()
        b, t = self.assignment[self.stage]
        block, target = blocks[b], targets[t]
        line = _unit(target - block)  # push direction
        ee = self.command
        if self.phase == "push":
            to_block = block - ee
            bearing = math.acos(float(np.clip(_unit(to_block) @ line, -1.0, 1.0)))
            if bearing > MAX_PUSH_ANGLE or np.linalg.norm(to_block) > LOST_DIST:
                self.phase = "approach"
        if self.phase == "approach":
            pre = block - PRE_PUSH * line
            obstacles = list(blocks)
            waypoint = travel_waypoint(ee, pre, obstacles)
            self.command = _step_towards(ee, waypoint, TRAVEL_SPEED)
            if np.linalg.norm(self.command - pre) < ARRIVE_DIST:
                self.phase = "push"
            return self._clipped()
        speed = FINE_SPEED if np.linalg.norm(target - block) < SLOW_RADIUS else PUSH_SPEED
        self.command = _step_towards(ee, block - PUSH_DEPTH * line, speed)
        return self._clipped()

    def _clipped(self) -> np.ndarray:
        self.command = np.clip(self.command, WORKSPACE_BOUNDS[0], WORKSPACE_BOUNDS[1])
        return self.command.copy()


def draw_assignment(seed: int) -> tuple:
    """The episode's ((block, target), (block, target)): uniform over ASSIGNMENTS, from a
    generator seeded with (seed, 1), independent of the layout's RandomState(seed)."""
    return ASSIGNMENTS[int(np.random.default_rng([seed, 1]).integers(len(ASSIGNMENTS)))]


def collect_episode(seed: int, max_steps: int = MAX_EPISODE_STEPS,
                    action_noise: float = 0.0) -> dict:
    """Run the oracle on the env's layout for `seed` (assignment drawn from `seed` too).

    `action_noise` = sigma > 0 collects DART-style demos (Laskey et al., 2017): the env executes
    the oracle's target plus N(0, sigma^2) per axis (metres; seeded by `seed`), the recorded
    label stays the oracle's clean target, and the oracle continues from the executed target
    (the observation's effector target), so its next label is the correction from the perturbed
    state. The data then visits the off-path states a learned policy drifts into, with the
    recovery the oracle would make. sigma = 0 (default) is the plain oracle, bit for bit.

    Returns {"obs": float32 [T, 16] (observation before each action), "action": float32 [T, 2]
    (absolute effector targets, the oracle's), "success": bool (both blocks in distinct
    targets, p2), "metrics": {"p1": 0/1, "p2": 0/1}, "assignment": ((block, target), (block,
    target)), "final_info": the env's info after the last step (reward events, total_reward)}.
    """
    if action_noise < 0:
        raise ValueError(f"action_noise: expected sigma >= 0 (metres), got {action_noise}")
    assignment = draw_assignment(seed)
    oracle = MultimodalPushOracle(assignment)
    noise = np.random.default_rng([seed, 2])
    env = BlockPushMultimodalEnv(abs_action=True, max_episode_steps=max_steps)
    try:
        obs, info = env.reset(seed=seed)
        observations, actions = [], []
        done = False
        while not done:
            if action_noise > 0 and oracle.command is not None:  # continue from what ran
                oracle.command = obs[OBS_LAYOUT["effector_target_translation"]].astype(np.float64)
            action = oracle.act(obs)
            observations.append(obs)
            actions.append(action.astype(np.float32))
            if action_noise > 0:
                action = action + noise.normal(0.0, action_noise, size=action.shape)
            obs, _, terminated, truncated, info = env.step(action)
            done = terminated or truncated
    finally:
        env.close()
    total = info["total_reward"]
    return {
        "obs": np.stack(observations).astype(np.float32),
        "action": np.stack(actions),
        "success": bool(info["success"]),
        "metrics": {"p1": float(total > 0.4), "p2": float(total > 0.9)},
        "assignment": assignment,
        "final_info": info,
    }
