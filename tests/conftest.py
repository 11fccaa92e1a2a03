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
