"""BMKP's representation compaction regularizer (Eq. 4), as published and as coded.

Both variants push a layer weight into the span of the output-space basis, so the next
knowledge projection needs few new basis columns:

- "paper" (Eq. 4): with R = W - B B^T W and G = R^T R, loss = trace(G) / ||G||_1 (entrywise
  L1 norm); the trace pulls W into span(B), the L1 normalisation favours a low-rank residual.
- "official" (the reference implementation's code): with S = [B^T ; R^T] and C = S^T S =
  B B^T + R R^T, loss = trace(C) / sum(C), a plain signed sum of the entries of C.
"""
import torch

VARIANTS = ("official", "paper")


def compaction_loss(weight: torch.Tensor, basis: torch.Tensor, variant: str) -> torch.Tensor:
    """Compaction loss of one layer weight (out x ..., flattened to out x in) against its
    out x r basis; the basis is a constant (no gradient flows into it).

    "paper": a weight inside span(B) (zero residual) gives 0 with a zero, finite gradient
    (the zero denominator is replaced by 1, so no 0/0 reaches autograd).
    "official": as in the reference, the signed sum in the denominator is not guarded; an
    exactly zero sum gives inf or nan, as the reference would.
    """
    if variant not in VARIANTS:
        raise ValueError(f"unknown compaction variant {variant!r}; allowed: {', '.join(VARIANTS)}")
    flat = weight.reshape(weight.shape[0], -1)
    if basis.dim() != 2 or basis.shape[0] != flat.shape[0]:
        raise ValueError(f"basis of shape {tuple(basis.shape)} does not fit a weight with "
                         f"{flat.shape[0]} outputs")
    basis = basis.detach().to(device=flat.device, dtype=flat.dtype)
    residual = flat - basis @ (basis.T @ flat)
    if variant == "paper":
        gram = residual.T @ residual
        # trace(G) = ||R||_F^2; taking it from G keeps 0 <= loss <= 1 exactly, and G is needed
        # for the denominator anyway.
        numerator = gram.diagonal().sum()
        denominator = gram.abs().sum()
        return numerator / torch.where(denominator > 0, denominator, torch.ones_like(denominator))
    # trace(M M^T) = ||M||_F^2 and sum(M M^T) = ||column sums of M||^2, so C is never formed.
    numerator = basis.square().sum() + residual.square().sum()
    denominator = basis.sum(0).square().sum() + residual.sum(0).square().sum()
    return numerator / denominator
