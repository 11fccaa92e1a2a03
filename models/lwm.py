"""Learning without Memorizing (Dhar et al., CVPR 2019) with Task-IL heads.

LwF (models/lwf.py) plus an attention-distillation loss. While task t > 0 is learned, a frozen
copy of the network taken at begin_task (as in LwF) is the teacher, and each training batch
costs

    CE(head_t(x), y)
        + beta  * sum_{j<t} KL(softmax(old_head_j(x) / T) || softmax(head_j(x) / T))
        + gamma * mean_i || Q_old(x_i) / ||Q_old(x_i)||_2 - Q_new(x_i) / ||Q_new(x_i)||_2 ||_1

(the paper's beta and gamma; it gives no values, so both default to 1, as FACIL's). Q is the
vectorised Grad-CAM map, for the class b_i below, at the last conv layer:

    Q(x_i) = vec(ReLU(sum_k alpha_k A_k)),  alpha_k = mean over positions of d y_b / d A_k,

with A the layer's output (channels k, spatial positions) and y_b the logit of class b_i.
The reference is FACIL (mmasana/FACIL, src/approach/lwm.py), followed for the class choice,
the L1 distance per image and the mean over the batch, and for computing both maps in eval
mode. The L2 normalisation of each image's vectorised map (F.normalize, eps 1e-12) is the
paper's: FACIL's torch.norm(p=2, dim=1) acts on its maps' single channel axis, so it leaves
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
  gradient weights alpha (the layers after the hooked conv and the old heads).
- FACIL indexes `logits[:, class_indices]`, a batch x batch matrix, so each image's map is
  weighted by the summed gradients of every image's class; here each image gets its own
  class (the intent of both the paper and FACIL).
- FACIL's new-network map is for the new network's own argmax over all its heads, current
  one included; here it is for b_i, the old network's class, as the paper's loss compares
  the two networks' maps of one class.
- FACIL hooks a whole residual stage (`layer3` of its ResNet-32, after the block's ReLU). The
  TaskNetwork contract offers the conv layers (net.conv_layers(), in forward order), so the
  hook is on the last of them: in backbone/resnet.py the last block's conv2, before its
  BatchNorm, residual addition and ReLU.
- The knowledge distillation is LwF's, per old head (lwf.distillation_loss, --temperature,
  default 2); FACIL's is one cross-entropy over all old heads' logits concatenated, with
  probabilities raised to 1/2 (the same T = 2), the same gradient per logit within a head.
- As this framework's LwF, every parameter trains, old heads included; FACIL without
  exemplars trains only the shared layers and the newest head. No exemplars, no warm-up.

Both maps come from eval-mode passes, BatchNorm with running statistics, as in FACIL: in
training mode the BatchNorm right after the hooked conv would couple the images (its batch
statistics make each channel's gradient sum to zero over the batch, centring the weights
alpha across images). The new network therefore runs twice per step: an eval-mode pass for
its attention map (it leaves the running statistics alone), then the training-mode pass for
the cross-entropy and the distillation. At the first step of a task the two networks are
equal and so are their maps (zero loss). With --bn_running_stats 0, BatchNorm uses the
batch's statistics even in eval mode, and each map then depends on the batch (not refused).

Cost: on top of LwF's step (the frozen copy's forward), a backward of the frozen copy from
its logits to the hooked layer, a second (eval-mode) forward of the new network, the Grad-CAM
gradient through the layers after the hooked conv with its graph kept, and a backward that
runs through both of the new network's graphs: a step costs clearly more than LwF's and
sgd's (utils/benchmark.py measures it; not measured here).

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


def grad_cam(net: TaskNetwork, layer: nn.Module, x: torch.Tensor, n_heads: int,
             classes: torch.Tensor | None = None, create_graph: bool = False) -> GradCam:
    """Grad-CAM maps at `layer`'s output for one class per image among heads 0..n_heads-1.

    `classes` index the heads' concatenated logits; by default each image's highest. Runs in
    the network's current mode. With `create_graph` the maps keep their graph (into the
    network's weights, through the feature map and through the gradient); without it, on a
    frozen network, the feature map is made a leaf that requires grad so its gradient exists.
    """
    captured = []

    def hook(_module, _inputs, output):
        if not output.requires_grad:  # frozen network: differentiate from the map itself
            output.requires_grad_()
        captured.append(output)

    handle = layer.register_forward_hook(hook)
    with torch.enable_grad():  # also under an outer no_grad (the maps need a gradient)
        try:
            logits = heads_logits(net, x, n_heads)
        finally:
            handle.remove()
        (feature_map,) = captured
        scores = torch.cat(logits, dim=1)
        if classes is None:
            classes = scores.detach().argmax(dim=1)
        # Each image's score depends on its own feature map only (eval-mode BatchNorm), so
        # the gradient of the sum gives every image the gradient of its own class.
        chosen = scores.gather(1, classes[:, None]).sum()
        (gradient,) = torch.autograd.grad(chosen, feature_map, create_graph=create_graph)
        maps = attention_map(feature_map, gradient)
    if not create_graph:
        maps, logits = maps.detach(), [z.detach() for z in logits]
    return GradCam(maps, logits, classes)


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
                                 "at the last conv layer)")
        parser.add_argument("--temperature", type=positive_float, default=2.0,
                            help="softmax temperature of the distillation")

    def __init__(self, net, dataset: SequentialDataset, args: argparse.Namespace) -> None:
        super().__init__(net, dataset, args)
        self.gradcam_layer = list(self.conv_layers())[-1]  # its name, in both networks

    def old_attention(self, x: torch.Tensor, task: int) -> GradCam:
        """The frozen copy's maps, old heads' logits and each image's class (no graph)."""
        return grad_cam(self.old_net, self.old_net.get_submodule(self.gradcam_layer), x, task)

    def new_attention(self, x: torch.Tensor, task: int, classes: torch.Tensor) -> torch.Tensor:
        """The live network's maps for `classes` among heads 0..task-1, in eval mode, with
        their graph (the attention loss backpropagates into the network)."""
        was_training = self.net.training
        self.net.eval()
        try:
            return grad_cam(self.net, self.net.get_submodule(self.gradcam_layer), x, task,
                            classes, create_graph=True).maps
        finally:
            self.net.train(was_training)

    def attention_loss(self, x: torch.Tensor, task: int) -> tuple[torch.Tensor, list]:
        """The attention-distillation loss on `x` while `task` is learned, and the frozen
        copy's logits of the old heads (the distillation targets, from the same pass)."""
        old = self.old_attention(x, task)
        new_maps = self.new_attention(x, task, old.classes)
        return attention_distillation_loss(new_maps, old.maps), old.logits

    def observe(self, x: torch.Tensor, y: torch.Tensor, task: int | torch.Tensor) -> torch.Tensor:
        if task == 0:
            return self.optimizer_step(self.lwf_loss(x, y, task, [], self.args.beta))
        # the maps before the training-mode pass, as FACIL (running statistics unmoved)
        attention, targets = self.attention_loss(x, task)
        loss = self.lwf_loss(x, y, task, targets, self.args.beta)
        return self.optimizer_step(loss + self.args.gamma * attention)
