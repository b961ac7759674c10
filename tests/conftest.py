"""Shared test setup."""

import numpy as np
import pytest
import torch

from drifting_policy.data.replay_buffer import ReplayBuffer


@pytest.fixture(scope="module")
def single_thread():
    """Tiny networks: one thread avoids OpenMP contention on a busy 2-core machine.
    Use with `pytestmark = pytest.mark.usefixtures("single_thread")`."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def random_pusht_zarr(tmp_path_factory):
    """Three random PushT episodes (20, 24, 18 steps) in Diffusion Policy's zarr layout
    (uint8 96x96 images)."""
    rng = np.random.default_rng(0)
    buf = ReplayBuffer.empty()
    for n in (20, 24, 18):
        buf.add_episode({"img": rng.integers(0, 256, (n, 96, 96, 3)).astype(np.uint8),
                         "state": rng.uniform(0, 512, (n, 5)).astype(np.float32),
                         "keypoint": rng.uniform(0, 512, (n, 9, 2)).astype(np.float32),
                         "action": rng.uniform(0, 512, (n, 2)).astype(np.float32)})
    path = tmp_path_factory.mktemp("data") / "pusht.zarr"
    buf.save(path)
    return path
