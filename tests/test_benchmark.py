"""The benchmark runs end to end on small settings and reports every figure it promises."""
import json

import pytest

from helpers import assert_one_line_error
from models import model_classes
from utils.benchmark import main


def test_benchmark_reports_throughput_bound_and_end_of_task_work(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert main(["--dataset", "seq-synthetic", "--nf", "4", "--batch_size", "16", "--steps", "2",
                 "--num_threads", "1", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    for key in ("train_images_per_s", "bound_images_per_s", "ratio_to_bound",
                "eval_images_per_s", "end_of_task_share", "peak_rss_mb"):
        assert report[key] > 0, key
    assert report["end_of_task_s"]["projection"] > 0
    assert report["epochs_per_task"] == 20  # seq-synthetic's 10 epochs, then 10 of retraining
    assert report["setup"]["model"] == "bmkp" and report["data"] == "real"
    # the learning step adds the compaction regularizer to the bare step's operators, the
    # retraining step the recomposition W = B A; each is counted in its own phase
    assert report["train_operators_per_batch"] > report["bound_operators_per_batch"] > 0
    assert (report["train_operators_per_batch"] > report["retrain_operators_per_batch"]
            > report["bound_operators_per_batch"])
    assert report["retrain_ms_per_batch"] > 0
    assert "ratio_to_bound" in capsys.readouterr().out


def test_benchmark_of_a_method_without_projection(tmp_path):
    out = tmp_path / "bench.json"
    assert main(["--model", "ewc_on", "--nf", "4", "--batch_size", "16", "--steps", "2",
                 "--num_threads", "1", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["data"] == "random" and "projection" not in report["end_of_task_s"]
    assert report["train_images_per_s"] > 0 and "retrain_ms_per_batch" not in report
    fisher, rest = report["end_of_task_s"]["fisher"], report["end_of_task_s"]["end_task_other"]
    assert fisher > 0 and 0 <= rest < fisher  # the Fisher is end_task's work, counted once


@pytest.mark.parametrize("model", sorted(model_classes()))
def test_benchmark_times_every_method_through_its_own_training_step(model, tmp_path):
    """Replay methods take the raw images too, DGR trains through its own step: the benchmark
    times each method's fit_task, so it runs for every registered method."""
    out = tmp_path / "bench.json"
    synthesis = ["--synthesis_iterations", "2"] if model == "deep_inversion" else []
    assert main(["--model", model, "--dataset", "seq-synthetic", "--nf", "4", "--batch_size",
                 "16", "--steps", "2", "--num_threads", "1", "--out", str(out), *synthesis]) == 0
    report = json.loads(out.read_text())
    assert report["setup"]["model"] == model
    assert report["train_ms_per_batch"] > 0 and report["bound_ms_per_batch"] > 0


def test_benchmark_options_are_listed_and_checked_like_mains(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    help_text = capsys.readouterr().out
    assert help_text.startswith("usage: utils/benchmark.py")
    assert "--steps STEPS" in help_text and "--task_images" in help_text
    assert "--model_config" in help_text  # utils/main.py's options too
    assert_one_line_error(capsys, main, ["--steps", "0"], "--steps", "must be >= 1")
    assert_one_line_error(capsys, main, ["--nf", "0"], "--nf")


def test_an_output_path_naming_a_folder_is_a_one_line_error(tmp_path, capsys):
    assert_one_line_error(capsys, main, ["--out", str(tmp_path)], f"--out: {tmp_path} is a "
                          f"folder; give a file name such as {tmp_path / 'benchmark.json'}")


def test_more_steps_than_a_task_holds_is_a_one_line_error(capsys):
    # seq-synthetic's tasks hold 200 training images: 7 batches of 32 would need 224
    assert_one_line_error(capsys, main, ["--dataset", "seq-synthetic", "--nf", "4",
                                         "--batch_size", "32", "--steps", "7",
                                         "--num_threads", "1"],
                          "--steps 7", "224", "has 200", "--steps 6")
    # not even one batch fits: the batch is what must shrink
    assert_one_line_error(capsys, main, ["--dataset", "seq-synthetic", "--nf", "4",
                                         "--batch_size", "256", "--steps", "1",
                                         "--num_threads", "1"],
                          "has 200", "--batch_size 200 or smaller")
