"""BMKP's long-term memory export (--save_memory) and its evaluation (models/bmkp/evaluate.py)."""
import json

import pytest
import torch

from helpers import assert_one_line_error, synthetic_argv
from models.bmkp import evaluate as evaluate_script
from utils.main import main
from utils.training import single_class_warning

# Small enough for seconds on one thread, yet learning well above chance (50%): at lr 0.1 the
# first task of seed 0 did not learn on an AVX2 CPU (its loss rose), at 0.03 seeds 0-3 all end
# at 84-100 per task on the same machine. BatchNorm uses
# the test batch's statistics and the evaluation batch is not a divisor of the 100 test images
# of a task, so the accuracies depend on --eval_batch_size: the evaluation must reuse it.
BMKP_OPTIONS = ("--nf", "8", "--lr", "0.03", "--n_epochs", "2", "--retrain_epochs", "1",
                "--batch_size", "16", "--projection_samples", "64", "--bn_running_stats", "0",
                "--eval_batch_size", "40")


@pytest.mark.slow
def test_saved_memory_evaluates_to_the_runs_last_row(tmp_path, capsys):
    results, memory = tmp_path / "results", tmp_path / "memories" / "ltm.pt"
    argv = synthetic_argv(results, *BMKP_OPTIONS, "--n_runs", "2", "--save_memory", str(memory),
                          model="bmkp")
    assert main(argv) == 0
    capsys.readouterr()
    runs = {r["seed"]: r for r in (json.loads(p.read_text())
                                   for p in results.rglob("*-seed*.json"))}
    assert sorted(runs) == [0, 1]
    for seed, run in runs.items():
        path = tmp_path / "memories" / f"ltm-seed{seed}.pt"
        assert run["config"]["save_memory"] == str(path)
        last_row = run["accuracy_matrix"][-1]
        agnostic_row = run["task_agnostic"]["accuracy_matrix"][-1]
        assert sum(last_row) / len(last_row) > 55  # learned something: a meaningful check
        accuracies, single_class = evaluate_script.evaluate_memory(
            path, "seq-synthetic", tmp_path / "data", "cpu")
        assert accuracies.task_il == last_row
        assert accuracies.task_agnostic == agnostic_row
        final_findings = [event for event in run["single_class_predictions"]
                          if event["after_task"] == len(last_row) - 1]
        assert single_class == final_findings
    assert not memory.exists()
    assert evaluate_script.main(["--memory", str(path), "--dataset", "seq-synthetic",
                                 "--device", "cpu"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == (f"{path}: 5 tasks of seq-synthetic, accuracy with the task id (Task-IL) "
                        "and without it (task-agnostic)")
    assert lines[1:6] == [f"task {t + 1}: {a:.2f}  {b:.2f}"
                          for t, (a, b) in enumerate(zip(last_row, agnostic_row))]
    assert lines[6] == (f"average: {run['final_acc']:.2f}  "
                        f"{run['task_agnostic']['final_acc']:.2f}")
    assert lines[7:] == [single_class_warning(event, 5) for event in final_findings]


@pytest.mark.slow
def test_saved_file_holds_the_memory_and_options_and_fits_one_dataset(tmp_path, capsys):
    memory = tmp_path / "ltm.pt"
    argv = synthetic_argv(tmp_path / "results", *BMKP_OPTIONS, "--n_epochs", "1",
                          "--retrain_epochs", "0", "--save_memory", str(memory), model="bmkp")
    assert main(argv) == 0
    saved = torch.load(memory, weights_only=True)
    assert saved["model"] == "bmkp" and saved["dataset"] == "seq-synthetic"
    assert {k: saved["args"][k] for k in ("backbone", "nf", "per_task_bn", "bn_running_stats",
                                           "channels_last", "eval_batch_size")} == {
        "backbone": "resnet18", "nf": 8, "per_task_bn": 1, "bn_running_stats": 0,
        "channels_last": 1, "eval_batch_size": 40}
    assert len(saved["memory"]["coefficients"]) == 5
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp file
    capsys.readouterr()
    assert_one_line_error(capsys, evaluate_script.main,
                          ["--memory", str(memory), "--dataset", "seq-cifar10"],
                          "learned on seq-synthetic, not seq-cifar10",
                          "pass --dataset seq-synthetic")


def test_save_memory_of_a_model_without_one_fails_before_training(tmp_path, capsys):
    argv = synthetic_argv(tmp_path / "results", "--save_memory", str(tmp_path / "m.pt"))
    assert_one_line_error(capsys, main, argv, "unrecognized arguments: --save_memory")
    assert not (tmp_path / "results").exists() and not (tmp_path / "m.pt").exists()


def test_evaluate_bad_input_is_a_one_line_error(tmp_path, capsys):
    missing = tmp_path / "missing.pt"
    assert_one_line_error(capsys, evaluate_script.main,
                          ["--memory", str(missing), "--dataset", "seq-synthetic"],
                          f"memory file {missing} does not exist", "--save_memory FILE")
    not_memory = tmp_path / "run.json"
    not_memory.write_text("{}")
    assert_one_line_error(capsys, evaluate_script.main,
                          ["--memory", str(not_memory), "--dataset", "seq-synthetic"],
                          "is not a memory file written by --save_memory")
    assert_one_line_error(capsys, evaluate_script.main, ["--memory", str(missing)],
                          "required", "--dataset")
