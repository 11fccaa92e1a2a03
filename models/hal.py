"""Hindsight Anchor Learning (Chaudhry et al., AAAI 2021), after mammoth's implementation
(aimagelab/mammoth, models/hal.py), with Task-IL heads.

Training step (`observe`): experience replay on the current batch together with a batch
drawn from a ring buffer (an equal share of the slots per task, `utils.buffer.RingBuffer`, as
mammoth's HAL), every sample classified by its own task's head. Once anchors exist:

1. a temporary SGD step on the replay loss: theta~ = theta - lr * grad l(theta);
2. the anchors' outputs under theta~ become fixed targets, and the network steps from theta
   on  l(theta) + hal_lambda * mean over anchors and classes of (f_theta~(e) - f_theta(e))^2,
   each anchor scored through its own task's head (mammoth restores the weights from before
   the first step, keeps the replay gradient and adds the anchor loss's before stepping).

After the step, phi <- beta * phi + (1 - beta) * (mean feature vector of the current batch
under the new weights); phi starts at zero in every task.

End of task (phase "anchors"): a spare copy of the weights theta_t is fine-tuned on the
buffer (--finetuning_steps SGD steps on --batch_size buffer samples at --lr) to theta_M.
Then one anchor per class c of the task, e ~ U[0, 1) of an image's shape, takes
--steps_on_anchors SGD steps (lr --lr) on

    -CE(f_theta_M(e), c) + CE(f_theta_t(e), c) + gamma * ||features_theta_t(e) - phi||^2

(the input whose loss fine-tuning on the past, a proxy for forgetting, raises the most, kept
near the task's mean embedding). Anchors are float images kept with their task id and class;
they, the buffer and the network are the memory between tasks. phi and the spare weights
exist only within a task, so the between-task memory does not count them.

Where this differs from mammoth's code:
- Its extra forward passes (the anchors twice per step, the batch again for phi) run in
  training mode, so they also move BatchNorm's running statistics, twice of the four moves
  per step towards the synthetic anchors. By default they normalise with the batch's own
  statistics as there, but leave the running statistics to the training batches (same
  losses, unpolluted test-time statistics); --bn_updates mammoth lets them move the running
  statistics as there, in its order, and --model_config best takes it, as it takes mammoth's
  other arguments. (Its anchor learning runs a spare network with buffers of its own, so
  there the running statistics stay untouched in both.)
- The temporary step is plain SGD (the paper's theta~), and the optimizer steps once per
  batch: with --optim_mom or --optim_wd, mammoth's two optimizer steps would apply momentum
  and weight decay to the discarded step too. Without them (its best arguments) the two agree.
- All anchors of a task are learned at once: `torch.func.vmap` scores each anchor as its
  own batch of one, as mammoth's per-class loop does (BatchNorm uses that one image's
  statistics), so the gradients are the same as the loop's.
- mammoth's `finetuning_epochs` (best arguments) fine-tunes on one buffer batch per "epoch";
  here the option says what it counts: --finetuning_steps.
- Mammoth's single head scores anchors over all classes; here each anchor uses its own task's
  head, as every replayed sample does; each logit's change is weighted as in mammoth's mean
  over all classes (replay.single_head_mse), so hal_lambda carries over.
- Anchors are images in [0, 1], standardised inside the network when the dataset's inputs
  are. Mammoth draws U[0, 1) in its standardised input space (its seq-cifar10 standardises)
  and takes its SGD steps there: here the initial anchors span the pixel range, and with
  standardised inputs a step of the same lr moves an anchor 1 / std^2 times as far in that
  space.
"""
from __future__ import annotations

import argparse
from contextlib import AbstractContextManager, nullcontext

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call, vmap

from backbone.contract import TaskNetwork
from datasets.continual_dataset import SequentialDataset, TaskData
from models.continual_model import batch_statistics
from models.replay import ReplayModel, single_head_mse, with_replay
from utils.buffer import RingBuffer
from utils.context import TrainingContext
from utils.errors import UserError
from utils.sizes import tensor_bytes
from utils.validators import non_negative_float, non_negative_int

Params = dict[str, torch.Tensor]
# Columns of `anchor_terms`, as result_details reports them.
ANCHOR_TERMS = ("ce_current", "ce_finetuned", "phi_distance")


class _Scorer(nn.Module):
    """A network's features and logits in one call, for functional_call with other weights;
    it calls the network's methods, never its (possibly compiled) forward."""

    def __init__(self, net: TaskNetwork) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor,
                task: int | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.net.features(x, task)
        return features, self.net.task_logits(features, task)


def score(net: TaskNetwork, params: Params | None, x: torch.Tensor,
          task: int | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Features and logits of `x` under `params` (the network's own parameters when None;
    buffers are always the network's)."""
    scorer = _Scorer(net)
    if params is None:
        return scorer(x, task)
    return functional_call(scorer, {f"net.{name}": p for name, p in params.items()}, (x, task))


def temporary_step(net: nn.Module, lr: float) -> Params:
    """theta~ = theta - lr * grad: one plain SGD step on the gradients in .grad, as new
    tensors (parameters without a gradient stay as they are); the network is not changed."""
    with torch.no_grad():
        named = [(name, p) for name, p in net.named_parameters()]
        stepped = [(name, p) for name, p in named if p.grad is not None]
        moved = torch._foreach_add([p for _, p in stepped], [p.grad for _, p in stepped],
                                   alpha=-lr) if stepped else []
        params = {name: p.detach() for name, p in named}
        params.update({name: q for (name, _), q in zip(stepped, moved)})
    return params


def preservation_loss(net: TaskNetwork, stepped: Params, anchors: torch.Tensor,
                      anchor_tasks: torch.Tensor, hal_lambda: float,
                      n_classes: int) -> torch.Tensor:
    """hal_lambda * (f_stepped(e) - f(e))^2 summed over anchors and their task's classes and
    divided by anchors x n_classes (mammoth's weight per logit, replay.single_head_mse), each
    anchor through its own task's head; differentiable in the network's own parameters."""
    with torch.no_grad():
        target = score(net, stepped, anchors, anchor_tasks)[1]
    return hal_lambda * single_head_mse(score(net, None, anchors, anchor_tasks)[1], target,
                                        n_classes)


def anchor_terms(net: TaskNetwork, finetuned: Params, current: Params, anchors: torch.Tensor,
                 labels: torch.Tensor, task: int, phi: torch.Tensor) -> torch.Tensor:
    """Per anchor (rows), ANCHOR_TERMS (columns): CE of its class under the current weights,
    under the fine-tuned ones, and the squared distance of its current features to phi. Each
    anchor is its own batch of one (vmap), so BatchNorm with batch statistics sees only it."""
    def one(e: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        _, logits_finetuned = score(net, finetuned, e.unsqueeze(0), task)
        features, logits = score(net, current, e.unsqueeze(0), task)
        target = label.unsqueeze(0)
        return torch.stack((F.cross_entropy(logits, target),
                            F.cross_entropy(logits_finetuned, target),
                            (features[0] - phi).pow(2).sum()))
    return vmap(one)(anchors, labels)


def anchor_objective(terms: torch.Tensor, gamma: float) -> torch.Tensor:
    """Each anchor's loss from its `anchor_terms`: CE_current - CE_finetuned + gamma * dist."""
    return terms[:, 0] - terms[:, 1] + gamma * terms[:, 2]


def ema(phi: torch.Tensor | None, value: torch.Tensor, beta: float) -> torch.Tensor:
    """beta * phi + (1 - beta) * value, with phi = 0 before the first value."""
    if phi is None:
        return (1 - beta) * value
    return beta * phi + (1 - beta) * value


class Hal(ReplayModel):
    NAME = "hal"
    # mammoth's best arguments with a 500-image buffer (aimagelab/mammoth, utils/best_args.py,
    # best_args['seq-cifar10']['hal'][500]; its finetuning_epochs is --finetuning_steps here).
    # It has none for seq-tinyimg: the DER paper, whose grid search they are, ran HAL on
    # seq-cifar10 and the MNIST benchmarks only.
    BEST_CONFIGS = {
        "seq-cifar10": dict(lr=0.03, minibatch_size=32, batch_size=32, n_epochs=50,
                            hal_lambda=0.1, beta=0.3, gamma=0.1, steps_on_anchors=100,
                            finetuning_steps=1, bn_updates="mammoth"),
    }

    @staticmethod
    def add_arguments(parser: argparse._ActionsContainer) -> None:
        ReplayModel.add_arguments(parser)
        parser.add_argument("--hal_lambda", type=non_negative_float, default=0.1,
                            help="weight of the anchors' squared output change")
        parser.add_argument("--beta", type=non_negative_float, default=0.5,
                            help="EMA decay of phi, the running mean of the batch features "
                                 "(0 to 1)")
        parser.add_argument("--gamma", type=non_negative_float, default=0.1,
                            help="weight of an anchor's squared feature distance to phi")
        parser.add_argument("--steps_on_anchors", type=non_negative_int, default=100,
                            help="SGD steps (at --lr) that learn each task's anchors")
        parser.add_argument("--finetuning_steps", type=non_negative_int, default=1,
                            help="SGD steps (at --lr, --batch_size buffer samples each) that "
                                 "fine-tune the spare copy on the buffer before the anchors "
                                 "are learned (mammoth's finetuning_epochs)")
        parser.add_argument("--bn_updates", choices=("training", "mammoth"), default="training",
                            help="which passes of a step move BatchNorm's running statistics: "
                                 "the training batch's alone, or also the anchors' two and "
                                 "phi's, as mammoth's code")

    def __init__(self, net: TaskNetwork, dataset: SequentialDataset,
                 args: argparse.Namespace) -> None:
        if args.buffer_size < dataset.N_TASKS:
            raise UserError(f"{self.NAME} gives each task an equal share of the buffer, so "
                            f"--buffer_size must be at least the {dataset.N_TASKS} tasks")
        if args.beta > 1:
            raise UserError(f"--beta {args.beta} is out of range, it must be between 0 and 1")
        super().__init__(net, dataset, args)
        self.buffer = RingBuffer(args.buffer_size, dataset.N_TASKS,
                                 channels_last=bool(args.channels_last))
        self.classes_per_task = dataset.N_CLASSES_PER_TASK
        self.phi: torch.Tensor | None = None
        # Anchors (float images), their task ids and classes, in the order learned.
        self.anchors: torch.Tensor | None = None
        self.anchor_t: torch.Tensor | None = None
        self.anchor_y: torch.Tensor | None = None
        # Per finished task: the mean of each ANCHOR_TERMS column at the last anchor step.
        self.anchor_log: list[dict[str, float]] = []

    def begin_task(self, task: int, data: TaskData) -> None:
        super().begin_task(task, data)
        self.phi = None

    def observe(self, x: torch.Tensor, y: torch.Tensor, task: int,
                raw: torch.Tensor) -> torch.Tensor:
        """Replay step, with the anchors' preservation once there are anchors (module
        docstring); then phi's update and the batch offered to the buffer."""
        inputs, labels, tasks = with_replay(x, y, task, self.replay())
        self.optimizer.zero_grad(set_to_none=True)
        loss = F.cross_entropy(self.net(inputs, tasks), labels)
        loss.backward()
        if self.anchors is not None:
            stepped = temporary_step(self.net, self.optimizer.param_groups[0]["lr"])
            with self.extra_pass_statistics():
                anchor_loss = preservation_loss(self.net, stepped, self.anchors, self.anchor_t,
                                                self.args.hal_lambda, self.n_classes)
            anchor_loss.backward()
            loss = loss + anchor_loss
        self.adjust_gradients()
        self.step_optimizer()
        self.update_phi(x, task)
        self.store(raw, y, task)
        return loss.detach()

    def extra_pass_statistics(self) -> AbstractContextManager:
        """How the anchors' and phi's passes of a step use BatchNorm: on their batch's own
        statistics either way; the running statistics untouched, or (--bn_updates mammoth)
        moved by each pass as in training."""
        if self.args.bn_updates == "mammoth":
            return nullcontext()
        return batch_statistics(self.net)

    def update_phi(self, x: torch.Tensor, task: int) -> None:
        """phi <- beta * phi + (1 - beta) * the batch's mean features under the current
        weights (BatchNorm on the batch's statistics; see extra_pass_statistics)."""
        with torch.no_grad(), self.extra_pass_statistics():
            features = self.net.features(x, task)
            features = features.to(torch.promote_types(features.dtype, torch.float32)).mean(0)
        self.phi = ema(self.phi, features, self.args.beta)

    def end_task(self, task: int, data: TaskData, ctx: TrainingContext) -> None:
        with ctx.phase("anchors"):
            self.learn_anchors(task, data, ctx)
        self.buffer.next_task()
        self.phi = None

    def finetune_on_buffer(self, ctx: TrainingContext) -> Params:
        """theta_M: a copy of the weights after --finetuning_steps SGD steps on buffer samples
        (each through its own task's head); the network itself is left as it is."""
        params = {name: p.detach().clone().requires_grad_()
                  for name, p in self.net.named_parameters()}
        optimizer = torch.optim.SGD(params.values(), lr=self.args.lr)
        for _ in range(ctx.steps(self.args.finetuning_steps)):
            past = self.buffer.sample(self.args.batch_size)
            optimizer.zero_grad(set_to_none=True)
            F.cross_entropy(score(self.net, params, past.x, past.t)[1], past.y).backward()
            optimizer.step()
        return {name: p.detach() for name, p in params.items()}

    def learn_anchors(self, task: int, data: TaskData, ctx: TrainingContext) -> None:
        """One anchor per class of `task`, all learned together on the device (module
        docstring); appended with their task id and class."""
        if self.phi is None:
            raise RuntimeError("HAL learns anchors after a task's training steps, which set phi")
        device = data.x.device
        current = {name: p.detach() for name, p in self.net.named_parameters()}
        labels = torch.arange(self.classes_per_task, device=device)
        anchors = torch.rand((self.classes_per_task, *data.x.shape[1:]), device=device)
        if self.args.channels_last:
            anchors = anchors.contiguous(memory_format=torch.channels_last)
        anchors.requires_grad_()
        optimizer = torch.optim.SGD([anchors], lr=self.args.lr)
        terms = None
        with batch_statistics(self.net):
            finetuned = self.finetune_on_buffer(ctx)
            for _ in range(ctx.steps(self.args.steps_on_anchors)):
                optimizer.zero_grad(set_to_none=True)
                terms = anchor_terms(self.net, finetuned, current, anchors, labels, task,
                                     self.phi)
                anchor_objective(terms, self.args.gamma).sum().backward()
                optimizer.step()
        if terms is not None:  # one transfer per task, after the steps
            means = terms.detach().mean(0).tolist()
            self.anchor_log.append({"task": task, **dict(zip(ANCHOR_TERMS, means))})
        self._append_anchors(anchors.detach(), torch.full_like(labels, task), labels)

    def _append_anchors(self, anchors: torch.Tensor, tasks: torch.Tensor,
                        labels: torch.Tensor) -> None:
        if self.anchors is None:
            self.anchors, self.anchor_t, self.anchor_y = anchors, tasks, labels
        else:
            self.anchors = torch.cat((self.anchors, anchors))
            self.anchor_t = torch.cat((self.anchor_t, tasks))
            self.anchor_y = torch.cat((self.anchor_y, labels))

    def memory_breakdown(self) -> dict[str, int]:
        """The network, the buffer and the anchors (float images, task ids, classes)."""
        anchors = [a for a in (self.anchors, self.anchor_t, self.anchor_y) if a is not None]
        return {**super().memory_breakdown(), "anchors": tensor_bytes(anchors)}

    def result_details(self) -> dict:
        return {"anchor_terms": self.anchor_log}

    def checkpoint_state(self) -> dict:
        return {**super().checkpoint_state(), "anchors": self.anchors,
                "anchor_t": self.anchor_t, "anchor_y": self.anchor_y,
                "anchor_log": self.anchor_log}

    def load_checkpoint_state(self, state: dict) -> None:
        super().load_checkpoint_state(state)
        self.anchors, self.anchor_t = state["anchors"], state["anchor_t"]
        self.anchor_y, self.anchor_log = state["anchor_y"], list(state["anchor_log"])
