"""Joint: the upper bound. After each task it retrains, from the initial weights, on the union
of every task seen so far, so its last row of the accuracy matrix is true joint training."""
import argparse
import copy

from datasets.continual_dataset import SequentialDataset, TaskData
from models.continual_model import ContinualModel
from models.sgd import MAMMOTH_BEST
from utils.context import TrainingContext
from utils.sizes import tensor_bytes


class Joint(ContinualModel):
    NAME = "joint"
    DEFAULTS = {"per_task_bn": 0}
    SHARED_BN_REASON = "trains on batches mixing tasks"
    # The same network trained by plain SGD: sgd's values (mammoth publishes none for joint).
    BEST_CONFIGS = MAMMOTH_BEST

    def __init__(self, net, dataset: SequentialDataset, args: argparse.Namespace) -> None:
        super().__init__(net, dataset, args)
        self.initial_state = copy.deepcopy(net.state_dict())
        self.seen: list[TaskData] = []

    def begin_task(self, task: int, data: TaskData) -> None:
        self.seen.append(data)
        self.net.load_state_dict(self.initial_state)
        self.reset_optimizer()

    def fit_task(self, task: int, data: TaskData, ctx: TrainingContext) -> None:
        union = TaskData.concat(self.seen)
        with ctx.phase("train"):
            self.train_epochs(union, ctx, self.args.n_epochs, self.observe, task=None)

    def memory_breakdown(self) -> dict[str, int]:
        stored = tensor_bytes(t for d in self.seen for t in (d.x, d.y, d.t))
        return {**super().memory_breakdown(), "stored_data": stored}

    def checkpoint_state(self) -> dict:
        """Also the initial weights and every task seen so far (retrained on at each task)."""
        return {**super().checkpoint_state(), "initial": self.initial_state,
                "seen": [vars(d) for d in self.seen]}

    def load_checkpoint_state(self, state: dict) -> None:
        super().load_checkpoint_state(state)
        self.initial_state = state["initial"]
        self.seen = [TaskData(**d) for d in state["seen"]]
