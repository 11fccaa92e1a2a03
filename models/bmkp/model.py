"""BMKP (Sun et al., CVPR 2023): a bilevel memory with knowledge projection.

Per task: (1) the working-memory ResNet learns the task, with the representation compaction
regularizer from the second task on; (2) knowledge projection grows each conv layer's
output-space basis from a few hundred of the task's images (Gram matrix + symmetric
eigendecomposition, see utils/subspace.py) and projects the weights, A_t = B^T W_t;
(3) retraining ("recall", Eq. 8) trains A_t with B frozen; (4) A_t is stored in the long-term
memory, which predicts every task from then on.

Two modes (`--compat`):
- `paper` (default): the method as the paper describes it. Every task trains all of its own
  parameters (conv weights, its BatchNorm set and its head); retraining trains
  A_t together with the task's BatchNorm set and head; BatchNorm tracks running
  statistics, so a test prediction does not depend on the rest of its test batch, and the
  statistics stored with a task are recomputed for the stored weights (a moving average
  over steps taken while the weights moved need not describe them); training epochs use
  batches of equal size; the first task's bases keep the fewest directions that reach the
  threshold.
- `official`: what the reference implementation's code does, which produced the paper's
  numbers. From the second task on only the 4-D conv weights are trained (later tasks' BN
  sets and heads keep their initial values), so retraining of later tasks has no
  trainable tensor in its forward and changes nothing; on CIFAR, BatchNorm normalises with the
  test batch's statistics (test batches of 128 from one task); every epoch ends on the
  loader's remainder batch; the network has no identity shortcuts (`--shortcut none`) and
  its heads no bias (`--head_bias 0`); the first task's bases keep the directions whose
  cumulative energy stays strictly below the threshold (one fewer than reach it).
`--reg` picks the regularizer independently: `official` (the code's trace/sum form, default)
or `paper` (Eq. 4's trace / L1 form); see models/bmkp/regularizer.py. `--energy` picks what
the thresholds measure: squared singular values (`sigma2`, the code's) or singular values
(`sigma`, the paper's footnote 3; paper mode only); `--projection_bn` whether BatchNorm in the
projection pass uses running statistics or each batch's own (paper mode only).
"""
from __future__ import annotations

import argparse

import torch
import torch.nn as nn
import torch.nn.functional as F
from backbone import REDUCED_RESNET18
from backbone.contract import TaskNetwork
from torch.func import functional_call

from datasets.continual_dataset import SequentialDataset, TaskData
from models.bmkp.long_term_memory import LongTermMemory
from models.bmkp.memory_file import per_seed_path, save_memory
from models.bmkp.regularizer import VARIANTS, CompactionLoss
from models.bmkp.tables import PAPER_TABLES
from models.continual_model import ContinualModel, exact_bn_statistics
from utils.context import TrainingContext
from utils.errors import UserError
from utils.sizes import network_bytes
from utils.subspace import ENERGIES, recording_grams, retained_energy, update_basis
from utils.validators import (fraction, non_negative_float, non_negative_int, output_file,
                              positive_int)

# Datasets on which the reference normalises with test-batch statistics (no running stats).
OFFICIAL_BATCH_STAT_DATASETS = ("seq-cifar10", "seq-cifar100")
OFFICIAL_EVAL_BATCH = 128


class BMKP(ContinualModel):
    NAME = "bmkp"
    DEFAULTS = {"per_task_bn": 1, "lr_step": 45}
    PAPER_NETWORK = REDUCED_RESNET18  # the reduced ResNet-18 of GPM, as the paper and its code
    IMPLIED_OPTIONS = {"compat": ("shortcut", "head_bias", "bn_running_stats", "eval_batch_size")}
    PAPER_TABLES = PAPER_TABLES
    # The paper's runs (reference doc, "Hyperparameters of the paper's runs").
    BEST_CONFIGS = {
        "seq-cifar10": dict(n_epochs=50, retrain_epochs=50, lr=0.05, batch_size=128, lambd=10.0,
                            threshold_first=0.96, threshold=0.96, projection_samples=500),
        "seq-cifar100": dict(n_epochs=100, retrain_epochs=100, lr=0.05, batch_size=128, lambd=1.0,
                             threshold_first=0.95, threshold=0.96, projection_samples=500),
        "seq-tinyimg": dict(n_epochs=100, retrain_epochs=100, lr=0.03, batch_size=64, lambd=10.0,
                            threshold_first=0.97, threshold=0.957, projection_samples=500),
    }

    @staticmethod
    def add_arguments(parser: argparse._ActionsContainer) -> None:
        parser.add_argument("--lambd", type=non_negative_float, default=10.0,
                            help="weight of the representation compaction regularizer")
        parser.add_argument("--reg", choices=VARIANTS, default="official",
                            help="regularizer form: the reference code's or the paper's Eq. 4")
        parser.add_argument("--threshold_first", type=fraction, default=0.96,
                            help="energy kept by the first task's bases (1.0: lossless)")
        parser.add_argument("--threshold", type=fraction, default=0.96,
                            help="energy the bases must keep for later tasks")
        parser.add_argument("--energy", choices=ENERGIES, default="sigma2",
                            help="what the thresholds measure: squared singular values (the "
                                 "reference code) or singular values (the paper's footnote 3)")
        parser.add_argument("--projection_bn", choices=("running", "batch"), default="running",
                            help="BatchNorm in the projection pass: eval mode (running "
                                 "statistics where they are tracked) or each batch's own "
                                 "statistics, as in training (paper mode only)")
        parser.add_argument("--projection_samples", type=positive_int, default=500,
                            help="training images whose activations build the bases")
        parser.add_argument("--retrain_epochs", type=non_negative_int, default=None,
                            help="epochs of retraining A_t (default: --n_epochs; 0 disables it)")
        parser.add_argument("--compat", choices=("paper", "official"), default="paper",
                            help="official: reproduce the reference code where it departs "
                                 "from the paper (see the model's docstring)")
        parser.add_argument("--no_basis_update", action="store_true",
                            help="keep the first task's bases for every task (Table 2 ablation)")
        parser.add_argument("--save_memory", type=output_file("memory.pt"), default=None,
                            metavar="FILE",
                            help="after the run, save the long-term memory for "
                                 "models/bmkp/evaluate.py; with several seeds "
                                 "FILE-seed<S>.<ext> each")

    @classmethod
    def configure(cls, args: argparse.Namespace, dataset: type[SequentialDataset]) -> None:
        if args.retrain_epochs is None:
            args.retrain_epochs = args.n_epochs
        if args.save_memory is not None:
            if args.seeds is not None or args.n_runs is not None:
                args.save_memory = per_seed_path(args.save_memory, args.seed)
        if args.compat == "official":
            if (args.energy != "sigma2" or args.projection_bn != "running"
                    or getattr(args, "normalize_inputs", 0)):
                raise UserError("--compat official keeps the reference's energy (squared "
                                "singular values), projection pass and CIFAR inputs; drop "
                                "--energy, --projection_bn and --normalize_inputs or use "
                                "--compat paper")
        implied = cls.implied_options(args, dataset)
        if args.exact_bn_stats and implied.get("bn_running_stats") == 0:
            raise UserError(f"--compat official evaluates {dataset.NAME} with batch "
                            "statistics, as the reference does, so there are no running "
                            "statistics for --exact_bn_stats 1 to replace; drop "
                            "--exact_bn_stats 1 or use --compat paper")
        vars(args).update(implied)

    @classmethod
    def implied_options(cls, args: argparse.Namespace,
                        dataset: type[SequentialDataset]) -> dict[str, object]:
        """--compat official builds the reference's network, which on CIFAR also evaluates
        with batch statistics in batches of the reference's size."""
        if args.compat != "official":
            return {}
        implied = {"shortcut": "none", "head_bias": 0}
        if dataset.NAME in OFFICIAL_BATCH_STAT_DATASETS:
            implied.update(bn_running_stats=0, eval_batch_size=OFFICIAL_EVAL_BATCH)
        return implied

    def __init__(self, net: TaskNetwork, dataset: SequentialDataset,
                 args: argparse.Namespace) -> None:
        super().__init__(net, dataset, args)
        # The reference's loader ends every epoch on a remainder batch (see iterate_batches).
        self.equal_batches = args.compat != "official"
        self.projected = {f"{name}.weight": module for name, module in self.conv_layers().items()}
        first = next(iter(self.projected.values())).weight
        layout = (torch.contiguous_format if first.is_contiguous() else torch.channels_last)
        self.memory = LongTermMemory({n: m.weight.shape for n, m in self.projected.items()},
                                     layout)
        # Per task, per projected layer: basis columns after the task, and the share of the
        # task's activation energy they retain (None when the bases were not updated).
        self.basis_log: list[dict[str, dict]] = []
        self.compaction: CompactionLoss | None = None  # built by begin_task from task 1 on

    # ---- inference -------------------------------------------------------------------
    def forward(self, x: torch.Tensor, task: int) -> torch.Tensor:
        """Stored tasks are predicted from the long-term memory, others by the working memory."""
        if task < self.memory.n_tasks:
            return functional_call(self.net, self.memory.compose(task), (x, task))
        return self.net(x, task)

    # ---- one task ----------------------------------------------------------------------
    def begin_task(self, task: int, data: TaskData) -> None:
        self.reset_optimizer(self._learning_parameters(task))
        # The regularizer of this task, against the bases the earlier tasks left.
        on_gpu = next(self.net.parameters()).is_cuda
        self.compaction = (CompactionLoss(self.memory.bases, self.memory.layer_shapes,
                                          self.args.reg, pad_inputs=on_gpu)
                           if task > 0 else None)

    def fit_task(self, task: int, data: TaskData, ctx: TrainingContext) -> None:
        with ctx.phase("train"):
            self.train_epochs(data, ctx, self.args.n_epochs, self.observe, task)
        with ctx.phase("projection"):
            coefficients = self.project_task(task, data, ctx)
        with ctx.phase("retrain"):
            coefficients = self._retrain(task, data, ctx, coefficients)
        if self.args.compat == "paper":
            with ctx.phase("bn_statistics"):
                self._recompute_bn_statistics(task, data, ctx, coefficients)
        self.memory.store_task(task, coefficients, self._task_extras(task))

    def project_task(self, task: int, data: TaskData,
                     ctx: TrainingContext) -> dict[str, torch.Tensor]:
        """Knowledge projection: grow the bases from the task's activations, then
        A_t = B^T W_t for every projected layer."""
        if task == 0 or not self.args.no_basis_update:
            self._update_bases(task, data, ctx)
        else:
            self.basis_log.append({name: {"columns": b.shape[1], "retained_energy": None}
                                   for name, b in self.memory.bases.items()})
        return self.memory.project({name: m.weight for name, m in self.projected.items()})

    def _learning_parameters(self, task: int) -> list[nn.Parameter]:
        if task > 0 and self.args.compat == "official":
            return [p for p in self.net.parameters() if p.dim() == 4]
        return list(self.net.parameters())

    def observe(self, x: torch.Tensor, y: torch.Tensor, task: int) -> torch.Tensor:
        """One learning step of the working memory: task loss plus lambda * compaction."""
        loss = F.cross_entropy(self.net(x, task), y)
        if task > 0 and self.args.lambd > 0:
            loss = loss + self.args.lambd * self.compaction(
                {name: m.weight for name, m in self.projected.items()})
        return self.optimizer_step(loss)

    def _update_bases(self, task: int, data: TaskData, ctx: TrainingContext) -> None:
        """Grow every layer's basis from its outputs on `projection_samples` training images
        (the first batches of a shuffled, augmented pass, as in the reference).

        Official mode takes them as the reference's sampler does: whole training batches up
        to one past the count (640 images for 500 at batch 128, 576 at batch 64), forwarded
        as one batch, so BatchNorm without running statistics normalises with that pass's."""
        n_samples, batch_size = self.args.projection_samples, None
        if self.args.compat == "official":
            n_samples = min(len(data), (n_samples // ctx.batch_size + 2) * ctx.batch_size)
            batch_size = n_samples
        with recording_grams(self.projected, "output") as grams:
            self.forward_samples(data, ctx, n_samples, task, augment=True, batch_size=batch_size,
                                 batch_statistics=self.args.projection_bn == "batch")
        level = self.args.threshold_first if task == 0 else self.args.threshold
        first_count = "below" if self.args.compat == "official" else "reach"
        bases = {name: update_basis(acc.gram, self.memory.basis(name), level,
                                    self.args.energy, first_count)
                 for name, acc in grams.items()}
        self.memory.set_bases(bases)
        self.basis_log.append({name: {"columns": basis.shape[1],
                                      "retained_energy": retained_energy(grams[name].gram, basis)}
                               for name, basis in bases.items()})

    def _retrain(self, task: int, data: TaskData, ctx: TrainingContext,
                 coefficients: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Eq. 8: W = B A_t with B frozen; A_t (and the task's head and BN) learn the task."""
        if self.args.retrain_epochs == 0:
            return coefficients
        if task > 0 and self.args.compat == "official":
            self._official_later_retraining(task, data, ctx, coefficients)
            return coefficients
        trainable = {n: nn.Parameter(a.clone()) for n, a in coefficients.items()}
        self.reset_optimizer([*trainable.values(), *self._task_head_and_bn(task)])

        def step(x: torch.Tensor, y: torch.Tensor, task_id: int) -> torch.Tensor:
            weights = self.memory.weights_from(trainable)
            return self.optimizer_step(
                F.cross_entropy(functional_call(self.net, weights, (x, task_id)), y))

        self.train_epochs(data, ctx, self.args.retrain_epochs, step, task, label="retrain")
        return {n: a.detach() for n, a in trainable.items()}

    def _recompute_bn_statistics(self, task: int, data: TaskData, ctx: TrainingContext,
                                 coefficients: dict[str, torch.Tensor]) -> None:
        """Give the task's BatchNorm set the exact statistics of the weights being stored
        (exact_bn_statistics), over its training batches augmented as in training."""
        bn_layers = [m for m in self.net.task_modules(task).values()
                     if isinstance(m, nn.BatchNorm2d) and m.track_running_stats]
        if not bn_layers:
            return
        weights = self.memory.weights_from(coefficients)
        exact_bn_statistics(bn_layers, lambda x: functional_call(self.net, weights, (x, task)),
                            ctx.batches(data, "BN statistics", equal_sizes=True))

    def store_exact_bn_statistics(self, task: int, data: TaskData,
                                  ctx: TrainingContext) -> None:
        """Paper mode stored the exact statistics in fit_task already; official mode (the
        reference's running statistics) gets them here only when asked."""
        if self.args.compat != "paper":
            super().store_exact_bn_statistics(task, data, ctx)

    def _official_later_retraining(self, task: int, data: TaskData, ctx: TrainingContext,
                                   coefficients: dict[str, torch.Tensor]) -> None:
        """The reference's retraining of a later task: its optimizer holds only the working
        memory's conv weights, which the recomposed forward does not use, so no parameter
        moves. Its forward passes still refresh BatchNorm running statistics when they are
        tracked; without them nothing at all happens and the pass is skipped."""
        if not self.args.bn_running_stats:
            return
        weights = self.memory.weights_from(coefficients)
        with torch.no_grad():
            for epoch in range(self.args.retrain_epochs):
                for x, _, _ in ctx.batches(data, f"retrain {epoch + 1}/{self.args.retrain_epochs}"):
                    functional_call(self.net, weights, (x, task))

    def _task_head_and_bn(self, task: int) -> list[nn.Parameter]:
        return [p for m in self.net.task_modules(task).values() for p in m.parameters()]

    def _task_extras(self, task: int) -> dict[str, torch.Tensor]:
        """The task's BN set and head (floating-point state only), under their names."""
        return {f"{name}.{key}": value for name, module in self.net.task_modules(task).items()
                for key, value in module.state_dict().items() if value.is_floating_point()}

    def export(self) -> None:
        """--save_memory: the long-term memory and the options that rebuild its network."""
        if self.args.save_memory is not None:
            save_memory(self, self.args, self.args.save_memory)

    def memory_breakdown(self) -> dict[str, int]:
        ltm = {f"ltm_{k}": v for k, v in self.memory.size_in_bytes().items()}
        return {"network": network_bytes(self.net), **ltm}

    def result_details(self) -> dict:
        return {"bases": self.basis_log}

    def checkpoint_state(self) -> dict:
        """Also the long-term memory and the basis log."""
        return {**super().checkpoint_state(), "memory": self.memory.state_dict(),
                "basis_log": self.basis_log}

    def load_checkpoint_state(self, state: dict) -> None:
        super().load_checkpoint_state(state)
        self.memory.load_state_dict(state["memory"])
        self.basis_log = state["basis_log"]
