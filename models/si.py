"""Synaptic Intelligence (Zenke et al., 2017): importance from each weight's path integral.

During a task every step adds omega_i += -g_i * delta_i, where g is the gradient of the task
loss alone (not of the penalty: the path integral measures each weight's contribution to this
task's loss) and delta the step the optimiser actually took. At the task end
importance_i += omega_i / (Delta_i^2 + xi), with Delta the weight's change over the whole
task, and the anchor moves to the current weights; later steps add
c * sum_i importance_i (theta_i - anchor_i)^2 to the loss (no 1/2, as in mammoth, so its
published c applies). Only shared parameters are tracked (see models/penalty.py).

Two ways to accumulate omega and take the step (--omega_mode). `paper` (the default): as
above. `mammoth`: mammoth's SI as its published c was tuned with (aimagelab/mammoth,
models/si.py before September 2024, e.g. its first commit 7ab9db9; it has since accumulated
the task-loss gradient times the step, our `paper` mode plus its clipping): the gradient
of the whole loss (task loss plus penalty) is clipped to [-1, 1] elementwise
(clip_grad_value_) before the step, and omega += lr * g^2 with that clipped total
gradient and --lr (-g * step for plain SGD, used whatever the optimizer and schedule).
`--model_config best` runs mammoth's values in mammoth's mode.

omega exists only while a task is trained, so it is not part of the memory between tasks.
Here omega comes from the task head's own classes; mammoth's single head trains on all
classes, so its path integral (and the scale its c was tuned for) differs by no fixed factor.
"""
from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from datasets.continual_dataset import SequentialDataset, TaskData
from models.penalty import PenaltyModel
from utils.context import TrainingContext
from utils.validators import non_negative_float, positive_float


class Si(PenaltyModel):
    NAME = "si"
    # mammoth's published best arguments for Task-/Class-IL without a buffer
    # (aimagelab/mammoth, utils/best_args.py, best_args[dataset]['si'][-1]).
    BEST_CONFIGS = {
        "seq-cifar10": dict(lr=0.03, c=0.5, xi=1.0, batch_size=32, n_epochs=50,
                            omega_mode="mammoth"),
        "seq-tinyimg": dict(lr=0.03, c=0.5, xi=1.0, batch_size=32, n_epochs=100,
                            omega_mode="mammoth"),
    }

    @staticmethod
    def add_arguments(parser: argparse._ActionsContainer) -> None:
        parser.add_argument("--c", type=non_negative_float, default=0.5,
                            help="weight of the surrogate-loss penalty")
        parser.add_argument("--xi", type=positive_float, default=1.0,
                            help="damping of the importance: omega / (Delta^2 + xi)")
        parser.add_argument("--omega_mode", choices=("paper", "mammoth"), default="paper",
                            help="paper: omega += -g_task * step taken; mammoth: gradients "
                                 "clipped to [-1, 1], omega += lr * g^2 (its published c)")

    def __init__(self, net, dataset: SequentialDataset, args: argparse.Namespace) -> None:
        super().__init__(net, dataset, args)
        self.omega: list[torch.Tensor] | None = None

    def begin_task(self, task: int, data: TaskData) -> None:
        super().begin_task(task, data)
        self.omega = [torch.zeros_like(p) for p in self.penalty.params]

    def observe(self, x: torch.Tensor, y: torch.Tensor, task: int | torch.Tensor) -> torch.Tensor:
        if self.args.omega_mode == "mammoth":
            return self._mammoth_observe(x, y, task)
        params = self.penalty.params
        self.optimizer.zero_grad(set_to_none=True)
        task_loss = F.cross_entropy(self.net(x, task), y)
        task_loss.backward()
        task_grads = [p.grad.clone() for p in params]
        before = [p.detach().clone() for p in params]
        penalty = self.args.c * self.penalty()
        if penalty.requires_grad:
            penalty.backward()  # adds the penalty's gradient to the task loss's
        self.optimizer.step()
        with torch.no_grad():
            for omega, g, p, b in zip(self.omega, task_grads, params, before):
                omega.sub_(g * (p - b))
        return (task_loss + penalty).detach()

    def _mammoth_observe(self, x: torch.Tensor, y: torch.Tensor,
                         task: int | torch.Tensor) -> torch.Tensor:
        """mammoth's step (the whole loss's gradient clipped in adjust_gradients), then
        omega += lr * g^2 of that clipped gradient."""
        loss = self.optimizer_step(F.cross_entropy(self.net(x, task), y)
                                   + self.args.c * self.penalty())
        with torch.no_grad():
            for omega, p in zip(self.omega, self.penalty.params):
                if p.grad is not None:
                    omega.add_(self.args.lr * p.grad.pow(2))
        return loss

    def adjust_gradients(self) -> None:
        """mammoth mode clips every gradient to [-1, 1] (clip_grad_value_) before the step."""
        if self.args.omega_mode == "mammoth":
            torch.nn.utils.clip_grad_value_(self.net.parameters(), 1.0)

    def end_task(self, task: int, data: TaskData, ctx: TrainingContext) -> None:
        importance = [omega / (delta.pow(2) + self.args.xi)
                      for omega, delta in zip(self.omega, self.penalty.drift())]
        self.penalty.consolidate(importance)
        self.omega = None
