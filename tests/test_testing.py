"""distnorm.testing: the big-batch oracle users run on their own models passes for a
converted model and catches one that does not synchronize (local BatchNorm), on real
gloo ranks (the session pool; one run through spawn_ranks, whose exit codes are checked)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import distnorm
from distnorm.testing import (CATEGORIES, RankPool, assert_matches_big_batch, compare_to_big_batch,
                              split_batch, split_batches)


def small_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                         nn.Conv2d(4, 5, 3, padding=1), nn.BatchNorm2d(5),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(5, 3))


def no_conversion(model: nn.Module) -> nn.Module:
    """A 'conversion' that leaves torch's BatchNorm: each rank normalizes alone."""
    return model


def _batches(total: int, steps: int = 2, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(total, 3, 6, 5, generator=gen) * 1.5 + 0.3,
             torch.randint(0, 3, (total,), generator=gen)) for _ in range(steps)]


@pytest.mark.parametrize("sizes,ddp", [((3, 5), True), ((0, 4), False)], ids=["3+5-ddp", "0+4-manual"])
def test_converted_net_matches_the_big_batch(world2, sizes, ddp):
    report = assert_matches_big_batch(small_net, split_batches(_batches(sum(sizes)), sizes),
                                      ddp=ddp, pool=world2)
    assert report.ok and report.world_size == 2 and report.steps == 2
    assert report.shard_sizes == (sizes, sizes) and not report.missing
    assert set(report.max_abs_diff) == set(CATEGORIES)
    assert max(report.max_abs_diff.values()) < 1e-9, str(report)
    assert "matches BatchNorm on the big batch" in str(report)


def test_steps_reuse_batches_and_options_reach_convert_model(world2):
    # BatchRenorm with r_max=1, d_max=0 is BatchNorm: still the big batch's.
    report = compare_to_big_batch(small_net, split_batches(_batches(6, steps=1), [2, 4]), mode="brn",
                                  options={"r_max": 1.0, "d_max": 0.0}, steps=3, pool=world2)
    assert report.ok and report.steps == 3, str(report)


def test_local_batch_norm_is_caught_as_a_mismatch(world2):
    """A model whose BatchNorm is not synchronized differs at the first step's outputs,
    and the assertion says so."""
    batches = split_batches(_batches(8, steps=1), [3, 5])
    with pytest.raises(AssertionError) as error:
        assert_matches_big_batch(small_net, batches, convert=no_conversion, pool=world2)
    text = str(error.value)
    assert "DOES NOT match" in text and "(custom)" in text
    line = next(l for l in text.splitlines() if l.strip().startswith("outputs"))
    assert " NO " in line and "rank" in line


@pytest.mark.slow
def test_the_default_path_spawns_fresh_ranks():
    """Without a pool, fresh ranks through spawn_ranks (every exit code checked); one
    rank keeps it cheap (a synced layer is then local BatchNorm: a match)."""
    report = assert_matches_big_batch(small_net, [[b] for b in _batches(4, steps=1)], timeout=240)
    assert report.world_size == 1 and report.ok


def test_bad_batches_are_refused_before_any_rank_starts():
    one = _batches(4, steps=1)
    with pytest.raises(ValueError, match="same, non-zero number of batches"):
        compare_to_big_batch(small_net, [one, one + one])
    with pytest.raises(ValueError, match="step 0 has no samples"):
        compare_to_big_batch(small_net, split_batches(one, [4, 0]) and [[torch.zeros(0, 3, 6, 5)]] * 2)
    with pytest.raises(ValueError, match="do not split a batch of 4"):
        split_batch(one[0], [1, 2])
    assert [s[0].shape[0] for s in split_batch(one[0], [0, 4])] == [0, 4]

    class FakePool:
        world = 3
    with pytest.raises(ValueError, match="a pool of 3 ranks for 2"):
        compare_to_big_batch(small_net, split_batches(one, [2, 2]), pool=FakePool())  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="must be >= 1"):
        RankPool(0)


def test_the_tests_use_the_public_harness():
    import tests._dist

    assert tests._dist.Pool is RankPool
    assert distnorm.testing.spawn_ranks is distnorm.launch.local.spawn
