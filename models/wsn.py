"""WSN (Kang et al., ICML 2022): Winning SubNetworks.

Every conv weight has a learned score. A task uses the subnetwork of each layer's top
--sparsity fraction of weights by |score|; the binary mask's gradient reaches the scores
straight through, so weights and scores learn together. Weights used by any earlier task
are frozen (their gradients are zeroed) and each finished task's masks are stored, so an
earlier task's weights W * m_t never change: its predictions stay bit-identical.

Each task has its own head and its own BatchNorm set normalising with batch statistics, as
the reference's BatchNorm does (it tracks no running statistics); a set per task keeps the
forget-free property while its affine parameters learn (shared BatchNorm would break it, so
it is refused). The reference's BatchNorm has no affine parameters and its heads no bias;
here both learn, per task (--head_bias 0 drops the bias). Masks are reported
packed as bits, as the paper counts them (without its extra Huffman compression); the
scores, kept to learn later tasks, are reported too.
"""
from __future__ import annotations

import argparse
import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call

from backbone import REDUCED_RESNET18
from backbone.contract import TaskNetwork
from datasets.continual_dataset import SequentialDataset, TaskData
from models.continual_model import ContinualModel
from utils.context import TrainingContext
from utils.errors import UserError
from utils.sizes import tensor_bytes
from utils.validators import fraction


def top_fraction_mask(scores: torch.Tensor, density: float) -> torch.Tensor:
    """Boolean mask of the round(density * n) entries with the largest |score| (at least 1)."""
    keep = max(1, round(density * scores.numel()))
    mask = torch.zeros(scores.numel(), dtype=torch.bool, device=scores.device)
    mask[scores.detach().abs().flatten().topk(keep).indices] = True
    return mask.view_as(scores)


def _key(layer_name: str) -> str:
    """A layer's name as a ParameterDict key (which may not contain dots)."""
    return layer_name.replace(".", "__")


# The reference's settings (ihaeyong/WSN, scripts/wsn/): 5-Datasets with this reduced
# ResNet-18 (nf 20; CIFAR-10 is one of its five tasks): Adam, lr 1e-3 (wsn_five_data.sh since
# commit 7d8cd4d; its first version had 1e-1), batch 64, up to 100 epochs; CIFAR-100 in 10
# tasks (with AlexNet): Adam, lr 1e-3, batch 64, 50 epochs (wsn_cifar100_100.sh's first
# version; the current one sets 200). Both halve the lr on a validation plateau (5% held out),
# stop below a minimum lr and restore the best model on it, which is not reproduced here. The
# capacity c is a script argument (default 0.5).
REFERENCE_RUNS = {
    "seq-cifar10": dict(lr=1e-3, batch_size=64, n_epochs=100, sparsity=0.5),
    "seq-cifar100": dict(lr=1e-3, batch_size=64, n_epochs=50, sparsity=0.5),
}


class WSN(ContinualModel):
    NAME = "wsn"
    DEFAULTS = {"per_task_bn": 1, "bn_running_stats": 0, "lr": 1e-3}
    # The reduced ResNet-18 of GPM, which the WSN code uses wherever it runs a ResNet-18
    # (REFERENCE_RUNS above); the BMKP paper does not say WSN ran otherwise.
    PAPER_NETWORK = REDUCED_RESNET18
    BEST_CONFIGS = REFERENCE_RUNS

    @staticmethod
    def add_arguments(parser: argparse._ActionsContainer) -> None:
        parser.add_argument("--sparsity", type=fraction, default=0.5,
                            help="fraction of each conv layer's weights a task's subnetwork "
                                 "uses (WSN's capacity c)")

    def __init__(self, net: TaskNetwork, dataset: SequentialDataset,
                 args: argparse.Namespace) -> None:
        if args.optim_wd > 0:
            raise UserError("wsn freezes earlier tasks' weights by zeroing their gradients, "
                            "and weight decay would still move them: use --optim_wd 0")
        if not args.per_task_bn:
            raise UserError("wsn keeps earlier tasks' predictions fixed, which BatchNorm "
                            "shared by all tasks (and trained by each) would not; drop "
                            "--per_task_bn 0")
        super().__init__(net, dataset, args)
        self.refuse_momentum("Adam")
        self.layers = self.conv_layers()
        self.scores = nn.ParameterDict()
        for name, conv in self.layers.items():
            score = torch.empty_like(conv.weight)
            nn.init.kaiming_uniform_(score, a=math.sqrt(5))
            self.scores[_key(name)] = nn.Parameter(score)
        self.masks: list[dict[str, torch.Tensor]] = []
        self.used = {name: torch.zeros_like(c.weight, dtype=torch.bool)
                     for name, c in self.layers.items()}

    def _score(self, name: str) -> nn.Parameter:
        return self.scores[_key(name)]

    def _current_masks(self, straight_through: bool) -> dict[str, torch.Tensor]:
        masks = {}
        for name in self.layers:
            score = self._score(name)
            mask = top_fraction_mask(score, self.args.sparsity).to(score.dtype)
            # Straight through |score|: the mask's gradient reaches |score|, which ranks.
            magnitude = score.abs()
            masks[name] = mask + magnitude - magnitude.detach() if straight_through else mask
        return masks

    def _masked_forward(self, x: torch.Tensor, task: int,
                        masks: dict[str, torch.Tensor]) -> torch.Tensor:
        weights = {f"{name}.weight": conv.weight * masks[name]
                   for name, conv in self.layers.items()}
        return functional_call(self.net, weights, (x, task))

    def forward(self, x: torch.Tensor, task: int) -> torch.Tensor:
        """A stored task through its own subnetwork; the current one through the top scores."""
        if task < len(self.masks):
            return self._masked_forward(x, task, self.masks[task])
        return self._masked_forward(x, task, self._current_masks(straight_through=False))

    def begin_task(self, task: int, data: TaskData) -> None:
        """A fresh Adam (the reference's optimizer) over weights, scores, heads and BN. Frozen
        weights get zero gradients from the first step, so Adam never moves them."""
        self.reset_optimizer([*self.net.parameters(), *self.scores.parameters()])

    def make_optimizer(self, params: list) -> torch.optim.Optimizer:
        return torch.optim.Adam(params, lr=self.args.lr)

    def observe(self, x: torch.Tensor, y: torch.Tensor, task: int) -> torch.Tensor:
        logits = self._masked_forward(x, task, self._current_masks(straight_through=True))
        return self.optimizer_step(F.cross_entropy(logits, y))

    def adjust_gradients(self) -> None:
        """Weights any earlier task uses are frozen."""
        for name, conv in self.layers.items():
            if conv.weight.grad is not None:
                conv.weight.grad.masked_fill_(self.used[name], 0.0)

    def end_task(self, task: int, data: TaskData, ctx: TrainingContext) -> None:
        masks = {n: m.bool() for n, m in self._current_masks(straight_through=False).items()}
        self.masks.append(masks)
        for name, mask in masks.items():
            self.used[name] |= mask

    def memory_breakdown(self) -> dict[str, int]:
        mask_bits = sum(m.numel() for task in self.masks for m in task.values())
        return {**super().memory_breakdown(), "wsn_masks_packed": -(-mask_bits // 8),
                "wsn_scores": tensor_bytes(self.scores.parameters())}

    def get_extra_state(self) -> dict:
        return {"masks": self.masks, "used": self.used}

    def set_extra_state(self, state: dict) -> None:
        self.masks, self.used = state["masks"], state["used"]
