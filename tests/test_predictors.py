"""One Predictor contract: the in-process, ONNX and served predictors return the same executable
horizon (T - To + 1 rows from index To - 1) for the same observation, seed and K, on a PushT-shaped
task and a Ta = 1 task (BlockPush: To/Ta/T = 3/1/12); the control loop executes the same actions
through each; nothing non-finite comes out of any of them."""

from __future__ import annotations

import json
import threading

import numpy as np
import pytest
import torch
import zmq
from deploy_helpers import (
    FakeClock,
    SimulatedInference,
    batched,
    observation,
    policy,
    write_task_checkpoint,
)

from drifting_policy.deploy.contract import NonFiniteError, check_obs, seeded_noise
from drifting_policy.deploy.control_loop import LoopConfig, LoopStats, run_episode
from drifting_policy.deploy.export import export_onnx
from drifting_policy.deploy.predictors import LocalPredictor, OnnxPredictor, PolicyClient
from drifting_policy.deploy.protocol import ServerError, reply
from drifting_policy.deploy.server import PolicyServer

pytestmark = pytest.mark.usefixtures("single_thread")


class Served:
    """A PolicyServer for `predictor` in a thread, and a client of it."""

    def __init__(self, predictor, **client):
        self.server = PolicyServer(predictor, "tcp://127.0.0.1:*")
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.server.serve, args=(self.stop, 20))
        self.thread.start()
        self.client = PolicyClient(self.server.address, timeout_ms=10000, **client)

    def close(self):
        self.client.close()
        self.stop.set()
        self.thread.join()
        self.server.close()


@pytest.fixture(scope="module", params=["pusht_lowdim", "blockpush"])
def three(request, tmp_path_factory):
    """(policy, {"local", "onnx", "served"} predictors) for a task."""
    p = policy(request.param)
    local = LocalPredictor(p)
    onnx = OnnxPredictor(export_onnx(p, tmp_path_factory.mktemp("onnx") / "policy.onnx"))
    served = Served(local)
    yield p, {"local": local, "onnx": onnx, "served": served.client}
    served.close()


def normalised(p, actions) -> torch.Tensor:
    return p.normalizer["action"].normalize(torch.as_tensor(np.asarray(actions)))


def test_predictors_describe_the_same_policy(three):
    p, predictors = three
    h = p.horizon - p.n_obs_steps + 1
    for name, pred in predictors.items():
        assert (pred.n_obs_steps, pred.n_action_steps, pred.horizon) == (
            p.n_obs_steps, p.n_action_steps, p.horizon), name
        assert pred.obs_shapes == {k: [p.n_obs_steps, *m["shape"]]
                                   for k, m in p.shape_meta["obs"].items()}, name
        assert pred.predict(observation(p)).shape == (h, p.action_dim), name


@pytest.mark.parametrize("k", [1, 3])
def test_same_seed_same_rows_from_every_predictor(three, k):
    p, predictors = three
    previous = None
    for seed in (0, 1, 2):
        obs = observation(p, seed)
        rows = {name: pred.predict(obs, seed=seed, n_samples=k)
                for name, pred in predictors.items()}
        # the reference: predict_action with a CPU generator of that seed, rows To - 1 ..
        ref = p.predict_action(batched(obs), n_samples=k,
                               generator=torch.Generator().manual_seed(seed))["action_pred"]
        ref = ref[0, p.n_obs_steps - 1 :]
        np.testing.assert_array_equal(rows["local"], ref.numpy())
        np.testing.assert_array_equal(rows["served"], rows["local"])  # same computation
        err = float((normalised(p, rows["onnx"]) - normalised(p, ref)).abs().max())
        assert err <= 1e-4, (seed, k, err)
        assert previous is None or not np.allclose(rows["local"], previous)  # seed = noise
        previous = rows["local"]


class ReplayRobot:
    """Observation at tick k: observation(p, seed=k); records nothing itself."""

    def __init__(self, p):
        self.p, self.count = p, 0

    def reset(self, seed=None):
        self.count = 0

    def get_observation(self):
        return observation(self.p, seed=self.count)

    def send_action(self, action):
        self.count += 1


def test_the_loop_executes_the_same_actions_through_every_predictor(three):
    """Fake clock at 100 Hz, lead 1, 9.5 ms latency, each request seeded with its tick: the loop
    executes rows 0 .. Ta - 1 of the first chunk, then, for j >= 1, rows 1 .. Ta of the chunk
    from obs tick j * Ta - 1 at ticks j * Ta .. j * Ta + Ta - 1 (Ta = 1 for BlockPush: row 1 of
    the previous tick's chunk). Every predictor must send the same actions."""
    p, predictors = three
    ta, ticks = p.n_action_steps, 24
    sent = {}
    for name, pred in predictors.items():
        clock, stats = FakeClock(), LoopStats(rate=100)
        backend = SimulatedInference(pred, clock, latency=0.0095, seeded=True)
        cfg = LoopConfig(rate=100, lead=1, n_action_steps=ta)
        run_episode(ReplayRobot(p), backend, cfg, ticks, stats, clock=clock, record=True)
        assert stats.misses == 0 and stats.faults == [] and stats.errors == [], name
        sent[name] = np.stack(stats.sent)
    np.testing.assert_array_equal(sent["served"], sent["local"])
    assert float((normalised(p, sent["onnx"]) - normalised(p, sent["local"])).abs().max()) <= 1e-4
    local = predictors["local"]
    for k in range(ticks):
        o = 0 if k < ta else (k // ta) * ta - 1
        expected = local.predict(observation(p, seed=o), seed=o)[k - o]
        np.testing.assert_array_equal(sent["local"][k], expected)


def test_seeded_noise_is_what_predict_action_draws():
    p = policy("blockpush")
    obs = batched(observation(p))
    noise = seeded_noise(7, 4, p.horizon, p.action_dim)
    cond = p._encode(p._check_obs(obs)).repeat_interleave(4, dim=0)
    from drifting_policy.policy.base import medoid

    chunks = p.sample(noise, cond).reshape(1, 4, p.horizon, p.action_dim)
    ref = p.normalizer["action"].unnormalize(medoid(chunks))
    got = p.predict_action(obs, generator=torch.Generator().manual_seed(7), n_samples=4)
    torch.testing.assert_close(got["action_pred"], ref, rtol=0, atol=0)
    torch.testing.assert_close(p.sample_chunks(obs, 4, torch.Generator().manual_seed(7)), chunks,
                               rtol=0, atol=0)


def test_seeded_noise_is_drawn_on_the_cpu_whatever_the_policy_device():
    """A GPU predictor must draw the same noise as the CPU / ONNX paths: LocalPredictor hands
    predict_action a CPU generator and the observation on the policy's device (here `meta`)."""
    p = policy("blockpush").to("meta")
    seen = []

    def capture(obs, generator=None, n_samples=1):
        seen.append((generator.device.type, {k: v.device.type for k, v in obs.items()},
                     torch.randn(2, generator=generator)))
        return {"action_pred": torch.zeros(1, p.horizon, p.action_dim)}

    p.predict_action = capture
    LocalPredictor(p).predict(observation(policy("blockpush")), seed=3)
    assert seen[0][:2] == ("cpu", {"obs": "meta"})
    torch.testing.assert_close(seen[0][2], torch.randn(2, generator=torch.Generator()
                                                       .manual_seed(3)))


def test_eval_executes_the_medoid_of_k_samples(tmp_path):
    """`drifting-policy eval --n-samples K` reaches predict_action through the runner."""
    from drifting_policy.eval import evaluate

    p = policy("pusht_lowdim")
    ckpt = write_task_checkpoint(tmp_path / "ckpt", "pusht_lowdim", p)
    asked, predict = [], p.predict_action

    def recording(obs, **kw):
        asked.append(kw.get("n_samples"))
        return predict(obs, **kw)

    p.predict_action = recording
    r = evaluate(ckpt, tmp_path / "eval", n_test=1, n_envs=1, n_videos=0, policy=p,
                 n_samples=3, progress=False)
    assert r["n_samples"] == 3 and len(asked) >= 10 and set(asked) == {3}
    assert json.loads((tmp_path / "eval" / "eval.json").read_text())["n_samples"] == 3


# ------------------------------------------------------------------------------ non-finite
def with_nan(obs, key=None):
    key = key or next(iter(obs))
    bad = {k: np.array(v, np.float32, copy=True) for k, v in obs.items()}
    bad[key].reshape(-1)[3] = np.nan
    return bad


def test_every_predictor_refuses_a_non_finite_observation(three):
    p, predictors = three
    obs = observation(p)
    key = next(iter(obs))
    for name in ("local", "onnx"):
        with pytest.raises(NonFiniteError, match=rf"obs\['{key}'\]: expected finite values, "
                                                 r"got 1 NaN/inf"):
            predictors[name].predict(with_nan(obs))
    with pytest.raises(ServerError, match=rf"obs\['{key}'\]: expected finite values"):
        predictors["served"].predict(with_nan(obs))
    assert np.isfinite(predictors["served"].predict(obs)).all()  # the server goes on


def test_every_predictor_refuses_a_non_finite_answer(tmp_path):
    p = policy("blockpush")
    p.normalizer["action"].offset.data[0] = float("nan")  # unnormalise -> NaN actions
    obs = observation(p)
    local = LocalPredictor(p)
    with pytest.raises(NonFiniteError, match=r"the policy's actions: expected finite values, "
                                             r"got 10 NaN/inf of 20"):
        local.predict(obs)
    onnx = OnnxPredictor(export_onnx(p, tmp_path / "nan.onnx"))
    with pytest.raises(NonFiniteError, match="the graph's actions: expected finite values"):
        onnx.predict(obs)
    served = Served(local)
    try:
        with pytest.raises(ServerError, match="NonFiniteError: .*the policy's actions"):
            served.client.predict(obs)
    finally:
        served.close()


def test_the_client_checks_what_a_server_sends():
    """A server that is not ours answers NaN actions: the client refuses them."""
    sock = zmq.Context.instance().socket(zmq.REP)
    sock.setsockopt(zmq.LINGER, 0)
    sock.bind("tcp://127.0.0.1:*")
    address = sock.getsockopt(zmq.LAST_ENDPOINT).decode()
    meta = {"ok": True, "shape_meta": {"obs": {"obs": {"shape": [3]}}, "action": {"shape": [2]}},
            "n_obs_steps": 2, "n_action_steps": 1, "horizon": 4, "n_samples": 1}
    actions = np.ones((3, 2), np.float32)
    actions[1, 0] = np.inf

    def answer():  # the meta request, then one predict request
        sock.recv_multipart()
        sock.send_multipart(reply(meta))
        sock.recv_multipart()
        sock.send_multipart(reply({"ok": True, "dtype": "float32", "shape": [3, 2]}, actions))

    thread = threading.Thread(target=answer)
    thread.start()
    client = PolicyClient(address, timeout_ms=5000)
    try:
        with pytest.raises(NonFiniteError, match=r"the server's actions: expected finite values, "
                                                 r"got 1 NaN/inf of 6"):
            client.predict({"obs": np.zeros((2, 3), np.float32)})
    finally:
        thread.join()
        client.close()
        sock.close()


def test_check_obs_names_the_key_the_expected_and_the_actual():
    shapes = {"obs": [2, 3]}
    with pytest.raises(ValueError, match=r"obs: expected keys \['obs'\], got \['state'\]"):
        check_obs({"state": np.zeros((2, 3))}, shapes)
    with pytest.raises(ValueError, match=r"obs\['obs'\]: expected shape \[2, 3\], got \[3, 3\]"):
        check_obs({"obs": np.zeros((3, 3))}, shapes)
    with pytest.raises(NonFiniteError, match=r"got 2 NaN/inf of 6 \(shape \[2, 3\]\)"):
        check_obs({"obs": np.array([[0, np.inf, 0], [np.nan, 0, 0]])}, shapes)
    assert check_obs({"obs": np.zeros((2, 3), np.float64)}, shapes)["obs"].dtype == np.float32


# ------------------------------------------------------------------------------ compiled path
@pytest.mark.slow
def test_compiled_predictor_matches_the_eager_one():
    """torch.compile (inductor, CPU) of the one-step graph returns the eager rows for the same
    seed and K; on a GPU mode="reduce-overhead" takes the same path with CUDA graphs."""
    p = policy("pusht_lowdim")
    eager, compiled = LocalPredictor(p), LocalPredictor(p, compile="default")
    for seed, k in ((0, 1), (1, 1), (2, 4)):
        obs = observation(p, seed)
        got = compiled.predict(obs, seed=seed, n_samples=k)
        ref = eager.predict(obs, seed=seed, n_samples=k)
        assert float((normalised(p, got) - normalised(p, ref)).abs().max()) <= 1e-4


def test_compile_rejects_a_diffusion_policy_and_an_unknown_mode():
    with pytest.raises(ValueError, match="only the one-step DriftingPolicy"):
        LocalPredictor(policy("blockpush", kind="diffusion"), compile="default")
    with pytest.raises(ValueError, match=r"compile: expected one of \('default', "
                                         r"'reduce-overhead'\) or None, got 'fast'"):
        LocalPredictor(policy("blockpush"), compile="fast")
