"""Networks used as the working model of every method, by name (`--backbone`).

Every backbone is a TaskNetwork (backbone/contract.py); a new one is a file here and an entry
in BACKBONES.
"""
from __future__ import annotations

import argparse
from typing import Callable

from backbone.contract import TaskNetwork
from backbone.resnet import DEPTHS, ResNet

# The BMKP paper's two ResNet-18s (Section 6.1) as option values; --model_config best gives
# each method the one the paper ran it on (ContinualModel.PAPER_NETWORK).
REDUCED_RESNET18 = {"nf": 20, "feature_pool": "grid"}  # the GPM and BMKP code's
STANDARD_RESNET18 = {"nf": 64, "feature_pool": "global"}  # mammoth's, for the baselines


def _resnet(depth: str) -> Callable[[argparse.Namespace, object], ResNet]:
    def build(args: argparse.Namespace, dataset) -> ResNet:
        return ResNet(depth, args.nf, dataset.N_TASKS, dataset.N_CLASSES_PER_TASK,
                      per_task_bn=bool(args.per_task_bn),
                      bn_running_stats=bool(args.bn_running_stats),
                      in_channels=dataset.CHANNELS,
                      identity_shortcut=args.shortcut == "identity",
                      head_bias=bool(args.head_bias), image_size=dataset.IMAGE_SIZE,
                      global_pool=args.feature_pool == "global",
                      input_mean_std=dataset.input_mean_std(args))
    return build


BACKBONES: dict[str, Callable[[argparse.Namespace, object], TaskNetwork]] = {
    depth: _resnet(depth) for depth in DEPTHS}


def build_backbone(args: argparse.Namespace, dataset) -> TaskNetwork:
    """The backbone the command line asks for, shaped for `dataset` (a SequentialDataset or
    its class): its tasks, classes per task, channels, image size and input normalisation."""
    return BACKBONES[args.backbone](args, dataset)
