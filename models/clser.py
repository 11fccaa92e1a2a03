"""CLS-ER (Arani, Sarfraz and Zonooz, ICLR 2022, "Learning Fast, Learning Slow: a General
Continual Learning Method based on Complementary Learning System").

Experience Replay (a reservoir buffer, models/replay.py) with two semantic memories: a
plastic and a stable copy of the working network, each an exponential moving average of its
weights, updated after an optimisation step with probability --plastic_model_update_freq /
--stable_model_update_freq and decay --plastic_model_alpha / --stable_model_alpha. On each
replayed sample, the working network's logits are pulled (MSE, weighted by --reg_weight)
towards the logits of whichever memory gives the sample's true class the higher probability.
The task loss is cross-entropy on the current batch and the replayed batch together.

Followed from the authors' code (NeurAI-Lab/CLS-ER, models/clser.py, a mammoth fork):
- the EMA update is ema = a * ema + (1 - a) * w with a = min(1 - 1 / (step + 1), alpha), step
  the number of optimisation steps so far over the whole run (never reset between tasks), so
  early updates average rather than forget the start; it covers the parameters only: the
  copies' BatchNorm running statistics are their own, gathered by their forward passes;
- every step draws the plastic then the stable decision from torch's global CPU generator
  (both always drawn, so the stream of draws does not depend on the outcomes), after the step
  and after the batch is offered to the buffer;
- the memories run in the module's mode: in training, BatchNorm normalises the replayed batch
  with its own statistics and updates the copy's running statistics, as in the reference
  (whose copies stay in train mode while training);
- the working network sees the replayed batch twice, as the reference: alone for the
  consistency loss, and together with the current batch for the cross-entropy;
- per sample the stable memory is chosen when its true-class probability is strictly higher,
  the plastic one otherwise (ties included);
- SGD without momentum and the best arguments of its utils/best_args.py for a 500-image
  buffer (BEST_CONFIGS).

Option defaults: --reg_weight 0.1 is the reference parser's; the memories' defaults are
those of its seq-mnist runs (its shortest tasks: stable 0.9 / 0.99, plastic 1.0 / 0.99), not
its parser's (stable 0.7 / 0.999, plastic 0.9 / 0.999, which no published run uses): with
seq-synthetic's 70 steps per task, a 0.999 decay leaves the stable memory, which predicts,
too far behind the task just learnt (seed 0 and 1 at nf 12: diagonal down to 57% and 53%,
against 79% and 93% with these).

Departures:
- Task-IL, multi-head: every sample, current or replayed, goes through its own task's head
  in all three networks, and the memories' probabilities are a softmax over that head (the
  reference trains one single-head class-IL network and gets Task-IL numbers by masking).
  The consistency loss compares the own head's logits only, each weighted as in the
  reference's mean over all classes (replay.single_head_mse), so --reg_weight carries over.
- Inference uses the stable memory, as in the paper, which reports the stable model. The
  reference evaluates all three networks after each task and logs them separately (its
  main log is the working network's, the others are suffixed _stable_model /
  _plastic_model); here the run logs the working network and the plastic memory too and
  reports their accuracy matrices under `other_predictors`. With fewer steps per task than
  the stable memory's horizon (1 / (freq * (1 - alpha)): 10,000 steps on seq-cifar10) it
  lags the task just learnt, and the working network shows by how much.
- The memories' forward passes run without gradients (the reference builds and drops their
  graphs; same values).
- With --compile only the working network is compiled; the memories run eager.
"""
from __future__ import annotations

import argparse
import copy

import torch
import torch.nn as nn
import torch.nn.functional as F

from backbone.contract import TaskNetwork
from datasets.continual_dataset import SequentialDataset
from models.replay import ReplayModel, single_head_mse, with_replay
from utils.buffer import ReplaySample
from utils.sizes import network_bytes
from utils.validators import fraction, non_negative_float

MEMORIES = ("plastic", "stable")


def ema_decay(step: int, alpha: float) -> float:
    """The reference's decay at global step `step` (>= 1): 1 - 1/(step + 1) while that is
    below alpha (a running mean of the first weights), alpha afterwards."""
    return min(1.0 - 1.0 / (step + 1), alpha)


@torch.no_grad()
def ema_update(ema: nn.Module, net: nn.Module, decay: float) -> None:
    """ema = decay * ema + (1 - decay) * net, parameter by parameter (buffers untouched)."""
    ema_params = list(ema.parameters())
    params = list(net.parameters())
    torch._foreach_mul_(ema_params, decay)
    torch._foreach_add_(ema_params, params, alpha=1.0 - decay)


def semantic_targets(stable_logits: torch.Tensor, plastic_logits: torch.Tensor,
                     labels: torch.Tensor) -> torch.Tensor:
    """Per sample, the logits of the memory that gives its true class the higher softmax
    probability: the stable one when strictly higher, the plastic one otherwise."""
    index = labels[:, None]
    stable = stable_logits.float().softmax(1).gather(1, index)
    plastic = plastic_logits.float().softmax(1).gather(1, index)
    return torch.where(stable > plastic, stable_logits, plastic_logits)


def consistency_loss(logits: torch.Tensor, stable_logits: torch.Tensor,
                     plastic_logits: torch.Tensor, labels: torch.Tensor,
                     n_classes: int) -> torch.Tensor:
    """Squared error between the working network's logits and the chosen memory's, each
    logit weighted as in mammoth's mean over all n_classes (replay.single_head_mse)."""
    targets = semantic_targets(stable_logits, plastic_logits, labels)
    return single_head_mse(logits, targets, n_classes)


class Clser(ReplayModel):
    NAME = "clser"
    # The authors' best arguments with a 500-image buffer (NeurAI-Lab/CLS-ER,
    # utils/best_args.py; seq-tinyimg with the lr of its later commit "added the new
    # parameters for tinyimagenet", 0.05).
    BEST_CONFIGS = {
        "seq-cifar10": dict(reg_weight=0.15, stable_model_update_freq=0.1,
                            stable_model_alpha=0.999, plastic_model_update_freq=0.9,
                            plastic_model_alpha=0.999, lr=0.1, minibatch_size=32,
                            batch_size=32, n_epochs=50),
        "seq-tinyimg": dict(reg_weight=0.1, stable_model_update_freq=0.05,
                            stable_model_alpha=0.999, plastic_model_update_freq=0.08,
                            plastic_model_alpha=0.999, lr=0.05, minibatch_size=32,
                            batch_size=32, n_epochs=50),
    }

    @staticmethod
    def add_arguments(parser: argparse._ActionsContainer) -> None:
        ReplayModel.add_arguments(parser)
        # Defaults (module docstring): the reference parser's weight, the memories of its
        # seq-mnist runs.
        parser.add_argument("--reg_weight", type=non_negative_float, default=0.1,
                            help="weight of the consistency (MSE) loss on buffer samples")
        parser.add_argument("--stable_model_update_freq", type=fraction, default=0.9,
                            help="probability of updating the stable memory after a step")
        parser.add_argument("--stable_model_alpha", type=fraction, default=0.99,
                            help="EMA decay of the stable memory")
        parser.add_argument("--plastic_model_update_freq", type=fraction, default=1.0,
                            help="probability of updating the plastic memory after a step")
        parser.add_argument("--plastic_model_alpha", type=fraction, default=0.99,
                            help="EMA decay of the plastic memory")

    def __init__(self, net: TaskNetwork, dataset: SequentialDataset,
                 args: argparse.Namespace) -> None:
        super().__init__(net, dataset, args)
        # Submodules: moved, switched train/eval and saved (state_dict) with the model; the
        # optimizer only ever gets self.net's parameters.
        self.plastic_model = self._copy(net)
        self.stable_model = self._copy(net)
        self.update_freq = {"plastic": args.plastic_model_update_freq,
                            "stable": args.stable_model_update_freq}
        self.alpha = {"plastic": args.plastic_model_alpha, "stable": args.stable_model_alpha}
        self.global_step = 0
        self.updates = {name: 0 for name in MEMORIES}

    @staticmethod
    def _copy(net: TaskNetwork) -> TaskNetwork:
        memory = copy.deepcopy(net)  # a compiled net's copy is eager (nn.Module.compile)
        return memory.requires_grad_(False)

    def memory(self, name: str) -> TaskNetwork:
        return self.plastic_model if name == "plastic" else self.stable_model

    def predictor(self) -> TaskNetwork:
        """The stable memory predicts (forward, evaluation)."""
        return self.stable_model

    def other_predictors(self) -> dict[str, TaskNetwork]:
        """The working network and the plastic memory, evaluated beside the stable one as
        the reference does."""
        return {"working": self.net, "plastic": self.plastic_model}

    def observe(self, x: torch.Tensor, y: torch.Tensor, task: int,
                raw: torch.Tensor) -> torch.Tensor:
        past = self.replay()
        if past is None:
            loss = F.cross_entropy(self.net(x, task), y)
        else:
            regulariser = self.args.reg_weight * self.replay_consistency(past)
            inputs, labels, tasks = with_replay(x, y, task, past)
            loss = F.cross_entropy(self.net(inputs, tasks), labels) + regulariser
        loss = self.optimizer_step(loss)
        self.store(raw, y, task)
        self.global_step += 1
        self.update_memories()
        return loss

    def replay_consistency(self, past: ReplaySample) -> torch.Tensor:
        """The consistency loss on a replayed batch (each sample through its task's head)."""
        with torch.no_grad():
            stable_logits = self.stable_model(past.x, past.t)
            plastic_logits = self.plastic_model(past.x, past.t)
        return consistency_loss(self.net(past.x, past.t), stable_logits, plastic_logits, past.y,
                                self.n_classes)

    def update_memories(self) -> None:
        """Each memory, with its own probability, takes an EMA step towards the working
        network. The draws are host-side decisions on torch's global CPU generator (no
        device sync; checkpoints save that generator, so a resumed run redraws them)."""
        for name in MEMORIES:
            if bool(torch.rand(1) < self.update_freq[name]):
                ema_update(self.memory(name), self.net,
                           ema_decay(self.global_step, self.alpha[name]))
                self.updates[name] += 1

    def memory_breakdown(self) -> dict[str, int]:
        return {**super().memory_breakdown(),
                "plastic_model": network_bytes(self.plastic_model),
                "stable_model": network_bytes(self.stable_model)}

    def result_details(self) -> dict:
        """Steps taken and how many of them updated each memory (their frequencies)."""
        return {"global_step": self.global_step,
                "updates": {name: self.updates[name] for name in MEMORIES}}

    def checkpoint_state(self) -> dict:
        # The memories are submodules, so they are in the state dict.
        return {**super().checkpoint_state(), "global_step": self.global_step,
                "updates": dict(self.updates)}

    def load_checkpoint_state(self, state: dict) -> None:
        super().load_checkpoint_state(state)
        self.global_step = state["global_step"]
        self.updates = dict(state["updates"])
