"""Sequential (Task-IL) datasets: the whole split lives in memory as uint8 tensors.

A dataset declares how many tasks it has, how many classes each task holds and its image
size; subclasses only say how to obtain the raw arrays. Class-to-task assignment, the
validation split and per-task slicing are done here once, for every dataset.
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import ClassVar, Iterator

import torch
import torch.nn.functional as F

from datasets.augment import random_crop_flip
from utils.errors import UserError


@dataclass(frozen=True)
class TaskData:
    """Images (uint8, N x C x H x W), labels local to their task, and each sample's task id."""

    x: torch.Tensor
    y: torch.Tensor
    t: torch.Tensor

    def __len__(self) -> int:
        return self.x.shape[0]

    def to(self, device: torch.device | str) -> TaskData:
        return TaskData(self.x.to(device), self.y.to(device), self.t.to(device))

    def subset(self, index: torch.Tensor) -> TaskData:
        return TaskData(self.x[index], self.y[index], self.t[index])

    @staticmethod
    def concat(parts: list[TaskData]) -> TaskData:
        return TaskData(*(torch.cat([getattr(p, f) for p in parts]) for f in ("x", "y", "t")))


@dataclass(frozen=True)
class RawSplits:
    """A dataset as loaded from disk: global labels in the dataset's own order."""

    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor


def to_model_input(x: torch.Tensor, channels_last: bool) -> torch.Tensor:
    """uint8 images -> float in [0, 1], in the layout the network runs in."""
    layout = torch.channels_last if channels_last else torch.contiguous_format
    return x.to(torch.float32, memory_format=layout).div_(255)


def iterate_batches(data: TaskData, batch_size: int, *, shuffle: bool, augment: bool,
                    equal_sizes: bool = False, max_batches: int | None = None,
                    channels_last: bool = False,
                    with_raw: bool = False) -> Iterator[tuple[torch.Tensor, ...]]:
    """Yield (float images in [0, 1], labels, task ids) batches straight from the tensors;
    `with_raw` adds the batch's un-augmented uint8 images (what a replay buffer keeps).

    There are ceil(n / batch_size) batches. By default all but the last hold batch_size
    images; with `equal_sizes` the sizes differ by at most one, so no training step sees a
    tiny remainder batch (a handful of images whose batch-statistics BatchNorm and gradient
    can undo a task in the epoch's last step). Indices and augmentation stay on the data's
    device; the only per-batch work is one gather, one batched crop/flip and one dtype
    conversion (into NHWC with channels_last).
    """
    n = len(data)
    n_batches = -(-n // batch_size)
    if equal_sizes:
        sizes = [n // n_batches + (b < n % n_batches) for b in range(n_batches)]
    else:
        sizes = [min(batch_size, n - b * batch_size) for b in range(n_batches)]
    order = torch.randperm(n, device=data.x.device) if shuffle else None
    start = 0
    for size in sizes[:max_batches]:
        index = slice(start, start + size) if order is None else order[start:start + size]
        start += size
        raw, y, t = data.x[index], data.y[index], data.t[index]
        x = random_crop_flip(raw, padding=4) if augment else raw
        yield (to_model_input(x, channels_last), y, t) + ((raw,) if with_raw else ())


class SequentialDataset:
    """Base class of every Task-IL benchmark."""

    NAME: ClassVar[str] = ""
    N_TASKS: ClassVar[int]
    N_CLASSES_PER_TASK: ClassVar[int]
    IMAGE_SIZE: ClassVar[int]
    CHANNELS: ClassVar[int] = 3
    # Training images per class in the standard split (for time estimates before any data is
    # loaded, e.g. utils/reproduce.py --dry_run).
    TRAIN_PER_CLASS: ClassVar[int]
    # Per-channel (mean, std) that inputs in [0, 1] are standardised with, after augmentation
    # (None: used as they are).
    INPUT_MEAN_STD: ClassVar[tuple[tuple[float, ...], tuple[float, ...]] | None] = None
    # Overrides of the common option defaults for this benchmark (a method's own DEFAULTS,
    # --model_config best and the command line still win).
    DEFAULTS: ClassVar[dict] = {}

    @staticmethod
    def add_arguments(parser: argparse._ActionsContainer) -> None:
        """Dataset-specific command-line options (none by default)."""

    @classmethod
    def input_mean_std(cls, args: argparse.Namespace
                       ) -> tuple[tuple[float, ...], tuple[float, ...]] | None:
        """The (mean, std) the backbone standardises inputs with under these options."""
        return cls.INPUT_MEAN_STD

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        raw = self.load(args)
        self._check_raw(raw)
        self.class_order = self._class_order(args.class_order_seed)
        train_x, train_y = raw.train_x, self._remap(raw.train_y)
        test_x, test_y = raw.test_x, self._remap(raw.test_y)
        if args.validation:
            (train_x, train_y), (test_x, test_y) = self._validation_split(
                train_x, train_y, args.validation, args.seed)
        self._train = self._split_tasks(train_x, train_y)
        self._test = self._split_tasks(test_x, test_y)

    def load(self, args: argparse.Namespace) -> RawSplits:
        """Return the raw uint8 arrays; subclasses implement it."""
        raise NotImplementedError

    @property
    def n_classes(self) -> int:
        return self.N_TASKS * self.N_CLASSES_PER_TASK

    def train_data(self, task: int) -> TaskData:
        return self._train[task]

    def test_data(self, task: int) -> TaskData:
        """Test split of a task (the held-out validation split when --validation is set)."""
        return self._test[task]

    def task_classes(self, task: int) -> list[int]:
        """Original dataset label ids of a task's classes, in head order."""
        k = self.N_CLASSES_PER_TASK
        return self.class_order[task * k:(task + 1) * k].tolist()

    def _check_raw(self, raw: RawSplits) -> None:
        shape = (self.CHANNELS, self.IMAGE_SIZE, self.IMAGE_SIZE)
        for x, y in ((raw.train_x, raw.train_y), (raw.test_x, raw.test_y)):
            if x.dtype != torch.uint8 or tuple(x.shape[1:]) != shape or len(x) != len(y):
                raise ValueError(f"{self.NAME}: loader returned {x.dtype} {tuple(x.shape)} "
                                 f"images for {len(y)} labels; expected uint8 N x {shape}")
        found = int(raw.train_y.max()) + 1
        if found != self.n_classes:
            raise UserError(f"{self.NAME}: the data holds {found} classes but the benchmark needs "
                            f"{self.n_classes}; check that --data_path points at the right dataset")
        for split, y in (("train", raw.train_y), ("test", raw.test_y)):
            missing = torch.nonzero(torch.bincount(y, minlength=self.n_classes) == 0)
            if len(missing):
                raise UserError(f"{self.NAME}: class {int(missing[0])} has no {split} images "
                                f"({len(missing)} classes lack them); its task could not be "
                                "learned or scored, so fix the copy under --data_path")

    def _class_order(self, seed: int | None) -> torch.Tensor:
        if seed is None:
            return torch.arange(self.n_classes)
        return torch.randperm(self.n_classes, generator=torch.Generator().manual_seed(seed))

    def _remap(self, y: torch.Tensor) -> torch.Tensor:
        """Dataset label -> position in the class order (task = position // classes per task)."""
        position = torch.empty_like(self.class_order)
        position[self.class_order] = torch.arange(self.n_classes)
        return position[y]

    def _split_tasks(self, x: torch.Tensor, y: torch.Tensor) -> list[TaskData]:
        """Per-task slices with the classes interleaved round-robin (each class keeping its
        own sample order), whatever the source layout.

        Image folders list their files class by class; without interleaving a test batch
        would hold one or two classes, which changes predictions under batch-statistics
        BatchNorm and makes --debug_mode's evaluation subset a single class.
        """
        k = self.N_CLASSES_PER_TASK
        tasks = []
        for task in range(self.N_TASKS):
            index = torch.nonzero((y >= task * k) & (y < (task + 1) * k)).squeeze(1)
            local = y[index] - task * k
            one_hot = F.one_hot(local, k)
            rank_in_class = (one_hot.cumsum(0) * one_hot).sum(1) - 1
            index = index[torch.argsort(rank_in_class * k + local, stable=True)]
            tasks.append(TaskData(x[index].contiguous(), y[index] - task * k,
                                  torch.full((len(index),), task, dtype=torch.long)))
        return tasks

    @staticmethod
    def _validation_split(x: torch.Tensor, y: torch.Tensor, percent: float, seed: int):
        """Stratified, seeded hold-out of `percent`% of every class's training samples."""
        generator = torch.Generator().manual_seed(seed)
        held = []
        for label in torch.unique(y):
            members = torch.nonzero(y == label).squeeze(1)
            n_held = max(1, round(len(members) * percent / 100))
            if n_held >= len(members):
                fix = (f"use --validation {100 * (len(members) - 1) // len(members)} or less"
                       if len(members) > 1 else "drop --validation")
                raise UserError(f"--validation {percent:g} holds out all {len(members)} "
                                f"training images of class {int(label)}, leaving none to "
                                f"train on; {fix}")
            members = members[torch.randperm(len(members), generator=generator)]
            held.append(members[:n_held])
        held_index = torch.cat(held)
        keep = torch.ones(len(y), dtype=torch.bool)
        keep[held_index] = False
        return (x[keep], y[keep]), (x[held_index], y[held_index])
