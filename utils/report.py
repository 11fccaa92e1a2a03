"""The paper's tables and figures from run results.

    python utils/report.py [result folders or run JSON files ...] [--out DIR] [--img_dir DIR]

Runs are the JSON files that hold an accuracy matrix (aggregate, benchmark and reference files
are skipped). They are grouped by model, dataset and protocol, the protocol being the
configuration less the options that do not change the experiment
(utils.aggregate.NON_PROTOCOL_KEYS: seeds, paths, device, threads, memory layout, verbosity,
model_config). Nothing is averaged across protocols: groups of one model and dataset with
different protocols become separate rows, labelled with the options they differ in, and a
warning names those options; a group with fewer distinct seeds than the largest group, or
with a seed run twice, is flagged in the tables and warned about. Each row's protocol is also
compared with the paper's (bmkp_paper.json's "protocol": epochs, network width, buffer, batch,
seeds) and the differences are shown in its own column; where they go beyond the seed count,
the difference to the paper's number is left out, since it would measure the protocol, not the
method.
"""
from __future__ import annotations

import argparse
import csv
import json
import sys
from collections import defaultdict
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Callable, Hashable

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from datasets import dataset_classes  # noqa: E402
from models import model_classes  # noqa: E402
from utils.aggregate import aggregate_runs, differing_keys, mean_std, protocol  # noqa: E402
from utils.args import OneLineErrorParser  # noqa: E402
from utils.errors import UserError  # noqa: E402
from utils.figures import (accuracy_heatmap, accuracy_memory, method_styles,  # noqa: E402
                           task_curves)
from utils.results import write_atomic  # noqa: E402
from utils.tables import PaperTable  # noqa: E402
from utils.training import learned_bound, other_networks_text  # noqa: E402
from utils.validators import output_folder, switch  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
REFERENCE = REPO / "result" / "reference" / "bmkp_paper.json"
PAPER_DATASETS = ("seq-cifar10", "seq-cifar100", "seq-tinyimg")
FEW, DUPLICATE, ONE_CLASS, UNLEARNED = "few", "dup", "1cls", "unlearned"


@dataclass
class Group:
    """The runs of one model on one dataset under one protocol (one per seed, normally)."""

    model: str
    dataset: str
    protocol: dict
    paths: list[Path] = field(default_factory=list)
    runs: list[dict] = field(default_factory=list)
    label: str = ""
    flags: list[str] = field(default_factory=list)
    # How the runs' protocol differs from the paper's, as 'ours/paper what' (seeds last).
    gaps: list[str] = field(default_factory=list)
    # The protocol matches the paper's but for the seed count, so the ACC compares with it.
    comparable: bool = True

    @cached_property
    def stats(self) -> dict:
        return aggregate_runs(self.runs)

    @property
    def seeds(self) -> list[int]:
        return [r["seed"] for r in self.runs]


# A variant places a group in a table: (sort key, row label, reference key), or None to
# leave the group out of that table.
Variant = Callable[[Group], "tuple[Hashable, str, Hashable] | None"]
Cell = Callable[[Group | None, dict | None], str]


@dataclass
class Row:
    label: str
    reference_key: Hashable
    groups: dict[str, Group] = field(default_factory=dict)


@dataclass
class Table:
    name: str
    title: str
    row_header: str
    columns: list[tuple[str, Cell]]
    reference: dict  # reference key -> dataset -> {"mean", "std", ...}
    rows: list[Row]
    notes: list[str]

    @property
    def datasets(self) -> list[str]:
        """The datasets with runs: the paper's first, in its order, then the others by name."""
        present = {d for row in self.rows for d in row.groups}
        rank = {d: i for i, d in enumerate(PAPER_DATASETS)}
        return sorted(present, key=lambda d: (rank.get(d, len(rank)), d))

    def cells(self, row: Row) -> list[str]:
        """The row's cells; the paper's numbers only where the row has runs to compare."""
        reference = self.reference.get(row.reference_key, {})
        return [cell(row.groups.get(d), reference.get(d) if d in row.groups else None)
                for d in self.datasets for _, cell in self.columns]


@dataclass
class PaperProtocol:
    """The protocol behind the paper's numbers (bmkp_paper.json's "protocol")."""

    seeds: int
    n_epochs: dict[str, int]  # dataset -> epochs per task
    nf: dict[str, int]  # model -> backbone width, with a "default"
    feature_pool: dict[str, str]  # model -> --feature_pool, with a "default"
    buffer_size: int  # of every method that has a buffer
    batch_size: dict[str, dict[str, int]]  # model -> dataset -> batch, where the paper says
    retrain_epochs: dict[str, dict[str, int]]  # model -> dataset -> epochs

    def compare(self, g: Group) -> None:
        """Set the group's gaps to the paper's protocol on its dataset (none off the paper's
        datasets), and whether its ACC is comparable with the paper's."""
        if g.dataset not in self.n_epochs:
            return
        config = g.protocol
        paper = {"n_epochs": self.n_epochs[g.dataset],
                 "retrain_epochs": self.retrain_epochs.get(g.model, {}).get(g.dataset),
                 "nf": self.nf.get(g.model, self.nf["default"]),
                 "feature_pool": self.feature_pool.get(g.model, self.feature_pool["default"]),
                 "batch_size": self.batch_size.get(g.model, {}).get(g.dataset),
                 "buffer_size": self.buffer_size}
        if config.get("retrain_epochs") == 0:
            paper["retrain_epochs"] = None  # Table 2's ablation, not a shorter protocol
        for key, text in PROTOCOL_GAPS.items():
            ours = config.get(key)
            if ours is not None and paper[key] is not None and ours != paper[key]:
                g.gaps.append(text.format(ours=ours, paper=paper[key]))
        g.comparable = not g.gaps
        seeds = len(set(g.seeds))
        if seeds != self.seeds:
            g.gaps.append(f"{seeds}/{self.seeds} seeds")


# Options compared with the paper's protocol, and how a difference reads (ours/paper).
PROTOCOL_GAPS = {"n_epochs": "{ours}/{paper} epochs",
                 "retrain_epochs": "{ours}/{paper} retraining epochs",
                 "nf": "nf {ours}/{paper}", "feature_pool": "{ours}/{paper} pooling",
                 "batch_size": "batch {ours}/{paper}",
                 "buffer_size": "buffer {ours}/{paper}"}


# ---- loading -------------------------------------------------------------------------------
def load_reference(path: Path) -> dict:
    """The paper's numbers, each table as reference key -> dataset -> entry (the swept values
    of Tables 3 and 4 become floats, to match the runs' --lambd and --threshold), and its
    protocol."""
    def by_value(table: dict) -> dict[float, dict]:
        """dataset -> swept value -> entry, as swept value (a float) -> dataset -> entry."""
        sweeps: dict[float, dict] = defaultdict(dict)
        for dataset, sweep in table.items():
            for value, entry in sweep.items():
                sweeps[float(value)][dataset] = entry
        return dict(sweeps)

    try:
        data = json.loads(path.read_text())
        return {"table1": data["table1"], "table2": data["table2"],
                "table3": by_value(data["table3"]), "table4": by_value(data["table4"]),
                "protocol": PaperProtocol(**data["protocol"])}
    except FileNotFoundError:
        raise UserError(f"reference file {path} does not exist; pass --reference FILE "
                        f"(the repository's is {REFERENCE})") from None
    except (json.JSONDecodeError, KeyError, ValueError, AttributeError, TypeError) as exc:
        raise UserError(f"reference file {path} is not in the bmkp_paper.json format "
                        f"({type(exc).__name__}: {exc}); pass --reference {REFERENCE}") from None


def find_runs(sources: list[Path], warn: Callable[[str], None]) -> list[tuple[Path, dict]]:
    """Every run JSON (one with an accuracy_matrix) in the given files and folders."""
    files: dict[Path, None] = {}
    for source in sources:
        if source.is_file():
            files[source.resolve()] = None
        elif source.is_dir():
            files.update((p.resolve(), None) for p in sorted(source.rglob("*.json"))
                         if not p.name.startswith("."))
        else:
            raise UserError(f"{source} does not exist; pass result folders or run JSON files "
                            "(default: result/)")
    runs = []
    for path in files:
        try:
            data = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            warn(f"{path} is not valid JSON; skipped")
            continue
        if isinstance(data, dict) and "accuracy_matrix" in data:
            runs.append((path, data))
    if not runs:
        raise UserError(f"no run results (JSON files with an accuracy_matrix) in "
                        f"{', '.join(map(str, sources))}; run utils/main.py first or pass "
                        "the folder it wrote to")
    return runs


def group_runs(runs: list[tuple[Path, dict]]) -> list[Group]:
    groups: dict[tuple, Group] = {}
    for path, run in runs:
        proto = protocol(run.get("config", {}))
        key = (run["model"], run["dataset"], json.dumps(proto, sort_keys=True, default=str))
        group = groups.setdefault(key, Group(run["model"], run["dataset"], proto))
        group.paths.append(path)
        group.runs.append(run)
    return [groups[k] for k in sorted(groups)]


# ---- checks --------------------------------------------------------------------------------
def _details(members: list[Group]) -> list[str]:
    """For groups sharing a table row's variant and a dataset: the options they differ in,
    as 'key=value, ...' per group ('' for a lone group), less those that a differing option
    sets (the model's IMPLIED_OPTIONS) where the shorter labels still tell the groups apart."""
    if len(members) == 1:
        return [""]
    keys = differing_keys([g.protocol for g in members])
    model = model_classes().get(members[0].model)
    implied = {k for key in keys for k in getattr(model, "IMPLIED_OPTIONS", {}).get(key, ())}

    def labels(shown: list[str]) -> list[str]:
        return [", ".join(f"{k}={g.protocol.get(k, 'unset')}" for k in shown) for g in members]

    short = labels([k for k in keys if k not in implied])
    return short if len(set(short)) == len(short) else labels(keys)


def _with_detail(label: str, detail: str) -> str:
    return f"{label} [{detail}]" if detail else label


def label_groups(groups: list[Group]) -> list[str]:
    """Label each group by its model (plus the options telling it apart from the model's other
    groups on the dataset); a warning for each model and dataset with several protocols."""
    by_model: dict[tuple[str, str], list[Group]] = defaultdict(list)
    for g in groups:
        by_model[g.model, g.dataset].append(g)
    warnings = []
    for (model, dataset), members in by_model.items():
        for g, detail in zip(members, _details(members)):
            g.label = _with_detail(model, detail)
        if len(members) > 1:
            keys = differing_keys([g.protocol for g in members])
            warnings.append(f"{model} on {dataset}: runs differ in {', '.join(keys)}; "
                            f"reported as {len(members)} separate rows, not averaged")
    return warnings


def flag_seeds(groups: list[Group]) -> list[str]:
    """Flag groups with fewer distinct seeds than the largest group, or a seed run twice."""
    most = max(len(set(g.seeds)) for g in groups)
    warnings = []
    for g in groups:
        distinct = set(g.seeds)
        if len(distinct) < most:
            g.flags.append(FEW)
            warnings.append(f"{g.label} on {g.dataset}: {len(distinct)} seed(s) "
                            f"{sorted(distinct)}, fewer than the largest group's {most}")
        if len(distinct) < len(g.seeds):
            g.flags.append(DUPLICATE)
            repeated = sorted({s for s in g.seeds if g.seeds.count(s) > 1})
            warnings.append(f"{g.label} on {g.dataset}: seed(s) {repeated} run more than once, "
                            "each run counted in mean and std")
    return warnings


def flag_single_class(groups: list[Group]) -> list[str]:
    """Flag groups with a run whose final evaluation found a task predicting one class (see
    utils/training.py): its ACC counts that task at chance. Runs made before the check
    carry no findings and are not flagged."""
    warnings = []
    for g in groups:
        for run in g.runs:
            last = len(run["accuracy_matrix"]) - 1
            for event in run.get("single_class_predictions", []):
                if event["after_task"] != last:
                    continue
                if ONE_CLASS not in g.flags:
                    g.flags.append(ONE_CLASS)
                on_batch = _on_batch_statistics(event["task_il_with_batch_statistics"])
                others = _other_networks_on(run, last, event["task"])
                warnings.append(f"{g.label} on {g.dataset}: seed {run['seed']}'s task "
                                f"{event['task'] + 1} predicts one class in the final "
                                f"evaluation ({event['task_il']:.1f}{on_batch}{others})")
    return warnings


def _other_networks_on(run: dict, after_task: int, task: int) -> str:
    """A warning's note of the run's other networks' scores on `task` after `after_task`
    (other_predictors; empty for a method with one network)."""
    return other_networks_text({name: other["accuracy_matrix"][after_task][task]
                                for name, other in run.get("other_predictors", {}).items()})


def _on_batch_statistics(score: float | None) -> str:
    """A warning's note of a finding's score on batch statistics, where it has one."""
    return "" if score is None else f"; {score:.1f} on batch statistics"


def flag_unlearned(groups: list[Group]) -> list[str]:
    """Flag groups with a run that scored a task under utils/training.py's learned_bound right
    after learning it: read from the accuracy matrix's diagonal, so runs made before runs
    looked for it (utils/training.py, diagnose_unlearned) are checked too; with the score on
    batch statistics where the run recorded one (an unlearned or single-class finding), and
    the method's other networks' scores on the task where the run has them (other_predictors:
    CLS-ER's working network learns a task its stable memory has not caught up with)."""
    classes = {name: cls.N_CLASSES_PER_TASK for name, cls in dataset_classes().items()}
    warnings = []
    for g in groups:
        if g.dataset not in classes:
            continue
        bound = learned_bound(classes[g.dataset])
        for run in g.runs:
            recorded = run.get("single_class_predictions", []) + run.get("unlearned_tasks", [])
            batch_scores = {e["task"]: e["task_il_with_batch_statistics"]
                            for e in recorded if e["after_task"] == e["task"]}
            matrix = run["accuracy_matrix"]
            for task in range(len(matrix)):
                if matrix[task][task] >= bound:
                    continue
                if UNLEARNED not in g.flags:
                    g.flags.append(UNLEARNED)
                on_batch = _on_batch_statistics(batch_scores.get(task))
                others = _other_networks_on(run, task, task)
                warnings.append(f"{g.label} on {g.dataset}: seed {run['seed']}'s task "
                                f"{task + 1} scored {matrix[task][task]:.1f} right after it "
                                f"was learned, near chance{on_batch}{others}")
    return warnings


def other_predictor_notes(groups: list[Group]) -> list[str]:
    """For groups whose runs also scored networks that do not predict (other_predictors,
    e.g. CLS-ER's working network beside its stable memory), their final ACC beside the
    table's, over the runs that have them."""
    notes = []
    for g in groups:
        scored = [r["other_predictors"] for r in g.runs if "other_predictors" in r]
        if not scored:
            continue
        finals = {name: mean_std([s[name]["final_acc"] for s in scored]) for name in scored[0]}
        others = ", ".join(f"{name} {mean_spread(acc, len(scored))}"
                           for name, acc in finals.items())
        notes.append(f"{g.label} on {g.dataset}: ACC is of the network that predicts "
                     f"({mean_spread(g.stats['final_acc'], len(g.runs))}); its other "
                     f"networks score {others} ({len(scored)} of {len(g.runs)} run(s); "
                     "other_predictors in the result).")
    return notes


# ---- tables ---------------------------------------------------------------------------------
def _ref_text(ref: dict) -> str:
    return f"{ref['mean']:.2f}" + ("" if ref.get("std") is None else f" +- {ref['std']:.2f}")


def mean_spread(stat: dict, n_runs: int) -> str:
    """The mean, with its std when there is more than one run (one run has no spread)."""
    return f"{stat['mean']:.2f}" + ("" if n_runs == 1 else f" +- {stat['std']:.2f}")


def acc_cell(g: Group | None, ref: dict | None) -> str:
    if g is None:
        return "-"
    acc, n, seeds = g.stats["final_acc"], len(g.runs), len(set(g.seeds))
    count = f"{seeds} seed{'' if seeds == 1 else 's'}"
    if n != seeds:
        count = f"{n} runs, {count}"
    flags = "".join(f" [{f}]" for f in g.flags)
    return f"{mean_spread(acc, n)} ({count}){flags}"


def agnostic_cell(g: Group | None, ref: dict | None) -> str:
    acc = None if g is None else g.stats["task_agnostic_final_acc"]
    if acc is None:  # no runs, or runs made before task-agnostic accuracy was measured
        return "-"
    return mean_spread(acc, len(g.runs))


def memory_cell(g: Group | None, ref: dict | None) -> str:
    return "-" if g is None else f"{g.stats['memory_total_mb']['mean']:.2f}"


def paper_cell(g: Group | None, ref: dict | None) -> str:
    return "-" if ref is None else _ref_text(ref)


def diff_cell(g: Group | None, ref: dict | None) -> str:
    if g is None or ref is None:
        return "-"
    if not g.comparable:
        return "n/a"
    return f"{g.stats['final_acc']['mean'] - ref['mean']:+.2f}"


def protocol_cell(g: Group | None, ref: dict | None) -> str:
    if g is None or ref is None:
        return "-"
    return ", ".join(g.gaps) or "paper"


def paper_memory_cell(g: Group | None, ref: dict | None) -> str:
    return "-" if ref is None or ref.get("memory_mb") is None else f"{ref['memory_mb']:.2f}"


COLUMNS: list[tuple[str, Cell]] = [("ACC", acc_cell), ("MB", memory_cell),
                                   ("paper", paper_cell), ("diff", diff_cell),
                                   ("protocol", protocol_cell)]
# Table 1 also shows the accuracy without the task id, beside the headline Task-IL ACC.
TABLE1_COLUMNS = COLUMNS[:1] + [("task-agnostic", agnostic_cell)] + COLUMNS[1:]


def make_rows(groups: list[Group], variant: Variant) -> list[Row]:
    """Rows of a table: one per variant, merged across datasets; groups sharing a variant on
    a dataset get separate rows, labelled with the options they differ in."""
    buckets: dict[tuple, list[Group]] = defaultdict(list)
    for g in groups:
        placed = variant(g)
        if placed is not None:
            buckets[g.dataset, placed].append(g)
    rows: dict[tuple, Row] = {}
    for (dataset, (sort_key, label, ref_key)), members in buckets.items():
        for g, detail in zip(members, _details(members)):
            full = _with_detail(label, detail)
            rows.setdefault((sort_key, full), Row(full, ref_key)).groups[dataset] = g
    return [rows[k] for k in sorted(rows)]


def method_variant(g: Group) -> tuple[str, str, str]:
    return g.model, g.model, g.model


def method_table_variant(model: str, spec: PaperTable) -> Variant:
    """A method's own table: its runs, placed by the table's row rule."""
    return lambda g: spec.row(g.protocol) if g.model == model else None


def legend(rows: list[Row], most_seeds: int, columns: list[tuple[str, Cell]]) -> list[str]:
    notes = ["ACC: final Task-IL accuracy (%), mean +- sample std over seeds; MB: memory in MB "
             "(2^20 bytes), mean over seeds; paper: Sun et al., CVPR 2023; diff: ACC - paper; "
             "protocol: how the runs differ from the paper's protocol (ours/paper), 'paper' "
             "where they do not."]
    if any(cell is agnostic_cell for _, cell in columns):
        notes.append("task-agnostic: final accuracy without the task id (Class-IL: the argmax "
                     "over the heads of every task seen), mean +- std; '-' where a run "
                     "predates its measurement.")
    if any(not g.comparable for row in rows for g in row.groups.values()):
        notes.append("diff n/a: the runs' protocol differs from the paper's in more than the "
                     "seed count, so the gap would measure the protocol, not the method.")
    flags = {f for row in rows for g in row.groups.values() for f in g.flags}
    if FEW in flags:
        notes.append(f"[{FEW}]: fewer distinct seeds than the largest group ({most_seeds}).")
    if DUPLICATE in flags:
        notes.append(f"[{DUPLICATE}]: a seed was run more than once.")
    if ONE_CLASS in flags:
        notes.append(f"[{ONE_CLASS}]: in a run's final evaluation a task predicts one class "
                     "for all its test images (docs/experiments.md, 'A task that predicts one "
                     "class').")
    if UNLEARNED in flags:
        notes.append(f"[{UNLEARNED}]: a run scored a task near chance right after learning it "
                     "(docs/experiments.md, 'A task that predicts one class').")
    return notes


def build_tables(groups: list[Group], reference: dict, warnings: list[str]) -> list[Table]:
    """Table 1 always; then each method's own tables (PAPER_TABLES, e.g. BMKP's ablation and
    lambda sweep) that its runs fill (see utils/tables.py)."""
    most = max(len(set(g.seeds)) for g in groups)

    def table(name: str, title: str, header: str, rows: list[Row],
              columns: list[tuple[str, Cell]] = COLUMNS, notes: list[str] = (),
              remarks: list[str] = ()) -> Table:
        return Table(name, title, header, columns, reference[name], rows,
                     legend(rows, most, columns) + list(remarks)
                     + [f"warning: {w}" for w in notes])

    tables = [table("table1", "Table 1: Task-IL accuracy after the last task", "method",
                    make_rows(groups, method_variant), TABLE1_COLUMNS, notes=warnings,
                    remarks=other_predictor_notes(groups))]
    for name, model_cls in model_classes().items():
        for spec in model_cls.PAPER_TABLES:
            variant = method_table_variant(name, spec)
            keys = defaultdict(set)
            for g in groups:
                placed = variant(g)
                if placed is not None:
                    keys[g.dataset].add(placed[0])
            if keys and spec.shown(keys):
                columns = COLUMNS + ([("paper MB", paper_memory_cell)]
                                     if spec.paper_memory_column else [])
                tables.append(table(spec.name, spec.title, spec.row_header,
                                    make_rows(groups, variant), columns))
    return tables


def to_markdown(t: Table) -> str:
    header = [t.row_header] + [f"{d} {name}" for d in t.datasets for name, _ in t.columns]
    lines = [f"## {t.title}", "", "| " + " | ".join(header) + " |",
             "|---" + "|---:" * (len(header) - 1) + "|"]
    lines += ["| " + " | ".join([row.label] + t.cells(row)) + " |" for row in t.rows]
    return "\n".join(lines + [""] + [f"- {note}" for note in t.notes]) + "\n"


LATEX_SPECIAL = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#",
                 "_": r"\_", "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}",
                 "^": r"\textasciicircum{}"}


def latex_text(text: str) -> str:
    escaped = "".join(LATEX_SPECIAL.get(c, c) for c in text)
    return escaped.replace(" +- ", r" $\pm$ ")


def to_latex(t: Table) -> str:
    n = len(t.columns)
    spec = "l" + "".join("|" + "r" * n for _ in t.datasets)
    groups = " & ".join(rf"\multicolumn{{{n}}}{{c}}{{{latex_text(d)}}}" for d in t.datasets)
    names = " & ".join(latex_text(name) for _ in t.datasets for name, _ in t.columns)
    lines = [r"\begin{table}[t]", r"\centering", rf"\caption{{{latex_text(t.title)}}}",
             rf"\begin{{tabular}}{{{spec}}}", r"\hline",
             rf" & {groups} \\", rf"{latex_text(t.row_header)} & {names} \\", r"\hline"]
    lines += [" & ".join(latex_text(c) for c in [row.label] + t.cells(row)) + r" \\"
              for row in t.rows]
    lines += [r"\hline", r"\end{tabular}", r"\par\footnotesize"]
    lines += [latex_text(note) + r"\par" for note in t.notes]
    return "\n".join(lines + [r"\end{table}"]) + "\n"


# ---- long-format CSV -------------------------------------------------------------------------
CSV_COLUMNS = ("model", "dataset", "row", "seed", "file", "task", "accuracy_final",
               "accuracy_when_learned", "task_agnostic_accuracy_final",
               "avg_accuracy_after_task", "memory_mb_after_task", "final_acc",
               "task_agnostic_final_acc", "bwt", "memory_mb")


def csv_rows(groups: list[Group]) -> list[dict]:
    """One row per run and task, for people who plot in their own tools: the task's final
    accuracy and its accuracy right after it was learned, the average accuracy and memory
    after it, and the run's summary (repeated on each of its rows); task-agnostic figures are
    empty for runs made before they were measured."""
    rows = []
    for g in groups:
        for path, run in zip(g.paths, g.runs):
            matrix, memory = run["accuracy_matrix"], run.get("memory_per_task_mb")
            agnostic = run.get("task_agnostic")
            for task in range(len(matrix)):
                rows.append({
                    "model": g.model, "dataset": g.dataset, "row": g.label, "seed": run["seed"],
                    "file": str(path), "task": task + 1,
                    "accuracy_final": matrix[-1][task], "accuracy_when_learned": matrix[task][task],
                    "task_agnostic_accuracy_final":
                        None if agnostic is None else agnostic["accuracy_matrix"][-1][task],
                    "avg_accuracy_after_task": run["avg_accuracy"][task],
                    "memory_mb_after_task": None if memory is None else memory[task],
                    "final_acc": run["final_acc"],
                    "task_agnostic_final_acc": None if agnostic is None else agnostic["final_acc"],
                    "bwt": run["bwt"],
                    "memory_mb": run["memory"]["total_mb"]})
    return rows


def to_csv(rows: list[dict]) -> Callable:
    def write(f) -> None:
        writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    return write


# ---- figures --------------------------------------------------------------------------------
def draw_heatmaps(groups: list[Group], folder: Path) -> int:
    """One accuracy-matrix heatmap per run; returns how many were written."""
    for g in groups:
        for path, run in zip(g.paths, g.runs):
            accuracy_heatmap(run["accuracy_matrix"],
                             f"{g.label}\n{g.dataset}, seed {run['seed']}",
                             folder / f"{g.dataset}_{g.model}_{path.stem}.png")
    return sum(len(g.runs) for g in groups)


def draw_curves(groups: list[Group], img_dir: Path, note: Callable[[str], None]) -> list[Path]:
    """Per dataset, average accuracy and memory after each task (means over seeds, one line
    per table-1 row), and final accuracy against memory (a point per row); returns the figures
    written."""
    by_dataset: dict[str, list[Group]] = defaultdict(list)
    for g in groups:
        by_dataset[g.dataset].append(g)
    styles = method_styles(list(model_classes()), {g.label: g.model for g in groups})
    written = []
    for dataset, members in sorted(by_dataset.items()):
        path = img_dir / f"{dataset}_avg_accuracy.png"
        task_curves({g.label: g.stats["avg_accuracy"] for g in members},
                    f"{dataset}: average Task-IL accuracy on the tasks seen",
                    "average accuracy (%)", path, styles)
        written.append(path)
        with_memory = [g for g in members if g.stats["memory_per_task_mb"] is not None]
        lacking = [g.label for g in members if g.stats["memory_per_task_mb"] is None]
        if lacking:
            note(f"{dataset}: no memory_per_task_mb in the runs of {', '.join(lacking)}; "
                 + ("left out of the memory figure" if with_memory
                    else "memory figure skipped"))
        if with_memory:
            path = img_dir / f"{dataset}_memory.png"
            task_curves({g.label: g.stats["memory_per_task_mb"] for g in with_memory},
                        f"{dataset}: memory after each task", "memory (MB)", path, styles)
            written.append(path)
        path = img_dir / f"{dataset}_acc_vs_memory.png"
        accuracy_memory({g.label: (g.stats["memory_total_mb"]["mean"],
                                   g.stats["final_acc"]["mean"], g.stats["final_acc"]["std"])
                         for g in members},
                        f"{dataset}: accuracy against memory (the paper's Figure 3)", path,
                        styles)
        written.append(path)
    return written


# ---- entry point ----------------------------------------------------------------------------
def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = OneLineErrorParser(prog="utils/report.py",
                                description="Tables (Markdown and LaTeX) and figures from run "
                                            "results, beside the paper's numbers.")
    parser.add_argument("sources", nargs="*", type=Path, default=[Path("result")],
                        metavar="PATH", help="result folders or run JSON files "
                                             "(default: result/)")
    parser.add_argument("--out", type=output_folder, default=Path("result/report"),
                        help="folder for table1.md/.tex, ... (default result/report)")
    parser.add_argument("--img_dir", type=output_folder, default=Path("img"),
                        help="folder for the figures (default img/)")
    parser.add_argument("--heatmaps", type=switch, default=1,
                        help="0: no per-run accuracy-matrix heatmaps (<img_dir>/runs/), only "
                             "the comparison figures")
    parser.add_argument("--reference", type=Path, default=REFERENCE,
                        help="the paper's numbers (default: result/reference/bmkp_paper.json)")
    return parser.parse_args(argv)


def write_text(path: Path, text: str) -> None:
    write_atomic(path, lambda f: f.write(text))


def report(opts: argparse.Namespace, warn: Callable[[str], None],
           note: Callable[[str], None]) -> list[str]:
    """Write the tables and figures; returns a line for each thing written."""
    reference = load_reference(opts.reference)
    groups = group_runs(find_runs(opts.sources, warn))
    for g in groups:
        reference["protocol"].compare(g)
    warnings = (label_groups(groups) + flag_seeds(groups) + flag_single_class(groups)
                + flag_unlearned(groups))
    for w in warnings:
        warn(w)
    written = []
    for t in build_tables(groups, reference, warnings):
        for suffix, render in ((".md", to_markdown), (".tex", to_latex)):
            written.append(opts.out / f"{t.name}{suffix}")
            write_text(written[-1], render(t))
    written.append(opts.out / "runs.csv")
    write_atomic(written[-1], to_csv(csv_rows(groups)))
    written += draw_curves(groups, opts.img_dir, note)
    lines = [f"wrote {path}" for path in written]
    if opts.heatmaps:
        heatmaps = opts.img_dir / "runs"
        count = draw_heatmaps(groups, heatmaps)
        lines.append(f"wrote {count} accuracy-matrix heatmaps (one per run) to {heatmaps}")
    return lines


def main(argv: list[str] | None = None) -> int:
    def warn(text: str) -> None:
        print(f"warning: {text}", file=sys.stderr)

    try:
        written = report(parse(argv), warn, lambda text: print(f"note: {text}"))
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print("\n".join(written))
    return 0


if __name__ == "__main__":
    sys.exit(main())
