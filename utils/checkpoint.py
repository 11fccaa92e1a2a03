"""Checkpoints after each task (--checkpoint_dir) and resuming from them (--resume).

A checkpoint holds everything the rest of the run depends on: the method's state, the loop's
progress, the phase times and the random number generators, so a resumed run gives the same
accuracy matrix as one never interrupted (on CPU).
"""
from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

import numpy as np
import torch

from models.continual_model import ContinualModel
from utils.aggregate import differing_keys, protocol
from utils.context import TrainingContext
from utils.errors import UserError
from utils.results import write_atomic
from utils.training import Progress


def checkpoint_path(args: argparse.Namespace) -> Path:
    """One file per model, dataset and seed, so each run of a multi-seed command has its own."""
    return Path(args.checkpoint_dir) / f"{args.dataset}-{args.model}-seed{args.seed}.pt"


def _protocol(args: argparse.Namespace) -> dict:
    """The options that define the experiment, as plain JSON values (paths become strings)."""
    return json.loads(json.dumps(protocol(vars(args)), default=str))


def _rng_state() -> dict:
    numpy_state = np.random.get_state(legacy=False)
    numpy_state["state"]["key"] = numpy_state["state"]["key"].tolist()
    return {"torch": torch.get_rng_state(), "numpy": numpy_state, "python": random.getstate(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"].cpu())
    numpy_state = state["numpy"]
    numpy_state["state"]["key"] = np.array(numpy_state["state"]["key"], dtype=np.uint32)
    np.random.set_state(numpy_state)
    random.setstate(state["python"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])


def save_checkpoint(path: Path, args: argparse.Namespace, model: ContinualModel,
                    ctx: TrainingContext, progress: Progress, started_at: str) -> None:
    """Write the state after the last evaluated task, atomically (a kill while writing keeps
    the previous checkpoint)."""
    state = {"protocol": _protocol(args), "next_task": progress.next_task,
             "matrix": progress.matrix, "agnostic_matrix": progress.agnostic_matrix,
             "memory_mb": progress.memory_mb,
             "elapsed_s": progress.elapsed_s, "single_class": progress.single_class,
             "unlearned": progress.unlearned, "other_matrices": progress.other_matrices,
             "phase_times": ctx.phase_times,
             "started_at": started_at, "model": model.checkpoint_state(), "rng": _rng_state()}
    write_atomic(path, lambda f: torch.save(state, f), binary=True)


def load_checkpoint(path: Path, args: argparse.Namespace, model: ContinualModel,
                    ctx: TrainingContext, reader: str = "--resume",
                    fix: str = "drop --resume to start again") -> tuple[Progress, str]:
    """Restore model, phase times and RNGs from `path`; returns the progress and the time the
    interrupted run started. A checkpoint that is missing or does not fit `args` is an error
    naming `reader` (who reads it) and ending in `fix`."""
    if not path.is_file():
        raise UserError(f"{reader}: no checkpoint {path}; {fix}")
    state = torch.load(path, map_location=ctx.device, weights_only=True)
    # protocol() fills in the options added since the checkpoint was written, at the value
    # that reproduces what ran before them, so an older checkpoint still resumes.
    differing = differing_keys([protocol(state["protocol"]), _protocol(args)])
    if differing:
        raise UserError(f"{reader}: {path} was made with other options "
                        f"({', '.join(differing)}); use the same options or {fix}")
    if "agnostic_matrix" not in state:
        raise UserError(f"{reader}: {path} was written before task-agnostic accuracy was "
                        f"measured; {fix}")
    model.load_checkpoint_state(state["model"])
    ctx.phase_times = state["phase_times"]
    _set_rng_state(state["rng"])
    # Checkpoints written before the single-class and unlearned-task checks carry no
    # findings for their tasks, nor, before other_predictors, those networks' rows.
    progress = Progress(state["matrix"], state["agnostic_matrix"], state["memory_mb"],
                        state["elapsed_s"], state.get("single_class", []),
                        state.get("unlearned", []), state.get("other_matrices", {}))
    return progress, state["started_at"]
