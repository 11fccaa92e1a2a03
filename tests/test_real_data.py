"""Integration: the offline copies of CIFAR-10, CIFAR-100 and Tiny-ImageNet load as benchmarks.

Each dataset is loaded once per session (decoding 60,000 JPEGs takes seconds; later sessions
hit the decode cache). Skipped, with the reason, when the real data is not available.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from datasets.seq_cifar10 import SequentialCIFAR10
from datasets.seq_cifar100 import SequentialCIFAR100
from datasets.seq_tinyimg import SequentialTinyImageNet
from helpers import dataset_args, decode_file, real_folder


def _assert_found_with_label(ds, path: Path, label: int, split: str) -> None:
    """The image decoded by PIL is in its class's task, with the local label of that class."""
    task, local = divmod(label, ds.N_CLASSES_PER_TASK)
    data = ds.train_data(task) if split == "train" else ds.test_data(task)
    same = (data.x == decode_file(path)).flatten(1).all(1)
    assert same.any(), path
    assert torch.all(data.y[same] == local), path


def _assert_split_sizes(ds, train_per_class: list[int], test_per_class: list[int]) -> None:
    k = ds.N_CLASSES_PER_TASK
    size = (ds.CHANNELS, ds.IMAGE_SIZE, ds.IMAGE_SIZE)
    for task in range(ds.N_TASKS):
        for data, per_class in ((ds.train_data(task), train_per_class),
                                (ds.test_data(task), test_per_class)):
            assert data.x.dtype == torch.uint8 and tuple(data.x.shape[1:]) == size
            assert torch.bincount(data.y, minlength=k).tolist() == \
                per_class[task * k:(task + 1) * k]
            assert torch.all(data.t == task)
    assert sum(len(ds.train_data(t)) for t in range(ds.N_TASKS)) == sum(train_per_class)
    assert sum(len(ds.test_data(t)) for t in range(ds.N_TASKS)) == sum(test_per_class)


@pytest.fixture(scope="session")
def cifar10(real_data):
    # the parent folder (holding cifar10-jpeg/) as --data_path
    real_folder(real_data, "cifar10-jpeg")
    return SequentialCIFAR10(dataset_args("seq-cifar10", real_data))


@pytest.fixture(scope="session")
def cifar100(real_data):
    # the image-folder root itself as --data_path
    return SequentialCIFAR100(dataset_args("seq-cifar100",
                                           real_folder(real_data, "cifar100-jpeg")))


@pytest.fixture(scope="session")
def tiny(real_data):
    real_folder(real_data, "tiny-imagenet-200")
    return SequentialTinyImageNet(dataset_args("seq-tinyimg", real_data))


@pytest.mark.slow
def test_cifar10_image_folders(cifar10, real_data):
    _assert_split_sizes(cifar10, [5000] * 10, [1000] * 10)
    root = real_data / "cifar10-jpeg"
    classes = sorted(p.name for p in (root / "train").iterdir() if p.is_dir())
    assert classes[0] == "airplane" and classes[9] == "truck"
    assert cifar10.task_classes(0) == [0, 1] and cifar10.task_classes(4) == [8, 9]
    for split, name, pick in (("train", "airplane", 0), ("test", "truck", -1),
                              ("train", "cat", 7)):
        path = sorted((root / split / name).iterdir())[pick]
        _assert_found_with_label(cifar10, path, classes.index(name), split)


@pytest.mark.slow
def test_cifar100_image_folders(cifar100, real_data):
    _assert_split_sizes(cifar100, [500] * 100, [100] * 100)
    root = real_data / "cifar100-jpeg"
    classes = sorted(p.name for p in (root / "train").iterdir() if p.is_dir())
    assert len(classes) == 100 and classes[0] == "apple"
    for split, label in (("train", 0), ("test", 57), ("train", 99)):
        path = sorted((root / split / classes[label]).iterdir())[0]
        _assert_found_with_label(cifar100, path, label, split)


@pytest.mark.slow
def test_tiny_imagenet_original_layout(tiny, real_data):
    root = real_data / "tiny-imagenet-200"
    wnids = sorted((root / "wnids.txt").read_text().split())
    assert len(wnids) == 200 == tiny.N_TASKS * tiny.N_CLASSES_PER_TASK
    annotations = [line.split("\t")[:2] for line in
                   (root / "val" / "val_annotations.txt").read_text().splitlines()]
    # expected counts straight from the disk: image files per wnid, annotation lines per wnid
    train_counts = [len(list((root / "train" / w / "images").glob("*.JPEG"))) for w in wnids]
    val_counts = [sum(1 for _, w in annotations if w == wnid) for wnid in wnids]
    assert set(train_counts) == {50} and set(val_counts) == {50}  # this copy: 50 + 50 a class
    _assert_split_sizes(tiny, train_counts, val_counts)

    for label in (0, 23, 199):  # label ids are the sorted wnids
        path = sorted((root / "train" / wnids[label] / "images").iterdir())[0]
        _assert_found_with_label(tiny, path, label, "train")
    for file, wnid in (annotations[0], annotations[-1]):  # val labels from the annotations
        _assert_found_with_label(tiny, root / "val" / "images" / file, wnids.index(wnid), "val")
