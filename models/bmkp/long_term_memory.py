"""BMKP's long-term memory: shared output-space bases plus compact per-task knowledge.

For every projected layer l it keeps a basis B^l (out x r_l, orthonormal columns, only ever
grown by appending) and, per task t, the coefficients A_t^l = B^l^T W_t^l over the first
r_{l,t} columns that existed when task t was stored. Per task it also keeps the state the
working memory needs to predict that task besides its conv weights: its BatchNorm set and
its classifier rows (`extras`, stored under the working memory's own parameter names).

A's columns follow the order in which the working memory's convs lay out their weights (input
channels last for channels-last convs), so that B A is a composed weight in that layout
without a copy, forward or backward: retraining recomposes every weight at every step.
`state_dict` and files use the standard order (input channel, kernel row, kernel column).
"""
from __future__ import annotations

import torch
import torch.nn as nn

FLOAT_BYTES = 4


class LongTermMemory(nn.Module):
    def __init__(self, layer_shapes: dict[str, torch.Size],
                 memory_format: torch.memory_format = torch.contiguous_format) -> None:
        """`layer_shapes` maps each projected weight's name in the working memory to its shape;
        composed weights come in `memory_format` (that of the working memory's convs)."""
        super().__init__()
        self.layer_shapes = {name: torch.Size(shape) for name, shape in layer_shapes.items()}
        self.memory_format = memory_format
        self.bases: dict[str, torch.Tensor] = {}
        self.coefficients: list[dict[str, torch.Tensor]] = []
        self.extras: list[dict[str, torch.Tensor]] = []
        self._cached_task: int | None = None
        self._cached_weights: dict[str, torch.Tensor] = {}

    @property
    def n_tasks(self) -> int:
        return len(self.coefficients)

    def basis(self, name: str) -> torch.Tensor | None:
        return self.bases.get(name)

    def set_bases(self, bases: dict[str, torch.Tensor]) -> None:
        """Replace the bases by grown ones; the columns stored tasks use must be unchanged."""
        for name, new in bases.items():
            old = self.bases.get(name)
            if old is not None and (new.shape[1] < old.shape[1]
                                    or not torch.equal(new[:, :old.shape[1]].to(old), old)):
                raise ValueError(f"basis of {name} may only grow by appending columns")
            self.bases[name] = new.detach().to(torch.float32).contiguous()
        self._cached_task = None

    @property
    def _inputs_last(self) -> bool:
        return self.memory_format == torch.channels_last

    def project(self, weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """A^l = B^l^T W^l (computed in float64, kept as float32) for every projected layer."""
        return {name: (self.bases[name].double().T
                       @ self._columns(weights[name].detach().double())).float()
                for name in self.layer_shapes}

    def _columns(self, weight: torch.Tensor) -> torch.Tensor:
        """The weight as a matrix (outputs x the rest) in the memory's column order."""
        if self._inputs_last and weight.dim() == 4:
            weight = weight.permute(0, 2, 3, 1)
        return weight.flatten(1)

    def _weight(self, name: str, matrix: torch.Tensor) -> torch.Tensor:
        """Inverse of _columns: a view of `matrix` (any number of rows) as the layer's weight
        shape, in the layout."""
        shape = self.layer_shapes[name]
        if self._inputs_last and len(shape) == 4:
            _, inputs, rows, cols = shape
            return matrix.view(-1, rows, cols, inputs).permute(0, 3, 1, 2)
        return matrix.view(-1, *shape[1:])

    def _reorder(self, name: str, a: torch.Tensor, to_layout: bool) -> torch.Tensor:
        """A's columns from the standard order into the memory's (or back)."""
        if to_layout:
            return self._columns(a.reshape(-1, *self.layer_shapes[name][1:]))
        return self._weight(name, a).flatten(1)

    def store_task(self, task: int, coefficients: dict[str, torch.Tensor],
                   extras: dict[str, torch.Tensor]) -> None:
        if task != self.n_tasks:
            raise ValueError(f"tasks are stored in order: expected task {self.n_tasks}, got {task}")
        for name, a in coefficients.items():
            if a.shape[0] > self.bases[name].shape[1]:
                raise ValueError(f"coefficients of {name} use more columns than the basis has")
        self.coefficients.append({n: a.detach().float().clone() for n, a in coefficients.items()})
        self.extras.append({n: e.detach().clone() for n, e in extras.items()})
        self._cached_task = None

    def compose(self, task: int) -> dict[str, torch.Tensor]:
        """Task `task`'s working-memory tensors: W = B[:, :r] A for every projected layer, plus
        its extras. The result is cached until the memory changes (evaluation reuses it)."""
        if self._cached_task != task:
            weights = self.weights_from(self.coefficients[task])
            weights.update(self.extras[task])
            self._cached_task, self._cached_weights = task, weights
        return self._cached_weights

    def weights_from(self, coefficients: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """W^l = B^l[:, :r] A^l for each layer, r being the number of rows of A^l (the basis
        columns that existed when A^l was made); differentiable in A."""
        return {name: self._weight(name, self.bases[name][:, :a.shape[0]] @ a)
                for name, a in coefficients.items()}

    def size_in_floats(self) -> dict[str, int]:
        return {"bases": sum(b.numel() for b in self.bases.values()),
                "coefficients": sum(a.numel() for task in self.coefficients for a in task.values()),
                "per_task_extras": sum(e.numel() for task in self.extras for e in task.values()
                                       if e.is_floating_point())}

    def size_in_bytes(self) -> dict[str, int]:
        return {k: v * FLOAT_BYTES for k, v in self.size_in_floats().items()}

    def state_dict(self, *args, **kwargs) -> dict:
        return {"layer_shapes": {n: list(s) for n, s in self.layer_shapes.items()},
                "bases": dict(self.bases),
                "coefficients": [{n: self._reorder(n, a, to_layout=False) for n, a in t.items()}
                                 for t in self.coefficients],
                "extras": list(self.extras)}

    def load_state_dict(self, state: dict, strict: bool = True, assign: bool = False):
        self.layer_shapes = {n: torch.Size(s) for n, s in state["layer_shapes"].items()}
        self.bases = dict(state["bases"])
        self.coefficients = [{n: self._reorder(n, a, to_layout=True) for n, a in t.items()}
                             for t in state["coefficients"]]
        self.extras = list(state["extras"])
        self._cached_task = None

    def _apply(self, fn, recurse: bool = True):
        """Keep .to(device) working for the plain-dict storage."""
        self.bases = {n: fn(b) for n, b in self.bases.items()}
        self.coefficients = [{n: fn(a) for n, a in t.items()} for t in self.coefficients]
        self.extras = [{n: fn(e) for n, e in t.items()} for t in self.extras]
        self._cached_task = None
        return super()._apply(fn, recurse)
