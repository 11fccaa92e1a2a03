"""--tensorboard: a run's events as TensorBoard scalars, from the same records the epoch log
gets (each finished epoch) and the task lines come from (each evaluation after a task)."""
from __future__ import annotations

from pathlib import Path

from utils.errors import UserError


def tensorboard_dir(result: Path) -> Path:
    """The run's TensorBoard folder, beside its result: <stem>.tensorboard/ (so
    `tensorboard --logdir result/` finds every run)."""
    return result.with_suffix(".tensorboard")


class TensorBoardEvents:
    """Write each event as it comes: per epoch the last loss and images/s of its phase
    (step: epochs of that phase so far over all tasks), per task the average and per-task
    Task-IL and task-agnostic accuracy and the seconds of each phase (step: tasks learned)."""

    def __init__(self, log_dir: Path) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:  # torch's writer needs the tensorboard package
            raise UserError("--tensorboard needs the tensorboard package: pip install "
                            "tensorboard (or drop --tensorboard)") from None
        self.writer = SummaryWriter(str(log_dir))

    def __call__(self, kind: str, record: dict) -> None:
        if kind == "epoch":
            self._epoch(record)
        elif kind == "task":
            self._task(record)
        self.writer.flush()

    def _epoch(self, record: dict) -> None:
        phase = record["phase"] or "train"
        step = record["task"] * record["n_epochs"] + record["epoch"]
        if record["loss"] is not None:
            self.writer.add_scalar(f"loss/{phase}", record["loss"], step)
        if record["images_per_s"] is not None:
            self.writer.add_scalar(f"images_per_s/{phase}", record["images_per_s"], step)

    def _task(self, record: dict) -> None:
        step = record["task"] + 1
        for kind in ("task_il", "task_agnostic"):
            row = record[kind]
            self.writer.add_scalar(f"accuracy/{kind}", sum(row) / len(row), step)
            for task, accuracy in enumerate(row):
                self.writer.add_scalar(f"{kind}/task_{task + 1}", accuracy, step)
        for phase, seconds in record["phase_times"].items():
            self.writer.add_scalar(f"seconds/{phase}", seconds, step)

    def close(self) -> None:
        self.writer.close()
