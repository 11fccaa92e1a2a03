"""Training-path speed against the bare compute bound, evaluation speed, end-of-task work.

    python utils/benchmark.py [--model bmkp] [--dataset seq-cifar10 --data_path DIR]
                              [--batch_size 128] [--num_threads 2] [--steps 10] [--out FILE]

Without --data_path it uses random uint8 images of the dataset's shape (same cost as real
ones), so it runs anywhere; any option of utils/main.py is accepted and means the same.
Prints a summary and writes it as JSON (default result/benchmark/<time>.json).
"""
from __future__ import annotations

import argparse
import contextlib
import resource
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

from datasets import dataset_classes  # noqa: E402
from datasets.continual_dataset import TaskData  # noqa: E402
from models import model_classes  # noqa: E402
from models.continual_model import ContinualModel  # noqa: E402
from utils.args import parse_args  # noqa: E402
from utils.context import TrainingContext  # noqa: E402
from utils.errors import UserError  # noqa: E402
from utils.results import environment, result_path, write_json_atomic  # noqa: E402
from utils.setup import (amp_warning, prepare_backbone, resolve_device,  # noqa: E402
                         seed_everything, set_threads)
from utils.training import evaluate  # noqa: E402
from utils.validators import output_file, positive_int  # noqa: E402

# Phases that are epochs of SGD steps; every other phase a method times (BMKP's projection
# and BN statistics, EWC's Fisher, ...) is end-of-task work.
TRAINING_PHASES = ("train", "retrain")


def synthetic_task(dataset_cls, n: int, task: int) -> TaskData:
    size = dataset_cls.IMAGE_SIZE
    generator = torch.Generator().manual_seed(task)
    x = torch.randint(0, 256, (n, dataset_cls.CHANNELS, size, size), dtype=torch.uint8,
                      generator=generator)
    y = torch.randint(0, dataset_cls.N_CLASSES_PER_TASK, (n,), generator=generator)
    return TaskData(x, y, torch.full((n,), task, dtype=torch.long))


class RandomData:
    """Stands in for a dataset: two tasks of random images, same shapes as the real one."""

    def __init__(self, dataset_cls, n_train: int, n_test: int) -> None:
        self.N_TASKS, self.N_CLASSES_PER_TASK = dataset_cls.N_TASKS, dataset_cls.N_CLASSES_PER_TASK
        self.CHANNELS, self.IMAGE_SIZE = dataset_cls.CHANNELS, dataset_cls.IMAGE_SIZE
        self.input_mean_std = dataset_cls.input_mean_std
        self._train = [synthetic_task(dataset_cls, n_train, t) for t in range(2)]
        self._test = [synthetic_task(dataset_cls, n_test, t) for t in range(2)]

    def train_data(self, task: int) -> TaskData:
        return self._train[task]

    def test_data(self, task: int) -> TaskData:
        return self._test[task]


class OperatorCount(TorchDispatchMode):
    """Counts the operators that reach the kernels (below autograd: forward, backward and
    optimizer alike), views left out, per phase of the run (`phase`, called at each operator).
    On a GPU each is a kernel launch with a few microseconds of host work, which is what bounds
    a step of a network as small as the reduced ResNet-18, so the count predicts GPU step time
    where no GPU is at hand."""

    def __init__(self, phase: Callable[[], str] = str) -> None:
        super().__init__()
        self.phase = phase
        self.counts: Counter[str] = Counter()

    @property
    def count(self) -> int:
        return sum(self.counts.values())

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not func.is_view:
            self.counts[self.phase()] += 1
        return func(*args, **(kwargs or {}))


def timed(device: torch.device, fn) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def _two_tasks(args: argparse.Namespace, steps: int, real: bool, device: torch.device):
    """The dataset (random images unless `real`), the method on it, and the first two tasks'
    training sets cut to the images the benchmark steps through."""
    dataset_cls = dataset_classes()[args.dataset]
    n_train = args.batch_size * (steps + 2)
    dataset = dataset_cls(args) if real else RandomData(dataset_cls, n_train, 4 * args.batch_size)
    model_cls = model_classes()[args.model]
    model_cls.configure(args, dataset_cls)
    model = model_cls(prepare_backbone(args, device, dataset), dataset, args).to(device)
    first, second = (dataset.train_data(t).to(device) for t in (0, 1))
    first = first.subset(torch.arange(min(len(first), n_train), device=device))
    second = second.subset(torch.arange(min(len(second), n_train), device=device))
    if len(second) < steps * args.batch_size:
        fitting = len(second) // args.batch_size
        fix = (f"--steps {fitting} or fewer" if fitting else
               f"--batch_size {len(second)} or smaller")
        raise UserError(f"--steps {steps} at --batch_size {args.batch_size} needs "
                        f"{steps * args.batch_size} images of one task, but {args.dataset}'s "
                        f"task 2 has {len(second)}: use {fix}")
    return dataset, model, first, second


def _set_epochs(args: argparse.Namespace, n: int) -> None:
    """n epochs in every training phase (BMKP's retraining too, where it has one)."""
    args.n_epochs = n
    if getattr(args, "retrain_epochs", None):
        args.retrain_epochs = n


def _end_of_task_work(model: ContinualModel, first: TaskData, ctx: TrainingContext,
                      device: torch.device) -> dict[str, float]:
    """Seconds of each phase the method times at the end of task 0, learnt end to end with
    one epoch per training phase, so that task 1 runs with whatever state the method keeps
    (BMKP: bases, hence its regularizer); `end_task_other` is end_task's time outside those
    phases (LwF's copy of the network, ...)."""
    ctx.phase_times.append({})
    model.begin_task(0, first)
    model.fit_task(0, first, ctx)
    named_before = sum(ctx.phase_times[0].values())
    end_task_s = timed(device, lambda: model.end_task(0, first, ctx))
    named_inside = sum(ctx.phase_times[0].values()) - named_before
    work = {name: seconds for name, seconds in ctx.phase_times[0].items()
            if name not in TRAINING_PHASES}
    work["end_task_other"] = max(0.0, end_task_s - named_inside)
    return work


def _bound(model: ContinualModel, second: TaskData, steps: int, ctx: TrainingContext,
           device: torch.device, counting: bool) -> tuple[float, int | None]:
    """Seconds per step and operators per step (None unless `counting`) of plain
    cross-entropy steps on one preloaded batch, through the forward the task learns with: the
    method's own where it has one (BMKP, FAS and WSN compose or mask weights), else its
    network's (CLS-ER predicts through a stable copy that gradients never train)."""
    learner = model if type(model).forward is not ContinualModel.forward else model.net
    x0, y0, _ = next(iter(ctx.batches(second, "bound")))
    bare_opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-6)

    def bare(n_steps: int) -> None:
        for _ in range(n_steps):
            bare_opt.zero_grad(set_to_none=True)
            with ctx.autocast():
                loss = F.cross_entropy(learner(x0, 1), y0)
            loss.backward()
            bare_opt.step()

    bare(2)
    seconds = timed(device, lambda: bare(steps)) / steps
    if not counting:
        return seconds, None
    with OperatorCount() as bare_ops:
        bare(1)
    return seconds, bare_ops.count


def _method_steps(model: ContinualModel, second: TaskData, steps: int, ctx: TrainingContext,
                  args: argparse.Namespace, counting: bool
                  ) -> tuple[dict[str, float], dict[str, float]]:
    """Seconds per batch and operators per batch of each training phase of the method's own
    fit_task on task 1 (replay, old-network passes, ...): two epochs of `steps` batches per
    phase, the first a warm-up whose operators are counted (batching and augmentation
    included), the second timed from the epoch record the loop emits. Counting starts with
    the task and again when a timed epoch ends, and stops when the next first epoch does."""
    epochs: list[dict] = []
    operators: dict[str, float] = {}
    counters: list[OperatorCount] = []
    stack = contextlib.ExitStack()

    def count_operators() -> None:
        if counting:
            counters.append(stack.enter_context(OperatorCount(lambda: ctx.phase_name)))

    def on_epoch(kind: str, record: dict) -> None:
        if kind != "epoch":
            return
        epochs.append(record)
        if record["epoch"] == 1 and counters:
            stack.close()
            operators[record["phase"]] = counters.pop().counts[record["phase"]] / steps
        elif record["epoch"] == 2:
            count_operators()

    ctx.listeners.append(on_epoch)
    _set_epochs(args, 2)
    with stack:
        count_operators()
        model.fit_task(1, second.subset(torch.arange(steps * args.batch_size,
                                                     device=second.x.device)), ctx)
    seconds = {e["phase"]: e["seconds"] / steps for e in epochs
               if e["task"] == 1 and e["phase"] in TRAINING_PHASES and e["epoch"] == 2}
    return seconds, operators


def _evaluation_images_per_s(model: ContinualModel, dataset, ctx: TrainingContext,
                             device: torch.device) -> float:
    ctx.debug = True  # a few batches first, so that --compile compiles outside the timing
    evaluate(model, dataset, 0, ctx)
    ctx.debug = False
    return len(dataset.test_data(0)) / timed(device, lambda: evaluate(model, dataset, 0, ctx))


def measure(args: argparse.Namespace, steps: int, real: bool, task_images: int) -> dict:
    device = resolve_device(args.device)
    set_threads(args.num_threads)
    warning = amp_warning(bool(args.amp), device)
    if warning is not None:
        print(warning, file=sys.stderr)
    seed_everything(args.seed)
    dataset, model, first, second = _two_tasks(args, steps, real, device)
    ctx = TrainingContext.from_args(args, device)
    epochs_per_task = args.n_epochs + (getattr(args, "retrain_epochs", None) or 0)
    _set_epochs(args, 1)
    report: dict = {"end_of_task_s": _end_of_task_work(model, first, ctx, device)}

    ctx.task = 1
    ctx.phase_times.append({})
    model.begin_task(1, second)
    model.train()
    # Operators per step (OperatorCount); a compiled network runs its own kernels instead.
    counting = not args.compile
    # The bound before task 1 is fitted (BMKP still learns it in its working memory then).
    bare_s, bound_operators = _bound(model, second, steps, ctx, device, counting)
    seconds, operators = _method_steps(model, second, steps, ctx, args, counting)
    real_s = seconds["train"]
    report.update(train_images_per_s=args.batch_size / real_s,
                  bound_images_per_s=args.batch_size / bare_s,
                  train_ms_per_batch=1000 * real_s, bound_ms_per_batch=1000 * bare_s,
                  ratio_to_bound=bare_s / real_s)
    if "retrain" in seconds:
        report["retrain_ms_per_batch"] = 1000 * seconds["retrain"]
    if counting:
        report.update({f"{phase}_operators_per_batch": operators[phase]
                       for phase in TRAINING_PHASES if phase in operators})
        report["bound_operators_per_batch"] = bound_operators

    report["eval_images_per_s"] = _evaluation_images_per_s(model, dataset, ctx, device)
    images = len(dataset.train_data(0)) if real else task_images
    end_s = sum(report["end_of_task_s"].values())
    task_s = epochs_per_task * -(-images // args.batch_size) * real_s + end_s
    report["epochs_per_task"] = epochs_per_task
    report["end_of_task_share"] = end_s / task_s
    report["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if device.type == "cuda":
        report["peak_gpu_mb"] = torch.cuda.max_memory_allocated(device) / 2 ** 20
    return report


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    extra = argparse.ArgumentParser(add_help=False)
    own = extra.add_argument_group("benchmark")
    own.add_argument("--steps", type=positive_int, default=10,
                     help="training batches timed (default 10)")
    own.add_argument("--out", type=output_file("benchmark.json"), default=None,
                     help="the JSON report (default result/benchmark/<time>.json)")
    own.add_argument("--task_images", type=positive_int, default=10000,
                     help="training images per task for the end-of-task work's share when "
                          "the data is random (default: Seq-CIFAR-10's 10,000)")
    defaults = {"--model": "bmkp", "--dataset": "seq-cifar10", "--quiet": None}
    for flag, value in defaults.items():
        if flag not in argv:
            argv += [flag] if value is None else [flag, value]
    try:
        args = parse_args(argv, prog="utils/benchmark.py", parents=[extra],
                          description="Training-path speed against the bare compute bound, "
                                      "evaluation speed and end-of-task work of one method "
                                      "(default --model bmkp --dataset seq-cifar10, random "
                                      "images unless --data_path is given).")
        real = "--data_path" in argv or args.dataset == "seq-synthetic"
        report = measure(args, args.steps, real, args.task_images)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    setup = {k: getattr(args, k) for k in ("model", "dataset", "backbone", "nf", "batch_size",
                                           "channels_last", "amp", "compile", "device")}
    payload = {"setup": setup, "data": "real" if real else "random",
               "environment": environment(resolve_device(args.device)), **report}
    for key, value in report.items():
        if isinstance(value, dict):
            value = "  ".join(f"{k} {v:.4g}" for k, v in value.items())
        print(f"{key:32s} {value:.4g}" if isinstance(value, float) else f"{key:32s} {value}")
    out = args.out or result_path(args.results_dir, "benchmark", args.model, args.seed)
    write_json_atomic(payload, out)
    print(f"-> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
