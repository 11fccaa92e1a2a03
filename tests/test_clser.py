"""CLS-ER: the semantic memories' EMA update (with and without the warm-up) and its random
draws, the per-sample choice of memory and the consistency loss on tiny logits, observe's
loss and update as computed by hand, prediction by the stable memory, memory accounting,
checkpoints, and end-to-end runs (a valid result; a killed run resumed gives the same one)."""
from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from datasets.continual_dataset import to_model_input
from datasets.seq_synthetic import SequentialSynthetic
from helpers import (assert_one_line_error, build_on_cpu, check_result, cpu_context,
                     run_synthetic, synthetic_argv)
from models.clser import Clser, consistency_loss, ema_decay, semantic_targets
from utils.args import parse_args
from utils.buffer import ReplaySample
from utils.main import main
from utils.results import text_log_path
from utils.training import evaluate, learned_bound, single_class_warning, unlearned_warning

SMALL = ("--nf", "4", "--buffer_size", "40")
N_CLASSES = SequentialSynthetic.N_TASKS * SequentialSynthetic.N_CLASSES_PER_TASK


def _perturb(module: torch.nn.Module, seed: int, scale: float = 0.1) -> None:
    """Move every parameter by seeded noise, so the three networks differ."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn(p.shape, generator=generator))


def _clser(synthetic_args, *extra: str) -> tuple:
    dataset, model = build_on_cpu(synthetic_args, "clser", *SMALL, *extra)
    assert isinstance(model, Clser)
    return dataset, model


def test_decay_warms_up_then_stays_at_alpha():
    assert ema_decay(1, 0.999) == 0.5  # the first update: the mean of start and now
    assert ema_decay(3, 0.999) == 0.75
    assert ema_decay(999, 0.999) == pytest.approx(0.999)
    assert ema_decay(5000, 0.999) == 0.999
    assert ema_decay(5000, 0.99) == 0.99


@pytest.mark.parametrize("step, decays", [
    (3, {"plastic": 0.75, "stable": 0.75}),     # warm-up: 1 - 1/4 is below both alphas
    (20, {"plastic": 0.9, "stable": 1 - 1 / 21}),  # plastic past its warm-up, stable not
    (5000, {"plastic": 0.9, "stable": 0.999}),  # no warm-up
])
def test_ema_update_by_hand(synthetic_args, step, decays):
    _, model = _clser(synthetic_args, "--plastic_model_update_freq", "1",
                      "--stable_model_update_freq", "1", "--plastic_model_alpha", "0.9",
                      "--stable_model_alpha", "0.999")
    _perturb(model.net, 0)
    _perturb(model.plastic_model, 1)
    _perturb(model.stable_model, 2)
    net = {k: v.double() for k, v in model.net.state_dict().items()}
    before = {name: {k: v.double() for k, v in model.memory(name).state_dict().items()}
              for name in ("plastic", "stable")}
    params = {k for k, _ in model.net.named_parameters()}
    model.global_step = step
    model.update_memories()

    assert model.updates == {"plastic": 1, "stable": 1}
    for name, decay in decays.items():
        after = model.memory(name).state_dict()
        for key, old in before[name].items():
            if key in params:
                expected = decay * old + (1 - decay) * net[key]
                assert torch.allclose(after[key].double(), expected, atol=1e-6), (name, key)
            else:  # BatchNorm statistics are the memory's own, not averaged
                assert torch.equal(after[key].double(), old), (name, key)
    assert all(torch.equal(v.double(), net[k]) for k, v in model.net.state_dict().items())


def test_update_draws_come_from_torchs_global_generator(synthetic_args):
    """Per step, one draw for the plastic memory then one for the stable memory, both always
    made, on torch's global CPU generator (so a checkpoint's RNG state replays them)."""
    _, model = _clser(synthetic_args, "--plastic_model_update_freq", "0.6",
                      "--stable_model_update_freq", "0.2")
    steps = 300
    torch.manual_seed(7)
    draws = torch.rand(2 * steps)
    expected = {"plastic": (draws[0::2] < 0.6).tolist(), "stable": (draws[1::2] < 0.2).tolist()}
    torch.manual_seed(7)
    taken = {"plastic": [], "stable": []}
    for _ in range(steps):
        model.global_step += 1
        counts = dict(model.updates)
        model.update_memories()
        for name in taken:
            taken[name].append(model.updates[name] > counts[name])
    assert taken == expected
    assert 0.5 < sum(taken["plastic"]) / steps < 0.7 and 0.13 < sum(taken["stable"]) / steps < 0.27


def test_memory_choice_and_consistency_loss_by_hand():
    stable = torch.tensor([[2., 0.], [0., 0.], [0., 1.], [0., 3.], [5., 4.]])
    plastic = torch.tensor([[0., 0.], [1., 0.], [0., 1.], [0., 0.], [1., -1.]])
    labels = torch.tensor([0, 0, 1, 1, 0])
    # True-class probabilities, stable vs plastic: s(2) = .88 > .5 (stable); .5 < s(1) = .73
    # (plastic); a tie (plastic); s(3) = .95 > .5 (stable); s(1) = .73 < s(2) = .88: plastic,
    # though the stable logit of the class is the larger (probabilities decide, not logits).
    chosen = torch.tensor([[2., 0.], [1., 0.], [0., 1.], [0., 3.], [1., -1.]])
    assert torch.equal(semantic_targets(stable, plastic, labels), chosen)

    working = torch.tensor([[1., 1.], [1., 2.], [0., 0.], [0., 1.], [1., -1.]], requires_grad=True)
    # squared differences: 1 + 1, 0 + 4, 0 + 1, 0 + 4, 0 + 0 = 11, over 5 samples x 10
    # classes (mammoth's single head: all of a 5 x 2 benchmark's, of which 2 compared here)
    loss = consistency_loss(working, stable, plastic, labels, n_classes=10)
    assert loss.item() == pytest.approx(11 / 50)
    loss.backward()  # the targets are constants: the gradient is 2 (working - target) / 50
    assert torch.allclose(working.grad, 2 * (working.detach() - chosen) / 50)


def test_observe_by_hand(synthetic_args, monkeypatch):
    """One step on task 2 replaying samples of tasks 0 and 1: the returned loss is the
    cross-entropy of the joint batch (each sample through its own head) plus reg_weight
    times the consistency loss, and both memories then take the first EMA step (decay 1/2)."""
    dataset, model = _clser(synthetic_args, "--reg_weight", "0.5", "--plastic_model_update_freq",
                            "1", "--stable_model_update_freq", "1")
    _perturb(model.plastic_model, 1, scale=0.3)
    _perturb(model.stable_model, 2, scale=0.3)
    old = [dataset.train_data(t) for t in (0, 1)]
    past_x = torch.cat([to_model_input(d.x[:6], True) for d in old])
    past = ReplaySample(past_x, torch.cat([d.y[:6] for d in old]),
                        torch.cat([d.t[:6] for d in old]), None)
    monkeypatch.setattr(model, "replay", lambda: past)
    data = dataset.train_data(2)
    model.begin_task(2, data)
    model.train()
    raw, y = data.x[:10], data.y[:10]
    x = to_model_input(raw, True)

    reference = copy.deepcopy(model)
    with torch.no_grad():
        stable = reference.stable_model(past.x, past.t)
        plastic = reference.plastic_model(past.x, past.t)
        working = reference.net(past.x, past.t)
        joint = reference.net(torch.cat((x, past.x)),
                              torch.cat((torch.full_like(y, 2), past.t)))
    rows = torch.arange(len(past.y))
    use_stable = (stable.softmax(1)[rows, past.y] > plastic.softmax(1)[rows, past.y])
    assert 0 < int(use_stable.sum()) < len(rows)  # both memories are chosen somewhere
    targets = torch.where(use_stable[:, None], stable, plastic)
    expected = (F.cross_entropy(joint, torch.cat((y, past.y)))
                + 0.5 * ((working - targets) ** 2).sum() / (len(working) * N_CLASSES))

    memories = {name: copy.deepcopy(model.memory(name).state_dict())
                for name in ("plastic", "stable")}
    loss = model.observe(x, y, 2, raw)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert model.global_step == 1 and len(model.buffer) == 10
    assert torch.equal(model.buffer.t[:10], torch.full((10,), 2))
    net = model.net.state_dict()
    for name, state in memories.items():
        after = model.memory(name).state_dict()
        for key, _ in model.net.named_parameters():
            assert torch.allclose(after[key], 0.5 * state[key] + 0.5 * net[key], atol=1e-6)


def test_the_stable_memory_predicts(synthetic_args):
    dataset, model = _clser(synthetic_args)
    with torch.no_grad():  # the stable head of task 0 votes against the working network's
        model.stable_model.head(0).weight.neg_()
        model.stable_model.head(0).bias.neg_()
    model.eval()
    x = to_model_input(dataset.test_data(0).x[:32], True)
    with torch.no_grad():
        stable = model.stable_model(x, 0)
        assert torch.equal(model(x, 0), stable)
        assert not torch.equal(stable.argmax(1), model.net(x, 0).argmax(1))
        assert torch.equal(model.net(x, 0), model.plastic_model(x, 0))

    # The loop's evaluation goes through it too.
    data = dataset.test_data(0)
    with torch.no_grad():
        correct = (model.stable_model(to_model_input(data.x, True), 0).argmax(1) == data.y)
    accuracy = evaluate(model, dataset, 0, cpu_context()).task_il
    assert accuracy == [pytest.approx(100.0 * correct.float().mean().item())]


def test_other_networks_are_scored_each_by_itself(synthetic_args):
    """After a short task the working network has learnt more than the slow stable memory:
    evaluate(network=...) scores each network of other_predictors() as by hand."""
    dataset, model = _clser(synthetic_args, "--n_epochs", "2", "--stable_model_alpha", "0.999",
                            "--stable_model_update_freq", "0.2")
    data = dataset.train_data(0)
    model.begin_task(0, data)
    model.fit_task(0, data, cpu_context())
    model.eval()
    test = dataset.test_data(0)
    networks = {"stable": model.stable_model, **model.other_predictors()}
    assert set(networks) == {"stable", "working", "plastic"}
    by_hand = {}
    for name, network in networks.items():
        with torch.no_grad():
            right = network(to_model_input(test.x, True), 0).argmax(1) == test.y
        by_hand[name] = 100.0 * right.float().mean().item()
        assert evaluate(model, dataset, 0, cpu_context(), network).task_il == \
            [pytest.approx(by_hand[name])], name
    assert evaluate(model, dataset, 0, cpu_context()).task_il == [pytest.approx(by_hand["stable"])]
    assert by_hand["working"] > by_hand["stable"] + 10


def test_memories_are_counted_and_checkpointed(synthetic_args):
    dataset, model = _clser(synthetic_args)
    model.store(dataset.train_data(0).x[:20], dataset.train_data(0).y[:20], 0)
    breakdown = model.memory_breakdown()
    assert set(breakdown) == {"network", "buffer", "plastic_model", "stable_model"}
    assert breakdown["plastic_model"] == breakdown["stable_model"] == breakdown["network"] > 0

    _perturb(model.plastic_model, 1)
    _perturb(model.stable_model, 2)
    model.global_step, model.updates = 17, {"plastic": 15, "stable": 4}
    _, fresh = _clser(synthetic_args)
    fresh.load_checkpoint_state(model.checkpoint_state())
    assert fresh.global_step == 17 and fresh.updates == {"plastic": 15, "stable": 4}
    assert fresh.buffer.seen == 20
    saved, loaded = model.state_dict(), fresh.state_dict()
    assert any(k.startswith("stable_model.") for k in saved)
    assert saved.keys() == loaded.keys()
    assert all(torch.equal(saved[k], loaded[k]) for k in saved)


def test_best_config_is_the_references():
    args = parse_args(["--model", "clser", "--dataset", "seq-cifar10", "--model_config", "best"])
    assert (args.reg_weight, args.lr, args.batch_size, args.minibatch_size, args.n_epochs) == \
        (0.15, 0.1, 32, 32, 50)
    assert (args.stable_model_update_freq, args.stable_model_alpha) == (0.1, 0.999)
    assert (args.plastic_model_update_freq, args.plastic_model_alpha) == (0.9, 0.999)
    assert args.buffer_size == 500 and args.optim_mom == 0


def test_update_frequency_out_of_range_is_a_user_error(tmp_path, capsys):
    argv = synthetic_argv(tmp_path, "--stable_model_update_freq", "1.5", model="clser")
    assert_one_line_error(capsys, main, argv, "--stable_model_update_freq", "1.5")


@pytest.mark.slow
def test_run_writes_a_valid_result(tmp_path, capsys):
    result, _ = run_synthetic(tmp_path, capsys, "--n_epochs", "1", "--buffer_size", "50",
                              model="clser")
    check_result(result, "clser")
    breakdown = result["memory"]["breakdown_bytes"]
    assert set(breakdown) == {"network", "buffer", "plastic_model", "stable_model"}
    assert breakdown["plastic_model"] == breakdown["stable_model"] == breakdown["network"]
    # Every step counted once: 200 images per task in batches of (about) 32.
    steps = result["method"]["global_step"]
    assert steps == 5 * math.ceil(200 / 32)
    assert result["method"]["updates"]["plastic"] == steps  # default frequency 1
    assert 0 < result["method"]["updates"]["stable"] <= steps
    others = result["other_predictors"]
    assert set(others) == {"working", "plastic"}


@pytest.mark.slow
def test_a_lagging_stable_memory_is_reported_with_the_working_networks_score(tmp_path, capsys):
    """A stable memory too slow for the task's steps predicts near chance where the working
    network has learnt: each finding and its warning carry what the other networks score
    on the task, as recorded in other_predictors."""
    result, path = run_synthetic(tmp_path, capsys, "--n_epochs", "1", "--buffer_size", "50",
                                 "--stable_model_alpha", "0.999",
                                 "--stable_model_update_freq", "0.1", model="clser")
    unlearned, single_class = result["unlearned_tasks"], result["single_class_predictions"]
    assert unlearned and single_class
    others = result["other_predictors"]
    log = text_log_path(path).read_text()
    for event in unlearned + single_class:
        assert event["other_predictors"] == {
            name: other["accuracy_matrix"][event["after_task"]][event["task"]]
            for name, other in others.items()}
    for event in unlearned:
        assert unlearned_warning(event, SequentialSynthetic.N_TASKS, 2) in log
    for event in single_class:
        assert single_class_warning(event, SequentialSynthetic.N_TASKS) in log
    bound = learned_bound(SequentialSynthetic.N_CLASSES_PER_TASK)
    assert any(e["other_predictors"]["working"] >= bound for e in unlearned + single_class)
