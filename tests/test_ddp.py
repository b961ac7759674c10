"""Data parallelism on CPU (gloo): the batch order every rank sees, and the drifting policy's loss
and gradients under DistributedDataParallel against one process holding the whole batch."""

from __future__ import annotations

import pytest
import torch

from drifting_policy.data.sampler import EpochBatchSampler

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
