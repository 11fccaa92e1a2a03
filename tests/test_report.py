"""utils/report.py on small result files written here: tables, reference column, flags, figures."""
import csv
import itertools
import json

import pytest

from helpers import assert_one_line_error
from models import model_classes
from utils.figures import HIGHLIGHTED, method_styles
from utils.metrics import summarize
from utils.report import REFERENCE, main
from utils.results import write_json_atomic

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
_run_ids = itertools.count()


def write_run(folder, model, dataset, seed, last_row, memory_mb=1.0, per_task_memory=True,
              agnostic_row=None, single_class=None, unlearned=None, others=None, **config):
    """A run JSON as utils/main.py writes it (only the fields the report reads), 2 tasks;
    without `agnostic_row`, as runs made before task-agnostic accuracy was measured; without
    `single_class` or `unlearned`, as runs made before those findings were looked for;
    `others`: the last rows of networks that do not predict (other_predictors), by name."""
    matrix = [[last_row[0] + 1.0], last_row]
    run = {"model": model, "dataset": dataset, "seed": seed, **summarize(matrix),
           "memory": {"total_mb": memory_mb},
           "config": {"model": model, "dataset": dataset, "seed": seed, "lr": 0.05,
                      "device": "cpu", "data_path": f"/data/{seed}", "num_threads": 1,
                      **config}}
    if per_task_memory:
        run["memory_per_task_mb"] = [memory_mb / 2, memory_mb]
    if agnostic_row is not None:
        run["task_agnostic"] = summarize([matrix[0], agnostic_row])
    if single_class is not None:
        run["single_class_predictions"] = single_class
    if unlearned is not None:
        run["unlearned_tasks"] = unlearned
    if others is not None:
        run["other_predictors"] = {name: summarize([[row[0] + 1.0], row])
                                   for name, row in others.items()}
    path = folder / dataset / model / f"run{next(_run_ids)}-seed{seed}.json"
    write_json_atomic(run, path)
    return path


def table_rows(markdown: str) -> dict[str, list[str]]:
    """Markdown table rows by their first cell."""
    rows = [line.strip("|").split(" | ") for line in markdown.splitlines()
            if line.startswith("| ") and not line.startswith("|---")]
    return {cells[0].strip(): [c.strip() for c in cells[1:]] for cells in rows}


def run_report(tmp_path, capsys, *sources):
    code = main([*map(str, sources), "--out", str(tmp_path / "out"),
                 "--img_dir", str(tmp_path / "img")])
    out, err = capsys.readouterr()
    assert code == 0, err
    return out, err


@pytest.fixture
def results(tmp_path):
    """Three seeds each of bmkp, joint and sgd on Seq-CIFAR-10, plus files that are not runs;
    joint's runs predate task-agnostic accuracy."""
    folder = tmp_path / "result"
    # bmkp: final ACC 93.5, 94.0, 94.5 -> 94.00 +- 0.50; memory 25.0, 25.5, 26.0 -> 25.50;
    # task-agnostic 60, 61, 62 -> 61.00 +- 1.00
    for seed, (first, mb) in enumerate([(93.0, 25.0), (94.0, 25.5), (95.0, 26.0)]):
        write_run(folder, "bmkp", "seq-cifar10", seed, [first, 94.0], mb, lambd=10.0,
                  agnostic_row=[60.0 + seed, 60.0 + seed])
    # joint: 97, 98, 99 -> 98.00 +- 1.00 against the paper's 98.07 (no std)
    for seed, acc in enumerate([97.0, 98.0, 99.0]):
        write_run(folder, "joint", "seq-cifar10", seed, [acc, acc], 1.5, feature_pool="global")
    # sgd: 60, 64, 68 -> 64.00 +- 4.00, no paper number; task-agnostic rows [0, 30], [0, 32],
    # [0, 34] -> 16.00 +- 1.00
    for seed, acc in enumerate([60.0, 64.0, 68.0]):
        write_run(folder, "sgd", "seq-cifar10", seed, [acc - 1, acc + 1], 1.5,
                  agnostic_row=[0.0, acc / 2], feature_pool="global")
    write_json_atomic({"model": "sgd", "final_acc": {"mean": 1.0}}, folder / "x-aggregate.json")
    write_json_atomic({"setup": {}, "train_images_per_s": 1.0}, folder / "benchmark" / "b.json")
    return folder


@pytest.mark.slow
def test_table1_values_reference_and_difference(tmp_path, capsys, results):
    out, err = run_report(tmp_path, capsys, results)
    assert err == ""
    md = (tmp_path / "out" / "table1.md").read_text()
    rows = table_rows(md)
    assert rows["method"] == ["seq-cifar10 ACC", "seq-cifar10 task-agnostic", "seq-cifar10 MB",
                              "seq-cifar10 paper", "seq-cifar10 diff", "seq-cifar10 protocol"]
    assert rows["bmkp"] == ["94.00 +- 0.50 (3 seeds)", "61.00 +- 1.00", "25.50",
                            "94.49 +- 0.20", "-0.49", "3/5 seeds"]
    assert rows["joint"] == ["98.00 +- 1.00 (3 seeds)", "-", "1.50", "98.07", "-0.07",
                             "3/5 seeds"]
    assert rows["sgd"] == ["64.00 +- 4.00 (3 seeds)", "16.00 +- 1.00", "1.50", "-", "-", "-"]
    assert "task-agnostic: final accuracy without the task id" in md
    assert set(rows) == {"method", "bmkp", "joint", "sgd"}  # aggregate/benchmark skipped
    assert "warning" not in md and "[few]" not in md
    tex = (tmp_path / "out" / "table1.tex").read_text()
    assert r"\multicolumn{6}{c}{seq-cifar10}" in tex
    assert (r"bmkp & 94.00 $\pm$ 0.50 (3 seeds) & 61.00 $\pm$ 1.00 & 25.50 & "
            r"94.49 $\pm$ 0.20 & -0.49 & 3/5 seeds \\") in tex
    assert r"\begin{tabular}" in tex and r"\end{table}" in tex
    assert not (tmp_path / "out" / "table2.md").exists()  # no ablation runs
    assert f"wrote {tmp_path / 'out' / 'table1.md'}" in out
    assert f"wrote {tmp_path / 'out' / 'table1.tex'}" in out


def test_a_task_predicting_one_class_in_the_final_evaluation_is_flagged(tmp_path, capsys):
    """Seed 1's final evaluation found task 2 at one class: flagged with a warning; seed 0's
    finding after task 1 was gone by the end and seed 2 predates the check: neither counts."""
    folder = tmp_path / "result"
    early = {"after_task": 0, "task": 0, "task_il": 50.0, "task_il_with_batch_statistics": 80.0}
    final = {"after_task": 1, "task": 1, "task_il": 50.0, "task_il_with_batch_statistics": 74.4}
    write_run(folder, "lwm", "seq-cifar10", 0, [90.0, 80.0], single_class=[early])
    write_run(folder, "lwm", "seq-cifar10", 1, [90.0, 50.0], single_class=[final])
    write_run(folder, "lwm", "seq-cifar10", 2, [90.0, 80.0])
    _, err = run_report(tmp_path, capsys, folder)
    md = (tmp_path / "out" / "table1.md").read_text()
    # the newest task, at one class right after it was learned, is also unlearned
    assert table_rows(md)["lwm"][0] == "80.00 +- 8.66 (3 seeds) [1cls] [unlearned]"
    assert err.splitlines() == [
        "warning: lwm on seq-cifar10: seed 1's task 2 predicts one class in the final "
        "evaluation (50.0; 74.4 on batch statistics)",
        "warning: lwm on seq-cifar10: seed 1's task 2 scored 50.0 right after it was learned, "
        "near chance; 74.4 on batch statistics"]
    assert "- [1cls]: in a run's final evaluation a task predicts one class" in md


def test_a_task_near_chance_right_after_learning_is_flagged(tmp_path, capsys):
    """Read from the accuracy matrix's diagonal (each task right after it was learned): seed
    0 recorded its finding with a score on batch statistics, seed 2 predates the check and
    is flagged from its matrix alone; seed 1 learned every task (60 is the bound)."""
    event = {"after_task": 1, "task": 1, "task_il": 52.0, "task_il_with_batch_statistics": 94.0}
    folder = tmp_path / "result"
    write_run(folder, "dgr", "seq-cifar10", 0, [90.0, 52.0], unlearned=[event])
    write_run(folder, "dgr", "seq-cifar10", 1, [90.0, 60.0], unlearned=[])
    write_run(folder, "dgr", "seq-cifar10", 2, [90.0, 59.5])
    _, err = run_report(tmp_path, capsys, folder)
    md = (tmp_path / "out" / "table1.md").read_text()
    assert table_rows(md)["dgr"][0].endswith("(3 seeds) [unlearned]")
    assert err.splitlines() == [
        "warning: dgr on seq-cifar10: seed 0's task 2 scored 52.0 right after it was learned, "
        "near chance; 94.0 on batch statistics",
        "warning: dgr on seq-cifar10: seed 2's task 2 scored 59.5 right after it was learned, "
        "near chance"]
    assert "- [unlearned]: a run scored a task near chance right after learning it" in md


def test_a_task_near_chance_names_what_the_other_networks_score_on_it(tmp_path, capsys):
    """A run that also scored networks that do not predict (CLS-ER) gives each one's score
    on the task right after it was learned, read from its own accuracy matrix, so runs whose
    findings predate the field in the finding are covered."""
    folder = tmp_path / "result"
    write_run(folder, "clser", "seq-cifar10", 0, [90.0, 52.0],
              others={"working": [91.0, 85.0], "plastic": [90.0, 80.5]})
    _, err = run_report(tmp_path, capsys, folder)
    assert err.splitlines() == [
        "warning: clser on seq-cifar10: seed 0's task 2 scored 52.0 right after it was learned, "
        "near chance; its working network scores 85.0; its plastic network scores 80.5"]


def test_a_task_predicting_one_class_names_what_the_other_networks_score_in_the_end(
        tmp_path, capsys):
    """The final evaluation's finding gives the other networks' final scores on the task
    (their last row), the diagonal's finding their scores right after it was learned."""
    folder = tmp_path / "result"
    final = {"after_task": 1, "task": 0, "task_il": 50.0, "task_il_with_batch_statistics": None}
    write_run(folder, "clser", "seq-cifar10", 0, [50.0, 80.0], single_class=[final],
              others={"working": [88.0, 90.0]})
    _, err = run_report(tmp_path, capsys, folder)
    assert err.splitlines() == [
        "warning: clser on seq-cifar10: seed 0's task 1 predicts one class in the final "
        "evaluation (50.0; its working network scores 88.0)",
        "warning: clser on seq-cifar10: seed 0's task 1 scored 51.0 right after it was learned, "
        "near chance; its working network scores 89.0"]


def test_networks_that_do_not_predict_are_noted_beside_table1(tmp_path, capsys):
    """CLS-ER's stable memory gives the ACC; its working network's and plastic memory's final
    ACC are noted, over the runs that scored them (seed 2 predates other_predictors)."""
    folder = tmp_path / "result"
    write_run(folder, "clser", "seq-cifar10", 0, [70.0, 80.0],
              others={"working": [85.0, 90.0], "plastic": [80.0, 86.0]})
    write_run(folder, "clser", "seq-cifar10", 1, [72.0, 82.0],
              others={"working": [87.0, 92.0], "plastic": [82.0, 88.0]})
    write_run(folder, "clser", "seq-cifar10", 2, [74.0, 84.0])
    write_run(folder, "sgd", "seq-cifar10", 0, [60.0, 90.0])
    run_report(tmp_path, capsys, folder)
    md = (tmp_path / "out" / "table1.md").read_text()
    assert table_rows(md)["clser"][0].startswith("77.00 +- 2.00 (3 seeds)")  # 75, 77, 79
    notes = [line for line in md.splitlines() if "other networks" in line]
    assert notes == ["- clser on seq-cifar10: ACC is of the network that predicts (77.00 +- "
                     "2.00); its other networks score working 88.50 +- 1.41, plastic 84.00 +- "
                     "1.41 (2 of 3 run(s); other_predictors in the result)."]


@pytest.mark.slow
def test_mismatched_protocol_and_missing_or_repeated_seeds_are_flagged(tmp_path, capsys,
                                                                       results):
    write_run(results, "sgd", "seq-cifar10", 0, [59.0, 61.0], 1.5, lr=0.1,
              feature_pool="global")  # other protocol
    for seed in (0, 0, 1):  # seed 0 twice
        write_run(results, "joint", "seq-cifar100", seed, [80.0, 90.0], 1.5,
                  feature_pool="global")
    out, err = run_report(tmp_path, capsys, results)
    md = (tmp_path / "out" / "table1.md").read_text()
    rows = table_rows(md)
    assert "sgd" not in rows
    assert rows["sgd [lr=0.05]"][0] == "64.00 +- 4.00 (3 seeds)"
    assert rows["sgd [lr=0.1]"][0] == "60.00 (1 seed) [few]"
    assert rows["joint"][6] == "85.00 +- 0.00 (3 runs, 2 seeds) [few] [dup]"
    assert rows["joint"][9] == "91.18"  # the paper's CIFAR-100 Joint
    warnings = err.splitlines()
    assert ("warning: sgd on seq-cifar10: runs differ in lr; reported as 2 separate rows, "
            "not averaged") in warnings
    assert ("warning: sgd [lr=0.1] on seq-cifar10: 1 seed(s) [0], fewer than the largest "
            "group's 3") in warnings
    assert any("joint on seq-cifar100: seed(s) [0] run more than once" in w for w in warnings)
    assert all(w.startswith("warning: ") for w in warnings) and len(warnings) == 4
    for w in warnings:  # the table carries them too
        assert f"- {w}" in md
    assert "- [few]: fewer distinct seeds than the largest group (3)." in md


@pytest.mark.slow
def test_ablation_and_lambda_tables(tmp_path, capsys, results):
    write_run(results, "bmkp", "seq-cifar10", 0, [80.0, 78.0], 20.0, lambd=10.0,
              no_basis_update=True)
    write_run(results, "bmkp", "seq-cifar10", 0, [93.0, 93.0], 25.0, lambd=10.0,
              retrain_epochs=0)
    for lam, acc, mb in [(1.0, 69.0, 27.0), (10.0, 70.0, 25.0), (100.0, 67.0, 24.5)]:
        write_run(results, "bmkp", "seq-tinyimg", 0, [acc, acc], mb, lambd=lam)
    out, err = run_report(tmp_path, capsys, results)
    table2 = table_rows((tmp_path / "out" / "table2.md").read_text())
    assert table2["without basis updating"][:4] == ["79.00 (1 seed) [few]", "20.00",
                                                    "79.44", "-0.44"]
    assert table2["without retraining"][:4] == ["93.00 (1 seed) [few]", "25.00",
                                                "94.07", "-1.07"]
    assert table2["full"][:4] == ["94.00 +- 0.50 (3 seeds)", "25.50", "94.49", "-0.49"]
    table3 = table_rows((tmp_path / "out" / "table3.md").read_text())
    assert table3["lambda"][-6:] == ["seq-tinyimg ACC", "seq-tinyimg MB", "seq-tinyimg paper",
                                     "seq-tinyimg diff", "seq-tinyimg protocol",
                                     "seq-tinyimg paper MB"]
    assert table3["lambda = 1"][-6:] == ["69.00 (1 seed) [few]", "27.00", "69.18",
                                         "-0.18", "1/5 seeds", "26.81"]
    assert table3["lambda = 100"][-6:] == ["67.00 (1 seed) [few]", "24.50", "67.41",
                                           "-0.41", "1/5 seeds", "24.98"]
    assert table3["lambda = 10"][0] == "94.00 +- 0.50 (3 seeds)"  # the CIFAR-10 runs
    assert (tmp_path / "out" / "table3.tex").is_file()
    assert "bmkp on seq-cifar10: runs differ in no_basis_update, retrain_epochs" in err


@pytest.mark.slow
def test_rows_off_the_papers_protocol_are_labelled_and_get_no_diff(tmp_path, capsys):
    """The CPU-budget protocol (5 of 50 epochs, the reduced network for a baseline the paper
    ran on the standard one, one seed) is named in the row; its gap to the paper is no diff."""
    folder = tmp_path / "result"
    write_run(folder, "derpp", "seq-cifar10", 0, [80.0, 82.0], 5.0, n_epochs=5, nf=20,
              buffer_size=500, batch_size=32)
    write_run(folder, "er", "seq-cifar10", 0, [80.0, 90.0], 5.0, n_epochs=50, nf=64,
              buffer_size=200)
    for seed in range(5):
        write_run(folder, "bmkp", "seq-cifar10", seed, [94.0, 94.0], 25.0, n_epochs=50,
                  retrain_epochs=50, nf=20, batch_size=128)
    run_report(tmp_path, capsys, folder)
    md = (tmp_path / "out" / "table1.md").read_text()
    rows = table_rows(md)
    assert rows["derpp"][3:] == ["93.71 +- 0.40", "n/a",
                                 "5/50 epochs, nf 20/64, grid/global pooling, 1/5 seeds"]
    assert rows["er"][3:] == ["-", "-", "-"]  # the paper has no ER row
    assert rows["bmkp"][3:] == ["94.49 +- 0.20", "-0.49", "paper"]
    assert "diff n/a: the runs' protocol differs from the paper's" in md


@pytest.mark.slow
def test_rows_are_named_by_the_option_that_sets_the_others(tmp_path, capsys):
    """BMKP's --compat official sets the network's options: its rows read compat=..., unless
    only the set options tell two rows apart; runs older than an option count as its default."""
    folder = tmp_path / "result"
    official = dict(compat="official", shortcut="none", head_bias=0)
    write_run(folder, "bmkp", "seq-cifar10", 0, [80.0, 80.0], 18.0, **official)
    write_run(folder, "bmkp", "seq-cifar10", 0, [90.0, 90.0], 12.0, compat="paper",
              shortcut="identity", head_bias=1, projection_bn="running", normalize_inputs=0)
    write_run(folder, "bmkp", "seq-cifar10", 1, [91.0, 91.0], 12.0, compat="paper")  # older
    run_report(tmp_path, capsys, folder)
    rows = table_rows((tmp_path / "out" / "table1.md").read_text())
    assert rows["bmkp [compat=official]"][0] == "80.00 (1 seed) [few]"
    assert rows["bmkp [compat=paper]"][0] == "90.50 +- 0.71 (2 seeds)"
    write_run(folder, "bmkp", "seq-cifar10", 0, [70.0, 70.0], 18.0, compat="paper",
              shortcut="none")
    run_report(tmp_path, capsys, folder)
    rows = table_rows((tmp_path / "out" / "table1.md").read_text())
    assert {"bmkp [compat=paper, head_bias=1, shortcut=none]",
            "bmkp [compat=paper, head_bias=1, shortcut=identity]"} < set(rows)


def test_reference_protocol_matches_the_best_configurations():
    """The protocol the report compares with is the one --model_config best runs."""
    protocol = json.loads(REFERENCE.read_text())["protocol"]
    for name, cls in model_classes().items():
        for option, value in cls.PAPER_NETWORK.items():
            assert protocol[option].get(name, protocol[option]["default"]) == value, name
    bmkp = model_classes()["bmkp"].BEST_CONFIGS
    for dataset, epochs in protocol["n_epochs"].items():
        assert bmkp[dataset]["n_epochs"] == epochs
        assert bmkp[dataset]["batch_size"] == protocol["batch_size"]["bmkp"][dataset]


def test_every_method_gets_its_own_line_style_and_bmkp_stands_out():
    methods = sorted({*model_classes(), *(f"method{i}" for i in range(20))})
    styles = method_styles(methods, {m: m for m in methods})
    looks = {(str(s["color"]), s["marker"]) for s in styles.values()}
    assert len(looks) == len(methods)  # no two methods drawn alike
    assert styles[HIGHLIGHTED]["color"] == "black" and styles[HIGHLIGHTED]["zorder"] > 1
    # the same method keeps its look in another figure; its second row changes line style
    again = method_styles(methods, {"sgd": "sgd", "sgd [lr=0.1]": "sgd", "er": "er"})
    assert again["sgd"] == styles["sgd"] and again["er"] == styles["er"]
    assert again["sgd [lr=0.1]"]["linestyle"] != again["sgd"]["linestyle"]
    assert again["sgd [lr=0.1]"]["fillstyle"] != again["sgd"]["fillstyle"]
    assert again["sgd [lr=0.1]"]["color"] == again["sgd"]["color"]


@pytest.mark.slow
def test_threshold_table_and_long_csv(tmp_path, capsys, results):
    for level, acc, mb in [(0.95, 78.0, 20.0), (0.98, 80.0, 30.0)]:
        write_run(results, "bmkp", "seq-cifar100", 0, [acc, acc], mb, threshold=level)
    out, _ = run_report(tmp_path, capsys, results)
    table4 = table_rows((tmp_path / "out" / "table4.md").read_text())
    assert table4["threshold = 0.95"][:3] == ["78.00 (1 seed) [few]", "20.00", "-"]
    assert table4["threshold = 0.98"][:3] == ["80.00 (1 seed) [few]", "30.00", "-"]
    with open(tmp_path / "out" / "runs.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2 * (9 + 2)  # two tasks for each of the 11 runs
    sgd = [r for r in rows if r["model"] == "sgd" and r["seed"] == "2"]
    # sgd seed 2: matrix [[68, ...], [67, 69]] (write_run's first row is last_row[0] + 1)
    assert [(r["task"], r["accuracy_final"], r["accuracy_when_learned"]) for r in sgd] == \
        [("1", "67.0", "68.0"), ("2", "69.0", "69.0")]
    assert sgd[0]["memory_mb_after_task"] == "0.75" and sgd[0]["memory_mb"] == "1.5"
    assert [r["task_agnostic_accuracy_final"] for r in sgd] == ["0.0", "34.0"]
    assert sgd[0]["task_agnostic_final_acc"] == "17.0"
    joint = [r for r in rows if r["model"] == "joint"]  # made before it was measured
    assert {(r["task_agnostic_accuracy_final"], r["task_agnostic_final_acc"]) for r in joint} \
        == {("", "")}
    assert f"wrote {tmp_path / 'out' / 'runs.csv'}" in out


def _is_png(path):
    return path.is_file() and path.stat().st_size > 1000 and path.read_bytes()[:8] == PNG_MAGIC


@pytest.mark.slow
def test_figures_are_written(tmp_path, capsys, results):
    write_run(results, "sgd", "seq-cifar100", 0, [40.0, 50.0], 1.5, per_task_memory=False)
    out, _ = run_report(tmp_path, capsys, results)
    img = tmp_path / "img"
    heatmaps = sorted((img / "runs").iterdir())
    assert len(heatmaps) == 10 and all(_is_png(p) for p in heatmaps)
    assert "wrote 10 accuracy-matrix heatmaps (one per run)" in out
    for name in ("seq-cifar10_avg_accuracy", "seq-cifar10_memory", "seq-cifar100_avg_accuracy",
                 "seq-cifar10_acc_vs_memory", "seq-cifar100_acc_vs_memory"):
        assert _is_png(img / f"{name}.png"), name
        assert f"wrote {img / name}.png" in out
    assert not (img / "seq-cifar100_memory.png").exists()
    assert ("note: seq-cifar100: no memory_per_task_mb in the runs of sgd; memory figure "
            "skipped") in out
    assert main([str(results), "--out", str(tmp_path / "out2"), "--img_dir",
                 str(tmp_path / "img2"), "--heatmaps", "0"]) == 0
    assert "heatmaps" not in capsys.readouterr().out and not (tmp_path / "img2" / "runs").exists()
    assert _is_png(tmp_path / "img2" / "seq-cifar10_acc_vs_memory.png")


def test_reference_file_holds_the_papers_tables():
    ref = json.loads(REFERENCE.read_text())
    assert ref["table1"]["bmkp"]["seq-tinyimg"] == {"mean": 70.36, "std": 0.2}
    assert ref["table1"]["ewc_on"]["seq-cifar100"] == {"mean": 38.40, "std": 1.9}
    assert "seq-tinyimg" not in ref["table1"]["dgr"] and "sgd" not in ref["table1"]
    assert ref["table2"]["no_basis_update"]["seq-tinyimg"]["mean"] == 28.27
    assert ref["table3"]["seq-tinyimg"]["1000"] == {"mean": 47.97, "std": None,
                                                    "memory_mb": 24.78}


def test_bad_input_is_a_one_line_error(tmp_path, capsys, results):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert_one_line_error(capsys, main, [str(empty), "--out", str(tmp_path / "o")],
                          "no run results", str(empty), "run utils/main.py first")
    missing = tmp_path / "missing"
    assert_one_line_error(capsys, main, [str(missing), "--out", str(tmp_path / "o")],
                          f"{missing} does not exist")
    bad_reference = tmp_path / "ref.json"
    bad_reference.write_text("{}")
    assert_one_line_error(capsys, main, [str(results), "--out", str(tmp_path / "o"),
                                         "--reference", str(bad_reference)],
                          "not in the bmkp_paper.json format")
    assert not (tmp_path / "o").exists()
    assert_one_line_error(capsys, main, [str(results), "--out", str(bad_reference)],
                          f"--out: {bad_reference} is a file", "give a folder")
    assert_one_line_error(capsys, main, [str(results), "--img_dir", str(bad_reference / "img")],
                          f"{bad_reference} is a file, so")


def test_every_paper_table1_row_runs_here_and_meets_its_published_number(tmp_path, capsys):
    """Each method of the paper's Table 1 (CF-IL's row is quoted from its own paper) is a
    registered method, and a run of it lands beside the published number."""
    table1 = json.loads(REFERENCE.read_text())["table1"]
    assert set(table1) <= set(model_classes())
    newer = ("hal", "clser", "lwm", "pass", "deep_inversion", "dgr", "fas")
    folder = tmp_path / "result"
    for model in newer:
        write_run(folder, model, "seq-cifar10", 0, [80.0, 80.0], 40.0, n_epochs=5)
    run_report(tmp_path, capsys, folder)
    rows = table_rows((tmp_path / "out" / "table1.md").read_text())
    for model in newer:
        paper = table1[model]["seq-cifar10"]
        assert rows[model][3] == f"{paper['mean']:.2f} +- {paper['std']:.2f}", model
        assert rows[model][4] == "n/a", model  # 5 of 50 epochs: no difference is shown
