"""The speed options: thread counts, and the fast path leaving results as they were.

Channels-last changes only the memory layout, but its kernels sum in another order, so its
results can differ in the last bits: evaluation must agree to 1e-4 in the logits and exactly
in accuracy. Training drifts faster: on CPU the whole network's channels-last gradients are
off by up to ~1e-2 relative to float64 (contiguous: ~1e-6), so only the first two steps'
losses, the forward and one update, are compared tightly. Options that change no arithmetic
(the same seed and options, run again) must give identical results.
"""
from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from datasets.continual_dataset import SequentialDataset, to_model_input
from models.continual_model import ContinualModel
from utils.context import TrainingContext
from utils.main import run
from utils.setup import amp_warning, build, seed_everything, thread_counts
from utils.training import evaluate, run_tasks

REPO = Path(__file__).resolve().parent.parent
CPU = torch.device("cpu")
LAYOUTS = {1: torch.channels_last, 0: torch.contiguous_format}


@pytest.mark.parametrize("requested, cores, torch_default, expected", [
    (None, 2, 2, (2, 1)),    # torch's choice when it fits the cores
    (None, 1, 16, (1, 1)),   # torch counted the machine; the process may use one core
    (None, 8, 4, (4, 1)),    # OMP_NUM_THREADS=4 lowered torch's choice: kept
    (3, 1, 16, (3, 1)),      # an explicit request is taken as given
])
def test_thread_counts(requested, cores, torch_default, expected):
    assert thread_counts(requested, cores, torch_default) == expected


def context(args: argparse.Namespace) -> TrainingContext:
    return TrainingContext(CPU, args.batch_size, args.eval_batch_size, show_progress=False,
                           channels_last=bool(args.channels_last))


def train(args: argparse.Namespace) -> tuple[ContinualModel, SequentialDataset, dict,
                                            list[float]]:
    """Learn every task as utils/main.py's run() does; also returns each step's loss."""
    seed_everything(args.seed)
    dataset, model = build(args, CPU)
    losses: list[float] = []
    step = model.observe

    def recording_step(x: torch.Tensor, y: torch.Tensor, task: int) -> torch.Tensor:
        loss = step(x, y, task)
        losses.append(loss.item())
        return loss

    model.observe = recording_step
    metrics = run_tasks(model, dataset, context(args), log=lambda *a: None)
    return model, dataset, metrics, losses


@pytest.mark.slow
def test_channels_last_evaluates_trained_weights_alike(synthetic_args):
    args = synthetic_args("--channels_last", "1", "--lr", "0.01")
    model, dataset, metrics, _ = train(args)
    last = dataset.N_TASKS - 1
    assert len(set(metrics["accuracy_matrix"][-1])) > 1  # learned something, not one constant
    rows, logits = {}, {}
    for flag, layout in LAYOUTS.items():
        model.to(memory_format=layout)
        args.channels_last = flag
        rows[flag] = evaluate(model, dataset, last, context(args)).task_il
        model.eval()
        with torch.inference_mode():
            logits[flag] = [model(to_model_input(dataset.test_data(t).x, bool(flag)), t)
                            for t in range(dataset.N_TASKS)]
    assert rows[1] == rows[0] == metrics["accuracy_matrix"][-1]
    for fast, plain in zip(logits[1], logits[0]):
        torch.testing.assert_close(fast, plain, rtol=0, atol=1e-4)


@pytest.mark.slow
def test_channels_last_training_follows_the_same_losses(synthetic_args):
    _, _, _, fast = train(synthetic_args("--channels_last", "1", "--lr", "0.005"))
    _, _, _, plain = train(synthetic_args("--channels_last", "0", "--lr", "0.005"))
    assert len(fast) == len(plain)
    assert fast[1] != fast[0]  # the update moved the loss, so agreeing on it means something
    torch.testing.assert_close(torch.tensor(fast[:2]), torch.tensor(plain[:2]),
                               rtol=1e-4, atol=0)


@pytest.mark.slow
def test_same_seed_and_options_give_identical_results(synthetic_args):
    first, _ = run(synthetic_args("--seed", "3"), log=lambda *a: None)
    again, _ = run(synthetic_args("--seed", "3"), log=lambda *a: None)
    assert first["accuracy_matrix"] == again["accuracy_matrix"]


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"),
                    reason="oneDNN's ISA limit that stands in for an older CPU is x86's")
def test_amp_is_warned_about_where_the_cpu_emulates_bfloat16():
    """oneDNN held to AVX2 has no hardware bfloat16 on any x86 CPU: what an older CPU sees."""
    probe = ("import torch; from utils.setup import amp_warning; "
             "print(amp_warning(True, torch.device('cpu')))")
    older_cpu = {**os.environ, "ONEDNN_MAX_CPU_ISA": "AVX2"}
    shown = subprocess.run([sys.executable, "-c", probe], env=older_cpu, cwd=REPO,
                           capture_output=True, text=True, check=True).stdout
    assert "without hardware bfloat16" in shown and "drop --amp" in shown
    assert amp_warning(False, CPU) is None
    assert amp_warning(True, torch.device("cuda")) is None
