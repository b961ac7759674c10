"""`drifting-policy export --checkpoint DIR --format onnx --out FILE.onnx`: one ONNX graph.

The graph is the whole one-step drifting policy at inference (`deploy/graph.py`):

    inputs   one per obs key of shape_meta, float32 [B, To, *shape]  (lowdim: "obs" [B, To, Do])
             "noise" float32 [B * K, T, Da]: K initial noise chunks per observation (a graph
                     input, so the graph is deterministic; `seeded_noise(seed, K, T, Da)`
                     reproduces predict_action(generator=torch.Generator().manual_seed(seed),
                     n_samples=K) for one observation)
    outputs  "action_pred" float32 [B, T, Da]: the medoid of each observation's K chunks
                     (K = 1: the one chunk), unnormalised
             "action" float32 [B, Ta, Da] = action_pred[:, To - 1 : To - 1 + Ta]

B and B * K are dynamic: one file serves any batch and any K. The model's metadata records
"n_action_steps" (Ta). `OnnxPredictor` returns the executable horizon action_pred[0, To - 1:],
like every predictor.

Exported with torch.onnx.export's TorchScript-based (legacy) exporter, dynamo=False, opset 18
(Mish is an ONNX operator from 18 on). It exports a PushT policy in seconds where the dynamo
exporter (which also works on these models, unchanged) took 20-50 s on this 2-core machine. The
one change for tracing: the eval-time centre crop is replaced in a copy of the policy by the same
crop with offsets fixed from shape_meta (`StaticCenterCrop`); the parity tests cover it.
Diffusion checkpoints are refused: their sampler is a 10-100 step loop around the network
(diffusers scheduler code), not one graph.

    import onnxruntime as ort
    sess = ort.InferenceSession("policy.onnx", providers=["CPUExecutionProvider"])
    action_pred = sess.run(["action_pred"], {"obs": obs, "noise": np.random.randn(4, 16, 2)
                                                                  .astype(np.float32)})[0]
"""

from __future__ import annotations

import argparse
import warnings
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch

from drifting_policy.deploy.graph import OneStepGraph
from drifting_policy.deploy.predictors import ort_session

OPSET = 18
OUTPUTS = ["action", "action_pred"]


def example_inputs(policy, batch: int = 1, n_samples: int = 1, seed: int = 0
                   ) -> dict[str, np.ndarray]:
    """Random float32 inputs of the graph: obs keys ([B, To, *shape], images in [0, 1]) and
    noise [B * K, T, Da]."""
    rng = np.random.default_rng(seed)
    out = {k: rng.random((batch, policy.n_obs_steps, *m["shape"]), dtype=np.float32)
           for k, m in policy.shape_meta["obs"].items()}
    out["noise"] = rng.standard_normal((batch * n_samples, policy.horizon, policy.action_dim),
                                       dtype=np.float32)
    return out


def export_onnx(policy, path: str | Path) -> Path:
    """Write `policy` (a DriftingPolicy on any device) as one ONNX graph; returns the path.
    Traced with K = 2 so that no size-1 dimension is specialised away."""
    graph = OneStepGraph(policy, traceable=True).cpu()
    names = [*graph.keys, "noise"]
    args = tuple(torch.from_numpy(v) for v in example_inputs(policy, n_samples=2).values())
    axes = {**{k: {0: "batch"} for k in graph.keys}, "noise": {0: "batch_x_samples"},
            **{k: {0: "batch"} for k in OUTPUTS}}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer warnings about the policies' shape checks
        torch.onnx.export(graph, args, str(path), input_names=names, output_names=OUTPUTS,
                          dynamic_axes=axes, opset_version=OPSET, dynamo=False)
    import onnx

    model = onnx.load(str(path))  # Ta is not a static dimension of the sliced output: record it
    onnx.helper.set_model_props(model, {"n_action_steps": str(policy.n_action_steps)})
    onnx.save(model, str(path))
    return path


def torch_outputs(policy, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The same computation in PyTorch: inputs as example_inputs -> {"action", "action_pred"}."""
    graph = OneStepGraph(policy)
    args = [torch.from_numpy(inputs[k]).to(policy.device) for k in [*graph.keys, "noise"]]
    with torch.inference_mode():
        return {k: v.float().cpu().numpy() for k, v in zip(OUTPUTS, graph(*args))}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", type=Path, required=True, help="checkpoint directory")
    p.add_argument("--format", choices=["onnx"], default="onnx")
    p.add_argument("--out", type=Path, required=True, help="FILE.onnx")
    p.add_argument("--no-ema", action="store_true", help="raw weights instead of the EMA")


def main(args: argparse.Namespace) -> int:
    from drifting_policy.checkpoint import load_policy

    policy, _ = load_policy(args.checkpoint, ema=not args.no_ema)
    path = export_onnx(policy, args.out)
    session = ort_session(path)
    errors = []
    for k in (1, 4):
        inputs = example_inputs(policy, n_samples=k)
        got = session.run(["action_pred"], inputs)[0]
        errors.append(float(np.abs(got - torch_outputs(policy, inputs)["action_pred"]).max()))
    print(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB); onnxruntime vs torch max |diff| "
          f"{max(errors):.2e} (K = 1 and 4); inputs {[*policy.shape_meta['obs'], 'noise']} -> "
          f"{OUTPUTS}")
    return 0
