"""Statistics over seeds (utils/aggregate.py) and the multi-seed mode of utils/main.py."""
import json
import math

import pytest

from helpers import assert_one_line_error, synthetic_argv
from utils.aggregate import (aggregate_runs, differing_keys, mean_std, protocol,
                             shared_config)
from utils.main import main


def _run(seed, matrix, bwt, forgetting, memory_per_task):
    avg = [sum(row) / len(row) for row in matrix]
    return {"seed": seed, "accuracy_matrix": matrix, "avg_accuracy": avg, "final_acc": avg[-1],
            "bwt": bwt, "forgetting": forgetting, "memory_per_task_mb": memory_per_task,
            "memory": {"total_mb": memory_per_task[-1]}}


# Three 2-task runs, numbers chosen so every statistic is easy to work out by hand.
RUNS = [_run(0, [[90.0], [80.0, 60.0]], -10.0, 10.0, [1.0, 2.0]),
        _run(1, [[94.0], [88.0, 62.0]], -6.0, 6.0, [1.0, 3.0]),
        _run(2, [[98.0], [96.0, 64.0]], -2.0, 2.0, [1.0, 4.0])]


def test_mean_and_sample_std_by_hand():
    # mean 3; squared deviations 4 + 1 + 0 + 9 = 14 over n - 1 = 3
    assert mean_std([1.0, 2.0, 3.0, 6.0]) == pytest.approx({"mean": 3.0,
                                                            "std": math.sqrt(14 / 3)})
    assert mean_std([42.0]) == {"mean": 42.0, "std": 0.0}
    with pytest.raises(ValueError):
        mean_std([])


def _assert_close(stats, mean, std):
    assert stats["mean"] == pytest.approx(mean) and stats["std"] == pytest.approx(std)


def test_aggregate_of_three_runs_by_hand():
    agg = aggregate_runs(RUNS)
    assert agg["seeds"] == [0, 1, 2] and agg["n_runs"] == 3
    # final ACC 70, 75, 80: mean 75, std sqrt((25 + 0 + 25) / 2) = 5
    assert agg["final_acc"] == pytest.approx({"mean": 75.0, "std": 5.0})
    # BWT -10, -6, -2 and forgetting 10, 6, 2: std sqrt((16 + 0 + 16) / 2) = 4
    assert agg["bwt"] == pytest.approx({"mean": -6.0, "std": 4.0})
    assert agg["forgetting"] == pytest.approx({"mean": 6.0, "std": 4.0})
    # last rows: task 1 80, 88, 96 (std 8); task 2 60, 62, 64 (std 2)
    _assert_close(agg["final_per_task_acc"], [88.0, 62.0], [8.0, 2.0])
    # averages after task 1: 90, 94, 98; after task 2: 70, 75, 80
    _assert_close(agg["avg_accuracy"], [94.0, 75.0], [4.0, 5.0])
    assert agg["memory_total_mb"] == pytest.approx({"mean": 3.0, "std": 1.0})
    _assert_close(agg["memory_per_task_mb"], [1.0, 3.0], [0.0, 1.0])


def test_aggregate_of_one_run_has_zero_std_and_missing_values_stay_missing():
    one = _run(7, [[50.0]], None, None, [1.5])
    del one["memory_per_task_mb"]
    agg = aggregate_runs([one])
    assert agg["final_acc"] == {"mean": 50.0, "std": 0.0}
    assert agg["bwt"] is None and agg["forgetting"] is None
    assert agg["memory_per_task_mb"] is None


def test_shared_config_protocol_and_differing_keys():
    a = {"seed": 0, "results_dir": "r", "save_memory": "m-seed0.pt", "lr": 0.1, "nf": 4,
         "device": "cpu", "debug_mode": 0}
    b = {**a, "seed": 1, "save_memory": "m-seed1.pt", "nf": 8, "device": "cuda"}
    assert shared_config([a, b]) == {"lr": 0.1, "debug_mode": 0}  # nf and device differ
    # a run made before --shortcut, --head_bias, --feature_pool and --exact_bn_stats existed
    # used identity shortcuts, biases, the 2x2 grid and the running BatchNorm statistics
    assert protocol(a) == {"lr": 0.1, "nf": 4, "debug_mode": 0, "shortcut": "identity",
                           "head_bias": 1, "feature_pool": "grid", "exact_bn_stats": 0}
    assert protocol(a) != protocol({**a, "exact_bn_stats": 1})
    assert protocol(a) != protocol({**a, "feature_pool": "global"})
    assert protocol(a) == protocol({**a, "shortcut": "identity"})
    assert protocol(a) != protocol({**a, "shortcut": "none"})
    assert differing_keys([protocol(a), protocol(b)]) == ["nf"]
    # a method's own later options only fill in that method's runs
    old_bmkp = {**a, "model": "bmkp"}
    assert protocol(old_bmkp)["energy"] == "sigma2" and "energy" not in protocol(a)
    assert protocol(old_bmkp) != protocol({**old_bmkp, "energy": "sigma"})
    # si's runs before --omega_mode took the paper's omega; dgr's before --replay_passes one
    # mixed batch
    old_si, old_dgr = {**a, "model": "si"}, {**a, "model": "dgr"}
    assert protocol(old_si) == protocol({**old_si, "omega_mode": "paper"})
    assert protocol(old_si) != protocol({**old_si, "omega_mode": "mammoth"})
    assert protocol(old_dgr) == protocol({**old_dgr, "replay_passes": "joint"})
    assert protocol(old_dgr) != protocol({**old_dgr, "replay_passes": "separate"})
    assert differing_keys([{"x": 1}, {"x": 1, "y": None}]) == ["y"]


def _json_files(folder):
    return sorted(folder.rglob("*.json"))


@pytest.mark.slow
@pytest.mark.parametrize("option, seeds", [(["--n_runs", "2"], [0, 1]),
                                           (["--seeds", "3", "5"], [3, 5])],
                         ids=["n_runs", "seeds"])
def test_several_seeds_write_one_file_each_and_an_aggregate(tmp_path, capsys, option, seeds):
    results = tmp_path / "results"
    assert main(synthetic_argv(results, "--nf", "4", "--n_epochs", "1", *option)) == 0
    out = capsys.readouterr().out.splitlines()
    files = _json_files(results)
    aggregates = [f for f in files if f.name.endswith("-aggregate.json")]
    runs = [json.loads(f.read_text()) for f in files if f not in aggregates]
    assert len(aggregates) == 1 and len(runs) == 2
    assert aggregates[0].parent == results / "seq-synthetic" / "sgd"
    assert [r["seed"] for r in runs] == seeds
    assert [r["config"]["seed"] for r in runs] == seeds
    agg = json.loads(aggregates[0].read_text())
    assert sorted(agg["runs"]) == sorted(str(f) for f in files if f not in aggregates)
    assert agg["seeds"] == seeds
    finals = [r["final_acc"] for r in runs]
    assert agg["final_acc"] == pytest.approx(mean_std(finals))
    assert agg["memory_total_mb"]["mean"] == pytest.approx(runs[0]["memory"]["total_mb"])
    assert len(agg["avg_accuracy"]["mean"]) == 5
    assert "seed" not in agg["config"] and "results_dir" not in agg["config"]
    assert agg["config"]["nf"] == 4 and agg["config"]["model"] == "sgd"
    # one line per run, then the summary over seeds
    assert len(out) == 3 and all(f"(seed {s})" in line for s, line in zip(seeds, out))
    mean, std = agg["final_acc"]["mean"], agg["final_acc"]["std"]
    assert f"ACC {mean:.2f} +- {std:.2f} over 2 seeds" in out[2]
    assert out[2].endswith(str(aggregates[0]))


@pytest.mark.parametrize("option, fragments", [
    (["--seeds", "0", "1", "--n_runs", "2"], ["--n_runs", "not allowed with", "--seeds"]),
    (["--seed", "3", "--seeds", "0", "1"], ["--seeds", "not allowed with", "--seed"]),
    (["--seeds", "1", "2", "1"], ["--seeds repeats 1", "give each seed once"]),
    (["--n_runs", "0"], ["--n_runs", "out of range"]),
], ids=["seeds-and-n_runs", "seed-and-seeds", "repeated-seed", "zero-runs"])
def test_bad_seed_options_are_one_line_errors(tmp_path, capsys, option, fragments):
    argv = synthetic_argv(tmp_path / "results", *option)
    assert_one_line_error(capsys, main, argv, *fragments)
    assert not (tmp_path / "results").exists()
