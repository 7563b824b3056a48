import pytest
import torch

from tests._dist import Pool


@pytest.fixture(scope="session")
def world2():
    pool = Pool(2)
    yield pool
    pool.close()


@pytest.fixture(scope="session")
def world3():
    pool = Pool(3)
    yield pool
    pool.close()


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tests use small tensors: one intra-op thread is as fast, and much faster on a
    loaded 2-core machine where spawned ranks compete for the cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
