"""The Gram-matrix basis update against an explicit numpy SVD of the activation matrix."""
import numpy as np
import pytest
import torch

from utils.subspace import GramAccumulator, activation_gram, retained_energy, update_basis


def _matrix(z: torch.Tensor) -> np.ndarray:
    """Activation matrix Z (C x N*H*W) built the slow, obvious way."""
    z = z.detach().double().numpy()
    return np.moveaxis(z, 1, 0).reshape(z.shape[1], -1)


POWERS = {"sigma2": 2, "sigma": 1}


def _svd_first(zmat: np.ndarray, threshold: float, energy: str = "sigma2") -> np.ndarray:
    u, s, _ = np.linalg.svd(zmat, full_matrices=False)
    ratios = np.cumsum(s ** POWERS[energy]) / np.sum(s ** POWERS[energy])
    return u[:, :int(np.sum(ratios < threshold))]


def _svd_update(zmat: np.ndarray, basis: np.ndarray, threshold: float,
                energy: str = "sigma2") -> np.ndarray:
    """The reference (GPM-style) residual rule, written with a loop over singular values;
    energy="sigma" puts singular values where the reference has their squares."""
    power = POWERS[energy]
    total = np.sum(np.linalg.svd(zmat, compute_uv=False) ** power)
    residual = zmat - basis @ basis.T @ zmat
    u, s, _ = np.linalg.svd(residual, full_matrices=False)
    accumulated = (total - np.sum(s ** power)) / total
    count = 0
    for value in s:
        if accumulated >= threshold:
            break
        accumulated += value ** power / total
        count += 1
    return np.hstack([basis, u[:, :count]])


def _projector(basis) -> np.ndarray:
    basis = np.asarray(basis, dtype=np.float64)
    return basis @ basis.T


def _random_conv(gen: torch.Generator, n: int, c: int, hw: int) -> torch.Tensor:
    return torch.randn(n, c, hw, hw, generator=gen)


def _low_rank_conv(gen: torch.Generator, n: int, c: int, hw: int, rank: int) -> torch.Tensor:
    mix = torch.randn(c, rank, generator=gen)
    latent = torch.randn(n, rank, hw, hw, generator=gen)
    return torch.einsum("cr,nrhw->nchw", mix, latent)


def _assert_orthonormal(basis: torch.Tensor) -> None:
    eye = torch.eye(basis.shape[1], dtype=basis.dtype)
    assert torch.allclose(basis.T @ basis, eye, atol=1e-5)


def test_gram_matches_explicit_product_for_conv_and_linear():
    gen = torch.Generator().manual_seed(0)
    conv = _random_conv(gen, 4, 6, 5)
    linear = torch.randn(7, 6, generator=gen)
    for z in (conv, linear):
        zmat = _matrix(z)
        gram = activation_gram(z)
        assert gram.dtype == torch.float64 and gram.shape == (6, 6)
        np.testing.assert_allclose(gram.numpy(), zmat @ zmat.T, rtol=1e-6, atol=1e-8)


def test_accumulator_sums_batches_like_one_big_batch():
    gen = torch.Generator().manual_seed(1)
    batches = [_random_conv(gen, n, 5, 4) for n in (3, 2, 4)]
    acc = GramAccumulator()
    for batch in batches:
        acc.add(batch)
    torch.testing.assert_close(acc.gram, activation_gram(torch.cat(batches)))
    with pytest.raises(ValueError):
        acc.add(torch.randn(2, 6, 4, 4))
    with pytest.raises(RuntimeError):
        GramAccumulator().gram


@pytest.mark.parametrize("kind", ["random", "low_rank"])
def test_first_task_spans_svd_subspace(kind):
    gen = torch.Generator().manual_seed(2)
    if kind == "random":
        z, threshold = _random_conv(gen, 6, 12, 4), 0.8
    else:
        z, threshold = _low_rank_conv(gen, 6, 12, 4, rank=4), 0.97
    expected = _svd_first(_matrix(z), threshold)
    basis = update_basis(activation_gram(z), None, threshold)
    assert basis.dtype == torch.float64
    assert basis.shape == expected.shape and 0 < basis.shape[1] < 12
    np.testing.assert_allclose(_projector(basis), _projector(expected), atol=1e-8)
    if kind == "low_rank":
        assert basis.shape[1] <= 4


@pytest.mark.parametrize("energy", ["sigma2", "sigma"])
@pytest.mark.parametrize("kind", ["random", "low_rank"])
def test_residual_update_spans_svd_subspace(kind, energy):
    gen = torch.Generator().manual_seed(3)
    first = _random_conv(gen, 6, 12, 4)
    old = _svd_first(_matrix(first), 0.6, energy)
    if kind == "random":
        z, threshold = _random_conv(gen, 6, 12, 4), 0.85
    else:
        z, threshold = _low_rank_conv(gen, 6, 12, 4, rank=5), 0.97
    expected = _svd_update(_matrix(z), old, threshold, energy)
    basis = update_basis(activation_gram(z), torch.from_numpy(old), threshold, energy)
    assert basis.shape == expected.shape and basis.shape[1] > old.shape[1]
    assert torch.equal(basis[:, :old.shape[1]], torch.from_numpy(old))
    np.testing.assert_allclose(_projector(basis), _projector(expected), atol=1e-8)


def test_successive_updates_stay_orthonormal_keep_old_columns_and_reach_threshold():
    gen = torch.Generator().manual_seed(4)
    channels, threshold = 24, 0.9
    basis = None
    for task in range(5):
        z = _low_rank_conv(gen, 5, channels, 4, rank=6) + 0.1 * _random_conv(gen, 5, channels, 4)
        gram = activation_gram(z)
        new = update_basis(gram, basis, threshold)
        _assert_orthonormal(new)
        assert new.shape[1] <= channels
        if basis is not None:
            assert torch.equal(new[:, :basis.shape[1]], basis)
            if new.shape[1] < channels:
                assert retained_energy(gram, new) >= threshold - 1e-9
        basis = new
    assert basis.shape[1] > 6


def test_first_task_retains_just_under_threshold():
    # The strict count stops one vector before the threshold is reached.
    gen = torch.Generator().manual_seed(5)
    gram = activation_gram(_random_conv(gen, 4, 10, 4))
    basis = update_basis(gram, None, 0.9)
    full = update_basis(gram, None, 1.0)
    assert retained_energy(gram, basis) < 0.9
    assert retained_energy(gram, full[:, :basis.shape[1] + 1]) >= 0.9


@pytest.mark.parametrize("threshold, expected", [
    (0.75, 1),          # cumulative ratio 0.75 equals the threshold: not strictly below
    (0.75 - 1e-9, 1),
    (0.75 + 1e-9, 2),
    (0.5, 0),           # the first ratio alone reaches the threshold: nothing kept
    (0.875 + 1e-9, 3),  # three ratios strictly below; the last one (1.0) never is
    (1.0 - 1e-9, 3),
])
def test_first_task_count_is_strict(threshold, expected):
    # Eigenvalues 4, 2, 1, 1 (sum 8): cumulative ratios 0.5, 0.75, 0.875, 1, exact in binary.
    values = torch.tensor([1.0, 4.0, 1.0, 2.0], dtype=torch.float64)
    perm = torch.tensor([2, 0, 3, 1])
    gram = torch.diag(values)[perm][:, perm]
    ratios = values.sort(descending=True).values.cumsum(0) / values.sum()
    assert int((ratios < threshold).sum()) == expected
    assert update_basis(gram, None, threshold).shape == (4, expected)


@pytest.mark.parametrize("threshold, expected", [
    (0.75, 2),          # the second ratio equals the threshold: reached
    (0.75 + 1e-9, 3),
    (0.5, 1),           # the first direction alone reaches it
    (1.0 - 1e-9, 4),
])
def test_first_task_count_that_reaches_the_threshold(threshold, expected):
    """first_count="reach": the fewest leading directions whose ratio reaches the threshold
    (eigenvalues 4, 2, 1, 1: cumulative ratios 0.5, 0.75, 0.875, 1)."""
    gram = torch.diag(torch.tensor([4.0, 2.0, 1.0, 1.0], dtype=torch.float64))
    basis = update_basis(gram, None, threshold, first_count="reach")
    assert basis.shape == (4, expected)
    assert retained_energy(gram, basis) >= threshold


def test_sigma_energy_weighs_directions_by_singular_values():
    """Eigenvalues 16, 4, 1, 1 are singular values 4, 2, 1, 1: at threshold 0.7 the squared
    rule's ratios (0.73, ...) keep nothing below it, the singular-value rule's (0.5, 0.75)
    keep one; on an SVD of real activations both match numpy."""
    gram = torch.diag(torch.tensor([16.0, 4.0, 1.0, 1.0], dtype=torch.float64))
    assert update_basis(gram, None, 0.7, "sigma2").shape == (4, 0)
    assert update_basis(gram, None, 0.7, "sigma").shape == (4, 1)
    gen = torch.Generator().manual_seed(11)
    z = _low_rank_conv(gen, 6, 12, 4, rank=4) + 0.3 * _random_conv(gen, 6, 12, 4)
    expected = _svd_first(_matrix(z), 0.8, "sigma")
    basis = update_basis(activation_gram(z), None, 0.8, "sigma")
    assert basis.shape == expected.shape
    assert basis.shape[1] > update_basis(activation_gram(z), None, 0.8).shape[1]
    np.testing.assert_allclose(_projector(basis), _projector(expected), atol=1e-8)


def test_threshold_one_is_lossless():
    gen = torch.Generator().manual_seed(6)
    channels = 9
    eye = torch.eye(channels, dtype=torch.float64)
    z = _low_rank_conv(gen, 3, channels, 3, rank=2)
    full = update_basis(activation_gram(z), None, 1.0)
    assert full.shape == (channels, channels)
    torch.testing.assert_close(full @ full.T, eye)

    partial = update_basis(activation_gram(_random_conv(gen, 3, channels, 3)), None, 0.5)
    completed = update_basis(activation_gram(z), partial, 1.0)
    assert completed.shape == (channels, channels)
    assert torch.equal(completed[:, :partial.shape[1]], partial)
    torch.testing.assert_close(completed @ completed.T, eye)


def test_never_more_columns_than_outputs():
    gen = torch.Generator().manual_seed(7)
    channels = 6
    basis = None
    for _ in range(4):
        basis = update_basis(activation_gram(_random_conv(gen, 4, channels, 3)), basis, 0.999)
        assert basis.shape[1] <= channels
        _assert_orthonormal(basis)
    assert basis.shape[1] == channels
    again = update_basis(activation_gram(_random_conv(gen, 4, channels, 3)), basis, 0.999)
    assert torch.equal(again, basis)


def test_zero_energy_and_float32_basis():
    zero = torch.zeros(5, 5, dtype=torch.float64)
    assert update_basis(zero, None, 0.9).shape == (5, 0)
    gen = torch.Generator().manual_seed(8)
    gram = activation_gram(_random_conv(gen, 4, 5, 3))
    basis32 = update_basis(gram, None, 0.7).float()
    assert torch.equal(update_basis(zero, basis32, 0.9), basis32.double())
    grown = update_basis(activation_gram(_random_conv(gen, 4, 5, 3)), basis32, 0.95)
    assert grown.dtype == torch.float64
    assert torch.equal(grown[:, :basis32.shape[1]], basis32.double())
    _assert_orthonormal(grown)


def test_retained_energy_matches_projection_of_activations():
    gen = torch.Generator().manual_seed(9)
    z = _random_conv(gen, 4, 8, 3)
    zmat = _matrix(z)
    basis = update_basis(activation_gram(_random_conv(gen, 4, 8, 3)), None, 0.8).numpy()
    expected = np.sum((basis.T @ zmat) ** 2) / np.sum(zmat ** 2)
    assert retained_energy(activation_gram(z), torch.from_numpy(basis)) == pytest.approx(expected)
    assert retained_energy(activation_gram(z), None) == 0.0


@pytest.mark.parametrize("threshold", [0.0, -0.5])
def test_rejects_non_positive_threshold(threshold):
    with pytest.raises(ValueError):
        update_basis(torch.eye(3, dtype=torch.float64), None, threshold)


def test_rejects_unknown_energy_or_count():
    with pytest.raises(ValueError):
        update_basis(torch.eye(3, dtype=torch.float64), None, 0.9, energy="sigma3")
    with pytest.raises(ValueError):
        update_basis(torch.eye(3, dtype=torch.float64), None, 0.9, first_count="above")
