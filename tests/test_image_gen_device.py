"""image_gen's hot path on a device that is not the CPU (`meta`, creatable here): no tensor is
made on or read back to the CPU, no value is read on the host, and the loop touches the host only
on logging and checkpoint steps."""

import collections

import pytest
import torch
from diffusers.training_utils import EMAModel
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from image_gen import loop as loop_mod
from image_gen.bank import ClassQueues
from image_gen.convnext import ConvNeXtFeatures
from image_gen.dit import DiT
from image_gen.features import DriftFeatures, freeze
from image_gen.loop import Dist, LoopConfig, StepTimer, run_loop
from image_gen.mae import ResNetMAE
from image_gen.sample import generate
from image_gen.train import DriftSettings, generator_step

pytestmark = pytest.mark.usefixtures("single_thread")

META = torch.device("meta")


class CpuTensorLog(TorchDispatchMode):
    """Records every op that takes or returns a CPU tensor while active (`meta` tensors carry no
    data, so reading one on the host raises by itself)."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: collections.Counter = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten((args, kwargs, out))[0]:
            if isinstance(t, torch.Tensor) and t.device.type == "cpu":
                self.ops[str(func)] += 1
        return out


def _tiny(device):
    torch.manual_seed(0)
    model = DiT.from_preset("tiny", patch_size=4, hidden=32, depth=2, heads=2, n_class_tokens=1,
                            grad_checkpointing=True).to(device)
    enc = freeze(ResNetMAE(in_channels=1, width=4, stages=(1, 1), groups=2, num_classes=10))
    return model, enc.to(device)


def _tiny_latent(device):
    """A latent generator (4 x 8 x 8) with every feature part: MAE, ConvNeXt-V2 on the pixels
    the (tiny, random) VAE decodes."""
    import timm
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    model = DiT.from_preset("tiny", in_channels=4, input_size=8, patch_size=2, hidden=32,
                            depth=1, heads=2, n_class_tokens=1, grad_checkpointing=True)
    vae = AutoencoderKL(block_out_channels=(8, 8), down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4,
                        norm_num_groups=4, layers_per_block=1, sample_size=16)
    convnext = ConvNeXtFeatures(timm.create_model("convnextv2_atto", pretrained=False,
                                                  num_classes=0), resolution=32)
    mae = ResNetMAE(in_channels=4, width=4, stages=(1, 1), groups=2)
    return model.to(device), freeze(DriftFeatures(mae, convnext, vae)).to(device)


@pytest.mark.parametrize("build", [_tiny, _tiny_latent], ids=["mae", "mae+convnext+vae"])
def test_generator_step_makes_no_cpu_tensor_on_another_device(build):
    model, enc = build(META)
    shape = (model.in_channels, model.input_size, model.input_size)
    queues = ClassQueues(10, shape, per_class=8, global_size=20, dtype=torch.bfloat16,
                         device=META)
    s = DriftSettings(labels_per_step=4, gen_per_label=3, pos_per_sample=4, n_unc=2)
    ema = EMAModel(model.parameters(), decay=0.9, min_decay=0.9, foreach=True)
    x = torch.randn(16, *shape, device=META)
    labels = torch.randint(0, 10, (16,), device=META)
    with CpuTensorLog() as log:
        queues.push(x, labels, validate=False)
        loss, info = generator_step(model, enc, queues, s, Dist(0, 1, META), validate=False)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 2.0)
        ema.step(model.parameters())
    assert not log.ops, dict(log.ops)
    assert loss.device == META and grad_norm.device == META
    assert all(v.device == META and v.shape == () for v in info.values())
    assert any(k.startswith("stem/") for k in info) and "alpha_mean" in info
    assert all(p.grad is not None and p.grad.device == META for p in model.parameters())
    # the check itself fails on a stray CPU tensor (here: labels left on the host)
    with CpuTensorLog() as log:
        queues.push(x, labels.new_zeros(16, device="cpu"), validate=False)
    assert log.ops


def test_mae_training_step_makes_no_cpu_tensor_on_another_device():
    _, mae = _tiny(META)
    mae.requires_grad_(True).train()
    x = torch.randn(4, 1, 16, 16, device=META)
    with CpuTensorLog() as log:
        x_masked, mask = mae.mask(x, 0.5)
        recon, logits = mae(x_masked)
        loss = mae.recon_loss(recon, x, mask) + torch.nn.functional.cross_entropy(
            logits.float(), torch.zeros(4, dtype=torch.long, device=META))
        loss.backward()
    assert not log.ops, dict(log.ops)


def test_sampling_draws_seeded_inputs_on_the_cpu_then_moves_them():
    model, _ = _tiny("cpu")
    model.eval()
    with torch.no_grad():
        for block in model.blocks:  # a non-zero output layer: samples depend on the inputs
            torch.nn.init.normal_(block.ada[1].weight, std=0.02)
        torch.nn.init.normal_(model.final.linear.weight, std=0.02)
        labels = torch.arange(6) % 10
        got = generate(model, labels, 1.5, seed=3, batch=4)
        g, want = torch.Generator().manual_seed(3), []
        for chunk in (labels[:4], labels[4:]):  # one CPU generator, drawn chunk by chunk
            noise, style = model.sample_inputs(len(chunk), "cpu", g)
            want.append(model(noise, chunk, torch.full((len(chunk),), 1.5), style))
        want = torch.cat(want)
    assert got.abs().max() > 0
    torch.testing.assert_close(got, want)


class _Stream:
    consumed = 0

    def restart(self, consumed: int) -> None:
        self.consumed = consumed


def test_loop_reads_the_device_only_on_logging_and_checkpoint_steps(tmp_path, monkeypatch):
    from omegaconf import OmegaConf

    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1)
    flags, reads = [], []
    real = loop_mod.host_values
    monkeypatch.setattr(loop_mod, "host_values", lambda stats: reads.append(1) or real(stats))

    def loss_fn(net, step, validate):
        flags.append(validate)
        loss = net(torch.ones(2, 3)).square().mean()
        return loss, {"twice": 2 * loss.detach()}

    loop = LoopConfig(out=str(tmp_path), steps=7, log_every=3, checkpoint_every=5, ema=0.9,
                      wandb_mode="disabled", progress=False)
    cfg = OmegaConf.create({"train": {"steps": 7}})
    path = run_loop(cfg, loop, model, loss_fn, _Stream(), {}, {}, Dist())
    # host copies after steps 3, 5 (checkpoint), 6 and 7 (last); values checked on the steps
    # before a log (and on the first)
    assert len(reads) == 4
    assert flags == [True, False, True, False, False, True, True]
    meta = OmegaConf.load(path / "meta.json")
    assert meta.step == 7 and meta.twice == pytest.approx(2 * meta.loss)
    assert meta.s_per_step > 0 and meta.train_seconds >= meta.s_per_step


def test_step_timer_synchronises_the_cuda_device_before_reading_the_clock(monkeypatch):
    synced = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: synced.append(device))
    timer = StepTimer(torch.device("cuda", 1))
    timer.lap()
    timer.restart()
    assert synced == [torch.device("cuda", 1)] * 3
