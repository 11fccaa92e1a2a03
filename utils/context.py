"""What a method gets from the loop: batches, progress bars, autocast and phase timers."""
from __future__ import annotations

import argparse
import json
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import torch
from tqdm import tqdm

from datasets.continual_dataset import TaskData, iterate_batches

DEBUG_BATCHES = 5


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
    task: int = 0
    task_label: str = ""
    # Where each finished epoch is appended as one JSON line (None: not logged).
    epoch_log: Path | None = None
    # Called with ("epoch", the epoch's line) and ("task", its evaluation) as they happen
    # (e.g. --tensorboard's writer), so every view of a run is fed from the same records.
    listeners: list[Callable[[str, dict], None]] = field(default_factory=list)
    phase_name: str = ""

    @classmethod
    def from_args(cls, args: argparse.Namespace, device: torch.device,
                  show_progress: bool = False) -> "TrainingContext":
        """The context the options describe: batch sizes, --debug_mode, layout and --amp."""
        return cls(device, args.batch_size, args.eval_batch_size, debug=bool(args.debug_mode),
                   show_progress=show_progress, channels_last=bool(args.channels_last),
                   amp=bool(args.amp))

    @property
    def max_batches(self) -> int | None:
        return DEBUG_BATCHES if self.debug else None

    def steps(self, n: int) -> int:
        """n iterations of an inner optimisation (DeepInversion's synthesis, HAL's anchors),
        at most DEBUG_BATCHES under --debug_mode, so a smoke run runs every loop briefly."""
        return n if self.max_batches is None else min(n, self.max_batches)

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Add the wall time of the block to the current task's `name` phase."""
        self._synchronize()
        start, outer = time.perf_counter(), self.phase_name
        self.phase_name = name
        try:
            yield
        finally:
            self._synchronize()
            self.phase_name = outer
            times = self.phase_times[-1]
            times[name] = times.get(name, 0.0) + time.perf_counter() - start

    def log_epoch(self, epoch: int, n_epochs: int, loss: float | None, seconds: float,
                  images: int) -> None:
        """Append one finished epoch to the epoch log, so a run that is killed still shows
        how far it got and how fast; then tell the listeners."""
        line = {"task": self.task, "phase": self.phase_name, "epoch": epoch,
                "n_epochs": n_epochs, "loss": loss, "seconds": round(seconds, 4),
                "images_per_s": round(images / seconds, 1) if seconds > 0 else None}
        if self.epoch_log is not None:
            self.epoch_log.parent.mkdir(parents=True, exist_ok=True)
            with open(self.epoch_log, "a") as f:
                f.write(json.dumps(line) + "\n")
        self.emit("epoch", line)

    def emit(self, kind: str, record: dict) -> None:
        """Pass one event of the run to every listener."""
        for listener in self.listeners:
            listener(kind, record)

    def autocast(self) -> torch.autocast:
        """bfloat16 autocast for forward passes when --amp is on (a no-op otherwise)."""
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp)

    def batches(self, data: TaskData, desc: str, batch_size: int | None = None,
                shuffle: bool = True, augment: bool = True,
                equal_sizes: bool = False,
                with_raw: bool = False) -> Iterator[tuple[torch.Tensor, ...]]:
        """Batches of `data` with a progress bar (see iterate_batches)."""
        size = batch_size or self.batch_size
        total = -(-len(data) // size)
        if self.max_batches is not None:
            total = min(total, self.max_batches)
        stream = iterate_batches(data, size, shuffle=shuffle, augment=augment,
                                 equal_sizes=equal_sizes, max_batches=self.max_batches,
                                 channels_last=self.channels_last, with_raw=with_raw)
        return iter(tqdm(stream, total=total, desc=f"{self.task_label} {desc}".strip(),
                         leave=False, disable=not self.show_progress, file=sys.stderr))

    def eval_batches(self, data: TaskData, desc: str) -> Iterator[tuple[torch.Tensor, ...]]:
        """Evaluation batches of `data` on the run's device: in order, un-augmented, every
        image once (the remainder batch included) unless --debug_mode caps the batches."""
        return self.batches(data.to(self.device), desc, batch_size=self.eval_batch_size,
                            shuffle=False, augment=False)

    def _synchronize(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
