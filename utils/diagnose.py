"""Where a run lost its tasks: python utils/diagnose.py <the run's options, --checkpoint_dir DIR>

Reads the checkpoint the run left in --checkpoint_dir (written after every task, so it holds
the network as the run last evaluated it) and scores every learned task, with its task id, on
its test set four ways:
- as run: the network as the run evaluated it, with its BatchNorm running statistics;
- batch statistics: each test batch normalised with its own statistics;
- re-estimated: running statistics re-estimated exactly on the task's training images;
- linear probe: a new head for the task, fit on the network's features of its training images.
Low as run but high re-estimated: the running statistics lost the task. Recovered only by the
probe: the features still tell its classes apart and its head no longer fits them (the shared
features drifted under a frozen head). Low everywhere: the features lost it.
"""
from __future__ import annotations

import argparse
import copy
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from datasets.continual_dataset import SequentialDataset, TaskData  # noqa: E402
from models.continual_model import (ContinualModel, exact_bn_statistics,  # noqa: E402
                                    tracked_norms)
from utils.args import parse_args  # noqa: E402
from utils.checkpoint import checkpoint_path, load_checkpoint  # noqa: E402
from utils.context import TrainingContext  # noqa: E402
from utils.errors import UserError  # noqa: E402
from utils.setup import build, resolve_device, seed_everything, set_threads  # noqa: E402
from utils.training import (diagnose_with_batch_statistics, evaluate,  # noqa: E402
                            task_il_accuracy)

# The probe: multinomial logistic regression on standardised features, full batch, L-BFGS.
PROBE_L2 = 1e-3
PROBE_ITERATIONS = 200


@dataclass
class TaskDiagnosis:
    """One task's Task-IL accuracy (%) four ways, and right after it was learned; None where
    the network keeps no BatchNorm running statistics to replace."""

    learned: float
    as_run: float
    batch_statistics: float | None
    re_estimated: float | None
    linear_probe: float


def linear_probe_accuracy(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor,
                          test_y: torch.Tensor, n_classes: int) -> float:
    """Test accuracy (%) of a logistic-regression head fit on the training features: how well
    the features alone still separate the classes."""
    mean, std = train_x.mean(0), train_x.std(0).clamp_min(1e-6)
    train_x, test_x = (train_x - mean) / std, (test_x - mean) / std
    weight = torch.zeros(train_x.shape[1], n_classes, requires_grad=True)
    bias = torch.zeros(n_classes, requires_grad=True)
    optimizer = torch.optim.LBFGS([weight, bias], max_iter=PROBE_ITERATIONS,
                                  line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(train_x @ weight + bias, train_y) + PROBE_L2 * weight.square().sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    with torch.no_grad():
        predicted = (test_x @ weight + bias).argmax(1)
    return 100.0 * (predicted == test_y).float().mean().item()


def _features(model: ContinualModel, data: TaskData, task: int,
              ctx: TrainingContext) -> tuple[torch.Tensor, torch.Tensor]:
    """The predicting network's features of `data` for `task` and the labels, on the CPU."""
    net = model.predictor()
    features, labels = [], []
    with torch.no_grad():  # not inference mode: the probe's autograd reads these features
        for x, y, _ in ctx.eval_batches(data, "features"):
            features.append(net.features(x, task).flatten(1).float().cpu())
            labels.append(y.cpu())
    return torch.cat(features), torch.cat(labels)


def _re_estimated(model: ContinualModel, dataset: SequentialDataset, last_task: int,
                  ctx: TrainingContext) -> list[float] | None:
    """Each task's accuracy with the running statistics re-estimated on its training images."""
    scratch = copy.deepcopy(model)
    norms = tracked_norms(scratch)
    if not norms:
        return None
    net, scores = scratch.predictor(), []
    for task in range(last_task + 1):
        exact_bn_statistics(norms, lambda x: net(x, task),
                            ctx.eval_batches(dataset.train_data(task), "BN statistics"))
        scores.append(task_il_accuracy(scratch, dataset, task, last_task + 1, ctx))
    return scores


def diagnose(args: argparse.Namespace) -> list[TaskDiagnosis]:
    """The four scores of every task the checkpoint of the run `args` describes has learned."""
    if args.checkpoint_dir is None:
        raise UserError("utils/diagnose.py reads a run's checkpoint: add the run's "
                        "--checkpoint_dir DIR")
    if args.seeds or args.n_runs:
        raise UserError("utils/diagnose.py reads one run: give its --seed instead of "
                        "--seeds/--n_runs")
    device = resolve_device(args.device)
    set_threads(args.num_threads)
    seed_everything(args.seed)
    dataset, model = build(args, device)
    if type(model).forward is not ContinualModel.forward:
        raise UserError(f"{args.model} predicts each task with weights of its own, which a "
                        "probe of one network's features does not read; diagnose a method "
                        "that predicts with one network")
    ctx = TrainingContext.from_args(args, device)
    progress, _ = load_checkpoint(checkpoint_path(args), args, model, ctx, "utils/diagnose.py",
                                  "run utils/main.py with these options to write one")
    last = progress.next_task - 1
    model.eval()
    as_run = evaluate(model, dataset, last, ctx).task_il
    re_estimated = _re_estimated(model, dataset, last, ctx)
    found = []
    for task in range(last + 1):
        batch = diagnose_with_batch_statistics(model, dataset, last, task, as_run[task], ctx)
        probe = linear_probe_accuracy(*_features(model, dataset.train_data(task), task, ctx),
                                      *_features(model, dataset.test_data(task), task, ctx),
                                      dataset.N_CLASSES_PER_TASK)
        found.append(TaskDiagnosis(progress.matrix[task][task], as_run[task],
                                   batch["task_il_with_batch_statistics"],
                                   None if re_estimated is None else re_estimated[task], probe))
    return found


COLUMNS = ("learned", "as run", "batch stats", "re-estimated", "probe")


def _cell(value: float | None) -> str:
    return f"{'-' if value is None else f'{value:.1f}':>14}"


def main(argv: list[str] | None = None) -> int:
    try:
        args = parse_args(argv, prog="utils/diagnose.py",
                          description="Score every task of a run's checkpoint with its running "
                                      "statistics, batch statistics, re-estimated statistics "
                                      "and a linear probe of its features.")
        found = diagnose(args)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"{args.model} on {args.dataset}, seed {args.seed}, after task {len(found)}: "
          "Task-IL accuracy (%)")
    print(f"{'task':>4}" + "".join(f"{name:>14}" for name in COLUMNS))
    for task, d in enumerate(found, 1):
        print(f"{task:>4}" + "".join(_cell(v) for v in (d.learned, d.as_run, d.batch_statistics,
                                                         d.re_estimated, d.linear_probe)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
