"""Data parallelism on CPU (gloo): the batch order every rank sees, and the drifting policy's loss
and gradients under DistributedDataParallel against one process holding the whole batch."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file

from drifting_policy import checkpoint as ckpt
from drifting_policy.config import compose
from drifting_policy.data.replay_buffer import ReplayBuffer
from drifting_policy.data.sampler import EpochBatchSampler
from drifting_policy.nn.normalizer import LinearNormalizer
from drifting_policy.policy import DriftingConfig, make_policy
from drifting_policy.train import TrainWorkspace

pytestmark = pytest.mark.usefixtures("single_thread")


# ------------------------------------------------------------------------------ batch order
def test_ranks_share_one_permutation_in_disjoint_strided_shards():
    n, bs, world = 23, 4, 2
    ranks = [EpochBatchSampler(n, bs, seed=5, rank=r, world=world) for r in range(world)]
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(5 + 1)).tolist()
    for r, s in enumerate(ranks):
        shard = perm[: n - n % world][r::world]  # 11 each: two full batches, the rest dropped
        assert s.epoch_batches(1) == [shard[:4], shard[4:8]]
    seen = [i for s in ranks for b in s.epoch_batches(0) for i in b]
    assert len(seen) == len(set(seen)) == 16


def test_iteration_is_endless_and_resumes_from_the_used_position():
    s = EpochBatchSampler(10, 3, seed=0)  # 3 batches per epoch
    it = iter(s)
    stream = [next(it) for _ in range(7)]
    assert stream[:3] == s.epoch_batches(0) and stream[3:6] == s.epoch_batches(1)
    assert stream[6] == s.epoch_batches(2)[0]
    for _ in range(4):  # the consumer used 4 batches (the iterator ran ahead, prefetching)
        s.advance()
    assert s.state_dict() == {"epoch": 1, "consumed": 1, "world": 1}
    resumed = EpochBatchSampler(10, 3, seed=0)
    resumed.load_state_dict(s.state_dict())
    it = iter(resumed)
    assert [next(it) for _ in range(3)] == stream[4:7]


def test_resume_with_another_world_size_is_refused():
    state = EpochBatchSampler(16, 2, seed=0, rank=0, world=2).state_dict()
    with pytest.raises(ValueError, match="written by 2 ranks, this run has 1"):
        EpochBatchSampler(16, 2, seed=0).load_state_dict(state)
    with pytest.raises(ValueError, match="rank: expected 0..1, got 2"):
        EpochBatchSampler(16, 2, seed=0, rank=2, world=2)


# ------------------------------------------------------------------------------ drift statistics
LOWDIM = {"obs": {"obs": {"shape": [6], "type": "low_dim"}}, "action": {"shape": [2]}}
B, G, WORLD = 8, 4, 2
NORMALIZE = ("per_group", "global")


def _policy(normalize: str):
    """A small drifting policy, the same weights in every process."""
    torch.manual_seed(0)
    p = make_policy(DriftingConfig(shape_meta=LOWDIM, horizon=8, n_obs_steps=2, n_action_steps=4,
                                   down_dims=(16, 32), diffusion_step_embed_dim=16,
                                   gen_per_obs=G, normalize=normalize))
    norm = LinearNormalizer()
    norm.set_identity("obs", 6)
    norm.set_identity("action", 2)
    p.set_normalizer(norm)
    p.validate_drift = False
    return p


class FixedNoise(torch.nn.Module):
    """The policy's UNet fed given noise rows instead of a fresh draw, so one process and the
    ranks use the same noise for the same observation (row b * G + g belongs to observation b)."""

    def __init__(self, net: torch.nn.Module, noise: torch.Tensor) -> None:
        super().__init__()
        self.net, self.noise = net, noise

    def forward(self, noise, t, cond):
        return self.net(self.noise, t, cond)


def _global_batch() -> tuple[dict, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    batch = {"obs": torch.randn(B, 8, 6, generator=g), "action": torch.randn(B, 8, 2, generator=g)}
    return batch, torch.randn(B * G, 8, 2, generator=g)


def _loss_and_grads(policy, batch, noise, model=None) -> dict:
    policy.model = FixedNoise(policy.model, noise)
    loss, info = (model or policy)(batch)
    loss.backward()
    grads = {n: q.grad.clone() for n, q in policy.model.net.named_parameters()}
    return {"loss": loss.detach(), "scale": info["scale"], "grads": grads}


def _worker(rank: int, init: str, out: str) -> None:
    """One rank: its half of the global batch under DDP, drift statistics all-reduced or not."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=WORLD)
    batch, noise = _global_batch()
    n = B // WORLD
    mine = {k: v[rank * n : (rank + 1) * n] for k, v in batch.items()}
    results = {}
    for normalize in NORMALIZE:
        for reduce in (True, False):
            p = _policy(normalize)
            p.all_reduce_drift = reduce
            ddp = torch.nn.parallel.DistributedDataParallel(p, broadcast_buffers=False)
            results[normalize, reduce] = _loss_and_grads(
                p, mine, noise[rank * n * G : (rank + 1) * n * G], model=ddp)
    torch.save(results, f"{out}/rank{rank}.pt")
    dist.destroy_process_group()


@pytest.mark.timeout(240)
def test_ddp_drift_statistics_match_one_process_on_the_global_batch(tmp_path):
    """Two gloo ranks with half the batch each train exactly what one process trains on the
    whole batch (loss, gradients, scale) once the drift statistics are all-reduced; without the
    all-reduce they do not (the per-rank scale and lambdas change the objective)."""
    mp.spawn(_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=WORLD, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]
    batch, noise = _global_batch()
    for normalize in NORMALIZE:
        one = _loss_and_grads(_policy(normalize), batch, noise)
        synced = [r[normalize, True] for r in ranks]
        loss = sum(r["loss"] for r in synced) / WORLD  # DDP averages the ranks' gradients
        torch.testing.assert_close(loss, one["loss"], rtol=1e-5, atol=1e-7)
        for r in synced:
            torch.testing.assert_close(r["scale"], one["scale"], rtol=1e-5, atol=1e-7)
            for name, grad in one["grads"].items():
                torch.testing.assert_close(r["grads"][name], grad, rtol=1e-4, atol=1e-6,
                                           msg=f"{normalize}: {name}")
        local = ranks[0][normalize, False]
        assert not torch.allclose(local["scale"], one["scale"], rtol=1e-3)
        assert any(not torch.allclose(local["grads"][k], g, rtol=1e-3, atol=1e-5)
                   for k, g in one["grads"].items())


# ------------------------------------------------------------------------------ checkpoints
def _lowdim_zarr(path) -> None:
    rng = np.random.default_rng(0)
    buf = ReplayBuffer.empty()
    for n in (20, 24, 18):
        buf.add_episode({"state": rng.uniform(0, 512, (n, 5)).astype(np.float32),
                         "keypoint": rng.uniform(0, 512, (n, 9, 2)).astype(np.float32),
                         "action": rng.uniform(0, 512, (n, 2)).astype(np.float32)})
    buf.save(path)


def _torchrun_overrides(tmp_path, run: str, steps: int) -> list[str]:
    return [
        "policy=drifting", f"run_dir={tmp_path / run}",
        f"task.dataset.path={tmp_path / 'pusht.zarr'}", "device=cpu", "logging.mode=disabled",
        "policy.down_dims=[16,32]", "policy.diffusion_step_embed_dim=16",
        "training.batch_size=4", f"training.num_steps={steps}", "training.lr_scheduler=constant",
        "training.rollout_every=0", "training.checkpoint_every=2", "training.val_every=0",
        "training.log_every=1", "training.max_minutes=60",
    ]


def _torchrun(overrides: list[str], port: int) -> None:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--master_port", str(port), "-m", "drifting_policy.cli", "train", *overrides]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=280,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.mark.timeout(300)
def test_torchrun_checkpoint_holds_each_ranks_rng_and_resume_checks_the_world(tmp_path):
    """Two gloo ranks (with a time budget: rank 0's decision is broadcast every log step) write
    one checkpoint holding both ranks' RNG states; resuming it in one process is refused."""
    _lowdim_zarr(tmp_path / "pusht.zarr")
    overrides = _torchrun_overrides(tmp_path, "run", 2)
    _torchrun(overrides, 29531)
    latest = tmp_path / "run" / "checkpoints" / "latest"
    state = ckpt.load_train_state(latest)
    assert state["step"] == 2 and len(state["rng"]) == 2
    assert not torch.equal(state["rng"][0]["torch"], state["rng"][1]["torch"])  # seed + rank
    with pytest.raises(ValueError, match="written by 2 ranks, this run has 1"):
        TrainWorkspace(compose("train_policy", [*overrides, "resume=true"]))


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_torchrun_resume_is_exact_on_every_rank(tmp_path):
    """2 ranks x 4 steps equal 2 ranks x 2 steps, then resumed to 4: weights and EMA bit for bit
    (each rank gets its own RNG state back, so its drift noise continues where it stopped)."""
    _lowdim_zarr(tmp_path / "pusht.zarr")
    _torchrun(_torchrun_overrides(tmp_path, "full", 4), 29533)
    _torchrun(_torchrun_overrides(tmp_path, "part", 2), 29534)
    _torchrun([*_torchrun_overrides(tmp_path, "part", 4), "resume=true"], 29535)
    for name in (f"{ckpt.PRETRAINED}/model.safetensors", ckpt.RAW):  # EMA, raw weights
        a, b = (load_file(str(tmp_path / run / "checkpoints/latest" / name))
                for run in ("full", "part"))
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), f"{name}: {k}"
