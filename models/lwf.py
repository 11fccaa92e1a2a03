"""Learning without Forgetting (Li & Hoiem, 2017) with Task-IL heads.

While task t is learned, the old heads' outputs on the new images are distilled from the
network as it was before task t: at begin_task a frozen copy of the network is taken, and on
every (augmented) training batch the loss is

    CE(head_t(x), y)
        + alpha * sum_{j<t} KL(softmax(old_head_j(x) / T) || softmax(head_j(x) / T))

The KL has the gradient of the paper's distillation, the cross-entropy of the softened
distributions, which mammoth's and FACIL's LwF compute too: (softmax(head / T) - target) / T
per logit, with no T^2 factor (Hinton et al.'s), so their published alpha carries over as it
is. Mammoth's single-head version softens one softmax over all old classes; here each old
head has its own.

The targets are computed on the fly on the same augmented batch the live network sees,
rather than recorded once on the un-augmented images: this matches the old model's outputs
to exactly the inputs being trained on, with no stored logits. The frozen copy runs in eval
mode (its BatchNorm uses the running statistics it had before the task). The copy exists
only while a task is trained and is dropped at end_task, so the memory between tasks is the
network alone. The original's warm-up of the new head with the rest frozen is left out.

All old heads read the same features, so per-task BatchNorm (which would compute them with
another task's statistics and update old tasks' running statistics) is refused.
"""
from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from backbone.contract import TaskNetwork
from datasets.continual_dataset import SequentialDataset, TaskData
from models.continual_model import ContinualModel, frozen_copy
from utils.context import TrainingContext
from utils.validators import non_negative_float, positive_float


def heads_logits(net: TaskNetwork, x: torch.Tensor, n_heads: int) -> list[torch.Tensor]:
    """Logits of heads 0..n_heads-1 on the same images, from one pass through the features."""
    features = net.features(x, 0)
    return [net.task_logits(features, j) for j in range(n_heads)]


def distillation_loss(logits: torch.Tensor, targets: torch.Tensor,
                      temperature: float) -> torch.Tensor:
    """KL between the softened target and predicted distributions (batch mean), without a
    T^2 factor: the gradient of LwF's softened cross-entropy (module docstring)."""
    return F.kl_div(F.log_softmax(logits / temperature, dim=1),
                    F.log_softmax(targets / temperature, dim=1),
                    reduction="batchmean", log_target=True)


class Lwf(ContinualModel):
    NAME = "lwf"
    SHARED_BN_REASON = "distils every old head from the same features"
    FROZEN_COPIES = ("old_net",)
    # mammoth's published best arguments for Task-/Class-IL without a buffer
    # (aimagelab/mammoth, utils/best_args.py, best_args[dataset]['lwf'][-1]; its softmax_temp
    # is --temperature here).
    BEST_CONFIGS = {
        "seq-cifar10": dict(lr=0.01, alpha=3.0, temperature=2.0, batch_size=32, n_epochs=50,
                            optim_wd=0.0005),
        "seq-tinyimg": dict(lr=0.01, alpha=1.0, temperature=2.0, batch_size=32, n_epochs=100,
                            optim_wd=0.0005),
    }

    @staticmethod
    def add_arguments(parser: argparse._ActionsContainer) -> None:
        parser.add_argument("--alpha", type=non_negative_float, default=1.0,
                            help="weight of the distillation loss of the old heads")
        parser.add_argument("--temperature", type=positive_float, default=2.0,
                            help="softmax temperature of the distillation")

    def __init__(self, net, dataset: SequentialDataset, args: argparse.Namespace) -> None:
        super().__init__(net, dataset, args)
        self.old_net: TaskNetwork | None = None

    def begin_task(self, task: int, data: TaskData) -> None:
        super().begin_task(task, data)
        if task > 0:
            self.old_net = frozen_copy(self.net)

    def old_targets(self, x: torch.Tensor, task: int) -> list[torch.Tensor]:
        """Old heads' logits on `x` from the network as it was before `task` began."""
        with torch.no_grad():
            return heads_logits(self.old_net, x, task)

    def observe(self, x: torch.Tensor, y: torch.Tensor, task: int | torch.Tensor) -> torch.Tensor:
        targets = self.old_targets(x, task) if task > 0 else []
        logits = heads_logits(self.net, x, task + 1)
        return self.optimizer_step(self.lwf_loss(logits, y, task, targets, self.args.alpha))

    def lwf_loss(self, logits: list[torch.Tensor], y: torch.Tensor, task: int,
                 targets: list[torch.Tensor], weight: float) -> torch.Tensor:
        """The task's cross-entropy on head `task`'s logits plus `weight` times the old heads'
        distillation towards `targets` (their logits from the frozen copy; none for the first
        task); `logits` are heads 0..task's."""
        loss = F.cross_entropy(logits[task], y)
        if task > 0:
            distill = sum(distillation_loss(new, old, self.args.temperature)
                          for new, old in zip(logits[:task], targets))
            loss = loss + weight * distill
        return loss

    def end_task(self, task: int, data: TaskData, ctx: TrainingContext) -> None:
        self.old_net = None
