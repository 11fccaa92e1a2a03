"""Run one task-incremental experiment: python utils/main.py --model sgd --dataset seq-cifar10

With --seeds S1 S2 ... or --n_runs K it is repeated once per seed, and the statistics over the
runs are written beside them as <time>-aggregate.json.
"""
from __future__ import annotations

import argparse
import sys
from contextlib import ExitStack, closing
from datetime import datetime, timezone
from functools import partial
from pathlib import Path


sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from models.continual_model import ContinualModel  # noqa: E402
from utils.aggregate import aggregate_runs, shared_config  # noqa: E402
from utils.args import parse_args  # noqa: E402
from utils.checkpoint import checkpoint_path, load_checkpoint, save_checkpoint  # noqa: E402
from utils.errors import UserError  # noqa: E402
from utils.results import (aggregate_path, describe_code, environment, epoch_log_path,  # noqa: E402
                           result_path, run_log, text_log_path, write_json_atomic)
from utils.context import TrainingContext  # noqa: E402
from utils.setup import (amp_warning, build, resolve_device, seed_everything,  # noqa: E402
                         set_deterministic, set_threads)
from utils.sizes import BYTES_PER_MB  # noqa: E402
from utils.tensorboard_events import TensorBoardEvents, tensorboard_dir  # noqa: E402
from utils.training import BUDGET_EXIT, BudgetReached, run_tasks  # noqa: E402

def run(args: argparse.Namespace, log=print) -> tuple[dict, Path]:
    """Build dataset and model from the options, learn all tasks (logging every epoch to
    <result>.epochs.jsonl and every line `log` shows, timestamped, to <result>.log as it
    goes, and with --tensorboard the same events to <result>.tensorboard/), write the result
    JSON, then let the method export what it keeps (e.g. BMKP's --save_memory)."""
    set_threads(args.num_threads)
    set_deterministic(bool(args.deterministic))
    device = resolve_device(args.device)
    # Read now: the code this process loaded, whatever is checked out when it finishes.
    machine = environment(device)
    seed_everything(args.seed)
    dataset, model = build(args, device)
    show_progress = not args.quiet and sys.stderr.isatty()
    ctx = TrainingContext.from_args(args, device, show_progress)
    started, progress, after_task = datetime.now(timezone.utc).isoformat(), None, None
    checkpoint = None if args.checkpoint_dir is None else checkpoint_path(args)
    if checkpoint is not None and args.resume:
        progress, started = load_checkpoint(checkpoint, args, model, ctx)
    path = result_path(args.results_dir, args.dataset, args.model, args.seed, started)
    ctx.epoch_log = epoch_log_path(path)
    with ExitStack() as logs:
        if args.tensorboard:  # first: a missing package fails before any file is made
            events = logs.enter_context(closing(TensorBoardEvents(tensorboard_dir(path))))
            ctx.listeners.append(events)
        logger = logs.enter_context(run_log(text_log_path(path)))

        def log_both(line: str) -> None:
            logger.info(line)
            log(line)

        logger.info("options: " + " ".join(f"{k}={v}" for k, v in vars(args).items()))
        logger.info(f"code: {describe_code(machine['code'])}")
        warning = amp_warning(ctx.amp, device)
        if warning is not None:
            log_both(warning)
        if checkpoint is not None:
            if progress is not None:
                log_both(f"resuming from {checkpoint} at task {progress.next_task + 1}")
            after_task = partial(save_checkpoint, checkpoint, args, model, ctx,
                                 started_at=started)
        metrics = run_tasks(model, dataset, ctx, log=log_both, progress=progress,
                            after_task=after_task, budget_s=args.budget_s)
        result = result_json(args, started, metrics, model, machine)
        write_json_atomic(result, path)
        logger.info(run_summary(result, path))
    model.export()
    return result, path


def result_json(args: argparse.Namespace, started: str, metrics: dict, model: ContinualModel,
                machine: dict) -> dict:
    """The run's result: who ran what, the metrics, the memory by part, the method's own
    details, the options and the environment (`machine`, read when the run, or the
    resumed part of it, started)."""
    breakdown = model.memory_breakdown()
    return {
        "model": args.model, "dataset": args.dataset, "seed": args.seed,
        "started_at": started, "finished_at": datetime.now(timezone.utc).isoformat(),
        **metrics,
        "memory": {"total_mb": sum(breakdown.values()) / BYTES_PER_MB,
                   "breakdown_mb": {k: v / BYTES_PER_MB for k, v in breakdown.items()},
                   "breakdown_bytes": breakdown},
        "method": model.result_details(),
        "config": vars(args), "environment": machine,
    }


def seeds_to_run(args: argparse.Namespace) -> list[int] | None:
    """The seeds of a multi-seed command (--seeds, or 0..K-1 for --n_runs K); None for one run."""
    if args.n_runs is not None:
        return list(range(args.n_runs))
    if args.seeds is not None and len(set(args.seeds)) < len(args.seeds):
        repeated = sorted({s for s in args.seeds if args.seeds.count(s) > 1})
        raise UserError(f"--seeds repeats {', '.join(map(str, repeated))}; give each seed once "
                        "(a repeated seed reruns the same experiment)")
    return args.seeds


def run_seeds(args: argparse.Namespace, seeds: list[int], log=print) -> tuple[dict, Path]:
    """One run per seed, each writing its own JSON, then the aggregate JSON over them."""
    results, paths = [], []
    for seed in seeds:
        run_args = argparse.Namespace(**vars(args))  # run() settles options in place
        run_args.seed = seed
        result, path = run(run_args, log)
        print(run_summary(result, path))
        results.append(result)
        paths.append(path)
    aggregate = {"model": args.model, "dataset": args.dataset,
                 "runs": [str(p) for p in paths], **aggregate_runs(results),
                 "config": shared_config([r["config"] for r in results])}
    path = aggregate_path(args.results_dir, args.dataset, args.model)
    write_json_atomic(aggregate, path)
    return aggregate, path


def run_summary(result: dict, path: Path) -> str:
    """The line a finished run prints, so a log shows each result and where it went."""
    bwt = "n/a" if result["bwt"] is None else f"{result['bwt']:.2f}"
    return (f"{result['model']} on {result['dataset']} (seed {result['seed']}): final Task-IL "
            f"ACC {result['final_acc']:.2f}  task-agnostic ACC "
            f"{result['task_agnostic']['final_acc']:.2f}  BWT {bwt}  memory "
            f"{result['memory']['total_mb']:.2f} MB  time {result['total_time_s']:.1f}s -> {path}")


def aggregate_summary(aggregate: dict, path: Path) -> str:
    """The closing line of a multi-seed command: ACC mean +- std over its seeds."""
    acc, bwt = aggregate["final_acc"], aggregate["bwt"]
    agnostic = aggregate["task_agnostic_final_acc"]
    bwt_text = "n/a" if bwt is None else f"{bwt['mean']:.2f} +- {bwt['std']:.2f}"
    return (f"{aggregate['model']} on {aggregate['dataset']}: final Task-IL ACC "
            f"{acc['mean']:.2f} +- {acc['std']:.2f} over {aggregate['n_runs']} seeds  "
            f"task-agnostic ACC {agnostic['mean']:.2f} +- {agnostic['std']:.2f}  "
            f"BWT {bwt_text}  memory {aggregate['memory_total_mb']['mean']:.2f} MB -> {path}")


def main(argv: list[str] | None = None) -> int:
    seeds, args = None, None
    try:
        args = parse_args(argv)
        if args.budget_s is not None and args.checkpoint_dir is None:
            raise UserError("--budget_s needs --checkpoint_dir, where the stopped run is "
                            "continued from with --resume")
        if args.budget_s is not None and (args.seeds or args.n_runs):
            raise UserError("--budget_s bounds one run; for several seeds use "
                            "utils/reproduce.py --budget_s, or one command per seed")
        log = (lambda *a, **k: None) if args.quiet else print
        seeds = seeds_to_run(args)
        if seeds is None:
            summary = run_summary(*run(args, log))
        else:
            summary = aggregate_summary(*run_seeds(args, seeds, log))
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except BudgetReached as stop:
        print(f"stopped by --budget_s after task {stop.tasks_done}: no result yet; rerun the "
              "same command with --resume to continue", file=sys.stderr)
        return BUDGET_EXIT
    except KeyboardInterrupt:
        more = "" if seeds is None else (" by the run in progress, nor an aggregate; the "
                                         "finished runs keep their files")
        if args is not None and args.checkpoint_dir is not None:
            more += "; rerun with --resume to continue from the last finished task"
        print(f"interrupted: no result was written{more}", file=sys.stderr)
        return 130
    print(summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
