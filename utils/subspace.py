"""Thresholded growth of a layer's representation basis, shared by BMKP, GPM and Adam-NSCL.

The left singular vectors of a representation matrix Z (D x columns) and its squared singular
values are the eigenvectors and eigenvalues of the small D x D Gram matrix Z Z^T, so every
function here works on that Gram matrix (in float64) and never takes an SVD of Z itself.
That also lets the Gram matrix be summed over batches instead of storing the activations.

Two representations are used: a layer's outputs (BMKP: D = output channels, one column per
sample and position) and a conv layer's input patches (GPM, Adam-NSCL: D = in_channels x
kernel area, one column per sample and output position, i.e. the im2col matrix).
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Mapping

import torch
import torch.nn as nn
import torch.nn.functional as F


def activation_gram(z: torch.Tensor) -> torch.Tensor:
    """Return the float64 C x C Gram matrix Z Z^T of a layer output of shape (N, C, ...).

    Z is z with the channel axis as rows and every (sample, position) pair as a column. With
    the channel axis moved last, a channels-last output is already that matrix's transpose in
    memory (no copy), and the product is one float64 GEMM (about 9x faster than an einsum
    over the NCHW axes on the CPU, at the same precision).
    """
    if z.dim() < 2:
        raise ValueError(f"expected a layer output of shape (N, C, ...), got {tuple(z.shape)}")
    columns = z.detach().movedim(1, -1).reshape(-1, z.shape[1]).to(torch.float64)
    return columns.T @ columns


def patch_gram(x: torch.Tensor, conv: nn.Conv2d) -> tuple[torch.Tensor, int]:
    """The float64 Gram matrix of a conv layer's input patches, and how many patches.

    Rows are ordered like conv.weight.reshape(out, -1) columns (channel, kernel row, kernel
    column), so a basis of this space acts directly on the flattened weight's input side.
    """
    if conv.groups != 1 or conv.padding_mode != "zeros":
        raise ValueError("patch Gram matrices need an ungrouped, zero-padded convolution")
    patches = F.unfold(x.detach().float(), conv.kernel_size, conv.dilation, conv.padding,
                       conv.stride)
    columns = patches.transpose(1, 2).reshape(-1, patches.shape[1]).to(torch.float64)
    return columns.T @ columns, columns.shape[0]


class GramAccumulator:
    """Sum of Gram matrices over batches, so a projection pass stores no activations; also
    counts the columns (representation vectors) summed, for averages such as covariances."""

    def __init__(self) -> None:
        self._gram: torch.Tensor | None = None
        self.columns = 0

    def add(self, z: torch.Tensor) -> None:
        """Add the Gram matrix of one batch of layer outputs (shape (N, C, ...))."""
        self.add_gram(activation_gram(z), z.numel() // z.shape[1])

    def add_gram(self, gram: torch.Tensor, columns: int) -> None:
        """Add a precomputed Gram matrix of `columns` representation vectors."""
        self.columns += columns
        if self._gram is None:
            self._gram = gram
        elif self._gram.shape != gram.shape:
            raise ValueError(f"batch has {gram.shape[0]} channels, earlier batches had "
                             f"{self._gram.shape[0]}")
        else:
            self._gram += gram

    @property
    def gram(self) -> torch.Tensor:
        """The accumulated C x C float64 Gram matrix."""
        if self._gram is None:
            raise RuntimeError("no batch was added to the GramAccumulator")
        return self._gram


@contextmanager
def recording_grams(layers: Mapping[str, nn.Module], of: str,
                    batch_mean: bool = False) -> Iterator[dict[str, GramAccumulator]]:
    """Accumulate every layer's Gram matrix over the forward passes run inside the block.

    of="output": the layer's outputs (BMKP's output space); of="input": the input patches of
    each conv layer (GPM's and Adam-NSCL's input space). batch_mean=True first averages each
    input batch over its samples (what Adam-NSCL's reference code does).
    """
    if of not in ("output", "input"):
        raise ValueError(f"of must be 'output' or 'input', got {of!r}")
    grams = {name: GramAccumulator() for name in layers}

    def record_input(acc: GramAccumulator, module: nn.Module, args: tuple) -> None:
        x = args[0].mean(0, keepdim=True) if batch_mean else args[0]
        acc.add_gram(*patch_gram(x, module))

    if of == "output":
        hooks = [m.register_forward_hook(lambda _m, _i, out, acc=grams[name]: acc.add(out))
                 for name, m in layers.items()]
    else:
        hooks = [m.register_forward_pre_hook(
            lambda module, args, acc=grams[name]: record_input(acc, module, args))
            for name, m in layers.items()]
    try:
        yield grams
    finally:
        for hook in hooks:
            hook.remove()


def _descending_eigh(gram: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenvalues (clamped at 0: a Gram matrix is PSD) and eigenvectors, largest first."""
    values, vectors = torch.linalg.eigh(gram)
    return values.flip(0).clamp_min(0.0), vectors.flip(1)


ENERGIES = ("sigma2", "sigma")
FIRST_COUNTS = ("below", "reach")


def _energy(eigenvalues: torch.Tensor, energy: str) -> torch.Tensor:
    """The energy of each direction: its squared singular value (a Gram eigenvalue) or its
    singular value."""
    return eigenvalues if energy == "sigma2" else eigenvalues.sqrt()


def update_basis(gram: torch.Tensor, basis: torch.Tensor | None, threshold: float,
                 energy: str = "sigma2", first_count: str = "below") -> torch.Tensor:
    """Grow an orthonormal output-space basis until it retains `threshold` of the energy.

    gram is the C x C Gram matrix Z Z^T of the current task's layer outputs; basis is the
    C x r basis so far (None or C x 0 before the first task). Returns a C x r' float64 basis
    whose first r columns are the old ones unchanged; new columns are only ever appended, so
    coefficients stored against the old columns stay valid.

    energy="sigma2" measures a direction by its squared singular value (GPM's and the BMKP
    reference code's rule), "sigma" by its singular value (the BMKP paper's footnote 3), so
    the same threshold keeps more directions.

    - No basis yet: keep the leading eigenvectors whose cumulative energy ratio is strictly
      below the threshold (first_count="below", the reference implementations' count
      without +1: a first direction that alone reaches the threshold keeps nothing), or the
      fewest whose ratio reaches it (first_count="reach").
    - Otherwise: take the eigenvectors of the Gram matrix restricted to the orthogonal
      complement of the basis (exactly orthogonal to it by construction) and append them,
      largest first, while the retained energy ratio is still below the threshold, i.e.
      until it reaches it. The retained ratio is (E(Z) - E(Z_hat)) / E(Z) with Z_hat the
      part of Z outside the basis and E the sum of the directions' energies.
    - threshold >= 1 is lossless: the basis is completed to all C columns (B B^T = I).
    - All-zero activations (zero energy) leave the basis unchanged.
    """
    if not threshold > 0:
        raise ValueError(f"threshold must be > 0 (>= 1 means lossless), got {threshold}")
    if energy not in ENERGIES or first_count not in FIRST_COUNTS:
        raise ValueError(f"energy must be one of {ENERGIES} and first_count one of "
                         f"{FIRST_COUNTS}, got {energy!r} and {first_count!r}")
    if gram.dim() != 2 or gram.shape[0] != gram.shape[1]:
        raise ValueError(f"gram must be a square matrix, got shape {tuple(gram.shape)}")
    channels = gram.shape[0]
    gram = gram.to(torch.float64)
    gram = (gram + gram.T) / 2
    if basis is None:
        basis = gram.new_zeros(channels, 0)
    basis = basis.to(device=gram.device, dtype=torch.float64)
    if basis.dim() != 2 or basis.shape[0] != channels or basis.shape[1] > channels:
        raise ValueError(f"basis of shape {tuple(basis.shape)} does not fit a "
                         f"{channels} x {channels} Gram matrix")
    old = basis.shape[1]
    if old == channels:
        return basis

    total = gram.trace()
    if threshold < 1 and total <= 0:
        return basis

    if old == 0:
        values, vectors = _descending_eigh(gram)
        if threshold >= 1:
            return vectors
        energies = _energy(values, energy)
        ratios = energies.cumsum(0) / energies.sum()
        keep = int((ratios < threshold).sum())
        if first_count == "reach":
            keep = min(keep + 1, channels)
        return vectors[:, :keep]

    # Columns old.. of a complete QR of the basis span exactly its orthogonal complement.
    complement = torch.linalg.qr(basis, mode="complete").Q[:, old:]
    residual_gram = complement.T @ gram @ complement
    values, vectors = _descending_eigh(residual_gram)
    if threshold >= 1:
        keep = values.shape[0]
    else:
        energies = _energy(values, energy)
        total_energy = _energy(_descending_eigh(gram)[0], energy).sum()
        retained = (total_energy - energies.sum()) / total_energy
        # Retained ratio before appending each vector; appending goes on while it is below.
        before = retained + torch.cat([values.new_zeros(1),
                                       energies.cumsum(0)[:-1]]) / total_energy
        keep = int((before < threshold).sum())
    return torch.cat([basis, complement @ vectors[:, :keep]], dim=1)


def retained_energy(gram: torch.Tensor, basis: torch.Tensor | None) -> float:
    """Share trace(B^T G B) / trace(G) of the activation energy that the basis captures.

    An empty basis retains 0; zero energy counts as fully retained (1.0), nothing is lost.
    """
    gram = gram.to(torch.float64)
    total = float(gram.trace())
    if total <= 0:
        return 1.0
    if basis is None or basis.shape[1] == 0:
        return 0.0
    basis = basis.to(device=gram.device, dtype=torch.float64)
    return float((basis.T @ gram @ basis).trace()) / total
