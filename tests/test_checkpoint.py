"""--checkpoint_dir / --resume: a run killed in the middle of a task and resumed ends with the
same accuracy matrix as a run never interrupted (on CPU), and resuming refuses what it cannot
continue."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from datasets.seq_synthetic import SequentialSynthetic
from helpers import assert_one_line_error, synthetic_argv
from models.adam_nscl import AdamNSCL
from models.clser import Clser
from models.deep_inversion import DeepInversion
from models.dgr import Dgr
from models.bmkp.model import BMKP
from models.derpp import Derpp
from models.ewc_on import EwcOn
from models.fas import Fas
from models.hal import Hal
from models.gpm import GPM
from models.joint import Joint
from models.lwm import Lwm
from models.pass_ import Pass
from models.sgd import Sgd
from models.si import Si
from models.wsn import WSN
from utils.main import main
from utils.results import epoch_log_path, text_log_path

N_TASKS = SequentialSynthetic.N_TASKS
KILLED_TASK = 3
# Per method: the class whose training step is interrupted, and small options for seconds.
CASES = {
    "sgd": (Sgd, ("--n_epochs", "1", "--optim_mom", "0.9", "--lr_step", "1")),
    "bmkp": (BMKP, ("--n_epochs", "1", "--retrain_epochs", "1", "--projection_samples", "64",
                    "--batch_size", "16", "--nf", "4")),
    "joint": (Joint, ("--n_epochs", "1", "--nf", "4")),
    "ewc_on": (EwcOn, ("--n_epochs", "1", "--nf", "4", "--e_lambda", "10",
                       "--fisher_batch_size", "10")),
    "si": (Si, ("--n_epochs", "1", "--nf", "4", "--c", "0.5")),
    "derpp": (Derpp, ("--n_epochs", "1", "--nf", "4", "--buffer_size", "40")),
    "gpm": (GPM, ("--n_epochs", "1", "--nf", "4", "--gpm_samples", "32")),
    "adam_nscl": (AdamNSCL, ("--n_epochs", "1", "--nf", "4", "--nscl_samples", "32")),
    "wsn": (WSN, ("--n_epochs", "1", "--nf", "4")),
    "lwm": (Lwm, ("--n_epochs", "1", "--nf", "4")),  # killed while the frozen copy exists
    "hal": (Hal, ("--n_epochs", "1", "--nf", "4", "--buffer_size", "20",
                  "--steps_on_anchors", "3")),
    "fas": (Fas, ("--n_epochs", "1", "--nf", "4")),
    "deep_inversion": (DeepInversion, ("--n_epochs", "1", "--nf", "4", "--synthetic_per_task", "8",
                                       "--synthesis_batch_size", "4", "--synthesis_iterations",
                                       "3", "--competition_weight", "0.5")),
    "dgr": (Dgr, ("--n_epochs", "1", "--nf", "4", "--gen_nf", "4", "--latent_dim", "8")),
    "pass": (Pass, ("--n_epochs", "1", "--nf", "4")),  # killed while the frozen copy exists
    "clser": (Clser, ("--n_epochs", "1", "--nf", "4", "--buffer_size", "40",
                      "--plastic_model_update_freq", "0.5", "--stable_model_update_freq", "0.3")),
}


def _result(results_dir: Path) -> dict:
    (path,) = results_dir.rglob("*.json")
    return json.loads(path.read_text())


def _kill_in_the_middle_of(monkeypatch, cls: type, task: int) -> None:
    """Make the second training step of `task` raise KeyboardInterrupt (as a Ctrl-C would)."""
    begin_task, observe, current = cls.begin_task, cls.observe, {}

    def counting_begin_task(self, task_id, data):
        current.update(task=task_id, steps=0)
        begin_task(self, task_id, data)

    def interrupting_observe(self, *batch):
        current["steps"] += 1
        if current["task"] == task and current["steps"] == 2:
            raise KeyboardInterrupt
        return observe(self, *batch)

    monkeypatch.setattr(cls, "begin_task", counting_begin_task)
    monkeypatch.setattr(cls, "observe", interrupting_observe)


@pytest.mark.slow
@pytest.mark.parametrize("model", list(CASES))
def test_killed_and_resumed_run_equals_an_uninterrupted_one(tmp_path, capsys, monkeypatch,
                                                            model):
    cls, options = CASES[model]
    argv = synthetic_argv(tmp_path / "whole", *options, "--seed", "4", model=model)
    assert main(argv) == 0
    whole = _result(tmp_path / "whole")

    checkpoints = tmp_path / "checkpoints"
    argv = synthetic_argv(tmp_path / "resumed", *options, "--seed", "4",
                          "--checkpoint_dir", str(checkpoints), model=model)
    with monkeypatch.context() as patch:
        _kill_in_the_middle_of(patch, cls, KILLED_TASK)
        assert main(argv) == 130
    assert "rerun with --resume" in capsys.readouterr().err
    (checkpoint,) = checkpoints.iterdir()  # nothing left over from the atomic writes
    assert checkpoint.name == f"seq-synthetic-{model}-seed4.pt"
    saved = torch.load(checkpoint, weights_only=True)
    assert saved["next_task"] == KILLED_TASK == len(saved["matrix"]) == len(saved["phase_times"])
    assert saved["matrix"] == whole["accuracy_matrix"][:KILLED_TASK]
    # no result yet, only the logs of the finished epochs
    assert sorted(p.suffix for p in (tmp_path / "resumed").rglob("*")
                  if p.is_file()) == [".jsonl", ".log"]

    assert main(argv + ["--resume"]) == 0
    resumed = _result(tmp_path / "resumed")
    assert resumed["accuracy_matrix"] == whole["accuracy_matrix"]
    assert resumed["memory_per_task_mb"] == whole["memory_per_task_mb"]
    assert resumed["memory"] == whole["memory"]
    assert resumed["method"] == whole["method"]  # e.g. BMKP's basis log, across the restart
    assert resumed.get("other_predictors") == whole.get("other_predictors")  # CLS-ER's
    assert len(resumed["phase_times"]) == N_TASKS
    assert sum(sum(t.values()) for t in resumed["phase_times"]) <= resumed["total_time_s"]
    assert torch.load(checkpoint, weights_only=True)["next_task"] == N_TASKS
    # the resumed run keeps the result's name and appends to its epoch log: each task's
    # epochs once, the interrupted epoch not at all
    (log,) = (tmp_path / "resumed").rglob("*.jsonl")
    lines = [json.loads(line) for line in log.read_text().splitlines()]
    assert [x["task"] for x in lines if x["phase"] == "train"] == list(range(N_TASKS))
    assert log == epoch_log_path(next((tmp_path / "resumed").rglob("*.json")))


def test_resume_without_a_checkpoint_is_a_user_error(tmp_path, capsys):
    argv = synthetic_argv(tmp_path / "results", "--checkpoint_dir", str(tmp_path / "none"),
                          "--resume")
    assert_one_line_error(capsys, main, argv, "--resume: no checkpoint",
                          "seq-synthetic-sgd-seed0.pt")


def test_resume_needs_a_checkpoint_dir(tmp_path, capsys):
    assert_one_line_error(capsys, main, synthetic_argv(tmp_path, "--resume"),
                          "--resume needs --checkpoint_dir")


def test_resume_with_other_options_is_a_user_error(tmp_path, capsys, monkeypatch):
    checkpoints = str(tmp_path / "checkpoints")
    argv = synthetic_argv(tmp_path / "results", "--n_epochs", "1", "--checkpoint_dir",
                          checkpoints)
    with monkeypatch.context() as patch:
        _kill_in_the_middle_of(patch, Sgd, 1)
        assert main(argv) == 130
    capsys.readouterr()
    # Where the results go or how many threads run is not part of the experiment.
    changed = argv + ["--lr", "0.01", "--resume", "--num_threads", "2"]
    assert_one_line_error(capsys, main, changed, "other options (lr)", "drop --resume")


def test_a_checkpoint_from_before_an_option_existed_resumes(tmp_path, capsys, monkeypatch):
    """A checkpoint written before --exact_bn_stats existed lacks it; resuming it with the
    option at its earlier behaviour (0) continues the run instead of refusing it."""
    checkpoints = tmp_path / "checkpoints"
    argv = synthetic_argv(tmp_path / "results", "--n_epochs", "1", "--checkpoint_dir",
                          str(checkpoints))
    with monkeypatch.context() as patch:
        _kill_in_the_middle_of(patch, Sgd, killed := 1)
        assert main(argv) == 130
    (path,) = checkpoints.glob("*.pt")
    state = torch.load(path, weights_only=True)
    del state["protocol"]["exact_bn_stats"]
    torch.save(state, path)
    capsys.readouterr()
    changed = argv + ["--resume", "--exact_bn_stats", "1"]
    assert_one_line_error(capsys, main, changed, "other options (exact_bn_stats)")
    assert main(argv + ["--resume"]) == 0
    (result,) = (tmp_path / "results").rglob("*.json")
    log = text_log_path(result).read_text()
    assert f"resuming from {path} at task {killed + 1}" in log
    assert log.count(" code: ") == 2  # each part of the run names the code it loaded
    assert len(json.loads(result.read_text())["accuracy_matrix"]) == N_TASKS
