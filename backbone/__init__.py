"""Networks used as the working model of every method."""
import argparse

from backbone.resnet import DEPTHS, ResNet


def build_backbone(args: argparse.Namespace, n_tasks: int, classes_per_task: int,
                   in_channels: int = 3) -> ResNet:
    """The backbone the command line asks for, sized for the dataset's tasks."""
    return ResNet(args.backbone, args.nf, n_tasks, classes_per_task,
                  per_task_bn=bool(args.per_task_bn), bn_running_stats=bool(args.bn_running_stats),
                  in_channels=in_channels, identity_shortcut=args.shortcut == "identity")


BACKBONES = tuple(DEPTHS)
