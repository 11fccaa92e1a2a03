"""Run a grid of experiments: python utils/sweep.py CONFIG.json [--jobs N]

CONFIG is a JSON object:
  {"models": ["sgd", "bmkp"], "datasets": ["seq-cifar10"], "seeds": [0, 1, 2],
   "grid": {"lr": [0.05, 0.01]}, "options": {"n_epochs": 5}, "results_dir": "result/sweep"}
Every model x dataset x grid point x seed is one job, a utils/main.py command line with its
own results folder; a job whose folder already holds its result is skipped, so a sweep
interrupted or partly failed is finished by running it again.
"""
from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from utils.args import OneLineErrorParser  # noqa: E402
from utils.args import parse_args as parse_run_options  # noqa: E402
from utils.errors import UserError  # noqa: E402
from utils.validators import non_negative_int, positive_int  # noqa: E402

MAIN = Path(__file__).resolve().parent / "main.py"
CONFIG_KEYS = {"models", "datasets", "seeds", "grid", "options", "results_dir"}


@dataclass(frozen=True)
class Job:
    model: str
    dataset: str
    seed: int
    options: dict
    folder: Path

    def main_argv(self, threads: int) -> list[str]:
        """Its utils/main.py options; `threads` is its --num_threads unless the options set
        one (they come later, so they win)."""
        return ["--model", self.model, "--dataset", self.dataset, "--seed", str(self.seed),
                "--results_dir", str(self.folder), "--quiet", "--num_threads", str(threads),
                *option_args(self.options)]

    def command(self, threads: int) -> list[str]:
        """Its utils/main.py command line."""
        return [sys.executable, str(MAIN), *self.main_argv(threads)]

    def done(self) -> bool:
        """Its result JSON exists (written atomically, so it is complete)."""
        return any(self.folder.rglob(f"*-seed{self.seed}.json"))


def option_args(options: dict) -> list[str]:
    """Command-line words for options: true switches become flags, false ones are left out,
    lists give several values."""
    words: list[str] = []
    for name, value in options.items():
        if value is False:
            continue
        words.append(f"--{name}")
        if isinstance(value, list):
            words += [str(v) for v in value]
        elif value is not True:
            words.append(str(value))
    return words


def job_folder(root: Path, model: str, dataset: str, point: dict, options: dict,
               seed: int) -> Path:
    """A deterministic folder per job: readable grid values plus a hash of all options, so a
    change to the common options never reuses an older result."""
    label = "_".join(f"{k}-{v}" for k, v in sorted(point.items())) or "default"
    digest = hashlib.sha1(json.dumps(options, sort_keys=True).encode()).hexdigest()[:8]
    name = re.sub(r"[^\w.=-]", "_", f"{label}-{digest}")
    return root / dataset / model / name / f"seed{seed}"


def _list_of(config: dict, key: str, kind: type) -> list:
    value = config.get(key)
    if not isinstance(value, list) or not value or not all(isinstance(v, kind) for v in value):
        raise UserError(f"sweep config: '{key}' must be a non-empty list of {kind.__name__}")
    return value


def load_config(path: Path) -> dict:
    try:
        config = json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"sweep config {path} does not exist") from None
    except IsADirectoryError:
        raise UserError(f"sweep config {path} is a folder; give the sweep's JSON file") from None
    except json.JSONDecodeError as exc:
        raise UserError(f"sweep config {path} is not valid JSON: {exc}") from None
    if not isinstance(config, dict):
        raise UserError(f"sweep config {path} must be a JSON object")
    unknown = sorted(set(config) - CONFIG_KEYS)
    if unknown:
        raise UserError(f"sweep config: unknown keys {', '.join(unknown)} "
                        f"(known: {', '.join(sorted(CONFIG_KEYS))})")
    return config


def expand(config: dict, default_root: Path) -> list[Job]:
    """Every model x dataset x grid point x seed of the config, as jobs."""
    models, datasets = _list_of(config, "models", str), _list_of(config, "datasets", str)
    seeds = _list_of(config, "seeds", int)
    grid, common = config.get("grid", {}), config.get("options", {})
    if not isinstance(grid, dict) or not isinstance(common, dict):
        raise UserError("sweep config: 'grid' and 'options' must be objects (option -> value)")
    for name in grid:
        _list_of(grid, name, object)
    reserved = sorted({"model", "dataset", "seed", "seeds", "n_runs", "results_dir"}
                      & (set(grid) | set(common)))
    if reserved:
        raise UserError(f"sweep config: {', '.join(reserved)} are set by the sweep itself; "
                        "use 'models', 'datasets', 'seeds' and 'results_dir'")
    root = Path(config.get("results_dir", default_root))
    names = sorted(grid)
    jobs = []
    for model, dataset, values in itertools.product(models, datasets,
                                                    itertools.product(*(grid[n] for n in names))):
        point = dict(zip(names, values))
        options = {**common, **point}
        for seed in seeds:
            jobs.append(Job(model, dataset, seed, options,
                            job_folder(root, model, dataset, point, options, seed)))
    return jobs


def check_jobs(jobs: list[Job]) -> None:
    """Parse every job's options as utils/main.py will, so that a bad option or value is one
    error before anything runs, not one failed job per grid point."""
    for job in jobs:
        try:
            parse_run_options(job.main_argv(threads=1))
        except UserError as exc:
            raise UserError(f"{job.model} on {job.dataset}, seed {job.seed}: {exc}") from None


def run_job(command: list[str], folder: Path) -> int:
    """Run one job, its output appended to <folder>/log.txt; returns the exit status."""
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "log.txt", "a") as log:
        return subprocess.run(command, stdout=log, stderr=subprocess.STDOUT).returncode


def run_local(jobs: list[Job], args: argparse.Namespace) -> list[int]:
    """--jobs subprocesses at a time on this machine."""
    with ThreadPoolExecutor(args.jobs) as pool:
        return list(pool.map(lambda job: run_job(job.command(args.threads), job.folder), jobs))


def import_submitit():
    """submitit, an optional dependency: only --backend submitit needs it."""
    try:
        import submitit
    except ImportError:
        raise UserError("--backend submitit needs the submitit package: "
                        "pip install submitit") from None
    return submitit


def submitit_parameters(args: argparse.Namespace) -> dict:
    """What each task of the job array asks the cluster for (submitit's update_parameters)."""
    parameters = {"timeout_min": args.timeout_min, "cpus_per_task": args.threads}
    if args.gpus_per_job:
        parameters["gpus_per_node"] = args.gpus_per_job
    if args.slurm_partition:
        parameters["slurm_partition"] = args.slurm_partition
    if args.array_parallelism:
        parameters["slurm_array_parallelism"] = args.array_parallelism
    return parameters


def run_submitit(jobs: list[Job], args: argparse.Namespace) -> list[int]:
    """The sweep's jobs as one submitit job array (one Slurm array on a cluster, or
    `--cluster local` for this machine), each task with --gpus_per_job GPUs."""
    executor = import_submitit().AutoExecutor(folder=args.submitit_dir, cluster=args.cluster)
    executor.update_parameters(**submitit_parameters(args))
    with executor.batch():
        submitted = [executor.submit(run_job, job.command(args.threads), job.folder)
                     for job in jobs]
    return [job.result() for job in submitted]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = OneLineErrorParser(prog="utils/sweep.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", type=Path, help="JSON file describing the sweep")
    parser.add_argument("--jobs", type=positive_int, default=1,
                        help="jobs run at once (local backend)")
    parser.add_argument("--threads", type=positive_int, default=1,
                        help="--num_threads of each job unless the config sets it")
    parser.add_argument("--backend", choices=("local", "submitit"), default="local")
    parser.add_argument("--cluster", choices=("slurm", "local", "debug"), default=None,
                        help="submitit cluster (default: Slurm when available)")
    parser.add_argument("--slurm_partition", default=None)
    parser.add_argument("--timeout_min", type=positive_int, default=60, help="per job (submitit)")
    parser.add_argument("--gpus_per_job", type=non_negative_int, default=0,
                        help="GPUs each job of the array asks for (submitit; default 0)")
    parser.add_argument("--array_parallelism", type=positive_int, default=None,
                        help="most jobs of the array running at once (Slurm; default: the "
                             "cluster's limit)")
    parser.add_argument("--submitit_dir", type=Path, default=Path("result/submitit"),
                        help="submitit's logs and job files")
    parser.add_argument("--dry_run", action="store_true",
                        help="print the commands to run (and, for submitit, what the job array "
                             "asks for)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    try:
        args = parse_args(argv)
        config = load_config(args.config)
        jobs = expand(config, Path("result") / "sweep" / args.config.stem)
        check_jobs(jobs)
        if args.backend == "submitit":
            import_submitit()  # fail before any output
        pending = [job for job in jobs if not job.done()]
        print(f"{len(jobs)} jobs, {len(jobs) - len(pending)} already done, "
              f"{len(pending)} to run")
        if args.dry_run:
            if args.backend == "submitit":
                asked = " ".join(f"{k}={v}" for k, v in submitit_parameters(args).items())
                print(f"one submitit job array of {len(pending)} jobs, each: {asked}")
            print("\n".join(" ".join(job.command(args.threads)) for job in pending))
            return 0
        run_jobs = run_local if args.backend == "local" else run_submitit
        codes = run_jobs(pending, args)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    failed = [job for job, code in zip(pending, codes) if code != 0]
    for job in failed:
        print(f"failed: {job.folder / 'log.txt'}", file=sys.stderr)
    print(f"{len(pending) - len(failed)} jobs finished, {len(failed)} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
