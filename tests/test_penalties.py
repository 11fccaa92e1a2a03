"""The regularisation baselines: the shared quadratic penalty, online EWC's Fisher, SI's path
integral, LwF's frozen targets, and one end-to-end run of each through main()."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from backbone import build_backbone
from datasets.continual_dataset import TaskData
from datasets.seq_synthetic import SequentialSynthetic
from helpers import (assert_one_line_error, build_on_cpu, check_result, cpu_context,
                     network_bytes, run_synthetic, synthetic_argv)
from models import ewc_on
from models.lwf import distillation_loss
from models.penalty import QuadraticPenalty
from utils.args import parse_args
from utils.main import main


def _images(data: TaskData) -> torch.Tensor:
    return data.x.float() / 255


def _perturb(net: nn.Module, scale: float = 0.05) -> None:
    with torch.no_grad():
        for p in net.parameters():
            p.add_(scale * torch.randn_like(p))


def test_penalty_is_zero_at_the_anchor_and_quadratic_away_from_it():
    layer = nn.Linear(3, 2)
    penalty = QuadraticPenalty(layer.parameters())
    assert penalty().item() == 0.0  # nothing consolidated yet
    importance = [torch.full_like(p, 2.0) for p in layer.parameters()]
    penalty.consolidate(importance)
    assert penalty().item() == 0.0
    step = [torch.randn_like(p) for p in layer.parameters()]
    values = []
    for scale in (1.0, 2.0, 3.0):
        with torch.no_grad():
            for p, a, d in zip(layer.parameters(), penalty.anchor, step):
                p.copy_(a + scale * d)
        values.append(penalty().item())
    expected = sum(2.0 * d.pow(2).sum().item() for d in step)
    assert values == pytest.approx([expected, 4 * expected, 9 * expected], rel=1e-5)


def _independent_fisher(method, data: TaskData, task: int) -> list[torch.Tensor]:
    """Mean over samples of p(y|x) times the squared gradient of log p(y|x) (mammoth's
    estimator), one sample at a time."""
    params = list(method.net.shared_parameters().values())
    method.eval()
    fisher = [torch.zeros_like(p) for p in params]
    for x, y in zip(_images(data), data.y):
        log_p = F.log_softmax(method.net(x[None], task), dim=1)[0, y]
        for f, g in zip(fisher, torch.autograd.grad(log_p, params)):
            f += log_p.detach().exp() * g.pow(2) / len(data)
    method.train()
    return fisher


def test_online_fisher_decays_with_gamma(synthetic_args):
    dataset, method = build_on_cpu(synthetic_args, "ewc_on", "--gamma", "0.5")
    ctx = cpu_context()
    first = dataset.train_data(0).subset(torch.arange(6))
    second = dataset.train_data(1).subset(torch.arange(6))

    method.begin_task(0, first)
    f1 = _independent_fisher(method, first, 0)
    method.end_task(0, first, ctx)
    for w, f in zip(method.penalty.importance, f1):
        torch.testing.assert_close(w, f)
    assert method.penalty().item() == 0.0  # the anchor is the current weights

    method.begin_task(1, second)
    _perturb(method.net)  # stands for training on the second task
    f_new = _independent_fisher(method, second, 1)
    method.end_task(1, second, ctx)
    for w, old, new in zip(method.penalty.importance, f1, f_new):
        torch.testing.assert_close(w, 0.5 * old + new)
    for a, p in zip(method.penalty.anchor, method.penalty.params):
        assert torch.equal(a, p)


@pytest.mark.parametrize("extra", [(), ("--bn_running_stats", "0"), ("--per_task_bn", "1")])
def test_per_sample_fisher_matches_one_backward_pass_per_sample(synthetic_args, extra,
                                                               monkeypatch):
    """Both ways of computing it: the loop (CPU) and the vmap over chunks (CUDA), here over
    three chunks, the last one short."""
    monkeypatch.setattr(ewc_on, "VMAP_CHUNK", 4)
    dataset, method = build_on_cpu(synthetic_args, "ewc_on", *extra)
    data = dataset.train_data(1).subset(torch.arange(10))
    _perturb(method.net)
    expected = _independent_fisher(method, data, 1)
    looped = method.fisher(1, data, cpu_context())
    method.eval()
    vmapped = method._vmapped_fisher(1, data, cpu_context())
    for f, v, e in zip(looped, vmapped, expected):
        torch.testing.assert_close(f, e)
        assert v.grad_fn is None
        # Same arithmetic in another order; batch-of-one BatchNorm (extra1) is ill-conditioned,
        # so single elements can differ by 1e-3 relative: compare whole tensors.
        assert (v - e).norm() <= 1e-4 * e.norm() + 1e-12
    assert any(bool(f.abs().sum() > 0) for f in expected)


def test_batched_fisher_of_one_batch_is_the_squared_summed_gradient(synthetic_args):
    dataset, method = build_on_cpu(synthetic_args, "ewc_on", "--fisher_batch_size", "4")
    data = dataset.train_data(0).subset(torch.arange(4))
    params = list(method.net.shared_parameters().values())
    method.eval()
    log_likelihood = F.log_softmax(method.net(_images(data), 0), dim=1)[torch.arange(4), data.y]
    grads = torch.autograd.grad(log_likelihood.sum(), params)
    weight = log_likelihood.detach().mean().exp()
    for f, g in zip(method.fisher(0, data, cpu_context()), grads):
        torch.testing.assert_close(f, weight * g.pow(2) / 4)


def test_mammoths_fisher_is_taken_in_training_mode_on_its_training_batches(synthetic_args):
    """--fisher_mode mammoth: each augmented, shuffled image normalised by BatchNorm with its
    own statistics (the running ones move, as in mammoth); the exact mode's running-statistics
    Fisher is another quantity. --model_config best pairs mammoth's e_lambda with its mode."""
    dataset, method = build_on_cpu(synthetic_args, "ewc_on", "--fisher_mode", "mammoth")
    data = dataset.train_data(0).subset(torch.arange(6))
    ctx = cpu_context()
    _perturb(method.net)
    params = list(method.net.shared_parameters().values())
    torch.manual_seed(3)
    batches = [(x, y) for x, y, _ in ctx.batches(data, "fisher", batch_size=1)]
    method.net.train()
    expected = [torch.zeros_like(p) for p in params]
    for x, y in batches:
        log_p = F.log_softmax(method.net(x, 0), dim=1)[0, y[0]]
        for f, g in zip(expected, torch.autograd.grad(log_p, params)):
            f += log_p.detach().exp() * g.pow(2) / len(batches)
    bn = next(m for m in method.net.modules() if isinstance(m, nn.BatchNorm2d))
    before = bn.running_mean.clone()
    method.eval()
    torch.manual_seed(3)
    fisher = method.fisher(0, data, ctx)
    assert not method.training  # the mode it was called in
    assert not torch.equal(bn.running_mean, before)  # mammoth's pass moves them
    for f, e in zip(fisher, expected):
        torch.testing.assert_close(f, e)
    exact = build_on_cpu(synthetic_args, "ewc_on")[1]
    exact.load_state_dict(method.state_dict())
    assert any(not torch.allclose(f, e) for f, e in zip(fisher, exact.fisher(0, data, ctx)))
    best = parse_args(["--model", "ewc_on", "--dataset", "seq-cifar10", "--model_config",
                       "best"])
    assert (best.fisher_mode, best.e_lambda) == ("mammoth", 10.0)


def test_si_importance_of_one_plain_sgd_step(synthetic_args):
    """One step of momentum-free SGD moves each weight by -lr * g, so omega = lr * g^2 >= 0 and
    the importance is lr * g^2 / ((lr * g)^2 + xi)."""
    lr, xi = 0.01, 0.5
    dataset, method = build_on_cpu(synthetic_args, "si", "--lr", str(lr), "--xi", str(xi))
    data = dataset.train_data(0).subset(torch.arange(16))
    x, y = _images(data), data.y
    params = method.penalty.params
    method.begin_task(0, data)
    method.train()
    grads = torch.autograd.grad(F.cross_entropy(method.net(x, 0), y), params)
    before = F.cross_entropy(method.net(x, 0), y).item()
    method.observe(x, y, 0)
    assert F.cross_entropy(method.net(x, 0), y).item() < before
    method.end_task(0, data, cpu_context())

    importance = method.penalty.importance
    for w, g in zip(importance, grads):
        # float32 steps of lr * g on weights of order 1 carry a relative error of ~1e-4
        torch.testing.assert_close(w, lr * g.pow(2) / ((lr * g).pow(2) + xi),
                                   rtol=1e-3, atol=1e-8)
    assert all((w >= 0).all() for w in importance)
    assert sum(w.sum() for w in importance) > 0
    assert method.penalty().item() == 0.0  # at the anchor
    _perturb(method.net)
    assert method.penalty().item() > 0.0
    assert method.omega is None  # the path integral is training-time state only


def test_si_path_integral_ignores_the_penalty_gradient(synthetic_args):
    """With the penalty active omega still accumulates -g_task * delta, not -g_total * delta."""
    dataset, method = build_on_cpu(synthetic_args, "si", "--c", "100")
    data = dataset.train_data(0).subset(torch.arange(8))
    x, y = _images(data), data.y
    method.begin_task(0, data)
    method.end_task(0, data, cpu_context())
    _perturb(method.net)  # away from the anchor: a large penalty gradient
    method.begin_task(1, data)
    method.train()
    params = method.penalty.params
    grads = torch.autograd.grad(F.cross_entropy(method.net(x, 1), y), params)
    before = [p.detach().clone() for p in params]
    method.observe(x, y, 1)
    for omega, g, p, b in zip(method.omega, grads, params, before):
        torch.testing.assert_close(omega, -g * (p.detach() - b), rtol=1e-4, atol=1e-9)


def test_si_mammoth_mode_clips_the_total_gradient_and_accumulates_lr_g_squared(
        synthetic_args):
    """mammoth's SI step: the gradient of task loss plus penalty, clipped to [-1, 1], moves
    each weight by -lr * g and adds lr * g^2 to omega."""
    lr = 0.05
    dataset, method = build_on_cpu(synthetic_args, "si", "--omega_mode", "mammoth",
                                   "--lr", str(lr), "--c", "100")
    data = dataset.train_data(0).subset(torch.arange(8))
    x, y = _images(data), data.y
    method.begin_task(0, data)
    method.end_task(0, data, cpu_context())
    _perturb(method.net)  # away from the anchor: a large penalty gradient, clipped
    method.begin_task(1, data)
    method.train()
    params = method.penalty.params
    loss = F.cross_entropy(method.net(x, 1), y) + 100 * method.penalty()
    grads = [g.clamp(-1, 1) for g in torch.autograd.grad(loss, params)]
    assert any((g.abs() == 1).any() for g in grads)  # the clip is reached
    before = [p.detach().clone() for p in params]
    method.observe(x, y, 1)
    for omega, g, p, b in zip(method.omega, grads, params, before):
        torch.testing.assert_close(p.detach() - b, -lr * g, rtol=1e-4, atol=1e-7)
        torch.testing.assert_close(omega, lr * g.pow(2), rtol=1e-4, atol=1e-9)
    best = parse_args(["--model", "si", "--dataset", "seq-cifar10", "--model_config", "best"])
    assert (best.omega_mode, best.c, best.lr) == ("mammoth", 0.5, 0.03)


def test_lwf_targets_come_from_the_network_before_the_task(synthetic_args):
    dataset, method = build_on_cpu(synthetic_args, "lwf")
    ctx = cpu_context()
    first = dataset.train_data(0).subset(torch.arange(16))
    x = _images(dataset.train_data(1).subset(torch.arange(8)))
    method.begin_task(0, first)
    method.observe(_images(first), first.y, 0)
    method.end_task(0, first, ctx)
    method.eval()
    with torch.no_grad():
        before = method.net(x, 0)

    method.begin_task(1, dataset.train_data(1))
    method.train()
    targets = method.old_targets(x, 1)
    assert len(targets) == 1
    torch.testing.assert_close(targets[0], before)
    _perturb(method.net, scale=0.5)
    second = dataset.train_data(1).subset(torch.arange(8))
    method.observe(_images(second), second.y, 1)
    method.eval()
    with torch.no_grad():
        assert not torch.allclose(method.net(x, 0), before)
    torch.testing.assert_close(method.old_targets(x, 1)[0], before)
    method.end_task(1, second, ctx)
    assert method.old_net is None


def test_distillation_has_the_gradient_of_lwfs_softened_cross_entropy():
    """The LwF paper's, mammoth's and FACIL's loss: -sum softmax(old / T) log softmax(new / T),
    batch mean; no T^2 factor, so their published weights apply unscaled."""
    torch.manual_seed(0)
    old = torch.randn(4, 3)
    new = torch.randn(4, 3, requires_grad=True)
    temperature = 2.0
    distillation_loss(new, old, temperature).backward()
    # by hand: d/d new = (softmax(new / T) - softmax(old / T)) / T / batch
    expected = (F.softmax(new.detach() / temperature, 1)
                - F.softmax(old / temperature, 1)) / temperature / 4
    torch.testing.assert_close(new.grad, expected)
    assert distillation_loss(old, old, temperature).item() == pytest.approx(0.0, abs=1e-6)
    assert distillation_loss(new.detach(), old, temperature).item() > 0


def test_lwf_refuses_per_task_batchnorm(tmp_path, capsys):
    argv = synthetic_argv(tmp_path, "--per_task_bn", "1", model="lwf")
    assert_one_line_error(capsys, main, argv, "lwf", "--per_task_bn")


def _shared_bytes(*extra: str, model: str) -> int:
    """4 bytes per shared float: every network parameter outside the heads (one BN set)."""
    args = parse_args(synthetic_argv(Path("unused"), *extra, model=model))
    net = build_backbone(args, SequentialSynthetic)
    return sum(p.numel() * 4 for n, p in net.named_parameters() if not n.startswith("heads."))


@pytest.mark.slow
@pytest.mark.parametrize("model, extra", [
    ("ewc_on", ("--fisher_batch_size", "8", "--e_lambda", "5", "--gamma", "0.9")),
    ("si", ("--c", "0.5", "--xi", "1.0")),
    ("lwf", ("--alpha", "1.0", "--temperature", "2.0")),
])
def test_run_writes_a_complete_result_with_its_memory(tmp_path, capsys, model, extra):
    extra = ("--n_epochs", "1", *extra)
    result, _ = run_synthetic(tmp_path, capsys, *extra, model=model)
    check_result(result, model)
    breakdown = result["memory"]["breakdown_bytes"]
    network = network_bytes(*extra, model=model)
    if model == "lwf":  # the frozen copy lives only while a task is trained
        assert breakdown == {"network": network}
    else:
        shared = _shared_bytes(*extra, model=model)
        assert breakdown == {"network": network, "penalty_anchor": shared,
                             "penalty_importance": shared}
