"""--tensorboard: the run's epoch and task events as TensorBoard scalars beside its result."""
from __future__ import annotations

import json
import sys

import pytest

from datasets.seq_synthetic import SequentialSynthetic
from helpers import assert_one_line_error, synthetic_argv
from utils.main import main
from utils.tensorboard_events import tensorboard_dir

N_TASKS = SequentialSynthetic.N_TASKS


def test_tensorboard_gets_losses_accuracies_and_phase_times(tmp_path, capsys):
    event_accumulator = pytest.importorskip(
        "tensorboard.backend.event_processing.event_accumulator")
    results = tmp_path / "results"
    assert main(synthetic_argv(results, "--n_epochs", "2", "--tensorboard")) == 0
    capsys.readouterr()
    path = next(results.rglob("*-seed0.json"))
    result = json.loads(path.read_text())
    events = event_accumulator.EventAccumulator(str(tensorboard_dir(path)))
    events.Reload()

    def scalars(tag: str) -> list[tuple[int, float]]:
        return [(e.step, e.value) for e in events.Scalars(tag)]

    assert [step for step, _ in scalars("loss/train")] == list(range(1, 2 * N_TASKS + 1))
    assert all(loss > 0 for _, loss in scalars("loss/train"))
    tasks = list(range(1, N_TASKS + 1))
    assert scalars("accuracy/task_il") == [
        (t, pytest.approx(a)) for t, a in zip(tasks, result["avg_accuracy"])]
    assert scalars("accuracy/task_agnostic") == [
        (t, pytest.approx(a)) for t, a in zip(tasks, result["task_agnostic"]["avg_accuracy"])]
    first_task = [row[0] for row in result["accuracy_matrix"]]
    assert scalars("task_il/task_1") == [(t, pytest.approx(a)) for t, a in zip(tasks, first_task)]
    assert scalars("seconds/train") == [
        (t, pytest.approx(p["train"])) for t, p in zip(tasks, result["phase_times"])]


def test_tensorboard_without_the_package_is_a_one_line_error(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # as if not installed
    assert_one_line_error(capsys, main, synthetic_argv(tmp_path / "r", "--tensorboard"),
                          "pip install tensorboard")
    assert not (tmp_path / "r").exists()  # failed before writing anything
