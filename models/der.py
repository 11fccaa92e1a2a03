"""Dark Experience Replay (Buzzega et al., NeurIPS 2020): the buffer keeps each sample's
logits from when it was stored, and replay matches them (MSE), distilling the past network
without keeping a copy of it. A buffer sample's stored and matched logits are those of its
own task's head; mammoth's single head stores and matches all classes' logits. Each matched
logit is weighted as in mammoth (replay.single_head_mse), so its alpha carries over.

Logits stored while the first steps overshoot (too high an lr for the network) become
targets that the squared loss keeps pulling towards, so DER can diverge where plain SGD
recovers; the run then stops with an error naming --lr."""
import argparse

import torch
import torch.nn.functional as F

from models.replay import ReplayModel, single_head_mse
from utils.validators import non_negative_float


class Der(ReplayModel):
    NAME = "der"
    # Best values with a 500-image buffer from mammoth's utils/best_args.py (aimagelab/mammoth,
    # the DER paper's grid search).
    BEST_CONFIGS = {
        "seq-cifar10": dict(lr=0.03, minibatch_size=32, alpha=0.3, batch_size=32, n_epochs=50),
        "seq-tinyimg": dict(lr=0.03, minibatch_size=32, alpha=0.1, batch_size=32, n_epochs=100),
    }

    @staticmethod
    def add_arguments(parser: argparse._ActionsContainer) -> None:
        ReplayModel.add_arguments(parser)
        parser.add_argument("--alpha", type=non_negative_float, default=0.3,
                            help="weight of the logit-matching (MSE) loss on buffer samples")

    def observe(self, x: torch.Tensor, y: torch.Tensor, task: int,
                raw: torch.Tensor) -> torch.Tensor:
        """Task loss plus replay; the batch is stored with the logits it got in this step."""
        logits = self.net(x, task)
        loss = self.optimizer_step(F.cross_entropy(logits, y) + self.replay_loss())
        self.store(raw, y, task, logits=logits.detach())
        return loss

    def replay_loss(self) -> torch.Tensor | float:
        """Distance between the current and the stored logits of a buffer sample."""
        past = self.replay()
        if past is None:
            return 0.0
        return self.args.alpha * single_head_mse(self.net(past.x, past.t), past.logits,
                                                 self.n_classes)
