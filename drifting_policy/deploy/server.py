"""A policy behind ZeroMQ: `drifting-policy serve --checkpoint DIR [--bind tcp://127.0.0.1:5555]`.

The wire format is `drifting_policy.deploy.protocol` (JSON header frame + raw buffers; no
pickle). The answer to a predict request is what `LocalPredictor.predict` returns: the executable
horizon [T - To + 1, Da] (the Predictor contract, `deploy/contract.py`), for the request's seed
and n_samples (default: `--n-samples`). Every request gets an answer: a malformed one, or one
whose observation holds NaN or inf, gets {"ok": false, "error": ...} naming the key, what was
expected and what came, and the server goes on serving. The policy is warmed up (and compiled,
with `--compile`) before the socket is bound, so the first request is as fast as the others.
"""

from __future__ import annotations

import argparse
import signal
import threading
import time
from pathlib import Path

import numpy as np

from drifting_policy.deploy.predictors import (
    LocalPredictor,
    add_predictor_arguments,
    load_predictor,
    warm_up,
)
from drifting_policy.deploy.protocol import (
    DEFAULT_BIND,
    MAX_SAMPLES,
    ServerError,
    decode_header,
    decode_obs,
    error_reply,
    reply,
)


class PolicyServer:
    """Answer predict/meta requests with a LocalPredictor on a REP socket."""

    def __init__(self, predictor: LocalPredictor, bind: str = DEFAULT_BIND) -> None:
        import zmq

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
                "n_action_steps": p.n_action_steps, "horizon": p.horizon,
                "n_samples": p.n_samples}

    def handle(self, frames: list[bytes]) -> list[bytes]:
        """One request -> its reply; never raises."""
        try:
            header = decode_header(frames[0])
            cmd = header.get("cmd")
            if cmd == "meta":
                return reply(self.meta())
            if cmd != "predict":
                raise ServerError(f"header['cmd']: expected 'predict' or 'meta', got {cmd!r}")
            seed = header.get("seed")
            if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool)):
                raise ServerError(f"header['seed']: expected an integer or null, got {seed!r}")
            k = header.get("n_samples")
            if k is not None and (not isinstance(k, int) or isinstance(k, bool)
                                  or not 1 <= k <= MAX_SAMPLES):
                raise ServerError(f"header['n_samples']: expected an integer in "
                                  f"1..{MAX_SAMPLES} or null, got {k!r}")
            obs = decode_obs(header, frames[1:], self.predictor.obs_shapes)
            t0 = time.perf_counter()
            actions = self.predictor.predict(obs, seed=seed, n_samples=k).astype(np.float32)
            self.served += 1
            return reply({"ok": True, "dtype": "float32", "shape": list(actions.shape),
                          "seconds": time.perf_counter() - t0}, actions)
        except Exception as e:  # noqa: BLE001 - every failure becomes an error reply
            self.refused += 1
            msg = str(e) if isinstance(e, ServerError) else f"{type(e).__name__}: {e}"
            return error_reply(msg)

    def serve(self, stop: threading.Event | None = None, poll_ms: int = 100) -> None:
        """Serve until `stop` is set (or forever); checks `stop` every poll_ms."""
        import zmq

        stop = stop or threading.Event()
        while not stop.is_set():
            if self.socket.poll(poll_ms, zmq.POLLIN):
                self.socket.send_multipart(self.handle(self.socket.recv_multipart()))

    def close(self) -> None:
        self.socket.close(linger=0)


# ---------------------------------------------------------------------------------- CLI
def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", type=Path, required=True, help="checkpoint directory")
    p.add_argument("--bind", default=DEFAULT_BIND,
                   help="ZeroMQ endpoint (default: localhost only; bind 0.0.0.0 deliberately)")
    p.add_argument("--warmup", type=int, default=3, help="untimed predictions before serving")
    add_predictor_arguments(p)


def main(args: argparse.Namespace) -> int:
    k = 1 if args.n_samples is None else args.n_samples
    predictor = load_predictor(args.checkpoint, not args.no_ema, args.scheduler,
                               args.num_inference_steps, args.device, k, args.compile)
    warm_up(predictor, args.warmup)
    server = PolicyServer(predictor, args.bind)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())  # `kill PID` stops it cleanly too
    print(f"serving {args.checkpoint} on {server.address} ({predictor.policy.device}, "
          f"n_samples {predictor.n_samples}; Ctrl-C to stop)", flush=True)
    try:
        server.serve(stop)
    except KeyboardInterrupt:
        pass
    finally:
        server.close()
        print(f"served {server.served} requests, refused {server.refused}")
    return 0
