"""The three predictors of the deployment contract (`drifting_policy.deploy.contract`):

    LocalPredictor(policy)      a ChunkPolicy in this process (optionally compiled: CUDA graphs)
    OnnxPredictor(path)         an exported graph (`drifting-policy export`) in onnxruntime
    PolicyClient(address)       a policy served by `drifting-policy serve` (ZeroMQ)

Each returns the executable horizon [T - To + 1, Da] for {key: [To, *shape]}, the same rows for
the same observation, seed and n_samples (tests/test_predictors.py runs all three on one seed),
and refuses to return a non-finite value.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch

from drifting_policy.deploy.contract import (
    check_obs,
    check_samples,
    require_finite,
    resolve_device,
    seeded_noise,
)
from drifting_policy.deploy.protocol import (
    DEFAULT_BIND,
    ServerError,
    decode_actions,
    encode_obs,
)

COMPILE_MODES = ("default", "reduce-overhead")

class LocalPredictor:
    """A ChunkPolicy in this process: predict() -> action_pred[0, To - 1:] ([T - To + 1, Da]).

    n_samples: the default K (medoid of K chunks; 1: one chunk).
    compile: None (eager predict_action), or a torch.compile mode for the one-step drifting
        policy's graph (`deploy/graph.py`): "reduce-overhead" captures CUDA graphs on a GPU (the
        per-call launch cost of ~100 small kernels disappears), "default" lets inductor fuse
        kernels. The compiled function takes the noise as an input (drawn on the CPU, then
        moved), so it returns what predict_action returns for the same seed; each new K or
        device compiles once, which warm_up() does before serving.
    """

    def __init__(self, policy, n_samples: int = 1, compile: str | None = None) -> None:
        self.policy = policy.eval()
        self.n_obs_steps, self.n_action_steps = policy.n_obs_steps, policy.n_action_steps
        self.horizon, self.action_dim = policy.horizon, policy.action_dim
        self.shape_meta = policy.shape_meta
        self.n_samples = check_samples(n_samples)
        self.obs_shapes = {k: [self.n_obs_steps, *m["shape"]]
                           for k, m in policy.shape_meta["obs"].items()}
        self.compiled = None
        if compile is not None:
            from drifting_policy.deploy.graph import OneStepGraph

            if compile not in COMPILE_MODES:
                raise ValueError(f"compile: expected one of {COMPILE_MODES} or None, "
                                 f"got {compile!r}")
            self.compiled = torch.compile(OneStepGraph(policy), mode=compile, dynamic=False)

    def predict(self, obs: Mapping[str, np.ndarray], seed: int | None = None,
                n_samples: int | None = None) -> np.ndarray:
        k = check_samples(self.n_samples if n_samples is None else n_samples)
        device = self.policy.device
        batch = {key: torch.tensor(v)[None].to(device)
                 for key, v in check_obs(obs, self.obs_shapes).items()}
        with torch.inference_mode():
            if self.compiled is not None:
                noise = seeded_noise(seed, k, self.horizon, self.action_dim).to(device)
                pred = self.compiled(*batch.values(), noise)[1]
            else:
                gen = None if seed is None else torch.Generator().manual_seed(int(seed))
                pred = self.policy.predict_action(batch, generator=gen,
                                                  n_samples=k)["action_pred"]
            rows = pred[0, self.n_obs_steps - 1 :].float().cpu().numpy()
        return require_finite(rows, "predictor: the policy's actions")


def ort_session(path: str | Path, threads: int | None = None):
    """An onnxruntime CPU session (threads: intra-op threads; None = onnxruntime's default)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


class OnnxPredictor:
    """An exported graph (`deploy/export.py`) as a Predictor. The noise [K, T, Da] is
    `seeded_noise(seed, K, T, Da)`, the numbers predict_action draws with that seed, so the rows
    equal LocalPredictor's to float32 rounding."""

    def __init__(self, path: str | Path, threads: int | None = None, n_samples: int = 1) -> None:
        self.session = ort_session(path, threads)
        inputs = {i.name: i.shape for i in self.session.get_inputs()}
        outputs = [o.name for o in self.session.get_outputs()]
        props = self.session.get_modelmeta().custom_metadata_map
        if "noise" not in inputs or outputs != ["action", "action_pred"] or (
                "n_action_steps" not in props):
            raise ValueError(f"{path}: expected a graph from `drifting-policy export` (inputs: obs "
                             f"keys + noise; outputs action, action_pred; n_action_steps in its "
                             f"metadata), got inputs {list(inputs)} outputs {outputs} metadata "
                             f"{sorted(props)}")
        _, self.horizon, self.action_dim = inputs.pop("noise")
        self.obs_shapes = {k: [int(d) for d in shape[1:]] for k, shape in inputs.items()}
        self.n_obs_steps = self.obs_shapes[next(iter(inputs))][0]
        self.n_action_steps = int(props["n_action_steps"])
        self.n_samples = check_samples(n_samples)

    def predict(self, obs: Mapping[str, np.ndarray], seed: int | None = None,
                n_samples: int | None = None) -> np.ndarray:
        k = check_samples(self.n_samples if n_samples is None else n_samples)
        feed = {key: v[None] for key, v in check_obs(obs, self.obs_shapes).items()}
        feed["noise"] = seeded_noise(seed, k, self.horizon, self.action_dim).numpy()
        action_pred = self.session.run(["action_pred"], feed)[0]
        return require_finite(action_pred[0, self.n_obs_steps - 1 :],
                              "predictor: the graph's actions")


class PolicyClient:
    """A Predictor over a PolicyServer (`deploy/server.py`).

    n_samples: the K this client asks for (None: the server's default, read from its meta).
    Each request waits at most `timeout_ms`; after a timeout the REQ socket is closed and
    recreated (a REQ socket that lost its reply cannot send again) and the request is retried
    `retries` times before TimeoutError is raised. A refused request raises ServerError.
    """

    def __init__(self, address: str = DEFAULT_BIND, timeout_ms: int = 2000, retries: int = 1,
                 n_samples: int | None = None) -> None:
        import zmq

        self.address, self.timeout_ms, self.retries = address, timeout_ms, retries
        self.context = zmq.Context.instance()
        self.socket = None
        self._connect()
        meta = self._request([json.dumps({"cmd": "meta"}).encode()])[0]
        self.shape_meta = meta["shape_meta"]
        self.n_obs_steps, self.n_action_steps = meta["n_obs_steps"], meta["n_action_steps"]
        self.horizon = meta["horizon"]
        self.n_samples = check_samples(meta["n_samples"] if n_samples is None else n_samples)
        self.obs_shapes = {k: [self.n_obs_steps, *m["shape"]]
                           for k, m in self.shape_meta["obs"].items()}

    def _connect(self) -> None:
        import zmq

        if self.socket is not None:
            self.socket.close(linger=0)
        self.socket = self.context.socket(zmq.REQ)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.setsockopt(zmq.RCVTIMEO, self.timeout_ms)
        self.socket.setsockopt(zmq.SNDTIMEO, self.timeout_ms)
        self.socket.connect(self.address)

    def _request(self, frames: list[bytes]) -> tuple[dict, list[bytes]]:
        import zmq

        for _ in range(self.retries + 1):
            try:
                self.socket.send_multipart(frames)
                answer = self.socket.recv_multipart()
                break
            except zmq.Again:
                self._connect()
        else:
            raise TimeoutError(f"policy server {self.address}: no reply within "
                               f"{self.timeout_ms} ms ({self.retries + 1} tries)")
        header = json.loads(answer[0].decode())
        if not header.get("ok"):
            raise ServerError(f"policy server {self.address}: {header.get('error')}")
        return header, answer[1:]

    def predict(self, obs: Mapping[str, np.ndarray], seed: int | None = None,
                n_samples: int | None = None) -> np.ndarray:
        k = check_samples(self.n_samples if n_samples is None else n_samples)
        header, frames = self._request(encode_obs(obs, seed, k))
        return require_finite(decode_actions(header, frames), "predictor: the server's actions")

    def close(self) -> None:
        self.socket.close(linger=0)


def warm_up(predictor, calls: int = 3) -> None:
    """`calls` untimed predictions on an all-zero observation (first-call allocations, lazy
    initialisation, torch.compile / CUDA-graph capture happen here, not on the first request)."""
    zeros = {k: np.zeros(shape, np.float32) for k, shape in predictor.obs_shapes.items()}
    for i in range(calls):
        predictor.predict(zeros, seed=i)


def load_predictor(checkpoint: Path, ema: bool = True, scheduler: str | None = None,
                   num_inference_steps: int | None = None, device: str = "auto",
                   n_samples: int = 1, compile: str | None = None) -> LocalPredictor:
    """A checkpoint's policy as a LocalPredictor on `device` ("auto": cuda when present);
    diffusion checkpoints may switch sampler."""
    from drifting_policy.checkpoint import load_policy

    policy, config = load_policy(checkpoint, ema=ema, device=resolve_device(device))
    if scheduler or num_inference_steps:
        if not hasattr(policy, "set_inference"):
            raise ValueError("--scheduler/--num-inference-steps: only for diffusion checkpoints, "
                             f"got a {config.type} checkpoint")
        policy.set_inference(scheduler or "ddpm", num_inference_steps or 100)
    return LocalPredictor(policy, n_samples=n_samples, compile=compile)


def add_predictor_arguments(p: argparse.ArgumentParser) -> None:
    """Options of an in-process predictor, shared by `run` and `serve`."""
    p.add_argument("--scheduler", choices=["ddpm", "ddim"], default=None,
                   help="diffusion checkpoints: sampler")
    p.add_argument("--num-inference-steps", type=int, default=None,
                   help="diffusion checkpoints: sampler steps (e.g. 10 with --scheduler ddim)")
    p.add_argument("--no-ema", action="store_true", help="raw weights instead of the EMA")
    p.add_argument("--device", default="auto", help="auto (cuda when present) | cpu | cuda[:N]")
    p.add_argument("--n-samples", type=int, default=None,
                   help="K: sample K chunks in one batched pass and execute their medoid "
                        "(default 1; run --server: the server's)")
    p.add_argument("--compile", choices=COMPILE_MODES, default=None,
                   help="drifting checkpoints: torch.compile the one-step graph "
                        "(reduce-overhead: CUDA graphs on a GPU)")
