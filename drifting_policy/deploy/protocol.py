"""The policy server's wire format (ZeroMQ REQ/REP, multipart; no pickle, no msgpack).

    request   [JSON header, buffer_1, ..., buffer_n]
              header {"cmd": "predict", "obs": {key: {"dtype": "float32", "shape": [To, *shape]}},
                      "seed": int | null, "n_samples": int | null}
              buffer_i: the raw C-order bytes of the i-th key of header["obs"]
              header {"cmd": "meta"}   -> shape_meta, To, Ta, horizon, the default n_samples
    reply     [{"ok": true, "dtype": "float32", "shape": [H, Da], "seconds": s}, actions bytes]
              or [{"ok": false, "error": "obs['obs']: expected shape [2, 20], got [2, 19]"}]

The actions are the executable horizon of `drifting_policy.deploy.contract` (H = T - To + 1 rows
from index To - 1). "n_samples" (absent or null: the server's default) asks for the medoid of K
sampled chunks. An observation holding NaN or inf is refused with an error reply.
"""

from __future__ import annotations

import json
from collections.abc import Mapping

import numpy as np

from drifting_policy.deploy.contract import require_finite

DEFAULT_BIND = "tcp://127.0.0.1:5555"
MAX_SAMPLES = 256  # largest n_samples a request may ask for (bounds the server's memory)


class ServerError(ValueError):
    """The server refused a request (the message says why)."""


def encode_obs(obs: Mapping[str, np.ndarray], seed: int | None = None,
               n_samples: int | None = None) -> list[bytes]:
    """{key: array} -> [header, buffers...] of a predict request."""
    arrays = {k: np.ascontiguousarray(v) for k, v in obs.items()}
    spec = {k: {"dtype": a.dtype.name, "shape": list(a.shape)} for k, a in arrays.items()}
    header = {"cmd": "predict", "seed": seed, "n_samples": n_samples, "obs": spec}
    return [json.dumps(header).encode(), *(a.tobytes() for a in arrays.values())]


def reply(header: Mapping, payload: np.ndarray | None = None) -> list[bytes]:
    """A reply's frames: the JSON header, then the payload's raw bytes when given."""
    frames = [json.dumps(header).encode()]
    if payload is not None:
        frames.append(np.ascontiguousarray(payload).tobytes())
    return frames


def error_reply(message: str) -> list[bytes]:
    return reply({"ok": False, "error": message})


def decode_header(frame: bytes) -> dict:
    """The JSON object of a request's first frame; ServerError if it is not one."""
    try:
        header = json.loads(frame.decode())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ServerError(f"header: expected a JSON object, got undecodable bytes "
                          f"({type(e).__name__})") from e
    if not isinstance(header, dict):
        raise ServerError(f"header: expected a JSON object, got {type(header).__name__}")
    return header


def decode_obs(header: Mapping, buffers: list[bytes],
               obs_shapes: Mapping[str, list[int]]) -> dict[str, np.ndarray]:
    """Check a predict request against the policy's observation shapes ({key: [To, *shape]})
    and rebuild the arrays ({key: float32 [To, *shape]}, all finite); raises ServerError naming
    the key, the expected and the actual."""
    spec = header.get("obs")
    expected_keys = sorted(obs_shapes)
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
        want = list(obs_shapes[key])
        if not isinstance(desc, Mapping):
            raise ServerError(f"obs['{key}']: expected {{dtype, shape}}, got {desc!r}")
        if desc.get("dtype") != "float32":
            raise ServerError(f"obs['{key}']: expected dtype float32, got {desc.get('dtype')}")
        if list(desc.get("shape", [])) != want:
            raise ServerError(f"obs['{key}']: expected shape {want}, got {desc.get('shape')}")
        if len(buf) != 4 * int(np.prod(want)):
            raise ServerError(f"obs['{key}']: expected {4 * int(np.prod(want))} bytes "
                              f"(float32 {want}), got {len(buf)}")
        x = np.frombuffer(buf, dtype=np.float32).reshape(want)
        try:
            out[key] = require_finite(x, f"obs['{key}']")
        except ValueError as e:
            raise ServerError(str(e)) from e
    return out


def decode_actions(header: Mapping, frames: list[bytes]) -> np.ndarray:
    """The actions of an ok predict reply (float32 [H, Da]), checked against its header."""
    shape = header.get("shape")
    if header.get("dtype") != "float32" or not isinstance(shape, list) or len(shape) != 2:
        raise ServerError(f"reply: expected dtype float32 and shape [H, Da], got "
                          f"{header.get('dtype')} {shape}")
    if len(frames) != 1 or len(frames[0]) != 4 * int(np.prod(shape)):
        raise ServerError(f"reply: expected one buffer of {4 * int(np.prod(shape))} bytes, got "
                          f"{[len(f) for f in frames]}")
    return np.frombuffer(frames[0], dtype=np.float32).reshape(shape).copy()
