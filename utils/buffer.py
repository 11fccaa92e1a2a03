"""Reservoir-sampling replay buffer of raw (uint8) images, for rehearsal methods.

Images are kept exactly as the dataset stores them, so 500 CIFAR images cost 1.5 MB rather
than 6 MB of floats, and replayed samples get fresh augmentation each time they are drawn,
like the training batches they are mixed with.
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from datasets.augment import random_crop_flip
from datasets.continual_dataset import to_model_input
from utils.sizes import tensor_bytes


class ReplaySample(NamedTuple):
    """Float images in [0, 1], labels local to their task, task ids, stored logits (or None)."""

    x: torch.Tensor
    y: torch.Tensor
    t: torch.Tensor
    logits: torch.Tensor | None


class ReservoirBuffer:
    """Keeps a uniform random sample of everything ever offered to it (Vitter's algorithm R).

    The n-th item offered (0-based) takes a free slot while there is one, and afterwards
    replaces a random slot with probability capacity / (n + 1), so every item seen so far is
    held with the same probability. Storage is allocated on the first `add`, on the device
    and with the dtypes of what is added.
    """

    def __init__(self, capacity: int, channels_last: bool = False,
                 generator: torch.Generator | None = None) -> None:
        self.capacity = capacity
        self.channels_last = channels_last
        # CPU generator for the reservoir draws and the sampling (None: torch's global one).
        self.generator = generator
        self.seen = 0
        self.x: torch.Tensor | None = None
        self.y: torch.Tensor | None = None
        self.t: torch.Tensor | None = None
        self.logits: torch.Tensor | None = None

    def __len__(self) -> int:
        return min(self.seen, self.capacity)

    def add(self, x: torch.Tensor, y: torch.Tensor, t: torch.Tensor,
            logits: torch.Tensor | None = None) -> None:
        """Offer a batch of uint8 images with their labels, task ids and optional logits."""
        if self.x is None:
            self._allocate(x, y, t, logits)
        n = len(x)
        arrival = self.seen + torch.arange(n, dtype=torch.float64)
        draw = (torch.rand(n, dtype=torch.float64, generator=self.generator)
                * (arrival + 1)).floor()
        slots = torch.where(arrival < self.capacity, arrival, draw).long().tolist()
        self.seen += n
        # Items of one batch that draw the same slot: the later one wins, as if added one by one.
        winner = {slot: i for i, slot in enumerate(slots) if slot < self.capacity}
        if not winner:
            return
        dest = torch.tensor(list(winner), device=self.x.device)
        src = torch.tensor(list(winner.values()), device=x.device)
        self.x[dest] = x[src]
        self.y[dest] = y[src]
        self.t[dest] = t[src]
        if self.logits is not None:
            self.logits[dest] = logits[src].to(self.logits.dtype)

    def sample(self, n: int, augment: bool = True) -> ReplaySample:
        """Up to n distinct stored items, as a training batch: float, augmented, same layout."""
        count = min(n, len(self))
        return self.gather(torch.randperm(len(self), generator=self.generator)[:count], augment)

    def gather(self, index: torch.Tensor, augment: bool = True) -> ReplaySample:
        """The stored items at `index` (slots below len(self)), as a training batch."""
        index = index.to(self.x.device)
        x = self.x[index]
        if augment:
            x = random_crop_flip(x, padding=4)
        x = to_model_input(x, self.channels_last)
        logits = None if self.logits is None else self.logits[index]
        return ReplaySample(x, self.y[index], self.t[index], logits)

    def nbytes(self) -> int:
        """Bytes allocated (the whole capacity after the first add): images at their stored
        dtype (uint8), labels, task ids and logits."""
        return tensor_bytes(s for s in (self.x, self.y, self.t, self.logits) if s is not None)

    def state_dict(self) -> dict:
        """Everything needed to continue the stream exactly (for checkpoints)."""
        return {"seen": self.seen, "x": self.x, "y": self.y, "t": self.t, "logits": self.logits}

    def load_state_dict(self, state: dict) -> None:
        self.seen = state["seen"]
        self.x, self.y, self.t, self.logits = state["x"], state["y"], state["t"], state["logits"]

    def _allocate(self, x: torch.Tensor, y: torch.Tensor, t: torch.Tensor,
                  logits: torch.Tensor | None) -> None:
        def like(sample: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
            return torch.empty((self.capacity, *sample.shape[1:]), dtype=dtype or sample.dtype,
                               device=sample.device)
        self.x, self.y, self.t = like(x), like(y), like(t)
        # Logits are kept in float32 whatever precision (e.g. bfloat16 autocast) produced them.
        self.logits = None if logits is None else like(logits, torch.float32)


class RingBuffer(ReservoirBuffer):
    """An equal share of the slots per task, each share holding the last items its task
    offered: mammoth's ring buffer (aimagelab/mammoth, utils/ring_buffer.py), which HAL uses.

    With `share = capacity // n_tasks`, task k's n-th item (0-based, counted from the task's
    first) goes to slot k * share + n % share, so a task that offered at least `share` items
    fills its share with the last `share` of them, and no task ever overwrites another's.
    Only n_tasks * share slots are allocated (mammoth's leftover capacity % n_tasks slots are
    never written). `seen` counts the items offered during the current task; `next_task`
    moves on to the next share. Sampling draws uniformly from every filled slot.
    """

    def __init__(self, capacity: int, n_tasks: int, channels_last: bool = False,
                 generator: torch.Generator | None = None) -> None:
        if capacity < n_tasks:
            raise ValueError(f"a ring buffer of {capacity} slots cannot give {n_tasks} tasks "
                             "a slot each")
        self.share = capacity // n_tasks
        super().__init__(self.share * n_tasks, channels_last, generator)
        self.n_tasks = n_tasks
        self.task = 0
        # Slots filled in each task's share (a task offering fewer than `share` items leaves
        # the rest of its share empty).
        self.filled = [0] * n_tasks

    def __len__(self) -> int:
        return sum(self.filled)

    def next_task(self) -> None:
        """The current task is over: later items go to the next task's share."""
        self.task += 1
        self.seen = 0

    def add(self, x: torch.Tensor, y: torch.Tensor, t: torch.Tensor,
            logits: torch.Tensor | None = None) -> None:
        """Offer a batch of the current task's uint8 images with labels, task ids and logits."""
        if self.task >= self.n_tasks:
            raise RuntimeError(f"the ring buffer has a share for {self.n_tasks} tasks only")
        if self.x is None:
            self._allocate(x, y, t, logits)
        n = len(x)
        # Of a batch longer than the share, only its last `share` items survive (as if added
        # one by one); those land in distinct slots.
        src = torch.arange(max(0, n - self.share), n, device=x.device)
        dest = (self.task * self.share + (self.seen + src) % self.share).to(self.x.device)
        self.x[dest] = x[src]
        self.y[dest] = y[src]
        self.t[dest] = t[src]
        if self.logits is not None:
            self.logits[dest] = logits[src].to(self.logits.dtype)
        self.seen += n
        self.filled[self.task] = min(self.seen, self.share)

    def slots(self) -> torch.Tensor:
        """The filled slots, in order."""
        return torch.cat([torch.arange(k * self.share, k * self.share + n)
                          for k, n in enumerate(self.filled)])

    def sample(self, n: int, augment: bool = True) -> ReplaySample:
        """Up to n distinct filled slots, as a training batch: float, augmented, same layout."""
        slots = self.slots()
        chosen = torch.randperm(len(slots), generator=self.generator)[:min(n, len(slots))]
        return self.gather(slots[chosen], augment)

    def state_dict(self) -> dict:
        return {**super().state_dict(), "task": self.task, "filled": list(self.filled)}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.task, self.filled = state["task"], list(state["filled"])
