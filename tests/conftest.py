"""Suite-wide settings: tests use tiny tensors, for which intra-op threads only add
synchronisation (milliseconds per op on a busy 2-core machine)."""

import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def _single_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
