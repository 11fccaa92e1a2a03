"""DeepInversion: the BatchNorm-statistics loss (zero where a batch's statistics are the
running ones), the image priors and the competition term against hand computations, that
synthesis steps lower the loss, the synthesised set (count, shapes, labels, task ids, the
frozen network's logits, bytes in memory), the replay step's loss, the refused BatchNorm
settings, and an end-to-end run."""
from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from datasets.continual_dataset import to_model_input
from helpers import (assert_one_line_error, build_on_cpu, check_result, cpu_context,
                     run_synthetic, synthetic_argv)
from models.deep_inversion import (DeepInversion, batch_norm_layers, competition_loss,
                                   frozen, statistics_distance, statistics_losses,
                                   total_variation)
from models.lwf import distillation_loss
from utils.main import main

MODEL = "deep_inversion"
SMALL = ("--nf", "4", "--synthetic_per_task", "10", "--synthesis_batch_size", "4",
         "--synthesis_iterations", "2")
IMAGE_BYTES = 3 * 16 * 16  # one uint8 seq-synthetic image


def _model(synthetic_args, *extra: str) -> tuple:
    dataset, model = build_on_cpu(synthetic_args, MODEL, *SMALL, *extra)
    assert isinstance(model, DeepInversion)
    return dataset, model


def test_statistics_distance_by_hand():
    features = torch.randn(4, 3, 2, 2, generator=torch.Generator().manual_seed(0))
    flat = features.permute(1, 0, 2, 3).reshape(3, -1)
    mean, var = flat.mean(1), flat.var(1, unbiased=False)
    assert statistics_distance(features, mean, var) == pytest.approx(0.0, abs=1e-6)
    # ||(3, 4, 0)|| + ||(0, 0, 2)||
    moved = statistics_distance(features, mean + torch.tensor([3.0, 4.0, 0.0]),
                                var + torch.tensor([0.0, 0.0, 2.0]))
    assert moved == pytest.approx(5.0 + 2.0, abs=1e-5)


def test_bn_loss_is_zero_where_the_batch_statistics_are_the_running_ones(synthetic_args):
    _, model = _model(synthetic_args)
    net = model.net.eval()
    layers = batch_norm_layers(net)
    x = torch.rand(6, 3, 16, 16, generator=torch.Generator().manual_seed(1))

    def set_running_statistics(module, inputs):
        var, mean = torch.var_mean(inputs[0], dim=(0, 2, 3), correction=0)
        module.running_mean.copy_(mean)
        module.running_var.copy_(var)

    # In forward order, each layer's running statistics become its input's batch statistics
    # (which depend only on the layers before it).
    handles = [layer.register_forward_pre_hook(set_running_statistics) for layer in layers]
    with torch.no_grad():
        net(x, 0)
    for handle in handles:
        handle.remove()

    with torch.no_grad(), statistics_losses(layers) as losses:
        net(x, 0)
        assert len(losses) == len(layers) > 10
        assert sum(losses) == pytest.approx(0.0, abs=1e-5)
        losses.clear()
        net(torch.rand(6, 3, 16, 16), 0)  # another batch: other statistics
        assert all(loss > 0 for loss in losses)
        losses.clear()
        layers[5].running_var.add_(0.5)  # one layer's running statistics moved
        net(x, 0)
        assert sum(losses[:5]) == pytest.approx(0.0, abs=1e-5)
        assert losses[5] > 0.5 * math.sqrt(layers[5].num_features) - 1e-4
    losses.clear()
    with torch.no_grad():
        net(x, 0)
    assert losses == []  # the hooks are gone after the block


def test_total_variation_by_hand():
    x = torch.tensor([[0.0, 1.0], [2.0, 4.0]]).view(1, 1, 2, 2)
    # horizontal (-1, -2), vertical (-2, -3), the two diagonals 2 - 1 and 0 - 4
    expected = math.sqrt(5) + math.sqrt(13) + 1 + 4
    assert total_variation(x) == pytest.approx(expected)


def test_priors_in_the_synthesis_terms_by_hand(synthetic_args):
    """A horizontal ramp z = 0.1 * column: every horizontal and diagonal difference is 0.1,
    every vertical one 0."""
    _, model = _model(synthetic_args)
    z = (0.1 * torch.arange(16.0)).expand(2, 3, 16, 16).contiguous()
    mean, std = torch.full((1, 3, 1, 1), 0.5), torch.full((1, 3, 1, 1), 0.25)
    with frozen(model.net), statistics_losses(batch_norm_layers(model.net)) as bn_losses:
        terms = model.inversion_terms(z, mean, std, torch.tensor([0, 1]), 0, bn_losses)
    horizontal, diagonal = 2 * 3 * 16 * 15, 2 * 3 * 15 * 15
    assert terms.total_variation == pytest.approx(
        0.1 * (math.sqrt(horizontal) + 2 * math.sqrt(diagonal)), rel=1e-5)
    assert terms.l2 == pytest.approx(0.1 * math.sqrt(2 * 3 * 16 * sum(w * w for w in range(16))),
                                     rel=1e-5)
    with torch.no_grad():
        logits = model.net.eval()(mean + std * z, 0)  # the network sees the pixels
    assert terms.cross_entropy == pytest.approx(float(F.cross_entropy(logits,
                                                                      torch.tensor([0, 1]))))
    assert terms.competition == 0  # off by default


def test_competition_term_by_hand():
    logits = torch.tensor([[2.0, -1.0], [0.5, 0.0]])
    assert competition_loss(logits, logits) == pytest.approx(1.0)  # full agreement
    # at temperature 3: P = softmax(1, 0) = (a, 1 - a), Q = (1 - a, a), M = (1/2, 1/2), and
    # both divergences are KL(M || P) = (log(0.5 / a) + log(0.5 / (1 - a))) / 2
    a = 1 / (1 + math.exp(-1))
    kl = 0.5 * (math.log(0.5 / a) + math.log(0.5 / (1 - a)))
    apart = competition_loss(torch.tensor([[0.0, 3.0]]), torch.tensor([[3.0, 0.0]]))
    assert apart == pytest.approx(1.0 - kl, abs=1e-5)
    # so far apart that the divergence passes 1: clamped, the term is 0
    assert competition_loss(torch.tensor([[9.0, -9.0]]), torch.tensor([[-9.0, 9.0]])) == 0


def test_synthesis_steps_lower_the_loss(synthetic_args):
    dataset, model = _model(synthetic_args, "--jitter", "0")
    # running statistics of real batches, as after training (the initial ones, mean 0 and
    # variance 1 everywhere, are no image's)
    model.net.train()
    with torch.no_grad():
        for _ in range(30):
            model.net(to_model_input(dataset.train_data(0).x[:64], True), 0)
    ctx = cpu_context()
    labels = torch.tensor([0, 1, 0, 1])
    losses = []
    with frozen(model.net), statistics_losses(batch_norm_layers(model.net)) as bn_losses:
        for iterations in (1, 30):  # the terms returned are those of the last step
            model.args.synthesis_iterations = iterations
            torch.manual_seed(3)  # the same starting noise
            _, terms = model.invert(labels, 0, torch.Size((3, 16, 16)), bn_losses, ctx)
            losses.append(float(model.inversion_loss(terms)))
    assert losses[1] < 0.5 * losses[0], losses


@pytest.mark.parametrize("competition", ["0", "0.5"])
def test_synthesised_set_and_its_memory(synthetic_args, competition):
    dataset, model = _model(synthetic_args, "--competition_weight", competition)
    ctx = cpu_context()
    for task in range(dataset.N_TASKS):
        data = dataset.train_data(task)
        model.begin_task(task, data)
        assert (model.student is not None) == (competition != "0" and task < 4)
        model.end_task(task, data, ctx)
        assert model.student is None
        if task < 2:
            assert "synthesis" in ctx.phase_times[-1]
        ctx.phase_times.append({})
    assert all(p.requires_grad for p in model.net.parameters())
    assert model.net.training

    synthetic, n = model.synthetic, 10
    assert len(synthetic) == 4 * n  # none after the last task
    assert synthetic.x.dtype == torch.uint8 and synthetic.x.shape == (4 * n, 3, 16, 16)
    assert synthetic.y.tolist() == [i % 2 for i in range(n)] * 4  # cycling the classes
    assert synthetic.t.tolist() == [t for t in range(4) for _ in range(n)]
    assert synthetic.logits.dtype == torch.float32 and synthetic.logits.shape == (4 * n, 2)
    # per image: pixels, label, task id and two float32 logits
    assert model.memory_breakdown()["synthetic"] == 4 * n * (IMAGE_BYTES + 8 + 8 + 2 * 4)

    # the stored logits are the network's on the stored pixels (here: after the last task,
    # so only the last synthesis's; the network did not change in between)
    model.net.eval()
    with torch.no_grad():
        last = slice(3 * n, 4 * n)
        logits = model.net(to_model_input(synthetic.x[last], True), 3)
    assert torch.allclose(synthetic.logits[last], logits, atol=1e-5)

    log = model.result_details()["synthesis"]
    assert [entry["task"] for entry in log] == [0, 1, 2, 3]
    assert log[0]["images"] == n and log[0]["steps"] == 3 * 2  # 3 batches of 2 steps
    assert 0.0 <= log[0]["teacher_accuracy"] <= 100.0
    assert (log[0]["last_step_terms"]["competition"] > 0) == (competition != "0")


def test_debug_mode_cuts_the_synthesis_to_a_few_steps(synthetic_args):
    dataset, model = _model(synthetic_args, "--synthesis_iterations", "50")
    ctx = cpu_context()
    ctx.debug = True  # --debug_mode 1: a smoke run
    data = dataset.train_data(0)
    model.begin_task(0, data)
    model.end_task(0, data, ctx)
    (entry,) = model.result_details()["synthesis"]
    assert entry["steps"] == 3 * ctx.steps(50) == 3 * 5  # 3 batches of 5 steps, not of 50
    assert ctx.steps(3) == 3


def test_replay_step_distils_through_each_image_s_own_head(synthetic_args):
    dataset, model = _model(synthetic_args, "--alpha", "0.7", "--temperature", "3",
                            "--minibatch_size", "6")
    data = dataset.train_data(0)
    model.begin_task(0, data)
    model.end_task(0, data, cpu_context())
    model.begin_task(1, dataset.train_data(1))
    model.train()
    x, y = to_model_input(dataset.train_data(1).x[:8], True), dataset.train_data(1).y[:8]

    expected_model = copy.deepcopy(model)
    torch.manual_seed(5)
    past = expected_model.synthetic.sample(6, augment=False)
    logits = expected_model.net(torch.cat((x, past.x)),
                                torch.cat((torch.ones_like(y), past.t)))
    expected = (F.cross_entropy(logits[:8], y)
                + 0.7 * distillation_loss(logits[8:], past.logits, 3.0))
    torch.manual_seed(5)
    assert float(model.observe(x, y, 1)) == pytest.approx(float(expected.detach()), rel=1e-5)


@pytest.mark.parametrize("option, fragment", [
    ("--bn_running_stats", "drop --bn_running_stats 0"),
    ("--per_task_bn", "drop --per_task_bn 1"),
])
def test_batch_norm_settings_it_cannot_invert_are_refused(tmp_path, capsys, option, fragment):
    value = "0" if option == "--bn_running_stats" else "1"
    assert_one_line_error(capsys, main, synthetic_argv(tmp_path, option, value, model=MODEL),
                          fragment)


def test_run_writes_a_complete_result(tmp_path, capsys):
    result, _ = run_synthetic(tmp_path, capsys, "--n_epochs", "1", "--synthetic_per_task", "8",
                              "--synthesis_batch_size", "8", "--synthesis_iterations", "3",
                              model=MODEL)
    check_result(result, MODEL)
    assert ["synthesis" in t for t in result["phase_times"]] == [True] * 4 + [False]
    assert result["memory"]["breakdown_bytes"]["synthetic"] == 4 * 8 * (IMAGE_BYTES + 24)
    assert [s["task"] for s in result["method"]["synthesis"]] == [0, 1, 2, 3]
