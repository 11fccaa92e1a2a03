"""Shared fixtures: the real datasets (when present), synthetic-run options, small image trees."""
from __future__ import annotations

import os
import subprocess
import sys
import urllib.error
from pathlib import Path

import pytest
import torch
import torchvision.datasets.cifar as tv_cifar

from helpers import REPO, synthetic_argv
from utils.args import parse_args

UNPACK = REPO.parent / "shared" / "data" / "unpack"


@pytest.fixture(scope="session")
def real_data(tmp_path_factory) -> Path:
    """Folder holding cifar10-jpeg/, cifar100-jpeg/ and tiny-imagenet-200/ (unpacked copies).

    $BMKP_TEST_DATA wins (CI unpacks there); otherwise ../shared/data/unpack beside the repo
    unpacks into a temporary folder once per session; otherwise the real-data tests skip.
    """
    given = os.environ.get("BMKP_TEST_DATA")
    if given:
        path = Path(given)
        if not path.is_dir():
            pytest.fail(f"BMKP_TEST_DATA={given} is not a folder")
        return path
    if not UNPACK.is_file():
        pytest.skip("real datasets not found: set BMKP_TEST_DATA or place ../shared/data "
                    "beside the repo")
    dest = tmp_path_factory.mktemp("real-data")
    subprocess.run([sys.executable, str(UNPACK), str(dest)], check=True,
                   stdout=subprocess.DEVNULL)
    return dest


@pytest.fixture
def synthetic_args(tmp_path):
    """Build the options Namespace of a small seq-synthetic run (extra options override)."""
    def build(*extra: str, model: str = "sgd"):
        return parse_args(synthetic_argv(tmp_path / "results", *extra, model=model))
    return build


def _pin_xdist_worker_to_one_core() -> None:
    """Give each pytest-xdist worker a core of its own (worker i: the i-th core it may use).

    Runs that pick their thread count themselves (main() without --num_threads, scripts run
    as subprocesses) then take one thread, instead of two workers' threads contending for
    the same cores, which on a 2-core machine stalls each of them for milliseconds per op.
    """
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0"))
    cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    if worker.startswith("gw") and 1 < workers <= len(cores):
        os.sched_setaffinity(0, {cores[int(worker[2:])]})


_pin_xdist_worker_to_one_core()


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Longest first: the end-to-end runs (marked slow, those of test_sanity.py the longest)
    start while the quick tests wait, so that the quick ones fill the workers' last minutes
    instead of one worker finishing a long run alone."""
    def cost(item: pytest.Item) -> int:
        if item.get_closest_marker("slow") is None:
            return 2
        return 0 if item.path.name == "test_sanity.py" else 1
    items.sort(key=cost)  # stable: each group keeps its order


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """Run every test with one intra-op thread.

    The tests work on tiny tensors, where a second thread only adds synchronisation (and
    stalls for milliseconds per op when another process holds the other core of a 2-core
    machine); main(--num_threads N) also sets this process-wide value, so reset it each time.
    """
    torch.set_num_threads(1)
    yield


@pytest.fixture
def offline_cifar(monkeypatch):
    """Make torchvision's CIFAR download fail at once (as offline), recording the attempts."""
    calls = []

    def refuse(url, *args, **kwargs):
        calls.append(url)
        raise urllib.error.URLError("offline (test)")

    monkeypatch.setattr(tv_cifar, "download_and_extract_archive", refuse)
    return calls
