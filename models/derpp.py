"""DER++ (Buzzega et al., NeurIPS 2020): DER's logit matching plus cross-entropy on the labels
of a second, independently drawn buffer sample."""
import argparse

import torch
import torch.nn.functional as F

from models.der import Der
from utils.validators import non_negative_float


class Derpp(Der):
    NAME = "derpp"
    # Best values with a 500-image buffer from mammoth's utils/best_args.py (aimagelab/mammoth,
    # the DER paper's grid search).
    BEST_CONFIGS = {
        "seq-cifar10": dict(lr=0.03, minibatch_size=32, alpha=0.2, beta=0.5, batch_size=32,
                            n_epochs=50),
        "seq-tinyimg": dict(lr=0.03, minibatch_size=32, alpha=0.2, beta=0.5, batch_size=32,
                            n_epochs=100),
    }

    @staticmethod
    def add_arguments(parser: argparse._ActionsContainer) -> None:
        Der.add_arguments(parser)
        parser.add_argument("--beta", type=non_negative_float, default=0.5,
                            help="weight of the cross-entropy on replayed labels")

    def replay_loss(self) -> torch.Tensor | float:
        past = self.replay()
        if past is None:
            return 0.0
        labels = self.args.beta * F.cross_entropy(self.net(past.x, past.t), past.y)
        return super().replay_loss() + labels
