"""Fixtures shared by the inference tests."""

import pytest
import torch


@pytest.fixture(scope="module")
def one_thread():
    """torch on one thread for a module of tiny models: two threads add only synchronisation, and on a busy
    2-core machine a file ran 5 s with one thread against 13-22 s with two."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
