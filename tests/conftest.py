import pytest

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
