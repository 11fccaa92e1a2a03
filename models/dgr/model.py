"""Deep Generative Replay (Shin, Lee, Kim and Kim, NeurIPS 2017) with Task-IL heads.

A "scholar" is a generator and a solver (the TaskNetwork). While task t > 0 is learned, a
frozen copy of the scholar as it was before the task (the previous solver and generator,
taken at begin_task) supplies replay, and both halves train on the new task's data mixed
with it, each loss weighted as the paper's

    r * L(current batch) + (1 - r) * L(replayed batch),   r = --new_task_weight or 1/(t+1)

(r is the paper's ratio of real data; by default every task so far counts equally, as in
van de Ven et al.'s generative replay, GMvandeVen/continual-learning, train/train_task_based.py,
rnt = 1 / tasks so far; kuc2477's reimplementation defaults to r = 0.3, main.py).

- Solver ("train" phase, `observe`): each step adds --minibatch_size images sampled from the
  previous generator, labelled with the previous solver's predicted class (hard labels, as
  the paper's S(x'; theta_{i-1}) and the Solver.solve of kuc2477/pytorch-deep-generative-
  replay); real and replayed images go through the solver as one mixed-task batch, every
  image through its own task's head, with cross-entropy.
- Generator ("generator" phase, --gen_epochs, default the solver's epochs): the generator
  replays itself. Each step is a VAE step (models/dgr/vae.py) on the current task's batch
  together with --minibatch_size images the previous generator draws. It runs after the
  solver's epochs; the two halves only read the frozen copies, so their order does not
  change what either learns. It does not run after the last task, since only later tasks
  replay from it (the memory counts the generator either way).

Which task a replayed image belongs to. A Task-IL solver classifies an image with its task's
head, so every replayed image needs a task id. The generator is task-conditional (the task's
one-hot vector enters its encoder and decoder): a replayed image is drawn *for* a task, and
the previous solver labels it through that task's head. The replayed batch is split evenly
over the earlier tasks (equal shares in consecutive runs, no draw; the first tasks one image
more when they do not divide evenly), as van de Ven's code does with a conditional generator
in Task-IL (train/train_task_based.py: a batch of ceil(batch / t) per earlier task). With
Shin's unconditional generator the image's task is unknown: sending it to one head at random
gives most heads images of other tasks ((t-1)/t of them), and replaying it through every
earlier head (van de Ven's choice for an unconditional generator) costs t losses per image
and still trains each head on the other tasks' inputs; conditioning keeps each head on its
own task's inputs and lets the generator keep the tasks' distributions apart, for n_tasks
extra inputs to two linear layers.

Where this departs from the paper and its code:
- The generator is a VAE, the convolutional one the BMKP authors carry in their fork
  (SunWenJu123/BMKP, backbone/VAE.py), made task-conditional; the paper trains an
  unconditional WGAN-GP (it allows any generative model). The fork has no DGR method or DGR
  settings, so the VAE's settings are AntixK/PyTorch-VAE's (whose VanillaVAE the fork's VAE
  is): Adam at --gen_lr 0.005, --latent_dim 128, --kld_weight 0.00025 (configs/vae.yaml and
  configs/cvae.yaml), the fork's widths from 32 (--gen_nf); without AntixK's per-epoch
  learning-rate decay (0.95): a fresh Adam each task, as the solver's fresh optimizer.
  AntixK's kld_weight is for 64 x 64 images: against the per-pixel mean error, the same
  weight makes the KL term 4 times heavier on 32 x 32 images than on those.
- The generator learns the task's un-augmented images (the data, not the crop-and-flip
  augmentation); the solver learns augmented real images and un-augmented generated ones.
- The mixing ratio weights the two losses within every step, as kuc2477's later code does
  (dgr.py, Solver.train_a_batch; its first version drew each whole batch from the scholar
  with probability 1 - r).
- How real and replayed images share the training-mode passes, --replay_passes: by default
  (joint) they go through the solver, and through the generator, as one batch, as ER's
  stored images do in mammoth (whose ER settings the solver takes): BatchNorm normalises them
  with shared batch statistics and its running statistics take one update per step.
  kuc2477's Solver.train_a_batch runs the real and the replayed batch as two passes
  (separate); van de Ven's train_a_batch one pass for the real batch and one per earlier task
  (per_task). Each pass normalises with its own batch statistics and updates the running
  statistics once. The losses are weighted alike in every mode (van de Ven averages the
  per-task means, the same weights when the tasks' shares are equal).
- The frozen copies run in eval mode (BatchNorm with their running statistics): replay must
  not depend on the batch it is drawn in.

Cost: per solver step of task t > 0, a decoder pass of the previous generator and a forward
of the previous solver on --minibatch_size images, and the solver's step on the batch plus
those images; then --gen_epochs of VAE steps on the batch plus as many generated images. The
previous scholar exists only while a task is trained (dropped at end_task): between tasks,
where memory is reported and checkpoints are taken, the method holds the solver and the
generator; a resumed run rebuilds the copies at begin_task from the restored ones.
"""
from __future__ import annotations

import argparse
from typing import Any

import torch
import torch.nn.functional as F

from backbone.contract import TaskNetwork
from datasets.continual_dataset import SequentialDataset, TaskData, to_model_input
from models.continual_model import ContinualModel, frozen_copy
from models.dgr.vae import ConvVAE, vae_loss
from models.replay import with_replay
from utils.buffer import ReplaySample
from utils.context import TrainingContext
from utils.errors import UserError
from utils.sizes import network_bytes
from utils.validators import fraction, non_negative_float, positive_float, positive_int


def mixed_loss(losses: torch.Tensor, n_current: int, weight: float) -> torch.Tensor:
    """weight * mean of the first n_current per-sample losses (the current task's) plus
    (1 - weight) * mean of the rest (the replayed ones); the plain mean with nothing replayed."""
    if n_current == len(losses):
        return losses.mean()
    return weight * losses[:n_current].mean() + (1 - weight) * losses[n_current:].mean()


def in_passes(module: torch.nn.Module, sizes: list[int], *inputs: torch.Tensor) -> Any:
    """module applied to consecutive slices of the inputs of the given sizes, one call each
    (in training mode, one set of BatchNorm batch statistics per slice), the outputs (a
    tensor or a tuple of them) concatenated back in order."""
    if len(sizes) == 1:
        return module(*inputs)
    outputs = [module(*parts) for parts in zip(*(part.split(sizes) for part in inputs))]
    if isinstance(outputs[0], tuple):
        return tuple(torch.cat(parts) for parts in zip(*outputs))
    return torch.cat(outputs)


class Dgr(ContinualModel):
    NAME = "dgr"
    DEFAULTS = {"per_task_bn": 0}
    SHARED_BN_REASON = "replays batches mixing tasks"
    FROZEN_COPIES = ("previous_net", "previous_generator")
    # Neither the BMKP fork (SunWenJu123/BMKP) nor mammoth has DGR settings. The solver takes
    # mammoth's ER best arguments for seq-cifar10 (aimagelab/mammoth, utils/best_args.py,
    # buffer 500; DGR's solver step is ER's with generated images for stored ones), on
    # seq-cifar100 with the BMKP protocol's 100 epochs; the generator keeps its defaults
    # (AntixK/PyTorch-VAE's VAE settings, module docstring). The paper's DGR row has no
    # Tiny-ImageNet number.
    BEST_CONFIGS = {
        "seq-cifar10": dict(lr=0.1, minibatch_size=32, batch_size=32, n_epochs=50),
        "seq-cifar100": dict(lr=0.1, minibatch_size=32, batch_size=32, n_epochs=100),
    }

    @staticmethod
    def add_arguments(parser: argparse._ActionsContainer) -> None:
        parser.add_argument("--minibatch_size", type=positive_int, default=None,
                            help="generated images replayed per solver and generator step "
                                 "(default: --batch_size)")
        parser.add_argument("--new_task_weight", type=fraction, default=None,
                            help="weight r of the current task's loss, 1 - r the replay's "
                                 "(default: 1 / number of tasks so far)")
        parser.add_argument("--gen_epochs", type=positive_int, default=None,
                            help="generator epochs per task (default: --n_epochs)")
        parser.add_argument("--gen_lr", type=positive_float, default=0.005,
                            help="Adam learning rate of the generator")
        parser.add_argument("--gen_nf", type=positive_int, default=32,
                            help="channels of the generator's first stage (doubling per stage)")
        parser.add_argument("--latent_dim", type=positive_int, default=128,
                            help="latent dimensions of the generator")
        parser.add_argument("--replay_passes", choices=("joint", "separate", "per_task"),
                            default="joint",
                            help="training-mode passes of the current batch and the replay "
                                 "through the solver and the generator: one mixed batch "
                                 "(joint), the two apart (separate, kuc2477's DGR), or the "
                                 "replay split further by task (per_task, van de Ven's)")
        parser.add_argument("--kld_weight", type=non_negative_float, default=0.00025,
                            help="weight of the generator's KL term against its per-pixel "
                                 "reconstruction error")

    def __init__(self, net: TaskNetwork, dataset: SequentialDataset,
                 args: argparse.Namespace) -> None:
        if not args.bn_running_stats:
            raise UserError(f"{self.NAME}'s previous solver labels the replay in eval mode, "
                            "which without running statistics would depend on the replayed "
                            "batch; drop --bn_running_stats 0")
        super().__init__(net, dataset, args)
        self.generator = ConvVAE(dataset.IMAGE_SIZE, dataset.CHANNELS, dataset.N_TASKS,
                                 args.gen_nf, args.latent_dim)
        self.minibatch_size = args.minibatch_size or args.batch_size
        # The previous scholar, while a task is trained (submodules then: moved and saved
        # with the model, kept in eval mode by train()).
        self.previous_net: TaskNetwork | None = None
        self.previous_generator: ConvVAE | None = None
        self.generator_optimizer: torch.optim.Optimizer | None = None

    def new_task_weight(self, task: int) -> float:
        """r: the option, or 1 / (tasks so far)."""
        return self.args.new_task_weight or 1.0 / (task + 1)

    def as_input(self, x: torch.Tensor) -> torch.Tensor:
        """Generated images as the solver takes its batches: float32, in the run's layout."""
        layout = torch.channels_last if self.args.channels_last else torch.contiguous_format
        return x.to(torch.float32, memory_format=layout)

    def begin_task(self, task: int, data: TaskData) -> None:
        super().begin_task(task, data)
        if task > 0:
            self.previous_net = frozen_copy(self.net)
            self.previous_generator = frozen_copy(self.generator)

    def fit_task(self, task: int, data: TaskData, ctx: TrainingContext) -> None:
        with ctx.phase("train"):
            self.train_epochs(data, ctx, self.args.n_epochs, self.observe, task)
        if self.has_later_task(task):  # only later tasks replay from it
            with ctx.phase("generator"):
                self.train_generator(task, data, ctx)

    def end_task(self, task: int, data: TaskData, ctx: TrainingContext) -> None:
        self.previous_net = self.previous_generator = None

    def replay_shares(self, task: int) -> list[int]:
        """Replayed images per earlier task while `task` is learned: equal shares, one more
        for the first tasks when they do not divide evenly."""
        size = self.minibatch_size
        return [size // task + (earlier < size % task) for earlier in range(task)]

    def replay_tasks(self, task: int) -> torch.Tensor:
        """Task ids of a replayed batch while `task` is learned: 0..task-1 in consecutive
        runs of replay_shares(task) images."""
        device = self.generator.fc_mu.weight.device
        return (torch.arange(self.minibatch_size, device=device) % task).sort().values

    def pass_sizes(self, n_current: int, task: int) -> list[int]:
        """How a batch of n_current current images followed by the replay splits into
        training-mode passes (--replay_passes)."""
        if task == 0:
            return [n_current]
        if self.args.replay_passes == "joint":
            return [n_current + self.minibatch_size]
        if self.args.replay_passes == "separate":
            return [n_current, self.minibatch_size]
        return [n_current, *(share for share in self.replay_shares(task) if share)]

    @torch.no_grad()
    def generated_replay(self, task: int) -> ReplaySample:
        """A replayed batch for the solver: images the previous generator draws for the
        earlier tasks, labelled by the previous solver through each image's task head."""
        tasks = self.replay_tasks(task)
        x = self.as_input(self.previous_generator.sample(tasks))
        return ReplaySample(x, self.previous_net(x, tasks).argmax(1), tasks, None)

    def observe(self, x: torch.Tensor, y: torch.Tensor, task: int) -> torch.Tensor:
        if task == 0:
            return self.optimizer_step(F.cross_entropy(self.net(x, task), y))
        past = self.generated_replay(task)
        inputs, labels, tasks = with_replay(x, y, task, past)
        logits = in_passes(self.net, self.pass_sizes(len(y), task), inputs, tasks)
        losses = F.cross_entropy(logits, labels, reduction="none")
        return self.optimizer_step(mixed_loss(losses, len(y), self.new_task_weight(task)))

    def train_generator(self, task: int, data: TaskData, ctx: TrainingContext) -> None:
        """--gen_epochs of generator steps on the task's un-augmented images, with a fresh
        Adam; the solver's learning-rate schedule counts solver epochs only."""
        self.generator_optimizer = torch.optim.Adam(self.generator.parameters(),
                                                    lr=self.args.gen_lr)
        scheduler, self.scheduler = self.scheduler, None
        try:
            self.train_epochs(data, ctx, self.args.gen_epochs or self.args.n_epochs,
                              self.generator_step, task, label="generator epoch",
                              with_raw=True)
        finally:
            self.scheduler, self.generator_optimizer = scheduler, None

    def generator_step(self, x: torch.Tensor, y: torch.Tensor, task: int,
                       raw: torch.Tensor) -> torch.Tensor:
        """One VAE step on the batch's raw images plus, after the first task, images the
        previous generator draws for the earlier tasks (the generator replays itself)."""
        inputs = to_model_input(raw, bool(self.args.channels_last))
        tasks = torch.full_like(y, task)
        if task > 0:
            past_tasks = self.replay_tasks(task)
            with torch.no_grad():
                past = self.as_input(self.previous_generator.sample(past_tasks))
            inputs, tasks = torch.cat((inputs, past)), torch.cat((tasks, past_tasks))
        recons, mu, log_var = in_passes(self.generator, self.pass_sizes(len(y), task),
                                        inputs, tasks)
        losses = vae_loss(recons, inputs, mu, log_var, self.args.kld_weight)
        loss = mixed_loss(losses, len(y), self.new_task_weight(task))
        self.generator_optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.generator_optimizer.step()
        return loss.detach()

    def memory_breakdown(self) -> dict[str, int]:
        """The solver and the generator; the previous scholar too while it exists (within a
        task; it is dropped at end_task, before the loop reports memory)."""
        parts = {**super().memory_breakdown(), "generator": network_bytes(self.generator)}
        for name in ("previous_net", "previous_generator"):
            module = getattr(self, name)
            if module is not None:
                parts[name] = network_bytes(module)
        return parts
