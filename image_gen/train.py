"""`image-gen train` (the one-step generator) and `image-gen train-mae` (its feature encoder).

Configs live in configs/image_gen/ (hydra; `key=value` overrides). One generator step:
1. push >= push_per_step fresh real samples into the per-class and global queues;
2. draw N_c labels, a guidance scale alpha per label, pos_per_sample positives per label from
   its class queue and n_unc unconditional samples per label from the global queue;
3. generate gen_per_label samples per label from fresh noise/style (alpha fed to the DiT);
4. loss = feature_drift_loss(gen [N_c, G, ...], pos, unc, frozen MAE encoder,
   weight_neg = (alpha - 1)(G - 1) / n_unc); under torchrun the drift statistics are all-reduced.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import Dataset

from drifting_policy import checkpoint as ckpt
from image_gen.bank import ClassQueues
from image_gen.data import DataStream, Digits, ImageFolderFlips, LatentCache
from image_gen.dit import DiT
from image_gen.features import build_drift_features, feature_drift_loss
from image_gen.guidance import sample_alpha, unconditional_weights
from image_gen.loop import LoopConfig, run_loop, setup_dist
from image_gen.mae import ResNetMAE

DATA_KINDS = ("latent", "pixel", "digits")


def build_dataset(data: DictConfig) -> Dataset:
    """The training set of data.kind: latent (a cache-latents dir), pixel (an ImageFolder root)
    or digits (sklearn's bundled digits; data.part 'a'/'b'/null picks a half)."""
    if data.kind == "latent":
        return LatentCache(data.path)
    if data.kind == "pixel":
        return ImageFolderFlips(data.path, int(data.image_size))
    if data.kind == "digits":
        return Digits(int(data.image_size), data.get("part"))
    raise ValueError(f"data.kind: expected one of {DATA_KINDS}, got {data.kind!r}")


def build_generator(model_cfg: DictConfig):
    """DiT.from_preset(model.preset, **model.overrides) (weights freshly initialised)."""
    overrides = model_cfg.get("overrides")
    overrides = {} if overrides is None else OmegaConf.to_container(overrides, resolve=True)
    return DiT.from_preset(model_cfg.preset, **overrides)


def build_mae(mae_cfg: DictConfig):
    """ResNetMAE(**mae) (weights freshly initialised)."""
    kw = OmegaConf.to_container(mae_cfg, resolve=True)
    kw["stages"] = tuple(kw.get("stages", (3, 4, 6, 3)))
    return ResNetMAE(**kw)


def load_encoder(path: str | Path | None, device: torch.device | str = "cpu"):
    """The frozen feature encoder from a `train-mae` checkpoint directory; None -> None (the
    raw-only ablation)."""
    if path is None:
        return None
    path = Path(path)
    cfg = ckpt.load_config(path)
    if "mae" not in cfg:
        raise ValueError(f"encoder.path: {path} is not a train-mae checkpoint (no `mae` section "
                         f"in its config.yaml; found {sorted(cfg.keys())})")
    encoder = build_mae(cfg.mae)
    ckpt.load_weights(encoder, path / ckpt.MODEL)
    return encoder.to(device).eval().requires_grad_(False)


def _sample_shape(dataset: Dataset) -> tuple[int, ...]:
    return tuple(dataset[0][0].shape)


@dataclass
class DriftSettings:
    """The `drift` section: per-step sample counts, queues, guidance and loss options."""

    labels_per_step: int = 64
    gen_per_label: int = 64
    pos_per_sample: int = 64
    n_unc: int = 32
    queue_per_class: int = 128
    queue_global: int = 1000
    queue_dtype: str = "float32"
    push_per_step: int = 128
    prefill_min_per_class: int = 1
    temperatures: tuple[float, ...] = (0.02, 0.05, 0.2)
    attraction_scale: float = 1.0
    alpha_min: float = 1.0
    alpha_max: float = 4.0
    alpha_power: float = 5.0
    no_cfg_frac: float = 0.0

    @classmethod
    def from_cfg(cls, d: DictConfig) -> DriftSettings:
        keys = set(cls.__dataclass_fields__)
        unknown = sorted(set(d.keys()) - keys)
        if unknown:
            raise ValueError(f"drift: unknown keys {unknown}; expected some of {sorted(keys)}")
        kw = OmegaConf.to_container(d, resolve=True)
        if "temperatures" in kw:
            kw["temperatures"] = tuple(kw["temperatures"])
        s = cls(**kw)
        if s.push_per_step < 1 or s.gen_per_label < 2 or s.pos_per_sample < 1:
            raise ValueError(f"drift: expected push_per_step >= 1, gen_per_label >= 2, "
                             f"pos_per_sample >= 1, got {s.push_per_step}, {s.gen_per_label}, "
                             f"{s.pos_per_sample}")
        return s


def draw_labels(n: int, num_classes: int, generator: torch.Generator) -> torch.Tensor:
    """n labels Long[n]: distinct when n <= num_classes, otherwise uniform with replacement."""
    if n <= num_classes:
        return torch.randperm(num_classes, generator=generator)[:n]
    return torch.randint(num_classes, (n,), generator=generator)


def guided_drift_loss(
    gen: torch.Tensor,
    pos: torch.Tensor,
    unc: torch.Tensor | None,
    alpha: torch.Tensor,
    encoder: torch.nn.Module | None,
    s: DriftSettings,
    all_reduce: bool = False,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Feature drift loss (scalar) of gen [P, G, C, H, W] against pos [P, Np, C, H, W], with the
    unconditional samples unc [P, Nu, C, H, W] (or None) as extra negatives weighted
    (alpha - 1)(G - 1)/Nu per label (alpha [P]); `all_reduce` shares the drift statistics across
    DDP ranks."""
    w_unc = unconditional_weights(alpha, gen.shape[1], unc.shape[1]) if unc is not None else None
    drift_kwargs = {"attraction_scale": s.attraction_scale, "all_reduce": all_reduce}
    return feature_drift_loss(gen, pos, unc, encoder, weight_neg=w_unc,
                              temperatures=s.temperatures, drift_kwargs=drift_kwargs)


def generator_loss(
    net: torch.nn.Module,
    encoder: torch.nn.Module | None,
    labels: torch.Tensor,
    alpha: torch.Tensor,
    pos: torch.Tensor,
    unc: torch.Tensor | None,
    s: DriftSettings,
    noise_generator: torch.Generator,
    all_reduce: bool = False,
) -> tuple[torch.Tensor, dict[str, float]]:
    """One step's loss: G = s.gen_per_label samples per label from fresh noise and style, then
    `guided_drift_loss`. labels Long[P], alpha [P], pos, unc on the generator's device."""
    model = net.module if isinstance(net, torch.nn.parallel.DistributedDataParallel) else net
    g = s.gen_per_label
    noise, style = model.sample_inputs(len(labels) * g, labels.device, generator=noise_generator)
    gen = net(noise, labels.repeat_interleave(g), alpha.repeat_interleave(g), style)
    gen = gen.view(len(labels), g, *gen.shape[1:])
    return guided_drift_loss(gen, pos, unc, alpha, encoder, s, all_reduce)


def train(cfg: DictConfig) -> Path:
    """Train the generator described by cfg (see configs/image_gen/); returns the checkpoint dir.
    Resumes exactly from <train.out>/checkpoint when it exists."""
    job = setup_dist(cfg.get("device"))
    s = DriftSettings.from_cfg(cfg.drift)
    loop = LoopConfig.from_cfg(cfg.train)
    dataset = build_dataset(cfg.data)
    num_classes = len(dataset.classes)
    torch.manual_seed(int(cfg.seed))  # the same initial weights on every rank
    model = build_generator(cfg.model)
    shape = _sample_shape(dataset)
    want = (model.in_channels, model.input_size, model.input_size)
    if shape != want or model.num_classes != num_classes:
        raise ValueError(f"model: expected samples {want} and {model.num_classes} classes to match "
                         f"the data, got {shape} and {num_classes} classes from data.kind="
                         f"{cfg.data.kind}")
    encoder = build_drift_features(cfg.encoder, cfg.data.kind,
                                   load_encoder(cfg.encoder.get("path"), job.device), job.device)
    seed = int(cfg.seed) * 1000 + job.rank
    stream = DataStream(dataset, s.push_per_step, int(cfg.seed), rank=job.rank, world=job.world,
                        num_workers=int(cfg.data.get("num_workers", 0)))
    queues = ClassQueues(num_classes, shape, s.queue_per_class, s.queue_global,
                         getattr(torch, s.queue_dtype))
    g_cpu = torch.Generator().manual_seed(seed)
    g_dev = torch.Generator(device=job.device).manual_seed(seed + 1)

    def prefill() -> None:
        while queues.min_count() < s.prefill_min_per_class:
            queues.push(*stream.next())

    def loss_fn(net, step: int):
        queues.push(*stream.next())
        labels = draw_labels(s.labels_per_step, num_classes, g_cpu)
        alpha = sample_alpha(len(labels), s.alpha_min, s.alpha_max, s.alpha_power,
                             s.no_cfg_frac, g_cpu)
        pos = queues.sample_positive(labels, s.pos_per_sample, g_cpu)
        unc = queues.sample_unconditional((len(labels), s.n_unc), g_cpu) if s.n_unc else None
        dev = job.device
        loss, info = generator_loss(
            net, encoder, labels.to(dev), alpha.to(dev), pos.to(dev),
            None if unc is None else unc.to(dev), s, g_dev, all_reduce=job.world > 1)
        return loss, {**info, "alpha_mean": float(alpha.mean())}

    return run_loop(cfg, loop, model, loss_fn, stream, {"queues": queues},
                    {"cpu": g_cpu, "device": g_dev}, job, before_first_step=prefill)


def train_mae(cfg: DictConfig) -> Path:
    """Train the ResNet-MAE encoder from scratch (masked L2 on 2x2 patches); the last
    mae_train.cls_steps steps add mae_train.cls_weight * cross-entropy of its class head."""
    job = setup_dist(cfg.get("device"))
    loop = LoopConfig.from_cfg(cfg.train)
    m = cfg.mae_train
    dataset = build_dataset(cfg.data)
    torch.manual_seed(int(cfg.seed))
    model = build_mae(cfg.mae)
    cls_steps = int(m.get("cls_steps", 0))
    if cls_steps and model.fc is None:
        raise ValueError(f"mae_train.cls_steps: a classification fine-tune needs mae.num_classes "
                         f"> 0, got cls_steps={cls_steps} with num_classes=0")
    stream = DataStream(dataset, int(m.batch), int(cfg.seed), rank=job.rank, world=job.world,
                        num_workers=int(cfg.data.get("num_workers", 0)))
    g_dev = torch.Generator(device=job.device).manual_seed(int(cfg.seed) * 1000 + job.rank)
    ratio = float(m.get("mask_ratio", 0.5))

    def loss_fn(net, step: int):
        x, y = stream.next()
        x, y = x.to(job.device), y.to(job.device)
        mod = net.module if isinstance(net, torch.nn.parallel.DistributedDataParallel) else net
        x_masked, mask = mod.mask(x, ratio, g_dev)
        recon, logits = net(x_masked)
        loss = mod.recon_loss(recon, x, mask)  # on the encoder's (space-to-depth) grid
        info = {"mae_loss": float(loss.detach())}
        if step >= loop.steps - cls_steps:
            ce = torch.nn.functional.cross_entropy(logits.float(), y)
            loss = loss + float(m.get("cls_weight", 1.0)) * ce
            info["cls_loss"] = float(ce.detach())
            info["cls_acc"] = float((logits.argmax(1) == y).float().mean())
        return loss, info

    return run_loop(cfg, loop, model, loss_fn, stream, {}, {"device": g_dev}, job,
                    find_unused=model.fc is not None)  # the class head idles until cls_steps
