"""GEM (Lopez-Paz & Ranzato, NeurIPS 2017): one episodic memory per past task; the update is
the gradient closest to the current one that does not increase any past task's memory loss,
found by a small quadratic program in the dual (one variable per past task)."""
from __future__ import annotations

import argparse

import numpy as np
import torch
import torch.nn.functional as F

from datasets.continual_dataset import SequentialDataset
from models.agem import Agem
from utils.errors import UserError
from utils.validators import non_negative_float

try:
    import quadprog
except ImportError:  # only gem needs it; a gem run without it is refused in Gem.__init__
    quadprog = None

QP_EPS = 1e-3  # ridge on the dual's matrix, which is singular when memories' gradients align


def project_to_cone(grad: torch.Tensor, refs: torch.Tensor, margin: float) -> torch.Tensor:
    """The gradient closest to `grad` with a non-negative dot product with every row of
    `refs` (`margin` > 0 pushes further inside); `grad` itself when it conflicts with none."""
    if bool((refs @ grad >= 0).all()):
        return grad
    m, g = refs.double().cpu().numpy(), grad.double().cpu().numpy()
    gram = m @ m.T
    gram = 0.5 * (gram + gram.T) + QP_EPS * np.eye(len(m))
    # quadprog: min 1/2 v'Gv - a'v subject to C'v >= b; here a = -Mg, C = I, b = margin.
    v = quadprog.solve_qp(gram, -(m @ g), np.eye(len(m)), np.full(len(m), margin))[0]
    return torch.from_numpy(m.T @ v + g).to(grad)


class Gem(Agem):
    """Shares A-GEM's memory (an equal share per finished task) and gradient plumbing; only
    the constraint differs: one per past task instead of one on their average. Each step's
    memory gradients are taken on augmented copies (random crop and flip), as in mammoth's
    GEM (`buffer.get_data(..., transform=self.transform)`), whose hyperparameters these are."""

    NAME = "gem"
    # Best values with a 500-image buffer from mammoth's utils/best_args.py (aimagelab/mammoth,
    # the DER paper's grid search); mammoth has no GEM entry for seq-tinyimg.
    BEST_CONFIGS = {
        "seq-cifar10": dict(lr=0.03, gamma=0.5, batch_size=32, n_epochs=50),
    }

    @staticmethod
    def add_arguments(parser: argparse._ActionsContainer) -> None:
        Agem.add_arguments(parser)
        parser.add_argument("--gamma", type=non_negative_float, default=0.5,
                            help="margin of the QP's dual variables (GEM's memory strength)")

    def __init__(self, net, dataset: SequentialDataset, args: argparse.Namespace) -> None:
        if quadprog is None:
            raise UserError("gem solves a quadratic program with the quadprog package, which "
                            "is not installed: pip install quadprog")
        super().__init__(net, dataset, args)

    def observe(self, x: torch.Tensor, y: torch.Tensor, task: int,
                raw: torch.Tensor) -> torch.Tensor:
        if task == 0:
            return self.optimizer_step(F.cross_entropy(self.net(x, task), y))
        stored_tasks = self.buffer.t[:len(self.buffer)]
        refs, reached = [], []
        for past in range(task):
            memory = self.buffer.gather(torch.nonzero(stored_tasks == past).squeeze(1))
            ref, hits = self._gradient(F.cross_entropy(self.net(memory.x, memory.t), memory.y))
            refs.append(ref)
            reached.append(hits)
        loss = F.cross_entropy(self.net(x, task), y)
        grad, hits = self._gradient(loss)
        self._set_gradient(project_to_cone(grad, torch.stack(refs), self.args.gamma),
                           hits, *reached)
        self.step_optimizer()
        return loss.detach()
