"""utils/diagnose.py: a run's checkpoint scored with running, batch and re-estimated BatchNorm
statistics and by a linear probe of its features."""
import json

import torch

from helpers import N_TASKS, assert_one_line_error, synthetic_argv
from utils import diagnose as diagnose_script
from utils.args import parse_args
from utils.diagnose import linear_probe_accuracy
from utils.main import main


def test_the_probe_separates_classes_the_features_separate_and_no_others():
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 3, (600,), generator=g)
    centres = 4 * torch.randn(3, 16, generator=g)
    features = 1e3 * (centres[labels] + torch.randn(600, 16, generator=g))  # any scale
    train, test = slice(0, 400), slice(400, None)
    assert linear_probe_accuracy(features[train], labels[train], features[test], labels[test],
                                 3) == 100.0
    unrelated = labels[torch.randperm(600, generator=g)]  # chance is 33%
    assert linear_probe_accuracy(features[train], unrelated[train], features[test],
                                 unrelated[test], 3) < 50.0


def test_a_finished_run_is_rescored_as_it_ran_and_three_other_ways(tmp_path, capsys):
    argv = synthetic_argv(tmp_path / "results", "--checkpoint_dir", str(tmp_path / "ck"),
                          "--seed", "1")
    assert main(argv) == 0
    (path,) = (tmp_path / "results").rglob("*-seed1.json")
    matrix = json.loads(path.read_text())["accuracy_matrix"]

    found = diagnose_script.diagnose(parse_args(argv))
    assert [d.as_run for d in found] == matrix[-1]
    assert [d.learned for d in found] == [matrix[t][t] for t in range(N_TASKS)]
    for d in found:
        for score in (d.batch_statistics, d.re_estimated, d.linear_probe):
            assert score is not None and 0.0 <= score <= 100.0

    capsys.readouterr()
    assert diagnose_script.main(argv) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("sgd on seq-synthetic, seed 1, after task 5")
    assert lines[1].split() == ["task", "learned", "as", "run", "batch", "stats",
                                "re-estimated", "probe"]
    assert [float(line.split()[2]) for line in lines[2:]] == [round(a, 1) for a in matrix[-1]]


def test_diagnose_refuses_a_run_without_a_checkpoint_or_with_per_task_weights(tmp_path, capsys):
    assert_one_line_error(capsys, diagnose_script.main, synthetic_argv(tmp_path),
                          "add the run's --checkpoint_dir")
    assert_one_line_error(capsys, diagnose_script.main,
                          synthetic_argv(tmp_path, "--checkpoint_dir", str(tmp_path),
                                         model="bmkp"),
                          "bmkp predicts each task with weights of its own")


def test_diagnose_names_options_that_differ_from_the_checkpoints(tmp_path, capsys):
    argv = synthetic_argv(tmp_path / "results", "--checkpoint_dir", str(tmp_path / "ck"),
                          "--n_epochs", "1")
    assert main(argv) == 0
    capsys.readouterr()
    assert_one_line_error(capsys, diagnose_script.main, argv + ["--lr", "0.01"],
                          "utils/diagnose.py:", "other options (lr)", "run utils/main.py")
