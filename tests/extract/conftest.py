"""Fixtures shared by the extraction tests."""

import pytest


@pytest.fixture(scope="module")
def one_torch_thread():
    """MTCNN with 2 OpenMP threads slows down up to 10x when the 2 cores are shared; 1 thread is steady."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
