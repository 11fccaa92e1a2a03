"""Seq-CIFAR-100: 10 tasks of 10 classes (fine labels), 32x32."""
import argparse

from datasets.cifar_inputs import NormalizableInputs
from datasets.continual_dataset import RawSplits, SequentialDataset
from datasets.sources import load_cifar


class SequentialCIFAR100(NormalizableInputs, SequentialDataset):
    NAME = "seq-cifar100"
    N_TASKS = 10
    N_CLASSES_PER_TASK = 10
    IMAGE_SIZE = 32
    TRAIN_PER_CLASS = 500
    CHANNEL_MEAN_STD = ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762))

    def load(self, args: argparse.Namespace) -> RawSplits:
        return load_cifar(args.data_path, self.NAME, "CIFAR100", "cifar-100-python",
                          "cifar100-jpeg", self.n_classes)
