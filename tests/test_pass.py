"""PASS: the rotation label augmentation, the prototype augmentation and the class statistics
against hand computations, the Task-IL rotation logits, the stored prototypes and radii, the
feature distillation at the start of a task, the running statistics of the reference's passes
per step, memory and checkpoint state, and an end-to-end run through main()."""
from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from helpers import (assert_one_line_error, build_on_cpu, check_result, cpu_context,
                     run_synthetic, synthetic_argv)
from models.continual_model import tracked_norms
from models.pass_ import (Pass, augment_prototypes, class_statistics, feature_distillation,
                          rotate_batch)
from utils.main import main
from utils.sizes import network_bytes

C = 2  # seq-synthetic's classes per task


def test_rotate_batch_by_hand():
    a = torch.tensor([[1., 2.], [3., 4.]])
    x = torch.stack([a, 10 * a])[:, None]  # two 1-channel 2x2 images
    rotated, labels = rotate_batch(x, torch.tensor([1, 0]))
    # torch.rot90 over (H, W): a quarter turn counter-clockwise per k
    turns = [a, torch.tensor([[2., 4.], [1., 3.]]), torch.tensor([[4., 3.], [2., 1.]]),
             torch.tensor([[3., 1.], [4., 2.]])]
    expected = torch.stack([*turns, *(10 * t for t in turns)])[:, None]
    torch.testing.assert_close(rotated, expected)
    # image i's rotations follow it, labelled 4 y + k (the reference's target * 4 + k)
    assert labels.tolist() == [4, 5, 6, 7, 0, 1, 2, 3]


def test_augment_prototypes_is_prototype_plus_radius_times_gaussian_noise():
    prototypes = torch.tensor([[0., 1., 2.], [10., 10., 10.], [-5., 0., 5.]])
    radii = torch.tensor([0.5, 2.0, 0.0])
    features, classes = augment_prototypes(prototypes, radii, 6,
                                           torch.Generator().manual_seed(3))
    # the same generator by hand: first the classes, then N(0, 1) noise of 6 x 3
    generator = torch.Generator().manual_seed(3)
    drawn = torch.randint(3, (6,), generator=generator)
    noise = torch.randn(6, 3, generator=generator)
    assert classes.tolist() == drawn.tolist()
    for i, c in enumerate(drawn.tolist()):
        torch.testing.assert_close(features[i], prototypes[c] + radii[c] * noise[i])
    # many draws: every class, centred on its prototype with spread its radius
    features, classes = augment_prototypes(prototypes, radii, 30000,
                                           torch.Generator().manual_seed(0))
    for c in range(3):
        own = features[classes == c]
        assert len(own) > 9000
        torch.testing.assert_close(own.mean(0), prototypes[c], atol=0.1, rtol=0)
        torch.testing.assert_close(own.std(0), radii[c].expand(3), atol=0.05, rtol=0)


def test_class_statistics_by_hand():
    features = torch.tensor([[0., 0.], [1., 3.], [2., 2.], [1., 5.], [1., 10.]])
    labels = torch.tensor([0, 1, 0, 1, 1])
    means, radii = class_statistics(features, labels, 2)
    torch.testing.assert_close(means, torch.tensor([[1., 1.], [1., 6.]]))
    # class 0: unbiased variances (2, 2), trace / D = 2; class 1: (0, (9 + 1 + 16) / 2) -> 6.5
    torch.testing.assert_close(radii, torch.tensor([math.sqrt(2.), math.sqrt(6.5)]))
    with pytest.raises(Exception, match="at least two training images"):
        class_statistics(features, torch.tensor([0, 1, 0, 0, 0]), 2)


def _method(synthetic_args, *extra: str) -> tuple[Pass, object]:
    dataset, method = build_on_cpu(synthetic_args, "pass", "--nf", "4", *extra)
    return method, dataset


def _learn(method: Pass, dataset, task: int, steps: int = 2, seed: int = 0) -> None:
    """begin_task, a few steps on 32 images, end_task (with the RNG seeded)."""
    data = dataset.train_data(task)
    method.begin_task(task, data)
    method.train()
    x, y = data.x[:32].float() / 255, data.y[:32]
    for _ in range(steps):
        method.observe(x, y, task)
    torch.manual_seed(seed)
    method.end_task(task, data, cpu_context())


def _direct_statistics(method: Pass, data, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Class means and sqrt(trace(np.cov) / D) of the features of the same augmented images
    the method saw (same seed, same batches), computed without the method's helpers."""
    ctx = cpu_context()
    torch.manual_seed(seed)
    method.net.eval()
    with torch.no_grad():
        batches = [(method.net.features(x, 0), y)
                   for x, y, _ in ctx.batches(data, "", batch_size=ctx.eval_batch_size)]
    method.net.train()
    features = torch.cat([f for f, _ in batches])
    labels = torch.cat([y for _, y in batches])
    assert len(features) == len(data)
    one_hot = F.one_hot(labels, C).float()
    means = (one_hot.T @ features) / one_hot.sum(0)[:, None]
    radii = torch.stack([(torch.cov(features[labels == c].T).trace() / features.shape[1]).sqrt()
                         for c in range(C)])
    return means, radii


def test_prototypes_and_radii_after_a_task_are_the_class_means_and_radii(synthetic_args):
    method, dataset = _method(synthetic_args)
    assert method.prototypes.shape == (0, method.net.feature_dim)
    _learn(method, dataset, 0, seed=5)
    means, radii = _direct_statistics(method, dataset.train_data(0), seed=5)
    torch.testing.assert_close(method.prototypes, means)
    torch.testing.assert_close(method.radii, radii)
    assert method.old_net is None

    _learn(method, dataset, 1, seed=6)  # the second task's are appended after the first's
    assert method.prototypes.shape == (2 * C, method.net.feature_dim)
    torch.testing.assert_close(method.prototypes[:C], means)
    later_means, later_radii = _direct_statistics(method, dataset.train_data(1), seed=6)
    torch.testing.assert_close(method.prototypes[C:], later_means)
    torch.testing.assert_close(method.radii, torch.cat((radii, later_radii)))
    assert method.old_net is None

    # the reference's one radius: sqrt of the mean of the first task's r_c^2, for every class
    first = (radii.square().mean()).sqrt()
    torch.testing.assert_close(method.augmentation_radii(), first.expand(2 * C))
    method.args.proto_radius = "class"
    torch.testing.assert_close(method.augmentation_radii(), method.radii)


def test_rotation_logits_interleave_the_task_head_and_its_rotation_head(synthetic_args):
    method, _ = _method(synthetic_args)
    features = torch.randn(3, method.net.feature_dim)
    logits = method.rotation_logits(features, 2)
    plain = method.net.task_logits(features, 2)
    rotated = method.rotation_heads[2](features)
    assert logits.shape == (3, 4 * C)
    for c in range(C):
        torch.testing.assert_close(logits[:, 4 * c], plain[:, c])  # what predict reads
        for k in (1, 2, 3):
            torch.testing.assert_close(logits[:, 4 * c + k], rotated[:, 3 * c + k - 1])
    # mixed tasks: each sample through its own task's heads
    tasks = torch.tensor([1, 0, 1])
    mixed = method.old_rotation_logits(features, tasks, 2)
    for i, t in enumerate(tasks.tolist()):
        torch.testing.assert_close(mixed[i], method.rotation_logits(features, t)[i])


def test_proto_aug_loss_scores_old_prototypes_with_their_own_heads(synthetic_args):
    method, dataset = _method(synthetic_args)
    for task in (0, 1):
        _learn(method, dataset, task)
    method.begin_task(2, dataset.train_data(2))
    torch.manual_seed(11)
    loss = method.proto_aug_loss(2)
    torch.manual_seed(11)
    features, classes = augment_prototypes(method.prototypes, method.augmentation_radii(),
                                           method.args.batch_size)
    expected = torch.stack([
        F.cross_entropy(method.rotation_logits(features[i:i + 1], c // C) / 0.1,
                        torch.tensor([4 * (c % C)]))  # the class un-rotated, temperature 0.1
        for i, c in enumerate(classes.tolist())]).mean()
    torch.testing.assert_close(loss, expected)
    method.zero_grad(set_to_none=True)
    loss.backward()
    # the old heads learn from it; the current and later ones stay out of the graph
    for t in range(method.n_tasks):
        used = t < 2
        assert (method.net.head(t).weight.grad is not None) == used, t
        assert (method.rotation_heads[t].weight.grad is not None) == used, t


def test_proto_aug_weight_0_leaves_the_old_heads_untouched(synthetic_args):
    """With protoAug off nothing trains task 0's heads in task 1; Adam's weight decay on a
    zero gradient would still move them by about lr per step, so they must stay out of
    the step."""
    method, dataset = _method(synthetic_args, "--proto_aug_weight", "0", "--optim_wd", "2e-4")
    _learn(method, dataset, 0)
    old_heads = [copy.deepcopy(h.state_dict())
                 for h in (method.net.head(0), method.rotation_heads[0])]
    data = dataset.train_data(1)
    method.begin_task(1, data)
    method.train()
    before = copy.deepcopy(method.net.head(1).state_dict())
    for start in range(0, 48, 16):
        method.observe(data.x[start:start + 16].float() / 255, data.y[start:start + 16], 1)
    for head, state in zip((method.net.head(0), method.rotation_heads[0]), old_heads):
        for name, value in head.state_dict().items():
            assert torch.equal(value, state[name]), name
    assert not torch.equal(method.net.head(1).weight, before["weight"])  # the step ran


def _at_task_1(synthetic_args, *extra: str):
    method, dataset = _method(synthetic_args, *extra)
    _learn(method, dataset, 0)
    data = dataset.train_data(1)
    method.begin_task(1, data)
    method.train()
    return method, *rotate_batch(data.x[:16].float() / 255, data.y[:16])


def test_feature_distillation_is_zero_at_the_start_of_a_task(synthetic_args):
    method, x, _ = _at_task_1(synthetic_args)
    assert not method.old_net.training
    method.eval()  # both networks normalise with the running statistics
    with torch.no_grad():
        assert feature_distillation(method.net.features(x, 1),
                                    method.old_net.features(x, 1)).item() == 0.0
    method.train()
    assert not method.old_net.training  # the frozen copy stays in eval mode

    with torch.no_grad():
        for p in method.net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    features = method.net.features(x, 1)
    loss = feature_distillation(features, method.old_net.features(x, 1))
    # the reference's torch.dist: the norm of the whole difference, neither squared nor a mean
    old = method.old_net.features(x, 1)
    assert loss.item() == pytest.approx(((features - old) ** 2).sum().sqrt().item(), rel=1e-5)
    loss.backward()
    assert all(m.weight.grad.abs().sum() > 0 for m in method.net.conv_layers().values())
    assert all(p.grad is None for p in method.old_net.parameters())


def test_the_training_loss_starts_a_task_with_zero_distillation(synthetic_args):
    """With batch-statistics BatchNorm in both modes the two networks agree exactly at the
    first step, so the distillation weight does not change the loss there."""
    method, x, y = _at_task_1(synthetic_args, "--bn_running_stats", "0")
    x, y = x[::4], y[::4] // 4  # the un-rotated images and labels
    method.args.proto_aug_weight = method.args.kd_weight = 0.0
    without = method.pass_loss(x, y, 1)
    method.args.kd_weight = 10.0
    torch.testing.assert_close(method.pass_loss(x, y, 1), without)


def _running_statistics(net) -> list[torch.Tensor]:
    return [s.clone() for norm in tracked_norms(net) for s in (norm.running_mean,
                                                                norm.running_var)]


@pytest.mark.parametrize("task, passes", [(0, 1), (1, 2)])
def test_running_statistics_move_as_the_references_passes_per_step(synthetic_args, task,
                                                                   passes):
    """The reference's step runs the network once on the first task and twice after it (the
    logits, then the features): its running statistics, from an untouched copy run that many
    times in training mode, against ours after one step."""
    method, dataset = _method(synthetic_args)
    if task:
        _learn(method, dataset, 0)
    data = dataset.train_data(task)
    method.begin_task(task, data)
    method.train()
    x, y = data.x[:16].float() / 255, data.y[:16]
    reference = copy.deepcopy(method.net)
    for norm in tracked_norms(reference):
        norm.momentum = 0.1  # PyTorch's, which the backbone builds with
    with torch.no_grad():
        for _ in range(passes):
            reference.features(rotate_batch(x, y)[0], task)
    before = _running_statistics(method.net)
    method.observe(x, y, task)
    after = _running_statistics(method.net)
    assert all(not torch.equal(a, b) for a, b in zip(after, before))
    for ours, theirs in zip(after, _running_statistics(reference)):
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)


def test_memory_and_checkpoint_hold_the_prototypes_and_rotation_heads(synthetic_args):
    method, dataset = _method(synthetic_args)
    _learn(method, dataset, 0)
    d = method.net.feature_dim
    assert method.memory_breakdown() == {
        "network": network_bytes(method.net),
        "rotation_heads": method.net.n_tasks * (d + 1) * 3 * C * 4,
        "prototypes": C * d * 4, "radii": C * 4}
    state = method.checkpoint_state()
    assert {key.split(".")[0] for key in state["model"]} == {"net", "rotation_heads"}
    fresh, _ = _method(synthetic_args)
    fresh.load_checkpoint_state(state)
    torch.testing.assert_close(fresh.prototypes, method.prototypes)
    torch.testing.assert_close(fresh.radii, method.radii)
    features = torch.randn(2, d)
    torch.testing.assert_close(fresh.rotation_logits(features, 0),
                               method.rotation_logits(features, 0))


def test_pass_refuses_per_task_batchnorm_and_momentum(tmp_path, capsys):
    assert_one_line_error(capsys, main, synthetic_argv(tmp_path, "--per_task_bn", "1",
                                                       model="pass"), "pass", "--per_task_bn")
    assert_one_line_error(capsys, main, synthetic_argv(tmp_path, "--optim_mom", "0.9",
                                                       model="pass"), "Adam", "--optim_mom")


@pytest.mark.slow
def test_run_writes_a_complete_result(tmp_path, capsys):
    result, _ = run_synthetic(tmp_path, capsys, "--n_epochs", "1", "--proto_radius", "class",
                              model="pass")
    check_result(result, "pass")
    assert result["config"]["kd_weight"] == 10.0 and result["config"]["temperature"] == 0.1
    assert set(result["memory"]["breakdown_bytes"]) == {"network", "rotation_heads",
                                                        "prototypes", "radii"}
    radii = result["method"]["class_radii"]
    assert len(radii) == 5 * C and all(r > 0 for r in radii)
