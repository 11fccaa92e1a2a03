"""A result names the code that produced it: the checkout's commit and whether it was
modified, read with git (None outside a checkout); and the processor it ran on."""
import os
import subprocess

import pytest

from utils.results import code_version, cpu_description, describe_code


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


def test_cpu_named_with_family_model_and_clock(tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    processor = ("processor\t: {}\nvendor_id\t: AuthenticAMD\ncpu family\t: 23\nmodel\t\t: 1\n"
                 "model name\t: AMD EPYC\ncpu MHz\t\t: 1996.250\n\n")
    cpuinfo.write_text(processor.format(0) + processor.format(1))
    assert cpu_description(cpuinfo) == \
        f"AMD EPYC (family 23, model 1, 1996 MHz) x {os.cpu_count()}"


def test_cpu_without_cpuinfo_still_named(tmp_path):
    described = cpu_description(tmp_path / "absent")
    assert described.endswith(f" x {os.cpu_count()}") and len(described) > len(" x 1")


def test_code_described_for_the_log():
    commit = "0123456789abcdef0123456789abcdef01234567"
    assert describe_code({"commit": commit, "dirty": False}) == commit
    assert describe_code({"commit": commit, "dirty": True}) == \
        f"{commit} (tracked files modified)"
    assert describe_code(None) == "not a git checkout"
