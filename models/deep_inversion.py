"""DeepInversion (Yin et al., CVPR 2020, "Dreaming to Distill: Data-free Knowledge Transfer
via DeepInversion") as a Task-IL rehearsal method whose rehearsal images are synthesised.

After task t is learned, images are optimised from noise (Adam on the pixels) so that the
frozen network, in eval mode, classifies them as chosen classes of head t and their features
look like the training data's to every BatchNorm layer. With x~ an image batch randomly
shifted by up to --jitter pixels (torch.roll), the loss of a synthesis step is

    CE(head_t(x~), y)
        + bn_weight * sum_l (||running_var_l - var_l(x~)||_2
                             + ||running_mean_l - mean_l(x~)||_2)
        + tv_weight * sum_{4 directions} ||z~ shifted by one pixel - z~||_2
        + l2_weight * ||z~||_2
        + competition_weight * (1 - JS(student(x~), teacher(x~)))   (Adaptive DeepInversion)

mean_l and var_l (biased) are the per-channel batch statistics of BatchNorm layer l's input;
z~ is x~ standardised (the variable optimised, below); the labels y cycle through the task's
classes, so the classes' image counts differ by one at most.
The synthesised images are kept as uint8, like a replay buffer's, with their task id, label
and the frozen network's logits on them (computed on the stored, quantised pixels, so the
targets are exactly those of the images replayed). While later tasks train, each step draws
a minibatch of them and trains on the current batch and the replayed one as one forward
(every sample through its own task's head):

    CE(head_t(x), y) + alpha * KL(softmax(stored logits / T) || softmax(logits / T))

Followed from the authors' CIFAR-10 code (NVlabs/DeepInversion,
cifar10/deepinversion_cifar10.py, with the "paper parameters" of its cifar10/README.md:
batch 256, 2,000 iterations, Adam at lr 0.05 with default betas and no schedule, BatchNorm
weight 10, total-variation weight 2.5e-5, l2 weight 0, jitter of up to 2 pixels, no flip,
fixed cyclic labels; the teacher in eval mode): the BatchNorm distance (unsquared L2 norms
of the mean and variance differences, summed over every BatchNorm layer, the first included,
all at weight 1), the total variation (L2 norms of the horizontal, vertical and two diagonal
differences of the jittered batch), the l2 prior (norm of the whole jittered batch) and the
competition term (temperature 3; the reference's Jensen-Shannon stand-in, 0.5 * KL(M || P)
+ 0.5 * KL(M || Q) with P, Q and M = (P + Q) / 2 clamped to [0.01, 0.99], its
1 - clamp(., 0, 1) and the gradient through both networks).
The replay follows the DeepInversion baseline of Always Be Dreaming (GT-RIPL/
AlwaysBeDreaming-DFCIL, learners/datafree.py, DeepInversionGenBN): one forward of the current
batch and as many replayed images together, the cross-entropy on the current batch only, the
distillation on the replayed images only, at its weight (--mu 1, experiments/cifar100-*.sh)
and temperature (--temp 2, run_dfcil.py).

Where this differs:
- Task-IL, multi-head: the cross-entropy is over head t's classes only, and each replayed
  image is distilled through its own task's head (the reference inverts one single-head
  classifier).
- The optimised variable is the image standardised as the reference's inputs are (pixels =
  mean + std * z), so its lr and prior weights keep their scale: with the network's own
  input standardisation (seq-tinyimg, --normalize_inputs 1) its mean and std, otherwise
  mean 0.5 and std 0.25 (about CIFAR-10's and Tiny-ImageNet's channel statistics). After
  every step z is clipped so the pixels stay in [0, 1], as the authors' ImageNet code clips
  (its CIFAR code does not); without it the uint8 images would not be those optimised. The
  initial noise is clipped the same way (the reference starts from unclipped noise).
- The images kept are the last iterate: the CIFAR code's "best" copy shares the optimised
  tensor's storage (inputs.data), so it returns the last iterate too.
- The distillation is models/lwf.py's KL, with the gradient of Always Be Dreaming's
  soft-target cross-entropy (no T^2 factor). Its baseline also distils the old classes'
  outputs on the current batch (an LwF term), left out here: only the synthesised images
  are distilled.
- The competition's student is the network as it was when task t began (a copy taken at
  begin_task, only with --competition_weight > 0): the network that has not learned task t,
  so the term favours images on which learning task t changed the outputs. The reference's
  student is the network being distilled, which in continual learning does not exist until
  the next task trains.
- Nothing is synthesised after the last task: no later task would replay it.
- The replay is a fixed set (--synthetic_per_task images per task), each image's target the
  logits of the network right after its task; Always Be Dreaming's generator draws fresh
  images every step and scores them with the previous task's network.
- Replayed images are not augmented: their targets are the frozen network's logits on
  exactly these pixels, and a zero-padded crop of an image optimised to match the
  BatchNorm statistics would leave both.
- The BMKP paper's DeepInversion row (Table 1) names no code, and the BMKP repository
  (SunWenJu123/BMKP) holds none for it. The continual-learning versions of DI found (Always
  Be Dreaming's DeepInversionGenBN, and a copy of it in a mammoth-style library, deepinc)
  train a generator with a KL form of the BatchNorm loss instead of optimising pixels; this
  file implements the paper's and NVlabs' pixel optimisation.

BatchNorm must be shared and track running statistics (--per_task_bn 0, --bn_running_stats
1): the running statistics are what the images are inverted from. Replayed and current
samples share each batch, so the running statistics after task t are those of batches mixing
task t's images with the synthetic ones, as in Always Be Dreaming.

Cost: per task (but the last) ceil(--synthetic_per_task / --synthesis_batch_size) batches of
--synthesis_iterations forward and backward passes of the frozen network on the synthesis
batch (twice the forwards with the competition term), timed as the phase "synthesis"; every
later training step forwards and backpropagates --minibatch_size more images. Memory between
tasks: the network and the synthetic set (uint8 images, labels, task ids, float32 logits),
which grows by --synthetic_per_task images per task. The student copy exists only while a
task trains, with the competition term on.
"""
from __future__ import annotations

import argparse
import copy
from contextlib import contextmanager
from typing import Iterator, NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from backbone.contract import TaskNetwork
from datasets.continual_dataset import SequentialDataset, TaskData, to_model_input
from models.continual_model import ContinualModel
from models.lwf import distillation_loss
from models.replay import with_replay
from utils.buffer import ReservoirBuffer
from utils.context import TrainingContext
from utils.errors import UserError
from utils.validators import non_negative_float, non_negative_int, positive_float, positive_int

# Pixel mean and std of the optimised variable when the network standardises no inputs
# (module docstring).
DEFAULT_PIXEL_MEAN, DEFAULT_PIXEL_STD = 0.5, 0.25
# The reference's fixed temperature of the competition term.
COMPETITION_TEMPERATURE = 3.0


class InversionTerms(NamedTuple):
    """The synthesis loss's terms on one jittered batch (each a scalar tensor, unweighted)."""

    cross_entropy: torch.Tensor
    batch_norm: torch.Tensor
    total_variation: torch.Tensor
    l2: torch.Tensor
    competition: torch.Tensor


def statistics_distance(features: torch.Tensor, running_mean: torch.Tensor,
                        running_var: torch.Tensor) -> torch.Tensor:
    """||running_var - var||_2 + ||running_mean - mean||_2, with the per-channel mean and
    biased variance of `features` (N x C x H x W) over the batch and positions."""
    var, mean = torch.var_mean(features.float(), dim=(0, 2, 3), correction=0)
    return (torch.linalg.vector_norm(running_var - var)
            + torch.linalg.vector_norm(running_mean - mean))


def batch_norm_layers(net: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [m for m in net.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


@contextmanager
def statistics_losses(layers: list[nn.modules.batchnorm._BatchNorm]
                      ) -> Iterator[list[torch.Tensor]]:
    """Within the block, every forward through `layers` appends each layer's
    statistics_distance of its input to its running statistics to the yielded list."""
    losses: list[torch.Tensor] = []

    def hook(module, inputs, _output):
        losses.append(statistics_distance(inputs[0], module.running_mean, module.running_var))

    handles = [layer.register_forward_hook(hook) for layer in layers]
    try:
        yield losses
    finally:
        for handle in handles:
            handle.remove()


def total_variation(x: torch.Tensor) -> torch.Tensor:
    """Sum of the L2 norms of the batch's horizontal, vertical and two diagonal one-pixel
    differences (the reference's loss_var)."""
    return (torch.linalg.vector_norm(x[:, :, :, :-1] - x[:, :, :, 1:])
            + torch.linalg.vector_norm(x[:, :, :-1, :] - x[:, :, 1:, :])
            + torch.linalg.vector_norm(x[:, :, 1:, :-1] - x[:, :, :-1, 1:])
            + torch.linalg.vector_norm(x[:, :, :-1, :-1] - x[:, :, 1:, 1:]))


def competition_loss(teacher_logits: torch.Tensor, student_logits: torch.Tensor,
                     temperature: float = COMPETITION_TEMPERATURE) -> torch.Tensor:
    """Adaptive DeepInversion's term as the reference computes it: 1 - clamp(d, 0, 1) with
    d = 0.5 * KL(M || P) + 0.5 * KL(M || Q), P and Q the student's and teacher's softened
    outputs and M their mean, all three clamped to [0.01, 0.99]; low where they disagree."""
    p = F.softmax(student_logits.float() / temperature, dim=1)
    q = F.softmax(teacher_logits.float() / temperature, dim=1)
    m = (0.5 * (p + q)).clamp(0.01, 0.99)
    p, q = p.clamp(0.01, 0.99), q.clamp(0.01, 0.99)
    divergence = 0.5 * (F.kl_div(p.log(), m, reduction="batchmean")
                        + F.kl_div(q.log(), m, reduction="batchmean"))
    return 1.0 - divergence.clamp(0.0, 1.0)


@contextmanager
def frozen(*nets: nn.Module) -> Iterator[None]:
    """The networks in eval mode with no parameter requiring a gradient (only the images
    are optimised), restored afterwards."""
    saved = [(net.training, [p.requires_grad for p in net.parameters()]) for net in nets]
    for net in nets:
        net.eval().requires_grad_(False)
    try:
        yield
    finally:
        for net, (training, flags) in zip(nets, saved):
            net.train(training)
            for p, flag in zip(net.parameters(), flags):
                p.requires_grad_(flag)


class SyntheticSet(ReservoirBuffer):
    """Every synthesised image offered is kept (no reservoir): the set grows by each task's
    images, and its bytes are those of the images it holds. Sampling, gathering into float
    batches and the byte count are the replay buffer's."""

    def __init__(self, channels_last: bool = False) -> None:
        super().__init__(0, channels_last)

    def add(self, x: torch.Tensor, y: torch.Tensor, t: torch.Tensor,
            logits: torch.Tensor | None = None) -> None:
        parts = (x, y, t, logits.float())
        if self.x is not None:
            parts = tuple(torch.cat(pair) for pair in zip((self.x, self.y, self.t, self.logits),
                                                           parts))
        self.x, self.y, self.t, self.logits = parts
        self.seen = self.capacity = len(self.x)

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.capacity = self.seen


class DeepInversion(ContinualModel):
    NAME = "deep_inversion"
    DEFAULTS = {"per_task_bn": 0}
    SHARED_BN_REASON = ("inverts the shared BatchNorm's running statistics and replays "
                        "batches mixing tasks")
    # No continual-learning run of pixel-optimised DeepInversion publishes its settings for
    # these benchmarks. Training: DER's (the other logit-distilling replay) best arguments
    # with a 500-image buffer (aimagelab/mammoth, utils/best_args.py, its 'der' entries);
    # synthesis: the NVlabs CIFAR-10 paper parameters (NVlabs/DeepInversion,
    # cifar10/README.md and cifar10/deepinversion_cifar10.py), on seq-tinyimg too (the
    # authors give none for 64x64); distillation: Always Be Dreaming's DeepInversion
    # baseline (GT-RIPL/AlwaysBeDreaming-DFCIL, experiments/cifar100-tentask.sh, --mu 1;
    # learners/datafree.py, DTemp 2).
    _SYNTHESIS = dict(synthetic_per_task=256, synthesis_batch_size=256,
                      synthesis_iterations=2000, synthesis_lr=0.05, bn_weight=10.0,
                      tv_weight=2.5e-5, l2_weight=0.0, jitter=2, competition_weight=0.0,
                      alpha=1.0, temperature=2.0)
    BEST_CONFIGS = {
        "seq-cifar10": dict(lr=0.03, minibatch_size=32, batch_size=32, n_epochs=50,
                            **_SYNTHESIS),
        "seq-tinyimg": dict(lr=0.03, minibatch_size=32, batch_size=32, n_epochs=100,
                            **_SYNTHESIS),
    }

    @staticmethod
    def add_arguments(parser: argparse._ActionsContainer) -> None:
        # The synthesis defaults are a quick schedule (64 images, 200 steps); --model_config
        # best gives the reference's (256 images, 2000 steps, _SYNTHESIS).
        parser.add_argument("--synthetic_per_task", type=positive_int, default=64,
                            help="images synthesised after each task (but the last)")
        parser.add_argument("--synthesis_batch_size", type=positive_int, default=64,
                            help="images optimised together (their BatchNorm statistics are "
                                 "the batch's)")
        parser.add_argument("--synthesis_iterations", type=positive_int, default=200,
                            help="Adam steps on each synthesis batch")
        parser.add_argument("--synthesis_lr", type=positive_float, default=0.05,
                            help="Adam learning rate of the synthesised pixels")
        parser.add_argument("--bn_weight", type=non_negative_float, default=10.0,
                            help="weight of the BatchNorm-statistics loss")
        parser.add_argument("--tv_weight", type=non_negative_float, default=2.5e-5,
                            help="weight of the total-variation prior")
        parser.add_argument("--l2_weight", type=non_negative_float, default=0.0,
                            help="weight of the l2 image prior")
        parser.add_argument("--jitter", type=non_negative_int, default=2,
                            help="largest random shift (pixels) of the images at each step")
        parser.add_argument("--competition_weight", type=non_negative_float, default=0.0,
                            help="weight of Adaptive DeepInversion's competition term (0: "
                                 "off; on, a copy of the network from the task's start is "
                                 "the student)")
        parser.add_argument("--alpha", type=non_negative_float, default=1.0,
                            help="weight of the distillation loss on replayed images")
        parser.add_argument("--temperature", type=positive_float, default=2.0,
                            help="softmax temperature of the distillation")
        parser.add_argument("--minibatch_size", type=positive_int, default=None,
                            help="synthetic images replayed per step (default: --batch_size)")

    def __init__(self, net: TaskNetwork, dataset: SequentialDataset,
                 args: argparse.Namespace) -> None:
        if not args.bn_running_stats:
            raise UserError(f"{self.NAME} inverts BatchNorm's running statistics, which "
                            "--bn_running_stats 0 does not keep; drop --bn_running_stats 0")
        super().__init__(net, dataset, args)
        self.classes_per_task = dataset.N_CLASSES_PER_TASK
        self.minibatch_size = args.minibatch_size or args.batch_size
        self.pixel_mean_std = dataset.input_mean_std(args) or (
            (DEFAULT_PIXEL_MEAN,) * dataset.CHANNELS, (DEFAULT_PIXEL_STD,) * dataset.CHANNELS)
        self.synthetic = SyntheticSet(channels_last=bool(args.channels_last))
        self.student: TaskNetwork | None = None
        # Per synthesis: its task, images, steps, the teacher's accuracy on the images and
        # the terms of the last step (mean over batches).
        self.synthesis_log: list[dict] = []

    def begin_task(self, task: int, data: TaskData) -> None:
        super().begin_task(task, data)
        if self.args.competition_weight > 0 and self.has_later_task(task):
            self.student = copy.deepcopy(self.net).requires_grad_(False)

    def observe(self, x: torch.Tensor, y: torch.Tensor, task: int) -> torch.Tensor:
        """The task loss, plus the distillation of a replayed synthetic minibatch, from one
        forward of both (module docstring)."""
        if not len(self.synthetic):
            return self.optimizer_step(F.cross_entropy(self.net(x, task), y))
        past = self.synthetic.sample(self.minibatch_size, augment=False)
        inputs, _, tasks = with_replay(x, y, task, past)
        logits = self.net(inputs, tasks)
        n = len(y)
        distill = distillation_loss(logits[n:].float(), past.logits, self.args.temperature)
        return self.optimizer_step(F.cross_entropy(logits[:n], y) + self.args.alpha * distill)

    def end_task(self, task: int, data: TaskData, ctx: TrainingContext) -> None:
        if self.has_later_task(task):
            with ctx.phase("synthesis"):
                self.synthesize(task, data.x.shape[1:], data.x.device, ctx)
        self.student = None

    def synthesize(self, task: int, shape: torch.Size, device: torch.device,
                   ctx: TrainingContext) -> None:
        """--synthetic_per_task images of `task`, in batches, added to the synthetic set with
        the frozen network's logits on them; the run's synthesis log gets one entry."""
        n, size = self.args.synthetic_per_task, self.args.synthesis_batch_size
        labels = torch.arange(n, device=device) % self.classes_per_task
        last_terms = []
        nets = (self.net,) if self.student is None else (self.net, self.student)
        # hooks registered once per synthesis (a compiled network keeps one variant)
        with frozen(*nets), statistics_losses(batch_norm_layers(self.net)) as bn_losses:
            for start in range(0, n, size):
                batch = labels[start:start + size]
                images, terms = self.invert(batch, task, shape, bn_losses, ctx)
                with torch.no_grad(), ctx.autocast():
                    logits = self.net(to_model_input(images, self.synthetic.channels_last),
                                      task)
                self.synthetic.add(images, batch, torch.full_like(batch, task), logits)
                last_terms.append(torch.stack(terms))
        self._log(task, n, ctx.steps(self.args.synthesis_iterations),
                  torch.stack(last_terms).mean(0))

    def invert(self, labels: torch.Tensor, task: int, shape: torch.Size,
               bn_losses: list[torch.Tensor],
               ctx: TrainingContext) -> tuple[torch.Tensor, InversionTerms]:
        """A batch of uint8 images optimised for `labels` of `task` from noise, and the
        terms of its last step; `bn_losses` is where statistics_losses records."""
        mean, std = (torch.tensor(v, device=labels.device).view(1, -1, 1, 1)
                     for v in self.pixel_mean_std)
        low, high = -mean / std, (1 - mean) / std  # z's range for pixels in [0, 1]
        layout = torch.channels_last if self.synthetic.channels_last else torch.contiguous_format
        z = torch.randn((len(labels), *shape), device=labels.device)
        z = z.contiguous(memory_format=layout).clamp_(low, high).requires_grad_()
        optimizer = torch.optim.Adam([z], lr=self.args.synthesis_lr)
        terms = None
        for _ in range(ctx.steps(self.args.synthesis_iterations)):
            optimizer.zero_grad(set_to_none=True)
            with ctx.autocast():
                terms = self.inversion_terms(self.jittered(z), mean, std, labels, task,
                                             bn_losses)
            self.inversion_loss(terms).backward()
            optimizer.step()
            with torch.no_grad():
                z.clamp_(low, high)
        images = ((mean + std * z.detach()).clamp_(0, 1) * 255).round_().to(torch.uint8)
        return images, InversionTerms(*(term.detach() for term in terms))

    def jittered(self, z: torch.Tensor) -> torch.Tensor:
        """z rolled by a random offset of up to --jitter pixels along each axis (drawn on
        the CPU from torch's global generator: no device sync)."""
        limit = self.args.jitter
        if limit == 0:
            return z
        shifts = torch.randint(-limit, limit + 1, (2,)).tolist()
        return torch.roll(z, shifts=shifts, dims=(2, 3))

    def inversion_terms(self, z: torch.Tensor, mean: torch.Tensor, std: torch.Tensor,
                        labels: torch.Tensor, task: int,
                        bn_losses: list[torch.Tensor]) -> InversionTerms:
        """The synthesis loss's terms for the standardised images z (module docstring): the
        networks see the pixels mean + std * z, the priors are on z, as in the reference.
        `bn_losses` is the list statistics_losses fills from the network's forward."""
        x = mean + std * z
        bn_losses.clear()
        logits = self.net(x, task)
        zero = logits.new_zeros((), dtype=torch.float32)
        competition = zero
        if self.args.competition_weight > 0:
            competition = competition_loss(logits, self.student(x, task))
        return InversionTerms(F.cross_entropy(logits.float(), labels), sum(bn_losses, zero),
                              total_variation(z), torch.linalg.vector_norm(z), competition)

    def inversion_loss(self, terms: InversionTerms) -> torch.Tensor:
        """The weighted sum of the terms (the cross-entropy at weight 1)."""
        args = self.args
        return (terms.cross_entropy + args.bn_weight * terms.batch_norm
                + args.tv_weight * terms.total_variation + args.l2_weight * terms.l2
                + args.competition_weight * terms.competition)

    def _log(self, task: int, n: int, iterations: int, terms: torch.Tensor) -> None:
        """One synthesis's entry: one transfer from the device per task."""
        added = slice(len(self.synthetic) - n, len(self.synthetic))
        hits = self.synthetic.logits[added].argmax(1) == self.synthetic.y[added]
        values = torch.cat((terms.float(), hits.float().mean().view(1))).tolist()
        batches = -(-n // self.args.synthesis_batch_size)
        self.synthesis_log.append({
            "task": task, "images": n, "steps": batches * iterations,
            "teacher_accuracy": 100.0 * values[-1],
            "last_step_terms": dict(zip(InversionTerms._fields, values[:-1]))})

    def memory_breakdown(self) -> dict[str, int]:
        """The network and the synthetic set (uint8 images, labels, task ids, logits)."""
        return {**super().memory_breakdown(), "synthetic": self.synthetic.nbytes()}

    def result_details(self) -> dict:
        return {"synthesis": self.synthesis_log}

    def checkpoint_state(self) -> dict:
        # The student exists only while a task trains; begin_task rebuilds it on resume.
        return {**super().checkpoint_state(), "synthetic": self.synthetic.state_dict(),
                "synthesis_log": self.synthesis_log}

    def load_checkpoint_state(self, state: dict) -> None:
        super().load_checkpoint_state(state)
        self.synthetic.load_state_dict(state["synthetic"])
        self.synthesis_log = list(state["synthesis_log"])
