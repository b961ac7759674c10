"""Shared test setup."""

import pytest
import torch


@pytest.fixture(scope="module")
def single_thread():
    """Tiny networks: one thread avoids OpenMP contention on a busy 2-core machine.
    Use with `pytestmark = pytest.mark.usefixtures("single_thread")`."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
