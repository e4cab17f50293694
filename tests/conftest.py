"""Fixtures shared by the test files."""
import pytest
import torch


@pytest.fixture
def one_thread():
    """Run the test with one intra-op thread, restoring the previous count after it.

    The test machines are small and shared: one thread avoids OpenMP threads spinning
    against other jobs, which made training steps several times slower.
    """
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
