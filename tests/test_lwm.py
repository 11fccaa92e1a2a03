"""Learning without Memorizing: the Grad-CAM map and the attention-distillation loss against
hand computations, the loss's gradient into the new network, the frozen copy's lifetime
(memory, checkpoints), and end-to-end runs through main()."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from backbone.contract import TaskNetwork
from helpers import (assert_one_line_error, build_on_cpu, check_result, cpu_context,
                     network_bytes, run_synthetic, synthetic_argv)
from models.continual_model import exact_bn_statistics, tracked_norms
from models.lwm import attention_distillation_loss, class_attention, forward_with_map, grad_cam
from utils.main import main
from utils.sizes import network_bytes as module_bytes

# A known feature map: two images, two channels, 2 x 2 positions.
FEATURE_MAP = torch.tensor([
    [[[1., 2.], [3., 4.]], [[0., -1.], [2., -3.]]],
    [[[1., 0.], [0., 1.]], [[-1., 1.], [0., 2.]]],
])
# Head 0's class 0 and head 1's class 1, as weights over the flattened feature map (channel,
# row, column): the gradients of those logits with respect to the map.
HEAD0_CLASS0 = torch.tensor([[[.5, .5], [.5, .5]], [[-1., -3.], [0., 0.]]])
HEAD1_CLASS1 = torch.tensor([[[4., 0.], [0., 0.]], [[2., 2.], [2., 2.]]])


class Probe(TaskNetwork):
    """Two heads reading a 1x1 identity conv's output, flattened: the conv's output is the
    input (a known feature map) and each logit's gradient is its head's weight row."""

    def __init__(self) -> None:
        super().__init__()
        self.n_tasks = 2
        self.conv = nn.Conv2d(2, 2, 1, bias=False)
        self.heads = nn.ModuleList(nn.Linear(8, 2, bias=False) for _ in range(2))
        with torch.no_grad():
            self.conv.weight.copy_(torch.eye(2).view(2, 2, 1, 1))
            self.heads[0].weight.copy_(torch.stack([HEAD0_CLASS0, -HEAD0_CLASS0]).flatten(1))
            self.heads[1].weight.copy_(torch.stack([-HEAD1_CLASS1, HEAD1_CLASS1]).flatten(1))

    def features(self, x, task):
        return self.conv(x).flatten(1)

    def task_logits(self, features, task):
        return self.heads[task](features)


def test_grad_cam_matches_a_hand_computation():
    # Image 0: logits (head 0 | head 1) 8, -8 | 0, 0, so class 0; weights alpha = the spatial
    # means of HEAD0_CLASS0 = (0.5, -1): ReLU(0.5 A_0 - A_1) = ReLU([[.5, 2], [-.5, 5]]).
    # Image 1: logits -1, 1 | -8, 8, so class 3 (head 1's second); alpha = (1, 2):
    # ReLU(A_0 + 2 A_1) = ReLU([[-1, 2], [0, 5]]).
    expected = torch.tensor([[[.5, 2.], [0., 5.]], [[0., 2.], [0., 5.]]])
    net = Probe()
    result = grad_cam(net, net.conv, FEATURE_MAP, n_heads=2)
    torch.testing.assert_close(torch.cat(result.logits, 1),
                               torch.tensor([[8., -8., 0., 0.], [-1., 1., -8., 8.]]))
    assert result.classes.tolist() == [0, 3]
    torch.testing.assert_close(result.maps, expected)
    assert not result.maps.requires_grad and not net.conv._forward_hooks  # hook removed
    # Each image its own class (FACIL's logits[:, classes] would mix both images' classes).
    feature_map, logits = forward_with_map(net, net.conv, FEATURE_MAP, 2)
    swapped = class_attention(feature_map, logits, torch.tensor([3, 0]))
    # image 0 for class 3: ReLU(A_0 + 2 A_1) = ReLU([[1, 0], [7, -2]]); image 1 for class 0:
    # ReLU(0.5 A_0 - A_1) = ReLU([[1.5, -1], [0, -1.5]])
    torch.testing.assert_close(swapped, torch.tensor([[[1., 0.], [7., 0.]],
                                                      [[1.5, 0.], [0., 0.]]]))
    # A frozen network (the old copy) gives the same maps, from the feature map itself.
    frozen = copy.deepcopy(net).requires_grad_(False)
    with torch.no_grad():
        torch.testing.assert_close(grad_cam(frozen, frozen.conv, FEATURE_MAP, 2).maps, expected)
    # With the graph kept, the maps lead back to the weights (here: the heads' only).
    feature_map, logits = forward_with_map(net, net.conv, FEATURE_MAP, 2)
    kept = class_attention(feature_map, logits, result.classes, create_graph=True)
    torch.testing.assert_close(kept, expected)
    (head0,) = torch.autograd.grad(kept.sum(), net.heads[0].weight)
    # d/dW of sum ReLU(sum_k mean(W_k) A_k) for image 0 (class 0 is head 0's row 0):
    # sum over the positive positions of A_k / 4, per channel k, spread over W_k's entries
    positive = expected[0] > 0
    per_channel = torch.stack([(FEATURE_MAP[0, k] * positive).sum() / 4 for k in range(2)])
    torch.testing.assert_close(head0[0], per_channel.repeat_interleave(4))
    torch.testing.assert_close(head0[1], torch.zeros(8))


def test_attention_distillation_loss_matches_a_hand_computation():
    maps = torch.rand(3, 4, 4)
    assert attention_distillation_loss(maps, maps.clone()).item() == 0.0
    # Normalised first: a map and a positive multiple of it do not differ.
    assert attention_distillation_loss(maps, 3 * maps).item() == pytest.approx(0.0, abs=1e-6)
    new = torch.tensor([[[3., 4.], [0., 0.]], [[1., 1.], [1., 1.]], [[0., 0.], [0., 0.]]])
    old = torch.tensor([[[0., 0.], [1., 0.]], [[2., 2.], [2., 2.]], [[0., 5.], [0., 0.]]])
    # image 0: |0.6 - 0| + |0.8 - 0| + |0 - 1| = 2.4; image 1: equal once normalised, 0;
    # image 2: an all-zero map stays zero, |0 - 1| = 1; batch mean (2.4 + 0 + 1) / 3
    loss = attention_distillation_loss(new, old)
    assert loss.item() == pytest.approx(3.4 / 3, rel=1e-6)
    assert attention_distillation_loss(old, new).item() == pytest.approx(3.4 / 3, rel=1e-6)


def _method_at_task_1(synthetic_args, *extra: str):
    """An lwm method that has learned a little of task 0 and begun task 1 (the running
    statistics those of the batch), with a batch of task 1's images."""
    dataset, method = build_on_cpu(synthetic_args, "lwm", "--lr", "0.05", *extra)
    first = dataset.train_data(0).subset(torch.arange(32))
    method.begin_task(0, first)
    method.train()
    for _ in range(3):
        method.observe(first.x.float() / 255, first.y, 0)
    method.end_task(0, first, cpu_context())
    second = dataset.train_data(1).subset(torch.arange(16))
    # Running statistics those of this batch, so that the network in eval mode and in
    # training mode on it differ only by the running variance's unbiased estimate (a few
    # steps leave the running statistics near their initial values, far from any batch's).
    exact_bn_statistics(tracked_norms(method.net), lambda x: method.net.features(x, 0),
                        [(second.x.float() / 255,)])
    method.begin_task(1, second)
    method.train()
    return method, second.x.float() / 255, second.y


def _perturb(net: nn.Module, scale: float) -> None:
    with torch.no_grad():
        for p in net.parameters():
            p.add_(scale * torch.randn_like(p))


def test_attention_loss_compares_the_map_the_features_pool_and_backpropagates(synthetic_args):
    method, x, y = _method_at_task_1(synthetic_args)
    # the map is the one the features pool: the last block's output, after its ReLU
    maps = []
    layer = method.net.get_submodule(method.gradcam_layer)
    handle = layer.register_forward_hook(lambda _m, _i, output: maps.append(output))
    method.net.eval()  # the frozen copy's mode: the two networks are then the same function
    with torch.no_grad():
        features = method.net.features(x, 0)
    handle.remove()
    assert (maps[0] >= 0).all()
    torch.testing.assert_close(
        F.adaptive_avg_pool2d(maps[0], method.net.pooled_side).flatten(1), features)
    _, attention = method.task_losses(x, y, 1)
    assert attention.item() == pytest.approx(0.0, abs=1e-5)  # the copy is the network itself

    method.net.train()  # the training pass: the batch's statistics against the stored ones
    _, attention = method.task_losses(x, y, 1)
    assert attention.item() < 0.05  # here equal but for the unbiased running variance
    torch.manual_seed(1)
    _perturb(method.net, 0.05)
    _, attention = method.task_losses(x, y, 1)
    assert attention.item() > 1e-3
    assert method.net.training and not method.old_net.training
    convs = {name: m.weight for name, m in method.net.conv_layers().items()}
    heads = [method.net.head(t).weight for t in (0, 1)]
    grads = torch.autograd.grad(attention, [*convs.values(), *heads], allow_unused=True)
    for name, grad in zip(convs, grads):  # every conv: through the map (and its weights)
        assert grad is not None and grad.abs().sum() > 0 and torch.isfinite(grad).all(), name
    # The old head reaches the loss only through the Grad-CAM weights (the gradient kept
    # with create_graph); the current head not at all.
    assert grads[-2] is not None and grads[-2].abs().sum() > 0
    assert grads[-1] is None
    assert all(p.grad is None and not p.requires_grad for p in method.old_net.parameters())


def test_gamma_changes_the_step(synthetic_args):
    """The attention loss moves the weights (FACIL's detached maps would not)."""
    method, x, y = _method_at_task_1(synthetic_args)
    torch.manual_seed(1)
    _perturb(method.net, 0.05)
    without = copy.deepcopy(method)
    without.args.gamma = 0.0
    for m in (method, without):
        m.reset_optimizer()
        m.observe(x, y, 1)
    conv = method.gradcam_layer + ".conv2.weight"  # a conv of the block whose map is used
    assert not torch.allclose(method.net.state_dict()[conv], without.net.state_dict()[conv])


def test_the_frozen_copy_lives_only_while_a_task_is_trained(synthetic_args):
    method, x, y = _method_at_task_1(synthetic_args)
    assert any(key.startswith("old_net.") for key in method.state_dict())
    method.observe(x, y, 1)
    method.end_task(1, None, cpu_context())
    assert method.old_net is None
    state = method.checkpoint_state()
    assert set(state["model"]) == {f"net.{key}" for key in method.net.state_dict()}
    assert method.memory_breakdown() == {"network": module_bytes(method.net)}
    _, fresh = build_on_cpu(synthetic_args, "lwm")
    fresh.load_checkpoint_state(state)
    fresh.eval()
    method.eval()
    with torch.no_grad():
        torch.testing.assert_close(fresh(x, 0), method(x, 0))


def test_lwm_refuses_per_task_batchnorm(tmp_path, capsys):
    argv = synthetic_argv(tmp_path, "--per_task_bn", "1", model="lwm")
    assert_one_line_error(capsys, main, argv, "lwm", "--per_task_bn")


@pytest.mark.slow
def test_run_writes_a_complete_result_with_its_memory(tmp_path, capsys):
    extra = ("--n_epochs", "1", "--beta", "1.0", "--gamma", "1.0", "--temperature", "2.0")
    result, _ = run_synthetic(tmp_path, capsys, *extra, model="lwm")
    check_result(result, "lwm")
    assert result["config"]["gamma"] == 1.0 and result["config"]["beta"] == 1.0
    # the frozen copy lives only while a task is trained
    assert result["memory"]["breakdown_bytes"] == {"network": network_bytes(*extra,
                                                                            model="lwm")}
