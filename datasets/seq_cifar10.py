"""Seq-CIFAR-10: 5 tasks of 2 classes, 32x32."""
import argparse

from datasets.cifar_inputs import NormalizableInputs
from datasets.continual_dataset import RawSplits, SequentialDataset
from datasets.sources import load_cifar


class SequentialCIFAR10(NormalizableInputs, SequentialDataset):
    NAME = "seq-cifar10"
    N_TASKS = 5
    N_CLASSES_PER_TASK = 2
    IMAGE_SIZE = 32
    TRAIN_PER_CLASS = 5000
    CHANNEL_MEAN_STD = ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616))

    def load(self, args: argparse.Namespace) -> RawSplits:
        return load_cifar(args.data_path, self.NAME, "CIFAR10", "cifar-10-batches-py",
                          "cifar10-jpeg", self.n_classes)
