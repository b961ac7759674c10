"""Policy server: round trip equals local predict_action, malformed requests get errors naming the
key / expected / actual while the server keeps serving, the client survives a server restart."""

import json
import threading

import numpy as np
import pytest
import torch
import zmq

from drifting_policy.bench import build
from drifting_policy.rollout.realtime import LocalPredictor
from drifting_policy.serve import (
    PolicyClient,
    PolicyServer,
    ServerError,
    decode_obs,
    encode_obs,
)

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def predictor():
    torch.manual_seed(0)
    return LocalPredictor(build("drifting", "lowdim", "cpu"))


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
    batch = {"obs": torch.from_numpy(obs()["obs"])[None]}
    ref = predictor.policy.predict_action(batch, generator=torch.Generator().manual_seed(3))
    assert got.shape == (15, 2) and got.dtype == np.float32
    np.testing.assert_array_equal(got, ref["action_pred"][0, 1:].numpy())
    np.testing.assert_array_equal(got[:8], ref["action"][0].numpy())  # the Ta executed actions
    assert not np.array_equal(got, client.predict(obs(), seed=4))  # the seed is the noise
    client.close()


def raw_request(address, frames):
    sock = zmq.Context.instance().socket(zmq.REQ)
    sock.setsockopt(zmq.RCVTIMEO, 5000)
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
    meta = {"obs": {"image": {"shape": [3, 96, 96]}, "agent_pos": {"shape": [2]}}}
    good = {"image": np.zeros((2, 3, 96, 96), np.float32), "agent_pos": np.ones((2, 2), np.float32)}
    header, *bufs = encode_obs(good)
    out = decode_obs(json.loads(header), bufs, meta, n_obs_steps=2)
    np.testing.assert_array_equal(out["agent_pos"], good["agent_pos"])
    bad = {**good, "image": np.zeros((2, 96, 96, 3), np.float32)}
    header, *bufs = encode_obs(bad)
    with pytest.raises(ServerError, match=r"obs\['image'\]: expected shape \[2, 3, 96, 96\], "
                                          r"got \[2, 96, 96, 3\]"):
        decode_obs(json.loads(header), bufs, meta, n_obs_steps=2)


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
