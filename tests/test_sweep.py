"""utils/sweep.py: a grid of seq-synthetic runs, run in parallel subprocesses (or through
submitit's local executor), skipping the jobs whose result already exists."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from helpers import assert_one_line_error
from utils import sweep


def _config(tmp_path: Path, **changes) -> Path:
    config = {"models": ["sgd"], "datasets": ["seq-synthetic"], "seeds": [1],
              "grid": {"lr": [0.1, 0.05]},
              "options": {"n_epochs": 1, "nf": 4, "device": "cpu", "debug_mode": 1},
              "results_dir": str(tmp_path / "sweep"), **changes}
    path = tmp_path / "sweep.json"
    path.write_text(json.dumps(config))
    return path


def _results(tmp_path: Path) -> dict[float, dict]:
    runs = [json.loads(p.read_text()) for p in (tmp_path / "sweep").rglob("*-seed1.json")]
    return {r["config"]["lr"]: r for r in runs}


@pytest.mark.slow
def test_local_sweep_runs_each_job_once_then_skips_them(tmp_path, capsys):
    config = _config(tmp_path)
    assert sweep.main([str(config), "--jobs", "2"]) == 0
    assert "2 jobs, 0 already done, 2 to run" in capsys.readouterr().out
    runs = _results(tmp_path)
    assert sorted(runs) == [0.05, 0.1]
    assert all(r["config"]["num_threads"] == 1 and r["config"]["n_epochs"] == 1
               and r["seed"] == 1 for r in runs.values())

    assert sweep.main([str(config)]) == 0
    assert "2 jobs, 2 already done, 0 to run" in capsys.readouterr().out
    assert len(_results(tmp_path)) == 2

    next((tmp_path / "sweep").rglob("*-seed1.json")).unlink()  # as if that job had failed
    assert sweep.main([str(config)]) == 0
    assert "2 jobs, 1 already done, 1 to run" in capsys.readouterr().out
    assert len(_results(tmp_path)) == 2


@pytest.mark.slow
def test_failed_job_is_reported_with_its_log(tmp_path, capsys):
    # options that parse but that the method refuses once built (bad options never start)
    config = _config(tmp_path, models=["agem"], grid={"buffer_size": [3]})
    assert sweep.main([str(config)]) == 1
    out, err = capsys.readouterr()
    assert "0 jobs finished, 1 failed" in out
    log = Path(err.split("failed: ")[1].strip())
    assert "error: agem gives each task an equal share of the buffer" in log.read_text()


def test_job_folders_are_deterministic_and_differ_with_the_options(tmp_path):
    config = json.loads(_config(tmp_path).read_text())
    first, again = sweep.expand(config, tmp_path), sweep.expand(config, tmp_path)
    assert [j.folder for j in first] == [j.folder for j in again]
    assert len({j.folder for j in first}) == 2
    config["options"]["n_epochs"] = 2
    assert not {j.folder for j in first} & {j.folder for j in sweep.expand(config, tmp_path)}


def test_option_values_become_command_line_words():
    assert sweep.option_args({"lr": 0.1, "no_basis_update": True, "amp": False,
                              "seeds": [0, 1]}) == ["--lr", "0.1", "--no_basis_update",
                                                    "--seeds", "0", "1"]


@pytest.mark.parametrize("changes, fragment", [
    ({"models": []}, "'models' must be a non-empty list"),
    ({"lr": 0.1}, "unknown keys lr"),
    ({"options": {"seed": 3}}, "seed are set by the sweep itself"),
    # every job's options are parsed before any job runs
    ({"options": {"bogus": 1}}, "sgd on seq-synthetic, seed 1: unrecognized arguments: "
                                 "--bogus 1 (see utils/main.py --help)"),
    ({"seeds": [1, -2]}, "seed -2: argument --seed: -2 is out of range"),
])
def test_bad_configs_give_one_line_errors(tmp_path, capsys, changes, fragment):
    assert_one_line_error(capsys, sweep.main, [str(_config(tmp_path, **changes))], fragment)
    assert not (tmp_path / "sweep").exists()


def test_a_config_path_naming_a_folder_is_a_one_line_error(tmp_path, capsys):
    assert_one_line_error(capsys, sweep.main, [str(tmp_path)], f"{tmp_path} is a folder")


def test_submitit_backend_without_submitit_is_a_user_error(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "submitit", None)  # import fails as if not installed
    assert_one_line_error(capsys, sweep.main, [str(_config(tmp_path)), "--backend", "submitit"],
                          "pip install submitit")


def test_submitit_dry_run_shows_one_job_array_and_what_each_job_asks_for(tmp_path, capsys):
    pytest.importorskip("submitit")
    assert sweep.main([str(_config(tmp_path)), "--backend", "submitit", "--gpus_per_job", "2",
                       "--array_parallelism", "4", "--slurm_partition", "gpu",
                       "--dry_run"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[1] == ("one submitit job array of 2 jobs, each: timeout_min=60 cpus_per_task=1 "
                        "gpus_per_node=2 slurm_partition=gpu slurm_array_parallelism=4")
    assert len(lines) == 4 and all("--model sgd --dataset seq-synthetic" in line
                                   for line in lines[2:])
    assert not (tmp_path / "sweep").exists()  # nothing ran


@pytest.mark.slow
def test_submitit_local_executor_runs_the_jobs(tmp_path, capsys):
    pytest.importorskip("submitit")
    config = _config(tmp_path, grid={"lr": [0.1]})
    assert sweep.main([str(config), "--backend", "submitit", "--cluster", "local",
                       "--submitit_dir", str(tmp_path / "submitit")]) == 0
    assert "1 jobs finished, 0 failed" in capsys.readouterr().out
    assert sorted(_results(tmp_path)) == [0.1]
