"""Shared base of the rehearsal methods (ER, A-GEM, GEM, DER, DER++): a reservoir buffer of
raw images replayed through each sample's own task head.

The loop's batches are augmented floats, but the buffer keeps the dataset's uint8 images (4x
smaller, re-augmented whenever replayed): `fit_task` asks the batches for their raw images too
and passes them to `observe` as `raw`.
"""
from __future__ import annotations

import argparse

import torch

from datasets.continual_dataset import SequentialDataset, TaskData
from models.continual_model import ContinualModel
from utils.buffer import ReplaySample, ReservoirBuffer
from utils.context import TrainingContext
from utils.validators import positive_int


class ReplayModel(ContinualModel):
    """Subclasses implement `observe(x, y, task, raw)`; `raw` is the batch's uint8 images."""

    DEFAULTS = {"per_task_bn": 0}
    SHARED_BN_REASON = "replays batches mixing tasks"

    @staticmethod
    def add_arguments(parser: argparse._ActionsContainer) -> None:
        parser.add_argument("--buffer_size", type=positive_int, default=500,
                            help="images kept in the replay buffer")
        parser.add_argument("--minibatch_size", type=positive_int, default=None,
                            help="buffer samples replayed per step (default: --batch_size)")

    def __init__(self, net, dataset: SequentialDataset, args: argparse.Namespace) -> None:
        super().__init__(net, dataset, args)
        self.buffer = ReservoirBuffer(args.buffer_size, channels_last=bool(args.channels_last))
        self.minibatch_size = args.minibatch_size or args.batch_size
        self.n_classes = dataset.N_TASKS * dataset.N_CLASSES_PER_TASK

    def fit_task(self, task: int, data: TaskData, ctx: TrainingContext) -> None:
        """The default epochs of `observe`, with each batch's raw images (module docstring)."""
        with ctx.phase("train"):
            self.train_epochs(data, ctx, self.args.n_epochs, self.observe, task, with_raw=True)

    @staticmethod
    def task_ids(task: int, y: torch.Tensor) -> torch.Tensor:
        """The batch's task id as one id per sample, to mix it with replayed samples."""
        return torch.full((len(y),), task, dtype=torch.long, device=y.device)

    def store(self, raw: torch.Tensor, y: torch.Tensor, task: int,
              logits: torch.Tensor | None = None) -> None:
        """Offer a batch of one task's uint8 images (and optionally logits) to the buffer."""
        self.buffer.add(raw, y, self.task_ids(task, y), logits)

    def replay(self) -> ReplaySample | None:
        """A replay minibatch from the buffer, or None while it is empty."""
        return self.buffer.sample(self.minibatch_size) if len(self.buffer) else None

    def checkpoint_state(self) -> dict:
        return {**super().checkpoint_state(), "buffer": self.buffer.state_dict()}

    def load_checkpoint_state(self, state: dict) -> None:
        super().load_checkpoint_state(state)
        self.buffer.load_state_dict(state["buffer"])

    def memory_breakdown(self) -> dict[str, int]:
        return {**super().memory_breakdown(), "buffer": self.buffer.nbytes()}


def single_head_mse(logits: torch.Tensor, targets: torch.Tensor,
                    n_classes: int) -> torch.Tensor:
    """Squared error of each sample's own-head logits against `targets`, weighted per logit
    as mammoth's single head over all `n_classes` classes weighs it (F.mse_loss there: a
    mean over batch x n_classes logits), so its published weights (DER's alpha, CLS-ER's
    reg_weight, HAL's lambda) pull each logit as hard as there. A multi-head network has
    only the own head's logits to compare; a mean over those alone would pull each
    n_classes / (classes per task) times harder, which at CLS-ER's lr 0.1 diverges within
    the first steps of a run. Computed in at least float32."""
    dtype = torch.promote_types(logits.dtype, torch.float32)
    error = logits.to(dtype) - targets.detach().to(dtype)
    return error.pow(2).sum() / (len(logits) * n_classes)


def with_replay(x: torch.Tensor, y: torch.Tensor, task: int,
                past: ReplaySample | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Task `task`'s batch followed by a replayed one, as one mixed-task batch: inputs,
    labels and per-sample task ids (the batch alone when nothing is replayed)."""
    tasks = ReplayModel.task_ids(task, y)
    if past is None:
        return x, y, tasks
    return torch.cat((x, past.x)), torch.cat((y, past.y)), torch.cat((tasks, past.t))
