"""The data-parallel pre-training sampler: rank slicing, dropped tail and exact resume."""

from __future__ import annotations

import pytest

from moe_recipes.data.sampler import PretrainBatchSampler


def flatten_steps(total: int, consumed: int, mbs: int, dp: int) -> list[list[int]]:
    """Global micro steps: per step, the concatenation of every rank's micro batch in rank order."""
    per_rank = [list(PretrainBatchSampler(total, consumed, mbs, r, dp)) for r in range(dp)]
    assert len({len(batches) for batches in per_rank}) == 1, "ranks must run the same number of steps"
    return [sum((per_rank[r][s] for r in range(dp)), []) for s in range(len(per_rank[0]))]


def test_rank_slices_of_each_step() -> None:
    assert list(PretrainBatchSampler(20, 0, 2, 0, 2)) == [[0, 1], [4, 5], [8, 9], [12, 13], [16, 17]]
    assert list(PretrainBatchSampler(20, 0, 2, 1, 2)) == [[2, 3], [6, 7], [10, 11], [14, 15], [18, 19]]
    assert list(PretrainBatchSampler(10, 0, 3, 2, 3)) == [[6, 7, 8]]


def test_incomplete_last_step_is_dropped() -> None:
    for total in (21, 22, 23):
        sampler = PretrainBatchSampler(total, 0, 2, 1, 2)
        assert len(sampler) == 5 and list(sampler)[-1] == [18, 19]
    assert list(PretrainBatchSampler(3, 0, 2, 0, 2)) == []
    assert list(PretrainBatchSampler(8, 8, 2, 0, 2)) == []


@pytest.mark.parametrize(("mbs", "dp"), [(1, 1), (2, 2), (3, 4), (4, 3)])
def test_union_over_ranks_is_the_global_order(mbs: int, dp: int) -> None:
    total = 101
    steps = flatten_steps(total, 0, mbs, dp)
    single = list(PretrainBatchSampler(total, 0, mbs * dp, 0, 1))
    assert steps == single
    flat = sum(steps, [])
    assert flat == list(range(len(flat))) and total - len(flat) < mbs * dp


@pytest.mark.parametrize(("mbs", "dp"), [(2, 2), (3, 2), (1, 4)])
def test_resume_from_any_consumed_samples_is_the_tail(mbs: int, dp: int) -> None:
    total, gmb = 120, mbs * dp
    full = flatten_steps(total, 0, mbs, dp)
    for steps_done in range(len(full) + 1):  # resume at every step boundary: exactly the remaining steps
        assert flatten_steps(total, steps_done * gmb, mbs, dp) == full[steps_done:]
    for consumed in range(total + 1):  # any position: the tail of the global order from there
        flat = sum(flatten_steps(total, consumed, mbs, dp), [])
        assert flat == list(range(consumed, consumed + (total - consumed) // gmb * gmb))


def test_works_as_dataloader_batch_sampler() -> None:
    torch = pytest.importorskip("torch")
    data = torch.arange(100) * 10
    sampler = PretrainBatchSampler(len(data), 40, 4, 1, 2)
    batches = list(torch.utils.data.DataLoader(data, batch_sampler=sampler))
    assert len(batches) == len(sampler) == 7
    assert batches[0].tolist() == [440, 450, 460, 470]


@pytest.mark.parametrize(
    ("args", "key"),
    [
        ((10, 0, 0, 0, 1), "micro_batch_size"),
        ((10, 0, 2, 0, 0), "dp_size"),
        ((10, 0, 2, 2, 2), "dp_rank"),
        ((10, 0, 2, -1, 2), "dp_rank"),
        ((10, 11, 2, 0, 1), "consumed_samples"),
        ((-1, 0, 2, 0, 1), "total_samples"),
        ((10, -1, 2, 0, 1), "consumed_samples"),
        ((10.0, 0, 2, 0, 1), "total_samples"),
    ],
)
def test_invalid_arguments_name_the_key(args: tuple, key: str) -> None:
    with pytest.raises(ValueError, match=key):
        PretrainBatchSampler(*args)
