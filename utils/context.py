"""What a method gets from the loop: batches, progress bars, autocast and phase timers."""
from __future__ import annotations

import argparse
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator

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
    task_label: str = ""

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

    def _synchronize(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
