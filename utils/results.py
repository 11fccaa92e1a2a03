"""Run results as JSON, written atomically so an interrupted run never leaves half a file."""
from __future__ import annotations

import json
import os
import platform
import tempfile
from datetime import datetime, timezone
from pathlib import Path
from typing import IO, Callable

import torch


def environment(device: torch.device) -> dict:
    info = {"torch": torch.__version__, "python": platform.python_version(),
            "device": str(device), "num_threads": torch.get_num_threads(),
            "platform": platform.platform()}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_atomic(path: Path, write: Callable[[IO], None], binary: bool = False) -> None:
    """Call `write` on a temporary file in the same folder, then rename it into place, so an
    interrupted or failed write leaves the previous file (or none), never half of one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb" if binary else "w") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes it owner-only; a result is not
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_json_atomic(payload: dict, path: Path) -> None:
    write_atomic(path, lambda f: json.dump(payload, f, indent=1, default=str))


def _stamped(results_dir: Path, dataset: str, model: str, suffix: str,
             when: datetime | None = None) -> Path:
    stamp = (when or datetime.now(timezone.utc)).strftime("%Y%m%d-%H%M%S-%f")
    return results_dir / dataset / model / f"{stamp}-{suffix}.json"


def result_path(results_dir: Path, dataset: str, model: str, seed: int,
                started_at: str | None = None) -> Path:
    """<results_dir>/<dataset>/<model>/<start time>-seed<seed>.json (now by default): named
    by when the run started, so a resumed run keeps its name and its epoch log."""
    when = datetime.fromisoformat(started_at) if started_at else None
    return _stamped(results_dir, dataset, model, f"seed{seed}", when)


def epoch_log_path(result: Path) -> Path:
    """The run's per-epoch log, beside its result: <stem>.epochs.jsonl."""
    return result.with_suffix(".epochs.jsonl")


def aggregate_path(results_dir: Path, dataset: str, model: str) -> Path:
    """Where the statistics over a multi-seed run go, beside its run files."""
    return _stamped(results_dir, dataset, model, "aggregate")
