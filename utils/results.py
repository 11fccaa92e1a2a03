"""Run results as JSON, written atomically so an interrupted run never leaves half a file."""
from __future__ import annotations

import json
import logging
import os
import platform
import subprocess
import tempfile
from contextlib import contextmanager
from datetime import datetime, timezone
from importlib.metadata import version as package_version
from pathlib import Path
from typing import IO, Callable, Iterator

import numpy
import torch


REPO = Path(__file__).resolve().parent.parent


def code_version(repo: Path = REPO) -> dict | None:
    """The checkout's commit and whether tracked files differ from it (None outside a git
    checkout, or without git), so a result says which code produced it."""
    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True,
                              check=True, timeout=30).stdout.strip()
    try:
        commit = git("rev-parse", "HEAD")
        dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.SubprocessError):
        return None
    return {"commit": commit, "dirty": dirty}


def describe_code(code: dict | None) -> str:
    """code_version's answer as a log reads it: the commit, marked when files were modified."""
    if code is None:
        return "not a git checkout"
    return code["commit"] + (" (tracked files modified)" if code["dirty"] else "")


def cpu_description(cpuinfo: Path = Path("/proc/cpuinfo")) -> str:
    """The processor and its core count, e.g. "AMD EPYC (family 23, model 1, 1996 MHz) x 2":
    CPUs sold under one name differ several times in speed, so a time needs the model."""
    fields: dict[str, str] = {}
    try:
        for line in cpuinfo.read_text().splitlines():
            key, _, value = line.partition(":")
            fields.setdefault(key.strip(), value.strip())
    except OSError:  # not Linux: the name the platform gives
        pass
    name = fields.get("model name") or platform.processor() or platform.machine()
    details = [f"{label} {fields[key]}" for key, label in
               (("cpu family", "family"), ("model", "model")) if key in fields]
    if "cpu MHz" in fields:
        details.append(f"{float(fields['cpu MHz']):.0f} MHz")
    described = f"{name} ({', '.join(details)})" if details else name
    return f"{described} x {os.cpu_count()}"


def native_cpu_bfloat16() -> bool:
    """Whether the CPU computes bfloat16 in hardware (AVX512-BF16 or AMX) as oneDNN sees it;
    without it, oneDNN emulates bfloat16, several times slower than float32. True where this
    torch cannot tell."""
    probe = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    return True if probe is None else bool(probe())


def environment(device: torch.device) -> dict:
    """What produced a result: code version, library versions, machine."""
    info = {"code": code_version(), "torch": torch.__version__,
            "torchvision": package_version("torchvision"), "numpy": numpy.__version__,
            "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version(),
            "python": platform.python_version(), "device": str(device),
            "num_threads": torch.get_num_threads(), "platform": platform.platform(),
            "cpu": cpu_description(), "cpu_bfloat16": native_cpu_bfloat16()}
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


def text_log_path(result: Path) -> Path:
    """The run's text log, beside its result: <stem>.log."""
    return result.with_suffix(".log")


@contextmanager
def run_log(path: Path) -> Iterator[logging.Logger]:
    """A logger appending timestamped lines to `path` (a resumed run continues its log),
    written as they come, so a run that is killed still shows what it printed."""
    path.parent.mkdir(parents=True, exist_ok=True)
    logger = logging.getLogger(f"run.{path}")
    logger.setLevel(logging.INFO)
    logger.propagate = False
    handler = logging.FileHandler(path, mode="a", encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
    logger.addHandler(handler)
    try:
        yield logger
    finally:
        logger.removeHandler(handler)
        handler.close()


def aggregate_path(results_dir: Path, dataset: str, model: str) -> Path:
    """Where the statistics over a multi-seed run go, beside its run files."""
    return _stamped(results_dir, dataset, model, "aggregate")
