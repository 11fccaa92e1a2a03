"""Learning without Memorizing (Dhar et al., CVPR 2019) with Task-IL heads.

LwF (models/lwf.py) plus an attention-distillation loss. While task t > 0 is learned, a frozen
copy of the network taken at begin_task (as in LwF) is the teacher, and each training batch
costs

    CE(head_t(x), y)
        + beta  * sum_{j<t} KL(softmax(old_head_j(x) / T) || softmax(head_j(x) / T))
        + gamma * mean_i || Q_old(x_i) / ||Q_old(x_i)||_2 - Q_new(x_i) / ||Q_new(x_i)||_2 ||_1

(the paper's beta and gamma; it gives no values, so both default to 1, as FACIL's). Q is the
vectorised Grad-CAM map, for the class b_i below, at the last feature map (the output of the
network's last convolutional stage, the map its features pool; TaskNetwork.last_feature_map):

    Q(x_i) = vec(ReLU(sum_k alpha_k A_k)),  alpha_k = mean over positions of d y_b / d A_k,

with A the layer's output (channels k, spatial positions) and y_b the logit of class b_i.
The reference is FACIL (mmasana/FACIL, src/approach/lwm.py), followed for the class choice,
the L1 distance per image and the mean over the batch, and for the old network's map from an
eval-mode pass. The L2 normalisation of each image's vectorised map (F.normalize, eps 1e-12)
is the paper's: FACIL's torch.norm(p=2, dim=1) acts on its maps' single channel axis, so it leaves
them unnormalised (which changes nothing there: its attention loss has no gradient, below).

Which class, across heads. A new task's image has no head among the old ones, so the class
is chosen from all of them: b_i is the argmax of the old network's logits of heads 0..t-1,
concatenated (raw logits, no softmax), and both maps are taken for that same class. This is
the paper's "base class with the highest score" read in Task-IL, where the base classes are
the old tasks' heads, and it is what FACIL's GradCAM does with its frozen model, whose heads
are exactly the old tasks'. Raw logits of separately trained heads are not calibrated
against each other, a looseness FACIL shares; the choice keeps one map per image, hence one
extra gradient pass per network whatever the number of old tasks (a map per old head would
cost t of them).

Where this departs from FACIL (knowingly):
- FACIL's attention maps are computed under no_grad from detached activations and gradients,
  so its attention loss is a constant with no gradient (FACIL issues #9 and #37: its LwM
  trains as LwF). Here the new network's map keeps its graph: the hook keeps the feature map
  attached and the Grad-CAM gradient is taken with torch.autograd.grad(create_graph=True), so
  the loss reaches the conv weights through the feature map and, second order, through the
  gradient weights alpha (the layers after the hooked map and the old heads).
- FACIL indexes `logits[:, class_indices]`, a batch x batch matrix, so each image's map is
  weighted by the summed gradients of every image's class; here each image gets its own
  class (the intent of both the paper and FACIL).
- FACIL's new-network map is for the new network's own argmax over all its heads, current
  one included; here it is for b_i, the old network's class, as the paper's loss compares
  the two networks' maps of one class.
- FACIL hooks its ResNet-32's last stage (`layer3`); here the map is the output of the
  last residual block (backbone/resnet.py: after its residual addition and ReLU), the same
  place in the network: rectified, as Grad-CAM's and the paper's final conv maps are.
- The knowledge distillation is LwF's, per old head (lwf.distillation_loss, --temperature,
  default 2); FACIL's is one cross-entropy over all old heads' logits concatenated, with
  probabilities raised to 1/2 (the same T = 2), the same gradient per logit within a head.
- As this framework's LwF, every parameter trains, old heads included; FACIL without
  exemplars trains only the shared layers and the newest head. No exemplars, no warm-up.

The old network's map comes from an eval-mode pass of the frozen copy (running statistics,
as in FACIL), like the targets LwF distils. The new network's map comes from the training
pass itself, the one that gives the cross-entropy and the distillation: the attention loss
compares the two networks as the distillation compares their logits. Nothing but pooling
and the heads follows the last feature map, so each image's class score depends on its own
map only, batch statistics or not. FACIL takes the new map in a separate eval-mode pass,
which costs nothing there (no gradient) but here would train the network as seen through
running statistics that lag the weights: with such a pass, the eval-mode network drifted
away from the trained one and tasks tested at chance right after they were learned. At the
first step of a task the two networks have equal weights, but not equal statistics (the
batch's against the stored ones), so the attention loss starts near, not at, zero.

Cost: on top of LwF's step (the frozen copy's forward), a backward of the frozen copy from
its logits to the last feature map, and the new network's Grad-CAM gradient (through the
pooling and the old heads only) with its graph kept, which the step's backward runs through
(utils/benchmark.py --model lwm measures it).

The frozen copy exists only while a task is trained and is dropped at end_task (LwF's
begin_task, train and end_task), so between tasks, where memory is reported and checkpoints
are taken, the method holds the network alone: memory_breakdown and checkpoint_state are the
network's, and a resumed run rebuilds the copy at begin_task from the restored network.
Per-task BatchNorm is refused, as in LwF (every old head reads the same features).
"""
from __future__ import annotations

import argparse
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from backbone.contract import TaskNetwork
from datasets.continual_dataset import SequentialDataset
from models.lwf import Lwf, heads_logits
from utils.validators import non_negative_float, positive_float


class GradCam(NamedTuple):
    maps: torch.Tensor  # batch x H x W attention maps
    logits: list[torch.Tensor]  # the heads' logits from the same pass
    classes: torch.Tensor  # each image's class, an index into the heads' concatenated logits


def attention_map(feature_map: torch.Tensor, gradient: torch.Tensor) -> torch.Tensor:
    """Grad-CAM, batch x H x W: ReLU(sum_k alpha_k A_k), with alpha_k the spatial mean of the
    class score's gradient with respect to channel k of the feature map A (batch x k x H x W)."""
    weights = gradient.mean(dim=(2, 3), keepdim=True)
    return F.relu((weights * feature_map).sum(dim=1))


def attention_distillation_loss(new_maps: torch.Tensor, old_maps: torch.Tensor) -> torch.Tensor:
    """Batch mean of the L1 distance between each image's L2-normalised, vectorised maps."""
    new = F.normalize(new_maps.flatten(1).float(), p=2, dim=1, eps=1e-12)
    old = F.normalize(old_maps.flatten(1).float(), p=2, dim=1, eps=1e-12)
    return (new - old).abs().sum(dim=1).mean()


def forward_with_map(net: TaskNetwork, layer: nn.Module, x: torch.Tensor,
                     n_heads: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """`layer`'s output and the logits of heads 0..n_heads-1, from one pass in the network's
    current mode. The output stays in the graph; on a frozen network it is made a leaf that
    requires grad, so a class score's gradient with respect to it exists."""
    captured = []

    def hook(_module, _inputs, output):
        if not output.requires_grad:
            output.requires_grad_()
        captured.append(output)

    handle = layer.register_forward_hook(hook)
    try:
        logits = heads_logits(net, x, n_heads)
    finally:
        handle.remove()
    (feature_map,) = captured
    return feature_map, logits


def class_attention(feature_map: torch.Tensor, logits: list[torch.Tensor], classes: torch.Tensor,
                    create_graph: bool = False) -> torch.Tensor:
    """Each image's Grad-CAM map of `feature_map` for its class, an index into the heads'
    concatenated `logits`; with `create_graph` the maps keep their graph (into the weights
    through the feature map and through the gradient)."""
    scores = torch.cat(logits, dim=1)
    # Each image's score depends on its own feature map only (the layers after the map do
    # not mix images), so the gradient of the sum gives every image its own class's gradient.
    chosen = scores.gather(1, classes[:, None]).sum()
    (gradient,) = torch.autograd.grad(chosen, feature_map, create_graph=create_graph)
    return attention_map(feature_map, gradient)


def grad_cam(net: TaskNetwork, layer: nn.Module, x: torch.Tensor, n_heads: int) -> GradCam:
    """Grad-CAM maps at `layer`'s output, each image for the class among heads 0..n_heads-1
    the network scores highest, without graph (the frozen copy's side of the loss)."""
    with torch.enable_grad():  # also under an outer no_grad (the maps need a gradient)
        feature_map, logits = forward_with_map(net, layer, x, n_heads)
        classes = torch.cat(logits, dim=1).detach().argmax(dim=1)
        maps = class_attention(feature_map, logits, classes)
    return GradCam(maps.detach(), [z.detach() for z in logits], classes)


class Lwm(Lwf):
    NAME = "lwm"
    SHARED_BN_REASON = "distils every old head and its attention from the same features"
    # No tuned LwM values exist for these benchmarks (the paper gives no beta and gamma; FACIL
    # defaults both to 1, and its grid search starts from beta 2, gamma 1): the options LwM
    # shares with LwF take mammoth's LwF values (aimagelab/mammoth, utils/best_args.py; its
    # distillation weight alpha as beta), gamma FACIL's 1 (mmasana/FACIL, src/approach/lwm.py,
    # gridsearch_config.py).
    BEST_CONFIGS = {dataset: {**{k: v for k, v in config.items() if k != "alpha"},
                              "beta": config["alpha"], "gamma": 1.0}
                    for dataset, config in Lwf.BEST_CONFIGS.items()}

    @staticmethod
    def add_arguments(parser: argparse._ActionsContainer) -> None:
        parser.add_argument("--beta", type=non_negative_float, default=1.0,
                            help="weight of the distillation loss of the old heads")
        parser.add_argument("--gamma", type=non_negative_float, default=1.0,
                            help="weight of the attention-distillation loss (Grad-CAM maps "
                                 "of the last feature map)")
        parser.add_argument("--temperature", type=positive_float, default=2.0,
                            help="softmax temperature of the distillation")

    def __init__(self, net, dataset: SequentialDataset, args: argparse.Namespace) -> None:
        super().__init__(net, dataset, args)
        self.gradcam_layer = self.net.last_feature_map()  # its name, in both networks

    def old_attention(self, x: torch.Tensor, task: int) -> GradCam:
        """The frozen copy's maps, old heads' logits and each image's class (no graph)."""
        return grad_cam(self.old_net, self.old_net.get_submodule(self.gradcam_layer), x, task)

    def task_losses(self, x: torch.Tensor, y: torch.Tensor,
                    task: int) -> tuple[torch.Tensor, torch.Tensor]:
        """LwF's loss and the attention-distillation loss on a batch of task `task` > 0, from
        one pass of the network in its current mode."""
        old = self.old_attention(x, task)
        layer = self.net.get_submodule(self.gradcam_layer)
        feature_map, logits = forward_with_map(self.net, layer, x, task + 1)
        maps = class_attention(feature_map, logits[:task], old.classes, create_graph=True)
        return (self.lwf_loss(logits, y, task, old.logits, self.args.beta),
                attention_distillation_loss(maps, old.maps))

    def observe(self, x: torch.Tensor, y: torch.Tensor, task: int | torch.Tensor) -> torch.Tensor:
        if task == 0:
            logits = heads_logits(self.net, x, 1)
            return self.optimizer_step(self.lwf_loss(logits, y, 0, [], self.args.beta))
        distillation, attention = self.task_losses(x, y, task)
        return self.optimizer_step(distillation + self.args.gamma * attention)
