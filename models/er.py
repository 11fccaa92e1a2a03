"""Experience Replay (Riemer et al., 2019; Chaudhry et al., 2019): each step trains on the
current batch together with a batch drawn from a reservoir buffer of past samples."""
import torch
import torch.nn.functional as F

from models.replay import ReplayModel, with_replay


class Er(ReplayModel):
    NAME = "er"
    # Best values with a 500-image buffer from mammoth's utils/best_args.py (aimagelab/mammoth,
    # the DER paper's grid search, Buzzega et al., NeurIPS 2020).
    BEST_CONFIGS = {
        "seq-cifar10": dict(lr=0.1, minibatch_size=32, batch_size=32, n_epochs=50),
        "seq-tinyimg": dict(lr=0.03, minibatch_size=32, batch_size=32, n_epochs=100),
    }

    def observe(self, x: torch.Tensor, y: torch.Tensor, task: int,
                raw: torch.Tensor) -> torch.Tensor:
        """One step on the batch and a replayed batch as one mixed-task batch: every sample
        is classified by its own task's head."""
        inputs, labels, tasks = with_replay(x, y, task, self.replay())
        loss = self.optimizer_step(F.cross_entropy(self.net(inputs, tasks), labels))
        self.store(raw, y, task)
        return loss
