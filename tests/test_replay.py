"""Replay methods (ER, A-GEM, GEM, DER, DER++) and their reservoir buffer: uniform sampling,
aligned storage, logits frozen at insertion, A-GEM's and GEM's projections, end-to-end runs
and the buffer's bytes in the memory metric."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from datasets.seq_synthetic import SequentialSynthetic
import models.gem
from helpers import assert_one_line_error, build_on_cpu, cpu_context, synthetic_argv
from models.agem import project
from models.gem import project_to_cone
from models.replay import single_head_mse
from utils.buffer import ReservoirBuffer
from utils.main import main
from utils.setup import build

REPLAY_MODELS = ("er", "agem", "gem", "der", "derpp")
IMAGE_BYTES = 3 * SequentialSynthetic.IMAGE_SIZE ** 2  # one uint8 image


def _stream(buffer: ReservoirBuffer, n_items: int, batch: int) -> None:
    """Offer items 0..n_items-1; item i has label i, task id i // 7 and a constant image i % 256."""
    for start in range(0, n_items, batch):
        ids = torch.arange(start, min(start + batch, n_items))
        x = (ids % 256).to(torch.uint8)[:, None, None, None].expand(-1, 1, 2, 2).contiguous()
        buffer.add(x, ids, ids // 7)


def test_reservoir_keeps_a_uniform_sample():
    capacity, n_items, trials = 20, 200, 300
    generator = torch.Generator().manual_seed(0)
    counts = torch.zeros(n_items)
    for _ in range(trials):
        buffer = ReservoirBuffer(capacity, generator=generator)
        _stream(buffer, n_items, batch=8)  # batches exercise same-slot draws within one add
        counts[buffer.y] += 1
    frequency = counts / trials
    expected = capacity / n_items
    # Binomial std per item: sqrt(0.1 * 0.9 / 300) = 0.017; 0.07 is four of them.
    assert (frequency - expected).abs().max() < 0.07
    # Early and late items are equally likely to survive (a biased reservoir keeps one end).
    assert frequency[:50].mean() == pytest.approx(expected, abs=0.015)
    assert frequency[-50:].mean() == pytest.approx(expected, abs=0.015)


def test_reservoir_respects_capacity_and_keeps_fields_aligned():
    buffer = ReservoirBuffer(30, generator=torch.Generator().manual_seed(1))
    _stream(buffer, 10, batch=4)
    assert len(buffer) == 10 and buffer.seen == 10
    assert buffer.y[:10].tolist() == list(range(10))  # filled in arrival order while not full
    _stream(buffer, 500, batch=16)
    assert len(buffer) == 30 and buffer.seen == 510 and buffer.x.shape[0] == 30
    ids = buffer.y
    assert len(set(ids.tolist())) == 30  # the same item is never stored twice
    assert torch.equal(buffer.x[:, 0, 0, 0], (ids % 256).to(torch.uint8))
    assert torch.equal(buffer.t, ids // 7)

    sample = buffer.sample(12, augment=False)
    assert sample.x.dtype == torch.float32 and sample.logits is None
    assert len(set(sample.y.tolist())) == 12
    assert torch.equal((sample.x[:, 0, 0, 0] * 255).round().long(), sample.y % 256)
    assert torch.equal(sample.t, sample.y // 7)
    assert len(buffer.sample(100).y) == 30  # never more than it holds


def test_buffer_sample_is_a_training_batch():
    """Augmented like the loop's batches (same shape, values in [0, 1], same memory format)."""
    buffer = ReservoirBuffer(8, channels_last=True)
    x = torch.randint(0, 256, (8, 3, 16, 16), dtype=torch.uint8)
    buffer.add(x, torch.zeros(8, dtype=torch.long), torch.zeros(8, dtype=torch.long))
    sample = buffer.sample(8)
    assert sample.x.shape == (8, 3, 16, 16)
    assert sample.x.is_contiguous(memory_format=torch.channels_last)
    assert 0.0 <= sample.x.min() and sample.x.max() <= 1.0


def test_buffer_bytes_counted_by_hand():
    buffer = ReservoirBuffer(5)
    assert buffer.nbytes() == 0
    x = torch.zeros(3, 3, 4, 4, dtype=torch.uint8)
    labels = torch.zeros(3, dtype=torch.long)
    buffer.add(x, labels, labels, logits=torch.zeros(3, 2, dtype=torch.bfloat16))
    # 5 slots x (48 uint8 pixels + 8-byte label + 8-byte task id + 2 float32 logits)
    assert buffer.nbytes() == 5 * (48 + 8 + 8 + 2 * 4)


def test_own_head_logits_are_weighted_as_in_mammoths_single_head():
    """mammoth's F.mse_loss over all 10 logits, when the other heads' logits match exactly,
    equals (value and gradient) single_head_mse over the own head's 2."""
    torch.manual_seed(0)
    own, target = torch.randn(4, 2, requires_grad=True), torch.randn(4, 2)
    others = torch.randn(4, 8)
    full = torch.cat((own, others), 1)
    mammoths = F.mse_loss(full, torch.cat((target, others), 1))
    ours = single_head_mse(own, target, n_classes=10)
    torch.testing.assert_close(ours, mammoths)
    (expected,) = torch.autograd.grad(mammoths, own)
    (gradient,) = torch.autograd.grad(single_head_mse(own, target, 10), own)
    torch.testing.assert_close(gradient, expected)
    torch.testing.assert_close(gradient, 2 * (own - target).detach() / 40)


def test_der_stores_logits_from_insertion_time(synthetic_args):
    args = synthetic_args("--nf", "4", "--buffer_size", "100", model="der")
    dataset, model = build(args, torch.device("cpu"))
    data = dataset.train_data(0)
    model.begin_task(0, data)
    model.train()
    raw = data.x[:16]
    x = raw.float().div(255).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        expected = model.net(x, 0)
    model.observe(x, data.y[:16], 0, raw=raw)
    stored = model.buffer.logits[:16].clone()
    assert torch.allclose(stored, expected, atol=1e-5)
    assert torch.equal(model.buffer.x[:16], raw)
    with torch.no_grad():  # the network changes; what was stored must not
        for p in model.net.parameters():
            p.add_(1.0)
    model.observe(x, data.y[:16], 0, raw=raw)
    assert torch.equal(model.buffer.logits[:16], stored)
    assert not torch.allclose(model.buffer.logits[16:32], stored, atol=1e-3)


@pytest.mark.parametrize("model", ["er", "agem", "gem"])
def test_mixed_task_batches_leave_later_heads_untouched(synthetic_args, model):
    """Replayed batches mix tasks, so every head is computed; weight decay must still not
    reach the heads of tasks not learned yet."""
    dataset, method = build_on_cpu(synthetic_args, model, "--nf", "4", "--n_epochs", "1",
                                   "--optim_wd", "0.5", "--buffer_size", "20")
    ctx = cpu_context()
    for task in (0, 1):
        data = dataset.train_data(task).subset(torch.arange(32))
        if task == 1:
            before = {k: [p.detach().clone() for p in method.net.head(k).parameters()]
                      for k in range(dataset.N_TASKS)}
        method.begin_task(task, data)
        method.fit_task(task, data, ctx)
        method.end_task(task, data, ctx)
    for k, params in before.items():
        unchanged = all(torch.equal(p, q) for p, q in zip(method.net.head(k).parameters(),
                                                           params))
        assert unchanged == (k > 1), k


def test_checkpoint_carries_the_buffer(synthetic_args):
    """A resumed run must continue the same reservoir: contents, logits and items seen."""
    args = synthetic_args("--nf", "4", "--buffer_size", "10", model="der")
    dataset, model = build(args, torch.device("cpu"))
    data = dataset.train_data(0)
    model.store(data.x[:25], data.y[:25], 0, logits=torch.randn(25, 2))
    _, fresh = build(args, torch.device("cpu"))
    fresh.load_checkpoint_state(model.checkpoint_state())
    assert fresh.buffer.seen == 25
    for field in ("x", "y", "t", "logits"):
        assert torch.equal(getattr(fresh.buffer, field), getattr(model.buffer, field))


def test_agem_projection_removes_the_conflict():
    generator = torch.Generator().manual_seed(0)
    conflicts = 0
    for _ in range(200):
        grad, ref = torch.randn(2, 50, generator=generator, dtype=torch.float64)
        projected = project(grad, ref)
        if grad @ ref < 0:
            conflicts += 1
            assert projected @ ref == pytest.approx(0.0, abs=1e-9)  # onto the boundary
            assert torch.allclose(projected, grad - (grad @ ref) / (ref @ ref) * ref)
        else:
            assert torch.equal(projected, grad)  # no conflict: left unchanged
        assert projected @ ref >= -1e-9
    assert 50 < conflicts < 150  # both branches were exercised
    zero = torch.zeros(50, dtype=torch.float64)
    assert torch.equal(project(grad, zero), grad)  # an empty reference changes nothing


def test_gem_projection_satisfies_every_constraint():
    generator = torch.Generator().manual_seed(0)
    projected_any = False
    for _ in range(50):
        grad = torch.randn(40, generator=generator, dtype=torch.float64)
        refs = torch.randn(4, 40, generator=generator, dtype=torch.float64)
        projected = project_to_cone(grad, refs, margin=0.0)
        if bool((refs @ grad >= 0).all()):
            assert torch.equal(projected, grad)  # no conflict: left unchanged
        else:
            projected_any = True
            # Every constraint holds, up to the small ridge that keeps the QP well posed.
            assert (refs @ projected).min() > -0.05
            # The closest such gradient: no farther from grad than the zero vector is.
            assert (projected - grad).norm() <= grad.norm()
    assert projected_any


def test_gem_without_quadprog_names_the_fix(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(models.gem, "quadprog", None)
    assert_one_line_error(capsys, main, synthetic_argv(tmp_path, model="gem"),
                          "pip install quadprog")


@pytest.mark.slow
@pytest.mark.parametrize("model", REPLAY_MODELS)
def test_replay_run_writes_a_complete_result(tmp_path, capsys, model):
    buffer_size = 50
    results_dir = tmp_path / "results"
    argv = synthetic_argv(results_dir, "--nf", "4", "--n_epochs", "1",
                          "--buffer_size", str(buffer_size), model=model)
    assert main(argv) == 0
    capsys.readouterr()
    (path,) = results_dir.rglob("*.json")
    result = json.loads(path.read_text())
    assert result["model"] == model
    matrix = result["accuracy_matrix"]
    n_tasks = SequentialSynthetic.N_TASKS
    assert [len(row) for row in matrix] == list(range(1, n_tasks + 1))
    assert all(0.0 <= a <= 100.0 for row in matrix for a in row)
    assert result["config"]["buffer_size"] == buffer_size

    breakdown = result["memory"]["breakdown_bytes"]
    assert set(breakdown) == {"network", "buffer"}
    logits = 4 * SequentialSynthetic.N_CLASSES_PER_TASK if model in ("der", "derpp") else 0
    assert breakdown["buffer"] == buffer_size * (IMAGE_BYTES + 8 + 8 + logits)
