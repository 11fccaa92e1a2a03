"""PASS: Prototype Augmentation and Self-Supervision (Zhu, Zhang, Wang, Yin and Liu, CVPR 2021,
"Prototype Augmentation and Self-Supervision for Incremental Learning"), with Task-IL heads.

The module is pass_.py because `pass` is a Python keyword; the method's NAME is "pass".

Training step on a batch (x, y) of task t:

- self-supervised label augmentation: every image is also rotated by 90, 180 and 270 degrees
  and each (class, rotation) pair is a class of its own, so the batch grows fourfold and
  image i of class c rotated k quarter turns has label 4c + k;
- L = CE(z_t(x) / T, 4c + k)                                 the task's 4C-way loss
      + kd_weight      * || f(x) - f_old(x) ||_2            (t > 0, kd_weight > 0)
      + proto_aug_weight * CE(z_j(p) / T, 4c)               (t > 0, proto_aug_weight > 0)
  where f are the features of the rotated batch, f_old those of the network as it was before
  task t (a frozen copy), and p = mu_c + r * e, e ~ N(0, I), are --batch_size augmented
  prototypes of old classes c drawn uniformly among all old classes, each classified by
  its own task j's head as the un-rotated class (label 4c).

After each task (phase "prototypes"): the mean feature mu_c of each of the task's classes,
over its training images (augmented as in training, not rotated, eval mode) and its radius
r_c = sqrt(trace(Cov_c) / D) (unbiased covariance, D the feature size) are stored.

Task-IL mapping of the rotation classes. The backbone's head of task t keeps its C outputs:
they are the un-rotated classes (the reference's outputs[:, ::4]). The method owns one
auxiliary rotation head per task, a linear layer of 3C outputs (rotations 1-3 of each class)
on the same features; during training the two are interleaved into the task's 4C logits,
output 4c + k being rotation k of class c as in the reference. Prediction reads the
backbone's head alone (forward is the network's), so the rotation heads are training-only
parameters; they are kept between tasks because the protoAug loss of a later task still
scores old prototypes against the old tasks' rotated classes (the reference's old fc rows).

Followed from the authors' code (Impression2805/CVPR21_PASS, PASS.py and main.py; the same in
Tiny-ImageNet/PASS_tiny.py and main_tiny.py):
- the rotations are torch.rot90 over (H, W) with k = 0..3, interleaved per image, labels
  4y + k; every training loss (task and protoAug) divides the logits by --temperature 0.1;
- the distillation is torch.dist(features, old_features, 2): the L2 norm of the whole
  batch's feature difference (not squared, not averaged), on the rotated batch, the live
  network in training mode and the frozen copy in eval mode (so it is not zero at the first
  step of a task: BatchNorm normalises the two with batch and running statistics);
- the radius: the reference computes r_c^2 = trace(Cov_c) / D for the first task's classes
  only and augments every old class with one radius, sqrt(mean_c r_c^2) over those classes,
  never updated (--proto_radius first_task, the default); --proto_radius class uses each
  class's own r_c instead. Radii of every class are stored and reported either way;
- protoAug draws --batch_size prototypes per step (not 4x), each of a uniformly drawn old
  class, with N(0, I) noise; prototypes come from the final network of their task, in eval
  mode, over the task's training images with the training augmentation;
- Adam with L2 weight decay 2e-4, lr 1e-3, a fresh optimizer per task, StepLR(45, 0.1),
  101 epochs, batch 64, protoAug and KD weights 10 (BEST_CONFIGS, DEFAULTS).

Departures:
- Task-IL, multi-head: the reference has one class-IL classifier over all seen classes x 4;
  here the task loss is a softmax over the task's own 4C outputs and each augmented
  prototype's over its own old task's 4C outputs (the current head is not among them).
- The reference's first task holds half the classes (50 of CIFAR-100, 100 of Tiny-ImageNet)
  and later tasks 5-10; here all tasks are equal (the BMKP protocol), so the first-task
  radius comes from fewer classes.
- The prototype pass uses every training image once; the reference skips its loader's last
  incomplete batch (an artefact of its numpy reshape).
- Augmentation is the framework's random crop and flip; the reference's CIFAR runs add
  ColorJitter(brightness 63/255), its Tiny-ImageNet runs flip only. It standardises CIFAR
  inputs (CIFAR-100's mean and std, after the crop): here CIFAR inputs stay in [0, 1], as
  for every method, unless --normalize_inputs 1 (each dataset's own training statistics).
- Convolutions keep PyTorch's default initialisation (the reference: He normal, fan-out).
- The features (distilled, averaged into prototypes, their radius) are what the backbone's
  heads read: with --feature_pool global (--model_config best) one value per channel, as the
  reference's 512; with --feature_pool grid (the reduced ResNet-18) the last map pooled to
  2x2, four times as many values, over which the distillation's norm and the prototypes'
  noise are taken.
- A zero-weighted loss (--proto_aug_weight 0, --kd_weight 0) is left out of the step, not
  multiplied by 0 (the reference has no such option): a zero gradient on the old heads would
  still move them under Adam's weight decay, so 0 means "this term off".
- Every epoch splits into equal batches (63-64 images on CIFAR); the reference's CIFAR
  loader ends each epoch with a remainder batch, its Tiny-ImageNet loader drops it.
- The reference calls scheduler.step() before each epoch, so its lr drops one epoch earlier
  (from the 45th epoch) than --lr_step 45, which steps after each epoch (from the 46th).
- The reference keeps its frozen copy between tasks (made after each task); here it is made
  at begin_task from the same weights and dropped at end_task (it is not needed at test
  time), so a resumed run rebuilds it from the restored network.
- Old prototypes are drawn on the device from torch's generator (the reference: numpy).
- After the first task the reference runs the network twice per step in training mode (the
  logits, then the features for the distillation), so BatchNorm's running statistics take
  two updates per step from the same batch statistics. Here one pass computes both, and for
  t > 0 the running statistics' momentum is that of two updates, 1 - (1 - m)^2 (0.19 for
  PyTorch's 0.1): the same statistics (num_batches_tracked counts one step, not two).

Memory between tasks: the network, the rotation heads (3C x (D + 1) per task), the
prototypes (D floats per seen class) and radii (one float per class). Cost per step: the
network's forward and backward on 4x the batch, plus the frozen copy's forward on it (t > 0)
and the old heads on --batch_size prototypes (not measured here).

Per-task BatchNorm is refused: old heads score prototypes of one shared feature space, which
the distillation keeps in place.
"""
from __future__ import annotations

import argparse

import torch
import torch.nn as nn
import torch.nn.functional as F

from backbone.contract import TaskNetwork
from datasets.continual_dataset import SequentialDataset, TaskData
from models.continual_model import ContinualModel, frozen_copy, tracked_norms
from utils.context import TrainingContext
from utils.errors import UserError
from utils.sizes import network_bytes, tensor_bytes
from utils.validators import non_negative_float, positive_float

ROTATIONS = 4


def rotate_batch(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each image followed by its 90, 180 and 270 degree rotations (over H, W), labelled
    4y + k for k quarter turns: the self-supervised label augmentation."""
    rotated = torch.stack([torch.rot90(x, k, (2, 3)) for k in range(ROTATIONS)], 1)
    labels = y[:, None] * ROTATIONS + torch.arange(ROTATIONS, device=y.device)
    return rotated.flatten(0, 1), labels.flatten()


def augment_prototypes(prototypes: torch.Tensor, radii: torch.Tensor, n: int,
                       generator: torch.Generator | None = None
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """n augmented prototypes mu_c + r_c * e, e ~ N(0, I), of classes c drawn uniformly
    (first the classes, then the noise); returns them and their classes."""
    device = prototypes.device
    classes = torch.randint(len(prototypes), (n,), generator=generator, device=device)
    noise = torch.randn(n, prototypes.shape[1], generator=generator, device=device)
    return prototypes[classes] + radii[classes, None] * noise, classes


def class_statistics(features: torch.Tensor, labels: torch.Tensor,
                     n_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per class: the mean feature and the radius sqrt(trace(Cov) / D), unbiased covariance
    (the reference's np.cov)."""
    means, radii = [], []
    for c in range(n_classes):
        own = features[labels == c]
        if len(own) < 2:
            raise UserError(f"pass needs at least two training images of every class for its "
                            f"prototypes (class {c} has {len(own)}); drop --debug_mode or use "
                            "more training data")
        means.append(own.mean(0))
        radii.append(own.var(0).mean().sqrt())
    return torch.stack(means), torch.stack(radii)


def two_update_momentum(momentum: float) -> float:
    """The running-statistics momentum of one update that equals two updates with `momentum`
    from the same batch statistics: (1 - m)^2 r + (1 - (1 - m)^2) s."""
    return 1 - (1 - momentum) ** 2


def feature_distillation(features: torch.Tensor, old_features: torch.Tensor) -> torch.Tensor:
    """The reference's torch.dist(f, f_old, 2): L2 norm of the whole batch's difference."""
    return torch.dist(features.float(), old_features.float(), 2)


class Pass(ContinualModel):
    NAME = "pass"
    # The reference's optimizer (module docstring): Adam, lr 1e-3, L2 weight decay 2e-4.
    DEFAULTS = {"lr": 1e-3, "optim_wd": 2e-4}
    SHARED_BN_REASON = "scores old prototypes with old heads in one shared feature space"
    FROZEN_COPIES = ("old_net",)
    # The authors' arguments (Impression2805/CVPR21_PASS, main.py for CIFAR-100 and
    # Tiny-ImageNet/main_tiny.py, the same values; its optimizer and StepLR(45, 0.1) in
    # PASS.py / PASS_tiny.py). The reference has no CIFAR-10 run: seq-cifar10 takes the
    # CIFAR-100 values.
    BEST_CONFIGS = {dataset: dict(lr=1e-3, optim_wd=2e-4, batch_size=64, n_epochs=101,
                                  lr_step=45, lr_gamma=0.1, proto_aug_weight=10.0,
                                  kd_weight=10.0, temperature=0.1)
                    for dataset in ("seq-cifar10", "seq-cifar100", "seq-tinyimg")}

    @staticmethod
    def add_arguments(parser: argparse._ActionsContainer) -> None:
        parser.add_argument("--proto_aug_weight", type=non_negative_float, default=10.0,
                            help="weight of the protoAug loss (old prototypes plus noise, "
                                 "classified by their own task's head)")
        parser.add_argument("--kd_weight", type=non_negative_float, default=10.0,
                            help="weight of the L2 feature distillation from the network as "
                                 "it was before the task")
        parser.add_argument("--temperature", type=positive_float, default=0.1,
                            help="the training losses divide the logits by this")
        parser.add_argument("--proto_radius", choices=("first_task", "class"),
                            default="first_task",
                            help="noise scale of the augmented prototypes: one radius from the "
                                 "first task's classes (the reference) or each class's own")

    def __init__(self, net: TaskNetwork, dataset: SequentialDataset,
                 args: argparse.Namespace) -> None:
        super().__init__(net, dataset, args)
        self.refuse_momentum("Adam")
        head = net.head(0)
        if not isinstance(head, nn.Linear):
            raise UserError("pass adds a rotation head beside each task's linear head; pick "
                            "a backbone with linear heads with --backbone")
        self.classes_per_task = dataset.N_CLASSES_PER_TASK
        width = (ROTATIONS - 1) * self.classes_per_task
        self.rotation_heads = nn.ModuleList(
            nn.Linear(head.in_features, width, bias=head.bias is not None)
            for _ in range(self.n_tasks))
        # Grown at each end_task; saved by checkpoint_state (their size changes).
        self.register_buffer("prototypes", torch.zeros(0, head.in_features), persistent=False)
        self.register_buffer("radii", torch.zeros(0), persistent=False)
        self.old_net: TaskNetwork | None = None
        self.base_momenta = [norm.momentum for norm in tracked_norms(net)]

    def make_optimizer(self, params: list) -> torch.optim.Optimizer:
        return torch.optim.Adam(params, lr=self.args.lr, weight_decay=self.args.optim_wd)

    def begin_task(self, task: int, data: TaskData) -> None:
        """A fresh Adam over the network and the rotation heads; for t > 0 the frozen copy
        and the running statistics' momentum of the reference's two passes per step."""
        self.reset_optimizer([*self.net.parameters(), *self.rotation_heads.parameters()])
        for norm, momentum in zip(tracked_norms(self.net), self.base_momenta):
            norm.momentum = momentum if task == 0 else two_update_momentum(momentum)
        if task > 0:
            self.old_net = frozen_copy(self.net)

    def rotation_logits(self, features: torch.Tensor, task: int) -> torch.Tensor:
        """Task `task`'s 4C logits, output 4c + k for class c rotated k quarter turns: the
        network's head (k = 0) interleaved with the task's rotation head (k = 1..3)."""
        plain = self.net.task_logits(features, task)
        rotated = self.rotation_heads[task](features).view(len(features), -1, ROTATIONS - 1)
        return torch.cat((plain[:, :, None], rotated), 2).flatten(1)

    def old_rotation_logits(self, features: torch.Tensor, tasks: torch.Tensor,
                            n_heads: int) -> torch.Tensor:
        """Each sample's 4C logits from its own task's heads, among tasks 0..n_heads-1 only
        (later heads stay out of the graph, so Adam's weight decay leaves them alone)."""
        every = torch.stack([self.rotation_logits(features, j) for j in range(n_heads)], 1)
        return every[torch.arange(len(features), device=features.device), tasks]

    def augmentation_radii(self) -> torch.Tensor:
        """The noise scale of each stored class (module docstring, --proto_radius)."""
        if self.args.proto_radius == "class":
            return self.radii
        first = self.radii[:self.classes_per_task]
        return first.square().mean().sqrt().expand_as(self.radii)

    def proto_aug_loss(self, task: int) -> torch.Tensor:
        """CE of --batch_size augmented old prototypes, each through its own task's heads,
        as its class un-rotated."""
        features, classes = augment_prototypes(self.prototypes, self.augmentation_radii(),
                                               self.args.batch_size)
        tasks = torch.div(classes, self.classes_per_task, rounding_mode="floor")
        labels = (classes % self.classes_per_task) * ROTATIONS
        logits = self.old_rotation_logits(features, tasks, task)
        return F.cross_entropy(logits.float() / self.args.temperature, labels)

    def pass_loss(self, x: torch.Tensor, y: torch.Tensor, task: int) -> torch.Tensor:
        """The task's rotation-augmented loss plus, after the first task, distillation and
        protoAug (module docstring)."""
        x, y = rotate_batch(x, y)
        if self.args.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        features = self.net.features(x, task)
        logits = self.rotation_logits(features, task)
        loss = F.cross_entropy(logits.float() / self.args.temperature, y)
        if task > 0 and self.args.kd_weight > 0:
            with torch.no_grad():
                old_features = self.old_net.features(x, task)
            loss = loss + self.args.kd_weight * feature_distillation(features, old_features)
        if task > 0 and self.args.proto_aug_weight > 0:
            # Off, the term stays out of the graph: a zero gradient on the old heads would
            # still be an Adam step (weight decay, rescaled to about lr) that erases them.
            loss = loss + self.args.proto_aug_weight * self.proto_aug_loss(task)
        return loss

    def observe(self, x: torch.Tensor, y: torch.Tensor, task: int) -> torch.Tensor:
        return self.optimizer_step(self.pass_loss(x, y, task))

    def task_features(self, data: TaskData, ctx: TrainingContext,
                      task: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Features (float32) and labels of the task's training images, augmented as in
        training, without rotations, in eval mode."""
        was_training = self.net.training
        self.net.eval()
        features, labels = [], []
        try:
            with torch.no_grad():
                for x, y, _ in ctx.batches(data, "prototypes", batch_size=ctx.eval_batch_size):
                    with ctx.autocast():
                        features.append(self.net.features(x, task).float())
                    labels.append(y)
        finally:
            self.net.train(was_training)
        return torch.cat(features), torch.cat(labels)

    def end_task(self, task: int, data: TaskData, ctx: TrainingContext) -> None:
        """Store the task's class prototypes and radii; drop the frozen copy."""
        self.old_net = None
        with ctx.phase("prototypes"):
            features, labels = self.task_features(data, ctx, task)
            means, radii = class_statistics(features, labels, self.classes_per_task)
        self.prototypes = torch.cat((self.prototypes, means))
        self.radii = torch.cat((self.radii, radii))

    def memory_breakdown(self) -> dict[str, int]:
        return {**super().memory_breakdown(),
                "rotation_heads": network_bytes(self.rotation_heads),
                "prototypes": tensor_bytes([self.prototypes]),
                "radii": tensor_bytes([self.radii])}

    def result_details(self) -> dict:
        """Each stored class's radius, and the single radius every old class is augmented
        with under --proto_radius first_task."""
        details = {"class_radii": [round(r, 6) for r in self.radii.tolist()]}
        if self.args.proto_radius == "first_task" and len(self.radii):
            details["augmentation_radius"] = round(float(self.augmentation_radii()[0]), 6)
        return details

    def checkpoint_state(self) -> dict:
        # The rotation heads are a submodule (in the state dict); the frozen copy is None
        # between tasks.
        return {**super().checkpoint_state(), "prototypes": self.prototypes,
                "radii": self.radii}

    def load_checkpoint_state(self, state: dict) -> None:
        super().load_checkpoint_state(state)
        self.prototypes = state["prototypes"]
        self.radii = state["radii"]
