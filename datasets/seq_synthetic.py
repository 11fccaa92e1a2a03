"""Seq-Synthetic: a tiny deterministic benchmark for tests and smoke runs (no files needed).

Every class has a smooth colour prototype; a sample is its prototype blended with another
random smooth pattern plus pixel noise, so the classes are learnable but not trivially so.
The data never depends on the run's seed: only training does.
"""
import argparse

import torch
import torch.nn.functional as F

from datasets.continual_dataset import RawSplits, SequentialDataset


def _smooth_patterns(n: int, size: int, generator: torch.Generator) -> torch.Tensor:
    coarse = torch.rand(n, 3, 4, 4, generator=generator)
    return F.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)


class SequentialSynthetic(SequentialDataset):
    NAME = "seq-synthetic"
    N_TASKS = 5
    N_CLASSES_PER_TASK = 2
    IMAGE_SIZE = 16
    TRAIN_PER_CLASS = 100
    TEST_PER_CLASS = 50
    # Settings that learn every task with every method. At lr 0.01 and above the first steps
    # overshoot (the head's step grows with the squared feature norm, about 1,000 here): the
    # logits reach 20-60, which DER and DER++ store and replay as targets until they diverge.
    # With fewer steps, shared-BN methods end a task before their running BatchNorm
    # statistics catch up with the weights, and the task tests at chance.
    DEFAULTS = {"lr": 0.005, "n_epochs": 10, "batch_size": 32}

    def load(self, args: argparse.Namespace) -> RawSplits:
        generator = torch.Generator().manual_seed(2023)
        prototypes = _smooth_patterns(self.n_classes, self.IMAGE_SIZE, generator)
        arrays = {}
        for split, per_class in (("train", self.TRAIN_PER_CLASS), ("test", self.TEST_PER_CLASS)):
            y = torch.arange(self.n_classes).repeat_interleave(per_class)
            distractor = _smooth_patterns(len(y), self.IMAGE_SIZE, generator)
            noise = torch.randn(len(y), 3, self.IMAGE_SIZE, self.IMAGE_SIZE, generator=generator)
            x = 0.7 * prototypes[y] + 0.3 * distractor + 0.05 * noise
            arrays[f"{split}_x"] = (x.clamp(0, 1) * 255).round().to(torch.uint8)
            arrays[f"{split}_y"] = y
        return RawSplits(**arrays)
