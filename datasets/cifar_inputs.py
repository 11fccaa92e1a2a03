"""CIFAR's optional input standardisation, shared by seq-cifar10 and seq-cifar100.

CIFAR images are used in [0, 1] by default, as the BMKP reference code does; with zero-padded
crops the training inputs' mean then differs from the test images'. --normalize_inputs 1
standardises them with the training set's channel statistics, inside the network after
augmentation (as Tiny-ImageNet always is).
"""
from __future__ import annotations

import argparse

from utils.validators import switch

MeanStd = tuple[tuple[float, ...], tuple[float, ...]]


class NormalizableInputs:
    """Mixin for a SequentialDataset: declare CHANNEL_MEAN_STD."""

    CHANNEL_MEAN_STD: MeanStd

    @staticmethod
    def add_arguments(parser: argparse._ActionsContainer) -> None:
        parser.add_argument("--normalize_inputs", type=switch, default=0,
                            help="1: standardise inputs with the training set's channel mean "
                                 "and std, inside the network after augmentation")

    @classmethod
    def input_mean_std(cls, args: argparse.Namespace) -> MeanStd | None:
        return cls.CHANNEL_MEAN_STD if args.normalize_inputs else None
