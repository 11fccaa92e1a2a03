"""Evaluate a saved long-term memory:
python models/bmkp/evaluate.py --memory FILE --dataset NAME

Rebuilds the backbone the run used, puts the method's model around it with the saved memory
loaded, and scores every stored task on the test set. The working memory's own weights are a
fresh random initialisation and play no part: each stored task is predicted from the memory
alone (its recomposed conv weights, its BatchNorm set and its head). A task whose predictions
all fall on one class gets the run's warning line (docs/experiments.md, 'A task that predicts
one class').
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))


from datasets import dataset_classes  # noqa: E402
from models.bmkp.memory_file import load_memory  # noqa: E402
from utils.args import OneLineErrorParser, parse_args  # noqa: E402
from utils.context import TrainingContext  # noqa: E402
from utils.errors import UserError  # noqa: E402
from utils.setup import build, resolve_device, seed_everything  # noqa: E402
from utils.training import (Accuracies, evaluate_and_diagnose,  # noqa: E402
                            single_class_warning)


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = OneLineErrorParser(prog="models/bmkp/evaluate.py",
                                description="Evaluate every task stored in a saved long-term "
                                            "memory (utils/main.py --model bmkp ... "
                                            "--save_memory FILE).")
    parser.add_argument("--memory", type=Path, required=True, metavar="FILE")
    parser.add_argument("--dataset", required=True, choices=list(dataset_classes()),
                        metavar="DATASET", help="the benchmark the memory was learned on")
    parser.add_argument("--data_path", type=Path, default=Path("data"))
    parser.add_argument("--device", default="auto", help="auto (cuda if available), cpu, ...")
    return parser.parse_args(argv)


def evaluate_memory(path: Path, dataset_name: str, data_path: Path,
                    device_name: str) -> tuple[Accuracies, list[dict]]:
    """Task-IL and task-agnostic accuracy (%) of every stored task, evaluated as the run that
    saved it did, and the diagnosis of any task that predicts one class (as the run logs it)."""
    device = resolve_device(device_name)
    saved = load_memory(path, device)
    if saved["dataset"] != dataset_name:
        raise UserError(f"{path} holds a memory learned on {saved['dataset']}, not "
                        f"{dataset_name}; pass --dataset {saved['dataset']}")
    options = [f"--{key}={value}" for key, value in saved["args"].items() if value is not None]
    args = parse_args(["--model", saved["model"], "--dataset", dataset_name,
                       "--data_path", str(data_path), "--device", device_name, *options])
    seed_everything(args.seed)
    dataset, model = build(args, device)
    shapes = {name: list(shape) for name, shape in model.memory.layer_shapes.items()}
    if saved["memory"]["layer_shapes"] != shapes:
        raise UserError(f"{path} does not fit the backbone its options describe; "
                        "it was not written by this version of utils/main.py --save_memory")
    model.memory.load_state_dict(saved["memory"])
    if model.memory.n_tasks == 0:
        raise UserError(f"{path} holds no task; save the memory of a run that learned one")
    ctx = TrainingContext.from_args(args, device)
    return evaluate_and_diagnose(model, dataset, model.memory.n_tasks - 1, ctx)


def main(argv: list[str] | None = None) -> int:
    try:
        opts = parse(argv)
        accuracies, single_class = evaluate_memory(opts.memory, opts.dataset, opts.data_path,
                                                   opts.device)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    task_il, agnostic = accuracies.task_il, accuracies.task_agnostic
    print(f"{opts.memory}: {len(task_il)} tasks of {opts.dataset}, accuracy with the task id "
          "(Task-IL) and without it (task-agnostic)")
    for task, (own, anywhere) in enumerate(zip(task_il, agnostic)):
        print(f"task {task + 1}: {own:.2f}  {anywhere:.2f}")
    print(f"average: {sum(task_il) / len(task_il):.2f}  {sum(agnostic) / len(agnostic):.2f}")
    for event in single_class:
        print(single_class_warning(event, len(task_il)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
