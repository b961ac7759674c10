"""Real-time loop: deadline misses and action timing against hand-worked timelines (fake clock),
ticks that never wait for a slow policy (real threads), ACT ensembling, GymRobot episodes."""

import json
import math
import threading
import time

import numpy as np
import pytest
from deploy_helpers import FakeClock, SimulatedInference, policy, write_task_checkpoint

from drifting_policy.deploy.contract import NonFiniteError
from drifting_policy.deploy.control_loop import (
    ActionQueue,
    LoopConfig,
    LoopStats,
    ThreadedInference,
    ensemble_weights,
    run_episode,
    run_realtime,
)
from drifting_policy.deploy.robot import GymRobot
from drifting_policy.rollout.runner import EnvSpec


class TickRobot:
    """Observation = the number of actions received so far (= the current tick)."""

    def __init__(self):
        self.count = 0

    def reset(self, seed=None):
        self.count = 0

    def get_observation(self):
        return {"obs": np.full((2, 1), self.count, np.float32)}

    def send_action(self, action):
        self.count += 1


class LabelPredictor:
    """Row j of the chunk for observation tick o is the action [o, j]."""

    n_obs_steps, n_action_steps = 2, 2

    def __init__(self, horizon=8, sleep=0.0):
        self.horizon, self.sleep = horizon, sleep

    def predict(self, obs, seed=None):
        if self.sleep:
            time.sleep(self.sleep)
        o = float(obs["obs"][-1, 0])
        return np.array([[o, j] for j in range(self.horizon)], np.float32)


def simulate(rate, latency, n_action_steps, lead, ticks, horizon=8, ensemble=None):
    clock = FakeClock()
    stats = LoopStats(rate=rate)
    cfg = LoopConfig(rate=rate, lead=lead, n_action_steps=n_action_steps,
                     ensemble_coeff=ensemble)
    backend = SimulatedInference(LabelPredictor(horizon), clock, latency)
    run_episode(TickRobot(), backend, cfg, ticks, stats, clock=clock, record=True)
    return stats, [tuple(a) for a in stats.sent]


def test_slow_policy_at_100hz_misses_every_tick_after_the_first_chunk():
    # 30.5 ms > one 10 ms period: chunk from obs tick 1 is ready at 40.5 ms (tick 5), its rows
    # for ticks 2, 3 have passed; the loop holds [0, 1] and relaunches each time it is idle.
    stats, sent = simulate(rate=100, latency=0.0305, n_action_steps=2, lead=1, ticks=20)
    assert stats.ticks == 20 and stats.misses == 18
    assert sent[:2] == [(0, 0), (0, 1)] and set(sent[2:]) == {(0, 1)}  # hold the last action
    assert len(stats.latencies) == 4  # obs ticks 1, 5, 9, 13 answered; 17 still in flight
    assert stats.margins[0] == pytest.approx(0.020 - 0.0405)  # needed at tick 2, ready 40.5 ms
    assert stats.lateness == [0.0] * 20
    assert stats.intervals / stats.elapsed == pytest.approx(100.0)


def test_lead_hides_latency_and_chunks_are_executed_at_their_ticks():
    # lead 3 periods > 29.5 ms latency: inference starts at tick 1, 5, 9 (queue ends 3 ticks
    # ahead); the chunk from obs tick o runs its rows (k - o) at ticks k = o + 3 .. o + 6.
    stats, sent = simulate(rate=100, latency=0.0295, n_action_steps=4, lead=3, ticks=16)
    assert stats.misses == 0
    expected = [(0, k) for k in range(4)]
    for o in (1, 5, 9):
        expected += [(o, k - o) for k in range(o + 3, o + 7)]
    assert sent == expected
    assert all(m == pytest.approx(0.0005) for m in stats.margins)


def test_one_miss_per_chunk_when_latency_just_exceeds_the_lead():
    # 30.5 ms with lead 3: each chunk lands just after its first tick, which is dropped and missed
    stats, sent = simulate(rate=100, latency=0.0305, n_action_steps=4, lead=3, ticks=16)
    assert stats.misses == 3  # ticks 4, 8, 12
    assert sent[4] == sent[3] and sent[5] == (1, 4)


def test_temporal_ensemble_averages_overlapping_chunks_with_act_weights():
    w = ensemble_weights(3, 0.5)
    hand = np.array([1.0, math.exp(-0.5), math.exp(-1.0)])
    np.testing.assert_allclose(w, hand / hand.sum())
    q = ActionQueue(ensemble_coeff=0.5)
    a, b, c = (np.arange(8, dtype=float).reshape(4, 2) + s for s in (0.0, 10.0, 100.0))
    q.add(a, first_tick=0, now_tick=0)  # oldest: ticks 0..3
    q.add(b, first_tick=1, now_tick=0)  # ticks 1..4
    q.add(c, first_tick=2, now_tick=2)  # ticks 2..5
    np.testing.assert_allclose(q.pop(2), w[0] * a[2] + w[1] * b[1] + w[2] * c[0])
    w2 = ensemble_weights(2, 0.5)
    np.testing.assert_allclose(q.pop(4), w2[0] * b[3] + w2[1] * c[2])  # tick 3 discarded
    assert q.pop(4) is None and q.last_tick == 5


def test_receding_queue_replaces_and_drops_past_rows():
    q = ActionQueue()
    assert q.add(np.ones((4, 2)), first_tick=0, now_tick=2) == 2  # ticks 0, 1 have passed
    q.add(np.full((2, 2), 7.0), first_tick=3, now_tick=2)
    np.testing.assert_array_equal(q.pop(3), [7, 7])
    assert q.pop(2) is None  # older than the last pop


def test_ensembled_loop_runs_inference_whenever_idle():
    stats, sent = simulate(rate=100, latency=0.0095, n_action_steps=2, lead=1, ticks=10,
                           ensemble=0.01)
    assert stats.misses == 0 and len(stats.latencies) == 9  # one request per tick
    # tick 2: the warm-start chunk and the one launched at tick 0 (both obs 0, row 2), then the
    # one launched at tick 1 (obs 1, row 1), oldest first
    w = ensemble_weights(3, 0.01)
    assert sent[2] == pytest.approx((w[2] * 1, (w[0] + w[1]) * 2 + w[2] * 1))


def test_config_rejects_bad_values():
    with pytest.raises(ValueError, match="lead"):
        LoopConfig(lead=0)
    with pytest.raises(ValueError, match="lead: expected <= n_action_steps = 2"):
        LoopConfig(lead=3, n_action_steps=2)
    with pytest.raises(ValueError, match="rate"):
        LoopConfig(rate=0)


def test_ticks_keep_their_period_while_a_slow_policy_computes():
    """Real threads and clock: a 150 ms policy at 50 Hz does not delay the 20 ms ticks."""
    predictor = LabelPredictor(sleep=0.15)
    cfg = LoopConfig(rate=50, lead=1, n_action_steps=2)
    t0 = time.perf_counter()
    stats = run_realtime(TickRobot(), predictor, cfg, steps=25, progress=False)
    wall = time.perf_counter() - t0
    assert max(stats.lateness) < 0.08  # a blocked tick would be >= 130 ms late
    assert stats.elapsed == pytest.approx(24 * 0.02, abs=0.08)
    assert stats.misses >= 15 and stats.latencies and min(stats.latencies) >= 0.15
    assert wall < 0.15 + 0.5 + 0.3 + 0.5  # first chunk + 25 ticks + in-flight request + slack


def test_predictor_errors_are_counted_and_the_loop_goes_on():
    class Flaky(LabelPredictor):
        calls = 0

        def predict(self, obs, seed=None):
            Flaky.calls += 1
            if Flaky.calls == 2:
                raise RuntimeError("camera unplugged")
            return super().predict(obs)

    backend = ThreadedInference(Flaky())
    stats = LoopStats(rate=100)
    cfg = LoopConfig(rate=100, lead=1, n_action_steps=2)
    run_episode(TickRobot(), backend, cfg, 12, stats)
    backend.close()
    assert stats.errors == ["RuntimeError: camera unplugged"]
    assert stats.ticks == 12


def test_gym_robot_keeps_the_obs_history_and_counts_episodes():
    spec = EnvSpec(id="PushT-v0", kwargs={"obs_type": "keypoints"},
                   max_steps=3)
    robot = GymRobot(spec, n_obs_steps=2)
    robot.reset(seed=100000)
    first = robot.get_observation()["obs"]
    assert first.shape == (2, 20) and np.array_equal(first[0], first[1])  # padded
    robot.send_action(np.array([256.0, 256.0]))
    obs = robot.get_observation()["obs"]
    np.testing.assert_array_equal(obs[0], first[1])  # shifted by one frame

    class Hold:
        n_obs_steps, n_action_steps = 2, 2

        def predict(self, obs, seed=None):
            return np.repeat(obs["obs"][-1:, 18:20], 4, axis=0)  # stay at the agent position

    stats = run_realtime(robot, Hold(), LoopConfig(rate=200, n_action_steps=2), episodes=2,
                         progress=False)
    robot.close()
    assert len(stats.scores) == 2 and stats.ticks == 6  # 3 steps per episode
    assert all(0.0 <= s <= 1.0 for s in stats.scores)


class Poisoned(LabelPredictor):
    """LabelPredictor whose chunk for the observation ticks in `bad` is all NaN."""

    def __init__(self, bad):
        super().__init__()
        self.bad = bad

    def predict(self, obs, seed=None):
        rows = super().predict(obs)
        return rows * np.nan if int(obs["obs"][-1, 0]) in self.bad else rows


class NanAt(TickRobot):
    """TickRobot whose observation at the ticks in `bad` holds NaN."""

    def __init__(self, bad):
        super().__init__()
        self.bad = bad

    def get_observation(self):
        obs = super().get_observation()
        if self.count in self.bad:
            obs["obs"][0, 0] = np.nan
        return obs


@pytest.mark.parametrize("where", ["observation", "chunk"])
def test_a_non_finite_observation_or_chunk_is_a_fault_and_the_robot_holds(where):
    # Ta 2, lead 1, 9.5 ms at 100 Hz: chunks from obs ticks 0, 1, 3, 5, ...; the one from obs
    # tick 3 is lost (its observation or its chunk holds NaN), so tick 4 holds (1, 2); the
    # observation of tick 4 is used at once and its chunk runs from tick 5
    clock, stats = FakeClock(), LoopStats(rate=100)
    robot = NanAt({3}) if where == "observation" else TickRobot()
    predictor = Poisoned({3} if where == "chunk" else set())
    backend = SimulatedInference(predictor, clock, latency=0.0095)
    run_episode(robot, backend, LoopConfig(rate=100, lead=1, n_action_steps=2), 9, stats,
                clock=clock, record=True)
    sent = [tuple(a) for a in stats.sent]
    assert sent == [(0, 0), (0, 1), (1, 1), (1, 2), (1, 2), (4, 1), (4, 2), (6, 1), (6, 2)]
    assert np.isfinite(np.stack(stats.sent)).all()
    expected = ("tick 3: observation ['obs'] not finite" if where == "observation"
                else "chunk from tick 3: actions not finite")
    assert stats.faults == [expected] and stats.misses == 1 and stats.errors == []
    assert stats.summary()["faults"] == 1 and stats.summary()["first_fault"] == expected


def test_a_predictor_refusing_its_answer_as_non_finite_is_a_fault():
    class Refuses(LabelPredictor):
        calls = 0

        def predict(self, obs, seed=None):
            Refuses.calls += 1
            if Refuses.calls == 2:
                raise NonFiniteError("predictor: the policy's actions: expected finite values")
            return super().predict(obs)

    backend = ThreadedInference(Refuses())
    stats = LoopStats(rate=100)
    run_episode(TickRobot(), backend, LoopConfig(rate=100, lead=1, n_action_steps=2), 12, stats,
                record=True)
    backend.close()
    assert stats.faults == ["predictor: the policy's actions: expected finite values"]
    assert stats.errors == [] and stats.ticks == 12 and np.isfinite(np.stack(stats.sent)).all()


def test_nothing_is_sent_when_the_first_observation_or_chunk_is_not_finite():
    for robot, predictor, message in (
            (NanAt({0}), LabelPredictor(), r"first observation: tick 0: observation \['obs'\]"),
            (TickRobot(), Poisoned({0}), "first inference: chunk from tick 0: actions not finite")):
        clock, stats = FakeClock(), LoopStats(rate=100)
        backend = SimulatedInference(predictor, clock, latency=0.001)
        with pytest.raises(NonFiniteError, match=message):
            run_episode(robot, backend, LoopConfig(rate=100, lead=1, n_action_steps=2), 5, stats,
                        clock=clock, record=True)
        assert robot.count == 0 and stats.sent == []


def test_run_cli_in_process_through_a_server_and_with_onnxruntime(tmp_path):
    from drifting_policy import cli
    from drifting_policy.deploy.export import export_onnx
    from drifting_policy.deploy.predictors import LocalPredictor
    from drifting_policy.deploy.server import PolicyServer

    p = policy("pusht_lowdim")
    ckpt = write_task_checkpoint(tmp_path / "ckpt", "pusht_lowdim", p)
    server = PolicyServer(LocalPredictor(p), "tcp://127.0.0.1:*")
    stop = threading.Event()
    thread = threading.Thread(target=server.serve, args=(stop, 20))
    thread.start()
    try:
        onnx = str(export_onnx(p, tmp_path / "policy.onnx"))
        for name, extra in (("local", []), ("served", ["--server", server.address]),
                            ("onnx", ["--onnx", onnx]),
                            ("served_k3", ["--server", server.address, "--n-samples", "3"]),
                            ("onnx_k3", ["--onnx", onnx, "--n-samples", "3"])):
            argv = ["run", "--checkpoint", str(ckpt), "--rate", "20", "--steps", "12",
                    "--warmup", "1", "--out", str(tmp_path / name), *extra]
            assert cli.main(argv) == 0
            r = json.loads((tmp_path / name / "run.json").read_text())
            assert r["ticks"] == 12 and r["rate_hz"] == 20 and r["inference_errors"] == 0
            assert r["chunks"] >= 1 and r["p99_ms"] > 0 and r["task"] == "pusht_lowdim"
            assert r["faults"] == 0 and r["n_samples"] == (3 if name.endswith("k3") else 1)
    finally:
        stop.set()
        thread.join()
        server.close()
    assert server.served >= 4  # warm-up, the warm-start chunk and at least one timed one


def test_run_cli_executes_a_one_action_chunk_task_through_onnx(tmp_path):
    """BlockPush (To/Ta/T = 3/1/12): the graph returns the executable horizon (10 rows), so the
    loop executes one action per chunk (an ONNX predictor returning Ta = 1 row had none)."""
    from drifting_policy import cli
    from drifting_policy.deploy.export import export_onnx

    p = policy("blockpush")
    ckpt = write_task_checkpoint(tmp_path / "ckpt", "blockpush_lowdim", p)
    onnx = str(export_onnx(p, tmp_path / "policy.onnx"))
    for name, extra in (("local", []), ("onnx", ["--onnx", onnx])):
        argv = ["run", "--checkpoint", str(ckpt), "--rate", "20", "--steps", "8", "--warmup", "1",
                "--out", str(tmp_path / name), *extra]
        assert cli.main(argv) == 0
        r = json.loads((tmp_path / name / "run.json").read_text())
        assert r["ticks"] == 8 and r["n_action_steps"] == 1 and r["inference_errors"] == 0
        assert r["chunks"] >= 1 and r["faults"] == 0 and r["task"] == "blockpush_lowdim"
