"""The contract every continual-learning method follows.

The loop calls, for each task: begin_task, fit_task, end_task; then evaluates with
forward(x, task) (through all_task_logits). Most methods only write `observe` (one
optimisation step on a batch); a method that owns its whole per-task procedure (e.g. BMKP)
overrides fit_task.
"""
from __future__ import annotations

import argparse
import copy
import math
import time
from contextlib import contextmanager
from typing import Callable, ClassVar, Iterable, Iterator, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from backbone import STANDARD_RESNET18
from backbone.contract import TaskNetwork
from datasets.continual_dataset import SequentialDataset, TaskData
from utils.context import TrainingContext
from utils.errors import UserError
from utils.sizes import network_bytes
from utils.tables import PaperTable


# An epoch whose loss is this many times its phase's first epoch's (or 1, if that is larger)
# has diverged, though the loss is still finite: a quadratic penalty whose step is too large
# for its curvature (EWC with a large Fisher on a narrow network) grows it about 30-fold per
# epoch, and the task ends at chance epochs before the loss overflows.
DIVERGENCE_FACTOR = 1e4


def check_loss(loss: float | None, first: float | None, where: str) -> None:
    """Stop a diverged run with a clear error instead of writing chance-level results: a
    non-finite loss, or one DIVERGENCE_FACTOR times the phase's `first` epoch's. Checked once
    per epoch, on its last loss, so the step loop never waits for the device."""
    if loss is None:
        return
    fix = "lower --lr or the method's regularisation weight"
    if not math.isfinite(loss):
        raise UserError(f"training diverged in {where}: the loss is {loss}; {fix}")
    if first is not None and loss > DIVERGENCE_FACTOR * max(first, 1.0):
        raise UserError(f"training diverged in {where}: the loss grew from {first:.4g} in the "
                        f"first epoch to {loss:.4g}; {fix}")


def frozen_copy(module: nn.Module) -> nn.Module:
    """A copy of `module` that neither trains nor moves its BatchNorm statistics (a teacher
    such as LwF's old network); name its attribute in FROZEN_COPIES to keep it in eval mode."""
    return copy.deepcopy(module).eval().requires_grad_(False)


def tracked_norms(net: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    """The BatchNorm layers of `net` that keep running statistics."""
    return [m for m in net.modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]


def exact_bn_statistics(norms: Sequence[nn.modules.batchnorm._BatchNorm],
                        forward: Callable[[torch.Tensor], object],
                        batches: Iterable[tuple[torch.Tensor, ...]]) -> None:
    """Replace the running statistics of `norms` by their cumulative average (momentum None)
    over one no-grad pass, forward(x) for every batch, with `norms` in training mode.

    Running statistics are a moving average over steps taken while the weights moved, so they
    need not describe the final weights: a task can lose tens of points to them. Layers the
    pass never reaches (another task's BatchNorm set) keep theirs."""
    saved = [(m.training, m.momentum, {k: v.clone() for k, v in m.state_dict().items()})
             for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None
        m.train()
    completed = False
    try:
        with torch.no_grad():
            for x, *_ in batches:
                forward(x)
        completed = True
    finally:
        for m, (training, momentum, state) in zip(norms, saved):
            m.train(training)
            m.momentum = momentum
            if not (completed and m.num_batches_tracked):
                m.load_state_dict(state)


@contextmanager
def batch_statistics(net: nn.Module) -> Iterator[None]:
    """Inside, every BatchNorm layer of `net` normalises with the statistics of the batch it
    sees and leaves its running statistics untouched: the diagnostic that tells weights which
    lost a task from running statistics that no longer fit it, and extra training passes
    (HAL's) that must not move the statistics the test uses."""
    norms = [m for m in net.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [(m.training, m.track_running_stats) for m in norms]
    for m in norms:  # training without tracking: batch statistics, no buffer is written
        m.training, m.track_running_stats = True, False
    try:
        yield
    finally:
        for m, (training, tracking) in zip(norms, saved):
            m.training, m.track_running_stats = training, tracking


def stacked_task_logits(net: TaskNetwork, x: torch.Tensor, n_tasks: int) -> torch.Tensor:
    """net's logits of tasks 0..n_tasks-1 side by side; one feature pass feeds every head
    when its features are the same for all tasks."""
    if net.features_depend_on_task():
        return torch.cat([net(x, t) for t in range(n_tasks)], 1)
    features = net.features(x, 0)
    return torch.cat([net.task_logits(features, t) for t in range(n_tasks)], 1)


class ContinualModel(nn.Module):
    NAME: ClassVar[str] = ""
    # Overrides of the common option defaults (e.g. the backbone width) for this method.
    DEFAULTS: ClassVar[dict] = {}
    # Per-dataset hyperparameters loaded by --model_config best, with their source.
    BEST_CONFIGS: ClassVar[dict[str, dict]] = {}
    # The backbone options --model_config best gives the method: the network the BMKP paper
    # ran it on (Section 6.1: the standard ResNet-18, except GPM, Adam-NSCL and BMKP).
    PAPER_NETWORK: ClassVar[dict] = STANDARD_RESNET18
    # Options that another option of the method sets (e.g. BMKP's --compat official sets the
    # network's): the report names rows by the setting option alone where that tells them apart.
    IMPLIED_OPTIONS: ClassVar[dict[str, tuple[str, ...]]] = {}
    # Why the method needs one BatchNorm set for all tasks (None: per-task BN is fine).
    SHARED_BN_REASON: ClassVar[str | None] = None
    # The method's own tables in the paper's report beyond Table 1 (see utils/tables.py).
    PAPER_TABLES: ClassVar[tuple[PaperTable, ...]] = ()
    # Attributes that hold frozen copies (frozen_copy): train() keeps them in eval mode.
    FROZEN_COPIES: ClassVar[tuple[str, ...]] = ()
    # Training epochs are split into batches of equal size (no remainder batch); a method
    # reproducing a reference loader's remainder batch turns this off.
    equal_batches: bool = True

    @staticmethod
    def add_arguments(parser: argparse._ActionsContainer) -> None:
        """Method-specific command-line options (none by default)."""

    @classmethod
    def configure(cls, args: argparse.Namespace, dataset: type[SequentialDataset]) -> None:
        """Settle options that depend on the dataset, before the backbone is built."""

    @classmethod
    def implied_options(cls, args: argparse.Namespace,
                        dataset: type[SequentialDataset]) -> dict[str, object]:
        """The values another option of the method sets (listed in IMPLIED_OPTIONS), which
        configure applies; parse_args refuses a different value typed for one of them."""
        return {}

    def __init__(self, net: TaskNetwork, dataset: SequentialDataset,
                 args: argparse.Namespace) -> None:
        if args.exact_bn_stats and not args.bn_running_stats:
            if self.DEFAULTS.get("bn_running_stats") == 0:
                raise UserError(f"--exact_bn_stats 1 replaces BatchNorm running statistics, but "
                                f"{self.NAME} evaluates with batch statistics by default "
                                "(--bn_running_stats 0); drop --exact_bn_stats 1 or add "
                                "--bn_running_stats 1")
            raise UserError("--exact_bn_stats 1 replaces BatchNorm running statistics, which "
                            "--bn_running_stats 0 does not keep; drop one of them")
        if self.SHARED_BN_REASON and args.per_task_bn:
            raise UserError(f"{self.NAME} {self.SHARED_BN_REASON}, so it cannot use per-task "
                            "BatchNorm; drop --per_task_bn 1")
        super().__init__()
        self.net = net
        self.args = args
        self.n_tasks = dataset.N_TASKS
        # The task train_epochs is learning (None: every sample's own, as joint's).
        self.training_task: int | None = None
        self.optimizer: torch.optim.Optimizer | None = None
        self.scheduler: torch.optim.lr_scheduler.LRScheduler | None = None

    def predictor(self) -> TaskNetwork:
        """The network whose forward predicts: the working network, unless the method
        predicts with another (e.g. CLS-ER's stable memory)."""
        return self.net

    def forward(self, x: torch.Tensor, task: int | torch.Tensor) -> torch.Tensor:
        return self.predictor()(x, task)

    def train(self, mode: bool = True) -> ContinualModel:
        """Switch modes, keeping the frozen copies (FROZEN_COPIES) in eval mode."""
        super().train(mode)
        for name in self.FROZEN_COPIES:
            frozen = getattr(self, name, None)
            if frozen is not None:
                frozen.eval()
        return self

    def all_task_logits(self, x: torch.Tensor, n_tasks: int) -> torch.Tensor:
        """The logits of tasks 0..n_tasks-1 side by side, [batch, n_tasks * classes per task],
        each task's block as forward(x, task) gives it: Task-IL reads the true task's block,
        task-agnostic (Class-IL) inference the argmax over all. One feature pass feeds every
        head when the method predicts with a network's own forward (predictor) whose features
        are the same for all tasks; otherwise each task costs a forward pass."""
        if type(self).forward is ContinualModel.forward:
            return stacked_task_logits(self.predictor(), x, n_tasks)
        return torch.cat([self(x, t) for t in range(n_tasks)], 1)

    def other_predictors(self) -> dict[str, TaskNetwork]:
        """Networks of the method besides predictor() whose Task-IL accuracy the run also
        reports after each task (`other_predictors` in the result), e.g. CLS-ER's working
        network and plastic memory, which its reference evaluates beside the stable one that
        predicts; none by default."""
        return {}

    def conv_layers(self) -> dict[str, nn.Conv2d]:
        """The backbone's conv layers, for methods that cannot work without them."""
        layers = self.net.conv_layers()
        if not layers:
            raise UserError(f"{self.NAME} needs a backbone with conv layers; pick one with "
                            "--backbone")
        return layers

    def make_optimizer(self, params: list) -> torch.optim.Optimizer:
        """The optimizer over `params` (tensors or parameter groups): SGD with --lr,
        --optim_mom and --optim_wd. A method with another optimizer overrides this and
        refuses, in __init__, the common options it cannot honour."""
        return torch.optim.SGD(params, lr=self.args.lr, momentum=self.args.optim_mom,
                               weight_decay=self.args.optim_wd)

    def refuse_momentum(self, optimizer_name: str) -> None:
        """For methods whose optimizer has no SGD momentum: a clear error, not a silent no-op."""
        if self.args.optim_mom:
            raise UserError(f"{self.NAME} trains with {optimizer_name}, which has no SGD "
                            "momentum; drop --optim_mom")

    def reset_optimizer(self, params=None) -> None:
        """A fresh optimizer (make_optimizer) over `params`, all network parameters by
        default, with the --lr_step schedule."""
        params = list(self.net.parameters() if params is None else params)
        self.optimizer = self.make_optimizer(params)
        self.scheduler = None
        if self.args.lr_step:
            self.scheduler = torch.optim.lr_scheduler.StepLR(
                self.optimizer, step_size=self.args.lr_step, gamma=self.args.lr_gamma)

    def has_later_task(self, task: int) -> bool:
        """Whether a task follows `task`: what a method keeps only for later tasks (a
        generator, synthetic images) need not be built after the last one."""
        return task < self.n_tasks - 1

    def begin_task(self, task: int, data: TaskData) -> None:
        self.reset_optimizer()

    def fit_task(self, task: int, data: TaskData, ctx: TrainingContext) -> None:
        with ctx.phase("train"):
            self.train_epochs(data, ctx, self.args.n_epochs, self.observe, task)

    def end_task(self, task: int, data: TaskData, ctx: TrainingContext) -> None:
        """Called after fit_task, before evaluation."""

    def store_exact_bn_statistics(self, task: int, data: TaskData,
                                  ctx: TrainingContext) -> None:
        """--exact_bn_stats 1, after fit_task: the predicting network's running BatchNorm
        statistics become the exact ones of its final weights, over the task's training
        batches augmented as in training (see exact_bn_statistics). Replay methods trained on
        batches that also held buffer samples; this pass sees the task's data alone."""
        with ctx.phase("bn_statistics"):
            exact_bn_statistics(tracked_norms(self.predictor()), lambda x: self(x, task),
                                ctx.batches(data, "BN statistics", equal_sizes=True))

    def train_epochs(self, data: TaskData, ctx: TrainingContext, n_epochs: int,
                     step: Callable[..., torch.Tensor], task: int | None,
                     label: str = "epoch", with_raw: bool = False) -> None:
        """Run `step(x, y, task)` over shuffled, augmented batches for n_epochs.

        `task` is the int id when all of `data` is one task; None passes each sample's id.
        `with_raw` also passes the batch's un-augmented uint8 images: step(x, y, task, raw).
        """
        self.train()
        self.training_task = task
        first = None
        for epoch in range(n_epochs):
            loss, images, start = None, 0, time.perf_counter()
            for x, y, t, *raw in ctx.batches(data, f"{label} {epoch + 1}/{n_epochs}",
                                             equal_sizes=self.equal_batches, with_raw=with_raw):
                with ctx.autocast():
                    loss = step(x, y, t if task is None else task, *raw)
                images += len(y)
            value = None if loss is None else float(loss)
            check_loss(value, first, f"{ctx.task_label} {label} {epoch + 1}".strip())
            first = value if first is None else first
            ctx.log_epoch(epoch + 1, n_epochs, value, time.perf_counter() - start, images)
            if self.scheduler is not None:
                self.scheduler.step()

    def forward_samples(self, data: TaskData, ctx: TrainingContext, n_samples: int, task: int,
                        augment: bool, batch_size: int | None = None,
                        batch_statistics: bool = False) -> None:
        """Forward the first n_samples of a shuffled pass over `data` in eval mode, in batches
        of `batch_size` (default: the training batch size), without gradients: the pass that
        forward hooks record representations from (BMKP, GPM, Adam-NSCL).

        With `batch_statistics`, BatchNorm normalises each batch with its own statistics, as
        in training, and leaves its running statistics untouched."""
        was_training = self.net.training
        self.net.eval()
        norms = [m for m in self.net.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        tracking = [m.track_running_stats for m in norms]
        if batch_statistics:
            for m in norms:
                m.train()
                m.track_running_stats = False
        remaining = n_samples
        try:
            with torch.no_grad():
                for x, _, _ in ctx.batches(data, "representation", batch_size=batch_size,
                                           augment=augment):
                    self.net(x[:remaining], task)
                    remaining -= len(x)
                    if remaining <= 0:
                        break
        finally:
            for m, tracked in zip(norms, tracking):
                m.track_running_stats = tracked
            self.net.train(was_training)

    def observe(self, x: torch.Tensor, y: torch.Tensor, task: int | torch.Tensor) -> torch.Tensor:
        """One SGD step on the task loss; returns the loss (a tensor: no host sync)."""
        return self.optimizer_step(F.cross_entropy(self.net(x, task), y))

    def optimizer_step(self, loss: torch.Tensor) -> torch.Tensor:
        """Backpropagate `loss` into fresh gradients, adjust them and step the optimizer."""
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.adjust_gradients()
        self.step_optimizer()
        return loss.detach()

    def step_optimizer(self) -> None:
        """Step the optimizer on the gradients as they are, except the heads of tasks after the
        one being trained: a batch mixing tasks computes every head (zero gradients for
        those), and the optimizer must leave them, weight decay included, untouched."""
        if self.training_task is not None:
            for later in range(self.training_task + 1, self.n_tasks):
                for p in self.net.head(later).parameters():
                    p.grad = None
        self.optimizer.step()

    def adjust_gradients(self) -> None:
        """Hook between backward and the step, for methods that constrain gradients (e.g.
        GPM's projection, WSN's frozen weights); nothing by default."""

    def memory_breakdown(self) -> dict[str, int]:
        """Bytes the method needs at test time and between tasks, by component."""
        return {"network": network_bytes(self.net)}

    def result_details(self) -> dict:
        """What the method reports in the result JSON beside the common fields (under
        "method"), so runs can be compared without rerunning them; nothing by default."""
        return {}

    def export(self) -> None:
        """Called once the run's result is written: save whatever the method's options ask
        to keep beyond the result (BMKP: --save_memory); nothing by default."""

    def checkpoint_state(self) -> dict:
        """What the method carries from one task to the next, for --checkpoint_dir: the
        module's tensors (the network and any registered method state, e.g. penalty anchors
        or extra state such as bases). Checkpoints are taken between tasks and every
        begin_task builds a fresh optimizer, so no optimizer state is saved. Methods with
        more state extend it."""
        return {"model": self.state_dict()}

    def load_checkpoint_state(self, state: dict) -> None:
        """Restore checkpoint_state()."""
        self.load_state_dict(state["model"])
