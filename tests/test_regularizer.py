"""BMKP's compaction regularizer on hand-checked numbers and against a plain numpy version;
the network's loss (layers computed together) against the sum of its layers'."""
import numpy as np
import pytest
import torch

from models.bmkp.regularizer import VARIANTS, CompactionLoss, compaction_loss
from utils.benchmark import OperatorCount

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


# Layers of a small network: outputs shared by layers of different inputs (padded together),
# a channels-last conv, a 1x1 conv, a linear weight, and bases of different widths (0 too).
LAYERS = {"conv1": ((6, 4, 3, 3), 3), "conv2": ((6, 2, 3, 3), 5), "shortcut": ((6, 2, 1, 1), 0),
          "fc": ((6, 10), 2), "conv3": ((3, 5, 3, 3), 1), "conv4": ((3, 5, 3, 3), 2)}


def _network(seed: int):
    gen = np.random.default_rng(seed)
    weights, bases = {}, {}
    for index, (name, (shape, width)) in enumerate(LAYERS.items()):
        weight = torch.from_numpy(gen.standard_normal(shape))
        if name == "conv2":
            weight = weight.contiguous(memory_format=torch.channels_last)
        weights[name] = weight.requires_grad_()
        bases[name] = torch.from_numpy(_orthonormal(shape[0], width, seed=seed + index))
    return weights, bases


@pytest.mark.parametrize("pad_inputs, groups", [(False, 5), (True, 2)])
@pytest.mark.parametrize("variant", VARIANTS)
def test_network_loss_is_the_sum_of_its_layers(variant, pad_inputs, groups):
    weights, bases = _network(seed=6)
    loss = CompactionLoss(bases, {n: w.shape for n, w in weights.items()}, variant, pad_inputs)
    assert len(loss.groups) == groups
    loss = loss(weights)
    expected = sum(_numpy_loss(w.detach().numpy(), bases[n].numpy(), variant)
                   for n, w in weights.items())
    assert loss.item() == pytest.approx(expected, rel=1e-10)
    loss.backward()
    together = {n: w.grad.clone() for n, w in weights.items()}
    for name, weight in weights.items():
        weight.grad = None
        compaction_loss(weight, bases[name], variant).backward()
        assert torch.allclose(weight.grad, together[name], rtol=1e-10, atol=1e-12), name


@pytest.mark.parametrize("pad_inputs", [False, True])
@pytest.mark.parametrize("variant", VARIANTS)
def test_network_loss_gradient_is_correct(variant, pad_inputs):
    weights, bases = _network(seed=7)
    names = list(weights)
    loss = CompactionLoss(bases, {n: w.shape for n, w in weights.items()}, variant, pad_inputs)
    assert torch.autograd.gradcheck(lambda *ws: loss(dict(zip(names, ws))),
                                    tuple(weights[n] for n in names))


@pytest.mark.parametrize("pad_inputs", [False, True])
def test_operators_per_step_grow_by_group_not_by_layer(pad_inputs):
    """A GPU step of the small ResNet is bound by kernel launches: eight layers of one shape
    must cost about what one costs, not eight times as much."""
    def operators(n_layers: int) -> int:
        gen = torch.Generator().manual_seed(8)
        weights = {f"conv{i}": torch.randn(6, 4, 3, 3, generator=gen, requires_grad=True)
                   for i in range(n_layers)}
        bases = {name: torch.from_numpy(_orthonormal(6, 2, seed=9)).float() for name in weights}
        loss = CompactionLoss(bases, {n: w.shape for n, w in weights.items()}, "official",
                              pad_inputs)
        with OperatorCount() as counted:
            loss(weights).backward()
        return counted.count

    one, eight = operators(1), operators(8)
    assert one <= eight < 2 * one
