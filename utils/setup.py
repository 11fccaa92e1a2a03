"""Setting up a run: device, CPU threads, seeds, and the dataset and method around a fresh
backbone; shared by the entry points (main, evaluate, benchmark)."""
from __future__ import annotations

import argparse
import os
import random

import numpy as np
import torch

from backbone import build_backbone
from datasets import dataset_classes
from datasets.continual_dataset import SequentialDataset
from models import model_classes
from models.continual_model import ContinualModel
from utils.errors import UserError
from utils.results import native_cpu_bfloat16

# torch's own intra-op thread count, read before any run changes it.
TORCH_DEFAULT_THREADS = torch.get_num_threads()
# Compiled variants of the backbone one task may need under --compile (see prepare_backbone).
COMPILED_VARIANTS_PER_TASK = 8


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"--device {name!r} is not a device; use auto, cpu or cuda") from None
    if device.type not in ("cpu", "cuda"):
        raise UserError(f"--device {name}: this framework runs on CPUs and CUDA GPUs; use auto, "
                        "cpu or cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for but no CUDA device is available; "
                        "use --device cpu")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise UserError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA "
                        f"device(s), cuda:0 to cuda:{torch.cuda.device_count() - 1}")
    return device


def amp_warning(amp: bool, device: torch.device) -> str | None:
    """The line to show when --amp 1 would slow a run down instead of speeding it up."""
    if amp and device.type == "cpu" and not native_cpu_bfloat16():
        return ("warning: --amp 1 on a CPU without hardware bfloat16 (AVX512-BF16 or AMX): "
                "it is emulated, several times slower than float32; drop --amp")
    return None


def thread_counts(requested: int | None, usable_cores: int,
                  torch_default: int) -> tuple[int, int]:
    """(intra-op, inter-op) CPU threads: a request as given; by default torch's choice capped
    at the cores this process may use, since torch may count cores outside its CPU set and
    oversubscribe them. One inter-op thread: the framework runs no inter-op parallel work,
    so a pool per core would only add idle threads to every run sharing the machine."""
    if requested is not None:
        return requested, 1
    return max(1, min(torch_default, usable_cores)), 1


def usable_cores() -> int:
    """The cores this process may run on (its affinity mask where the OS has one)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def set_threads(requested: int | None) -> None:
    """Apply thread_counts() to torch. The inter-op pool is sized once per process; when it
    already runs (an earlier run in this process) it keeps its size."""
    intra, interop = thread_counts(requested, usable_cores(), TORCH_DEFAULT_THREADS)
    torch.set_num_threads(intra)
    if torch.get_num_interop_threads() != interop:
        try:
            torch.set_num_interop_threads(interop)
        except RuntimeError:
            pass


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def set_deterministic(on: bool) -> None:
    """--deterministic: only kernels that give the same bits on every run. cuBLAS needs its
    workspace fixed before its first call, hence the environment variable set here, early."""
    if on:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.backends.cudnn.deterministic = on
    torch.backends.cudnn.benchmark = False
    torch.use_deterministic_algorithms(on)


def build(args: argparse.Namespace,
          device: torch.device) -> tuple[SequentialDataset, ContinualModel]:
    """The dataset and the method around a fresh backbone on `device`, as the options say;
    models/bmkp/evaluate.py rebuilds a saved model exactly the same way."""
    dataset = dataset_classes()[args.dataset](args)
    model_cls = model_classes()[args.model]
    model_cls.configure(args, type(dataset))
    net = prepare_backbone(args, device, dataset)
    return dataset, model_cls(net, dataset, args).to(device)


def prepare_backbone(args: argparse.Namespace, device: torch.device,
                     dataset: SequentialDataset) -> torch.nn.Module:
    """A fresh backbone for `dataset` on `device` in the options' memory layout, compiled with
    --compile; shared with utils/benchmark.py (whose random-data stand-in has the same
    attributes) so its bound runs the very same network.
    Compilation is in place (nn.Module.compile), so state_dict keys, forward hooks and
    functional_call, which methods rely on, see the module as before."""
    net = build_backbone(args, dataset)
    layout = torch.channels_last if args.channels_last else torch.contiguous_format
    net = net.to(device, memory_format=layout)
    if args.compile:
        # Each task id (it picks the head and BatchNorm set), grad mode and method-specific
        # call (functional_call with recomposed weights, hooks) is its own compiled variant;
        # past dynamo's limit it would silently fall back to eager for the later tasks.
        limit = COMPILED_VARIANTS_PER_TASK * dataset.N_TASKS
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, limit)
        net.compile()
    return net
