"""What a method may rely on in a backbone: the TaskNetwork contract.

A Task-IL backbone maps (images, task id) to that task's logits. Methods that need more than
the forward pass (which layers to project, which parameters belong to one task, which are
shared by all) ask the network through these methods instead of reaching into its modules,
so a second network is a new file in backbone/, not surgery in every method.

Vocabulary:
- a task's *head* is the classifier that produces its logits from the features;
- a task's *own parameters* are those only its forward pass uses (its head, and its
  BatchNorm set when BatchNorm is per task); no other task's loss moves them;
- *shared parameters* are all the others (conv weights, shared BatchNorm);
- a task's *modules* are its head and the normalisation layers its forward pass uses (shared
  ones included): the per-task state a method may snapshot or restore, by qualified name.
"""
from __future__ import annotations

import torch
import torch.nn as nn


class TaskNetwork(nn.Module):
    """Base class of every backbone. Subclasses implement features, task_logits, head,
    task_modules, own_modules and last_feature_map; the rest follows from them."""

    n_tasks: int

    def features(self, x: torch.Tensor, task: int | torch.Tensor) -> torch.Tensor:
        """The flat feature vector of each image, computed as task `task` (an int, or a
        tensor of per-sample task ids where the network allows mixed batches)."""
        raise NotImplementedError

    def task_logits(self, features: torch.Tensor, task: int | torch.Tensor) -> torch.Tensor:
        """Each sample's logits over its task's classes, from its task's head."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor, task: int | torch.Tensor) -> torch.Tensor:
        return self.task_logits(self.features(x, task), task)

    def head(self, task: int) -> nn.Module:
        """The classifier of task `task`."""
        raise NotImplementedError

    def task_modules(self, task: int) -> dict[str, nn.Module]:
        """Task `task`'s head and the normalisation layers its forward pass uses, by name."""
        raise NotImplementedError

    def own_modules(self, task: int) -> dict[str, nn.Module]:
        """The modules only task `task` uses, by name."""
        raise NotImplementedError

    def last_feature_map(self) -> str:
        """The name of the module whose output is the last spatial feature map, the one the
        features pool (where Grad-CAM looks). Only pooling may follow it: each image's
        features then depend on its own map alone, whatever the BatchNorm mode."""
        raise NotImplementedError

    def features_depend_on_task(self) -> bool:
        """Whether `features` differs by task (e.g. per-task BatchNorm); when it does not, all
        heads can score one feature pass (task-agnostic evaluation). True unless a network
        knows better."""
        return True

    def conv_layers(self) -> dict[str, nn.Conv2d]:
        """The conv layers by name, in forward order (what subspace methods project)."""
        return {name: m for name, m in self.named_modules() if isinstance(m, nn.Conv2d)}

    def task_parameters(self, task: int) -> dict[str, nn.Parameter]:
        """The parameters only task `task` uses, by name."""
        return {f"{name}.{key}": p for name, module in self.own_modules(task).items()
                for key, p in module.named_parameters()}

    def shared_parameters(self) -> dict[str, nn.Parameter]:
        """The parameters every task's forward pass uses (all but the tasks' own)."""
        own = {id(p) for task in range(self.n_tasks) for p in self.task_parameters(task).values()}
        return {name: p for name, p in self.named_parameters() if id(p) not in own}
