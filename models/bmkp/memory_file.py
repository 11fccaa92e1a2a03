"""The long-term memory file: written by BMKP's `--save_memory`, read by models/bmkp/evaluate.py.

Besides the memory's state it keeps the options needed to rebuild a working memory of the same
shape (backbone, width, BatchNorm kind, layout) and to evaluate the stored tasks as the run did:
the same test split (seed, class order, validation share) and the same evaluation (batch size,
which matters for BatchNorm with batch statistics, and bf16 autocast).
"""
from __future__ import annotations

import argparse
import pickle
from pathlib import Path

import torch
import torch.nn as nn

from utils.errors import UserError
from utils.results import write_atomic

FORMAT = "long-term-memory/1"
SAVED_OPTIONS = ("backbone", "nf", "shortcut", "head_bias", "per_task_bn", "bn_running_stats",
                 "channels_last", "eval_batch_size", "amp", "seed", "class_order_seed",
                 "validation", "normalize_inputs")


def per_seed_path(path: Path, seed: int) -> Path:
    """FILE.pt -> FILE-seed<seed>.pt, so the runs of a multi-seed command keep one file each."""
    return path.with_name(f"{path.stem}-seed{seed}{path.suffix}")


def save_memory(model: nn.Module, args: argparse.Namespace, path: Path) -> None:
    payload = {"format": FORMAT, "model": args.model, "dataset": args.dataset,
               "args": {key: getattr(args, key, None) for key in SAVED_OPTIONS},
               "memory": model.memory.state_dict()}
    write_atomic(path, lambda f: torch.save(payload, f), binary=True)


def load_memory(path: Path, device: torch.device) -> dict:
    """The saved payload, tensors on `device`; a UserError for anything but such a file."""
    if not path.is_file():
        raise UserError(f"memory file {path} does not exist; write one with "
                        "utils/main.py --model bmkp ... --save_memory FILE")
    try:
        payload = torch.load(path, map_location=device, weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as exc:
        raise UserError(f"{path} is not a memory file written by --save_memory "
                        f"({type(exc).__name__}); pass the file utils/main.py wrote") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise UserError(f"{path} is not a memory file written by --save_memory; "
                        "pass the file utils/main.py wrote")
    return payload
