"""`image-gen` console script: the ImageNet one-step generator trainer on the shared drift core.

  image-gen train-mae     [--config mae_latent] [key=value ...]  train the ResNet-MAE encoder
  image-gen cache-latents --data ROOT --vae DIR --out DIR        SD-VAE latents (+ flips), resumable
  image-gen train         [--config latent_b2] [key=value ...]   train the generator (torchrun ok;
                                                                  rerun to resume, same GPU count)
  image-gen sample        --checkpoint DIR --alpha A --n N --out DIR [--vae DIR]
  image-gen fid           --samples NPZ --reference NPZ --inception FILE
  image-gen demo          [--quick] --out DIR                    CPU demo on sklearn digits
  image-gen count-params  --preset B/2                           prints the parameter count
"""

from __future__ import annotations

import argparse
import json
import sys


def _compose(name: str, overrides: list[str]):
    from drifting_policy.config import compose

    return compose(f"image_gen/{name}", overrides)


def _train(args) -> None:
    from image_gen.train import train

    print(train(_compose(args.config, args.overrides)))


def _train_mae(args) -> None:
    from image_gen.train import train_mae

    print(train_mae(_compose(args.config, args.overrides)))


def _cache(args) -> None:
    from image_gen.vae import cache_latents

    print(cache_latents(args.data, args.vae, args.out, size=args.size, shard_size=args.shard_size,
                        batch=args.batch, seed=args.seed, num_workers=args.workers,
                        device=args.device))


def _sample(args) -> None:
    from image_gen.sample import sample

    paths = sample(args.checkpoint, args.alpha, args.n, args.out, seed=args.seed,
                   vae_path=args.vae, ema=not args.no_ema, device=args.device)
    print(json.dumps({k: str(v) for k, v in paths.items()}))


def _fid(args) -> None:
    from image_gen.metrics import fid_is

    print(json.dumps(fid_is(args.samples, args.reference, args.inception), indent=1))


def _demo(args) -> None:
    from image_gen.demo import run_demo

    print(json.dumps(run_demo(args.out, quick=args.quick, ablations=not args.no_broken),
                     indent=1))


def _count(args) -> None:
    import torch

    from image_gen.dit import DiT, count_params

    with torch.device("meta"):
        model = DiT.from_preset(args.preset)
    print(count_params(model))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="image-gen", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    for name, fn, default in (("train", _train, "latent_b2"),
                              ("train-mae", _train_mae, "mae_latent")):
        p = sub.add_parser(name, help=f"{name} (configs/image_gen/<config>.yaml)")
        p.add_argument("--config", default=default,
                       help=f"config name under configs/image_gen (default {default})")
        p.add_argument("overrides", nargs="*", help="hydra overrides, e.g. data.path=DIR")
        p.set_defaults(fn=fn)

    p = sub.add_parser("cache-latents", help="encode an ImageFolder with the SD-VAE (resumable)")
    p.add_argument("--data", required=True, help="ImageFolder root (<root>/<class>/<image>)")
    p.add_argument("--vae", required=True, help="local diffusers AutoencoderKL directory")
    p.add_argument("--out", required=True)
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--shard-size", type=int, default=4096)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=4)
    p.add_argument("--device", default="cuda" if _cuda() else "cpu")
    p.set_defaults(fn=_cache)

    p = sub.add_parser("sample", help="one-step samples at guidance alpha -> PNG grid + npz")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--alpha", type=float, default=1.0)
    p.add_argument("--n", type=int, default=100)
    p.add_argument("--out", required=True)
    p.add_argument("--vae", default=None, help="SD-VAE directory (latent checkpoints)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-ema", action="store_true", help="raw weights instead of the EMA")
    p.add_argument("--device", default=None)
    p.set_defaults(fn=_sample)

    p = sub.add_parser("fid", help="FID / IS of a samples.npz (torch-fidelity Inception)")
    p.add_argument("--samples", required=True, help="samples.npz of `image-gen sample`")
    p.add_argument("--reference", required=True,
                   help="npz with mu/sigma (e.g. ADM's VIRTUAL_imagenet256_labeled.npz)")
    p.add_argument("--inception", default=None,
                   help="Inception weights file (torch-fidelity's pt_inception-2015-12-05)")
    p.set_defaults(fn=_fid)

    p = sub.add_parser("demo", help="CPU demo: class-conditional sklearn digits")
    p.add_argument("--out", default="outputs/image_gen_demo")
    p.add_argument("--quick", action="store_true", help="a few minutes instead of ~10")
    p.add_argument("--no-broken", action="store_true",
                   help="skip the broken-antisymmetry ablation run")
    p.set_defaults(fn=_demo)

    p = sub.add_parser("count-params", help="parameter count of a DiT preset")
    p.add_argument("--preset", required=True, help="B/2, L/2, B/16, L/16 or tiny")
    p.set_defaults(fn=_count)

    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    args.fn(args)
    return 0


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


if __name__ == "__main__":  # torchrun --nproc_per_node N -m image_gen.cli train ...
    sys.exit(main())
