"""End-to-end runs on seq-synthetic through main(): the result JSON, its metrics, seeding,
and what an interrupted run leaves behind."""
from __future__ import annotations

import json
import os
import types
from pathlib import Path

import pytest
import torch

import utils.results as results
from backbone import build_backbone
from datasets.seq_synthetic import SequentialSynthetic
from helpers import assert_one_line_error, synthetic_argv
from models.sgd import Sgd
from utils.args import parse_args
from utils.main import main
from utils.metrics import summarize
from utils.results import write_json_atomic

N_TASKS = SequentialSynthetic.N_TASKS
CHANCE = 100.0 / SequentialSynthetic.N_CLASSES_PER_TASK
KEYS = {"model", "dataset", "seed", "started_at", "finished_at", "accuracy_matrix",
        "avg_accuracy", "final_acc", "bwt", "forgetting", "phase_times", "total_time_s",
        "memory", "config", "environment"}


def _run(tmp_path: Path, capsys, *extra: str, model: str = "sgd") -> tuple[dict, Path]:
    results_dir = tmp_path / "results"
    assert main(synthetic_argv(results_dir, *extra, model=model)) == 0
    out, err = capsys.readouterr()
    files = list(results_dir.rglob("*"))
    written = [f for f in files if f.is_file()]
    assert len(written) == 1, files  # one JSON and no temporary file left over
    path = written[0]
    assert path.parent == results_dir / "seq-synthetic" / model
    assert path.suffix == ".json" and path.stem.endswith("-seed" + str(_seed(extra)))
    assert str(path) in out and err == ""
    return json.loads(path.read_text()), path


def _seed(extra) -> int:
    extra = list(extra)
    return int(extra[extra.index("--seed") + 1]) if "--seed" in extra else 0


def _check_result(result: dict, model: str) -> None:
    assert KEYS <= set(result)
    assert (result["model"], result["dataset"]) == (model, "seq-synthetic")
    matrix = result["accuracy_matrix"]
    assert [len(row) for row in matrix] == list(range(1, N_TASKS + 1))  # lower-triangular
    assert all(0.0 <= a <= 100.0 for row in matrix for a in row)
    recomputed = summarize(matrix)
    for key in ("avg_accuracy", "final_acc", "bwt", "forgetting"):
        assert result[key] == pytest.approx(recomputed[key]), key

    times = result["phase_times"]
    assert len(times) == N_TASKS
    assert all(t["train"] > 0 and t["eval"] > 0 for t in times)
    assert sum(sum(t.values()) for t in times) <= result["total_time_s"]

    memory = result["memory"]
    assert memory["breakdown_bytes"]["network"] > 0
    assert memory["total_mb"] == pytest.approx(sum(memory["breakdown_bytes"].values()) / 2**20)
    assert memory["breakdown_mb"] == pytest.approx(
        {k: v / 2**20 for k, v in memory["breakdown_bytes"].items()})

    config = result["config"]
    assert (config["model"], config["dataset"], config["seed"]) == \
        (model, "seq-synthetic", result["seed"])
    assert config["nf"] == 8
    assert result["environment"]["torch"] == torch.__version__
    assert result["environment"]["device"] == "cpu"


def _network_bytes(*extra: str, model: str) -> int:
    """Parameters and float buffers of the run's backbone, counted from its state dict."""
    args = parse_args(synthetic_argv(Path("unused"), *extra, model=model))
    net = build_backbone(args, SequentialSynthetic)
    return sum(t.numel() * t.element_size() for t in net.state_dict().values()
               if t.is_floating_point())


def test_sgd_run_writes_a_complete_result(tmp_path, capsys):
    result, _ = _run(tmp_path, capsys)
    _check_result(result, "sgd")
    assert result["memory"]["breakdown_bytes"] == {"network": _network_bytes(model="sgd")}
    assert result["config"]["n_epochs"] == 2
    assert result["config"]["results_dir"] == str(tmp_path / "results")


# Joint's last row is joint training on all five tasks. With these options seeds 0-9 all end
# above 90% (chance: 50%), so 60% leaves a wide margin for platform differences.
JOINT_OPTIONS = ("--n_epochs", "8", "--batch_size", "16")


def test_joint_run_learns_the_tasks_jointly(tmp_path, capsys):
    result, _ = _run(tmp_path, capsys, *JOINT_OPTIONS, model="joint")
    _check_result(result, "joint")
    assert result["final_acc"] > CHANCE + 10
    sizes = SequentialSynthetic.TRAIN_PER_CLASS * N_TASKS * SequentialSynthetic.N_CLASSES_PER_TASK
    image = 3 * SequentialSynthetic.IMAGE_SIZE ** 2  # uint8
    assert result["memory"]["breakdown_bytes"] == {
        "network": _network_bytes(*JOINT_OPTIONS, model="joint"),
        "stored_data": sizes * (image + 8 + 8),  # every training image, int64 label and task
    }


def test_same_seed_gives_the_same_accuracy_matrix(tmp_path, capsys):
    first, _ = _run(tmp_path / "a", capsys, "--seed", "3")
    second, _ = _run(tmp_path / "b", capsys, "--seed", "3")
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


def test_metrics_after_one_task_have_no_transfer():
    m = summarize([[42.0]])
    assert m["final_acc"] == 42.0 and m["bwt"] is None and m["forgetting"] is None


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
    assert _files(tmp_path / "results") == []


def _dump_half_then(exc: BaseException):
    def dump(payload, f, **kwargs):
        f.write(json.dumps(payload, default=str)[:20])  # a partial document
        raise exc
    return types.SimpleNamespace(dumps=json.dumps, dump=dump)


def test_interrupt_while_writing_the_result_leaves_no_file(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(results, "json", _dump_half_then(KeyboardInterrupt()))
    assert main(synthetic_argv(tmp_path / "results")) == 130
    assert "interrupted" in capsys.readouterr().err
    assert _files(tmp_path / "results") == []  # neither a partial JSON nor a .tmp


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
    assert not (tmp_path / "results").exists()


def test_results_get_the_usual_file_permissions(tmp_path):
    """Atomic writes go through an owner-only temporary file; the result must not stay so."""
    path = tmp_path / "r.json"
    write_json_atomic({"a": 1}, path)
    mask = os.umask(0)
    os.umask(mask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~mask
