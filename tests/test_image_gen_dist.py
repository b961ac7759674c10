"""image_gen under data parallelism, with gloo on CPU: the global labels_per_step split across
ranks gives the single-process gradients, and a 2-rank `train` writes one state file per rank
and resumes each rank exactly."""

import os
import shutil
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file
from test_image_gen_train import TINY

from drifting_policy.config import compose
from image_gen.dit import DiT
from image_gen.loop import Dist
from image_gen.mae import ResNetMAE
from image_gen.train import DriftSettings, guided_drift_loss, step_conditions, train

pytestmark = pytest.mark.usefixtures("single_thread")

K = 10  # classes
SETTINGS = DriftSettings(labels_per_step=4, gen_per_label=3, pos_per_sample=5, n_unc=2,
                         alpha_max=3.0, alpha_power=1.0, no_cfg_frac=0.25)


def _tables():
    """The model, encoder and per-class inputs (noise, style, positives, unconditional), looked
    up by label so that a rank's inputs follow the labels it drew."""
    torch.manual_seed(0)
    model = DiT.from_preset("tiny", patch_size=4, hidden=32, depth=1, heads=2, n_class_tokens=1)
    enc = ResNetMAE(in_channels=1, width=4, stages=(1, 1), groups=2).eval().requires_grad_(False)
    g, gen = SETTINGS.gen_per_label, torch.Generator().manual_seed(1)
    noise, style = model.sample_inputs(K * g, "cpu", gen)
    tables = {"noise": noise.view(K, g, 1, 16, 16), "style": style.view(K, g, -1),
              "pos": torch.randn(K, 5, 1, 16, 16, generator=gen)
              * torch.arange(1, K + 1).view(K, 1, 1, 1, 1),
              "unc": torch.randn(K, 2, 1, 16, 16, generator=gen)}
    return model, enc, tables


def _loss(net, enc, tables, job):
    """The trainer's loss on this rank's share of one step (labels and alpha from
    step_conditions with a generator seeded alike on every rank)."""
    labels, alpha = step_conditions(SETTINGS, K, job, torch.Generator().manual_seed(7))
    g = SETTINGS.gen_per_label
    gen = net(tables["noise"][labels].flatten(0, 1), labels.repeat_interleave(g),
              alpha.repeat_interleave(g), tables["style"][labels].flatten(0, 1))
    gen = gen.view(len(labels), g, 1, 16, 16)
    loss, _ = guided_drift_loss(gen, tables["pos"][labels], tables["unc"][labels], alpha, enc,
                                SETTINGS, all_reduce=job.world > 1)
    return loss, labels, alpha


def _cfg(out, *extra):  # DDP through checkpointed DiT blocks, as the latent configs run
    return compose("image_gen/digits", [f"train.out={out}", *TINY, "drift.labels_per_step=4",
                                        "+model.overrides.grad_checkpointing=true", *extra])


def _rank(rank, world, port, root):
    """One gloo rank: the loss share of `_loss` (gradients, labels and alpha gathered to rank 0's
    file), then `image-gen train` straight for 3 steps and stopped after 1 then resumed."""
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      LOCAL_RANK=str(rank), WORLD_SIZE=str(world))
    dist.init_process_group("gloo")
    try:
        model, enc, tables = _tables()
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        loss, labels, alpha = _loss(ddp, enc, tables, Dist(rank, world))
        loss.backward()  # DDP averages the gradients of the equal-sized shares
        gathered = [[torch.empty_like(t) for _ in range(world)] for t in (labels, alpha)]
        dist.all_gather(gathered[0], labels)
        dist.all_gather(gathered[1], alpha)
        if rank == 0:
            torch.save({"grads": [p.grad for p in model.parameters()],
                        "labels": torch.cat(gathered[0]), "alpha": torch.cat(gathered[1])},
                       f"{root}/parity.pt")
        train(_cfg(f"{root}/straight", "train.steps=3"))
        train(_cfg(f"{root}/resumed", "train.steps=3", "train.stop_after=1"))
        train(_cfg(f"{root}/resumed", "train.steps=3"))
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def gloo_run(tmp_path_factory):
    """Two gloo ranks of `_rank`, spawned once for the tests of this module."""
    root = tmp_path_factory.mktemp("gloo")
    mp.spawn(_rank, args=(2, _free_port(), str(root)), nprocs=2)
    return root


def test_global_labels_split_across_two_gloo_ranks_give_the_single_process_gradients(gloo_run):
    model, enc, tables = _tables()
    loss, labels, alpha = _loss(model, enc, tables, Dist(0, 1))
    loss.backward()
    assert len(labels) == 4 and len(set(labels.tolist())) == 4  # distinct global labels
    out = torch.load(gloo_run / "parity.pt", weights_only=True)
    assert torch.equal(out["labels"], labels)  # the ranks' shares are the global draw, in order
    assert torch.equal(out["alpha"], alpha)
    full = [p.grad for p in model.parameters()]
    assert any(g.abs().max() > 0 for g in full)
    for a, b in zip(out["grads"], full):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError, match="labels_per_step: expected a multiple of the world "
                                         "size 3"):
        step_conditions(SETTINGS, K, Dist(0, 3))


def test_two_rank_training_writes_per_rank_state_and_resumes_each_rank_exactly(gloo_run, tmp_path):
    straight, resumed = gloo_run / "straight" / "checkpoint", gloo_run / "resumed" / "checkpoint"
    state = torch.load(resumed / "train_state.pt", weights_only=True)
    assert state["world"] == 2 and state["step"] == 3
    for name in ("model.safetensors", "ema.safetensors"):
        a, b = load_file(straight / name), load_file(resumed / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ranks = {}
    for r in range(2):
        a, b = (torch.load(p / "ranks" / f"rank_{r:05d}.pt", weights_only=True)
                for p in (straight, resumed))
        assert a["consumed"] == b["consumed"]
        for k in ("shared", "local"):
            assert torch.equal(a["generators"][k], b["generators"][k])
        for k, v in a["extra"]["queues"].items():
            assert torch.equal(v, b["extra"]["queues"][k]), (r, k)
        assert torch.equal(a["rng"]["torch"], b["rng"]["torch"])
        ranks[r] = b
    # each rank kept its own state: its data shard, queues and noise stream, not rank 0's copy
    queues = [ranks[r]["extra"]["queues"]["items"] for r in range(2)]
    assert not torch.equal(*queues)
    assert not torch.equal(ranks[0]["generators"]["local"], ranks[1]["generators"]["local"])
    assert torch.equal(ranks[0]["generators"]["shared"], ranks[1]["generators"]["shared"])
    copy = tmp_path / "copy"
    shutil.copytree(resumed, copy / "checkpoint")
    with pytest.raises(ValueError, match="written by 2 ranks, this job has 1"):
        train(_cfg(copy, "train.steps=4"))
