"""Device placement, proven on a CPU machine with PyTorch's `meta` device.

A meta tensor has a device but no data: every op runs (shapes only, instantly), any read of a
value on the host (`.item()`, `bool(t)`, a data-dependent branch) raises, and `DeviceGuard`
records every op whose tensors sit on two devices — what CUDA refuses. A policy on `meta` that
trains, predicts and resumes under the guard therefore has no stray CPU tensor and no host sync
in those paths.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from drifting_policy.nn.normalizer import LinearNormalizer
from drifting_policy.nn.unet1d import ConditionalUnet1D

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
