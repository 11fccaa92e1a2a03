"""Deep Generative Replay: the VAE learns to reconstruct, the replayed batch (shapes, dtype,
task ids, labels from the previous solver through each task's head), the loss mixing, the
generator replaying itself, memory and checkpoints, and an end-to-end run through main()."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from helpers import (assert_one_line_error, build_on_cpu, check_result, cpu_context,
                     network_bytes, run_synthetic, synthetic_argv)
from models.dgr.model import in_passes, mixed_loss
from models.dgr.vae import ConvVAE, stage_widths, vae_loss
from utils.errors import UserError
from utils.main import main
from utils.sizes import network_bytes as module_bytes

TINY = ("--nf", "4", "--gen_nf", "4", "--latent_dim", "8")


def _smooth_images(n: int, size: int) -> torch.Tensor:
    coarse = torch.rand(n, 3, 2, 2)
    return F.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)


def test_stage_widths_halve_the_image_down_to_two_pixels():
    assert stage_widths(32, 32) == [32, 64, 128, 256]  # the BMKP fork's CIFAR VAE
    assert stage_widths(64, 32) == [32, 64, 128, 256, 512]
    assert stage_widths(16, 4) == [4, 8, 16]
    with pytest.raises(UserError, match="power of two"):
        stage_widths(28, 4)
    vae = ConvVAE(32, 3, n_tasks=3, width=4, latent_dim=8).eval()
    with torch.no_grad():
        images = vae.sample(torch.tensor([0, 2, 1]))
    assert images.shape == (3, 3, 32, 32) and 0 <= images.min() and images.max() <= 1


def test_vae_loss_matches_a_hand_computation():
    x = torch.rand(2, 3, 4, 4)
    zeros = torch.zeros(2, 5)
    torch.testing.assert_close(vae_loss(x, x, zeros, zeros, 1.0), torch.zeros(2))
    recons = x.clone()
    recons[1] += 0.5  # squared error 0.25 on every pixel of the second image
    mu = torch.tensor([[1.0, 0, 0, 0, 0], [0, 0, 0, 0, 0]])  # KL 1/2 for the first
    torch.testing.assert_close(vae_loss(recons, x, mu, zeros, 0.1), torch.tensor([0.05, 0.25]))


def test_mixed_loss_weights_the_current_task_against_the_replay():
    losses = torch.tensor([1.0, 2.0, 3.0, 5.0])
    assert mixed_loss(losses, 2, 0.25).item() == pytest.approx(0.25 * 1.5 + 0.75 * 4.0)
    assert mixed_loss(losses, 4, 0.25).item() == pytest.approx(2.75)  # nothing replayed


def test_vae_learns_to_reconstruct():
    torch.manual_seed(0)
    images, tasks = _smooth_images(16, 16), torch.arange(16) % 2
    vae = ConvVAE(16, 3, n_tasks=2, width=8, latent_dim=8)
    optimizer = torch.optim.Adam(vae.parameters(), lr=0.01)
    losses = []
    for _ in range(40):
        recons, mu, log_var = vae(images, tasks)
        loss = vae_loss(recons, images, mu, log_var, 1e-4).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert sum(losses[-5:]) < 0.5 * sum(losses[:5])
    vae.eval()
    with torch.no_grad():
        def error(x: torch.Tensor) -> torch.Tensor:
            mu, _ = vae.encode(x, tasks[:len(x)])
            return (vae.decode(mu, tasks[:len(x)]) - x).pow(2).flatten(1).mean(1)
        assert error(images[:4]).max() < error(torch.rand(4, 3, 16, 16)).min()


def _method_at_task(synthetic_args, task: int, *extra: str):
    """A dgr method that has begun `task` (no training: the scholar is the initial one)."""
    dataset, method = build_on_cpu(synthetic_args, "dgr", *TINY, *extra)
    for t in range(task + 1):
        if t:
            method.end_task(t - 1, None, cpu_context())
        method.begin_task(t, dataset.train_data(t))
    method.train()
    return dataset, method


def test_replay_has_the_solvers_input_shape_dtype_and_task_ids(synthetic_args):
    _, method = _method_at_task(synthetic_args, 2, "--minibatch_size", "7")
    assert not method.previous_net.training and not method.previous_generator.training
    past = method.generated_replay(2)
    assert past.x.shape == (7, 3, 16, 16) and past.x.dtype == torch.float32
    assert 0 <= past.x.min() and past.x.max() <= 1 and not past.x.requires_grad
    assert past.t.tolist() == [0, 0, 0, 0, 1, 1, 1]  # the earlier tasks in equal shares
    assert past.t.dtype == past.y.dtype == torch.long
    assert ((0 <= past.y) & (past.y < 2)).all()
    _, method = _method_at_task(synthetic_args, 1, "--channels_last", "1")
    assert method.generated_replay(1).x.is_contiguous(memory_format=torch.channels_last)


def test_replayed_labels_come_from_the_previous_solver_through_each_tasks_head(synthetic_args):
    _, method = _method_at_task(synthetic_args, 2, "--minibatch_size", "6")
    # The previous solver's head 0 always says class 1, its head 1 class 0; the live
    # network's heads say the opposite.
    for net, favoured in ((method.previous_net, (1, 0)), (method.net, (0, 1))):
        with torch.no_grad():
            for task, label in enumerate(favoured):
                net.head(task).bias.copy_(torch.tensor([-1e4, 1e4]) * (1 if label else -1))
    assert method.generated_replay(2).y.tolist() == [1, 1, 1, 0, 0, 0]


def test_the_solver_step_mixes_real_and_replayed_losses(synthetic_args):
    dataset, method = _method_at_task(synthetic_args, 2, "--minibatch_size", "6",
                                      "--new_task_weight", "0.3")
    data = dataset.train_data(2)
    x, y = data.x[:8].float() / 255, data.y[:8]
    torch.manual_seed(1)
    past = method.generated_replay(2)
    tasks = torch.cat((torch.full_like(y, 2), past.t))
    losses = F.cross_entropy(method.net(torch.cat((x, past.x)), tasks),
                             torch.cat((y, past.y)), reduction="none")
    expected = 0.3 * losses[:8].mean() + 0.7 * losses[8:].mean()
    torch.manual_seed(1)  # the same generated batch
    assert method.observe(x, y, 2).item() == pytest.approx(expected.item(), rel=1e-5)
    assert method.new_task_weight(2) == 0.3
    _, default = _method_at_task(synthetic_args, 3)
    assert default.new_task_weight(3) == 0.25  # every task so far alike


def test_passes_split_the_batch_as_each_reference_does(synthetic_args):
    _, method = _method_at_task(synthetic_args, 3, "--minibatch_size", "7")
    assert method.replay_shares(3) == [3, 2, 2]
    assert method.replay_tasks(3).tolist() == [0, 0, 0, 1, 1, 2, 2]
    assert method.pass_sizes(8, 3) == [15]  # joint: one mixed batch
    assert method.pass_sizes(8, 0) == [8]
    _, method = _method_at_task(synthetic_args, 3, "--minibatch_size", "7",
                                "--replay_passes", "separate")
    assert method.pass_sizes(8, 3) == [8, 7]
    _, method = _method_at_task(synthetic_args, 3, "--minibatch_size", "2",
                                "--replay_passes", "per_task")
    assert method.replay_shares(3) == [1, 1, 0]
    assert method.pass_sizes(8, 3) == [8, 1, 1]  # a task with no image gets no pass
    assert method.pass_sizes(8, 0) == [8]


def test_in_passes_concatenates_tensor_and_tuple_outputs():
    x = torch.arange(6.0)
    assert in_passes(lambda a: a * 2, [2, 4], x).tolist() == [0, 2, 4, 6, 8, 10]
    seen = []

    def pair(a, b):
        seen.append(len(a))
        return a + b, a - b
    total, difference = in_passes(pair, [1, 2, 3], x, torch.ones(6))
    assert seen == [1, 2, 3]
    assert total.tolist() == (x + 1).tolist() and difference.tolist() == (x - 1).tolist()


@pytest.mark.parametrize("passes", ["separate", "per_task"])
def test_passes_normalise_and_update_batchnorm_per_pass(synthetic_args, passes):
    dataset, method = _method_at_task(synthetic_args, 2, "--minibatch_size", "6",
                                      "--replay_passes", passes, "--new_task_weight", "0.3")
    data = dataset.train_data(2)
    x, y = data.x[:8].float() / 255, data.y[:8]
    untouched = copy.deepcopy(method.net)  # the network before the step, in training mode
    torch.manual_seed(1)
    past = method.generated_replay(2)
    groups = [(x, torch.full_like(y, 2), y)]
    if passes == "separate":
        groups.append((past.x, past.t, past.y))
    else:
        groups += [(past.x[past.t == k], past.t[past.t == k], past.y[past.t == k])
                   for k in range(2)]
    losses = [F.cross_entropy(untouched(inputs, tasks), labels, reduction="none")
              for inputs, tasks, labels in groups]
    expected = 0.3 * losses[0].mean() + 0.7 * torch.cat(losses[1:]).mean()
    torch.manual_seed(1)  # the same generated batch
    assert method.observe(x, y, 2).item() == pytest.approx(expected.item(), rel=1e-5)
    # The running statistics took one update per pass, each from its own batch statistics.
    for ours, theirs in zip(method.net.modules(), untouched.modules()):
        if isinstance(ours, torch.nn.BatchNorm2d):
            torch.testing.assert_close(ours.running_mean, theirs.running_mean)
            torch.testing.assert_close(ours.running_var, theirs.running_var)


def test_the_generator_replays_itself(synthetic_args):
    dataset, method = _method_at_task(synthetic_args, 2, "--minibatch_size", "5")
    drawn = []
    sample = method.previous_generator.sample

    def spy(tasks):
        images = sample(tasks)
        drawn.append((tasks.tolist(), images))
        return images

    method.previous_generator.sample = spy
    method.generator_optimizer = torch.optim.Adam(method.generator.parameters(), lr=0.005)
    before = {k: v.clone() for k, v in method.generator.state_dict().items()}
    data = dataset.train_data(2)
    loss = method.generator_step(None, data.y[:8], 2, data.x[:8])
    assert loss.ndim == 0 and torch.isfinite(loss) and not loss.requires_grad
    ((tasks, images),) = drawn
    assert tasks == [0, 0, 0, 1, 1] and images.shape == (5, 3, 16, 16)
    after = method.generator.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)  # it stepped
    assert all(not p.requires_grad for p in method.previous_generator.parameters())


def test_memory_and_checkpoint_hold_the_solver_and_the_generator(synthetic_args):
    dataset, method = _method_at_task(synthetic_args, 1)
    within = method.memory_breakdown()
    assert within == {"network": module_bytes(method.net),
                      "generator": module_bytes(method.generator),
                      "previous_net": module_bytes(method.net),
                      "previous_generator": module_bytes(method.generator)}
    assert within["generator"] > 0
    method.end_task(1, None, cpu_context())
    assert method.previous_net is None and method.previous_generator is None
    assert method.memory_breakdown() == {"network": within["network"],
                                         "generator": within["generator"]}
    with torch.no_grad():  # as if trained: no longer the fresh generator
        for p in method.generator.parameters():
            p.add_(0.1 * torch.randn_like(p))
    state = method.checkpoint_state()
    assert {key.split(".")[0] for key in state["model"]} == {"net", "generator"}
    _, fresh = build_on_cpu(synthetic_args, "dgr", *TINY)
    fresh.load_checkpoint_state(state)
    fresh.eval()
    method.eval()
    tasks = torch.tensor([0, 1])
    with torch.no_grad():
        torch.manual_seed(2)
        expected = method.generator.sample(tasks)
        torch.manual_seed(2)
        torch.testing.assert_close(fresh.generator.sample(tasks), expected)


def test_dgr_refuses_per_task_batchnorm(tmp_path, capsys):
    argv = synthetic_argv(tmp_path, "--per_task_bn", "1", model="dgr")
    assert_one_line_error(capsys, main, argv, "dgr", "--per_task_bn")


def test_dgr_refuses_batchnorm_without_running_statistics(tmp_path, capsys):
    argv = synthetic_argv(tmp_path, "--bn_running_stats", "0", model="dgr")
    assert_one_line_error(capsys, main, argv, "dgr", "--bn_running_stats 0")


@pytest.mark.slow
def test_run_writes_a_complete_result_with_the_generator_in_memory(tmp_path, capsys):
    extra = ("--n_epochs", "1", "--gen_nf", "4", "--latent_dim", "8")
    result, _ = run_synthetic(tmp_path, capsys, *extra, model="dgr")
    check_result(result, "dgr")
    # the generator trains after every task but the last: only later tasks replay from it
    assert [times.get("generator", 0) > 0 for times in result["phase_times"]] == \
        [True] * 4 + [False]
    breakdown = result["memory"]["breakdown_bytes"]
    assert set(breakdown) == {"network", "generator"}
    assert breakdown["network"] == network_bytes(*extra, model="dgr")
    assert breakdown["generator"] > 0
