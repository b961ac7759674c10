"""Activation memory of one image_gen generator step, estimated on the `meta` device (no GPU, no
weights): the bytes autograd keeps for the backward pass, counted with saved-tensor hooks, with
and without the DiT's gradient checkpointing, for a config's per-GPU batch.

    python benchmarks/image_gen_memory.py --config latent_b2 --gpus 1 --mae-width 256 640

What is counted (bf16 activations, as under autocast; networks built in bf16 on `meta`):
- generator: every tensor saved for backward by the DiT forward on labels_per_step / gpus x
  gen_per_label samples, except attention matrices (flash / memory-efficient attention on CUDA
  keeps none); with checkpointing: the block inputs each checkpointed block keeps, plus one
  block's saved tensors while it is recomputed in the backward pass;
- features: tensors saved by the frozen ResNet-MAE and the feature statistics on the generated
  samples (the gradient flows through them; positives / negatives run without grad);
- static: fp32 weights + grads + AdamW moments + EMA = 20 bytes per generator parameter, the
  queues (num_classes x per_class x sample bytes) and the frozen MAE's bf16 weights;
- drift loss: one float32 [rows, G, G + n_unc + pos] tensor of its largest feature (the loss
  holds several such temporaries at once, under no_grad; reported, not summed).
Not counted: cuDNN / matmul workspaces, the allocator's fragmentation, NCCL buffers. Treat the
totals as a lower bound to compare settings, not as a guarantee.
"""

from __future__ import annotations

import argparse
import json

import torch
from torch.autograd.graph import saved_tensors_hooks

from drifting_policy.config import compose
from image_gen.features import feature_sets, freeze
from image_gen.mae import ResNetMAE
from image_gen.train import DriftSettings, build_generator

GIB = 2**30


class SavedBytes:
    """Sum of the distinct tensors autograd saves inside the block (parameters excluded; views
    counted once through their base). `square` > 0 also leaves out [..., square, square]
    tensors: the attention matrices that `meta`'s math attention saves and the flash /
    memory-efficient kernels used on CUDA do not keep."""

    def __init__(self, exclude: set[int], square: int = 0) -> None:
        self.exclude, self.square, self.seen = exclude, square, {}

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        base = t if t._base is None else t._base
        attention = self.square and base.shape[-2:] == (self.square, self.square)
        if id(base) not in self.exclude and not attention:
            self.seen[id(base)] = (base, base.numel() * base.element_size())
        return t

    def __enter__(self) -> SavedBytes:
        self._hooks = saved_tensors_hooks(self._pack, lambda t: t)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._hooks.__exit__(*exc)

    @property
    def bytes(self) -> int:
        return sum(b for _, b in self.seen.values())


def generator_bytes(cfg, n: int, checkpointing: bool) -> dict[str, float]:
    """Saved bytes of the DiT forward on n samples (meta, bf16)."""
    with torch.device("meta"):
        model = build_generator(cfg.model).to(torch.bfloat16)
    model.grad_checkpointing = False  # measured per block below
    model.train()
    params = {id(p) for p in model.parameters()}
    noise, style = model.sample_inputs(n, "meta")
    labels = torch.zeros(n, dtype=torch.long, device="meta")
    alpha = torch.ones(n, device="meta")
    tokens = model.grid**2 + model.n_class_tokens
    with SavedBytes(params, tokens) as total:
        model(noise.bfloat16(), labels, alpha, style, validate=False)
    block = model.blocks[0]
    x = torch.zeros(n, tokens, block.norm1.weight.shape[0], dtype=torch.bfloat16, device="meta",
                    requires_grad=True)
    cond = torch.zeros(n, x.shape[-1], dtype=torch.bfloat16, device="meta")
    rope = model.rope.get_embed([model.grid, model.grid]).to("meta")
    with SavedBytes(params | {id(x)}, tokens) as one:
        block(x, cond, rope)
    per_block, depth = one.bytes, len(model.blocks)
    outside = total.bytes - depth * per_block
    if checkpointing:  # block inputs kept + one block's activations during its recompute
        kept = depth * x.numel() * x.element_size() + per_block + outside
    else:
        kept = total.bytes
    return {"params": sum(p.numel() for p in model.parameters()), "activations": kept,
            "per_block": per_block}


def feature_bytes(width: int, labels: int, g: int, shape: tuple[int, ...]) -> int:
    """Saved bytes of the MAE features of labels x g generated samples (grad through them)."""
    with torch.device("meta"):
        mae = freeze(ResNetMAE(in_channels=shape[0], width=width).to(torch.bfloat16))
    gen = torch.zeros(labels, g, *shape, dtype=torch.bfloat16, device="meta", requires_grad=True)
    with SavedBytes({id(p) for p in mae.parameters()}) as saved:
        feats = feature_sets(gen, mae)
    rows = max(f.shape[0] for f in feats.values())
    return saved.bytes, rows, sum(p.numel() for p in mae.parameters())


def estimate(config: str, gpus: int, mae_width: int, overrides: list[str]) -> dict:
    cfg = compose(f"image_gen/{config}", ["data.path=unused", "encoder.path=unused", *overrides])
    if cfg.data.kind != "latent":
        raise ValueError(f"config: expected a latent config (its encoder is the latent "
                         f"ResNet-MAE), got data.kind={cfg.data.kind!r}")
    s = DriftSettings.from_cfg(cfg.drift)
    labels = s.labels_per_rank(gpus)
    n = labels * s.gen_per_label
    with torch.device("meta"):
        probe = build_generator(cfg.model)
    shape = (probe.in_channels, probe.input_size, probe.input_size)
    sample_bytes = torch.Size(shape).numel() * getattr(torch, s.queue_dtype).itemsize
    feats, rows, mae_params = feature_bytes(mae_width, labels, s.gen_per_label, shape)
    out = {"config": config, "gpus": gpus, "labels_per_gpu": labels, "samples_per_gpu": n,
           "mae_width": mae_width}
    for ckpt in (False, True):
        gen = generator_bytes(cfg, n, ckpt)
        static = (20 * gen["params"] + 2 * mae_params
                  + probe.num_classes * s.queue_per_class * sample_bytes
                  + s.queue_global * sample_bytes)
        key = "checkpointing" if ckpt else "no_checkpointing"
        out[key] = {"generator_activations_gib": gen["activations"] / GIB,
                    "feature_activations_gib": feats / GIB,
                    "static_gib": static / GIB,
                    "total_gib": (gen["activations"] + feats + static) / GIB}
        out["dit_block_activations_gib"] = gen["per_block"] / GIB
    cols = s.gen_per_label + s.n_unc + s.pos_per_sample
    out["drift_loss_temporary_gib"] = rows * s.gen_per_label * cols * 4 / GIB
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="latent_b2")
    p.add_argument("--gpus", type=int, nargs="+", default=[1])
    p.add_argument("--mae-width", type=int, nargs="+", default=[256])
    p.add_argument("--out", default=None, help="write the rows as JSON here")
    p.add_argument("overrides", nargs="*", help="config overrides, e.g. drift.gen_per_label=32")
    args = p.parse_args()
    rows = [estimate(args.config, g, w, args.overrides) for g in args.gpus
            for w in args.mae_width]
    text = json.dumps(rows, indent=1)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
