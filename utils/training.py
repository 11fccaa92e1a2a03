"""The Task-IL loop: learn each task, then evaluate every task seen so far, with its task id
(the headline) and without it (task-agnostic)."""
from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from typing import Callable, Iterator

import torch

from datasets.continual_dataset import SequentialDataset
from backbone.contract import TaskNetwork
from models.continual_model import (ContinualModel, batch_statistics, stacked_task_logits,
                                    tracked_norms)
from utils.context import TrainingContext
from utils.metrics import summarize
from utils.sizes import BYTES_PER_MB


@dataclass
class Accuracies:
    """One evaluation's accuracy (%) on each task seen so far, predicted two ways: with the
    task id given (Task-IL, the paper's protocol) and without it (task-agnostic, or Class-IL:
    the argmax over the heads of every seen task); and the tasks whose Task-IL predictions all
    fall on one class, a collapse the accuracy alone hides as "chance"."""

    task_il: list[float]
    task_agnostic: list[float]
    single_class: list[int] = field(default_factory=list)


def _score_task(logits_of: Callable[[torch.Tensor, int], torch.Tensor],
                dataset: SequentialDataset, task: int, n_seen: int,
                ctx: TrainingContext) -> tuple[int, int, int, int]:
    """(right with the task id, right without it, images, classes predicted with the task
    id) on `task`'s test set; one host synchronisation, at the end."""
    k = dataset.N_CLASSES_PER_TASK
    correct = torch.zeros(2, dtype=torch.long, device=ctx.device)
    predicted = torch.zeros(k, dtype=torch.long, device=ctx.device)
    seen = 0
    for x, y, _ in ctx.eval_batches(dataset.test_data(task), "test"):
        with ctx.autocast():
            logits = logits_of(x, n_seen)
        own_prediction = logits[:, task * k:(task + 1) * k].argmax(1)
        anywhere = logits.argmax(1) == task * k + y
        correct += torch.stack([(own_prediction == y).sum(), anywhere.sum()])
        predicted += torch.bincount(own_prediction, minlength=k)
        seen += len(y)
    own, anywhere, classes = torch.cat([correct, (predicted > 0).sum().view(1)]).tolist()
    return own, anywhere, seen, classes


@contextmanager
def _inference(model: ContinualModel) -> Iterator[None]:
    """Evaluation mode without autograd, the model's training mode restored after."""
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            yield
    finally:
        model.train(was_training)


def evaluate(model: ContinualModel, dataset: SequentialDataset, last_task: int,
             ctx: TrainingContext, network: TaskNetwork | None = None) -> Accuracies:
    """Accuracy on tasks 0..last_task, each sample scored by every seen task's head once;
    by `network` (one of model.other_predictors()) instead of the model when given."""
    n_seen = last_task + 1
    logits_of = (model.all_task_logits if network is None
                 else partial(stacked_task_logits, network))
    with _inference(model):
        scores = [_score_task(logits_of, dataset, task, n_seen, ctx) for task in range(n_seen)]
    single_class = [task for task, (*_, classes) in enumerate(scores)
                    if classes == 1 < dataset.N_CLASSES_PER_TASK]
    return Accuracies([100.0 * own / seen for own, _, seen, _ in scores],
                      [100.0 * anywhere / seen for _, anywhere, seen, _ in scores],
                      single_class)


def task_il_accuracy(model: ContinualModel, dataset: SequentialDataset, task: int, n_seen: int,
                     ctx: TrainingContext) -> float:
    """One task's Task-IL accuracy (%), with n_seen tasks learned: evaluate's score of it
    without scoring the others."""
    with _inference(model):
        own, _, seen, _ = _score_task(model.all_task_logits, dataset, task, n_seen, ctx)
    return 100.0 * own / seen


# Points above the collapsed accuracy that batch statistics must recover before the warning
# blames the running statistics rather than the weights.
RUNNING_STATISTICS_MARGIN = 10.0
# Points above chance (100 / classes per task) a task must score right after it is learned
# (the sanity test's bound: 60 on two classes); under them the run warns.
LEARNED_MARGIN = 10.0


def learned_bound(classes_per_task: int) -> float:
    """The accuracy a task must reach right after it is learned: chance + LEARNED_MARGIN."""
    return 100.0 / classes_per_task + LEARNED_MARGIN


def diagnose_with_batch_statistics(model: ContinualModel, dataset: SequentialDataset,
                                   last_task: int, task: int, accuracy: float,
                                   ctx: TrainingContext) -> dict:
    """What a task that scores like chance would score with each test batch's own BatchNorm
    statistics: far above chance, the weights still hold it and the running statistics
    (another task's, or stale) send it there; near chance, the weights lost it (or never
    learned it). None where the network keeps no running statistics to blame."""
    batch_accuracy = None
    if tracked_norms(model):
        with _inference(model), batch_statistics(model):
            own, _, seen, _ = _score_task(model.all_task_logits, dataset, task, last_task + 1,
                                          ctx)
        batch_accuracy = 100.0 * own / seen
    return {"after_task": last_task, "task": task, "task_il": accuracy,
            "task_il_with_batch_statistics": batch_accuracy}


def evaluate_and_diagnose(model: ContinualModel, dataset: SequentialDataset, last_task: int,
                          ctx: TrainingContext) -> tuple[Accuracies, list[dict]]:
    """evaluate, and diagnose_with_batch_statistics for each task whose predictions all fall
    on one class."""
    accuracies = evaluate(model, dataset, last_task, ctx)
    events = [diagnose_with_batch_statistics(model, dataset, last_task, task,
                                             accuracies.task_il[task], ctx)
              for task in accuracies.single_class]
    return accuracies, events


def diagnose_unlearned(model: ContinualModel, dataset: SequentialDataset, task: int,
                       accuracies: Accuracies, ctx: TrainingContext) -> dict | None:
    """The finding for the task just learned when it scores less than LEARNED_MARGIN above
    chance while predicting more than one class (a task predicting one class is the
    single-class finding already); None when it was learned."""
    accuracy = accuracies.task_il[task]
    if task in accuracies.single_class or accuracy >= learned_bound(dataset.N_CLASSES_PER_TASK):
        return None
    return diagnose_with_batch_statistics(model, dataset, task, task, accuracy, ctx)


def single_class_warning(event: dict, n_tasks: int) -> str:
    """The log line of a single-class finding, tasks numbered from 1 as in the log."""
    line = (f"warning: after task {event['after_task'] + 1}/{n_tasks}, task {event['task'] + 1} "
            f"predicts one class for all its test images (Task-IL {event['task_il']:.1f}); ")
    return line + _cause(event) + other_networks_text(event.get("other_predictors", {}))


def unlearned_warning(event: dict, n_tasks: int, classes_per_task: int) -> str:
    """The log line of diagnose_unlearned's finding, tasks numbered from 1 as in the log."""
    line = (f"warning: task {event['task'] + 1}/{n_tasks} scores {event['task_il']:.1f} right "
            f"after it was learned, less than {LEARNED_MARGIN:.0f} points above chance "
            f"({100.0 / classes_per_task:.1f}); ")
    return line + _cause(event) + other_networks_text(event.get("other_predictors", {}))


def other_networks_text(scores: dict[str, float]) -> str:
    """A warning's note of what the method's other networks score on the finding's task
    (name -> accuracy; empty where it scored none)."""
    return "".join(f"; its {name} network scores {score:.1f}" for name, score in scores.items())


def _cause(event: dict) -> str:
    """What a finding's score on batch statistics says lost the task (or, for the task just
    learned, kept it from scoring)."""
    batch = event["task_il_with_batch_statistics"]
    weights = ("its weights lost the task" if event["after_task"] > event["task"]
               else "its weights do not hold the task")
    if batch is None:
        cause = "the network normalises with batch statistics already, so " + weights
    else:
        verdict = ("the running statistics, not the weights, put it there"
                   if batch >= event["task_il"] + RUNNING_STATISTICS_MARGIN else weights)
        cause = (f"with its test batches' own BatchNorm statistics it scores {batch:.1f}, so "
                 + verdict)
    return cause + " (docs/experiments.md, 'A task that predicts one class')"


@dataclass
class Progress:
    """The tasks done so far: their rows of the Task-IL and task-agnostic accuracy matrices
    (and the Task-IL rows of the method's other predictors, by name), the method's memory
    after each and the wall time spent; empty for a fresh run, restored from a checkpoint on
    resume."""

    matrix: list[list[float]] = field(default_factory=list)
    agnostic_matrix: list[list[float]] = field(default_factory=list)
    memory_mb: list[float] = field(default_factory=list)
    elapsed_s: float = 0.0
    single_class: list[dict] = field(default_factory=list)
    unlearned: list[dict] = field(default_factory=list)
    other_matrices: dict[str, list[list[float]]] = field(default_factory=dict)

    @property
    def next_task(self) -> int:
        return len(self.matrix)


# Exit status of a run stopped by --budget_s (EX_TEMPFAIL: resumable, not failed).
BUDGET_EXIT = 75


class BudgetReached(Exception):
    """The time budget would run out during the next task; the run stopped after `task`."""

    def __init__(self, tasks_done: int) -> None:
        super().__init__(f"stopped after {tasks_done} tasks")
        self.tasks_done = tasks_done


def _accuracy_text(row: list[float]) -> str:
    """A row of the accuracy matrix as the log shows it: its mean, then each task's."""
    return (f"avg acc {sum(row) / len(row):6.2f}  "
            f"per task [{', '.join(f'{a:.1f}' for a in row)}]")


def other_predictors_result(progress: Progress) -> dict:
    """`other_predictors` for the result: each other network's metrics (summarize), where it
    was evaluated after every task; a run resumed from a checkpoint written before these
    evaluations existed lacks its first rows and reports none."""
    complete = {name: summarize(rows) for name, rows in progress.other_matrices.items()
                if len(rows) == len(progress.matrix)}
    return {"other_predictors": complete} if complete else {}


def run_tasks(model: ContinualModel, dataset: SequentialDataset, ctx: TrainingContext,
              log=print, progress: Progress | None = None,
              after_task: Callable[[Progress], None] | None = None,
              budget_s: float | None = None) -> dict:
    """Learn the tasks in order from `progress.next_task`, calling `after_task` once each
    is evaluated; returns the accuracy matrices, their metrics and phase times. With `budget_s`,
    raises BudgetReached after a task (once `after_task` has run) when the next one, timed as
    the last, would end more than budget_s seconds after this call."""
    progress = progress or Progress()
    called = time.perf_counter()
    start = called - progress.elapsed_s
    for task in range(progress.next_task, dataset.N_TASKS):
        task_start = time.perf_counter()
        ctx.phase_times.append({})
        ctx.task, ctx.task_label = task, f"task {task + 1}/{dataset.N_TASKS}"
        train = dataset.train_data(task).to(ctx.device)
        model.begin_task(task, train)
        model.fit_task(task, train, ctx)
        if model.args.exact_bn_stats:
            model.store_exact_bn_statistics(task, train, ctx)
        model.end_task(task, train, ctx)
        with ctx.phase("eval"):
            accuracies, events = evaluate_and_diagnose(model, dataset, task, ctx)
            unlearned = diagnose_unlearned(model, dataset, task, accuracies, ctx)
            others = {name: evaluate(model, dataset, task, ctx, network).task_il
                      for name, network in model.other_predictors().items()}
        row, agnostic = accuracies.task_il, accuracies.task_agnostic
        progress.matrix.append(row)
        progress.agnostic_matrix.append(agnostic)
        progress.memory_mb.append(sum(model.memory_breakdown().values()) / BYTES_PER_MB)
        progress.elapsed_s = time.perf_counter() - start
        times = " ".join(f"{k} {v:.1f}s" for k, v in ctx.phase_times[-1].items())
        log(f"{ctx.task_label}: {_accuracy_text(row)}  "
            f"task-agnostic {sum(agnostic) / len(agnostic):6.2f}  {times}")
        for name, other in others.items():
            progress.other_matrices.setdefault(name, []).append(other)
            log(f"{ctx.task_label}: {name} network: {_accuracy_text(other)}")
        if others:  # what they score on each finding's task (CLS-ER: the working network,
            # where the stable memory that predicts lags it)
            for event in events + ([] if unlearned is None else [unlearned]):
                event["other_predictors"] = {name: other[event["task"]]
                                             for name, other in others.items()}
        for event in events:
            log(single_class_warning(event, dataset.N_TASKS))
        progress.single_class.extend(events)
        if unlearned is not None:
            log(unlearned_warning(unlearned, dataset.N_TASKS, dataset.N_CLASSES_PER_TASK))
            progress.unlearned.append(unlearned)
        ctx.emit("task", {"task": task, "task_il": row, "task_agnostic": agnostic,
                          "phase_times": ctx.phase_times[-1]})
        if after_task is not None:
            after_task(progress)
        now = time.perf_counter()
        if (budget_s is not None and task + 1 < dataset.N_TASKS
                and now + (now - task_start) > called + budget_s):
            raise BudgetReached(task + 1)
    return {**summarize(progress.matrix), "task_agnostic": summarize(progress.agnostic_matrix),
            "memory_per_task_mb": progress.memory_mb,
            "single_class_predictions": progress.single_class,
            "unlearned_tasks": progress.unlearned,
            **other_predictors_result(progress),
            "phase_times": ctx.phase_times, "total_time_s": time.perf_counter() - start}
