"""A policy behind ZeroMQ: `drifting-policy serve --checkpoint DIR [--bind tcp://127.0.0.1:5555]`.

Protocol (REQ/REP, multipart; no pickle, no msgpack):

    request   [JSON header, buffer_1, ..., buffer_n]
              header {"cmd": "predict", "obs": {key: {"dtype": "float32", "shape": [To, *shape]}},
                      "seed": int | null}
              buffer_i: the raw C-order bytes of the i-th key of header["obs"]
              header {"cmd": "meta"}   -> the policy's shape_meta, To, Ta, horizon
    reply     [{"ok": true, "dtype": "float32", "shape": [H, Da], "seconds": s}, actions bytes]
              or [{"ok": false, "error": "obs['obs']: expected shape [2, 20], got [2, 19]"}]

The actions are the chunk for the observation's tick and the H - 1 ticks after it
(action_pred[0, To - 1:], H = horizon - To + 1), as `LocalPredictor.predict` returns them.
Every request gets an answer: a malformed one gets an error naming the key, what was expected
and what came; the server goes on serving. `PolicyClient` has `LocalPredictor`'s interface and
reconnects after a timeout (a REQ socket cannot be reused once a reply is lost).
"""

from __future__ import annotations

import argparse
import json
import signal
import threading
import time
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import zmq

DEFAULT_BIND = "tcp://127.0.0.1:5555"


class ServerError(ValueError):
    """The server refused a request (the message says why)."""


# ---------------------------------------------------------------------------------- encoding
def encode_obs(obs: Mapping[str, np.ndarray], seed: int | None = None) -> list[bytes]:
    """{key: array} -> [header, buffers...] of a predict request."""
    arrays = {k: np.ascontiguousarray(v) for k, v in obs.items()}
    spec = {k: {"dtype": a.dtype.name, "shape": list(a.shape)} for k, a in arrays.items()}
    header = {"cmd": "predict", "seed": seed, "obs": spec}
    return [json.dumps(header).encode(), *(a.tobytes() for a in arrays.values())]


def _reply(header: Mapping, payload: np.ndarray | None = None) -> list[bytes]:
    frames = [json.dumps(header).encode()]
    if payload is not None:
        frames.append(np.ascontiguousarray(payload).tobytes())
    return frames


def _error(message: str) -> list[bytes]:
    return _reply({"ok": False, "error": message})


def decode_obs(header: Mapping, buffers: list[bytes], shape_meta: Mapping,
               n_obs_steps: int) -> dict[str, np.ndarray]:
    """Check a predict request against the policy's shape_meta and rebuild the arrays
    ({key: float32 [To, *shape]}); raises ServerError naming key, expected and actual."""
    spec = header.get("obs")
    expected_keys = sorted(shape_meta["obs"])
    if not isinstance(spec, Mapping):
        raise ServerError(f"header['obs']: expected an object {{key: {{dtype, shape}}}}, "
                          f"got {type(spec).__name__}")
    if sorted(spec) != expected_keys:
        raise ServerError(f"obs: expected keys {expected_keys}, got {sorted(spec)}")
    if len(buffers) != len(spec):
        raise ServerError(f"request: expected {len(spec)} buffers after the header (one per obs "
                          f"key), got {len(buffers)}")
    out = {}
    for (key, desc), buf in zip(spec.items(), buffers):
        want = [n_obs_steps, *shape_meta["obs"][key]["shape"]]
        if not isinstance(desc, Mapping):
            raise ServerError(f"obs['{key}']: expected {{dtype, shape}}, got {desc!r}")
        if desc.get("dtype") != "float32":
            raise ServerError(f"obs['{key}']: expected dtype float32, got {desc.get('dtype')}")
        if list(desc.get("shape", [])) != want:
            raise ServerError(f"obs['{key}']: expected shape {want}, got {desc.get('shape')}")
        if len(buf) != 4 * int(np.prod(want)):
            raise ServerError(f"obs['{key}']: expected {4 * int(np.prod(want))} bytes "
                              f"(float32 {want}), got {len(buf)}")
        out[key] = np.frombuffer(buf, dtype=np.float32).reshape(want)
    return out


# ---------------------------------------------------------------------------------- server
class PolicyServer:
    """Answer predict/meta requests with `predictor` (a LocalPredictor) on a REP socket."""

    def __init__(self, predictor, bind: str = DEFAULT_BIND) -> None:
        self.predictor = predictor
        self.context = zmq.Context.instance()
        self.socket = self.context.socket(zmq.REP)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.bind(bind)
        self.address = self.socket.getsockopt(zmq.LAST_ENDPOINT).decode()
        self.served = self.refused = 0

    def meta(self) -> dict:
        p = self.predictor
        return {"ok": True, "shape_meta": p.shape_meta, "n_obs_steps": p.n_obs_steps,
                "n_action_steps": p.n_action_steps, "horizon": p.policy.horizon}

    def handle(self, frames: list[bytes]) -> list[bytes]:
        """One request -> its reply; never raises."""
        try:
            try:
                header = json.loads(frames[0].decode())
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                raise ServerError(f"header: expected a JSON object, got undecodable bytes "
                                  f"({type(e).__name__})") from e
            if not isinstance(header, dict):
                raise ServerError(f"header: expected a JSON object, got {type(header).__name__}")
            cmd = header.get("cmd")
            if cmd == "meta":
                return _reply(self.meta())
            if cmd != "predict":
                raise ServerError(f"header['cmd']: expected 'predict' or 'meta', got {cmd!r}")
            seed = header.get("seed")
            if seed is not None and not isinstance(seed, int):
                raise ServerError(f"header['seed']: expected an integer or null, got {seed!r}")
            obs = decode_obs(header, frames[1:], self.predictor.shape_meta,
                             self.predictor.n_obs_steps)
            t0 = time.perf_counter()
            actions = self.predictor.predict(obs, seed=seed).astype(np.float32)
            self.served += 1
            return _reply({"ok": True, "dtype": "float32", "shape": list(actions.shape),
                           "seconds": time.perf_counter() - t0}, actions)
        except Exception as e:  # noqa: BLE001 - every failure becomes an error reply
            self.refused += 1
            msg = str(e) if isinstance(e, ServerError) else f"{type(e).__name__}: {e}"
            return _error(msg)

    def serve(self, stop: threading.Event | None = None, poll_ms: int = 100) -> None:
        """Serve until `stop` is set (or forever); checks `stop` every poll_ms."""
        stop = stop or threading.Event()
        while not stop.is_set():
            if self.socket.poll(poll_ms, zmq.POLLIN):
                self.socket.send_multipart(self.handle(self.socket.recv_multipart()))

    def close(self) -> None:
        self.socket.close(linger=0)


# ---------------------------------------------------------------------------------- client
class PolicyClient:
    """Predictor interface over a PolicyServer (same as LocalPredictor.predict).

    Each request waits at most `timeout_ms`; after a timeout the REQ socket is closed and
    recreated (a REQ socket that lost its reply cannot send again) and the request is retried
    `retries` times before TimeoutError is raised.
    """

    def __init__(self, address: str = DEFAULT_BIND, timeout_ms: int = 2000, retries: int = 1):
        self.address, self.timeout_ms, self.retries = address, timeout_ms, retries
        self.context = zmq.Context.instance()
        self.socket = None
        self._connect()
        meta = self._request([json.dumps({"cmd": "meta"}).encode()])[0]
        self.shape_meta = meta["shape_meta"]
        self.n_obs_steps, self.n_action_steps = meta["n_obs_steps"], meta["n_action_steps"]
        self.horizon = meta["horizon"]

    def _connect(self) -> None:
        if self.socket is not None:
            self.socket.close(linger=0)
        self.socket = self.context.socket(zmq.REQ)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.setsockopt(zmq.RCVTIMEO, self.timeout_ms)
        self.socket.setsockopt(zmq.SNDTIMEO, self.timeout_ms)
        self.socket.connect(self.address)

    def _request(self, frames: list[bytes]) -> tuple[dict, list[bytes]]:
        for _ in range(self.retries + 1):
            try:
                self.socket.send_multipart(frames)
                reply = self.socket.recv_multipart()
                break
            except zmq.Again:
                self._connect()
        else:
            raise TimeoutError(f"policy server {self.address}: no reply within "
                               f"{self.timeout_ms} ms ({self.retries + 1} tries)")
        header = json.loads(reply[0].decode())
        if not header.get("ok"):
            raise ServerError(f"policy server {self.address}: {header.get('error')}")
        return header, reply[1:]

    def predict(self, obs: Mapping[str, np.ndarray], seed: int | None = None) -> np.ndarray:
        """{key: [To, *shape]} -> actions [H, Da] (row 0: the observation's tick)."""
        header, (payload,) = self._request(encode_obs(obs, seed))
        return np.frombuffer(payload, dtype=header["dtype"]).reshape(header["shape"]).copy()

    def close(self) -> None:
        self.socket.close(linger=0)


# ---------------------------------------------------------------------------------- CLI
def add_arguments(p: argparse.ArgumentParser) -> None:
    from drifting_policy.rollout.realtime import add_sampler_arguments

    p.add_argument("--checkpoint", type=Path, required=True, help="checkpoint directory")
    p.add_argument("--bind", default=DEFAULT_BIND,
                   help="ZeroMQ endpoint (default: localhost only; bind 0.0.0.0 deliberately)")
    add_sampler_arguments(p)


def main(args: argparse.Namespace) -> int:
    from drifting_policy.rollout.realtime import load_predictor

    predictor = load_predictor(args.checkpoint, not args.no_ema, args.scheduler,
                               args.num_inference_steps, args.device)
    server = PolicyServer(predictor, args.bind)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())  # `kill PID` stops it cleanly too
    print(f"serving {args.checkpoint} on {server.address} (Ctrl-C to stop)", flush=True)
    try:
        server.serve(stop)
    except KeyboardInterrupt:
        pass
    finally:
        server.close()
        print(f"served {server.served} requests, refused {server.refused}")
    return 0
