"""Run the BMKP paper's experiments and tabulate them:

    python utils/reproduce.py --table 1 [2 3 4] [--datasets ...] [--seeds ...] [--jobs N]
                              [--models M ...] [--budget_s S] [--dry_run]
                              [-- utils/main.py options for every job]

    --table 1  BMKP on seq-cifar10, seq-cifar100 and seq-tinyimg (Table 1's BMKP row); with
               --models, other methods' rows too (`table1`: every method of the paper's
               Table 1 this framework has)
    --table 2  the ablations beside full BMKP: --no_basis_update, --retrain_epochs 0
    --table 3  lambda in 0, 1, 10, 100, 1000 on seq-tinyimg
    --table 4  --threshold (later tasks' retained energy) in 0.95-0.98 on seq-cifar100 and
               seq-tinyimg

Every run is a utils/main.py job (utils/sweep.py's Job) with --model_config best where the
method has one for the dataset, seeds 0-4 by default, its own folder under --results_dir and a
checkpoint after every task. --budget_s N stops every job between tasks, checkpointed, before
N seconds from now; the same command later resumes the unfinished jobs and skips the finished
ones, so a cut-off device window loses at most the task in progress. --jobs N runs N jobs at
once (one CPU thread each by default; on a GPU they share it, through CUDA MPS when its
control daemon is available). The command ends with utils/report.py on everything under
--results_dir, so a partial run gives a partial table with the seed counts shown.
"""
from __future__ import annotations

import argparse
import dataclasses
import itertools
import math
import shutil
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Sequence

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from datasets import dataset_classes  # noqa: E402
from models import model_classes  # noqa: E402
from utils import benchmark, report  # noqa: E402
from utils.args import OneLineErrorParser, parse_args  # noqa: E402
from utils.context import DEBUG_BATCHES  # noqa: E402
from utils.errors import UserError  # noqa: E402
from utils.sweep import Job, check_jobs, job_folder, run_job  # noqa: E402
from utils.training import BUDGET_EXIT  # noqa: E402
from utils.validators import (output_folder, positive_float, positive_int,  # noqa: E402
                              random_seed)

PAPER_DATASETS = ("seq-cifar10", "seq-cifar100", "seq-tinyimg")
# Per table: its datasets and its variants (options beside the table's common ones).
TABLES = {
    1: (PAPER_DATASETS, [{}]),
    2: (PAPER_DATASETS, [{}, {"no_basis_update": True}, {"retrain_epochs": 0}]),
    3: (("seq-tinyimg",), [{"lambd": lam} for lam in (0, 1, 10, 100, 1000)]),
    4: (("seq-cifar100", "seq-tinyimg"),
        [{"threshold": level} for level in (0.95, 0.96, 0.97, 0.98)]),
}
# Seconds a job needs beyond its last task to write its result; it is given its remaining
# budget less this, and no job starts with less than twice this left.
FINISH_MARGIN_S = 20.0
STEPS_TO_TIME = 5  # training steps timed per method and dataset for --dry_run's estimate
ALL_OF_TABLE_1 = "table1"  # --models: every method of the paper's Table 1 registered here


def table1_models() -> list[str]:
    """The registered methods that have a row in the paper's Table 1, in its order."""
    return [m for m in report.load_reference(report.REFERENCE)["table1"] if m in model_classes()]


def chosen_models(names: list[str], tables: list[int]) -> list[str]:
    """--models with `table1` expanded, each once; methods beside BMKP only in Table 1,
    since Tables 2-4 are BMKP's ablations and sweeps."""
    models = list(dict.fromkeys(
        m for name in names for m in (table1_models() if name == ALL_OF_TABLE_1 else [name])))
    others = [m for m in models if m != "bmkp"]
    if others and set(tables) != {1}:
        raise UserError(f"--models {' '.join(others)}: Tables 2-4 are BMKP's own experiments; "
                        "run other methods with --table 1 alone")
    return models


def plan(tables: list[int], datasets: list[str] | None, seeds: list[int], compat: str,
         extra: dict, root: Path, models: Sequence[str] = ("bmkp",)) -> list[Job]:
    """The jobs of the tables asked for, each once (Table 2's full runs are Table 1's); BMKP's
    jobs take --compat, every method its --model_config best where it has one."""
    jobs: dict[Path, Job] = {}
    for table in tables:
        table_datasets, variants = TABLES[table]
        for dataset, model in itertools.product(datasets or table_datasets, models):
            best = ({"model_config": "best"} if dataset in model_classes()[model].BEST_CONFIGS
                    else {})
            own = {"compat": compat} if model == "bmkp" else {}
            for variant in variants:
                options = {**best, **own, **variant, **extra}
                for seed in seeds:
                    folder = job_folder(root, model, dataset, variant, options, seed)
                    jobs.setdefault(folder, Job(model, dataset, seed, options, folder))
    return list(jobs.values())


def checkpoint_dir(job: Job) -> Path:
    return job.folder / "checkpoint"


def has_checkpoint(job: Job) -> bool:
    return any(checkpoint_dir(job).glob("*.pt"))


def launch(job: Job, threads: int, budget_s: float | None) -> int:
    """Run (or resume) one job; its exit status (BUDGET_EXIT when stopped by the budget)."""
    control = {"checkpoint_dir": str(checkpoint_dir(job)), "resume": has_checkpoint(job)}
    if budget_s is not None:
        control["budget_s"] = budget_s
    launched = dataclasses.replace(job, options={**job.options, **control})
    return run_job(launched.command(threads), job.folder)


def run_jobs(jobs: list[Job], n_parallel: int, threads: int,
             budget_s: float | None, log=print) -> dict[str, list[Job]]:
    """Run the jobs, n_parallel at a time, within the budget; returns them by outcome."""
    deadline = None if budget_s is None else time.monotonic() + budget_s
    outcome: dict[str, list[Job]] = {"done": [], "stopped": [], "not started": [],
                                     "failed": []}
    lock = threading.Lock()

    def one(job: Job) -> None:
        left = None if deadline is None else deadline - time.monotonic() - FINISH_MARGIN_S
        if left is not None and left < FINISH_MARGIN_S:
            kind = "not started"
        else:
            code = launch(job, threads, left)
            kind = {0: "done", BUDGET_EXIT: "stopped"}.get(code, "failed")
        with lock:
            outcome[kind].append(job)
            log(f"{kind}: {job.dataset} seed {job.seed} {job.folder}")

    with ThreadPoolExecutor(n_parallel) as pool:
        list(pool.map(one, jobs))
    return outcome


def start_mps(log=print) -> None:
    """Let several processes share one GPU through CUDA MPS when its daemon can be started;
    say whether it was."""
    control = shutil.which("nvidia-cuda-mps-control")
    if control is None:
        log("CUDA MPS: not available (no nvidia-cuda-mps-control); jobs share the GPU by "
            "time-slicing")
        return
    started = subprocess.run([control, "-d"], capture_output=True, text=True)
    why = (started.stderr or started.stdout).strip() or f"exit {started.returncode}"
    log("CUDA MPS: daemon started" if started.returncode == 0 else
        f"CUDA MPS: not started ({why}); it may already be running")


def job_args(job: Job, threads: int) -> argparse.Namespace:
    """The job's options as utils/main.py settles them."""
    return parse_args(job.main_argv(threads))


def estimate_s(job: Job, seconds_per_step: float) -> float:
    """Training time of one job at the measured step time: epochs x batches x tasks."""
    args = job_args(job, 1)
    dataset = dataset_classes()[job.dataset]
    images = dataset.TRAIN_PER_CLASS * dataset.N_CLASSES_PER_TASK
    epochs = args.n_epochs + (getattr(args, "retrain_epochs", 0) or 0)
    batches = math.ceil(images / args.batch_size)
    if args.debug_mode:
        batches = min(batches, DEBUG_BATCHES)
    return dataset.N_TASKS * epochs * batches * seconds_per_step


def dry_run(jobs: list[Job], n_parallel: int, threads: int, log=print) -> None:
    """Print the plan and its time at a step time measured here, per method and dataset
    (the method's own training step: replay, distillation and the like included; its
    end-of-task work and joint's growing data not)."""
    step_s: dict[tuple[str, str], float] = {}
    total = 0.0
    for job in jobs:
        key = (job.model, job.dataset)
        if key not in step_s:
            dataset = dataset_classes()[job.dataset]
            images = dataset.TRAIN_PER_CLASS * dataset.N_CLASSES_PER_TASK
            speed = benchmark.measure(job_args(job, threads), STEPS_TO_TIME, real=False,
                                      task_images=images)
            step_s[key] = speed["train_ms_per_batch"] / 1000
            log(f"{job.model} on {job.dataset}: {speed['train_ms_per_batch']:.1f} ms per "
                "training step measured here, on random images of its shape")
        state = "done" if job.done() else "resumable" if has_checkpoint(job) else "to run"
        seconds = 0.0 if job.done() else estimate_s(job, step_s[key])
        total += seconds
        log(f"{state:9s} {seconds / 60:8.1f} min  {' '.join(job.command(threads))}")
    log(f"{len(jobs)} jobs; about {total / 60 / n_parallel:.1f} min with {n_parallel} at "
        "once, if they do not slow each other down (resumable jobs counted in full)")


def job_options(words: list[str]) -> dict:
    """utils/main.py options given after `--`, as a job's option dict (flags become True)."""
    options: dict = {}
    for i, word in enumerate(words):
        if word.startswith("--"):
            value = words[i + 1] if i + 1 < len(words) and not words[i + 1].startswith("--") \
                else True
            options[word[2:]] = value
        elif i == 0 or not words[i - 1].startswith("--"):
            raise UserError(f"{word!r} after -- is not an option; give utils/main.py options "
                            "as --name value")
    reserved = sorted({"model", "dataset", "seed", "seeds", "n_runs", "results_dir",
                       "checkpoint_dir", "resume", "budget_s"} & set(options))
    if reserved:
        raise UserError(f"--{', --'.join(reserved)} after -- are set by utils/reproduce.py "
                        "itself; drop them")
    return options


def parse(argv: list[str] | None) -> tuple[argparse.Namespace, dict]:
    parser = OneLineErrorParser(prog="utils/reproduce.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--table", type=int, choices=sorted(TABLES), nargs="+", required=True)
    parser.add_argument("--datasets", nargs="+", choices=list(dataset_classes()),
                        default=None, help="instead of the tables' own datasets")
    parser.add_argument("--seeds", type=random_seed, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--models", nargs="+", default=["bmkp"],
                        choices=[*model_classes(), ALL_OF_TABLE_1],
                        help="methods to run (Table 1 only; table1: every method of the "
                             "paper's Table 1 registered here)")
    parser.add_argument("--compat", choices=("paper", "official"), default="paper",
                        help="BMKP's --compat")
    parser.add_argument("--results_dir", type=output_folder, default=Path("result/reproduce"))
    parser.add_argument("--jobs", type=positive_int, default=1, help="jobs run at once")
    parser.add_argument("--threads", type=positive_int, default=1, help="CPU threads per job")
    parser.add_argument("--budget_s", type=positive_float, default=None,
                        help="stop every job, checkpointed, before this many seconds")
    parser.add_argument("--device", default="auto", help="the jobs' --device")
    parser.add_argument("--data_path", type=Path, default=None, help="the jobs' --data_path")
    parser.add_argument("--debug_mode", type=int, choices=(0, 1), default=0,
                        help="1: five batches per epoch and evaluation (a smoke run)")
    parser.add_argument("--dry_run", action="store_true",
                        help="print the jobs and their estimated time, run nothing")
    argv = sys.argv[1:] if argv is None else list(argv)
    split = argv.index("--") if "--" in argv else len(argv)
    return parser.parse_args(argv[:split]), job_options(argv[split + 1:])


def main(argv: list[str] | None = None) -> int:
    try:
        opts, passed = parse(argv)
        extra = {"device": opts.device, "debug_mode": opts.debug_mode, **passed}
        if opts.data_path is not None:
            extra["data_path"] = str(opts.data_path)
        models = chosen_models(opts.models, opts.table)
        jobs = plan(opts.table, opts.datasets, opts.seeds, opts.compat, extra, opts.results_dir,
                    models)
        check_jobs(jobs)
        pending = [job for job in jobs if not job.done()]
        resumable = sum(map(has_checkpoint, pending))
        print(f"{len(jobs)} jobs, {len(jobs) - len(pending)} done, {resumable} resumable, "
              f"{len(pending) - resumable} to start")
        if opts.dry_run:
            dry_run(jobs, opts.jobs, opts.threads)
            return 0
        if opts.jobs > 1 and opts.device != "cpu":
            start_mps()
        outcome = run_jobs(pending, opts.jobs, opts.threads, opts.budget_s)
        for job in outcome["failed"]:
            print(f"failed: {job.folder / 'log.txt'}", file=sys.stderr)
        print(", ".join(f"{len(v)} {k}" for k, v in outcome.items()))
        if any(job.done() for job in jobs):
            report.main([str(opts.results_dir), "--out", str(opts.results_dir / "report"),
                         "--img_dir", str(opts.results_dir / "report" / "img")])
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if outcome["failed"]:
        return 1
    return BUDGET_EXIT if outcome["stopped"] or outcome["not started"] else 0


if __name__ == "__main__":
    sys.exit(main())
