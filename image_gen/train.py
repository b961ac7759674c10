"""`image-gen train` (the one-step generator) and `image-gen train-mae` (its feature encoder).

Configs live in configs/image_gen/ (hydra; `key=value` overrides). One generator step, on each
of the job's W ranks (everything after the push runs on the training device, without host syncs):
1. push push_per_step fresh real samples of this rank's data shard into this rank's per-class and
   global queues;
2. draw the step's labels_per_step labels (distinct when possible) and a guidance scale alpha per
   label from a generator seeded alike on every rank, so all ranks draw the same global set; rank
   r keeps its slice r of W (labels_per_step is the GLOBAL count of the paper's batch);
3. per kept label, pos_per_sample positives from its class queue and n_unc unconditional samples
   from the global queue; gen_per_label samples from fresh noise/style (alpha fed to the DiT);
4. loss = feature_drift_loss(gen [N_c / W, G, ...], pos, unc, frozen encoder features,
   weight_neg = (alpha - 1)(G - 1) / n_unc); under torchrun the drift statistics are all-reduced,
   so W ranks optimise the single-process objective of the global batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import Dataset

from image_gen import checkpoint as ckpt
from image_gen.bank import ClassQueues
from image_gen.data import DataStream, Digits, ImageFolderFlips, LatentCache
from image_gen.dit import DiT
from image_gen.features import build_drift_features, feature_drift_loss
from image_gen.guidance import sample_alpha, unconditional_weights
from image_gen.loop import Dist, LoopConfig, run_loop, setup_dist
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
    """The `drift` section: per-step sample counts, queues, guidance and loss options.

    labels_per_step is global (split evenly across the ranks, so 64 labels x gen_per_label 64 =
    4096 generated samples per step on 1 GPU or on 8); push_per_step is per rank (each rank
    refreshes its own queues from its own data shard)."""

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
        if s.alpha_min < 1:
            raise ValueError(f"drift.alpha_min: expected a guidance scale >= 1, got "
                             f"{s.alpha_min}")
        if s.prefill_min_per_class < 1:
            raise ValueError(f"drift.prefill_min_per_class: expected >= 1 (no class queue may be "
                             f"empty when sampled), got {s.prefill_min_per_class}")
        return s

    def labels_per_rank(self, world: int) -> int:
        """This job's labels per rank: labels_per_step / world, which must divide evenly."""
        if self.labels_per_step < world or self.labels_per_step % world:
            raise ValueError(f"drift.labels_per_step: expected a multiple of the world size "
                             f"{world} (it is the global number of labels per step, split "
                             f"evenly across ranks), got {self.labels_per_step}")
        return self.labels_per_step // world


def draw_labels(n: int, num_classes: int, generator: torch.Generator | None = None,
                device: torch.device | str | None = None) -> torch.Tensor:
    """n labels Long[n] on `device` (the generator's): distinct when n <= num_classes,
    otherwise uniform with replacement."""
    if n <= num_classes:
        return torch.randperm(num_classes, generator=generator, device=device)[:n]
    return torch.randint(num_classes, (n,), generator=generator, device=device)


def step_conditions(
    s: DriftSettings, num_classes: int, job: Dist, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's labels Long[P] and guidance scales [P] of one step, P = labels_per_step /
    world: the step's global draw (`draw_labels`, then `sample_alpha`) from `generator`, which
    every rank seeds and advances alike, and this rank's contiguous slice of it. Drawn on
    job.device."""
    n, per = s.labels_per_step, s.labels_per_rank(job.world)
    labels = draw_labels(n, num_classes, generator, job.device)
    alpha = sample_alpha(n, s.alpha_min, s.alpha_max, s.alpha_power, s.no_cfg_frac, generator,
                         job.device)
    mine = slice(job.rank * per, (job.rank + 1) * per)
    return labels[mine], alpha[mine]


def guided_drift_loss(
    gen: torch.Tensor,
    pos: torch.Tensor,
    unc: torch.Tensor | None,
    alpha: torch.Tensor,
    encoder: torch.nn.Module | None,
    s: DriftSettings,
    all_reduce: bool = False,
    validate: bool = True,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Feature drift loss (scalar) of gen [P, G, C, H, W] against pos [P, Np, C, H, W], with the
    unconditional samples unc [P, Nu, C, H, W] (or None) as extra negatives weighted
    (alpha - 1)(G - 1)/Nu per label (alpha [P]); `all_reduce` shares the drift statistics across
    DDP ranks; `validate` checks values on the host (see feature_drift_loss)."""
    w_unc = (unconditional_weights(alpha, gen.shape[1], unc.shape[1], validate)
             if unc is not None else None)
    drift_kwargs = {"attraction_scale": s.attraction_scale, "all_reduce": all_reduce}
    return feature_drift_loss(gen, pos, unc, encoder, weight_neg=w_unc,
                              temperatures=s.temperatures, drift_kwargs=drift_kwargs,
                              validate=validate)


def generator_loss(
    net: torch.nn.Module,
    encoder: torch.nn.Module | None,
    labels: torch.Tensor,
    alpha: torch.Tensor,
    pos: torch.Tensor,
    unc: torch.Tensor | None,
    s: DriftSettings,
    noise_generator: torch.Generator | None = None,
    all_reduce: bool = False,
    validate: bool = True,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One step's loss: G = s.gen_per_label samples per label from fresh noise and style, then
    `guided_drift_loss`. labels Long[P], alpha [P], pos, unc on the generator's device in any
    float dtype (the queues' storage dtype): they are cast to the generator output's dtype,
    a no-op for bf16 queues under bf16 autocast, an upcast on the device in float32 training."""
    model = net.module if isinstance(net, torch.nn.parallel.DistributedDataParallel) else net
    g = s.gen_per_label
    noise, style = model.sample_inputs(len(labels) * g, labels.device, generator=noise_generator)
    gen = net(noise, labels.repeat_interleave(g), alpha.repeat_interleave(g), style,
              validate=validate)
    gen = gen.view(len(labels), g, *gen.shape[1:])
    pos = pos.to(gen.dtype)
    unc = None if unc is None else unc.to(gen.dtype)
    return guided_drift_loss(gen, pos, unc, alpha, encoder, s, all_reduce, validate)


def generator_step(
    net: torch.nn.Module,
    encoder: torch.nn.Module | None,
    queues: ClassQueues,
    s: DriftSettings,
    job: Dist,
    shared: torch.Generator | None = None,
    local: torch.Generator | None = None,
    validate: bool = True,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Steps 2-4 of the module docstring on job.device (queues there too): this rank's labels
    and alpha (`shared`: the generator every rank seeds alike), positives and unconditional
    samples (`local`: this rank's generator, also for noise and style), the generator's loss.
    Returns (scalar loss, 0-d device tensors for the log); no host sync unless `validate`."""
    labels, alpha = step_conditions(s, queues.num_classes, job, shared)
    pos = queues.sample_positive(labels, s.pos_per_sample, local, validate)
    unc = (queues.sample_unconditional((len(labels), s.n_unc), local, validate)
           if s.n_unc else None)
    loss, info = generator_loss(net, encoder, labels, alpha, pos, unc, s, local,
                                all_reduce=job.world > 1, validate=validate)
    return loss, {**info, "alpha_mean": alpha.mean()}


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
    s.labels_per_rank(job.world)  # a clear error before anything is loaded
    encoder = build_drift_features(cfg.encoder, cfg.data.kind,
                                   load_encoder(cfg.encoder.get("path"), job.device), job.device)
    stream = DataStream(dataset, s.push_per_step, int(cfg.seed), rank=job.rank, world=job.world,
                        num_workers=int(cfg.data.get("num_workers", 0)),
                        pin_memory=job.device.type == "cuda")
    queues = ClassQueues(num_classes, shape, s.queue_per_class, s.queue_global,
                         getattr(torch, s.queue_dtype), job.device)
    shared = torch.Generator(device=job.device).manual_seed(int(cfg.seed))
    local = torch.Generator(device=job.device).manual_seed(int(cfg.seed) * 1000 + job.rank + 1)

    def prefill() -> None:
        while queues.min_count() < s.prefill_min_per_class:
            queues.push(*stream.next())

    def loss_fn(net, step: int, validate: bool):
        queues.push(*stream.next(), validate=validate)
        return generator_step(net, encoder, queues, s, job, shared, local, validate)

    return run_loop(cfg, loop, model, loss_fn, stream, {"queues": queues},
                    {"shared": shared, "local": local}, job, before_first_step=prefill)


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
                        num_workers=int(cfg.data.get("num_workers", 0)),
                        pin_memory=job.device.type == "cuda")
    g_dev = torch.Generator(device=job.device).manual_seed(int(cfg.seed) * 1000 + job.rank)
    ratio = float(m.get("mask_ratio", 0.5))

    def loss_fn(net, step: int, validate: bool):
        x, y = stream.next()
        x = x.to(job.device, non_blocking=True)
        y = y.to(job.device, non_blocking=True)
        mod = net.module if isinstance(net, torch.nn.parallel.DistributedDataParallel) else net
        x_masked, mask = mod.mask(x, ratio, g_dev)
        recon, logits = net(x_masked)
        loss = mod.recon_loss(recon, x, mask)  # on the encoder's (space-to-depth) grid
        info = {"mae_loss": loss.detach()}
        if step >= loop.steps - cls_steps:
            ce = torch.nn.functional.cross_entropy(logits.float(), y)
            loss = loss + float(m.get("cls_weight", 1.0)) * ce
            info["cls_loss"] = ce.detach()
            info["cls_acc"] = (logits.argmax(1) == y).float().mean()
        return loss, info

    return run_loop(cfg, loop, model, loss_fn, stream, {}, {"device": g_dev}, job,
                    find_unused=model.fc is not None)  # the class head idles until cls_steps
