"""BMKP's representation compaction regularizer (Eq. 4), as published and as coded.

Both variants push a layer weight into the span of the output-space basis, so the next
knowledge projection needs few new basis columns:

- "paper" (Eq. 4): with R = W - B B^T W and G = R^T R, loss = trace(G) / ||G||_1 (entrywise
  L1 norm); the trace pulls W into span(B), the L1 normalisation favours a low-rank residual.
- "official" (the reference implementation's code): with S = [B^T ; R^T] and C = S^T S =
  B B^T + R R^T, loss = trace(C) / sum(C), a plain signed sum of the entries of C.

The loss of a network is the sum over its projected layers, computed a group of layers at a
time in batched matrix products over their stacked weights, each basis padded with zero
columns to the widest of its group (which changes no residual). A group is the layers of one
weight shape; with `pad_inputs`, the layers of one output width, each weight padded with zero
input columns to the widest of its group (a zero column has a zero residual and adds nothing
to G, ||R|| or the column sums). Either way a training step costs a few kernels per group
instead of a few dozen per layer: on a GPU, where a step of the small ResNet is bound by kernel
launches, pad_inputs makes the fewest groups (4 for ResNet-18's 20 convs, against 11 shapes);
on a CPU the padding's extra arithmetic costs more than the launches it saves.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

VARIANTS = ("official", "paper")


@dataclass
class _Group:
    """Layers computed together: their names, the widest flattened weight's inputs, their
    bases stacked (and transposed) with zero columns up to the widest, and per layer
    ||B||_F^2 and ||1^T B||^2 (the official form's constant terms)."""
    names: list[str]
    inputs: int
    basis: torch.Tensor
    basis_t: torch.Tensor
    basis_square: torch.Tensor
    basis_column_sums_square: torch.Tensor


def _padded_rows(weight: torch.Tensor, inputs: int) -> torch.Tensor:
    """The weight as out x `inputs`: its inputs in memory order (a channels-last conv weight
    cannot be viewed as out x (c kh kw) without a copy; no variant depends on the inputs'
    order), then zero columns."""
    if not weight.is_contiguous() and weight.is_contiguous(memory_format=torch.channels_last):
        weight = weight.permute(0, 2, 3, 1)
    rows = weight.reshape(weight.shape[0], -1)
    return rows if rows.shape[1] == inputs else F.pad(rows, (0, inputs - rows.shape[1]))


class CompactionLoss:
    """The regularizer of a set of layers against their bases, which are constants (no
    gradient flows into them): built once per task, called once per training step."""

    def __init__(self, bases: dict[str, torch.Tensor], shapes: dict[str, torch.Size],
                 variant: str, pad_inputs: bool = False) -> None:
        if variant not in VARIANTS:
            raise ValueError(f"unknown compaction variant {variant!r}; allowed: "
                             f"{', '.join(VARIANTS)}")
        self.variant = variant
        inputs = {name: torch.Size(shape[1:]).numel() for name, shape in shapes.items()}
        groups: dict[tuple[int, int], list[str]] = {}
        for name, shape in shapes.items():
            basis = bases[name]
            if basis.dim() != 2 or basis.shape[0] != shape[0]:
                raise ValueError(f"basis of shape {tuple(basis.shape)} does not fit a weight "
                                 f"with {shape[0]} outputs")
            # grouped by outputs and inputs, or by outputs alone when inputs are padded
            groups.setdefault((shape[0], 0 if pad_inputs else inputs[name]), []).append(name)
        self.groups = [self._group(names, [bases[n].detach() for n in names],
                                   max(inputs[n] for n in names))
                       for names in groups.values()]

    @staticmethod
    def _group(names: list[str], bases: list[torch.Tensor], inputs: int) -> _Group:
        width = max(b.shape[1] for b in bases)
        padded = bases[0].new_zeros(len(bases), bases[0].shape[0], width)
        for slot, basis in zip(padded, bases):
            slot[:, :basis.shape[1]] = basis
        return _Group(names, inputs, padded, padded.transpose(1, 2).contiguous(),
                      torch.stack([b.square().sum() for b in bases]),
                      torch.stack([b.sum(0).square().sum() for b in bases]))

    def __call__(self, weights: dict[str, torch.Tensor]) -> torch.Tensor:
        """The sum of every layer's loss.

        "paper": a weight inside span(B) (zero residual) gives 0 with a zero, finite gradient
        (the zero denominator is replaced by 1, so no 0/0 reaches autograd).
        "official": as in the reference, the signed sum in the denominator is not guarded;
        an exactly zero sum gives inf or nan, as the reference would."""
        losses = []
        for group in self.groups:
            stacked = torch.stack([_padded_rows(weights[name], group.inputs)
                                   for name in group.names])
            basis, basis_t = group.basis.to(stacked.dtype), group.basis_t.to(stacked.dtype)
            residual = torch.baddbmm(stacked, basis, torch.bmm(basis_t, stacked), alpha=-1)
            if self.variant == "paper":
                gram = residual.transpose(1, 2) @ residual
                # trace(G) = ||R||_F^2; taking it from G keeps 0 <= loss <= 1 exactly, and G is
                # needed for the denominator anyway.
                numerator = gram.diagonal(dim1=1, dim2=2).sum(1)
                denominator = gram.abs().sum((1, 2))
                denominator = torch.where(denominator > 0, denominator,
                                          torch.ones_like(denominator))
            else:
                # trace(M M^T) = ||M||_F^2 and sum(M M^T) = ||column sums of M||^2, so C is
                # never formed.
                numerator = (group.basis_square.to(residual.dtype)
                             + residual.square().sum((1, 2)))
                denominator = (group.basis_column_sums_square.to(residual.dtype)
                               + residual.sum(1).square().sum(1))
            losses.append(numerator / denominator)
        return torch.cat(losses).sum()


def compaction_loss(weight: torch.Tensor, basis: torch.Tensor, variant: str) -> torch.Tensor:
    """The loss of one layer weight (out x ..., flattened to out x in) against its out x r
    basis."""
    return CompactionLoss({"weight": basis}, {"weight": weight.shape}, variant)(
        {"weight": weight})
