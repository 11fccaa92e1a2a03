"""A-GEM (Chaudhry et al., ICLR 2019): keep an episodic memory of past tasks and, when the
current gradient would increase the loss on a memory sample (negative dot product with that
sample's gradient), project it onto the half-space where it does not."""
from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from datasets.continual_dataset import SequentialDataset, TaskData
from models.replay import ReplayModel
from utils.context import TrainingContext
from utils.errors import UserError


def project(grad: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """g - (g.r / r.r) r when g.r < 0, else g unchanged (branch-free: no host sync)."""
    dot = torch.clamp(grad @ ref, max=0.0)
    return grad - dot / (ref @ ref).clamp_min(torch.finfo(ref.dtype).tiny) * ref


class Agem(ReplayModel):
    NAME = "agem"
    # Best values with a 500-image buffer from mammoth's utils/best_args.py (aimagelab/mammoth,
    # the DER paper's grid search), with that code's memory (its first commit, 7ab9db9:
    # buffer_size / tasks random images per finished task; mammoth now keeps one batch).
    BEST_CONFIGS = {
        "seq-cifar10": dict(lr=0.03, minibatch_size=32, batch_size=32, n_epochs=50),
        "seq-tinyimg": dict(lr=0.01, minibatch_size=32, batch_size=32, n_epochs=100),
    }

    def __init__(self, net, dataset: SequentialDataset, args: argparse.Namespace) -> None:
        if args.buffer_size < dataset.N_TASKS:
            raise UserError(f"{self.NAME} gives each task an equal share of the buffer, so "
                            f"--buffer_size must be at least the {dataset.N_TASKS} tasks")
        super().__init__(net, dataset, args)

    def end_task(self, task: int, data: TaskData, ctx: TrainingContext) -> None:
        """Memory holds only finished tasks: an equal share of the buffer per task, chosen at
        random from the task's (un-augmented) training images."""
        share = self.args.buffer_size // self.n_tasks
        chosen = torch.randperm(len(data), device=data.x.device)[:share]
        self.store(data.x[chosen], data.y[chosen], task)

    def observe(self, x: torch.Tensor, y: torch.Tensor, task: int,
                raw: torch.Tensor) -> torch.Tensor:
        """The memory is filled at task end, so the raw batch is not needed here."""
        loss = F.cross_entropy(self.net(x, task), y)
        past = self.replay()
        if past is None:
            return self.optimizer_step(loss)
        grad, reached = self._gradient(loss)
        ref, ref_reached = self._gradient(F.cross_entropy(self.net(past.x, past.t), past.y))
        self._set_gradient(project(grad, ref), reached, ref_reached)
        self.step_optimizer()
        return loss.detach()

    def _gradient(self, loss: torch.Tensor) -> tuple[torch.Tensor, list[bool]]:
        """Flat gradient of `loss` over the network (zeros where it does not reach, e.g. other
        tasks' heads) and, per parameter, whether it reached it."""
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        params = list(self.net.parameters())
        flat = torch.cat([torch.zeros_like(p).flatten() if p.grad is None else p.grad.flatten()
                          for p in params])
        return flat, [p.grad is not None for p in params]

    def _set_gradient(self, flat: torch.Tensor, *reached: list[bool]) -> None:
        """Write `flat` into .grad of the parameters any of the gradients reached; the others
        keep no gradient, so the optimizer leaves them (and their weight decay) alone."""
        offset = 0
        for p, *hits in zip(self.net.parameters(), *reached):
            n = p.numel()
            p.grad = flat[offset:offset + n].view_as(p) if any(hits) else None
            offset += n
