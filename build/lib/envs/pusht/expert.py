"""Scripted PushT expert (privileged: reads the simulator) and the per-episode demo recorder.

The expert alternates two phases:

1. plan: sample contact points along the T's eight edges; for each, put the pusher of a fresh
   scratch simulator just off the edge and push straight in (along the edge's inward normal),
   recording the block pose after every control step. Score each (contact, push length) by
   progress per control step: reduction of the block's pose error (RMS displacement of points
   spread over the T) divided by the steps spent travelling there and pushing. The best few
   are re-simulated exactly as they will be executed (advance, then hold so the pusher comes
   to rest); one is drawn at random among those close to the best, which gives the demos some
   natural multimodality (which side, where) while staying seeded.
2. execute: travel to the pre-contact point along a collision-free path around the block
   (a small visibility graph on the block inflated by the pusher's radius), then replay the
   push targets open loop, then plan again. A travel is re-planned if the block moved.

Actions are absolute pusher targets in the 512-px workspace, one per 10 Hz control step,
exactly what `PushTEnv.step` takes.
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass

import numpy as np
import shapely
import shapely.geometry as sg

from envs.pusht.env import (
    AGENT_RADIUS,
    GOAL_POSE,
    T_BAR,
    T_PARTS,
    T_STEM,
    PushTEnv,
    PushTPhysics,
    block_keypoints,
    body_to_world,
    rotation,
)

GAP = 4.0  # px between pusher and edge at the pre-contact point
PATH_CLEARANCE = 2.0  # least px between pusher and block while travelling
WAYPOINT_CLEARANCE = 10.0  # px: detour corners sit this far out, so corner cutting is harmless
LOOKAHEAD = 40.0  # px of path ahead of the pusher used as target: ~20 px per control step
ARRIVE_DIST, ARRIVE_SPEED = 3.0, 40.0  # px, px/s: close and slow enough to start pushing
CONTACT_SPACING = 7.5  # px between sampled contact points along an edge
WORKSPACE_MIN, WORKSPACE_MAX = 24.0, 487.0  # pusher centres that stay clear of the walls
HOLD_STEPS = 2  # control steps the last push target is held so the pusher comes to rest
TOP_CANDIDATES = 6  # prefix-scored pushes that are re-simulated exactly
TRAVEL_SPEED = 15.0  # px per control step the pusher travels on average (for scoring)
SETTLE_STEPS = 3  # control steps to come to rest at the pre-contact point (for scoring)
REPLAN_MOVE = 1.5  # px of block displacement (RMS) during travel that voids the plan


def _t_samples(spacing: float = 10.0) -> np.ndarray:
    """Points on a regular grid inside the T (body frame): the pose-error probe points."""
    points = []
    for rect in (T_BAR, T_STEM):
        (x0, y0), (x1, y1) = rect.min(0), rect.max(0)
        xs = np.arange(x0 + spacing / 2, x1, spacing)
        ys = np.arange(y0 + spacing / 2, y1, spacing)
        points.append(np.stack(np.meshgrid(xs, ys), -1).reshape(-1, 2))
    return np.concatenate(points)


T_SAMPLES = _t_samples()


def pose_error(pose, goal=GOAL_POSE) -> float:
    """RMS distance (px) between the T's probe points at `pose` and at `goal`."""
    diff = body_to_world(T_SAMPLES, pose) - body_to_world(T_SAMPLES, goal)
    return float(np.sqrt((diff**2).sum(-1).mean()))


def _contact_samples() -> tuple[np.ndarray, np.ndarray]:
    """Contact points (K, 2) spread along the T's outline and the inward edge normals (K, 2)
    there, body frame."""
    outline = np.array([[-60, 0], [60, 0], [60, 30], [15, 30], [15, 120], [-15, 120],
                        [-15, 30], [-60, 30]], dtype=np.float64)  # clockwise on screen
    points, normals = [], []
    for a, b in zip(outline, np.roll(outline, -1, axis=0), strict=True):
        tangent = (b - a) / np.linalg.norm(b - a)
        n = max(1, int(np.linalg.norm(b - a) // CONTACT_SPACING))
        for s in (np.arange(n) + 0.5) / n:
            points.append(a + s * (b - a))
            normals.append(np.array([-tangent[1], tangent[0]]))
    return np.array(points), np.array(normals)


CONTACT_POINTS, PUSH_DIRECTIONS = _contact_samples()


@dataclass
class _Push:
    start: np.ndarray  # pusher position to reach before replaying `targets`
    targets: list[np.ndarray]  # control targets from `start` on
    block_pose: np.ndarray  # block pose the push was planned for


def _block_geometry(block_pose) -> sg.MultiPolygon:
    return sg.MultiPolygon([sg.Polygon(body_to_world(p, block_pose)) for p in T_PARTS])


def _push_targets(start, direction, speed: float, n_advance: int,
                  hold: int = HOLD_STEPS) -> list[np.ndarray]:
    """Targets moving from `start` along `direction` at `speed` px/step, then held."""
    steps = [start + direction * speed * (k + 1) for k in range(n_advance)]
    return steps + [steps[-1]] * hold


def _simulate(block_pose, start, targets) -> list[np.ndarray]:
    """Block poses after each target, on a fresh simulator with the pusher at rest at `start`."""
    sim = PushTPhysics()
    sim.set_state([start[0], start[1], block_pose[0], block_pose[1], block_pose[2]])
    poses = []
    for target in targets:
        sim.step(target)
        poses.append(sim.block_pose)
    return poses


class _TravelPlanner:
    """Shortest collision-free pusher paths around one block pose (visibility graph)."""

    def __init__(self, block_pose) -> None:
        block = _block_geometry(block_pose)
        self.obstacle = block.buffer(AGENT_RADIUS + PATH_CLEARANCE)
        shapely.prepare(self.obstacle)
        corners = block.buffer(AGENT_RADIUS + WAYPOINT_CLEARANCE, join_style="mitre")
        self.escape_ring = block.buffer(AGENT_RADIUS + PATH_CLEARANCE + 2).exterior
        nodes = np.array(corners.exterior.coords[:-1])
        inside = (nodes >= WORKSPACE_MIN).all(1) & (nodes <= WORKSPACE_MAX).all(1)
        self.nodes = nodes[inside]
        n = len(self.nodes)
        pairs = [(i, j) for i in range(n) for j in range(i + 1, n)]
        free = self._free([self.nodes[i] for i, _ in pairs], [self.nodes[j] for _, j in pairs])
        self.graph: dict[int, list[tuple[int, float]]] = {i: [] for i in range(n)}
        for (i, j), ok in zip(pairs, free, strict=True):
            if ok:
                length = float(np.linalg.norm(self.nodes[i] - self.nodes[j]))
                self.graph[i].append((j, length))
                self.graph[j].append((i, length))

    def _free(self, starts, ends) -> np.ndarray:
        if len(starts) == 0:
            return np.zeros(0, dtype=bool)
        lines = shapely.linestrings(np.stack([np.asarray(starts), np.asarray(ends)], axis=1))
        return ~shapely.intersects(self.obstacle, lines)

    def _leave(self, start) -> list[np.ndarray]:
        """[start] or, if the pusher is hugging the block, [start, the nearest clear point]."""
        point = sg.Point(start)
        if not self.obstacle.contains(point):
            return [start]
        exit_point = self.escape_ring.interpolate(self.escape_ring.project(point))
        return [start, np.array(exit_point.coords[0])]

    def from_start(self, start):
        """Prepare paths from `start`: returns a callable goal -> (length, waypoints)."""
        head = self._leave(np.asarray(start, dtype=np.float64))
        origin = head[-1]
        head_length = float(np.linalg.norm(origin - head[0]))
        # Dijkstra from the origin over the corner nodes
        dist = np.full(len(self.nodes), np.inf)
        parent = np.full(len(self.nodes), -1)
        visible = self._free([origin] * len(self.nodes), list(self.nodes))
        queue = []
        for i in np.flatnonzero(visible):
            dist[i] = np.linalg.norm(self.nodes[i] - origin)
            queue.append((dist[i], i))
        heapq.heapify(queue)
        while queue:
            d, i = heapq.heappop(queue)
            if d > dist[i]:
                continue
            for j, length in self.graph[i]:
                if d + length < dist[j]:
                    dist[j], parent[j] = d + length, i
                    heapq.heappush(queue, (d + length, j))

        def route(goals: np.ndarray) -> list[tuple[float, list[np.ndarray]]]:
            goals = np.atleast_2d(goals)
            direct = self._free([origin] * len(goals), list(goals))
            n = len(self.nodes)
            node_visible = self._free(np.repeat(self.nodes, len(goals), 0),
                                      np.tile(goals, (n, 1))).reshape(n, len(goals))
            routes = []
            for g, goal in enumerate(goals):
                if direct[g]:
                    routes.append((head_length + float(np.linalg.norm(goal - origin)),
                                   head + [goal]))
                    continue
                via = dist + np.linalg.norm(self.nodes - goal, axis=1)
                via[~node_visible[:, g]] = np.inf
                best = int(np.argmin(via)) if n else -1
                if best < 0 or not np.isfinite(via[best]):
                    routes.append((math.inf, head + [goal]))
                    continue
                chain = [best]
                while parent[chain[-1]] >= 0:
                    chain.append(int(parent[chain[-1]]))
                waypoints = head + [self.nodes[i] for i in reversed(chain)] + [goal]
                routes.append((head_length + float(via[best]), waypoints))
            return routes

        return route


def _carrot(waypoints: list[np.ndarray], lookahead: float) -> np.ndarray:
    """The point `lookahead` px along the polyline (or its end)."""
    left = lookahead
    for a, b in zip(waypoints[:-1], waypoints[1:], strict=True):
        length = float(np.linalg.norm(b - a))
        if length >= left:
            return a + (b - a) * (left / max(length, 1e-9))
        left -= length
    return waypoints[-1]


class PushTExpert:
    """Privileged PushT expert: `act()` reads `env.physics` and returns the next target (2,)."""

    def __init__(self, env: PushTEnv, seed: int) -> None:
        self.env = env
        self.rng = np.random.default_rng(seed)
        self._push: _Push | None = None
        self._next_target = 0  # index into the push's targets; -1 while travelling

    def act(self) -> np.ndarray:
        physics = self.env.physics
        agent = np.array(physics.agent.position)
        speed = float(np.linalg.norm(physics.agent.velocity))
        block_pose = physics.block_pose

        push = self._push
        if push is not None and self._next_target >= 0:  # pushing
            if self._next_target < len(push.targets):
                self._next_target += 1
                return push.targets[self._next_target - 1].astype(np.float32)
            push = None
        elif push is not None and pose_error(block_pose, push.block_pose) > REPLAN_MOVE:
            push = None  # the block moved while we travelled
        if push is None:
            push = self._plan(agent, block_pose)
            self._push, self._next_target = push, -1
            if push is None:  # nothing reachable: stay put
                return agent.astype(np.float32)

        if np.linalg.norm(agent - push.start) < ARRIVE_DIST and speed < ARRIVE_SPEED:
            self._next_target = 0
            return self.act()
        _, waypoints = _TravelPlanner(block_pose).from_start(agent)(push.start)[0]
        return _carrot(waypoints, LOOKAHEAD).astype(np.float32)

    def _plan(self, agent: np.ndarray, block_pose: np.ndarray) -> _Push | None:
        error = pose_error(block_pose)
        starts, directions = self._contacts(block_pose)
        if len(starts) == 0:
            return None
        routes = _TravelPlanner(block_pose).from_start(agent)(starts)
        travel = np.array([length for length, _ in routes])
        reachable = np.isfinite(travel)
        starts, directions, travel = starts[reachable], directions[reachable], travel[reachable]
        if len(starts) == 0:
            return None
        travel_steps = travel / TRAVEL_SPEED + SETTLE_STEPS

        # push speed and reach shrink with the error: long brisk pushes far away, nudges near
        speed = float(np.clip(0.5 * error, 1.0, 10.0))
        n_steps = math.ceil((GAP + min(80.0, 3.0 * error + 10.0)) / speed) + HOLD_STEPS
        errors = np.empty((len(starts), n_steps))
        for i, (start, direction) in enumerate(zip(starts, directions, strict=True)):
            targets = _push_targets(start, direction, speed, n_steps, hold=0)
            errors[i] = [pose_error(p) for p in _simulate(block_pose, start, targets)]
        # score = error removed per control step spent (travel + push). A push advanced for
        # k steps and then held ends about where the prefix is after k + hold steps.
        rates = (error - errors) / (travel_steps[:, None] + np.arange(1, n_steps + 1))
        rates[:, :HOLD_STEPS] = -np.inf
        best = np.argsort(-rates, axis=None)[:TOP_CANDIDATES]

        candidates = []
        for flat in best:
            i, j = np.unravel_index(flat, rates.shape)
            targets = _push_targets(starts[i], directions[i], speed, max(1, j + 1 - HOLD_STEPS))
            expected = pose_error(_simulate(block_pose, starts[i], targets)[-1])
            rate = (error - expected) / (travel_steps[i] + len(targets))
            candidates.append((rate, starts[i], targets))
        rates = np.array([c[0] for c in candidates])
        # draw among the pushes nearly as good as the best (multimodal, seeded demos)
        near_best = np.flatnonzero(rates >= rates.max() - max(0.02, 0.15 * abs(rates.max())))
        _, start, targets = candidates[int(self.rng.choice(near_best))]
        return _Push(start, targets, block_pose)

    @staticmethod
    def _contacts(block_pose) -> tuple[np.ndarray, np.ndarray]:
        """Pre-contact pusher positions (K, 2) and push directions (K, 2), world frame.

        Keeps those where the pusher stays inside the walls and touches only its own edge.
        """
        contacts = body_to_world(CONTACT_POINTS, block_pose)
        directions = PUSH_DIRECTIONS @ rotation(block_pose[2]).T
        starts = contacts - directions * (AGENT_RADIUS + GAP)
        inside = ((starts >= WORKSPACE_MIN) & (starts <= WORKSPACE_MAX)).all(1)
        clearance = shapely.distance(_block_geometry(block_pose), shapely.points(starts))
        ok = inside & (clearance >= AGENT_RADIUS + GAP - 0.5)
        return starts[ok], directions[ok]


def collect_episode(seed: int, obs_types=("keypoints", "image", "state"),
                    render_size: int = 96) -> dict:
    """Run the expert on the episode of `seed`; per-step arrays in DP's zarr keys and dtypes.

    Returns img (N, S, S, 3) float32 0..255 [if "image"], state (N, 5) float32 [if "state"],
    keypoint (N, 9, 2) float32 [if "keypoints"], action (N, 2) float32, n_contacts (N, 1)
    float32 (contacts during the step that led to the observation), plus `success` (coverage
    > 0.95 reached) and `coverage_max`. Observation t pairs with action t; the episode stops
    at success or after the env's 300 steps.
    """
    env = PushTEnv(obs_type="state", render_size=render_size)
    _, info = env.reset(seed=seed)
    expert = PushTExpert(env, seed)
    columns: dict[str, list[np.ndarray]] = {"action": [], "n_contacts": []}
    for key, obs_type in (("img", "image"), ("state", "state"), ("keypoint", "keypoints")):
        if obs_type in obs_types:
            columns[key] = []
    success, coverage_max = False, info["coverage"]
    while True:
        if "img" in columns:
            columns["img"].append(env.render_frame(render_size).astype(np.float32))
        if "state" in columns:
            columns["state"].append(env.get_state().astype(np.float32))
        if "keypoint" in columns:
            columns["keypoint"].append(block_keypoints(env.physics.block_pose).astype(np.float32))
        columns["n_contacts"].append(np.array([info["n_contacts"]], dtype=np.float32))
        action = expert.act()
        columns["action"].append(np.asarray(action, dtype=np.float32))
        _, _, terminated, truncated, info = env.step(action)
        coverage_max = max(coverage_max, info["coverage"])
        if terminated or truncated:
            success = bool(terminated)
            break
    env.close()
    episode = {key: np.stack(values) for key, values in columns.items()}
    episode.update(success=success, coverage_max=float(coverage_max))
    return episode
