"""`drifting-policy export --checkpoint DIR --format onnx --out FILE.onnx`: one ONNX graph.

The graph is the whole one-step drifting policy at inference:

    inputs   one per obs key of shape_meta, float32 [B, To, *shape]  (lowdim: "obs" [B, To, Do])
             "noise" float32 [B, T, Da]   (the initial noise; a graph input, so the graph is
                                          deterministic: torch.randn(B, T, Da) reproduces
                                          predict_action with the same generator)
    output   "action" float32 [B, Ta, Da] = unnormalise(generator(noise, 0, encoder(normalise(
             obs))))[:, To - 1 : To - 1 + Ta]

Exported with torch.onnx.export's TorchScript-based (legacy) exporter, dynamo=False, opset 18
(Mish is an ONNX operator from 18 on), batch dimension dynamic. It exports a PushT policy in
seconds where the dynamo exporter (which also works on these models, unchanged) took 20-50 s on
this 2-core machine. The one change for tracing: the eval-time centre crop, whose offsets
torchvision computes from traced sizes, is replaced in a copy of the policy by the same crop with
the offsets fixed from shape_meta (torchvision's rounding); the parity test covers it.
Diffusion checkpoints are refused: their sampler is a 10-100 step loop around the network
(diffusers scheduler code), not one graph.

    import onnxruntime as ort
    sess = ort.InferenceSession("policy.onnx", providers=["CPUExecutionProvider"])
    action = sess.run(["action"], {"obs": obs, "noise": np.random.randn(1, 16, 2)
                                                             .astype(np.float32)})[0]
"""

from __future__ import annotations

import argparse
import copy
import warnings
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
from torch import nn

OPSET = 18


class StaticCenterCrop(nn.Module):
    """Eval-mode CropRandomizer with fixed offsets: [N, C, H, W] -> [N, C, crop_h, crop_w]."""

    def __init__(self, height: int, width: int, crop_height: int, crop_width: int) -> None:
        super().__init__()
        self.top = int(round((height - crop_height) / 2.0))  # torchvision's center_crop anchor
        self.left = int(round((width - crop_width) / 2.0))
        self.crop_height, self.crop_width = crop_height, crop_width

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return images[:, :, self.top : self.top + self.crop_height,
                      self.left : self.left + self.crop_width]


class OneStepGraph(nn.Module):
    """policy's inference as forward(*obs in shape_meta order, noise) -> action [B, Ta, Da].

    `traceable`: run on a copy of the policy whose centre crops have static offsets."""

    def __init__(self, policy, traceable: bool = False) -> None:
        super().__init__()
        from drifting_policy.nn.obs_encoder import CropRandomizer
        from drifting_policy.policy.drifting import DriftingPolicy

        if not isinstance(policy, DriftingPolicy):
            raise ValueError(
                f"export: only the one-step DriftingPolicy can be exported as one graph, got "
                f"{type(policy).__name__} (a diffusion sampler is a multi-step loop; serve it "
                f"with `drifting-policy serve` instead)")
        if traceable:
            policy = copy.deepcopy(policy)
            enc = policy.obs_encoder
            for key, crop in enc.crops.items():
                if isinstance(crop, CropRandomizer):
                    _, h, w = enc.key_shapes[key]
                    enc.crops[key] = StaticCenterCrop(h, w, crop.crop_height, crop.crop_width)
        self.policy = policy.eval()
        self.keys = list(policy.shape_meta["obs"])

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        *obs, noise = inputs
        p = self.policy
        cond = p._encode(dict(zip(self.keys, obs)))
        action_pred = p.normalizer["action"].unnormalize(p.sample(noise, cond))
        start = p.n_obs_steps - 1
        return action_pred[:, start : start + p.n_action_steps]


def example_inputs(policy, batch: int = 1, seed: int = 0) -> dict[str, np.ndarray]:
    """Random float32 inputs of the graph: obs keys ([B, To, *shape], images in [0, 1]) and
    noise [B, T, Da]."""
    rng = np.random.default_rng(seed)
    out = {k: rng.random((batch, policy.n_obs_steps, *m["shape"]), dtype=np.float32)
           for k, m in policy.shape_meta["obs"].items()}
    out["noise"] = rng.standard_normal((batch, policy.horizon, policy.action_dim),
                                       dtype=np.float32)
    return out


def export_onnx(policy, path: str | Path) -> Path:
    """Write `policy` (a DriftingPolicy on any device) as one ONNX graph; returns the path."""
    graph = OneStepGraph(policy, traceable=True).cpu()
    names = [*graph.keys, "noise"]
    args = tuple(torch.from_numpy(v) for v in example_inputs(policy).values())
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer warnings about the policies' shape checks
        torch.onnx.export(graph, args, str(path), input_names=names, output_names=["action"],
                          dynamic_axes={n: {0: "batch"} for n in [*names, "action"]},
                          opset_version=OPSET, dynamo=False)
    return path


def torch_action(policy, inputs: Mapping[str, np.ndarray]) -> np.ndarray:
    """The same computation in PyTorch: inputs as example_inputs -> action [B, Ta, Da]."""
    graph = OneStepGraph(policy)
    device = policy.device
    args = [torch.from_numpy(inputs[k]).to(device) for k in [*graph.keys, "noise"]]
    with torch.inference_mode():
        return graph(*args).float().cpu().numpy()


def ort_session(path: str | Path, threads: int | None = None):
    """An onnxruntime CPU session (threads: intra-op threads; None = onnxruntime's default)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


class OnnxPredictor:
    """An exported graph as a realtime Predictor: predict({key: [To, *shape]}, seed) -> the
    Ta executed actions [Ta, Da] (row 0: the observation's tick). With `seed` the noise is
    torch.randn(1, T, Da, generator=torch.Generator().manual_seed(seed)), as predict_action
    draws it, so the result matches the PyTorch policy with that generator."""

    def __init__(self, path: str | Path, threads: int | None = None) -> None:
        self.session = ort_session(path, threads)
        inputs = {i.name: i.shape for i in self.session.get_inputs()}
        _, self.horizon, self.action_dim = inputs.pop("noise")
        self.keys = list(inputs)
        self.n_obs_steps = int(inputs[self.keys[0]][1])
        self.n_action_steps = int(self.session.get_outputs()[0].shape[1])

    def predict(self, obs: Mapping[str, np.ndarray], seed: int | None = None) -> np.ndarray:
        gen = torch.Generator().manual_seed(int(seed)) if seed is not None else None
        noise = torch.randn(1, self.horizon, self.action_dim, generator=gen).numpy()
        feed = {k: np.asarray(obs[k], np.float32)[None] for k in self.keys}
        return self.session.run(["action"], {**feed, "noise": noise})[0][0]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", type=Path, required=True, help="checkpoint directory")
    p.add_argument("--format", choices=["onnx"], default="onnx")
    p.add_argument("--out", type=Path, required=True, help="FILE.onnx")
    p.add_argument("--no-ema", action="store_true", help="raw weights instead of the EMA")


def main(args: argparse.Namespace) -> int:
    from drifting_policy.checkpoint import load_policy

    policy, _ = load_policy(args.checkpoint, ema=not args.no_ema)
    path = export_onnx(policy, args.out)
    inputs = example_inputs(policy)
    got = ort_session(path).run(["action"], inputs)[0]
    err = float(np.abs(got - torch_action(policy, inputs)).max())
    print(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB); onnxruntime vs torch max |diff| "
          f"{err:.2e}; inputs {list(inputs)} -> action {list(got.shape)}")
    return 0
