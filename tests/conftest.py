import pytest
import torch

from tests._dist import Pool


@pytest.fixture(scope="session")
def world2():
    """Two gloo ranks for the session. At teardown every rank must exit 0: an abort
    at interpreter exit fails the session (an error at teardown, pytest exits 1)."""
    pool = Pool(2)
    yield pool
    pool.close()


@pytest.fixture(scope="session")
def world3():
    """Three gloo ranks for the session; exit codes checked as for ``world2``."""
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
