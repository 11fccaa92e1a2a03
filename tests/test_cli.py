"""The command line: discovery, --help, and one-line errors (exit 2, no traceback) for bad input."""
import argparse
import os
import re
import subprocess
import sys

import pytest
import torch

from datasets import dataset_classes
from helpers import (REPO, assert_one_line_error, real_folder, synthetic_argv,
                     write_image_folders)
from models import model_classes
from utils.args import parse_args, typed_options
from utils.main import main

DATASETS = {"seq-cifar10", "seq-cifar100", "seq-tinyimg", "seq-synthetic"}


def test_registry_finds_the_core_models_and_datasets():
    models, datasets = model_classes(), dataset_classes()
    assert {"sgd", "joint"} <= set(models)
    assert DATASETS <= set(datasets)
    for name, cls in {**models, **datasets}.items():
        assert cls.NAME == name


def _run_main_script(*argv: str, columns: int = 80) -> subprocess.CompletedProcess:
    env = {**os.environ, "COLUMNS": str(columns)}
    return subprocess.run([sys.executable, "utils/main.py", *argv], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)


@pytest.mark.slow
@pytest.mark.parametrize("columns", [60, 80])
def test_help_lists_models_and_datasets_whole(columns):
    done = _run_main_script("--help", columns=columns)  # fixed widths, so the lists wrap
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("usage: utils/main.py")
    words = set(re.findall(r"[\w-]+", done.stdout))
    assert set(model_classes()) | DATASETS <= words
    assert "--model_config" in words and "--validation" in words
    # no name is cut at a line end ("seq-" / "cifar100" on two lines)
    assert not re.search(r"\w-\n", done.stdout), done.stdout
    epilog = " ".join(done.stdout.split("\n\n")[-1].split())
    assert f"models: {', '.join(model_classes())}." in epilog
    assert f"datasets: {', '.join(dataset_classes())}." in epilog


@pytest.mark.slow
def test_start_up_does_not_import_torchvision():
    # torchvision's import costs seconds before every command, --help and errors included;
    # only the loaders that need it (torchvision's CIFAR layout, a download) import it.
    done = subprocess.run([sys.executable, "-c", "import sys, utils.main, utils.report, "
                           "utils.reproduce; print(sorted(m for m in sys.modules "
                           "if m.startswith('torchvision')))"],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


@pytest.mark.slow
def test_script_reports_bad_input_in_one_line_without_traceback():
    done = _run_main_script("--model", "nope", "--dataset", "seq-synthetic")
    assert done.returncode == 2
    assert done.stdout == ""
    lines = done.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), done.stderr
    assert "'nope'" in lines[0] and "sgd" in lines[0]


def _assert_one_line_error(capsys, argv, *fragments) -> str:
    return assert_one_line_error(capsys, main, argv, *fragments)


@pytest.mark.parametrize("argv, fragments", [
    (["--model", "nope", "--dataset", "seq-synthetic"], ["invalid choice: 'nope'", "--help"]),
    (["--model", "sgd", "--dataset", "seq-nope"], ["invalid choice: 'seq-nope'"]),
    (["--model", "sgd"], ["required", "--dataset"]),
    (["--lr", "-0.1"], ["--lr", "-0.1 is out of range", "> 0"]),
    (["--n_epochs", "two"], ["--n_epochs", "'two'"]),
    (["--validation", "150"], ["--validation", "<= 100"]),
    (["--model_config", "best"], ["model sgd has no best configuration for seq-synthetic",
                                  "drop --model_config best"]),
    (["--device", "nonsense"], ["--device 'nonsense' is not a device"]),
    (["--device", "mps"], ["--device mps", "use auto, cpu or cuda"]),
    (["--lr", "nan"], ["--lr", "nan is not a finite number"]),
    (["--seed", str(2 ** 32)], ["--seed", "<= 4294967295"]),
    (["--validation", "100"], ["--validation 100 holds out all 100 training images of class 0",
                               "use --validation 99 or less"]),
], ids=["unknown-model", "unknown-dataset", "missing-dataset", "negative-lr", "not-a-number",
        "validation-over-100", "no-best-config", "bad-device", "unsupported-device",
        "nan-lr", "seed-beyond-numpy", "validation-leaves-no-training-image"])
def test_bad_options_give_one_line_errors(tmp_path, capsys, argv, fragments):
    base = [] if argv[0] == "--model" else synthetic_argv(tmp_path / "results")
    _assert_one_line_error(capsys, base + argv, *fragments)
    assert not (tmp_path / "results").exists()


def test_output_paths_that_cannot_be_made_are_refused_before_any_work(tmp_path, capsys):
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    results = tmp_path / "results"
    _assert_one_line_error(capsys, synthetic_argv(results, "--results_dir", str(a_file)),
                           f"--results_dir: {a_file} is a file", "give a folder")
    _assert_one_line_error(capsys, synthetic_argv(results, "--checkpoint_dir", str(a_file / "ck")),
                           f"{a_file} is a file, so {a_file / 'ck'} cannot be made")
    _assert_one_line_error(capsys, synthetic_argv(results, "--save_memory", str(tmp_path),
                                                  model="bmkp"),
                           f"{tmp_path} is a folder", f"{tmp_path / 'memory.pt'}")
    assert not (tmp_path / "results").exists()


def test_joint_refuses_per_task_batchnorm(tmp_path, capsys):
    argv = synthetic_argv(tmp_path / "results", "--per_task_bn", "1", model="joint")
    _assert_one_line_error(capsys, argv, "joint", "--per_task_bn")


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is available here")
def test_asking_for_cuda_without_one_is_a_user_error(tmp_path, capsys):
    argv = synthetic_argv(tmp_path / "results", "--device", "cuda")
    _assert_one_line_error(capsys, argv, "no CUDA device", "--device cpu")


def _cifar10_argv(tmp_path, data_path):
    return ["--model", "sgd", "--dataset", "seq-cifar10", "--data_path", str(data_path),
            "--results_dir", str(tmp_path / "results"), "--quiet"]


def test_missing_data_is_a_user_error(tmp_path, capsys, offline_cifar):
    data_path = tmp_path / "nowhere"
    err = _assert_one_line_error(capsys, _cifar10_argv(tmp_path, data_path),
                                 f"seq-cifar10: data not found in {data_path}",
                                 "cifar-10-batches-py/", "cifar10-jpeg/", "--data_path DIR")
    assert len(offline_cifar) == 1  # the download was tried (and failed, as offline)
    assert "offline (test)" in err


def test_wrong_layout_is_a_user_error(tmp_path, capsys, offline_cifar):
    write_image_folders(tmp_path / "three", ["a", "b", "c"], {"train": 1, "test": 1}, size=32)
    _assert_one_line_error(capsys, _cifar10_argv(tmp_path, tmp_path / "three"),
                           "has 3 class folders, expected 10",
                           "point --data_path at the seq-cifar10 image folders")
    assert offline_cifar == []


def test_cifar100_folder_given_to_seq_cifar10_is_a_user_error(tmp_path, capsys, real_data,
                                                             offline_cifar):
    cifar100 = real_folder(real_data, "cifar100-jpeg")
    _assert_one_line_error(capsys, _cifar10_argv(tmp_path, cifar100),
                           "has 100 class folders, expected 10")
    assert offline_cifar == []


@pytest.mark.parametrize("model, width, pool", [
    ("sgd", 64, "global"), ("er", 64, "global"), ("ewc_on", 64, "global"),
    ("clser", 64, "global"), ("gpm", 20, "grid"), ("adam_nscl", 20, "grid"),
    ("bmkp", 20, "grid"), ("wsn", 20, "grid")])
def test_best_config_gives_each_method_the_papers_network(model, width, pool):
    """The BMKP paper ran GPM, Adam-NSCL and BMKP (and WSN's code) on the reduced ResNet-18,
    every other baseline on the standard one (mammoth's, global pooling); a value typed on
    the command line still wins."""
    best = ["--model", model, "--dataset", "seq-cifar10", "--model_config", "best"]
    args = parse_args(best)
    assert (args.nf, args.feature_pool) == (width, pool)
    args = parse_args([*best, "--nf", "32", "--feature_pool", "grid"])
    assert (args.nf, args.feature_pool) == (32, "grid")
    args = parse_args(["--model", model, "--dataset", "seq-cifar10"])
    assert (args.nf, args.feature_pool) == (20, "grid")


def test_typed_options_are_those_on_the_command_line_not_the_defaults():
    """A default (the parser's, or in parse_args a best configuration's) is not typed; an
    option argv names is, in any spelling argparse accepts."""
    argv = ["--model", "sgd", "--dataset", "seq-cifar10", "--model_config", "best",
            "--n_epochs=3", "--optim_m", "0.9"]
    parser = argparse.ArgumentParser()
    for option, default in (("--model", None), ("--dataset", None), ("--model_config", None),
                            ("--n_epochs", 50), ("--lr", 0.1), ("--optim_mom", 0.0)):
        parser.add_argument(option, default=default)
    args = parser.parse_args(argv)
    assert typed_options(parser, argv, args) == {"model", "dataset", "model_config", "n_epochs",
                                                 "optim_mom"}
