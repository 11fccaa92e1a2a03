"""A result names the code that produced it: the checkout's commit and whether it was
modified, read with git (None outside a checkout)."""
import subprocess

import pytest

from utils.results import code_version


def _git(repo, *args):
    subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True)


def test_commit_and_modified_tracked_files(tmp_path):
    repo = tmp_path / "checkout"
    repo.mkdir()
    try:
        _git(repo, "init", "-q")
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("git is not installed here")
    (repo / "method.py").write_text("x = 1\n")
    _git(repo, "add", "method.py")
    _git(repo, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "one")
    head = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], check=True,
                          capture_output=True, text=True).stdout.strip()
    (repo / "notes.txt").write_text("untracked files do not count\n")
    assert code_version(repo) == {"commit": head, "dirty": False}
    (repo / "method.py").write_text("x = 2\n")
    assert code_version(repo) == {"commit": head, "dirty": True}


def test_outside_a_checkout_there_is_no_code_version(tmp_path):
    assert code_version(tmp_path) is None
