"""BMKP's compaction regularizer on hand-checked numbers and against a plain numpy version."""
import numpy as np
import pytest
import torch

from models.bmkp.regularizer import VARIANTS, compaction_loss

# W (2 x 3) and a unit basis vector b = (0.6, 0.8). The residual (I - b b^T) W is u v^T with
# u = (0.8, -0.6) and v = u^T W = (0.8, 1.0, 0.6).
W = [[1.0, 2.0, 0.0], [0.0, 1.0, -1.0]]
B = [[0.6], [0.8]]
# paper: G = v v^T, trace = 0.64 + 1 + 0.36 = 2, ||G||_1 = (0.8 + 1 + 0.6)^2 = 5.76.
PAPER = 2.0 / 5.76
# official: C = b b^T + 2 u u^T = [[0.36 + 1.28, 0.48 - 0.96], [0.48 - 0.96, 0.64 + 0.72]],
# trace = 3, signed sum = 1.64 - 0.48 - 0.48 + 1.36 = 2.04.
OFFICIAL = 3.0 / 2.04


def _numpy_loss(weight: np.ndarray, basis: np.ndarray, variant: str) -> float:
    """Eq. 4 and the reference code's formula, forming every matrix explicitly."""
    w = weight.reshape(weight.shape[0], -1)
    r = w - basis @ basis.T @ w
    if variant == "paper":
        g = r.T @ r
        return np.trace(g) / np.abs(g).sum()
    s = np.vstack([basis.T, r.T])
    c = s.T @ s
    return np.trace(c) / c.sum()


def _orthonormal(rows: int, cols: int, seed: int) -> np.ndarray:
    q, _ = np.linalg.qr(np.random.default_rng(seed).standard_normal((rows, cols)))
    return q


@pytest.mark.parametrize("variant, expected", [("paper", PAPER), ("official", OFFICIAL)])
def test_hand_checked_values(variant, expected):
    weight, basis = np.array(W), np.array(B)
    assert _numpy_loss(weight, basis, variant) == pytest.approx(expected)
    for dtype in (torch.float64, torch.float32):
        loss = compaction_loss(torch.tensor(W, dtype=dtype), torch.tensor(B), variant)
        assert loss.dtype == dtype
        assert loss.item() == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("shape", [(6, 4, 3, 3), (6, 10)])
def test_matches_numpy_for_conv_and_linear(variant, shape):
    weight = np.random.default_rng(0).standard_normal(shape)
    basis = _orthonormal(shape[0], 3, seed=1)
    loss = compaction_loss(torch.from_numpy(weight), torch.from_numpy(basis), variant)
    assert loss.item() == pytest.approx(_numpy_loss(weight, basis, variant), rel=1e-10)
    loss32 = compaction_loss(torch.from_numpy(weight).float(), torch.from_numpy(basis), variant)
    assert loss32.item() == pytest.approx(_numpy_loss(weight, basis, variant), rel=1e-4)


@pytest.mark.parametrize("variant", VARIANTS)
def test_zero_residual(variant):
    # Coordinate basis vectors (rows 2 and 0) and a weight living only in those rows: the
    # residual is exactly zero.
    basis = np.zeros((3, 2))
    basis[2, 0] = basis[0, 1] = 1.0
    weight = np.array([[1.0, -2.0, 0.5, 3.0], [0.0] * 4, [2.0, 1.0, -1.0, 0.5]])
    w = torch.tensor(weight, requires_grad=True)
    loss = compaction_loss(w, torch.from_numpy(basis), variant)
    bbt = basis @ basis.T
    expected = 0.0 if variant == "paper" else np.trace(bbt) / bbt.sum()
    assert loss.item() == pytest.approx(expected)
    loss.backward()
    assert torch.isfinite(w.grad).all()


@pytest.mark.parametrize("variant", VARIANTS)
def test_gradient_reaches_weight_only(variant):
    gen = torch.Generator().manual_seed(2)
    weight = torch.randn(8, 3, 3, 3, generator=gen, requires_grad=True)
    basis = torch.from_numpy(_orthonormal(8, 3, seed=3)).requires_grad_()
    compaction_loss(weight, basis, variant).backward()
    assert weight.grad.shape == weight.shape
    assert torch.isfinite(weight.grad).all() and weight.grad.abs().sum() > 0
    assert basis.grad is None


@pytest.mark.parametrize("variant", VARIANTS)
def test_gradient_is_correct(variant):
    gen = torch.Generator().manual_seed(4)
    weight = torch.randn(5, 7, generator=gen, dtype=torch.float64, requires_grad=True)
    basis = torch.from_numpy(_orthonormal(5, 2, seed=5))
    assert torch.autograd.gradcheck(lambda w: compaction_loss(w, basis, variant), (weight,))


def test_rejects_bad_variant_and_shape():
    with pytest.raises(ValueError, match="official.*paper"):
        compaction_loss(torch.ones(2, 3), torch.ones(2, 1), "eq4")
    with pytest.raises(ValueError):
        compaction_loss(torch.ones(2, 3), torch.ones(3, 1), "paper")
