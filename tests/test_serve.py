"""Policy server: round trip equals local predict_action, malformed or non-finite requests get
errors naming the key / expected / actual while the server keeps serving, per-request K, the client
survives a server restart, and `drifting-policy serve` answers a NaN observation with an error."""

import json
import os
import socket
import subprocess
import sys
import threading

import numpy as np
import pytest
import torch
import zmq
from deploy_helpers import batched, policy

from drifting_policy.deploy.predictors import LocalPredictor, PolicyClient
from drifting_policy.deploy.protocol import MAX_SAMPLES, ServerError, decode_obs, encode_obs
from drifting_policy.deploy.server import PolicyServer

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def predictor():
    return LocalPredictor(policy("pusht_lowdim"))


class Running:
    """A PolicyServer serving in a thread until stop()."""

    def __init__(self, predictor, bind="tcp://127.0.0.1:*"):
        self.server = PolicyServer(predictor, bind)
        self.address = self.server.address
        self.event = threading.Event()
        self.thread = threading.Thread(target=self.server.serve, args=(self.event, 20))
        self.thread.start()

    def stop(self):
        self.event.set()
        self.thread.join()
        self.server.close()


@pytest.fixture()
def server(predictor):
    running = Running(predictor)
    yield running
    running.stop()


def obs(seed=0):
    return {"obs": np.random.default_rng(seed).uniform(0, 512, (2, 20)).astype(np.float32)}


def test_round_trip_equals_local_predict_action(server, predictor):
    client = PolicyClient(server.address, timeout_ms=5000)
    assert (client.n_obs_steps, client.n_action_steps, client.horizon) == (2, 8, 16)
    got = client.predict(obs(), seed=3)
    ref = predictor.policy.predict_action(batched(obs()),
                                          generator=torch.Generator().manual_seed(3))
    assert got.shape == (15, 2) and got.dtype == np.float32
    np.testing.assert_array_equal(got, ref["action_pred"][0, 1:].numpy())
    np.testing.assert_array_equal(got[:8], ref["action"][0].numpy())  # the Ta executed actions
    assert not np.array_equal(got, client.predict(obs(), seed=4))  # the seed is the noise
    client.close()


def raw_request(address, frames, timeout_ms=5000):
    sock = zmq.Context.instance().socket(zmq.REQ)
    sock.setsockopt(zmq.RCVTIMEO, timeout_ms)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(address)
    sock.send_multipart(frames)
    reply = sock.recv_multipart()
    sock.close()
    return json.loads(reply[0]), reply[1:]


@pytest.mark.parametrize("frames, message", [
    (encode_obs({"state": obs()["obs"]}), "obs: expected keys ['obs'], got ['state']"),
    (encode_obs({"obs": obs()["obs"][:, :19]}),
     "obs['obs']: expected shape [2, 20], got [2, 19]"),
    (encode_obs({"obs": obs()["obs"].astype(np.float64)}),
     "obs['obs']: expected dtype float32, got float64"),
    ([b"\xff\x00garbage"],
     "header: expected a JSON object, got undecodable bytes (UnicodeDecodeError)"),
    ([b"[1, 2]"], "header: expected a JSON object, got list"),
    ([b'{"cmd": "fly"}'], "header['cmd']: expected 'predict' or 'meta', got 'fly'"),
    (encode_obs(obs())[:1],
     "request: expected 1 buffers after the header (one per obs key), got 0"),
    (encode_obs(obs())[:1] + [b"1234"], "obs['obs']: expected 160 bytes (float32 [2, 20]), got 4"),
    (encode_obs({"obs": np.full((2, 20), np.nan, np.float32)}),
     "obs['obs']: expected finite values, got 40 NaN/inf of 40 (shape [2, 20])"),
    (encode_obs({"obs": np.where(np.arange(40).reshape(2, 20) == 7, np.inf,
                                 obs()["obs"]).astype(np.float32)}),
     "obs['obs']: expected finite values, got 1 NaN/inf of 40 (shape [2, 20])"),
    (encode_obs(obs(), n_samples=0),
     f"header['n_samples']: expected an integer in 1..{MAX_SAMPLES} or null, got 0"),
    (encode_obs(obs(), n_samples=MAX_SAMPLES + 1),
     f"header['n_samples']: expected an integer in 1..{MAX_SAMPLES} or null, got "
     f"{MAX_SAMPLES + 1}"),
    ([json.dumps({"cmd": "predict", "seed": True, "obs": {}}).encode()],
     "header['seed']: expected an integer or null, got True"),
])
def test_bad_requests_get_clear_errors_and_the_server_keeps_serving(server, frames, message):
    header, rest = raw_request(server.address, frames)
    assert header == {"ok": False, "error": message} and rest == []
    header, (payload,) = raw_request(server.address, encode_obs(obs(), seed=1))
    assert header["ok"] and header["shape"] == [15, 2] and len(payload) == 15 * 2 * 4


def test_client_raises_the_server_error(server):
    client = PolicyClient(server.address)
    with pytest.raises(ServerError, match=r"obs\['obs'\]: expected shape \[2, 20\], got \[3, 20\]"):
        client.predict({"obs": np.zeros((3, 20), np.float32)})
    assert client.predict(obs()).shape == (15, 2)  # the same client goes on
    client.close()


def test_image_requests_are_checked_per_key():
    shapes = {"image": [2, 3, 96, 96], "agent_pos": [2, 2]}
    good = {"image": np.zeros((2, 3, 96, 96), np.float32), "agent_pos": np.ones((2, 2), np.float32)}
    header, *bufs = encode_obs(good)
    out = decode_obs(json.loads(header), bufs, shapes)
    np.testing.assert_array_equal(out["agent_pos"], good["agent_pos"])
    bad = {**good, "image": np.zeros((2, 96, 96, 3), np.float32)}
    header, *bufs = encode_obs(bad)
    with pytest.raises(ServerError, match=r"obs\['image'\]: expected shape \[2, 3, 96, 96\], "
                                          r"got \[2, 96, 96, 3\]"):
        decode_obs(json.loads(header), bufs, shapes)


def test_client_times_out_while_the_server_is_down_and_recovers_after_restart(predictor):
    first = Running(predictor)
    address = first.address  # tcp://127.0.0.1:<port>, reused by the restarted server
    client = PolicyClient(address, timeout_ms=300, retries=0)
    before = client.predict(obs(), seed=5)
    first.stop()
    with pytest.raises(TimeoutError, match="no reply within 300 ms"):
        client.predict(obs(), seed=5)
    second = Running(predictor, bind=address)
    try:
        np.testing.assert_array_equal(client.predict(obs(), seed=5), before)
    finally:
        second.stop()
        client.close()


def test_per_request_n_samples_is_the_medoid_of_k_chunks(server, predictor):
    client = PolicyClient(server.address, timeout_ms=5000, n_samples=4)
    assert client.n_samples == 4
    got = client.predict(obs(), seed=9)
    ref = predictor.policy.predict_action(batched(obs()), n_samples=4,
                                          generator=torch.Generator().manual_seed(9))
    np.testing.assert_array_equal(got, ref["action_pred"][0, 1:].numpy())
    np.testing.assert_array_equal(client.predict(obs(), seed=9, n_samples=1),
                                  predictor.predict(obs(), seed=9))
    client.close()
    default = PolicyClient(server.address, timeout_ms=5000)
    assert default.n_samples == 1  # the server's default (its predictor's)
    default.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_serve_cli_answers_a_nan_observation_with_an_error(tmp_path):
    """The contract from outside: `drifting-policy serve --checkpoint DIR --bind ...` refuses a
    predict request whose observation holds NaN ({"ok": false, "error": ...}) and goes on."""
    p = policy("pusht_lowdim")
    p.save_pretrained(tmp_path / "policy")
    address = f"tcp://127.0.0.1:{free_port()}"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "drifting_policy.cli", "serve", "--checkpoint",
                             str(tmp_path / "policy"), "--bind", address, "--device", "cpu"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        lines = []
        for line in proc.stdout:  # "serving ..." is printed once warmed up and bound
            lines.append(line)
            if line.startswith("serving"):
                break
        assert lines and lines[-1].startswith("serving"), "".join(lines)
        bad = obs()
        bad["obs"][1, 4] = np.nan
        header, rest = raw_request(address, encode_obs(bad, seed=0), timeout_ms=30000)
        assert header == {"ok": False, "error": "obs['obs']: expected finite values, got 1 "
                                                "NaN/inf of 40 (shape [2, 20])"} and rest == []
        header, (payload,) = raw_request(address, encode_obs(obs(), seed=0), timeout_ms=30000)
        assert header["ok"] and header["shape"] == [15, 2]
        np.testing.assert_array_equal(np.frombuffer(payload, np.float32).reshape(15, 2),
                                      LocalPredictor(p).predict(obs(), seed=0))
    finally:
        proc.terminate()
        out = proc.communicate(timeout=60)[0]
    assert proc.returncode == 0 and "served 1 requests, refused 1" in out
