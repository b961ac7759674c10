"""Cost of the drift loss next to one training step of the policy network.

For each G (generated chunks per observation) times, on the same inputs:
- net:   forward + backward of ConditionalUnet1D on B*G noise chunks [B*G, T, Da];
- drift: drift_loss (forward + backward to gen) in the policy's per-timestep layout,
         gen [B*T, G, Da], pos [B*T, 1, Da].
Prints a table and writes JSON; the ratio drift / (net + drift) is the loss's share of the step.

    python benchmarks/drift_overhead.py --out benchmarks/results/drift_overhead.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
from pathlib import Path

import torch

from drifting_policy.bench import time_ms
from drifting_policy.drift import drift_loss
from drifting_policy.nn.unet1d import ConditionalUnet1D


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--obs", type=int, default=8, help="observations per batch (B)")
    p.add_argument("--gens", type=int, nargs="+", default=[8, 64, 256])
    p.add_argument("--horizon", type=int, default=16)
    p.add_argument("--action-dim", type=int, default=2)
    p.add_argument("--down-dims", type=int, nargs="+", default=[64, 128, 256],
                   help="UNet widths (CPU-sized default; DP's lowdim is 256 512 1024)")
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/drift_overhead.json"))
    args = p.parse_args()

    torch.manual_seed(0)
    b, t, da = args.obs, args.horizon, args.action_dim
    cond_dim = 40
    net = ConditionalUnet1D(da, cond_dim, diffusion_step_embed_dim=128, down_dims=args.down_dims)
    rows = []
    for g in args.gens:
        noise = torch.randn(b * g, t, da)
        cond = torch.randn(b * g, cond_dim)

        def net_step(noise=noise, cond=cond):
            net.zero_grad(set_to_none=True)
            net(noise, 0, cond).square().mean().backward()

        gen = torch.randn(b * t, g, da, requires_grad=True)
        pos = torch.randn(b * t, 1, da)

        def drift_step(gen=gen, pos=pos):
            gen.grad = None
            drift_loss(gen, pos)[0].mean().backward()

        net_ms = statistics.median(time_ms(net_step, args.repeats, warmup=2))
        drift_ms = statistics.median(time_ms(drift_step, args.repeats, warmup=2))
        rows.append({"G": g, "chunks": b * g, "net_ms": net_ms, "drift_ms": drift_ms,
                     "drift_share": drift_ms / (net_ms + drift_ms)})

    print(f"{'G':>5} {'chunks':>7} {'net fwd+bwd ms':>15} {'drift ms':>10} {'drift share':>12}")
    for r in rows:
        print(f"{r['G']:>5} {r['chunks']:>7} {r['net_ms']:>15.2f} {r['drift_ms']:>10.2f} "
              f"{100 * r['drift_share']:>11.2f}%")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"obs": b, "horizon": t, "action_dim": da, "down_dims": args.down_dims,
            "params": sum(p.numel() for p in net.parameters()), "torch": torch.__version__,
            "threads": torch.get_num_threads(), "machine": platform.machine()}
    args.out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
