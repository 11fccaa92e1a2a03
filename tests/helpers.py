"""Helpers shared by the test modules (fixtures live in conftest.py)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import torch
from PIL import Image

from backbone import build_backbone
from datasets.seq_synthetic import SequentialSynthetic
from utils.args import parse_args
from utils.context import TrainingContext
from utils.main import main
from utils.metrics import summarize
from utils.results import describe_code, epoch_log_path, text_log_path
from utils.setup import build

CPU = torch.device("cpu")

REPO = Path(__file__).resolve().parent.parent
N_TASKS = SequentialSynthetic.N_TASKS
KEYS = {"model", "dataset", "seed", "started_at", "finished_at", "accuracy_matrix",
        "avg_accuracy", "final_acc", "bwt", "forgetting", "phase_times", "total_time_s",
        "memory", "config", "environment", "single_class_predictions", "unlearned_tasks"}


def synthetic_argv(results_dir: Path, *extra: str, model: str = "sgd") -> list[str]:
    """Command line of a small seq-synthetic run; options in `extra` override these."""
    return ["--model", model, "--dataset", "seq-synthetic", "--nf", "8", "--batch_size", "32",
            "--n_epochs", "2", "--device", "cpu", "--num_threads", "1",
            "--results_dir", str(results_dir), "--quiet", *extra]


def assert_one_line_error(capsys, entry: Callable[[list[str]], int], argv: list[str],
                          *fragments: str) -> str:
    """Run an entry point's main(argv): it must exit 2 with nothing on stdout and a single
    'error: ...' line on stderr holding every fragment; returns that line."""
    code = entry(argv)
    out, err = capsys.readouterr()
    assert code == 2
    assert out == ""
    assert err.endswith("\n") and err.count("\n") == 1, err
    assert err.startswith("error: ") and "Traceback" not in err
    for fragment in fragments:
        assert fragment in err, (fragment, err)
    return err


def dataset_args(dataset: str, data_path: Path, *extra: str):
    """Options for constructing a dataset directly (the model does not matter)."""
    return parse_args(["--model", "sgd", "--dataset", dataset, "--data_path", str(data_path),
                       *extra])


def write_image_folders(root: Path, class_names: list[str], per_split: dict[str, int],
                        size: int, seed: int = 0) -> dict[tuple[str, str], list[np.ndarray]]:
    """Write `{split}/<class>/<i>.png` (lossless) random images; returns them by (split, class)."""
    rng = np.random.default_rng(seed)
    written = {}
    for split, count in per_split.items():
        for name in class_names:
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            images = []
            for i in range(count):
                image = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
                Image.fromarray(image).save(folder / f"{i:03d}.png")
                images.append(image)
            written[split, name] = images
    return written


def decode_file(path: Path) -> torch.Tensor:
    """An image file as PIL decodes it, as a uint8 3 x H x W tensor."""
    with Image.open(path) as image:
        return torch.from_numpy(np.array(image.convert("RGB"))).permute(2, 0, 1)


def real_folder(real_data: Path, name: str) -> Path:
    """A dataset folder of the real data; fails (never downloads) when it is missing."""
    folder = real_data / name
    if not folder.is_dir():
        pytest.fail(f"{folder} is missing: the real-data folder must hold an unpacked "
                    "../shared/data (cifar10-jpeg/, cifar100-jpeg/, tiny-imagenet-200/)")
    return folder


def cpu_context() -> TrainingContext:
    """A quiet CPU training context with one task's phase timers open."""
    ctx = TrainingContext(CPU, batch_size=16, eval_batch_size=64, show_progress=False)
    ctx.phase_times.append({})
    return ctx


def build_on_cpu(synthetic_args, model: str, *extra: str):
    """The synthetic dataset and a method around a fresh small backbone (seed 0)."""
    torch.manual_seed(0)
    return build(synthetic_args(*extra, model=model), CPU)


def run_synthetic(tmp_path: Path, capsys, *extra: str, model: str = "sgd") -> tuple[dict, Path]:
    results_dir = tmp_path / "results"
    assert main(synthetic_argv(results_dir, *extra, model=model)) == 0
    out, err = capsys.readouterr()
    files = list(results_dir.rglob("*"))
    written = sorted((f for f in files if f.is_file()), key=lambda f: f.suffix)
    # the result, its epoch log and its text log, no temporary file left over
    assert [f.suffix for f in written] == [".json", ".jsonl", ".log"], files
    path = written[0]
    assert written[1] == epoch_log_path(path) and written[2] == text_log_path(path)
    assert path.parent == results_dir / "seq-synthetic" / model
    assert path.suffix == ".json" and path.stem.endswith("-seed" + str(seed_of(extra)))
    assert str(path) in out and err == ""
    result = json.loads(path.read_text())
    # the log names the code the run loaded, as the result does
    code_line = f"code: {describe_code(result['environment']['code'])}\n"
    assert code_line in text_log_path(path).read_text()
    return result, path


def seed_of(extra) -> int:
    extra = list(extra)
    return int(extra[extra.index("--seed") + 1]) if "--seed" in extra else 0


def check_result(result: dict, model: str) -> None:
    assert KEYS <= set(result)
    assert (result["model"], result["dataset"]) == (model, "seq-synthetic")
    matrix = result["accuracy_matrix"]
    assert [len(row) for row in matrix] == list(range(1, N_TASKS + 1))  # lower-triangular
    assert all(0.0 <= a <= 100.0 for row in matrix for a in row)
    recomputed = summarize(matrix)
    for key in ("avg_accuracy", "final_acc", "bwt", "forgetting"):
        assert result[key] == pytest.approx(recomputed[key]), key
    # A sample right without its task id is right with it (the global argmax lies in its
    # task's block), and with one task seen the two are the same prediction.
    agnostic = result["task_agnostic"]
    recomputed = summarize(agnostic["accuracy_matrix"])
    for key in ("avg_accuracy", "final_acc", "bwt", "forgetting"):
        assert agnostic[key] == pytest.approx(recomputed[key]), key
    assert all(a <= t for rows in zip(agnostic["accuracy_matrix"], matrix)
               for a, t in zip(*rows))
    assert agnostic["accuracy_matrix"][0] == matrix[0]
    # Only methods with networks besides the predicting one report them, all tasks each.
    others = result.get("other_predictors", {})
    assert bool(others) == (model == "clser")
    for name, other in others.items():
        assert [len(row) for row in other["accuracy_matrix"]] == list(range(1, N_TASKS + 1))
        assert other["final_acc"] == pytest.approx(summarize(other["accuracy_matrix"])["final_acc"])

    times = result["phase_times"]
    assert len(times) == N_TASKS
    assert all(t["train"] > 0 and t["eval"] > 0 for t in times)
    assert sum(sum(t.values()) for t in times) <= result["total_time_s"]

    memory = result["memory"]
    assert memory["breakdown_bytes"]["network"] > 0
    assert memory["total_mb"] == pytest.approx(sum(memory["breakdown_bytes"].values()) / 2**20)
    assert memory["breakdown_mb"] == pytest.approx(
        {k: v / 2**20 for k, v in memory["breakdown_bytes"].items()})

    config = result["config"]
    assert (config["model"], config["dataset"], config["seed"]) == \
        (model, "seq-synthetic", result["seed"])
    assert config["nf"] == 8
    assert result["environment"]["torch"] == torch.__version__
    code = result["environment"]["code"]  # None only outside a git checkout
    assert code is None or (len(code["commit"]) == 40 and isinstance(code["dirty"], bool))
    assert {"torchvision", "numpy", "cuda", "cudnn", "cpu"} <= set(result["environment"])
    assert result["environment"]["device"] == "cpu"


def network_bytes(*extra: str, model: str) -> int:
    """Parameters and float buffers of the run's backbone, counted from its state dict."""
    args = parse_args(synthetic_argv(Path("unused"), *extra, model=model))
    net = build_backbone(args, SequentialSynthetic)
    return sum(t.numel() * t.element_size() for t in net.state_dict().values()
               if t.is_floating_point())
