"""The Task-IL loop: learn each task, then evaluate every task seen so far with its task id."""
from __future__ import annotations

import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Iterator

import torch
from tqdm import tqdm

from datasets.continual_dataset import SequentialDataset, TaskData, iterate_batches
from utils.metrics import summarize

if TYPE_CHECKING:
    from models.continual_model import ContinualModel

DEBUG_BATCHES = 5
BYTES_PER_MB = 2 ** 20


@dataclass
class TrainingContext:
    """What a model needs from the loop: batches, progress bars and phase timers."""

    device: torch.device
    batch_size: int
    eval_batch_size: int
    debug: bool = False
    show_progress: bool = True
    channels_last: bool = False
    amp: bool = False
    phase_times: list[dict[str, float]] = field(default_factory=list)
    task_label: str = ""

    @property
    def max_batches(self) -> int | None:
        return DEBUG_BATCHES if self.debug else None

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Add the wall time of the block to the current task's `name` phase."""
        self._synchronize()
        start = time.perf_counter()
        try:
            yield
        finally:
            self._synchronize()
            times = self.phase_times[-1]
            times[name] = times.get(name, 0.0) + time.perf_counter() - start

    def autocast(self) -> torch.autocast:
        """bfloat16 autocast for forward passes when --amp is on (a no-op otherwise)."""
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp)

    def batches(self, data: TaskData, desc: str, batch_size: int | None = None,
                shuffle: bool = True, augment: bool = True,
                equal_sizes: bool = False) -> Iterator[tuple[torch.Tensor, ...]]:
        """Batches of `data` with a progress bar (see iterate_batches)."""
        size = batch_size or self.batch_size
        total = -(-len(data) // size)
        if self.max_batches is not None:
            total = min(total, self.max_batches)
        stream = iterate_batches(data, size, shuffle=shuffle, augment=augment,
                                 equal_sizes=equal_sizes, max_batches=self.max_batches,
                                 channels_last=self.channels_last)
        return iter(tqdm(stream, total=total, desc=f"{self.task_label} {desc}".strip(),
                         leave=False, disable=not self.show_progress, file=sys.stderr))

    def _synchronize(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


def evaluate(model: ContinualModel, dataset: SequentialDataset, last_task: int,
             ctx: TrainingContext) -> list[float]:
    """Task-IL accuracy (%) on tasks 0..last_task, each predicted with its own task id."""
    was_training = model.training
    model.eval()
    accuracies = []
    with torch.inference_mode():
        for task in range(last_task + 1):
            data = dataset.test_data(task).to(ctx.device)
            correct = torch.zeros((), dtype=torch.long, device=ctx.device)
            seen = 0
            for x, y, _ in iterate_batches(data, ctx.eval_batch_size, shuffle=False,
                                           augment=False, max_batches=ctx.max_batches,
                                           channels_last=ctx.channels_last):
                with ctx.autocast():
                    correct += (model.predict(x, task) == y).sum()
                seen += len(y)
            accuracies.append(100.0 * correct.item() / seen)
    model.train(was_training)
    return accuracies


@dataclass
class Progress:
    """The tasks done so far: their rows of the accuracy matrix, the method's memory after
    each and the wall time spent; empty for a fresh run, restored from a checkpoint on resume."""

    matrix: list[list[float]] = field(default_factory=list)
    memory_mb: list[float] = field(default_factory=list)
    elapsed_s: float = 0.0

    @property
    def next_task(self) -> int:
        return len(self.matrix)


def run_tasks(model: ContinualModel, dataset: SequentialDataset, ctx: TrainingContext,
              log=print, progress: Progress | None = None,
              after_task: Callable[[Progress], None] | None = None) -> dict:
    """Learn the tasks in order from `progress.next_task`, calling `after_task` once each
    is evaluated; returns the accuracy matrix, its metrics and phase times."""
    progress = progress or Progress()
    start = time.perf_counter() - progress.elapsed_s
    for task in range(progress.next_task, dataset.N_TASKS):
        ctx.phase_times.append({})
        ctx.task_label = f"task {task + 1}/{dataset.N_TASKS}"
        train = dataset.train_data(task).to(ctx.device)
        model.begin_task(task, train)
        model.fit_task(task, train, ctx)
        model.end_task(task, train, ctx)
        with ctx.phase("eval"):
            row = evaluate(model, dataset, task, ctx)
        progress.matrix.append(row)
        progress.memory_mb.append(sum(model.memory_breakdown().values()) / BYTES_PER_MB)
        progress.elapsed_s = time.perf_counter() - start
        times = " ".join(f"{k} {v:.1f}s" for k, v in ctx.phase_times[-1].items())
        log(f"{ctx.task_label}: avg acc {sum(row) / len(row):6.2f}  "
            f"per task [{', '.join(f'{a:.1f}' for a in row)}]  {times}")
        if after_task is not None:
            after_task(progress)
    return {**summarize(progress.matrix), "memory_per_task_mb": progress.memory_mb,
            "phase_times": ctx.phase_times, "total_time_s": time.perf_counter() - start}
