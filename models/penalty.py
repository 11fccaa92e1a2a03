"""Quadratic penalties anchored at old parameters, shared by the regularisation baselines.

EWC and SI both keep, for every shared parameter, an anchor (its value when the last task
ended) and a per-element importance, and add sum_i importance_i * (theta_i - anchor_i)^2 to
the loss; they differ only in how the importance is estimated. This module holds that state
once.

Only shared parameters are anchored. In Task-IL each task has its own head (and, with
--per_task_bn, its own BatchNorm set); a task's own parameters get no gradient from later
tasks' losses, so they never move after their task and a penalty on them would always be zero
while doubling their memory.
"""
from __future__ import annotations

import argparse
from typing import Iterable

import torch
import torch.nn as nn

from backbone.contract import TaskNetwork
from datasets.continual_dataset import SequentialDataset
from models.continual_model import ContinualModel
from utils.sizes import tensor_bytes


class QuadraticPenalty(nn.Module):
    """Anchor and importance of a set of parameters, and the penalty they define.

    Before the first consolidation the anchor is the parameters' initial value and the
    importance is zero, so the penalty is zero and the anchor marks where training started
    (which SI needs for the first task). The state is held as buffers so it follows the
    model across devices; the parameters themselves are referenced, not registered.
    """

    def __init__(self, params: Iterable[nn.Parameter]) -> None:
        super().__init__()
        self.params = list(params)
        for i, p in enumerate(self.params):
            self.register_buffer(f"anchor_{i}", p.detach().clone())
            self.register_buffer(f"importance_{i}", torch.zeros_like(p))
        self.consolidated = False

    @property
    def anchor(self) -> list[torch.Tensor]:
        return [getattr(self, f"anchor_{i}") for i in range(len(self.params))]

    @property
    def importance(self) -> list[torch.Tensor]:
        return [getattr(self, f"importance_{i}") for i in range(len(self.params))]

    def forward(self) -> torch.Tensor:
        """sum_i importance_i * (theta_i - anchor_i)^2; a constant zero before any task ended."""
        if not self.consolidated:
            return torch.zeros((), device=self.params[0].device)
        return sum((w * (p - a).pow(2)).sum()
                   for p, a, w in zip(self.params, self.anchor, self.importance))

    def drift(self) -> list[torch.Tensor]:
        """How far each parameter moved from its anchor (theta - anchor), detached."""
        return [p.detach() - a for p, a in zip(self.params, self.anchor)]

    @torch.no_grad()
    def consolidate(self, new_importance: list[torch.Tensor], decay: float = 1.0) -> None:
        """importance = decay * importance + new_importance; anchor = current parameters."""
        for p, a, w, new in zip(self.params, self.anchor, self.importance, new_importance):
            w.mul_(decay).add_(new)
            a.copy_(p)
        self.consolidated = True

    def get_extra_state(self) -> dict:
        """Keeps `consolidated` in state_dict, so a resumed run penalises as before."""
        return {"consolidated": self.consolidated}

    def set_extra_state(self, state: dict) -> None:
        self.consolidated = state["consolidated"]

    def memory_breakdown(self) -> dict[str, int]:
        return {"penalty_anchor": tensor_bytes(self.anchor),
                "penalty_importance": tensor_bytes(self.importance)}


class PenaltyModel(ContinualModel):
    """Base of the methods whose only state beyond the network is a QuadraticPenalty on the
    shared parameters (no NAME: not a method by itself)."""

    def __init__(self, net: TaskNetwork, dataset: SequentialDataset,
                 args: argparse.Namespace) -> None:
        super().__init__(net, dataset, args)
        self.penalty = QuadraticPenalty(net.shared_parameters().values())

    def memory_breakdown(self) -> dict[str, int]:
        return {**super().memory_breakdown(), **self.penalty.memory_breakdown()}
