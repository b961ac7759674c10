"""Device placement, proven on a CPU machine with PyTorch's `meta` device.

A meta tensor has a device but no data: every op runs (shapes only, instantly), any read of a
value on the host (`.item()`, `bool(t)`, a data-dependent branch) raises, and `DeviceGuard`
records every op whose tensors sit on two devices — what CUDA refuses. A policy on `meta` that
trains, predicts and resumes under the guard therefore has no stray CPU tensor and no host sync
in those paths.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from drifting_policy import train as train_module
from drifting_policy.config import compose
from drifting_policy.nn.normalizer import LinearNormalizer
from drifting_policy.nn.unet1d import ConditionalUnet1D
from drifting_policy.policy import config_from_dict, make_policy
from drifting_policy.train import TrainWorkspace
from drifting_policy.train import _to as train_to

pytestmark = [pytest.mark.usefixtures("single_thread"),
              pytest.mark.filterwarnings("ignore:for .*copying from a non-meta parameter")]

META = torch.device("meta")
_aten = torch.ops.aten
# explicit transfers: the one legitimate way for a tensor to change device
_TRANSFERS = {_aten.copy_.default, _aten._copy_from.default, _aten._copy_from_and_resize.default,
              _aten._to_copy.default}


class DeviceGuard(TorchDispatchMode):
    """Record ops that mix devices, read device values on the host, or build CPU tensors.

    mixed: an op (other than an explicit copy) with tensors on two devices. A 0-d CPU tensor
        does not count: torch passes it to any device's kernel as a host scalar (a scheduler's
        timestep, an optimiser's step count).
    host_read: `.item()` / `bool()` of a non-CPU tensor (a device-to-host sync on a GPU; on
        meta it raises as well).
    cpu_made: with `cpu_allowed=False`, any op outside the explicit copies that returns a CPU
        tensor of more than one element while the guard watches a non-CPU device.
    uploads: explicit host-to-device copies (legal, but a sync on a GPU unless pinned and
        non-blocking; kept out of `assert_clean`, tests count them where there should be none).
    """

    def __init__(self, cpu_allowed: bool = True) -> None:
        super().__init__()
        self.cpu_allowed = cpu_allowed
        self.mixed: list[str] = []
        self.host_read: list[str] = []
        self.cpu_made: list[str] = []
        self.uploads: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        tensors = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        devices = {t.device for t in tensors if not (t.device.type == "cpu" and t.ndim == 0)}
        desc = f"{func} on {sorted(str(d) for d in devices)}"
        if len(devices) > 1 and func not in _TRANSFERS:
            self.mixed.append(desc)
        if func is _aten._local_scalar_dense.default and tensors[0].device.type != "cpu":
            self.host_read.append(desc)
        out = func(*args, **kwargs)
        if func in _TRANSFERS and any(t.device.type == "cpu" for t in tensors) and any(
                isinstance(t, torch.Tensor) and t.device.type != "cpu" for t in tree_leaves(out)):
            self.uploads.append(desc)
        if not self.cpu_allowed and func not in _TRANSFERS:
            for t in tree_leaves(out):
                if isinstance(t, torch.Tensor) and t.device.type == "cpu" and t.numel() > 1:
                    self.cpu_made.append(f"{func} -> cpu {tuple(t.shape)}")
        return out

    def assert_clean(self) -> None:
        problems = self.mixed + self.host_read + self.cpu_made
        assert not problems, "device mistakes:\n" + "\n".join(dict.fromkeys(problems))


def _on(module: torch.nn.Module, device: torch.device) -> list[str]:
    """Names of the parameters and buffers of `module` that are not on `device`."""
    tensors = [*module.named_parameters(), *module.named_buffers()]
    return [f"{n} on {t.device}" for n, t in tensors if t.device != device]


def test_guard_catches_mixed_devices_host_reads_and_cpu_tensors():
    """The guard itself: each kind of mistake is caught, legal patterns are not."""
    x = torch.zeros(3, device=META)
    with DeviceGuard() as g:
        x @ torch.ones(3, 3)  # a CPU tensor in a meta op (meta's matmul would not complain)
    assert g.mixed
    with DeviceGuard() as g, pytest.raises(RuntimeError):
        (x > 0).any().item()  # a host read of a device value
    assert g.host_read
    with DeviceGuard(cpu_allowed=False) as g:
        torch.arange(4)  # built on the CPU while the model is elsewhere
    assert g.cpu_made
    host = torch.ones(3)
    with DeviceGuard(cpu_allowed=False) as g:
        y = x * torch.tensor(2.0) + host.to(META)  # host scalar, explicit transfer
        y.copy_(host)
    g.assert_clean()
    assert len(g.uploads) == 2  # both transfers seen
    assert y.device == META


# ------------------------------------------------------------------------------ normaliser
def _fitted() -> LinearNormalizer:
    rng = np.random.default_rng(0)
    norm = LinearNormalizer()
    norm.fit({"obs": rng.normal(size=(50, 4)), "action": rng.uniform(0, 512, (50, 2))})
    norm.set_image("image")
    return norm


def test_normalizer_follows_to_before_and_after_it_has_keys():
    empty = LinearNormalizer().to(META)
    empty.load_state_dict(_fitted().state_dict())
    assert sorted(empty.keys()) == ["action", "image", "obs"] and not _on(empty, META)
    empty.set_identity("pos", 3)
    empty.fit({"extra": np.ones((5, 2))})
    assert not _on(empty, META)
    assert "_placement" not in empty.state_dict()  # checkpoints unchanged

    fitted = _fitted()
    out = fitted.to(META).normalize({"obs": torch.zeros(2, 4, device=META)})["obs"]
    assert out.device == META


def test_normalizer_load_state_dict_copies_into_existing_parameters():
    target = _fitted()
    before = {n: p for n, p in target.named_parameters()}
    source = LinearNormalizer()
    source.fit({"obs": np.full((3, 4), 7.0), "action": np.arange(6.0).reshape(3, 2)})
    source.set_image("image")
    target.load_state_dict(source.state_dict())
    after = dict(target.named_parameters())
    assert all(after[n] is before[n] for n in before)  # same objects: optimiser/EMA references
    for n, p in source.state_dict().items():
        assert torch.equal(target.state_dict()[n], p), n
    # a key whose shape changed gets a new parameter (on the normaliser's device)
    wider = LinearNormalizer()
    wider.fit({"obs": np.ones((3, 6))})
    target.to(META).load_state_dict(wider.state_dict())
    assert target["obs"].scale.shape == (6,) and target["obs"].scale.device == META


def test_normalizer_refuses_input_on_another_device():
    norm = _fitted().to(META)
    with pytest.raises(ValueError, match=r"'obs': input on cpu, parameters on meta"):
        norm["obs"].normalize(torch.zeros(2, 4))
    assert norm["obs"].normalize(np.zeros((2, 4), np.float32)).device == META  # numpy: moved


# ------------------------------------------------------------------------------ networks
def test_unet_timestep_from_the_host_needs_no_copy():
    """A scheduler's CPU timestep (or a number) is filled in on the device: no transfer, so
    no host sync per denoising step on a GPU."""
    net = ConditionalUnet1D(2, 8, diffusion_step_embed_dim=8, down_dims=(8, 16)).to(META)
    x, cond = torch.zeros(3, 8, 2, device=META), torch.zeros(3, 8, device=META)
    for t in (torch.tensor(5), 0, torch.tensor([7])):
        with DeviceGuard(cpu_allowed=False) as g:
            out = net(x, t, cond)
        g.assert_clean()
        assert not g.uploads and out.device == META
    with DeviceGuard() as g:
        net(x, torch.full((3,), 5, device=META), cond)
    g.assert_clean()


# ------------------------------------------------------------------------------ policies
# (task, policy): lowdim and image, drifting and diffusion, each built from the training configs
CASES = [("pusht_lowdim", "drifting"), ("pusht_lowdim", "diffusion"),
         ("pusht_image", "drifting"), ("pusht_image", "diffusion")]
TINY = ["size=cpu", "policy.down_dims=[16,32]", "policy.diffusion_step_embed_dim=16"]
_RANDOM = ("rand", "normal", "uniform", "bernoulli")


def _policy_cfg(task: str, policy: str, *extra: str):
    return compose("train_policy", [f"task={task}", f"policy={policy}", *TINY, *extra])


def _fitted_for(policy) -> LinearNormalizer:
    """A normaliser fitted on the CPU (as the dataset's is) for `policy`'s keys."""
    norm = LinearNormalizer()
    for key, meta in policy.shape_meta["obs"].items():
        if meta["type"] == "rgb":
            norm.set_image(key)
        else:
            norm.fit({key: torch.rand(50, *meta["shape"]) * 512})
    norm.fit({"action": torch.rand(50, policy.action_dim) * 512})
    return norm


def _meta_policy(task: str, policy: str):
    # a 3-step DDPM loop: the same code as 100 steps, at a fraction of the guard's cost
    cfg = _policy_cfg(task, policy, *(["policy.num_inference_steps=3"] * (policy == "diffusion")))
    p = make_policy(config_from_dict(OmegaConf.to_container(cfg.policy, resolve=True)))
    p = p.to(META)
    p.set_normalizer(_fitted_for(p))
    return p


def _batch(policy, b: int = 3) -> dict:
    """A training batch on meta: images as the dataset delivers them (uint8 To frames)."""
    obs = {}
    for key, meta in policy.shape_meta["obs"].items():
        if meta["type"] == "rgb":
            obs[key] = torch.zeros(b, policy.n_obs_steps, *meta["shape"], dtype=torch.uint8,
                                   device=META)
        else:
            obs[key] = torch.zeros(b, policy.horizon, *meta["shape"], device=META)
    action = torch.zeros(b, policy.horizon, policy.action_dim, device=META)
    return {"obs": obs, "action": action}


@pytest.mark.parametrize("task, policy", CASES)
def test_policy_moved_then_given_a_normaliser_lives_on_the_device(task, policy):
    """The contract: built from configs, .to(dev), then set_normalizer -> every parameter and
    buffer on dev, and policy.device == dev."""
    p = _meta_policy(task, policy)
    assert not _on(p, META)
    assert p.device == META


@pytest.mark.parametrize("task, policy", CASES)
def test_loss_and_backward_on_the_device_without_a_host_sync(task, policy):
    p = _meta_policy(task, policy).train()
    p.validate_drift = False  # as the trainer sets it: value checks are host syncs
    with DeviceGuard(cpu_allowed=False) as g:
        loss, info = p.compute_loss_and_info(_batch(p))
        loss.backward()
    g.assert_clean()
    assert loss.device == META and all(v.device == META for v in info.values())
    grads = [q.grad for q in p.model.parameters()]
    assert all(gr is not None and gr.device == META for gr in grads)


@pytest.mark.parametrize("task, policy", CASES)
def test_predict_action_on_the_device_seeded_noise_drawn_on_the_generator(task, policy):
    p = _meta_policy(task, policy).eval()
    obs = _batch(p)["obs"]
    # the diffusion schedulers keep their timesteps and tables on the CPU by design (host
    # scalars for the device's kernels); nothing else may be built there
    with DeviceGuard(cpu_allowed=policy == "diffusion") as g:
        out = p.predict_action(obs)
    g.assert_clean()
    assert not g.uploads and out["action"].device == META  # unseeded: nothing from the host

    draws = []

    class Draws(DeviceGuard):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = super().__torch_dispatch__(func, types, args, kwargs)
            if any(r in func.__name__ for r in _RANDOM):
                draws.append(tree_leaves(out)[0].device.type)
            return out

    with Draws() as g:  # seeded: drawn on the CPU generator, then moved (same on every device)
        out = p.predict_action(obs, generator=torch.Generator().manual_seed(0))
    g.assert_clean()
    assert draws and set(draws) == {"cpu"} and out["action"].device == META


# ------------------------------------------------------------------------------ training
def _workspace(task, policy, data, run_dir, device, *extra) -> TrainWorkspace:
    return TrainWorkspace(_policy_cfg(
        task, policy, f"task.dataset.path={data}", f"run_dir={run_dir}", f"device={device}",
        "logging.mode=disabled", "training.batch_size=4", "training.log_every=1000",
        "task.dataset.val_ratio=0", *extra))


def _state_devices(ws: TrainWorkspace) -> list[str]:
    """Everything a training step touches that is not on meta (0-d step counters aside)."""
    bad = _on(ws.policy, META) + [f"ema/{n}" for n in _on(ws.ema_policy, META)]
    bad += [f"ema shadow {i}" for i, t in enumerate(ws.ema.shadow_params) if t.device != META]
    for group in ws.optimizer.state.values():
        bad += [f"optimizer {k}" for k, t in group.items()
                if isinstance(t, torch.Tensor) and t.ndim > 0 and t.device != META]
    return bad


@pytest.mark.parametrize("task, policy", CASES)
def test_training_step_and_resume_on_the_device(task, policy, random_pusht_zarr, tmp_path):
    """A workspace with device=meta trains without a stray CPU tensor or a host sync, and so
    does one resumed (weights, optimiser, EMA, RNG) from a checkpoint written on the CPU."""
    cpu = _workspace(task, policy, random_pusht_zarr, tmp_path, "cpu")
    cpu.train_step(next(iter(cpu.loader)))
    cpu.step = 1
    cpu.save("latest")

    for ws in (_workspace(task, policy, random_pusht_zarr, tmp_path / "fresh", "meta"),
               _workspace(task, policy, random_pusht_zarr, tmp_path, "meta", "resume=true")):
        assert ws.policy.device == META
        batch = next(iter(ws.loader))
        with DeviceGuard(cpu_allowed=False) as g:
            stats = ws.train_step(train_to(batch, META))
        g.assert_clean()
        assert all(v.device == META for v in stats.values())
        assert not _state_devices(ws)
    assert ws.step == 1 and ws.ema.optimization_step == 2  # resumed, then one more step


def test_time_budget_is_broadcast_as_a_device_tensor(random_pusht_zarr, tmp_path, monkeypatch):
    """Under DDP rank 0's decision travels in a tensor on the workspace's device (NCCL refuses
    CPU tensors)."""
    ws = _workspace("pusht_lowdim", "drifting", random_pusht_zarr, tmp_path, "meta")
    seen = []

    def broadcast(tensor, src):
        seen.append(tensor.device)
        raise InterruptedError  # stop before the value is read (meta holds none)

    monkeypatch.setattr(train_module.dist, "broadcast", broadcast)
    ws.world = 2
    with pytest.raises(InterruptedError):
        ws._out_of_time(60.0)
    assert seen == [META]


def test_host_copies_only_on_log_steps_and_bf16_autocast(random_pusht_zarr, tmp_path, monkeypatch):
    """The run loop reads the step's statistics (one host copy) only on logging steps; with
    training.precision=bf16 the networks run under bf16 autocast (CPU autocast here) while the
    drift loss stays float32."""
    copies, dtypes = [], []
    real_host = train_module._host
    monkeypatch.setattr(train_module, "_host", lambda v: copies.append(1) or real_host(v))
    ws = _workspace("pusht_lowdim", "drifting", random_pusht_zarr, tmp_path, "cpu",
                    "training.precision=bf16", "training.num_steps=6", "training.log_every=3",
                    "training.val_every=0", "training.rollout_every=0",
                    "training.checkpoint_every=0")
    assert ws.bf16
    ws.policy.model.register_forward_hook(lambda m, i, out: dtypes.append(out.dtype))
    ws.run()
    assert len(copies) == 2 and ws.step == 6
    assert set(dtypes) == {torch.bfloat16}
    logs = [json.loads(x) for x in (tmp_path / "logs.jsonl").read_text().splitlines()]
    losses = [r for r in logs if "train/loss" in r]
    assert [r["step"] for r in losses] == [3, 6] and all(np.isfinite(r["train/loss"])
                                                         for r in losses)
    assert ws.train_step(next(iter(ws.loader)))["loss"].dtype == torch.float32
    with pytest.raises(ValueError, match="training.precision: expected one of"):
        _workspace("pusht_lowdim", "drifting", random_pusht_zarr, tmp_path, "cpu",
                   "training.precision=fp16")
