"""HAL (models/hal.py): the anchor-preservation step and the anchor objective against hand
computations on a tiny linear network, batched anchors equal to one-at-a-time ones under
BatchNorm, the anchor bookkeeping, phi's EMA, the ring buffer's equal shares, and end-to-end
runs (a valid result; a killed and resumed run equal to an uninterrupted one)."""
from __future__ import annotations


import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from backbone.contract import TaskNetwork
from datasets.seq_synthetic import SequentialSynthetic
from helpers import (assert_one_line_error, build_on_cpu, check_result, cpu_context,
                     run_synthetic, synthetic_argv)
from models.continual_model import batch_statistics, tracked_norms
from models.hal import Hal, anchor_objective, anchor_terms
from utils.buffer import ReplaySample, RingBuffer
from utils.main import main

CPT = SequentialSynthetic.N_CLASSES_PER_TASK
N_TASKS = SequentialSynthetic.N_TASKS
IMAGE = (3, SequentialSynthetic.IMAGE_SIZE, SequentialSynthetic.IMAGE_SIZE)
SHAPE = (3, 2, 2)  # the tiny network's images


class TinyNet(TaskNetwork):
    """features = A x + a (shared), task k's logits = W_k features + b_k; float64."""

    def __init__(self, n_tasks: int = N_TASKS, hidden: int = 4) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.n_tasks = n_tasks
        self.body = nn.Linear(12, hidden).double()
        self.heads = nn.ModuleList(nn.Linear(hidden, CPT).double() for _ in range(n_tasks))

    def features(self, x, task):
        return self.body(x.flatten(1))

    def task_logits(self, features, task):
        if isinstance(task, torch.Tensor):
            every = torch.stack([head(features) for head in self.heads], dim=1)
            return every[torch.arange(len(features)), task]
        return self.heads[task](features)

    def head(self, task):
        return self.heads[task]

    def task_modules(self, task):
        return {f"heads.{task}": self.heads[task]}

    def own_modules(self, task):
        return self.task_modules(task)


def _weights(net: TinyNet) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in net.named_parameters()}


def _forward(w, x, tasks):
    """(features, logits) of the tiny network with weights `w`, by hand."""
    features = x.flatten(1) @ w["body.weight"].T + w["body.bias"]
    logits = torch.stack([w[f"heads.{k}.weight"] @ f + w[f"heads.{k}.bias"]
                          for f, k in zip(features, tasks.tolist())])
    return features, logits


def _backward(w, x, tasks, features, d_logits):
    """Gradients of the tiny network's weights from the gradient of its logits, by hand."""
    grads = {name: torch.zeros_like(v) for name, v in w.items()}
    d_features = torch.zeros_like(features)
    for i, k in enumerate(tasks.tolist()):
        grads[f"heads.{k}.weight"] += torch.outer(d_logits[i], features[i])
        grads[f"heads.{k}.bias"] += d_logits[i]
        d_features[i] = w[f"heads.{k}.weight"].T @ d_logits[i]
    grads["body.weight"] = d_features.T @ x.flatten(1)
    grads["body.bias"] = d_features.sum(0)
    return grads


def _tiny_hal(synthetic_args, *extra: str) -> Hal:
    args = synthetic_args("--buffer_size", "10", *extra, model="hal")
    return Hal(TinyNet(), SequentialSynthetic, args)


def test_anchor_preservation_step_matches_a_hand_computation(synthetic_args):
    """With anchors, one step is theta - lr * grad[CE(theta) + lambda * mean (f_theta~(e) -
    f_theta(e))^2], theta~ = theta - lr * grad CE(theta) held fixed; the replayed samples and
    the anchors each go through their own task's head."""
    lr, lam, task = 0.3, 0.7, 2
    model = _tiny_hal(synthetic_args, "--lr", str(lr), "--hal_lambda", str(lam))
    model.begin_task(task, None)
    generator = torch.Generator().manual_seed(1)
    raw = torch.randint(0, 256, (4, *SHAPE), dtype=torch.uint8, generator=generator)
    x, y = raw.double() / 255, torch.tensor([0, 1, 1, 0])
    past = ReplaySample(torch.rand(3, *SHAPE, dtype=torch.float64, generator=generator),
                        torch.tensor([1, 0, 1]), torch.tensor([0, 1, 0]), None)
    model.replay = lambda: past
    model.anchors = torch.rand(3, *SHAPE, dtype=torch.float64, generator=generator)
    model.anchor_t, model.anchor_y = torch.tensor([0, 0, 1]), torch.tensor([0, 1, 0])
    w = _weights(model.net)

    # The replay loss and its gradient (softmax minus one-hot, over the batch size).
    inputs, labels = torch.cat((x, past.x)), torch.cat((y, past.y))
    tasks = torch.cat((torch.full((4,), task), past.t))
    features, logits = _forward(w, inputs, tasks)
    probs = logits.softmax(1)
    ce = -probs[torch.arange(7), labels].log().mean()
    g_ce = _backward(w, inputs, tasks, features, (probs - F.one_hot(labels, CPT)) / 7)
    # The anchors' targets after the temporary step, and the preservation loss at theta.
    stepped = {name: w[name] - lr * g_ce[name] for name in w}
    targets = _forward(stepped, model.anchors, model.anchor_t)[1]
    a_features, a_logits = _forward(w, model.anchors, model.anchor_t)
    # per logit weighted as mammoth's mean over all N_TASKS * CPT classes
    preservation = lam * ((targets - a_logits) ** 2).sum() / (3 * N_TASKS * CPT)
    g_anchor = _backward(w, model.anchors, model.anchor_t, a_features,
                         2 * lam * (a_logits - targets) / (3 * N_TASKS * CPT))

    loss = model.observe(x, y, task, raw)
    assert loss.item() == pytest.approx((ce + preservation).item(), rel=1e-6)
    assert preservation.item() > 1e-6  # the anchors' outputs did move
    for name, p in model.net.named_parameters():
        expected = w[name] - lr * (g_ce[name] + g_anchor[name])
        assert torch.allclose(p.detach(), expected, rtol=0, atol=1e-12), name
    heads_3_4 = [n for n in w if n.startswith(("heads.3", "heads.4"))]
    assert all(torch.equal(model.net.get_parameter(n), w[n]) for n in heads_3_4)


def test_anchor_objective_matches_a_hand_computation():
    """Per anchor: CE under the current weights, CE under the fine-tuned ones, ||f - phi||^2;
    the objective CE_current - CE_finetuned + gamma * distance, and its gradient in e."""
    gamma, task = 0.3, 3
    net = TinyNet()
    current = _weights(net)
    generator = torch.Generator().manual_seed(2)
    finetuned = {k: v + 0.1 * torch.randn(v.shape, dtype=v.dtype, generator=generator)
                 for k, v in current.items()}
    anchors = torch.rand(2, *SHAPE, dtype=torch.float64, generator=generator).requires_grad_()
    labels = torch.tensor([0, 1])
    phi = torch.randn(4, dtype=torch.float64, generator=generator)

    terms = anchor_terms(net, finetuned, current, anchors, labels, task, phi)
    anchor_objective(terms, gamma).sum().backward()

    e, tasks, onehot = anchors.detach(), torch.full((2,), task), F.one_hot(labels, CPT)
    f_t, z_t = _forward(current, e, tasks)
    _, z_m = _forward(finetuned, e, tasks)
    p_t, p_m = z_t.softmax(1), z_m.softmax(1)
    expected = torch.stack((-p_t[[0, 1], labels].log(), -p_m[[0, 1], labels].log(),
                            ((f_t - phi) ** 2).sum(1)), dim=1)
    assert torch.allclose(terms.detach(), expected, atol=1e-12)
    # d/de = A_t^T W_t^T (p_t - y) - A_M^T W_M^T (p_m - y) + 2 gamma A_t^T (f_t - phi)
    head = f"heads.{task}.weight"
    grad = ((p_t - onehot) @ current[head] @ current["body.weight"]
            - (p_m - onehot) @ finetuned[head] @ finetuned["body.weight"]
            + 2 * gamma * (f_t - phi) @ current["body.weight"])
    assert torch.allclose(anchors.grad, grad.view(2, *SHAPE), atol=1e-12)


def test_anchors_learned_together_equal_anchors_learned_one_by_one(synthetic_args):
    """Under BatchNorm with batch statistics each anchor is its own batch of one (mammoth's
    per-class loop), so learning a task's anchors together changes nothing."""
    _, model = build_on_cpu(synthetic_args, "hal", "--nf", "4")
    net = model.net.double()  # a single image's BatchNorm statistics amplify float32 noise
    current = {k: p.detach() for k, p in net.named_parameters()}
    finetuned = {k: v + 0.05 * torch.randn_like(v) for k, v in current.items()}
    phi = torch.randn(net.feature_dim, dtype=torch.float64)
    anchors = torch.rand(3, *IMAGE, dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([0, 1, 1])
    with batch_statistics(net):
        together = anchor_terms(net, finetuned, current, anchors, labels, 1, phi)
        anchor_objective(together, 0.1).sum().backward()
        grad, anchors.grad = anchors.grad, None
        for i in range(3):
            alone = anchor_terms(net, finetuned, current, anchors[i:i + 1], labels[i:i + 1],
                                 1, phi)
            assert torch.allclose(alone[0], together[i], rtol=1e-10)
            anchor_objective(alone, 0.1).sum().backward()
    assert torch.allclose(grad, anchors.grad, rtol=1e-8, atol=1e-10)


def test_anchor_bookkeeping(synthetic_args):
    """After each task: one float anchor per class of each finished task, with its task id
    and class; earlier anchors kept as they were; anchor learning leaves the network (and its
    BatchNorm statistics) alone; the memory counts the anchors; a checkpoint carries them."""
    dataset, model = build_on_cpu(synthetic_args, "hal", "--nf", "4", "--buffer_size", "20",
                                  "--n_epochs", "1", "--steps_on_anchors", "3")
    ctx = cpu_context()
    ctx.debug = True  # five batches per epoch
    for task in range(2):
        data = dataset.train_data(task)
        model.begin_task(task, data)
        model.fit_task(task, data, ctx)
        before = {k: v.clone() for k, v in model.net.state_dict().items()}
        earlier = None if task == 0 else model.anchors.clone()
        model.end_task(task, data, ctx)
        assert all(torch.equal(v, before[k]) for k, v in model.net.state_dict().items())
        n = CPT * (task + 1)
        assert model.anchors.shape == (n, *IMAGE) and model.anchors.dtype == torch.float32
        assert model.anchor_t.tolist() == [k for k in range(task + 1) for _ in range(CPT)]
        assert model.anchor_y.tolist() == list(range(CPT)) * (task + 1)
        if earlier is not None:
            assert torch.equal(model.anchors[:len(earlier)], earlier)
        assert model.phi is None  # phi is the current task's
        assert (model.buffer.task, model.buffer.filled[:task + 2]) == (task + 1,
                                                                      [4] * (task + 1) + [0])
        assert model.memory_breakdown()["anchors"] == n * (IMAGE[0] * IMAGE[1] ** 2 * 4 + 16)
        assert ctx.phase_times[-1]["anchors"] > 0
        assert [r["task"] for r in model.result_details()["anchor_terms"]] == list(
            range(task + 1))

    _, fresh = build_on_cpu(synthetic_args, "hal", "--nf", "4", "--buffer_size", "20")
    fresh.load_checkpoint_state(model.checkpoint_state())
    for field in ("anchors", "anchor_t", "anchor_y"):
        assert torch.equal(getattr(fresh, field), getattr(model, field))
    assert (fresh.buffer.task, fresh.buffer.filled) == (model.buffer.task, model.buffer.filled)
    assert fresh.result_details() == model.result_details()


def test_phi_is_an_ema_of_the_batch_features(synthetic_args):
    """phi <- beta * phi + (1 - beta) * mean features of the batch (after the step; lr 0 keeps
    the weights), starting from 0, and starting over in the next task."""
    beta = 0.3
    dataset, model = build_on_cpu(synthetic_args, "hal", "--nf", "4", "--beta", str(beta))
    data = dataset.train_data(0)
    model.begin_task(0, data)
    model.optimizer.param_groups[0]["lr"] = 0.0
    model.train()
    expected = 0.0
    for i in range(3):
        raw, y = data.x[8 * i:8 * (i + 1)], data.y[8 * i:8 * (i + 1)]
        x = raw.float() / 255
        model.observe(x, y, 0, raw)
        with torch.no_grad():  # training mode: the batch's own BatchNorm statistics
            features = model.net.features(x, 0).mean(0)
        expected = beta * expected + (1 - beta) * features
        assert torch.allclose(model.phi, expected, atol=1e-5)
    model.begin_task(1, dataset.train_data(1))
    assert model.phi is None


def test_mammoth_bn_updates_move_the_running_statistics_per_pass_and_nothing_else(
        synthetic_args):
    """--bn_updates mammoth: each step moves the running statistics once per training-mode
    pass of mammoth's code (the batch and phi's pass; with anchors also the anchors' two),
    where the default moves them once; the weights, the anchors and the losses are the same."""
    models = {}
    for mode in ("training", "mammoth"):
        dataset, model = build_on_cpu(synthetic_args, "hal", "--nf", "4", "--buffer_size", "20",
                                      "--steps_on_anchors", "2", "--bn_updates", mode)
        model.train()
        moves, losses = [], []
        for task in range(2):
            data = dataset.train_data(task)
            model.begin_task(task, data)
            for i in range(2):
                raw, y = data.x[8 * i:8 * (i + 1)], data.y[8 * i:8 * (i + 1)]
                before = [int(m.num_batches_tracked) for m in tracked_norms(model.net)]
                torch.manual_seed(10 * task + i)
                losses.append(model.observe(raw.float() / 255, y, task, raw))
                after = [int(m.num_batches_tracked) for m in tracked_norms(model.net)]
                moves.append({b - a for a, b in zip(before, after)})
            if task == 0:
                model.end_task(task, data, cpu_context())
        models[mode] = (model, moves, losses)
    default, mammoth = models["training"], models["mammoth"]
    assert default[1] == [{1}] * 4
    assert mammoth[1] == [{2}, {2}, {4}, {4}]
    torch.testing.assert_close(torch.stack(mammoth[2]), torch.stack(default[2]))
    assert torch.equal(mammoth[0].anchors, default[0].anchors)
    for (name, p), q in zip(default[0].net.named_parameters(), mammoth[0].net.parameters()):
        torch.testing.assert_close(q, p, msg=name)
    running = [(m.running_mean, n.running_mean) for m, n in
               zip(tracked_norms(default[0].net), tracked_norms(mammoth[0].net))]
    assert any(not torch.allclose(a, b) for a, b in running)


def _offer(buffer: RingBuffer, first: int, count: int, batch: int) -> None:
    """Offer items first..first+count-1 (label = id, task id = the buffer's current task)."""
    for start in range(first, first + count, batch):
        ids = torch.arange(start, min(start + batch, first + count))
        x = (ids % 256).to(torch.uint8)[:, None, None, None].expand(-1, 3, 2, 2).contiguous()
        buffer.add(x, ids, torch.full_like(ids, buffer.task))


def test_ring_buffer_gives_each_task_an_equal_share():
    """capacity // n_tasks slots per task, each holding the last items its task offered
    (slot k * share + n % share for the task's n-th item, mammoth's ring), never another
    task's; sampling draws from every filled slot and nothing else."""
    buffer = RingBuffer(32, n_tasks=3, generator=torch.Generator().manual_seed(0))
    share = 10
    assert buffer.share == share and buffer.capacity == 30
    offered = {0: (0, 37, 4), 1: (100, 6, 4), 2: (200, 55, 16)}  # first id, count, batch
    for task, (first, count, batch) in offered.items():
        _offer(buffer, first, count, batch)
        buffer.next_task()
    assert buffer.filled == [10, 6, 10] and len(buffer) == 26
    assert buffer.nbytes() == 30 * (12 + 8 + 8)
    for task, (first, count, _) in offered.items():
        slots = range(task * share, task * share + min(count, share))
        kept = buffer.y[list(slots)].tolist()
        # the last `share` items of the task, each at its ring position
        assert sorted(kept) == list(range(first + max(0, count - share), first + count))
        for slot, item in zip(slots, kept):
            assert (item - first) % share == slot - task * share
        assert buffer.t[list(slots)].tolist() == [task] * len(slots)
    drawn = set()
    for _ in range(20):
        sample = buffer.sample(8, augment=False)
        assert len(set(sample.y.tolist())) == 8
        drawn |= set(sample.y.tolist())
    assert drawn == set(buffer.y[buffer.slots()].tolist())  # every filled slot, no empty one
    assert len(buffer.sample(100).y) == 26

    state = buffer.state_dict()
    copy = RingBuffer(32, n_tasks=3)
    copy.load_state_dict(state)
    assert (copy.task, copy.filled, len(copy)) == (3, [10, 6, 10], 26)


def test_hal_refuses_a_buffer_smaller_than_the_tasks(tmp_path, capsys):
    assert_one_line_error(capsys, main, synthetic_argv(tmp_path, "--buffer_size", "4",
                                                       model="hal"), "--buffer_size")
    assert_one_line_error(capsys, main, synthetic_argv(tmp_path, "--beta", "1.5",
                                                       model="hal"), "--beta")


@pytest.mark.slow
def test_hal_run_writes_a_valid_result(tmp_path, capsys):
    result, _ = run_synthetic(tmp_path, capsys, "--n_epochs", "1", "--buffer_size", "50",
                              "--steps_on_anchors", "5", model="hal")
    check_result(result, "hal")
    breakdown = result["memory"]["breakdown_bytes"]
    assert set(breakdown) == {"network", "buffer", "anchors"}
    assert breakdown["buffer"] == 50 * (IMAGE[0] * IMAGE[1] ** 2 + 8 + 8)
    assert breakdown["anchors"] == N_TASKS * CPT * (IMAGE[0] * IMAGE[1] ** 2 * 4 + 8 + 8)
    assert all(t["anchors"] > 0 for t in result["phase_times"])
    terms = result["method"]["anchor_terms"]
    assert [t["task"] for t in terms] == list(range(N_TASKS))
    assert all(v == v for t in terms for v in t.values())  # finite numbers, no NaN
