"""utils/reproduce.py: the paper's experiments as jobs, a time budget that stops them between
tasks, and resuming them to the same result; --budget_s of utils/main.py underneath."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from helpers import assert_one_line_error, synthetic_argv
from utils import reproduce
from utils.main import main
from utils.training import BUDGET_EXIT

SMALL = ("--n_epochs", "1", "--retrain_epochs", "1", "--nf", "4", "--batch_size", "32")


def test_plan_has_every_table_once_per_dataset_variant_and_seed(tmp_path):
    def jobs(tables, datasets=None):
        return reproduce.plan(tables, datasets, [0, 1, 2, 3, 4], "paper", {}, tmp_path)

    assert len(jobs([1])) == 3 * 5
    assert len(jobs([2])) == 3 * 3 * 5
    assert len(jobs([1, 2])) == 3 * 3 * 5  # Table 2's full runs are Table 1's
    lambdas = sorted({job.options["lambd"] for job in jobs([3])})
    assert lambdas == [0, 1, 10, 100, 1000] and {j.dataset for j in jobs([3])} == {"seq-tinyimg"}
    assert len(jobs([4])) == 2 * 4 * 5
    table1 = jobs([1])
    assert all(j.model == "bmkp" and j.options["model_config"] == "best"
               and j.options["compat"] == "paper" for j in table1)
    assert len({j.folder for j in table1}) == len(table1)
    # a dataset without the paper's settings runs with its defaults
    assert "model_config" not in jobs([1], ["seq-synthetic"])[0].options


def test_other_methods_join_table_1_with_their_own_best_configuration(tmp_path, capsys):
    jobs = reproduce.plan([1], ["seq-cifar10"], [0, 1], "official", {"n_epochs": 5}, tmp_path,
                          ["bmkp", "er", "sgd"])
    by_model = {model: [j for j in jobs if j.model == model] for model in ("bmkp", "er", "sgd")}
    assert all(len(runs) == 2 for runs in by_model.values())
    assert all(j.options["compat"] == "official" for j in by_model["bmkp"])
    assert not any("compat" in j.options for j in by_model["er"] + by_model["sgd"])
    assert all(j.options["model_config"] == "best" and j.options["n_epochs"] == 5
               for j in by_model["er"])
    assert len({j.folder for j in jobs}) == len(jobs)
    # `table1`: the paper's Table 1 methods registered here, each once, BMKP among them
    table1 = reproduce.chosen_models(["table1", "bmkp", "er"], [1])
    assert {"bmkp", "lwf", "gpm", "fas", "er"} <= set(table1)
    assert len(table1) == len(set(table1)) and "agem" not in table1
    assert reproduce.chosen_models(["sgd"], [1, 1]) == ["sgd"]  # a table named twice is Table 1
    assert_one_line_error(capsys, reproduce.main, ["--table", "1", "2", "--models", "sgd"],
                          "--models sgd: Tables 2-4 are BMKP's own experiments")


def test_options_after_the_separator_reach_every_job(tmp_path, capsys):
    assert reproduce.job_options(["--n_epochs", "2", "--no_basis_update"]) == {
        "n_epochs": "2", "no_basis_update": True}
    assert_one_line_error(capsys, reproduce.main, ["--table", "1", "--", "--seed", "3"],
                          "--seed after -- are set by utils/reproduce.py itself")
    assert_one_line_error(capsys, reproduce.main, ["--table", "1", "--", "epochs"],
                          "'epochs' after -- is not an option")
    # checked as utils/main.py will parse them, before any job starts
    results = tmp_path / "reproduce"
    assert_one_line_error(capsys, reproduce.main,
                          ["--table", "1", "--datasets", "seq-synthetic", "--seeds", "0",
                           "--results_dir", str(results), "--", "--bogus", "1"],
                          "bmkp on seq-synthetic, seed 0: unrecognized arguments: --bogus 1")
    assert not results.exists()


def _result(folder: Path) -> dict:
    (path,) = folder.rglob("*-seed*.json")
    return json.loads(path.read_text())


@pytest.mark.slow
def test_run_stopped_by_its_budget_resumes_to_the_same_result(tmp_path, capsys):
    whole = synthetic_argv(tmp_path / "whole", *SMALL, model="bmkp")
    assert main(whole) == 0
    checkpoints = ["--checkpoint_dir", str(tmp_path / "checkpoints")]
    stopped = synthetic_argv(tmp_path / "stopped", *SMALL, *checkpoints, model="bmkp")
    assert main(stopped + ["--budget_s", "0.001"]) == BUDGET_EXIT
    assert "stopped by --budget_s after task 1" in capsys.readouterr().err
    assert not list((tmp_path / "stopped").rglob("*-seed0.json"))
    assert main(stopped + ["--resume"]) == 0
    resumed, reference = _result(tmp_path / "stopped"), _result(tmp_path / "whole")
    assert resumed["accuracy_matrix"] == reference["accuracy_matrix"]
    assert resumed["method"] == reference["method"]
    capsys.readouterr()
    assert_one_line_error(capsys, main, synthetic_argv(tmp_path, "--budget_s", "5"),
                          "--budget_s needs --checkpoint_dir")


@pytest.mark.slow
def test_reproduce_stops_at_its_budget_then_finishes_and_tabulates(tmp_path, monkeypatch,
                                                                   capsys):
    def run(results: Path, *more: str) -> int:
        return reproduce.main(["--table", "1", "--datasets", "seq-synthetic", "--seeds", "0",
                               "--device", "cpu", "--debug_mode", "1",
                               "--results_dir", str(results), *more, "--", *SMALL])

    # Too little time to start anything: nothing runs, the command says so (exit 75).
    assert run(tmp_path / "cut", "--budget_s", "0.001") == BUDGET_EXIT
    assert "1 not started" in capsys.readouterr().out
    # A job handed almost no time stops after its first task (independent of this machine's
    # speed: the budget each job gets is forced to a millisecond).
    launch = reproduce.launch
    with monkeypatch.context() as patch:
        patch.setattr(reproduce, "launch",
                      lambda job, threads, budget: launch(job, threads, 1e-3))
        assert run(tmp_path / "cut", "--budget_s", "600") == BUDGET_EXIT
    assert "1 stopped" in capsys.readouterr().out
    assert run(tmp_path / "cut") == 0  # the same command, without the budget, resumes
    assert "1 done" in capsys.readouterr().out
    table = tmp_path / "cut" / "report" / "table1.md"
    assert table.is_file() and "bmkp" in table.read_text()
    assert run(tmp_path / "whole") == 0
    cut, whole = _result(tmp_path / "cut"), _result(tmp_path / "whole")
    assert cut["accuracy_matrix"] == whole["accuracy_matrix"]


@pytest.mark.slow
def test_table_1_with_other_methods_runs_and_tabulates_each(tmp_path, capsys):
    results = tmp_path / "reproduce"
    assert reproduce.main(["--table", "1", "--models", "sgd", "lwf", "--datasets",
                           "seq-synthetic", "--seeds", "0", "--device", "cpu", "--debug_mode",
                           "1", "--results_dir", str(results), "--", "--n_epochs", "1",
                           "--nf", "4"]) == 0
    assert "2 done" in capsys.readouterr().out
    assert {_result(results / "seq-synthetic" / m)["model"] for m in ("sgd", "lwf")} == {
        "sgd", "lwf"}
    rows = (results / "report" / "table1.md").read_text()
    assert "| sgd" in rows and "| lwf" in rows
