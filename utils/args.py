"""Command-line options: the common ones, plus those of the chosen model and dataset.

Precedence, lowest first: common defaults, the dataset's DEFAULTS, the model's DEFAULTS, its
--model_config best values for the dataset (with its paper network, PAPER_NETWORK), then
whatever was typed on the command line.
"""
from __future__ import annotations

import argparse
import sys
import textwrap
from pathlib import Path
from collections.abc import Sequence
from typing import NoReturn

from backbone import BACKBONES
from datasets import dataset_classes
from models import model_classes
from utils.errors import UserError
from utils.validators import (non_negative_float, non_negative_int, output_folder, percentage,
                              positive_float, positive_int, random_seed, switch)


class HelpFormatter(argparse.HelpFormatter):
    """argparse's formatter, except that it never wraps a line inside a hyphenated name
    (seq-cifar10 used to come out as 'seq-' and 'cifar10' on two lines)."""

    def _split_lines(self, text: str, width: int) -> list[str]:
        text = self._whitespace_matcher.sub(" ", text).strip()
        return textwrap.wrap(text, width, break_on_hyphens=False)

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        text = self._whitespace_matcher.sub(" ", text).strip()
        return textwrap.fill(text, width, initial_indent=indent, subsequent_indent=indent,
                             break_on_hyphens=False)


class OneLineErrorParser(argparse.ArgumentParser):
    """argparse that reports a bad option as one line naming the fix, not a usage dump."""

    def error(self, message: str) -> NoReturn:
        raise UserError(f"{message} (see {self.prog} --help)")


def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    models, datasets = model_classes(), dataset_classes()
    exp = parser.add_argument_group("experiment")
    exp.add_argument("--model", required=True, choices=list(models), metavar="MODEL",
                     help=f"continual-learning method: {', '.join(models)}")
    exp.add_argument("--dataset", required=True, choices=list(datasets), metavar="DATASET",
                     help=f"sequential benchmark: {', '.join(datasets)}")
    exp.add_argument("--model_config", choices=["default", "best"], default="default",
                     help="'best' loads the model's per-dataset hyperparameters; "
                          "options typed on the command line still win")
    exp.add_argument("--data_path", type=Path, default=Path("data"),
                     help="dataset folder: downloaded into when empty (default ./data)")
    seeds = exp.add_mutually_exclusive_group()
    seeds.add_argument("--seed", type=random_seed, default=0)
    seeds.add_argument("--seeds", type=random_seed, nargs="+", default=None, metavar="S",
                       help="one run per seed, then an aggregate JSON with mean and std")
    seeds.add_argument("--n_runs", type=positive_int, default=None, metavar="K",
                       help="as --seeds 0 1 ... K-1")
    exp.add_argument("--class_order_seed", type=random_seed, default=None,
                     help="permute the class-to-task assignment with this seed "
                          "(default: label order)")
    exp.add_argument("--validation", type=percentage, default=None, metavar="P",
                     help="hold out P%% of each task's training data and evaluate on it "
                          "instead of the test set")
    exp.add_argument("--results_dir", type=output_folder, default=Path("result"))
    exp.add_argument("--checkpoint_dir", type=output_folder, default=None, metavar="DIR",
                     help="after each task, save the run's state to "
                          "DIR/<dataset>-<model>-seed<S>.pt")
    exp.add_argument("--resume", action="store_true",
                     help="continue from the last task saved in --checkpoint_dir")
    exp.add_argument("--budget_s", type=positive_float, default=None, metavar="S",
                     help="stop between tasks, checkpointed, when the next task (timed as "
                          "the last one) would end after S seconds; needs --checkpoint_dir; "
                          "exit status 75, continue with --resume")

    train = parser.add_argument_group("training")
    train.add_argument("--n_epochs", type=positive_int, default=50)
    train.add_argument("--batch_size", type=positive_int, default=128)
    train.add_argument("--eval_batch_size", type=positive_int, default=256,
                       help="test batch size (matters only for BatchNorm with batch statistics)")
    train.add_argument("--lr", type=positive_float, default=0.05)
    train.add_argument("--optim_mom", type=non_negative_float, default=0.0, help="SGD momentum")
    train.add_argument("--optim_wd", type=non_negative_float, default=0.0, help="weight decay")
    train.add_argument("--lr_step", type=non_negative_int, default=0,
                       help="multiply the lr by --lr_gamma every N epochs (0: constant lr)")
    train.add_argument("--lr_gamma", type=positive_float, default=0.1)

    net = parser.add_argument_group("backbone")
    net.add_argument("--backbone", choices=BACKBONES, default="resnet18")
    net.add_argument("--nf", type=positive_int, default=20,
                     help="base width: 20 = reduced ResNet-18 (GPM, BMKP; the default for "
                          "every method), 64 = the standard ResNet-18 of mammoth's baselines; "
                          "--model_config best gives each method the width the BMKP paper "
                          "used for it")
    net.add_argument("--shortcut", choices=("identity", "none"), default="identity",
                     help="what a block whose shape does not change adds to its output: x "
                          "(a ResNet), or nothing (the BMKP reference code's network)")
    net.add_argument("--feature_pool", choices=("grid", "global"), default="grid",
                     help="what the task heads read: the last map average-pooled to 2x2 "
                          "(grid: the GPM and BMKP code's network) or to one value per "
                          "channel (global: mammoth's standard ResNet-18)")
    net.add_argument("--head_bias", type=switch, default=1,
                     help="0: the task heads have no bias (the BMKP reference code's classifier)")
    net.add_argument("--per_task_bn", type=switch, default=0,
                     help="1: one BatchNorm set per task, selected by the task id")
    net.add_argument("--bn_running_stats", type=switch, default=1,
                     help="0: BatchNorm always normalises with the batch's statistics")
    net.add_argument("--exact_bn_stats", type=switch, default=0,
                     help="1: after each task's training, replace the running BatchNorm "
                          "statistics of the predicting network by the exact ones of its "
                          "final weights (one no-grad pass over the task's training batches); "
                          "0: keep the moving average training left, as mammoth does")

    run = parser.add_argument_group("run")
    run.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, ...")
    run.add_argument("--num_threads", type=positive_int, default=None,
                     help="CPU threads for torch (default: torch's choice, capped at the cores "
                          "this process may use; one inter-op thread). When several runs "
                          "share a machine, give each cores/runs threads (utils/sweep.py "
                          "gives each job 1), or they fight over the same cores")
    run.add_argument("--compile", type=switch, default=0,
                     help="1: torch.compile the backbone (pays off on GPU and for long runs; "
                          "the first steps of each task id, mode and batch shape compile)")
    run.add_argument("--channels_last", type=switch, default=1,
                     help="1: NHWC memory format for images and conv weights (faster here)")
    run.add_argument("--amp", type=switch, default=0,
                     help="1: bfloat16 autocast for training and evaluation (faster on GPUs "
                          "and on CPUs with AVX512-BF16 or AMX; slower elsewhere)")
    run.add_argument("--deterministic", type=switch, default=0,
                     help="1: deterministic kernels only (cuDNN, cuBLAS workspace, "
                          "torch.use_deterministic_algorithms), so one seed gives one "
                          "result on one GPU; slower, and an op without a deterministic "
                          "kernel stops the run")
    run.add_argument("--debug_mode", type=switch, default=0,
                     help="1: a handful of batches per epoch and per evaluation, and of "
                          "steps per inner optimisation (smoke runs)")
    run.add_argument("--quiet", action="store_true", help="no progress bars or per-task lines")
    run.add_argument("--tensorboard", action="store_true",
                     help="also write losses, accuracies and phase times for TensorBoard to "
                          "<result>.tensorboard/ (pip install tensorboard)")


def parse_args(argv: list[str] | None = None, prog: str = "utils/main.py",
               description: str = "Run one task-incremental learning experiment.",
               parents: Sequence[argparse.ArgumentParser] = ()) -> argparse.Namespace:
    """utils/main.py's options; another entry point passes its own name and description, and
    its own options as `parents` (argparse parsers without help) so --help lists them too."""
    argv = sys.argv[1:] if argv is None else argv
    models, datasets = model_classes(), dataset_classes()
    pre = argparse.ArgumentParser(add_help=False)
    for name in ("--model", "--dataset", "--model_config"):
        pre.add_argument(name)
    known, _ = pre.parse_known_args(argv)

    parser = OneLineErrorParser(
        prog=prog, description=description, parents=list(parents),
        formatter_class=HelpFormatter,
        epilog=f"models: {', '.join(models)}. datasets: {', '.join(datasets)}. "
               "Add --model NAME (and --dataset NAME) to --help to see their own options.")
    add_common_arguments(parser)
    model_cls, dataset_cls = models.get(known.model), datasets.get(known.dataset)
    if dataset_cls is not None:
        dataset_cls.add_arguments(parser.add_argument_group(f"{dataset_cls.NAME} options"))
        parser.set_defaults(**dataset_cls.DEFAULTS)
    if model_cls is not None:
        model_cls.add_arguments(parser.add_argument_group(f"{model_cls.NAME} options"))
        parser.set_defaults(**model_cls.DEFAULTS)
        if known.model_config == "best" and dataset_cls is not None:
            if dataset_cls.NAME not in model_cls.BEST_CONFIGS:
                raise UserError(f"model {model_cls.NAME} has no best configuration for "
                                f"{dataset_cls.NAME} (it has: "
                                f"{', '.join(model_cls.BEST_CONFIGS) or 'none'}); "
                                "drop --model_config best and set the options yourself")
            parser.set_defaults(**model_cls.PAPER_NETWORK,
                                **model_cls.BEST_CONFIGS[dataset_cls.NAME])
    args = parser.parse_args(argv)
    if model_cls is not None and dataset_cls is not None:
        refuse_overridden(args, typed_options(parser, argv, args),
                          model_cls.implied_options(args, dataset_cls), model_cls)
    if args.resume and args.checkpoint_dir is None:
        raise UserError("--resume needs --checkpoint_dir DIR, the folder of the checkpoint")
    return args


def typed_options(parser: argparse.ArgumentParser, argv: list[str],
                  args: argparse.Namespace) -> set[str]:
    """The options `argv` sets itself, not through a default: argparse fills in a default
    only where the namespace lacks the option, so a namespace holding a marker for every
    option keeps the marker exactly where nothing was typed."""
    unset = object()
    probe = parser.parse_args(argv, argparse.Namespace(**{k: unset for k in vars(args)}))
    return {k for k, v in vars(probe).items() if v is not unset}


def refuse_overridden(args: argparse.Namespace, typed: set[str], implied: dict[str, object],
                      model_cls: type) -> None:
    """A typed value that another option would silently replace is an error, not ignored."""
    clashes = sorted(k for k in typed & implied.keys() if getattr(args, k) != implied[k])
    if clashes:
        setters = {o: key for key, options in model_cls.IMPLIED_OPTIONS.items() for o in options}
        setter = setters[clashes[0]]
        shown = ", ".join(f"--{k} {implied[k]}" for k in clashes)
        raise UserError(f"--{setter} {getattr(args, setter)} sets {shown} itself; drop "
                        f"{', '.join('--' + k for k in clashes)}")
