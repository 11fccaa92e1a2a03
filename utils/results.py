"""Run results as JSON, written atomically so an interrupted run never leaves half a file."""
from __future__ import annotations

import json
import os
import platform
import tempfile
from datetime import datetime, timezone
from pathlib import Path

import torch


def environment(device: torch.device) -> dict:
    info = {"torch": torch.__version__, "python": platform.python_version(),
            "device": str(device), "num_threads": torch.get_num_threads(),
            "platform": platform.platform()}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def write_json_atomic(payload: dict, path: Path) -> None:
    """Write to a temporary file in the same folder, then rename it into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(payload, f, indent=1, default=str)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def result_path(results_dir: Path, dataset: str, model: str, seed: int) -> Path:
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S-%f")
    return results_dir / dataset / model / f"{stamp}-seed{seed}.json"
