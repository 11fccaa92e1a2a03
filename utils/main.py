"""Run one task-incremental experiment: python utils/main.py --model sgd --dataset seq-cifar10"""
from __future__ import annotations

import argparse
import random
import sys
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from backbone import build_backbone  # noqa: E402
from datasets import dataset_classes  # noqa: E402
from models import model_classes  # noqa: E402
from utils.args import parse_args  # noqa: E402
from utils.errors import UserError  # noqa: E402
from utils.results import environment, result_path, write_json_atomic  # noqa: E402
from utils.training import BYTES_PER_MB, TrainingContext, run_tasks  # noqa: E402


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"--device {name!r} is not a device; use auto, cpu or cuda") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for but no CUDA device is available; "
                        "use --device cpu")
    return device


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def run(args: argparse.Namespace, log=print) -> tuple[dict, Path]:
    """Build dataset and model from the options, learn all tasks, write the result JSON."""
    if args.num_threads:
        torch.set_num_threads(args.num_threads)
    device = resolve_device(args.device)
    seed_everything(args.seed)
    dataset = dataset_classes()[args.dataset](args)
    model_cls = model_classes()[args.model]
    model_cls.configure(args, type(dataset))
    net = build_backbone(args, dataset.N_TASKS, dataset.N_CLASSES_PER_TASK, dataset.CHANNELS)
    layout = torch.channels_last if args.channels_last else torch.contiguous_format
    net = net.to(device, memory_format=layout)
    model = model_cls(net, dataset, args).to(device)
    show_progress = not args.quiet and sys.stderr.isatty()
    ctx = TrainingContext(device, args.batch_size, args.eval_batch_size,
                          debug=bool(args.debug_mode), show_progress=show_progress,
                          channels_last=bool(args.channels_last), amp=bool(args.amp))
    started = datetime.now(timezone.utc).isoformat()
    metrics = run_tasks(model, dataset, ctx, log=log)
    breakdown = model.memory_breakdown()
    result = {
        "model": args.model, "dataset": args.dataset, "seed": args.seed,
        "started_at": started, "finished_at": datetime.now(timezone.utc).isoformat(),
        **metrics,
        "memory": {"total_mb": sum(breakdown.values()) / BYTES_PER_MB,
                   "breakdown_mb": {k: v / BYTES_PER_MB for k, v in breakdown.items()},
                   "breakdown_bytes": breakdown},
        "config": vars(args), "environment": environment(device),
    }
    path = result_path(args.results_dir, args.dataset, args.model, args.seed)
    write_json_atomic(result, path)
    return result, path


def main(argv: list[str] | None = None) -> int:
    try:
        args = parse_args(argv)
        log = (lambda *a, **k: None) if args.quiet else print
        result, path = run(args, log)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: no result was written", file=sys.stderr)
        return 130
    bwt = "n/a" if result["bwt"] is None else f"{result['bwt']:.2f}"
    print(f"{args.model} on {args.dataset} (seed {args.seed}): final Task-IL ACC "
          f"{result['final_acc']:.2f}  BWT {bwt}  memory {result['memory']['total_mb']:.2f} MB  "
          f"time {result['total_time_s']:.1f}s -> {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
