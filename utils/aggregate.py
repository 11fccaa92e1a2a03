"""Statistics over the runs of one experiment repeated with different seeds.

Pure functions on loaded result dicts (the JSON utils/main.py writes), shared by the
multi-seed mode of utils/main.py and by utils/report.py so both compute the same numbers.
"""
from __future__ import annotations

import math
from typing import Sequence

# Options that name one run or where its outputs go: never part of what the runs share.
RUN_KEYS = ("seed", "seeds", "n_runs", "results_dir", "save_memory", "checkpoint_dir",
            "resume", "budget_s")
# Options that do not change the experiment, only where it reads from, where it runs, how
# fast, or how it reports (model_config only fills in options whose values are kept anyway).
# debug_mode, amp and eval_batch_size are left out on purpose: they change the numbers.
NON_PROTOCOL_KEYS = RUN_KEYS + ("data_path", "device", "num_threads", "channels_last",
                                "deterministic", "compile", "quiet", "tensorboard",
                                "model_config")
# Options added after results were written, with the behaviour of the runs made before them,
# so such older runs share a protocol with newer ones that use that behaviour.
OPTIONS_ADDED_LATER = {"shortcut": "identity", "head_bias": 1, "feature_pool": "grid",
                       "exact_bn_stats": 0}
METHOD_OPTIONS_ADDED_LATER = {"bmkp": {"energy": "sigma2", "projection_bn": "running"},
                              "ewc_on": {"fisher_mode": "exact"},
                              "si": {"omega_mode": "paper"},
                              "dgr": {"replay_passes": "joint"},
                              "hal": {"bn_updates": "training"}}
DATASET_OPTIONS_ADDED_LATER = {"seq-cifar10": {"normalize_inputs": 0},
                               "seq-cifar100": {"normalize_inputs": 0}}


def mean_std(values: Sequence[float]) -> dict[str, float]:
    """Mean and sample standard deviation (ddof=1, as papers report over seeds; 0 for one)."""
    if not values:
        raise ValueError("mean_std needs at least one value")
    mean = sum(values) / len(values)
    if len(values) == 1:
        return {"mean": mean, "std": 0.0}
    variance = sum((v - mean) ** 2 for v in values) / (len(values) - 1)
    return {"mean": mean, "std": math.sqrt(variance)}


def optional_mean_std(values: Sequence[float | None]) -> dict[str, float] | None:
    """mean_std, or None when any run has no value (e.g. BWT after a single task)."""
    return None if any(v is None for v in values) else mean_std(values)


def elementwise_mean_std(rows: Sequence[Sequence[float]]) -> dict[str, list[float]]:
    """mean_std at each position of equally long sequences (one per run)."""
    if len({len(r) for r in rows}) != 1:
        raise ValueError("the runs have sequences of different lengths")
    stats = [mean_std(column) for column in zip(*rows)]
    return {"mean": [s["mean"] for s in stats], "std": [s["std"] for s in stats]}


def aggregate_runs(runs: Sequence[dict]) -> dict:
    """Seeds, ACC, BWT, forgetting, the last row of the accuracy matrix, the average accuracy
    after each task, the task-agnostic ACC (None when a run predates it) and the memory, each
    as mean and std over the runs."""
    per_task_memory = [r.get("memory_per_task_mb") for r in runs]
    return {
        "seeds": [r["seed"] for r in runs],
        "n_runs": len(runs),
        "final_acc": mean_std([r["final_acc"] for r in runs]),
        "bwt": optional_mean_std([r["bwt"] for r in runs]),
        "forgetting": optional_mean_std([r["forgetting"] for r in runs]),
        "final_per_task_acc": elementwise_mean_std([r["accuracy_matrix"][-1] for r in runs]),
        "avg_accuracy": elementwise_mean_std([r["avg_accuracy"] for r in runs]),
        "task_agnostic_final_acc": optional_mean_std(
            [r.get("task_agnostic", {}).get("final_acc") for r in runs]),
        "memory_total_mb": mean_std([r["memory"]["total_mb"] for r in runs]),
        "memory_per_task_mb": (None if None in per_task_memory
                               else elementwise_mean_std(per_task_memory)),
    }


def shared_config(configs: Sequence[dict]) -> dict:
    """The options every run has with the same value, less the per-run ones (RUN_KEYS)."""
    first, *others = configs
    return {k: v for k, v in first.items()
            if k not in RUN_KEYS and all(k in c and c[k] == v for c in others)}


def protocol(config: dict) -> dict:
    """The options that define the experiment (config less NON_PROTOCOL_KEYS)."""
    earlier = {**OPTIONS_ADDED_LATER, **METHOD_OPTIONS_ADDED_LATER.get(config.get("model"), {}),
               **DATASET_OPTIONS_ADDED_LATER.get(config.get("dataset"), {})}
    return {k: v for k, v in {**earlier, **config}.items() if k not in NON_PROTOCOL_KEYS}


def differing_keys(configs: Sequence[dict]) -> list[str]:
    """Keys missing from some config or not equal in all of them, sorted."""
    keys = set().union(*configs)
    return sorted(k for k in keys
                  if any(k not in c or c[k] != configs[0].get(k) for c in configs))
