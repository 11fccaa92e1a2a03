"""Online EWC (Schwarz et al., 2018): a running diagonal Fisher anchors the shared weights.

After each task the diagonal Fisher of the task's training data is added to the decayed
running one, F = gamma * F + F_task, and the anchor moves to the current weights; every later
step adds e_lambda * sum_i F_i (theta_i - anchor_i)^2 to the loss. F_task is mammoth's
estimator: each sample's squared gradient of the log-likelihood of its true label, weighted
by that label's probability p(y|x), then averaged (misclassified samples have the largest
gradients; the weighting keeps them from dominating). The penalty has no 1/2 factor, as in
mammoth.

Two ways to estimate it (--fisher_mode). `exact` (the default): the network as it is
evaluated, in eval mode (BatchNorm with its running statistics, which the pass leaves
untouched; with --bn_running_stats 0, the batch's), on the un-augmented training images.
`mammoth`: mammoth's own pass, which its published lr and e_lambda were tuned with: the
network stays in training mode, so each batch of --fisher_batch_size images (one in mammoth)
is normalised by BatchNorm with its own statistics, and those passes move the running
statistics as they do in mammoth; the images are the shuffled, augmented training batches.
Normalising one image with its own statistics damps the gradients: on the standard ResNet-18
after a CIFAR-10 task the largest Fisher entry was about 4,000 times smaller than the exact
one, so mammoth's e_lambda means something else under each mode. SGD on the penalty is stable
only while lr * 2 * e_lambda * F_i < 2; with the exact Fisher, mammoth's lr 0.03 and e_lambda 10
break that bound. `--model_config best` therefore runs mammoth's values with mammoth's mode.

Only shared parameters are anchored (see models/penalty.py): in Task-IL a task's own head
never moves after the task, so its Fisher would weigh a difference that is always zero. The
log-likelihood is over the task head's classes; mammoth's is over its single head's (all
classes), so its Fisher, and the scale its e_lambda was tuned for, differ by no fixed factor.

With --fisher_batch_size 1 (the default) each sample's gradient is squared. On CPU that is one
backward pass per sample (vmap gains little there: 0.8x to 1.3x by chunk size, 128 CIFAR
images, one thread). On CUDA such a loop is bound by kernel launches (6.5 ms per image on an
H200), so in the exact mode torch.func.vmap computes the per-sample gradients of VMAP_CHUNK
images at once: 2,048 CIFAR images took 0.89 s instead of 13.4 s there, the two agreeing to
2e-3 relative (6e-5 on CPU; cuDNN's convolutions round to TF32 by default). Those timings are
of a version that let autograd record the accumulation (peak allocation 8 to 32 GiB); it now
runs under no_grad, whose GPU time and memory are not measured yet. With B > 1 it squares the
gradient of a batch's summed log-likelihood divided by sqrt(B), weighted by exp of the batch's
mean log-likelihood: the per-sample average plus cross terms between samples, which vanish in
expectation when the mean gradient does (near the end of training), for B times fewer backward
passes.
"""
from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from torch.func import functional_call, grad, vmap

from datasets.continual_dataset import TaskData
from models.penalty import PenaltyModel
from utils.context import TrainingContext
from utils.validators import fraction, non_negative_float, positive_int


VMAP_CHUNK = 64  # images per vmap call on CUDA (2,048 on an H200: 16: 3.3 s, 32: 1.8 s, 64: 0.9 s)


class EwcOn(PenaltyModel):
    NAME = "ewc_on"
    # mammoth's published best arguments for Task-/Class-IL without a buffer
    # (aimagelab/mammoth, utils/best_args.py, best_args[dataset]['ewc_on'][-1]).
    BEST_CONFIGS = {
        "seq-cifar10": dict(lr=0.03, e_lambda=10.0, gamma=1.0, batch_size=32, n_epochs=50,
                            fisher_mode="mammoth"),
        "seq-tinyimg": dict(lr=0.03, e_lambda=25.0, gamma=1.0, batch_size=32, n_epochs=100,
                            fisher_mode="mammoth"),
    }

    @staticmethod
    def add_arguments(parser: argparse._ActionsContainer) -> None:
        parser.add_argument("--e_lambda", type=non_negative_float, default=10.0,
                            help="weight of the Fisher penalty")
        parser.add_argument("--gamma", type=fraction, default=1.0,
                            help="decay of the running Fisher at each task end (1: plain sum)")
        parser.add_argument("--fisher_batch_size", type=positive_int, default=1,
                            help="images per gradient of the Fisher estimate (1: exact "
                                 "per-sample empirical Fisher; larger: fewer passes, an "
                                 "approximation that is exact when the mean gradient is 0)")
        parser.add_argument("--fisher_mode", choices=("exact", "mammoth"), default="exact",
                            help="exact: eval mode on un-augmented images; mammoth: mammoth's "
                                 "pass (training-mode BatchNorm on augmented batches), which "
                                 "its published e_lambda assumes")

    def observe(self, x: torch.Tensor, y: torch.Tensor, task: int | torch.Tensor) -> torch.Tensor:
        loss = F.cross_entropy(self.net(x, task), y) + self.args.e_lambda * self.penalty()
        return self.optimizer_step(loss)

    def end_task(self, task: int, data: TaskData, ctx: TrainingContext) -> None:
        with ctx.phase("fisher"):
            fisher = self.fisher(task, data, ctx)
        self.penalty.consolidate(fisher, decay=self.args.gamma)

    def fisher(self, task: int, data: TaskData, ctx: TrainingContext) -> list[torch.Tensor]:
        """Diagonal empirical Fisher of the shared parameters on `data` (one task's images)."""
        was_training = self.training
        mammoth = self.args.fisher_mode == "mammoth"
        self.train(mammoth)
        try:
            if self.args.fisher_batch_size == 1 and ctx.device.type == "cuda" and not mammoth:
                return self._vmapped_fisher(task, data, ctx)
            return self._looped_fisher(task, data, ctx, training_batches=mammoth)
        finally:
            self.train(was_training)

    def _looped_fisher(self, task: int, data: TaskData, ctx: TrainingContext,
                       training_batches: bool = False) -> list[torch.Tensor]:
        """One backward pass per batch of --fisher_batch_size samples; `training_batches`:
        shuffled and augmented, as mammoth's training loader gives them."""
        params = self.penalty.params
        fisher = [torch.zeros_like(p) for p in params]
        seen = 0
        for x, y, _ in ctx.batches(data, "fisher", batch_size=self.args.fisher_batch_size,
                                   shuffle=training_batches, augment=training_batches):
            with ctx.autocast():
                log_likelihood = -F.cross_entropy(self.net(x, task), y, reduction="sum")
            grads = torch.autograd.grad(log_likelihood, params)
            label_probability = torch.exp(log_likelihood.detach() / len(y))
            for f, g in zip(fisher, grads):
                f.add_(g.pow(2) * label_probability / len(y))
            seen += 1
        return [f / seen for f in fisher]

    def _vmapped_fisher(self, task: int, data: TaskData,
                        ctx: TrainingContext) -> list[torch.Tensor]:
        """The per-sample Fisher, VMAP_CHUNK samples per vectorised backward pass."""
        shared = {name: p.detach() for name, p in self.net.shared_parameters().items()}

        def log_likelihood(weights: dict, x: torch.Tensor, y: torch.Tensor):
            value = -F.cross_entropy(functional_call(self.net, weights, (x[None], task)), y[None])
            return value, value.detach()

        per_sample_grads = vmap(grad(log_likelihood, has_aux=True), in_dims=(None, 0, 0))
        fisher = {name: torch.zeros_like(p) for name, p in shared.items()}
        for x, y, _ in ctx.batches(data, "fisher", batch_size=VMAP_CHUNK, shuffle=False,
                                   augment=False):
            # The heads are live parameters: outside no_grad, autograd would record the
            # accumulation below and keep every chunk's graph (grad() still differentiates).
            with ctx.autocast(), torch.no_grad():
                grads, values = per_sample_grads(shared, x, y)
            label_probability = values.exp()
            for name, f in fisher.items():
                g = grads[name]
                f.add_((label_probability.view(-1, *[1] * (g.dim() - 1)) * g.pow(2)).sum(0))
        return [f / len(data) for f in fisher.values()]
