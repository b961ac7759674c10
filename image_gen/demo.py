"""`image-gen demo`: the ImageNet pipeline, shrunk to class-conditional sklearn digits on a CPU.

The same code path as ImageNet (configs/image_gen/digits*.yaml): a tiny ResNet-MAE is trained
first (masked L2 + class fine-tune), then a tiny DiT with per-class queues, training-time CFG and
the feature-space drift loss through that frozen encoder. Two recipes, as the paper's two models:
- latent-style (proxy_fd): the MAE runs on the 16x16 samples as they are (the latent MAE on
  32x32x4 latents);
- pixel (proxy_fd_pixel): the MAE first rearranges 2x2 pixel cells into channels (8x8x4 grid,
  configs/image_gen/digits_mae_pixel.yaml), the release pixel MAE's space-to-depth by 8 of
  256x256 images, scaled down; ConvNeXt-V2 features need ImageNet weights and are not part of the
  demo.
The generators train on half "a" of the digits; quality is the proxy FD (Frechet distance in a
small CNN classifier's features) of as many samples as half "b" holds, with b's labels, against
half b, reported next to
- proxy_fd_real_baseline: half a against half b (a generator that reproduced its training set);
- proxy_fd_raw_only: the same training with encoder None (raw-pixel features only);
- proxy_fd_broken_antisymmetry: the same training with attraction_scale 1.5 (paper's ablation;
  full mode only).
Outputs: <out>/samples.png and <out>/samples_pixel.png (row = class), <out>/metrics.json,
checkpoints under <out>/.
Rerunning resumes finished or interrupted trainings from their checkpoints.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from drifting_policy.config import compose
from image_gen.data import Digits
from image_gen.metrics import accuracy, proxy_fd, train_digits_classifier
from image_gen.sample import generate, grid, load_generator, save_png, to_images
from image_gen.train import train, train_mae


@dataclass(frozen=True)
class Budget:
    """Training steps of each stage (the configs' other settings are unchanged)."""

    mae_steps: int
    mae_cls_steps: int
    gen_steps: int
    ablation_steps: int
    classifier_epochs: int


FULL = Budget(mae_steps=400, mae_cls_steps=100, gen_steps=1500, ablation_steps=1500,
              classifier_epochs=30)
# 400 generator steps gave class-agnostic blobs (proxy FD ~520, accuracy 0.26), 1000 recognisable
# digits (51, 0.81; docs/image_gen_models.md); the quick run skips the anti-symmetry ablation
QUICK = Budget(mae_steps=400, mae_cls_steps=100, gen_steps=1000, ablation_steps=1000,
               classifier_epochs=15)
ALPHAS = (1.0, 1.5, 2.0)


def _train_generator(out: Path, steps: int, overrides: list[str]) -> Path:
    cfg = compose("image_gen/digits", [f"train.out={out}", f"train.steps={steps}",
                                       f"train.warmup={min(100, steps // 10)}", *overrides])
    return train(cfg)


def _evaluate(path: Path, classifier, real: Digits, alphas=ALPHAS, seed: int = 1):
    """{alpha: (proxy FD vs real, classifier accuracy on the intended labels)} and the samples
    at alpha 1 (model space, labels of `real`)."""
    model, _ = load_generator(path, ema=True, device="cpu")
    scores, first = {}, None
    for a in alphas:
        x = generate(model, real.y, a, seed=seed)
        scores[a] = (proxy_fd(classifier, x, real.x), accuracy(classifier, x, real.y))
        first = x if first is None else first
    return scores, first


def run_demo(out: str | Path = "outputs/image_gen_demo", quick: bool = False,
             ablations: bool = True, seed: int = 0) -> dict:
    """Train and evaluate everything; returns (and writes) metrics.json's content."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    b = QUICK if quick else FULL
    t0 = time.monotonic()
    half_a, half_b, everything = Digits(part="a", seed=seed), Digits(part="b", seed=seed), Digits()
    classifier = train_digits_classifier(everything.x, everything.y, b.classifier_epochs, seed)

    maes = {name: train_mae(compose(f"image_gen/{name}", [
        f"train.out={out / name.replace('digits_', '')}", f"train.steps={b.mae_steps}",
        f"mae_train.cls_steps={b.mae_cls_steps}", f"seed={seed}"]))
        for name in ("digits_mae", "digits_mae_pixel")}
    mae = maes["digits_mae"]
    runs = {"": (b.gen_steps, [f"encoder.path={mae}"]),
            "_pixel": (b.gen_steps, [f"encoder.path={maes['digits_mae_pixel']}"]),
            "_raw_only": (b.ablation_steps, ["encoder.path=null"])}
    if ablations and not quick:
        runs["_broken_antisymmetry"] = (b.ablation_steps, [f"encoder.path={mae}",
                                                           "drift.attraction_scale=1.5"])
    metrics: dict = {"proxy_fd_real_baseline": proxy_fd(classifier, half_a.x, half_b.x),
                     "real_accuracy_heldout": accuracy(classifier, half_b.x, half_b.y)}
    samples = {}
    for suffix, (steps, overrides) in runs.items():
        ckpt = _train_generator(out / f"generator{suffix}", steps,
                                [f"seed={seed}", *overrides])
        scores, x = _evaluate(ckpt, classifier, half_b, ALPHAS if suffix == "" else (1.0,))
        metrics[f"proxy_fd{suffix}"] = scores[1.0][0]
        metrics[f"class_accuracy{suffix}"] = scores[1.0][1]
        samples[suffix] = x
        if suffix == "":
            metrics["proxy_fd_by_alpha"] = {str(a): s[0] for a, s in scores.items()}
            metrics["class_accuracy_by_alpha"] = {str(a): s[1] for a, s in scores.items()}
        # the finished runs so far: an interrupted demo keeps them (rerun resumes the rest)
        (out / "metrics.partial.json").write_text(json.dumps(metrics, indent=1))
    cfg = compose("image_gen/digits")
    for suffix in ("", "_pixel"):
        images = to_images(samples[suffix], cfg)
        save_png(grid(images, half_b.y.numpy(), rows=10, per_row=12),
                 out / f"samples{suffix}.png")
    metrics.update({"budget": asdict(b), "quick": quick, "seed": seed,
                    "n_eval": len(half_b), "minutes": (time.monotonic() - t0) / 60,
                    "torch_threads": torch.get_num_threads()})
    (out / "metrics.json").write_text(json.dumps(metrics, indent=1))
    np.save(out / "samples_alpha1.npy", samples[""].numpy())
    return metrics
