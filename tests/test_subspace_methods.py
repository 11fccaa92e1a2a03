"""GPM, Adam-NSCL and WSN: GPM's projected gradient has no component in the stored bases and
barely moves earlier tasks' outputs; Adam-NSCL's updates lie in the null space it computed;
WSN keeps earlier tasks' predictions bit-identical with masks of the requested density; and
one end-to-end run of each through main()."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

from datasets.continual_dataset import to_model_input
from datasets.seq_synthetic import SequentialSynthetic
from helpers import assert_one_line_error, build_on_cpu, cpu_context, synthetic_argv
from models.adam_nscl import null_space_projector
from utils.context import TrainingContext
from utils.main import main
from utils.subspace import patch_gram


def _learn(method, dataset, task: int, ctx: TrainingContext) -> None:
    data = dataset.train_data(task)
    method.begin_task(task, data)
    method.fit_task(task, data, ctx)
    method.end_task(task, data, ctx)


def _batch(dataset, task: int, split: str = "train") -> tuple[torch.Tensor, torch.Tensor]:
    data = dataset.train_data(task) if split == "train" else dataset.test_data(task)
    return to_model_input(data.x[:64], channels_last=True), data.y[:64]


def _logits(method, dataset, task: int) -> torch.Tensor:
    method.eval()
    with torch.inference_mode():
        out = method(_batch(dataset, task, "test")[0], task)
    method.train()
    return out


def test_patch_gram_is_the_im2col_matrix_times_its_transpose():
    conv = torch.nn.Conv2d(2, 3, 3, stride=2, padding=1, bias=False)
    x = torch.randn(2, 2, 5, 5)
    gram, columns = patch_gram(x, conv)
    patches = []
    padded = F.pad(x, (1, 1, 1, 1))
    for n in range(2):
        for i in range(3):
            for j in range(3):
                patches.append(padded[n, :, 2 * i:2 * i + 3, 2 * j:2 * j + 3].reshape(-1))
    expected = torch.stack(patches, 1).double()
    assert columns == 18
    torch.testing.assert_close(gram, expected @ expected.T)
    # Its rows follow the flattened weight: conv(x) at a position is weight.flat @ patch.
    out = conv(x)
    torch.testing.assert_close(out[0, :, 0, 0], conv.weight.reshape(3, -1) @ patches[0])


def test_gpm_gradient_has_no_component_inside_the_stored_bases(synthetic_args):
    dataset, gpm = build_on_cpu(synthetic_args, "gpm", "--gpm_threshold", "0.9", "--n_epochs", "1")
    ctx = cpu_context()
    _learn(gpm, dataset, 0, ctx)
    assert sum(b.shape[1] for b in gpm.bases.values()) > 0
    gpm.begin_task(1, dataset.train_data(1))
    x, y = _batch(dataset, 1)
    gpm.optimizer.zero_grad()
    F.cross_entropy(gpm.net(x, 1), y).backward()
    gpm.adjust_gradients()
    for name, basis in gpm.bases.items():
        weight = gpm.layers[name].weight
        grad = weight.grad.reshape(weight.shape[0], -1)
        inside = grad @ basis
        assert inside.abs().max() <= 1e-5 * max(grad.abs().max().item(), 1e-12), name


def _task0_drift(synthetic_args, model: str, *extra: str) -> float:
    """Relative change of task 0's test logits while the method learns task 1."""
    dataset, method = build_on_cpu(synthetic_args, model, "--bn_running_stats", "0", *extra)
    ctx = cpu_context()
    _learn(method, dataset, 0, ctx)
    before = _logits(method, dataset, 0)
    _learn(method, dataset, 1, ctx)
    after = _logits(method, dataset, 0)
    return ((after - before).norm() / before.norm()).item()


@pytest.mark.slow
def test_gpm_barely_moves_earlier_tasks_outputs(synthetic_args):
    gpm = _task0_drift(synthetic_args, "gpm", "--gpm_threshold", "0.999")
    sgd = _task0_drift(synthetic_args, "sgd")
    assert gpm < 0.2 * sgd, (gpm, sgd)


def test_gpm_freezes_shared_batchnorm_after_the_first_task(synthetic_args):
    dataset, gpm = build_on_cpu(synthetic_args, "gpm")
    gpm.begin_task(1, dataset.train_data(1))
    trained = {id(p) for group in gpm.optimizer.param_groups for p in group["params"]}
    names = {n for n, p in gpm.net.named_parameters() if id(p) in trained}
    assert not any(".sets." in n for n in names)
    assert {n for n in names if n.startswith("heads.")} == {"heads.1.weight", "heads.1.bias"}
    assert all(f"{n}.weight" in names for n in gpm.layers)


def test_null_space_keeps_the_eigenvalues_up_to_ratio_times_the_smallest():
    basis = torch.linalg.qr(torch.randn(4, 4, dtype=torch.float64)).Q
    covariance = basis @ torch.diag(torch.tensor([1e-3, 5e-3, 1.0, 2.0],
                                                 dtype=torch.float64)) @ basis.T
    projector = null_space_projector(covariance, eigen_ratio=10.0, normalize=False)
    torch.testing.assert_close(projector, basis[:, :2] @ basis[:, :2].T)
    normalized = null_space_projector(covariance, eigen_ratio=10.0, normalize=True)
    torch.testing.assert_close(normalized.norm(), torch.tensor(1.0, dtype=torch.float64))


def test_null_space_of_a_rank_deficient_covariance_keeps_every_null_direction():
    torch.manual_seed(0)
    features = torch.randn(200, 12, dtype=torch.float64) @ torch.randn(12, 20,
                                                                     dtype=torch.float64)
    covariance = features.T @ features / 200  # rank 12 of 20: 8 null directions
    projector = null_space_projector(covariance, eigen_ratio=10.0, normalize=False)
    assert torch.linalg.matrix_rank(projector).item() == 8
    torch.testing.assert_close(covariance @ projector, torch.zeros_like(covariance),
                               atol=1e-9, rtol=0)


def test_adam_nscl_updates_lie_in_the_computed_null_space(synthetic_args):
    dataset, nscl = build_on_cpu(synthetic_args, "adam_nscl", "--n_epochs", "1",
                           "--nscl_samples", "64", "--nscl_eigen_ratio", "50")
    ctx = cpu_context()
    _learn(nscl, dataset, 0, ctx)
    nscl.begin_task(1, dataset.train_data(1))
    before = {name: layer.weight.detach().clone() for name, layer in nscl.layers.items()}
    x, y = _batch(dataset, 1)
    nscl.optimizer_step(F.cross_entropy(nscl.net(x, 1), y))
    moved = 0
    for name, layer in nscl.layers.items():
        delta = (layer.weight.detach() - before[name]).reshape(before[name].shape[0], -1)
        covariance = nscl.gram_sums[name] / nscl.columns[name]
        projector = null_space_projector(covariance, 50.0, normalize=False).float()
        torch.testing.assert_close(delta @ projector, delta, atol=1e-6, rtol=1e-4)
        moved += int(delta.abs().max() > 0)
    assert moved > 0


@pytest.mark.slow
def test_wsn_keeps_earlier_predictions_bit_identical(synthetic_args):
    dataset, wsn = build_on_cpu(synthetic_args, "wsn", "--n_epochs", "1", "--sparsity", "0.3")
    ctx = cpu_context()
    _learn(wsn, dataset, 0, ctx)
    first = _logits(wsn, dataset, 0)
    weights = {n: layer.weight.detach().clone() for n, layer in wsn.layers.items()}
    for task in (1, 2):
        _learn(wsn, dataset, task, ctx)
    assert torch.equal(_logits(wsn, dataset, 0), first)
    moved_outside = False
    for name, mask in wsn.masks[0].items():
        now = wsn.layers[name].weight.detach()
        assert torch.equal(now[mask], weights[name][mask]), name
        moved_outside |= not torch.equal(now[~mask], weights[name][~mask])
    assert moved_outside  # later tasks did learn, outside task 0's subnetwork


def test_wsn_masks_have_the_requested_density(synthetic_args):
    dataset, wsn = build_on_cpu(synthetic_args, "wsn", "--n_epochs", "1", "--sparsity", "0.25")
    ctx = cpu_context()
    for task in (0, 1):
        _learn(wsn, dataset, task, ctx)
    for masks in wsn.masks:
        for name, mask in masks.items():
            assert mask.dtype == torch.bool
            assert int(mask.sum()) == round(0.25 * mask.numel()), name
    bits = sum(m.numel() for masks in wsn.masks for m in masks.values())
    assert wsn.memory_breakdown()["wsn_masks_packed"] == -(-bits // 8)


def test_wsn_gradients_pass_straight_through_the_mask(synthetic_args):
    """Weights get the masked gradient g * m; scores get g * W * sign(score), the gradient
    of |score| passed straight through the top-k mask (g: gradient of the masked weight)."""
    dataset, wsn = build_on_cpu(synthetic_args, "wsn")
    x, y = _batch(dataset, 0)
    masks = wsn._current_masks(straight_through=True)
    F.cross_entropy(wsn._masked_forward(x, 0, masks), y).backward()
    hard = wsn._current_masks(straight_through=False)
    effective = {f"{n}.weight": (c.weight.detach() * hard[n]).requires_grad_()
                 for n, c in wsn.layers.items()}
    F.cross_entropy(functional_call(wsn.net, effective, (x, 0)), y).backward()
    for name, conv in wsn.layers.items():
        g = effective[f"{name}.weight"].grad
        score = wsn._score(name)
        # (mask + |s|) - |s| is the mask up to one rounding, hence the tolerance.
        torch.testing.assert_close(conv.weight.grad, g * hard[name], rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(score.grad, g * conv.weight.detach() * score.detach().sign(),
                                   rtol=1e-4, atol=1e-4)


def test_wsn_refuses_weight_decay(tmp_path, capsys):
    assert_one_line_error(capsys, main, synthetic_argv(tmp_path, "--optim_wd", "0.1",
                                                       model="wsn"), "--optim_wd 0")


def test_gpm_refuses_weight_decay(tmp_path, capsys):
    assert_one_line_error(capsys, main, synthetic_argv(tmp_path, "--optim_wd", "0.1",
                                                       model="gpm"), "--optim_wd 0")


def test_wsn_refuses_shared_batchnorm(tmp_path, capsys):
    assert_one_line_error(capsys, main, synthetic_argv(tmp_path, "--per_task_bn", "0",
                                                       model="wsn"), "--per_task_bn 0")


@pytest.mark.parametrize("model", ["wsn", "adam_nscl"])
def test_adam_methods_refuse_momentum_and_follow_the_lr_schedule(synthetic_args, tmp_path,
                                                                  capsys, model):
    """Their optimizer is Adam: SGD momentum is refused, the step schedule applies."""
    assert_one_line_error(capsys, main, synthetic_argv(tmp_path, "--optim_mom", "0.9",
                                                       model=model), "drop --optim_mom")
    dataset, method = build_on_cpu(synthetic_args, model, "--lr_step", "1", "--lr_gamma", "0.5")
    method.begin_task(0, dataset.train_data(0))
    assert isinstance(method.optimizer, torch.optim.Adam)
    lrs = [group["lr"] for group in method.optimizer.param_groups]
    method.optimizer.step()  # no gradients yet: moves nothing, keeps the scheduler's order
    method.scheduler.step()
    assert [group["lr"] for group in method.optimizer.param_groups] == [lr / 2 for lr in lrs]


@pytest.mark.slow
@pytest.mark.parametrize("model,component", [("gpm", "gpm_bases"),
                                             ("adam_nscl", "nscl_covariance"),
                                             ("wsn", "wsn_masks_packed")])
def test_subspace_method_run_writes_a_complete_result(tmp_path, capsys, model, component):
    results_dir = tmp_path / "results"
    assert main(synthetic_argv(results_dir, "--nf", "4", "--n_epochs", "1", model=model)) == 0
    capsys.readouterr()
    (path,) = results_dir.rglob("*.json")
    result = json.loads(path.read_text())
    assert result["model"] == model
    matrix = result["accuracy_matrix"]
    assert [len(row) for row in matrix] == list(range(1, SequentialSynthetic.N_TASKS + 1))
    assert all(0.0 <= a <= 100.0 for row in matrix for a in row)
    breakdown = result["memory"]["breakdown_bytes"]
    assert breakdown[component] > 0
    assert result["memory"]["total_mb"] * 2 ** 20 == pytest.approx(sum(breakdown.values()))
