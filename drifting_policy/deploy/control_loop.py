"""Real-time control: a policy drives a robot at a fixed rate, inference never blocks a tick.

Timeline. Ticks are scheduled at t0 + k / rate (time.perf_counter; a late tick does not shift the
ones after it, so no drift accumulates). At tick k the loop (1) takes the chunks the inference
worker finished, (2) reads the robot's observation o_k ([To, ...] frames), (3) starts inference on
o_k if it is time, (4) sends the action scheduled for tick k. It never waits for inference.

Chunks are time-stamped. A predictor (`deploy/contract.py`) returns H actions for the ticks k,
k + 1, ... of its observation (row 0 = the policy's action index To - 1). Since an answer takes
time, the chunk from o_k is executed from tick k + lead on (rows lead .. lead + Ta - 1, receding
horizon): the policy has `lead` control periods to answer (default 1). Inference for the next
chunk starts when the queue holds no action past tick k + lead - 1, so each chunk executes Ta
actions. Rows of a chunk that arrives late are dropped for the ticks that have passed (as
Diffusion Policy's real-robot eval drops actions whose timestamps are past).

Deadline miss: a tick with no action scheduled for it (the chunk was late). The loop then HOLDS:
it re-sends the last action sent (for position targets such as PushT's, the robot stays put).

Faults: nothing non-finite reaches the robot. An observation holding NaN/inf is not sent to the
policy and a chunk holding NaN/inf (or refused by the predictor as non-finite) is dropped; each
counts a fault, and a tick left without an action holds the last one. The queue holds only
finite rows (their ensemble average is finite too), so every action sent is finite.

Temporal ensembling (ACT, Zhao et al. 2023): inference runs whenever the worker is idle, every
chunk contributes all its rows from `lead` on, and the action for tick k is the average of the
chunks' predictions for k with weights exp(-coeff * i), i = 0 for the oldest chunk.

Plug a real robot by implementing `Robot` (see docs/deployment.md); `deploy/robot.py`'s
`GymRobot` turns any gymnasium env (a task config's env) into one.
"""

from __future__ import annotations

import math
import queue
import sys
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import numpy as np
from tqdm import tqdm

from drifting_policy.deploy.contract import NonFiniteError, Predictor


# ---------------------------------------------------------------------------------- protocols
class Robot(Protocol):
    """What the control loop drives. Observations are the policy's input frames."""

    def reset(self, seed: int | None = None) -> None:
        """Bring the robot to a start state (not timed)."""

    def get_observation(self) -> dict[str, np.ndarray]:
        """The last To frames per obs key of the policy's shape_meta: {key: [To, *shape]}
        (lowdim tasks: {"obs": [To, Do]}), float32."""

    def send_action(self, action: np.ndarray) -> None:
        """Command one action [Da]; must return quickly (well within one control period)."""


@runtime_checkable
class EpisodicRobot(Robot, Protocol):
    """A robot that knows when an episode is over and what it scored (e.g. a simulator)."""

    done: bool
    score: float


class Clock(Protocol):
    def now(self) -> float:
        """Seconds, monotonic."""

    def sleep_until(self, t: float) -> None:
        """Return at (or just after) time t; at once if t has passed."""


class MonotonicClock:
    """time.perf_counter time; sleeps with time.sleep (which releases the GIL)."""

    def now(self) -> float:
        return time.perf_counter()

    def sleep_until(self, t: float) -> None:
        delay = t - time.perf_counter()
        if delay > 0:
            time.sleep(delay)


# ---------------------------------------------------------------------------------- inference
@dataclass
class Chunk:
    """One inference result. Times are Clock times (seconds)."""

    obs_tick: int
    submitted: float
    ready: float = math.nan
    actions: np.ndarray | None = None  # [H, Da]
    error: str | None = None  # the predictor failed
    fault: str | None = None  # the chunk (or the predictor's answer) is not finite


class ThreadedInference:
    """Runs predictor.predict in one worker thread (torch releases the GIL while it computes).

    submit() hands over an observation and returns at once; poll() returns the finished chunks.
    One request at a time: `busy` is True from submit() until poll() returned its chunk.
    A predictor error becomes a chunk with `error` set, a NonFiniteError one with `fault` set
    (the loop counts them and goes on).
    """

    def __init__(self, predictor: Predictor, clock: Clock | None = None) -> None:
        self.predictor, self.clock = predictor, clock or MonotonicClock()
        self._requests: queue.Queue = queue.Queue(maxsize=1)
        self._done: queue.Queue = queue.Queue()
        self.busy = False
        self._thread = threading.Thread(target=self._work, name="inference", daemon=True)
        self._thread.start()

    def _work(self) -> None:
        while True:
            item = self._requests.get()
            if item is None:
                return
            chunk, obs = item
            try:
                chunk.actions = np.asarray(self.predictor.predict(obs), np.float32)
            except NonFiniteError as e:
                chunk.fault = str(e)
            except Exception as e:  # noqa: BLE001 - reported in the chunk, the loop goes on
                chunk.error = f"{type(e).__name__}: {e}"
            chunk.ready = self.clock.now()
            self._done.put(chunk)

    def submit(self, tick: int, obs: Mapping[str, np.ndarray]) -> None:
        if self.busy:
            raise RuntimeError("ThreadedInference: a request is already in flight")
        self.busy = True
        self._requests.put((Chunk(tick, self.clock.now()), dict(obs)))

    def poll(self, wait: bool = False) -> list[Chunk]:
        """Finished chunks; with `wait`, block until the request in flight is done."""
        out = []
        if wait and self.busy:
            out.append(self._done.get())
        while True:
            try:
                out.append(self._done.get_nowait())
            except queue.Empty:
                break
        if out:
            self.busy = False
        return out

    def close(self) -> None:
        """Wait for the request in flight (if any), then stop the worker."""
        self.poll(wait=True)
        self._requests.put(None)
        self._thread.join()


# ---------------------------------------------------------------------------------- action queue
def ensemble_weights(n: int, coeff: float) -> np.ndarray:
    """ACT's temporal-ensemble weights for n predictions, oldest first: exp(-coeff * i) / sum."""
    w = np.exp(-coeff * np.arange(n))
    return w / w.sum()


class ActionQueue:
    """Actions by tick. Receding horizon: a tick keeps the newest chunk's action; temporal
    ensembling: a tick keeps every chunk's prediction and pop() averages them (ACT weights)."""

    def __init__(self, ensemble_coeff: float | None = None) -> None:
        self.ensemble_coeff = ensemble_coeff
        self._slots: dict[int, list[np.ndarray]] = {}

    def clear(self) -> None:
        self._slots.clear()

    @property
    def last_tick(self) -> int:
        """Last tick with an action (-1 when empty)."""
        return max(self._slots, default=-1)

    def add(self, actions: np.ndarray, first_tick: int, now_tick: int) -> int:
        """actions [n, Da] for ticks first_tick ..; rows before now_tick are dropped.
        Returns the number of rows kept."""
        kept = 0
        for i, a in enumerate(actions):
            tick = first_tick + i
            if tick < now_tick:
                continue
            if self.ensemble_coeff is None:
                self._slots[tick] = [a]
            else:
                self._slots.setdefault(tick, []).append(a)
            kept += 1
        return kept

    def pop(self, tick: int) -> np.ndarray | None:
        """The action for `tick` (None if there is none); older ticks are discarded."""
        for t in [t for t in self._slots if t < tick]:
            del self._slots[t]
        preds = self._slots.pop(tick, None)
        if not preds:
            return None
        if self.ensemble_coeff is None:
            return preds[-1]
        w = ensemble_weights(len(preds), self.ensemble_coeff)
        return np.tensordot(w, np.stack(preds), axes=1)


# ---------------------------------------------------------------------------------- the loop
@dataclass
class LoopConfig:
    """rate: control rate (Hz). lead: control periods the policy has to answer (>= 1).
    n_action_steps: Ta, actions executed per chunk (receding horizon).
    ensemble_coeff: None for receding horizon, else ACT's temporal-ensembling coefficient."""

    rate: float = 10.0
    lead: int = 1
    n_action_steps: int = 8
    ensemble_coeff: float | None = None

    def __post_init__(self) -> None:
        if not self.rate > 0:
            raise ValueError(f"rate: expected > 0 Hz, got {self.rate}")
        if self.lead < 1:
            raise ValueError(f"lead: expected >= 1 control period, got {self.lead}")
        if self.n_action_steps < 1:
            raise ValueError(f"n_action_steps: expected >= 1, got {self.n_action_steps}")
        if self.ensemble_coeff is None and self.lead > self.n_action_steps:
            raise ValueError(f"lead: expected <= n_action_steps = {self.n_action_steps} (one "
                             f"request in flight at a time), got {self.lead}")


@dataclass
class LoopStats:
    """Per-run measurements (times in seconds)."""

    rate: float
    ticks: int = 0
    misses: int = 0
    elapsed: float = 0.0  # first to last tick wake-up, summed over episodes
    intervals: int = 0  # tick-to-tick intervals inside `elapsed`
    latencies: list[float] = field(default_factory=list)  # per chunk: ready - submitted
    margins: list[float] = field(default_factory=list)  # per chunk: needed - ready (< 0: late)
    lateness: list[float] = field(default_factory=list)  # per tick: wake-up - scheduled time
    errors: list[str] = field(default_factory=list)
    faults: list[str] = field(default_factory=list)  # non-finite observations and chunks
    scores: list[float] = field(default_factory=list)  # per episode (EpisodicRobot)
    sent: list[np.ndarray] = field(default_factory=list)  # actions sent, when recorded

    def summary(self) -> dict:
        """JSON-ready numbers: latency p50/p95/p99, margin, miss rate, achieved rate, score."""
        def pct(xs: list[float], q: float) -> float | None:
            return float(np.percentile(np.asarray(xs) * 1e3, q)) if xs else None

        return {
            "rate_hz": self.rate, "ticks": self.ticks, "deadline_misses": self.misses,
            "deadline_miss_rate": self.misses / max(self.ticks, 1),
            "achieved_hz": self.intervals / self.elapsed if self.elapsed > 0 else None,
            "chunks": len(self.latencies),
            "p50_ms": pct(self.latencies, 50), "p95_ms": pct(self.latencies, 95),
            "p99_ms": pct(self.latencies, 99),
            "margin_min_ms": min(self.margins) * 1e3 if self.margins else None,
            "margin_p50_ms": pct(self.margins, 50),
            "tick_late_p99_ms": pct(self.lateness, 99),
            "tick_late_max_ms": max(self.lateness) * 1e3 if self.lateness else None,
            "inference_errors": len(self.errors), "first_error": next(iter(self.errors), None),
            "faults": len(self.faults), "first_fault": next(iter(self.faults), None),
            "episodes": len(self.scores),
            "mean_score": float(np.mean(self.scores)) if self.scores else None,
            "scores": list(self.scores),
        }


def run_episode(
    robot: Robot,
    backend,
    cfg: LoopConfig,
    max_ticks: int,
    stats: LoopStats,
    clock: Clock | None = None,
    seed: int | None = None,
    progress: Callable[[int], None] | None = None,
    record: bool = False,
) -> None:
    """Reset the robot, compute the first chunk (not timed), then run ticks at cfg.rate until
    max_ticks or the robot's episode ends. `backend` has submit(tick, obs), poll(wait) and
    `busy` (ThreadedInference). Measurements are appended to `stats`. A non-finite observation
    or chunk counts a fault and is skipped (the robot holds its last action); before the first
    action there is none to hold, so a fault there raises NonFiniteError (nothing was sent)."""
    clock = clock or MonotonicClock()
    period = 1.0 / cfg.rate
    actions = ActionQueue(cfg.ensemble_coeff)
    span = cfg.n_action_steps if cfg.ensemble_coeff is None else None  # rows per chunk

    backend.poll(wait=True)  # a request left over from the previous episode is dropped
    robot.reset(seed)
    obs = robot.get_observation()
    if fault := _obs_fault(obs, 0):
        raise NonFiniteError(f"first observation: {fault}")
    backend.submit(0, obs)
    first = backend.poll(wait=True)[0]
    if first.error is not None:
        raise RuntimeError(f"first inference failed: {first.error}")
    if fault := _chunk_fault(first):
        raise NonFiniteError(f"first inference: {fault}")
    if len(first.actions) <= cfg.lead:
        raise ValueError(f"lead: expected < the chunk length {len(first.actions)}, "
                         f"got {cfg.lead}")
    actions.add(first.actions[:span], 0, 0)
    last = first.actions[0]

    t0 = clock.now()
    tick, woke = 0, t0
    while tick < max_ticks and not (isinstance(robot, EpisodicRobot) and robot.done):
        deadline = t0 + tick * period
        clock.sleep_until(deadline)
        woke = clock.now()
        stats.lateness.append(woke - deadline)
        for chunk in backend.poll():
            stats.latencies.append(chunk.ready - chunk.submitted)
            stats.margins.append(t0 + (chunk.obs_tick + cfg.lead) * period - chunk.ready)
            if chunk.error is not None:
                stats.errors.append(chunk.error)
                continue
            if fault := _chunk_fault(chunk):
                stats.faults.append(fault)
                continue
            rows = chunk.actions[cfg.lead : None if span is None else cfg.lead + span]
            actions.add(rows, chunk.obs_tick + cfg.lead, tick)
        obs = robot.get_observation()
        due = cfg.ensemble_coeff is not None or actions.last_tick < tick + cfg.lead
        if fault := _obs_fault(obs, tick):
            stats.faults.append(fault)  # not given to the policy; the queue runs on
        elif due and not backend.busy:
            backend.submit(tick, obs)
        action = actions.pop(tick)
        if action is None:
            stats.misses += 1
            action = last  # hold
        robot.send_action(action)
        if record:
            stats.sent.append(np.asarray(action))
        last = action
        tick += 1
        stats.ticks += 1
        if progress is not None:
            progress(1)
    stats.elapsed += woke - t0
    stats.intervals += max(tick - 1, 0)
    if isinstance(robot, EpisodicRobot) and robot.done:
        stats.scores.append(float(robot.score))


def _obs_fault(obs: Mapping[str, np.ndarray], tick: int) -> str | None:
    """Why an observation may not go to the policy (None: it is finite)."""
    bad = [k for k, v in obs.items() if not np.isfinite(v).all()]
    return f"tick {tick}: observation {bad} not finite" if bad else None


def _chunk_fault(chunk: Chunk) -> str | None:
    """Why a finished chunk may not be executed (None: it is finite); sets chunk.fault."""
    if chunk.fault is None and not np.isfinite(chunk.actions).all():
        chunk.fault = f"chunk from tick {chunk.obs_tick}: actions not finite"
    return chunk.fault


def run_realtime(
    robot: Robot,
    predictor: Predictor,
    cfg: LoopConfig,
    steps: int | None = None,
    episodes: int | None = None,
    seed: int = 100_000,
    clock: Clock | None = None,
    backend=None,
    progress: bool = True,
) -> LoopStats:
    """Run `steps` ticks (resetting the robot when an episode ends) or `episodes` whole episodes
    (seeds seed, seed + 1, ...); returns the measurements. `backend` defaults to a
    ThreadedInference over `predictor` (closed at the end)."""
    if (steps is None) == (episodes is None):
        raise ValueError(f"give exactly one of steps / episodes, got {steps=} {episodes=}")
    if episodes is not None and not isinstance(robot, EpisodicRobot):
        raise ValueError(f"episodes: {type(robot).__name__} does not report `done`; use steps")
    clock = clock or MonotonicClock()
    own = backend is None
    backend = backend or ThreadedInference(predictor, clock)
    stats = LoopStats(rate=cfg.rate)
    switch = sys.getswitchinterval()
    sys.setswitchinterval(min(switch, 1e-3))  # the tick thread gets the GIL back within ~1 ms
    bar = tqdm(total=steps, desc=f"control @ {cfg.rate:g} Hz", unit="tick", disable=not progress,
               leave=False)
    try:
        ep = 0
        while (steps is not None and stats.ticks < steps) or (episodes is not None
                                                                and ep < episodes):
            budget = steps - stats.ticks if steps is not None else 1 << 62
            run_episode(robot, backend, cfg, budget, stats, clock, seed + ep, bar.update)
            ep += 1
    finally:
        bar.close()
        sys.setswitchinterval(switch)
        if own:
            backend.close()
    return stats


