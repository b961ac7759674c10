"""Real-time control: a policy drives a robot at a fixed rate, inference never blocks a tick.

    drifting-policy run --checkpoint DIR --rate 10 --episodes 3 --out DIR
    drifting-policy run --checkpoint DIR --rate 10 --steps 300 --server tcp://127.0.0.1:5555 ...
    drifting-policy run --checkpoint DIR --rate 10 --steps 300 --onnx policy.onnx ...

Timeline. Ticks are scheduled at t0 + k / rate (time.perf_counter; a late tick does not shift the
ones after it, so no drift accumulates). At tick k the loop (1) takes the chunks the inference
worker finished, (2) reads the robot's observation o_k ([To, ...] frames), (3) starts inference on
o_k if it is time, (4) sends the action scheduled for tick k. It never waits for inference.

Chunks are time-stamped. A predictor returns H actions for the ticks k, k + 1, ... of its
observation (row 0 = the policy's action index To - 1). Since an answer takes time, the chunk
from o_k is executed from tick k + lead on (rows lead .. lead + Ta - 1, receding horizon): the
policy has `lead` control periods to answer (default 1). Inference for the next chunk starts
when the queue holds no action past tick k + lead - 1, so each chunk executes Ta actions. Rows
of a chunk that arrives late are dropped for the ticks that have passed (as Diffusion Policy's
real-robot eval drops actions whose timestamps are past).

Deadline miss: a tick with no action scheduled for it (the chunk was late). The loop then HOLDS:
it re-sends the last action sent (for position targets such as PushT's, the robot stays put).

Temporal ensembling (ACT, Zhao et al. 2023): inference runs whenever the worker is idle, every
chunk contributes all its rows from `lead` on, and the action for tick k is the average of the
chunks' predictions for k with weights exp(-coeff * i), i = 0 for the oldest chunk.

Plug a real robot by implementing `Robot` (see docs/deployment.md); `GymRobot` turns any
gymnasium env (a task config's env) into one.
"""

from __future__ import annotations

import argparse
import json
import math
import queue
import sys
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np
import torch
from tqdm import tqdm

from drifting_policy.rollout.runner import EnvSpec, _make_env


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


class Predictor(Protocol):
    """A policy behind a call: observation frames in, time-stamped action chunk out."""

    n_obs_steps: int
    n_action_steps: int

    def predict(self, obs: Mapping[str, np.ndarray], seed: int | None = None) -> np.ndarray:
        """{key: [To, *shape]} -> actions [H, Da] for the observation's tick and the H - 1
        ticks after it. `seed` fixes the initial noise (None: the global RNG)."""


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


# ---------------------------------------------------------------------------------- robots
class GymRobot:
    """A gymnasium env as a robot (the simulator stands in for hardware).

    The env is built like the EnvRunner builds it (same wrappers), with Ta = 1: every
    `send_action` steps the env once, and `get_observation` returns the last To frames, padded
    with the first frame after reset (MultiStepWrapper). `score` is the episode's max reward.
    """

    def __init__(self, env: EnvSpec | Mapping, n_obs_steps: int) -> None:
        spec = env if isinstance(env, EnvSpec) else EnvSpec(**dict(env))
        self.env = _make_env(spec, n_obs_steps, 1)
        self.n_obs_steps = n_obs_steps
        self.done, self.score, self.info = True, 0.0, {}
        self._obs = None

    @classmethod
    def from_task(cls, task: Mapping) -> GymRobot:
        """The robot for a task config (task.env and task.n_obs_steps)."""
        return cls(dict(task["env"]), int(task["n_obs_steps"]))

    def reset(self, seed: int | None = None) -> None:
        self._obs, self.info = self.env.reset(seed=seed)
        self.done, self.score = False, 0.0

    def get_observation(self) -> dict[str, np.ndarray]:
        if self._obs is None:
            raise RuntimeError("GymRobot: call reset() before get_observation()")
        if isinstance(self._obs, Mapping):
            return {k: np.asarray(v, np.float32) for k, v in self._obs.items()}
        return {"obs": np.asarray(self._obs, np.float32)}

    def send_action(self, action: np.ndarray) -> None:
        if self.done:
            return  # the episode is over; further commands are ignored
        self._obs, reward, term, trunc, info = self.env.step(np.asarray(action)[None])
        self.score, self.info = float(reward), info  # MultiStepWrapper: max reward so far
        self.done = bool(term or trunc)

    def close(self) -> None:
        self.env.close()


# ---------------------------------------------------------------------------------- predictors
class LocalPredictor:
    """A ChunkPolicy in this process: predict() -> action_pred[0, To - 1:] ([T - To + 1, Da])."""

    def __init__(self, policy) -> None:
        self.policy = policy.eval()
        self.n_obs_steps = policy.n_obs_steps
        self.n_action_steps = policy.n_action_steps
        self.shape_meta = policy.shape_meta

    def predict(self, obs: Mapping[str, np.ndarray], seed: int | None = None) -> np.ndarray:
        device = self.policy.device
        batch = {k: torch.tensor(np.asarray(v), dtype=torch.float32, device=device)[None]
                 for k, v in obs.items()}
        gen = None
        if seed is not None:
            gen = torch.Generator(device=device).manual_seed(int(seed))
        with torch.inference_mode():
            pred = self.policy.predict_action(batch, generator=gen)["action_pred"]
        return pred[0, self.n_obs_steps - 1 :].float().cpu().numpy()


# ---------------------------------------------------------------------------------- inference
@dataclass
class Chunk:
    """One inference result. Times are Clock times (seconds)."""

    obs_tick: int
    submitted: float
    ready: float = math.nan
    actions: np.ndarray | None = None  # [H, Da]
    error: str | None = None


class ThreadedInference:
    """Runs predictor.predict in one worker thread (torch releases the GIL while it computes).

    submit() hands over an observation and returns at once; poll() returns the finished chunks.
    One request at a time: `busy` is True from submit() until poll() returned its chunk.
    A predictor error becomes a chunk with `error` set (the loop counts it and goes on).
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
    `busy` (ThreadedInference). Measurements are appended to `stats`."""
    clock = clock or MonotonicClock()
    period = 1.0 / cfg.rate
    actions = ActionQueue(cfg.ensemble_coeff)
    span = cfg.n_action_steps if cfg.ensemble_coeff is None else None  # rows per chunk

    backend.poll(wait=True)  # a request left over from the previous episode is dropped
    robot.reset(seed)
    backend.submit(0, robot.get_observation())
    first = backend.poll(wait=True)[0]
    if first.error is not None:
        raise RuntimeError(f"first inference failed: {first.error}")
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
            rows = chunk.actions[cfg.lead : None if span is None else cfg.lead + span]
            actions.add(rows, chunk.obs_tick + cfg.lead, tick)
        obs = robot.get_observation()
        due = cfg.ensemble_coeff is not None or actions.last_tick < tick + cfg.lead
        if due and not backend.busy:
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


# ---------------------------------------------------------------------------------- CLI
def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", type=Path, required=True, help="checkpoint directory")
    p.add_argument("--rate", type=float, default=10.0, help="control rate, Hz")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--steps", type=int, default=None, help="control ticks to run")
    g.add_argument("--episodes", type=int, default=None, help="whole episodes (default 1)")
    p.add_argument("--lead", type=int, default=1,
                   help="control periods the policy has to answer an observation")
    p.add_argument("--temporal-ensemble", action="store_true",
                   help="ACT temporal ensembling instead of receding horizon")
    p.add_argument("--ensemble-coeff", type=float, default=0.01, help="ACT's m in exp(-m i)")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--server", default=None,
                       help="policy server address (tcp://HOST:PORT); default: in-process policy")
    where.add_argument("--onnx", type=Path, default=None,
                       help="run an exported graph (drifting-policy export) with onnxruntime")
    p.add_argument("--timeout-ms", type=int, default=2000, help="server request timeout")
    p.add_argument("--seed", type=int, default=100_000, help="seed of the first episode")
    add_sampler_arguments(p)
    p.add_argument("--out", type=Path, required=True, help="writes OUT/run.json")


def load_predictor(checkpoint: Path, ema: bool = True, scheduler: str | None = None,
                   num_inference_steps: int | None = None, device: str = "cpu") -> LocalPredictor:
    """A checkpoint's policy as a LocalPredictor; diffusion checkpoints may switch sampler."""
    from drifting_policy.checkpoint import load_policy

    policy, config = load_policy(checkpoint, ema=ema, device=device)
    if scheduler or num_inference_steps:
        if not hasattr(policy, "set_inference"):
            raise ValueError("--scheduler/--num-inference-steps: only for diffusion checkpoints, "
                             f"got {config.policy._target_}")
        policy.set_inference(scheduler or "ddpm", num_inference_steps or 100)
    return LocalPredictor(policy)


def add_sampler_arguments(p: argparse.ArgumentParser) -> None:
    """Checkpoint options shared by `run` and `serve`."""
    p.add_argument("--scheduler", choices=["ddpm", "ddim"], default=None,
                   help="diffusion checkpoints: sampler")
    p.add_argument("--num-inference-steps", type=int, default=None,
                   help="diffusion checkpoints: sampler steps (e.g. 10 with --scheduler ddim)")
    p.add_argument("--no-ema", action="store_true", help="raw weights instead of the EMA")
    p.add_argument("--device", default="cpu")


def main(args: argparse.Namespace) -> int:
    from omegaconf import OmegaConf

    from drifting_policy.checkpoint import load_config

    config = load_config(args.checkpoint)
    task = OmegaConf.to_container(config.task, resolve=True)
    if args.server:
        from drifting_policy.serve import PolicyClient

        predictor = PolicyClient(args.server, timeout_ms=args.timeout_ms)
    elif args.onnx:
        from drifting_policy.export import OnnxPredictor

        predictor = OnnxPredictor(args.onnx)
    else:
        predictor = load_predictor(args.checkpoint, not args.no_ema, args.scheduler,
                                   args.num_inference_steps, args.device)
    cfg = LoopConfig(rate=args.rate, lead=args.lead, n_action_steps=predictor.n_action_steps,
                     ensemble_coeff=args.ensemble_coeff if args.temporal_ensemble else None)
    robot = GymRobot.from_task(task)
    episodes = args.episodes if args.steps is None else None
    try:
        stats = run_realtime(robot, predictor, cfg, steps=args.steps,
                             episodes=episodes or (1 if args.steps is None else None),
                             seed=args.seed)
    finally:
        robot.close()
    result = {**stats.summary(), "lead": cfg.lead, "n_action_steps": cfg.n_action_steps,
              "temporal_ensemble": cfg.ensemble_coeff, "checkpoint": str(args.checkpoint),
              "policy": config.policy._target_, "task": task["name"], "server": args.server,
              "onnx": None if args.onnx is None else str(args.onnx),
              "sampler": [args.scheduler, args.num_inference_steps]}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "run.json").write_text(json.dumps(result, indent=1))
    print(format_summary(result))
    print(f"wrote {args.out / 'run.json'}")
    return 0


def format_summary(r: Mapping) -> str:
    """One human-readable line per run."""
    def ms(x):
        return "-" if x is None else f"{x:.1f}"

    score = "" if r.get("mean_score") is None else f"  score {r['mean_score']:.3f}"
    return (f"{r['ticks']} ticks @ {r['rate_hz']:g} Hz (achieved {r['achieved_hz'] or 0:.2f}): "
            f"{r['deadline_misses']} deadline misses ({100 * r['deadline_miss_rate']:.1f}%), "
            f"inference p50/p95/p99 {ms(r['p50_ms'])}/{ms(r['p95_ms'])}/{ms(r['p99_ms'])} ms, "
            f"min margin {ms(r['margin_min_ms'])} ms{score}")
