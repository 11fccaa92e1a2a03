"""The ResNet backbone: sizes, per-task BatchNorm, multi-head Task-IL logits."""
import pytest
import torch
import torch.nn as nn

from backbone import build_backbone
from backbone.resnet import ResNet
from datasets.seq_synthetic import SequentialSynthetic
from utils.args import parse_args


def _convs(net: nn.Module) -> list[nn.Conv2d]:
    return [m for m in net.modules() if isinstance(m, nn.Conv2d)]


def _expected_conv_weights(nf: int, blocks=(2, 2, 2, 2), in_channels: int = 3) -> int:
    """Count by hand: 3x3 stem, two 3x3 convs per BasicBlock, a 1x1 shortcut per widening."""
    total = in_channels * nf * 9
    in_planes = nf
    for stage, n in enumerate(blocks):
        planes = nf * 2 ** stage
        for i in range(n):
            total += in_planes * planes * 9 + planes * planes * 9
            if in_planes != planes:
                total += in_planes * planes
            in_planes = planes
    return total


def test_reduced_resnet18_has_the_published_size():
    net = ResNet("resnet18", nf=20, n_tasks=10, classes_per_task=10)
    convs = _convs(net)
    assert len(convs) == 20  # 1 stem + 16 in blocks + 3 shortcuts
    n_weights = sum(c.weight.numel() for c in convs)
    assert n_weights == _expected_conv_weights(20)
    assert n_weights == 1_090_140  # the reduced ResNet-18 of GPM / BMKP
    assert all(c.bias is None for c in convs)


def test_resnet34_builds_and_runs():
    net = ResNet("resnet34", nf=4, n_tasks=2, classes_per_task=3)
    convs = _convs(net)
    assert len(convs) == 1 + 2 * (3 + 4 + 6 + 3) + 3
    assert sum(c.weight.numel() for c in convs) == _expected_conv_weights(4, (3, 4, 6, 3))
    assert net(torch.rand(2, 3, 32, 32), 1).shape == (2, 3)


@pytest.mark.parametrize("size, features", [(16, 128), (32, 128), (64, 512)])
def test_output_has_one_logit_per_class_of_the_task(size, features):
    net = ResNet("resnet18", nf=4, n_tasks=5, classes_per_task=7, image_size=size)
    x = torch.rand(3, 3, size, size)
    for task in (0, 4):
        assert net(x, task).shape == (3, 7)
    assert net.features(x, 0).shape == (3, net.feature_dim) == (3, features)


def test_head_size_follows_the_input_size_as_the_reference():
    """avg_pool2d(out, 2) of the last map: 640 features on CIFAR, 2,560 on Tiny-ImageNet."""
    assert ResNet("resnet18", nf=20, n_tasks=1, classes_per_task=2).feature_dim == 640
    tiny = ResNet("resnet18", nf=20, n_tasks=1, classes_per_task=2, image_size=64)
    assert tiny.feature_dim == 2560 and tiny.heads[0].in_features == 2560


def test_global_pooling_gives_the_standard_resnet18s_head():
    """Mammoth's ResNet-18: one average per channel of the last map, 512 features at nf 64
    whatever the image size."""
    for size in (32, 64):
        net = ResNet("resnet18", nf=64, n_tasks=1, classes_per_task=2, image_size=size,
                     global_pool=True)
        x = torch.rand(2, 3, size, size)
        assert net.feature_dim == 512 and net.features(x, 0).shape == (2, 512)
        expected = torch.nn.functional.relu(net.bn1(net.conv1(x), 0))
        for block in net.blocks:
            expected = block(expected, 0)
        torch.testing.assert_close(net.features(x, 0), expected.mean((2, 3)))


def test_task_logits_int_and_tensor_task_ids_agree():
    torch.manual_seed(0)
    net = ResNet("resnet18", nf=4, n_tasks=4, classes_per_task=3, image_size=16)
    features = torch.randn(6, net.feature_dim)
    mixed = torch.tensor([0, 3, 1, 1, 2, 0])
    by_tensor = net.task_logits(features, mixed)
    for i, task in enumerate(mixed.tolist()):
        assert torch.allclose(by_tensor[i], net.task_logits(features[i:i + 1], task)[0])
    # the int form is that task's own head, and the heads really differ
    assert torch.equal(net.task_logits(features, 2), net.heads[2](features))
    assert not torch.allclose(net.task_logits(features, 2), net.task_logits(features, 3))
    net.eval()
    x = torch.rand(4, 3, 16, 16)
    assert torch.allclose(net(x, 1), net(x, torch.ones(4, dtype=torch.long)), atol=1e-6)


def test_per_task_batchnorm_selects_the_task_set():
    torch.manual_seed(0)
    net = ResNet("resnet18", nf=4, n_tasks=3, classes_per_task=2, per_task_bn=True,
                 image_size=16)
    bns = [m for m in net.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(bns) == 3 * 20  # one set per task for each of the 20 convs
    x = torch.rand(8, 3, 16, 16)
    net.eval()
    before = [net.features(x, t) for t in range(3)]
    assert torch.allclose(before[0], before[1])  # identical fresh sets: identical features
    for block_set in (m.sets[1] for m in net.modules() if hasattr(m, "sets")):
        nn.init.uniform_(block_set.weight, 0.5, 1.5)
        nn.init.uniform_(block_set.bias, -0.5, 0.5)
    after = [net.features(x, t) for t in range(3)]
    assert not torch.allclose(after[1], before[1])
    assert torch.equal(after[0], before[0]) and torch.equal(after[2], before[2])

    net.train()  # training on task 2 moves only task 2's running statistics
    stem = net.bn1.sets
    means = [s.running_mean.clone() for s in stem]
    net(x, 2)
    assert torch.equal(stem[0].running_mean, means[0])
    assert torch.equal(stem[1].running_mean, means[1])
    assert not torch.equal(stem[2].running_mean, means[2])


def test_per_task_batchnorm_refuses_mixed_task_batches():
    net = ResNet("resnet18", nf=4, n_tasks=2, classes_per_task=2, per_task_bn=True)
    with pytest.raises(ValueError, match="per-task BatchNorm"):
        net(torch.rand(2, 3, 16, 16), torch.tensor([0, 1]))


def test_shared_batchnorm_has_one_set(synthetic_args):
    net = build_backbone(synthetic_args(), SequentialSynthetic)
    assert len([m for m in net.modules() if isinstance(m, nn.BatchNorm2d)]) == 20
    no_stats = build_backbone(synthetic_args("--bn_running_stats", "0"), SequentialSynthetic)
    assert all(m.running_mean is None for m in no_stats.modules()
               if isinstance(m, nn.BatchNorm2d))


@pytest.mark.parametrize("identity", [True, False])
def test_shortcut_option_decides_what_a_same_shape_block_adds(identity):
    """The reference's network (no identity shortcut): with conv2 zeroed, a same-shape block's
    output is the ReLU of bn2's output on zeros, whatever its input; a ResNet adds x."""
    net = ResNet("resnet18", nf=4, n_tasks=1, classes_per_task=2,
                 identity_shortcut=identity).eval()
    block = net.blocks[1]
    assert block.shortcut_conv is None
    with torch.no_grad():
        block.conv2.weight.zero_()
        block.bn2.sets[0].bias.fill_(0.25)
        x = torch.randn(3, 4, 8, 8)
        out = block(x, 0)
    bn_of_zeros = torch.full_like(out, 0.25)  # eval BN: (0 - 0) / sqrt(1 + eps) * 1 + 0.25
    expected = torch.relu(bn_of_zeros + x) if identity else bn_of_zeros
    torch.testing.assert_close(out, expected)


def test_shortcut_none_keeps_the_projection_shortcuts():
    plain = ResNet("resnet18", nf=4, n_tasks=1, classes_per_task=2, identity_shortcut=False)
    resnet = ResNet("resnet18", nf=4, n_tasks=1, classes_per_task=2)
    assert [n for n, _ in plain.named_parameters()] == [n for n, _ in resnet.named_parameters()]
    assert sum(b.shortcut_conv is not None for b in plain.blocks) == 3


@pytest.mark.parametrize("per_task_bn", [False, True])
def test_contract_splits_parameters_into_each_tasks_own_and_shared(per_task_bn):
    """Every parameter is either shared or owned by exactly one task; a task owns its head,
    and its BatchNorm set only when BatchNorm is per task."""
    net = ResNet("resnet18", nf=4, n_tasks=3, classes_per_task=2, per_task_bn=per_task_bn)
    own = [net.task_parameters(t) for t in range(3)]
    shared = net.shared_parameters()
    names = [n for params in own for n in params] + list(shared)
    assert sorted(names) == sorted(n for n, _ in net.named_parameters())
    assert dict(net.named_parameters())["heads.1.weight"] is own[1]["heads.1.weight"]
    assert any(".sets.2." in n for n in own[2]) == per_task_bn
    assert all("heads." not in n and (".sets." not in n or not per_task_bn) for n in shared)
    conv = net.conv_layers()
    assert len(conv) == 20 and all(f"{n}.weight" in shared for n in conv)


def test_task_modules_are_the_head_and_the_normalisation_a_task_uses():
    shared_bn = ResNet("resnet18", nf=4, n_tasks=3, classes_per_task=2)
    per_task = ResNet("resnet18", nf=4, n_tasks=3, classes_per_task=2, per_task_bn=True)
    for net, bn_set in ((shared_bn, 0), (per_task, 2)):
        modules = net.task_modules(2)
        assert modules["heads.2"] is net.head(2)
        assert modules["bn1.sets.%d" % bn_set] is net.bn1.sets[bn_set]
        assert len(modules) == 1 + sum(isinstance(m, nn.BatchNorm2d) for m in net.modules()) // (
            3 if net.per_task_bn else 1)
    assert set(shared_bn.own_modules(2)) == {"heads.2"}
    assert per_task.own_modules(2) == per_task.task_modules(2)


def test_bias_free_heads_are_linear_in_the_features():
    """The reference's classifier has no bias: a head maps zero features to zero logits, and
    its weights are drawn as nn.Linear's (uniform within 1/sqrt(fan_in))."""
    net = ResNet("resnet18", nf=4, n_tasks=3, classes_per_task=2, head_bias=False)
    assert all(head.bias is None for head in net.heads)
    zeros = torch.zeros(5, net.feature_dim)
    assert torch.equal(net.task_logits(zeros, 1), torch.zeros(5, 2))
    bound = net.feature_dim ** -0.5
    assert all(head.weight.abs().max() <= bound for head in net.heads)
    biased = ResNet("resnet18", nf=4, n_tasks=3, classes_per_task=2)
    assert all(head.bias is not None for head in biased.heads)


@pytest.mark.parametrize("dataset", ["seq-cifar10", "seq-cifar100"])
def test_cifar_inputs_are_standardised_only_when_asked(dataset):
    from datasets import dataset_classes
    cls = dataset_classes()[dataset]
    for flag, expected in (("0", None), ("1", cls.CHANNEL_MEAN_STD)):
        args = parse_args(["--model", "sgd", "--dataset", dataset, "--nf", "4",
                           "--normalize_inputs", flag])
        net = build_backbone(args, cls)
        if expected is None:
            assert net.input_mean is None
        else:
            torch.testing.assert_close(net.input_mean.flatten(), torch.tensor(expected[0]))
            torch.testing.assert_close(net.input_std.flatten(), torch.tensor(expected[1]))


def test_dataset_normalisation_is_applied_inside_the_network():
    """Tiny-ImageNet's inputs are standardised by the backbone itself (after augmentation, as
    the reference's transform), so every path that feeds images gets the same input."""
    from datasets.seq_tinyimg import SequentialTinyImageNet
    torch.manual_seed(0)
    args = parse_args(["--model", "sgd", "--dataset", "seq-tinyimg", "--nf", "4"])
    net = build_backbone(args, SequentialTinyImageNet).eval()
    plain = ResNet("resnet18", nf=4, n_tasks=10, classes_per_task=20, image_size=64).eval()
    plain.load_state_dict(net.state_dict())  # the statistics are not part of the weights
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in SequentialTinyImageNet.INPUT_MEAN_STD)
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(net(x, 3), plain((x - mean) / std, 3))
