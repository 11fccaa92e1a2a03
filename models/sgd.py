"""SGD: plain fine-tuning of one network across tasks, the lower bound."""
from models.continual_model import ContinualModel

# mammoth's published best arguments (aimagelab/mammoth, utils/best_args.py,
# best_args[dataset]['sgd'][-1]); `joint` reuses them, as mammoth has no entry for it.
MAMMOTH_BEST = {
    "seq-cifar10": dict(lr=0.1, batch_size=32, n_epochs=50),
    "seq-tinyimg": dict(lr=0.03, batch_size=32, n_epochs=100),
}


class Sgd(ContinualModel):
    NAME = "sgd"
    BEST_CONFIGS = MAMMOTH_BEST
