"""Networks used as the working model of every method."""
import argparse

from backbone.resnet import DEPTHS, ResNet


def build_backbone(args: argparse.Namespace, dataset) -> ResNet:
    """The backbone the command line asks for, shaped for `dataset` (a SequentialDataset or
    its class): its tasks, classes per task, channels, image size and input normalisation."""
    return ResNet(args.backbone, args.nf, dataset.N_TASKS, dataset.N_CLASSES_PER_TASK,
                  per_task_bn=bool(args.per_task_bn), bn_running_stats=bool(args.bn_running_stats),
                  in_channels=dataset.CHANNELS, identity_shortcut=args.shortcut == "identity",
                  head_bias=bool(args.head_bias), image_size=dataset.IMAGE_SIZE, input_mean_std=dataset.INPUT_MEAN_STD)


BACKBONES = tuple(DEPTHS)
