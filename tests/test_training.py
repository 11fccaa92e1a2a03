"""End-to-end runs on seq-synthetic through main(): the result JSON, its metrics, seeding,
and what an interrupted run leaves behind."""
from __future__ import annotations

import json
import os
import re
import types
from pathlib import Path

import pytest
import torch
import torch.nn as nn

import utils.results as results
from datasets.continual_dataset import TaskData, to_model_input
from datasets.seq_synthetic import SequentialSynthetic
from helpers import (assert_one_line_error, build_on_cpu, check_result, cpu_context,
                     network_bytes, run_synthetic, synthetic_argv)
from models.sgd import Sgd
from utils.errors import UserError
from utils.main import main
from utils.metrics import summarize
from utils.results import epoch_log_path, text_log_path, write_json_atomic
from utils.setup import set_deterministic
from models.continual_model import (DIVERGENCE_FACTOR, batch_statistics, check_loss,
                                     tracked_norms)
from utils.training import (LEARNED_MARGIN, RUNNING_STATISTICS_MARGIN, Accuracies,
                            diagnose_unlearned, diagnose_with_batch_statistics, evaluate,
                            single_class_warning, unlearned_warning)

N_TASKS = SequentialSynthetic.N_TASKS
CHANCE = 100.0 / SequentialSynthetic.N_CLASSES_PER_TASK

@pytest.mark.slow
def test_sgd_run_writes_a_complete_result(tmp_path, capsys):
    result, _ = run_synthetic(tmp_path, capsys)
    check_result(result, "sgd")
    assert result["memory"]["breakdown_bytes"] == {"network": network_bytes(model="sgd")}
    assert result["config"]["n_epochs"] == 2
    assert result["config"]["results_dir"] == str(tmp_path / "results")


# Joint's last row is joint training on all five tasks. With these options seeds 0-9 all end
# at 95.4% or more (chance: 50%), so 60% leaves a wide margin for platform differences.
JOINT_OPTIONS = ("--n_epochs", "4", "--batch_size", "16")


@pytest.mark.slow
def test_joint_run_learns_the_tasks_jointly(tmp_path, capsys):
    result, _ = run_synthetic(tmp_path, capsys, *JOINT_OPTIONS, model="joint")
    check_result(result, "joint")
    assert result["final_acc"] > CHANCE + 10
    sizes = SequentialSynthetic.TRAIN_PER_CLASS * N_TASKS * SequentialSynthetic.N_CLASSES_PER_TASK
    image = 3 * SequentialSynthetic.IMAGE_SIZE ** 2  # uint8
    assert result["memory"]["breakdown_bytes"] == {
        "network": network_bytes(*JOINT_OPTIONS, model="joint"),
        "stored_data": sizes * (image + 8 + 8),  # every training image, int64 label and task
    }


@pytest.mark.slow
def test_same_seed_gives_the_same_accuracy_matrix(tmp_path, capsys):
    first, _ = run_synthetic(tmp_path / "a", capsys, "--seed", "3")
    second, _ = run_synthetic(tmp_path / "b", capsys, "--seed", "3")
    assert first["accuracy_matrix"] == second["accuracy_matrix"]


def test_metrics_by_hand():
    matrix = [[90.0],
              [95.0, 70.0],
              [60.0, 75.0, 85.0]]
    m = summarize(matrix)
    assert m["accuracy_matrix"] == matrix
    assert m["avg_accuracy"] == pytest.approx([90.0, 82.5, 220.0 / 3])
    assert m["final_acc"] == pytest.approx(220.0 / 3)
    # BWT: final minus just-learned accuracy, tasks 0 and 1: (60 - 90 + 75 - 70) / 2
    assert m["bwt"] == pytest.approx(-12.5)
    # forgetting: best earlier accuracy minus final: ((95 - 60) + (70 - 75)) / 2
    assert m["forgetting"] == pytest.approx(15.0)


class KnownLogits(nn.Module):
    """Logits looked up by image: the first pixel of each image is its row of `table`."""

    def __init__(self, table: list[list[float]]) -> None:
        super().__init__()
        self.table = torch.tensor(table)

    def all_task_logits(self, x: torch.Tensor, n_tasks: int) -> torch.Tensor:
        return self.table[(x[:, 0, 0, 0] * 255).round().long(), :2 * n_tasks]


class TwoTasksOfTwoClasses:
    N_CLASSES_PER_TASK = 2
    LABELS = [[0, 1, 0, 1], [0, 1, 1, 0]]

    def test_data(self, task: int) -> TaskData:
        rows = torch.arange(4 * task, 4 * task + 4, dtype=torch.uint8)
        return TaskData(rows.view(4, 1, 1, 1).expand(4, 3, 2, 2).clone(),
                        torch.tensor(self.LABELS[task]), torch.full((4,), task))


def test_task_agnostic_accuracy_by_hand():
    """Task-IL reads the true task's two logits, task-agnostic the argmax over all four."""
    model = KnownLogits([[5, 1, 2, 2],   # task 0, y 0: right in both
                         [0, 3, 4, 0],   # y 1: right in its task, beaten by task 1's head
                         [1, 2, 0, 0],   # y 0: wrong in both
                         [0, 1, 2, 0],   # y 1: right in its task only
                         [0, 0, 3, 1],   # task 1, y 0: right in both
                         [9, 0, 0, 1],   # y 1: right in its task only
                         [0, 0, 2, 1],   # y 1: wrong in both
                         [0, 0, 1, 0]])  # y 0: right in both
    after_first = evaluate(model, TwoTasksOfTwoClasses(), 0, cpu_context())
    assert after_first == Accuracies(task_il=[75.0], task_agnostic=[75.0])  # task 1 unseen
    after_both = evaluate(model, TwoTasksOfTwoClasses(), 1, cpu_context())
    assert after_both == Accuracies(task_il=[75.0, 75.0], task_agnostic=[25.0, 50.0])


def test_evaluate_names_a_task_whose_predictions_all_fall_on_one_class():
    """Task 1's own head says class 0 for all four images: half right, as chance would be,
    and flagged; task 0's head predicts both classes."""
    model = KnownLogits([[5, 1, 0, 0], [0, 3, 0, 0], [1, 2, 0, 0], [0, 1, 0, 0],
                         [0, 0, 3, 1], [0, 0, 2, 1], [0, 0, 5, 1], [0, 0, 1, 0]])
    accuracies = evaluate(model, TwoTasksOfTwoClasses(), 1, cpu_context())
    assert accuracies.task_il == [75.0, 50.0]
    assert accuracies.single_class == [1]


def test_batch_statistics_normalise_by_the_batch_and_write_no_buffer():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU())
    net[1].running_mean.fill_(5.0)  # statistics that fit nothing
    net.eval()
    buffers = {k: v.clone() for k, v in net[1].state_dict().items()}
    x = torch.randn(6, 3, 5, 5)
    z = net[0](x)
    expected = torch.relu(nn.functional.batch_norm(z, None, None, net[1].weight, net[1].bias,
                                                   training=True))
    with torch.no_grad(), batch_statistics(net):
        torch.testing.assert_close(net(x), expected)
    assert not net[1].training and net[1].track_running_stats
    for key, value in net[1].state_dict().items():
        assert torch.equal(value, buffers[key]), key


def test_single_class_warning_says_which_part_lost_the_task():
    event = {"after_task": 2, "task": 1, "task_il": 50.0}
    line = single_class_warning({**event, "task_il_with_batch_statistics": 74.4}, 5)
    assert line.startswith("warning: after task 3/5, task 2 predicts one class")
    assert "scores 74.4, so the running statistics, not the weights, put it there" in line
    line = single_class_warning({**event, "task_il_with_batch_statistics": 52.0}, 5)
    assert "scores 52.0, so its weights lost the task" in line
    line = single_class_warning({**event, "task_il_with_batch_statistics": None}, 5)
    assert "normalises with batch statistics already" in line


def _reset_running_statistics_after(task: int):
    """An end_task that afterwards resets the predictor's running statistics to their
    initial values (mean 0, variance 1) once `task` is learned: statistics that fit no task."""
    end_task = Sgd.end_task

    def resetting_end_task(self, task_id, data, ctx):
        end_task(self, task_id, data, ctx)
        if task_id == task:
            for m in tracked_norms(self.predictor()):
                m.reset_running_stats()
    return resetting_end_task


def test_a_task_sent_to_one_class_by_its_statistics_is_reported(tmp_path, capsys, monkeypatch):
    """With exact statistics each task learns well; statistics reset after the second task
    send tasks to one class, and the run logs and records it, with the accuracy each
    scores on batch statistics (the weights still hold them)."""
    monkeypatch.setattr(Sgd, "end_task", _reset_running_statistics_after(1))
    result, path = run_synthetic(tmp_path, capsys, "--exact_bn_stats", "1")
    events = [e for e in result["single_class_predictions"] if e["after_task"] == 1]
    assert events and all(e["task"] in (0, 1) for e in events)
    for event in events:
        assert event["task_il"] == result["accuracy_matrix"][1][event["task"]]
        assert event["task_il_with_batch_statistics"] >= (event["task_il"]
                                                          + RUNNING_STATISTICS_MARGIN)
    log = text_log_path(path).read_text()
    assert single_class_warning(events[0], N_TASKS) in log


def test_unlearned_warning_names_the_task_and_chance():
    event = {"after_task": 3, "task": 3, "task_il": 52.0, "task_il_with_batch_statistics": 94.0}
    line = unlearned_warning(event, 5, 2)
    assert line.startswith("warning: task 4/5 scores 52.0 right after it was learned, less "
                           "than 10 points above chance (50.0); ")
    assert "scores 94.0, so the running statistics, not the weights, put it there" in line
    assert "chance (10.0)" in unlearned_warning(event, 10, 10)
    # A method that scored other networks (CLS-ER: the stable memory predicts and lags the
    # working network) names their scores on the task.
    lagging = {**event, "task_il_with_batch_statistics": 52.9,
               "other_predictors": {"working": 80.2, "plastic": 78.8}}
    assert unlearned_warning(lagging, 5, 2).endswith(
        "scores 52.9, so its weights do not hold the task (docs/experiments.md, 'A task that "
        "predicts one class'); its working network scores 80.2; its plastic network scores 78.8")


def test_only_a_task_just_learned_near_chance_and_not_single_class_is_unlearned(
        synthetic_args):
    dataset, method = build_on_cpu(synthetic_args, "sgd")
    method.eval()
    bound = CHANCE + LEARNED_MARGIN

    def finding(score: float, single_class: list[int]) -> dict | None:
        accuracies = Accuracies([99.0, score], [99.0, score], single_class)
        return diagnose_unlearned(method, dataset, 1, accuracies, cpu_context())

    assert finding(bound, []) is None and finding(bound + 30, []) is None
    assert finding(bound - 1, [1]) is None  # the single-class finding covers it
    event = finding(bound - 1, [])
    assert event["after_task"] == event["task"] == 1 and event["task_il"] == bound - 1
    assert event["task_il_with_batch_statistics"] is not None


def _swap_head_classes_after(task: int):
    """An end_task that afterwards swaps the two classes' rows of `task`'s head: the task
    then predicts both classes, each where the other belongs (100 - its accuracy)."""
    end_task = Sgd.end_task

    def swapping_end_task(self, task_id, data, ctx):
        end_task(self, task_id, data, ctx)
        if task_id == task:
            head = self.net.head(task)
            with torch.no_grad():
                head.weight.copy_(head.weight.flip(0))
                head.bias.copy_(head.bias.flip(0))
    return swapping_end_task


def test_a_task_not_learned_is_reported(tmp_path, capsys, monkeypatch):
    """A task whose head is swapped after learning scores under chance while predicting both
    classes: the run logs and records it, with its (as low) score on batch statistics."""
    monkeypatch.setattr(Sgd, "end_task", _swap_head_classes_after(1))
    result, path = run_synthetic(tmp_path, capsys, "--exact_bn_stats", "1")
    learned = [result["accuracy_matrix"][t][t] for t in (0, 2, 3, 4)]
    assert min(learned) >= CHANCE + LEARNED_MARGIN  # only the swapped task is flagged
    (event,) = result["unlearned_tasks"]
    assert event["after_task"] == event["task"] == 1
    assert event["task_il"] == result["accuracy_matrix"][1][1] < CHANCE
    assert event["task_il_with_batch_statistics"] < CHANCE + RUNNING_STATISTICS_MARGIN
    log = text_log_path(path).read_text()
    assert unlearned_warning(event, N_TASKS, 2) in log
    assert "so its weights do not hold the task" in log


def test_a_network_without_running_statistics_blames_the_weights(synthetic_args):
    dataset, method = build_on_cpu(synthetic_args, "gpm")
    assert not tracked_norms(method)
    event = diagnose_with_batch_statistics(method, dataset, 0, 0, CHANCE, cpu_context())
    assert event["task_il_with_batch_statistics"] is None


@pytest.mark.parametrize("model, extra", [("sgd", ("--per_task_bn", "0")),
                                          ("sgd", ("--per_task_bn", "1")), ("clser", ())])
def test_all_task_logits_are_each_tasks_forward_side_by_side(synthetic_args, model, extra):
    """One feature pass for all heads (shared BatchNorm; CLS-ER's through its stable memory,
    which predicts) or one forward per task (per-task BatchNorm): the same logits."""
    dataset, method = build_on_cpu(synthetic_args, model, *extra)
    with torch.no_grad():
        for p in method.predictor().parameters():  # CLS-ER: a stable memory unlike the net
            p.add_(0.1 * torch.randn_like(p))
    method.eval()
    x = to_model_input(dataset.test_data(1).x[:8], False)
    with torch.no_grad():
        expected = torch.cat([method(x, t) for t in range(3)], 1)
        torch.testing.assert_close(method.all_task_logits(x, 3), expected)
        if model == "clser":
            assert not torch.allclose(expected[:, :2], method.net(x, 0))


def test_metrics_after_one_task_have_no_transfer():
    m = summarize([[42.0]])
    assert m["final_acc"] == 42.0 and m["bwt"] is None and m["forgetting"] is None


@pytest.mark.slow
def test_every_epoch_is_logged_beside_the_result(tmp_path, capsys):
    """One JSON line per finished epoch: task, phase, epoch, loss, seconds, images/s."""
    result, path = run_synthetic(tmp_path, capsys, "--n_epochs", "2")
    lines = [json.loads(line) for line in epoch_log_path(path).read_text().splitlines()]
    assert [(x["task"], x["epoch"]) for x in lines] == [(t, e) for t in range(N_TASKS)
                                                        for e in (1, 2)]
    assert all(x["phase"] == "train" and x["n_epochs"] == 2 for x in lines)
    assert all(x["loss"] > 0 and x["seconds"] > 0 and x["images_per_s"] > 0 for x in lines)
    images = SequentialSynthetic.TRAIN_PER_CLASS * SequentialSynthetic.N_CLASSES_PER_TASK
    assert lines[0]["images_per_s"] == pytest.approx(images / lines[0]["seconds"], rel=0.01)


def test_every_run_keeps_a_timestamped_text_log_also_under_quiet(tmp_path, capsys):
    result, path = run_synthetic(tmp_path, capsys, "--n_epochs", "1")  # --quiet
    lines = text_log_path(path).read_text().splitlines()
    stamp = r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} "
    assert all(re.match(stamp, line) for line in lines)
    assert "options: model=sgd" in lines[0] and lines[1][24:].startswith("code: ")
    tasks = [line[24:] for line in lines[2:-1] if not line[24:].startswith("warning: ")]
    assert [line.split(": avg acc")[0] for line in tasks] == [
        f"task {t}/{N_TASKS}" for t in range(1, N_TASKS + 1)]
    # One warning line after its task's line for each task found predicting one class, or
    # near chance right after it was learned.
    assert len(lines) - 3 - len(tasks) == (len(result["single_class_predictions"])
                                           + len(result["unlearned_tasks"]))
    assert lines[-1].endswith(f"final Task-IL ACC {result['final_acc']:.2f}  task-agnostic ACC "
                              f"{result['task_agnostic']['final_acc']:.2f}  BWT "
                              f"{result['bwt']:.2f}  memory {result['memory']['total_mb']:.2f}"
                              f" MB  time {result['total_time_s']:.1f}s -> {path}")


def _files(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.is_file()] if folder.exists() else []


def test_interrupt_during_training_writes_nothing(tmp_path, capsys, monkeypatch):
    reached = []

    def end_task(self, task, data, ctx):
        reached.append(task)
        if task == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(Sgd, "end_task", end_task)
    assert main(synthetic_argv(tmp_path / "results")) == 130
    assert reached == [0, 1, 2]
    assert "interrupted: no result was written" in capsys.readouterr().err
    # only the logs: how far the run got
    log, text = sorted(_files(tmp_path / "results"), key=lambda p: p.suffix)
    lines = [json.loads(line) for line in log.read_text().splitlines()]
    assert log.name.endswith(".epochs.jsonl") and [x["task"] for x in lines] == [0, 0, 1, 1, 2, 2]
    assert text.suffix == ".log" and "options: model=sgd" in text.read_text()


def _dump_half_then(exc: BaseException):
    def dump(payload, f, **kwargs):
        f.write(json.dumps(payload, default=str)[:20])  # a partial document
        raise exc
    return types.SimpleNamespace(dumps=json.dumps, dump=dump)


@pytest.mark.slow
def test_interrupt_while_writing_the_result_leaves_no_file(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(results, "json", _dump_half_then(KeyboardInterrupt()))
    assert main(synthetic_argv(tmp_path / "results")) == 130
    assert "interrupted" in capsys.readouterr().err
    # neither a partial JSON nor a .tmp; the logs stay
    assert sorted(p.suffix for p in _files(tmp_path / "results")) == [".jsonl", ".log"]


@pytest.mark.parametrize("exc", [OSError("disk full"), KeyboardInterrupt()],
                         ids=["error", "interrupt"])
def test_failed_atomic_write_keeps_the_previous_file(tmp_path, monkeypatch, exc):
    path = tmp_path / "out" / "result.json"
    write_json_atomic({"run": 1, "path": Path("x")}, path)
    assert json.loads(path.read_text()) == {"run": 1, "path": "x"}
    monkeypatch.setattr(results, "json", _dump_half_then(exc))
    with pytest.raises(type(exc)):
        write_json_atomic({"run": 2}, path)
    assert json.loads(path.read_text()) == {"run": 1, "path": "x"}
    assert _files(tmp_path / "out") == [path]


def test_a_diverged_run_stops_with_a_clear_error(tmp_path, capsys):
    """A NaN loss ends the run with one line naming the fix, and no result is written."""
    argv = synthetic_argv(tmp_path / "results", "--lr", "1e30", "--n_epochs", "1")
    assert_one_line_error(capsys, main, argv, "training diverged", "lower --lr")
    assert [p.suffix for p in _files(tmp_path / "results")] == [".log"]  # no result


def test_a_finite_loss_that_keeps_growing_stops_the_run(synthetic_args):
    """A penalty whose step overshoots its curvature grows the loss geometrically (EWC with a
    large Fisher: about 30-fold per epoch) while it is still finite: the epoch that reaches
    DIVERGENCE_FACTOR times the phase's first epoch's loss (or 1's) ends the run."""
    check_loss(0.5, None, "task 1/5 epoch 1")  # a first epoch has nothing to compare with
    check_loss(0.999 * DIVERGENCE_FACTOR, 0.5, "task 1/5 epoch 2")  # within 1e4 x max(0.5, 1)
    check_loss(2.0 * DIVERGENCE_FACTOR, 3.0, "task 1/5 epoch 2")  # within 1e4 x 3
    dataset, model = build_on_cpu(synthetic_args, "sgd")
    ctx, epochs = cpu_context(), []
    ctx.listeners.append(lambda kind, record: kind == "epoch" and epochs.append(record["loss"]))
    with pytest.raises(UserError, match=r"diverged in epoch 4: the loss grew from 0.4 in the "
                                        r"first epoch to 1.08e\+04; lower --lr"):
        model.train_epochs(dataset.train_data(1), ctx, 10,
                           lambda x, y, t: torch.tensor(0.4 * 30.0 ** len(epochs)), task=1)
    assert epochs == pytest.approx([0.4, 12.0, 360.0])  # 1e4 x max(0.4, 1) is first passed


def test_results_get_the_usual_file_permissions(tmp_path):
    """Atomic writes go through an owner-only temporary file; the result must not stay so."""
    path = tmp_path / "r.json"
    write_json_atomic({"a": 1}, path)
    mask = os.umask(0)
    os.umask(mask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~mask


def test_deterministic_switch_sets_and_clears_torch_flags():
    try:
        set_deterministic(True)
        assert torch.are_deterministic_algorithms_enabled()
        assert torch.backends.cudnn.deterministic and not torch.backends.cudnn.benchmark
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    finally:
        set_deterministic(False)
    assert not torch.are_deterministic_algorithms_enabled()


def _stem_statistics(conv: nn.Conv2d, batches) -> tuple[torch.Tensor, torch.Tensor]:
    """The stem BatchNorm's statistics over `batches`, computed by hand: the mean over
    batches of each batch's channel mean and unbiased variance (a cumulative average)."""
    means, variances = [], []
    with torch.no_grad():
        for x, _, _ in batches:
            z = conv(x).transpose(0, 1).flatten(1)
            means.append(z.mean(1))
            variances.append(z.var(1))
    return torch.stack(means).mean(0), torch.stack(variances).mean(0)


@pytest.mark.parametrize("model", ["sgd", "clser"])
def test_exact_bn_stats_are_the_statistics_of_the_predictors_final_weights(
        synthetic_args, model):
    """--exact_bn_stats 1: after fit_task, one cumulative pass gives the predicting network
    (CLS-ER's stable memory) the statistics of its final weights on the task's augmented
    training batches; the working network of CLS-ER keeps its moving average."""
    dataset, method = build_on_cpu(synthetic_args, model, "--exact_bn_stats", "1")
    ctx = cpu_context()
    data = dataset.train_data(0)
    method.begin_task(0, data)
    method.fit_task(0, data, ctx)
    working_before = method.net.bn1.sets[0].running_mean.clone()
    torch.manual_seed(7)
    method.store_exact_bn_statistics(0, data, ctx)
    torch.manual_seed(7)  # the same augmented batches, recomputed independently
    predictor = method.predictor()
    mean, var = _stem_statistics(predictor.conv1, ctx.batches(data, "check", equal_sizes=True))
    stem_bn = predictor.bn1.sets[0]
    torch.testing.assert_close(stem_bn.running_mean, mean)
    torch.testing.assert_close(stem_bn.running_var, var)
    assert stem_bn.momentum == 0.1 and stem_bn.training  # restored after the pass
    assert "bn_statistics" in ctx.phase_times[-1]
    if model == "clser":
        assert torch.equal(method.net.bn1.sets[0].running_mean, working_before)


def test_exact_bn_stats_leave_other_tasks_batchnorm_sets_alone(synthetic_args):
    dataset, method = build_on_cpu(synthetic_args, "sgd", "--exact_bn_stats", "1",
                                   "--per_task_bn", "1")
    ctx = cpu_context()
    data = dataset.train_data(1)
    other = {k: v.clone() for k, v in method.net.bn1.sets[0].state_dict().items()}
    method.store_exact_bn_statistics(1, data, ctx)
    assert int(method.net.bn1.sets[1].num_batches_tracked) == -(-len(data) // ctx.batch_size)
    for key, value in method.net.bn1.sets[0].state_dict().items():
        assert torch.equal(value, other[key]), key


def test_run_with_exact_bn_stats_times_the_pass_and_records_the_option(tmp_path, capsys):
    result, _ = run_synthetic(tmp_path, capsys, "--exact_bn_stats", "1", "--n_epochs", "1")
    assert result["config"]["exact_bn_stats"] == 1
    assert all("bn_statistics" in phases for phases in result["phase_times"])


def test_exact_bn_stats_without_running_statistics_is_refused(tmp_path, capsys):
    assert_one_line_error(capsys, main, synthetic_argv(tmp_path, "--exact_bn_stats", "1",
                                                       "--bn_running_stats", "0"),
                          "--exact_bn_stats 1", "drop one of them")
    # Where the batch statistics are the method's choice, the error says so.
    assert_one_line_error(capsys, main, synthetic_argv(tmp_path, "--exact_bn_stats", "1",
                                                       model="gpm"),
                          "gpm evaluates with batch statistics by default",
                          "add --bn_running_stats 1")
