"""Training batches: equal sizes (no remainder step), every image once per epoch."""
import pytest
import torch

from datasets.continual_dataset import TaskData, iterate_batches


def _data(n: int) -> TaskData:
    return TaskData(torch.zeros(n, 3, 2, 2, dtype=torch.uint8), torch.arange(n),
                    torch.zeros(n, dtype=torch.long))


@pytest.mark.parametrize("n", [1, 31, 32, 33, 63, 64, 193, 200, 10000])
@pytest.mark.parametrize("batch_size", [32, 128])
def test_equal_batches_cover_the_epoch_with_no_small_batch(n, batch_size):
    batches = list(iterate_batches(_data(n), batch_size, shuffle=True, augment=False,
                                   equal_sizes=True))
    sizes = [len(y) for _, y, _ in batches]
    n_batches = -(-n // batch_size)
    assert len(sizes) == n_batches
    assert max(sizes) <= batch_size and max(sizes) - min(sizes) <= 1
    if n >= batch_size:
        # The bound of the issue, rounded down: with n = 193, batch 32 the best split is
        # 28 x 4 + 27 x 3, and 27 < 32 * 6 / 7.
        assert min(sizes) >= batch_size * (n_batches - 1) // n_batches
    assert sorted(torch.cat([y for _, y, _ in batches]).tolist()) == list(range(n))


def test_default_batches_end_on_the_remainder_in_order():
    sizes = [len(y) for _, y, _ in iterate_batches(_data(200), 32, shuffle=False,
                                                   augment=False)]
    assert sizes == [32] * 6 + [8]


def test_max_batches_truncates_both_splittings():
    for equal in (False, True):
        batches = list(iterate_batches(_data(200), 32, shuffle=True, augment=False,
                                       equal_sizes=equal, max_batches=3))
        assert len(batches) == 3
