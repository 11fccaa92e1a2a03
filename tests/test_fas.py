"""FAS: filters recomposed from atoms and coefficients (against a loop, and against the plain
backbone given them), the coefficients frozen after the first task and earlier tasks' atoms
and predictions bit-identical, the memory by part, the checkpoint state, the refusals and
best configuration, and an end-to-end run through main()."""
from __future__ import annotations

import pytest
import torch

from datasets.continual_dataset import to_model_input
from helpers import (assert_one_line_error, build_on_cpu, check_result, cpu_context,
                     run_synthetic, synthetic_argv)
from models.fas import compose_filters
from utils.args import parse_args
from utils.main import main
from utils.sizes import network_bytes

FLOAT = 4  # bytes
# ResNet-18 at nf 4 on seq-synthetic (3 input channels): the out x in of its 16 block 3x3
# convs (stages of 4, 8, 16 and 32 channels), its 3 x 3 x 3 stem and its 1x1 shortcuts.
BLOCK_CONVS = [(4, 4)] * 4 + [(8, 4)] + [(8, 8)] * 3 + [(16, 8)] + [(16, 16)] * 3 \
    + [(32, 16)] + [(32, 32)] * 3
TASK_CONV_FLOATS = 4 * 3 * 9 + 8 * 4 + 16 * 8 + 32 * 16


def _learn(method, dataset, task: int, ctx) -> None:
    data = dataset.train_data(task)
    method.begin_task(task, data)
    method.fit_task(task, data, ctx)
    method.end_task(task, data, ctx)


def _images(dataset, task: int) -> torch.Tensor:
    return to_model_input(dataset.test_data(task).x[:64], channels_last=True)


def _logits(method, dataset, task: int) -> torch.Tensor:
    method.eval()
    with torch.inference_mode():
        out = method(_images(dataset, task), task)
    method.train()
    return out


def _clones(tensors) -> list[torch.Tensor]:
    return [t.detach().clone() for t in tensors]


def _equal(first, second) -> bool:
    return all(torch.equal(a, b) for a, b in zip(first, second, strict=True))


def _batchnorm_states(method, task: int) -> list[dict]:
    return [m.state_dict() for m in method.net.own_modules(task).values()
            if isinstance(m, torch.nn.BatchNorm2d)]


def test_recomposed_filters_are_atoms_times_coefficients():
    generator = torch.Generator().manual_seed(0)
    coefficients = torch.randn(3, 2, 4, generator=generator)  # out x in x m
    atoms = torch.randn(4, 3, 3, generator=generator)  # m x k x k
    expected = torch.zeros(3, 2, 3, 3)
    for o in range(3):
        for i in range(2):
            for k in range(4):
                expected[o, i] += coefficients[o, i, k] * atoms[k]
    torch.testing.assert_close(compose_filters(coefficients, atoms), expected)


def test_a_task_runs_the_backbone_with_its_recomposed_filters(synthetic_args):
    dataset, fas = build_on_cpu(synthetic_args, "fas", "--nf", "4", "--num_atoms", "3")
    assert fas.task_owned == ["conv1", "blocks.2.shortcut_conv", "blocks.4.shortcut_conv",
                              "blocks.6.shortcut_conv"]
    assert len(fas.decomposed) == 16
    assert all(conv.weight.numel() == 0 for conv in fas.net.conv_layers().values())
    # the plain backbone given task 0's filters, BatchNorm sets and heads computes the same
    _, plain = build_on_cpu(synthetic_args, "sgd", "--nf", "4", "--per_task_bn", "1")
    state = fas.net.state_dict()
    state.update({name: w.detach() for name, w in fas.task_weights(0).items()})
    plain.net.load_state_dict(state)
    fas.eval()
    plain.eval()
    with torch.no_grad():
        x = _images(dataset, 0)
        torch.testing.assert_close(fas(x, 0), plain.net(x, 0))


def test_coefficients_freeze_after_the_first_task_and_earlier_tasks_stay_bit_identical(
        synthetic_args):
    dataset, fas = build_on_cpu(synthetic_args, "fas", "--nf", "4", "--n_epochs", "1",
                                "--num_atoms", "4", "--optim_mom", "0.9", "--optim_wd", "0.01")
    ctx = cpu_context()
    initial = _clones(fas.coefficients)
    _learn(fas, dataset, 0, ctx)
    assert not _equal(fas.coefficients, initial)  # learned on the first task
    coefficients, atoms, convs = (_clones(fas.coefficients), _clones(fas.atoms[0]),
                                  _clones(fas.task_convs[0]))
    first = _logits(fas, dataset, 0)

    fas.begin_task(1, dataset.train_data(1))
    # the second task starts from the first's atoms, convs and BatchNorm set...
    assert _equal(fas.atoms[1], fas.atoms[0]) and _equal(fas.task_convs[1], fas.task_convs[0])
    for new, old in zip(_batchnorm_states(fas, 1), _batchnorm_states(fas, 0), strict=True):
        assert _equal(new.values(), old.values())
    # ...and trains neither the coefficients nor anything of the first task
    trained = {id(p) for group in fas.optimizer.param_groups for p in group["params"]}
    frozen = [*fas.coefficients, *fas.atoms[0], *fas.task_convs[0],
              *fas.net.task_parameters(0).values()]
    assert not trained & {id(p) for p in frozen}
    assert not any(a.requires_grad for a in fas.coefficients)
    fas.fit_task(1, dataset.train_data(1), ctx)
    fas.end_task(1, dataset.train_data(1), ctx)
    _learn(fas, dataset, 2, ctx)

    assert not _equal(fas.atoms[1], atoms)  # the second task learned its own atoms
    assert _equal(fas.coefficients, coefficients)
    assert _equal(fas.atoms[0], atoms) and _equal(fas.task_convs[0], convs)
    assert torch.equal(_logits(fas, dataset, 0), first)


def test_memory_counts_atoms_per_task_and_coefficients_once(synthetic_args):
    dataset, fas = build_on_cpu(synthetic_args, "fas", "--nf", "4", "--num_atoms", "5")
    coefficients = sum(out * in_ for out, in_ in BLOCK_CONVS) * 5 * FLOAT
    atoms = len(BLOCK_CONVS) * 5 * 3 * 3 * FLOAT
    for task in range(3):
        fas.begin_task(task, dataset.train_data(task))
        assert fas.memory_breakdown() == {
            "network": network_bytes(fas.net),  # BatchNorm sets and heads: no conv weights
            "fas_coefficients": coefficients,
            "fas_atoms": (task + 1) * atoms,
            "fas_task_convs": (task + 1) * TASK_CONV_FLOATS * FLOAT}
    assert fas.result_details()["atom_floats_per_task"] * FLOAT == atoms


def test_checkpoint_state_restores_every_stored_task(synthetic_args):
    dataset, fas = build_on_cpu(synthetic_args, "fas", "--nf", "4", "--n_epochs", "1")
    ctx = cpu_context()
    for task in range(2):
        _learn(fas, dataset, task, ctx)
    _, fresh = build_on_cpu(synthetic_args, "fas", "--nf", "4")
    fresh.load_checkpoint_state(fas.checkpoint_state())
    for task in range(2):
        assert torch.equal(_logits(fresh, dataset, task), _logits(fas, dataset, task))


def test_shared_batchnorm_is_refused(tmp_path, capsys):
    argv = synthetic_argv(tmp_path, "--per_task_bn", "0", model="fas")
    assert_one_line_error(capsys, main, argv, "fas", "drop --per_task_bn 0")


def test_best_config_is_the_references():
    args = parse_args(["--model", "fas", "--dataset", "seq-cifar100", "--model_config", "best"])
    assert (args.lr, args.optim_mom, args.optim_wd, args.batch_size, args.n_epochs) == \
        (0.01, 0.9, 5e-3, 64, 250)
    assert (args.lr_step, args.lr_gamma, args.num_atoms, args.per_task_bn, args.nf) == \
        (100, 0.1, 12, 1, 64)


@pytest.mark.slow
def test_run_writes_a_valid_forget_free_result(tmp_path, capsys):
    result, _ = run_synthetic(tmp_path, capsys, "--n_epochs", "1", "--num_atoms", "6",
                              model="fas")
    check_result(result, "fas")
    matrix = result["accuracy_matrix"]
    # an earlier task's accuracy never changes
    assert all(row[j] == matrix[j][j] for row in matrix for j in range(len(row)))
    assert result["bwt"] == 0
    breakdown, details = result["memory"]["breakdown_bytes"], result["method"]
    n_tasks = len(matrix)
    assert breakdown["fas_coefficients"] == details["coefficient_floats"] * FLOAT
    assert breakdown["fas_atoms"] == n_tasks * details["atom_floats_per_task"] * FLOAT
    assert breakdown["fas_task_convs"] == \
        n_tasks * details["task_conv_floats_per_task"] * FLOAT
    assert set(breakdown) == {"network", "fas_coefficients", "fas_atoms", "fas_task_convs"}
    # each task adds its atoms and convs
    per_task = (details["atom_floats_per_task"] + details["task_conv_floats_per_task"]) * FLOAT
    growth = [b - a for a, b in zip(result["memory_per_task_mb"],
                                    result["memory_per_task_mb"][1:])]
    assert growth == pytest.approx([per_task / 2 ** 20] * (n_tasks - 1))
