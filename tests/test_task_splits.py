"""Class-to-task assignment, per-task slicing and the validation split (on seq-synthetic)."""
import pytest
import torch

from datasets.continual_dataset import TaskData
from datasets.seq_synthetic import SequentialSynthetic
from utils.errors import UserError


def _rows(x: torch.Tensor) -> list[bytes]:
    return [img.numpy().tobytes() for img in x]


def _assert_tasks_match_raw(ds: SequentialSynthetic) -> None:
    """Every task holds exactly the images of its task_classes, with labels local to it."""
    raw = ds.load(ds.args)  # seq-synthetic's data is deterministic: the same arrays again
    k = ds.N_CLASSES_PER_TASK
    for split, get, raw_x, raw_y in (("train", ds.train_data, raw.train_x, raw.train_y),
                                     ("test", ds.test_data, raw.test_x, raw.test_y)):
        total = 0
        for task in range(ds.N_TASKS):
            data = get(task)
            assert torch.all(data.t == task)
            assert set(data.y.tolist()) == set(range(k))
            for local, original in enumerate(ds.task_classes(task)):
                expected = raw_x[raw_y == original]
                assert torch.equal(data.x[data.y == local], expected), (split, task, local)
            total += len(data)
        assert total == len(raw_y), split


def test_each_task_has_its_classes_and_every_class_appears_once(synthetic_args):
    ds = SequentialSynthetic(synthetic_args())
    k = ds.N_CLASSES_PER_TASK
    per_task = [ds.task_classes(t) for t in range(ds.N_TASKS)]
    assert all(len(classes) == k for classes in per_task)
    flat = [c for classes in per_task for c in classes]
    assert sorted(flat) == list(range(ds.N_TASKS * k))  # disjoint, and nothing left out
    for task in range(ds.N_TASKS):
        # labels are local to the task: 0..k-1, each with the class's full sample count
        assert torch.bincount(ds.train_data(task).y).tolist() == [ds.TRAIN_PER_CLASS] * k
        assert torch.bincount(ds.test_data(task).y).tolist() == [ds.TEST_PER_CLASS] * k


def test_default_class_order_is_label_order(synthetic_args):
    ds = SequentialSynthetic(synthetic_args())
    k = ds.N_CLASSES_PER_TASK
    for task in range(ds.N_TASKS):
        assert ds.task_classes(task) == list(range(task * k, task * k + k))
    _assert_tasks_match_raw(ds)


def test_class_order_seed_permutes_reproducibly(synthetic_args):
    first = SequentialSynthetic(synthetic_args("--class_order_seed", "5"))
    again = SequentialSynthetic(synthetic_args("--class_order_seed", "5"))
    other = SequentialSynthetic(synthetic_args("--class_order_seed", "6"))
    assert torch.equal(first.class_order, again.class_order)
    assert not torch.equal(first.class_order, other.class_order)
    for ds in (first, other):
        assert sorted(ds.class_order.tolist()) == list(range(ds.n_classes))
    assert first.class_order.tolist() != list(range(first.n_classes))
    _assert_tasks_match_raw(first)
    for task in range(first.N_TASKS):
        assert torch.equal(first.train_data(task).x, again.train_data(task).x)
        assert torch.equal(first.train_data(task).y, again.train_data(task).y)


@pytest.mark.parametrize("percent", [10.0, 25.0])
def test_validation_split_is_stratified_disjoint_and_replaces_the_test_set(synthetic_args,
                                                                           percent):
    plain = SequentialSynthetic(synthetic_args())
    ds = SequentialSynthetic(synthetic_args("--validation", str(percent)))
    k = ds.N_CLASSES_PER_TASK
    held_per_class = round(ds.TRAIN_PER_CLASS * percent / 100)
    test_rows = set(_rows(torch.cat([plain.test_data(t).x for t in range(ds.N_TASKS)])))
    for task in range(ds.N_TASKS):
        train, held, full = ds.train_data(task), ds.test_data(task), plain.train_data(task)
        assert torch.bincount(held.y, minlength=k).tolist() == [held_per_class] * k
        assert torch.bincount(train.y, minlength=k).tolist() == \
            [ds.TRAIN_PER_CLASS - held_per_class] * k
        held_rows, train_rows = _rows(held.x), _rows(train.x)
        assert not set(held_rows) & set(train_rows)
        assert not set(held_rows) & test_rows  # taken from training data, not the test set
        # together they are exactly the task's training data, each image with its label
        union = sorted(zip(held_rows + train_rows, held.y.tolist() + train.y.tolist()))
        assert union == sorted(zip(_rows(full.x), full.y.tolist()))
        assert torch.all(held.t == task)


def test_validation_split_keeps_at_least_one_training_image_per_class(synthetic_args):
    ds = SequentialSynthetic(synthetic_args("--validation", "99"))
    assert torch.bincount(ds.train_data(0).y).tolist() == [1, 1]
    with pytest.raises(UserError, match="holds out all 100 training images of class 0, "
                                        "leaving none to train on; use --validation 99 or less"):
        SequentialSynthetic(synthetic_args("--validation", "99.9"))


def test_validation_split_is_seeded(synthetic_args):
    a = SequentialSynthetic(synthetic_args("--validation", "20", "--seed", "1"))
    b = SequentialSynthetic(synthetic_args("--validation", "20", "--seed", "1"))
    c = SequentialSynthetic(synthetic_args("--validation", "20", "--seed", "2"))
    assert torch.equal(a.test_data(0).x, b.test_data(0).x)
    assert set(_rows(a.test_data(0).x)) != set(_rows(c.test_data(0).x))


def test_taskdata_concat_and_subset():
    a = TaskData(torch.zeros(2, 3, 4, 4, dtype=torch.uint8), torch.tensor([0, 1]),
                 torch.tensor([0, 0]))
    b = TaskData(torch.ones(3, 3, 4, 4, dtype=torch.uint8), torch.tensor([1, 0, 1]),
                 torch.tensor([1, 1, 1]))
    both = TaskData.concat([a, b])
    assert len(both) == 5
    assert both.t.tolist() == [0, 0, 1, 1, 1]
    picked = both.subset(torch.tensor([4, 0]))
    assert picked.y.tolist() == [1, 0]
    assert torch.equal(picked.x[0], b.x[2]) and torch.equal(picked.x[1], a.x[0])


def test_classes_are_interleaved_within_a_task(synthetic_args):
    """The synthetic source lists samples class by class; tasks come out round-robin, so any
    test batch (batch-statistics BatchNorm, --debug_mode's subset) sees every class."""
    ds = SequentialSynthetic(synthetic_args())
    k = ds.N_CLASSES_PER_TASK
    for task in range(ds.N_TASKS):
        for data in (ds.train_data(task), ds.test_data(task)):
            assert data.y[:4 * k].tolist() == list(range(k)) * 4
