"""Loading the disk layouts from small generated copies: image folders, torchvision's CIFAR
pickles, Tiny-ImageNet's original layout downloaded as a zip, the decode cache and the
messages when nothing can be found."""
from __future__ import annotations

import functools
import hashlib
import http.server
import os
import pickle
import random
import socket
import threading
import zipfile
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision.datasets.cifar as tv_cifar
from PIL import Image

import datasets.sources as sources
from datasets.continual_dataset import RawSplits, SequentialDataset
from datasets.seq_cifar10 import SequentialCIFAR10
from datasets.seq_cifar100 import SequentialCIFAR100
from datasets.seq_tinyimg import SequentialTinyImageNet
from helpers import assert_one_line_error, dataset_args, decode_file, write_image_folders
from utils.errors import UserError
from utils.main import main

CIFAR10_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse",
                 "ship", "truck"]


def _images_of(data, local_label: int) -> torch.Tensor:
    return data.x[data.y == local_label]


# ---------------------------------------------------------------- image folders + decode cache

@pytest.fixture
def cifar_folders(tmp_path):
    """A 10-class `{train,test}/<class>/*.png` copy, class folders written in shuffled order."""
    names = CIFAR10_NAMES[:]
    random.Random(0).shuffle(names)
    root = tmp_path / "folders"
    images = write_image_folders(root, names, {"train": 3, "test": 2}, size=32)
    return root, images


def _check_folder_dataset(ds, images) -> None:
    """Labels are the sorted class-folder names; each class's images in file order."""
    names = sorted({name for _, name in images})
    k = ds.N_CLASSES_PER_TASK
    for label, name in enumerate(names):
        task, local = divmod(label, k)
        for split, get in (("train", ds.train_data), ("test", ds.test_data)):
            expected = torch.stack([torch.from_numpy(a).permute(2, 0, 1)
                                    for a in images[split, name]])
            assert torch.equal(_images_of(get(task), local), expected), (split, name)


def test_image_folders_load_with_sorted_class_labels(cifar_folders, offline_cifar):
    root, images = cifar_folders
    ds = SequentialCIFAR10(dataset_args("seq-cifar10", root))
    _check_folder_dataset(ds, images)
    assert sum(len(ds.train_data(t)) for t in range(ds.N_TASKS)) == 30
    assert offline_cifar == []  # found on disk: no download attempted


def test_image_folders_found_inside_the_parent_folder(tmp_path, offline_cifar):
    images = write_image_folders(tmp_path / "cifar10-jpeg", CIFAR10_NAMES,
                                 {"train": 2, "test": 1}, size=32, seed=1)
    ds = SequentialCIFAR10(dataset_args("seq-cifar10", tmp_path))
    _check_folder_dataset(ds, images)
    assert offline_cifar == []


def test_decode_cache_is_written_then_reused(cifar_folders, monkeypatch):
    root, _ = cifar_folders
    first = SequentialCIFAR10(dataset_args("seq-cifar10", root))
    assert (root / ".cache" / "seq-cifar10-folders.pt").is_file()

    def no_decoding(*args, **kwargs):
        raise AssertionError("the cache should have been used")

    monkeypatch.setattr(sources, "decode_images", no_decoding)
    second = SequentialCIFAR10(dataset_args("seq-cifar10", root))
    for task in range(first.N_TASKS):
        for get in ("train_data", "test_data"):
            a, b = getattr(first, get)(task), getattr(second, get)(task)
            assert torch.equal(a.x, b.x) and torch.equal(a.y, b.y)


@pytest.fixture
def counting_decode(monkeypatch):
    calls = []
    real = sources.decode_images

    def counting(paths, size):
        calls.append(len(paths))
        return real(paths, size)

    monkeypatch.setattr(sources, "decode_images", counting)
    return calls


def test_decode_cache_is_invalidated_when_a_file_is_added(cifar_folders, counting_decode):
    root, images = cifar_folders
    SequentialCIFAR10(dataset_args("seq-cifar10", root))
    assert counting_decode == [30, 20]
    SequentialCIFAR10(dataset_args("seq-cifar10", root))
    assert counting_decode == [30, 20]  # unchanged: served from the cache

    extra = np.full((32, 32, 3), 7, dtype=np.uint8)
    Image.fromarray(extra).save(root / "train" / "cat" / "999.png")
    ds = SequentialCIFAR10(dataset_args("seq-cifar10", root))
    assert counting_decode[2:] == [31, 20]
    label = sorted(CIFAR10_NAMES).index("cat")
    cats = _images_of(ds.train_data(label // 2), label % 2)
    assert len(cats) == 4
    assert torch.equal(cats[-1], torch.from_numpy(extra).permute(2, 0, 1))


def test_decode_cache_is_invalidated_when_a_file_changes(cifar_folders, counting_decode):
    root, images = cifar_folders
    SequentialCIFAR10(dataset_args("seq-cifar10", root))
    target = root / "test" / "ship" / "000.png"
    replacement = np.zeros((32, 32, 3), dtype=np.uint8)
    replacement[:, :16] = 200  # a different size on disk, and a later modification time
    Image.fromarray(replacement).save(target)
    stat = target.stat()
    os.utime(target, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    ds = SequentialCIFAR10(dataset_args("seq-cifar10", root))
    assert len(counting_decode) == 4
    label = sorted(CIFAR10_NAMES).index("ship")
    assert torch.equal(_images_of(ds.test_data(label // 2), label % 2)[0],
                       torch.from_numpy(replacement).permute(2, 0, 1))


@pytest.mark.parametrize("garbage", [b"", b"not a torch file" * 4], ids=["empty", "junk"])
def test_unreadable_cache_is_rebuilt(cifar_folders, counting_decode, garbage):
    root, images = cifar_folders
    cache = root / ".cache" / "seq-cifar10-folders.pt"
    cache.parent.mkdir()
    cache.write_bytes(garbage)
    ds = SequentialCIFAR10(dataset_args("seq-cifar10", root))
    _check_folder_dataset(ds, images)
    assert counting_decode == [30, 20]
    assert torch.load(cache, weights_only=True)["splits"]["train_x"].shape == (30, 3, 32, 32)


def test_wrong_number_of_class_folders_is_a_user_error(tmp_path, offline_cifar):
    write_image_folders(tmp_path, CIFAR10_NAMES[:3], {"train": 1, "test": 1}, size=32)
    with pytest.raises(UserError, match="has 3 class folders, expected 10"):
        SequentialCIFAR10(dataset_args("seq-cifar10", tmp_path))


def test_wrong_image_size_is_a_user_error(tmp_path):
    write_image_folders(tmp_path, CIFAR10_NAMES, {"train": 1, "test": 1}, size=16)
    with pytest.raises(UserError, match="is 16x16, expected 32x32"):
        SequentialCIFAR10(dataset_args("seq-cifar10", tmp_path))


def test_unreadable_image_is_a_one_line_error_naming_the_file(tmp_path, capsys):
    write_image_folders(tmp_path, CIFAR10_NAMES, {"train": 2, "test": 1}, size=32)
    broken = tmp_path / "train" / "cat" / "zz.png"
    broken.write_bytes(b"not an image")
    assert_one_line_error(capsys, main, ["--model", "sgd", "--dataset", "seq-cifar10",
                                         "--data_path", str(tmp_path), "--device", "cpu"],
                          str(broken), "cannot be read as an image", "replace or remove")


def test_class_folder_without_test_images_is_refused(tmp_path, capsys):
    write_image_folders(tmp_path, CIFAR10_NAMES, {"train": 2, "test": 1}, size=32)
    for image in (tmp_path / "test" / "frog").iterdir():
        image.unlink()
    assert_one_line_error(capsys, main, ["--model", "sgd", "--dataset", "seq-cifar10",
                                         "--data_path", str(tmp_path), "--device", "cpu"],
                          str(tmp_path / "test" / "frog"), "holds no images",
                          "every class needs test images")


def test_a_class_missing_from_a_split_is_refused_for_any_source(tmp_path):
    class Holey(SequentialDataset):
        NAME, N_TASKS, N_CLASSES_PER_TASK, IMAGE_SIZE = "holey", 2, 2, 8

        def load(self, args):
            x = torch.zeros(8, 3, 8, 8, dtype=torch.uint8)
            return RawSplits(x, torch.tensor([0, 1, 2, 3] * 2), x[:4], torch.tensor([0, 1, 3, 3]))

    with pytest.raises(UserError, match="class 2 has no test images"):
        Holey(dataset_args("seq-synthetic", tmp_path))


# ------------------------------------------------------------------ torchvision's CIFAR layout

def _md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def _write_torchvision_cifar(root: Path, cls: type, n_classes: int, label_key: str,
                             names_key: str, per_class: int, rng: np.random.Generator):
    """Write a small copy of torchvision's pickled layout for `cls`; returns expected arrays."""
    folder = root / cls.base_folder
    folder.mkdir(parents=True)
    expected = {}
    for split, entries in (("train", cls.train_list), ("test", cls.test_list)):
        xs, ys = [], []
        for name, _ in entries:
            labels = rng.permutation(np.repeat(np.arange(n_classes), per_class))
            data = rng.integers(0, 256, (len(labels), 3 * 32 * 32), dtype=np.uint8)
            with open(folder / name, "wb") as f:
                pickle.dump({"data": data, label_key: labels.tolist()}, f)
            xs.append(data.reshape(-1, 3, 32, 32))  # rows are R, G, B planes of 32x32
            ys.append(labels)
        expected[split] = (torch.from_numpy(np.concatenate(xs)),
                           torch.from_numpy(np.concatenate(ys)))
    with open(folder / cls.meta["filename"], "wb") as f:
        pickle.dump({names_key: [f"class{i}" for i in range(n_classes)]}, f)
    return folder, expected


@pytest.mark.parametrize("dataset_cls, tv_cls, label_key", [
    (SequentialCIFAR10, tv_cifar.CIFAR10, "labels"),
    (SequentialCIFAR100, tv_cifar.CIFAR100, "fine_labels"),
])
def test_torchvision_layout(tmp_path, monkeypatch, offline_cifar, dataset_cls, tv_cls,
                            label_key):
    n_classes = dataset_cls.N_TASKS * dataset_cls.N_CLASSES_PER_TASK
    folder, expected = _write_torchvision_cifar(
        tmp_path, tv_cls, n_classes, label_key, tv_cls.meta["key"], per_class=2,
        rng=np.random.default_rng(3))
    # torchvision checks every file against the official md5 sums: point its (unchanged)
    # integrity check at the sums of this small copy instead.
    for attr in ("train_list", "test_list"):
        monkeypatch.setattr(tv_cls, attr, [[name, _md5(folder / name)]
                                           for name, _ in getattr(tv_cls, attr)])
    monkeypatch.setattr(tv_cls, "meta",
                        {**tv_cls.meta, "md5": _md5(folder / tv_cls.meta["filename"])})

    ds = dataset_cls(dataset_args(dataset_cls.NAME, tmp_path))
    k = ds.N_CLASSES_PER_TASK
    for split, get in (("train", ds.train_data), ("test", ds.test_data)):
        x, y = expected[split]
        assert sum(len(get(t)) for t in range(ds.N_TASKS)) == len(y)
        for task in range(ds.N_TASKS):
            data = get(task)
            assert data.x.dtype == torch.uint8 and data.x.shape[1:] == (3, 32, 32)
            for local in range(k):
                assert torch.equal(_images_of(data, local), x[y == task * k + local])
    assert offline_cifar == []


# ------------------------------------------------------------------------------ downloading

def test_cifar_download_failure_explains_the_layouts(tmp_path, offline_cifar):
    data_path = tmp_path / "empty"
    with pytest.raises(UserError) as info:
        SequentialCIFAR10(dataset_args("seq-cifar10", data_path))
    message = str(info.value)
    assert offline_cifar == [tv_cifar.CIFAR10.url]
    assert f"data not found in {data_path}" in message
    assert "download failed (<urlopen error offline (test)>)" in message
    assert "cifar-10-batches-py/" in message
    assert "cifar10-jpeg/{train,test}/<class>/<image>" in message
    assert "--data_path DIR" in message and "unpack" in message
    assert "\n" not in message


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@contextmanager
def _http_server(folder: Path):
    """Serve `folder` on a free localhost port (a real HTTP download, no outside network)."""
    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(_QuietHandler, directory=str(folder)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


@pytest.fixture
def no_proxy(monkeypatch):
    for name in ("no_proxy", "NO_PROXY"):
        monkeypatch.setenv(name, "127.0.0.1,localhost")


def _make_tiny_zip(path: Path, staging: Path) -> list[str]:
    """tiny-imagenet-200/ in the original layout, 200 fake wnids with 1 train + 1 val image.

    wnids.txt is written unsorted; returns the wnids in that file order.
    """
    rng = np.random.default_rng(4)
    wnids = [f"n{9_000_000 + 37 * i:08d}" for i in range(200)]
    random.Random(1).shuffle(wnids)
    root = staging / "tiny-imagenet-200"
    (root / "val" / "images").mkdir(parents=True)
    (root / "wnids.txt").write_text("\n".join(wnids) + "\n")
    lines = []
    for i, wnid in enumerate(wnids):
        images = root / "train" / wnid / "images"
        images.mkdir(parents=True)
        for target in (images / f"{wnid}_0.JPEG", root / "val" / "images" / f"val_{i}.JPEG"):
            pixels = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(target, format="JPEG")
        lines.append(f"val_{i}.JPEG\t{wnid}\t0\t0\t63\t63")
    (root / "val" / "val_annotations.txt").write_text("\n".join(lines) + "\n")
    with zipfile.ZipFile(path, "w") as archive:
        for file in sorted(root.rglob("*")):
            archive.write(file, file.relative_to(staging))
    return wnids


def test_tiny_imagenet_downloads_extracts_and_loads(tmp_path, monkeypatch, no_proxy):
    served = tmp_path / "served"
    served.mkdir()
    wnids = _make_tiny_zip(served / "tiny-imagenet-200.zip", tmp_path / "staging")
    data_path = tmp_path / "data"
    data_path.mkdir()
    monkeypatch.setattr(SequentialTinyImageNet, "MD5", _md5(served / "tiny-imagenet-200.zip"))
    with _http_server(served) as url:
        monkeypatch.setattr(SequentialTinyImageNet, "URL", f"{url}/tiny-imagenet-200.zip")
        ds = SequentialTinyImageNet(dataset_args("seq-tinyimg", data_path))

    root = data_path / "tiny-imagenet-200"
    assert (root / "wnids.txt").is_file()
    k = ds.N_CLASSES_PER_TASK
    assert ds.N_TASKS * k == 200
    for task in range(ds.N_TASKS):
        for get in (ds.train_data, ds.test_data):
            data = get(task)
            assert data.x.shape == (k, 3, 64, 64) and data.x.dtype == torch.uint8
            assert sorted(data.y.tolist()) == list(range(k))
    for i, wnid in enumerate(wnids):
        label = sorted(wnids).index(wnid)  # label ids follow the sorted wnids
        task, local = divmod(label, k)
        train_image = decode_file(root / "train" / wnid / "images" / f"{wnid}_0.JPEG")
        val_image = decode_file(root / "val" / "images" / f"val_{i}.JPEG")
        assert torch.equal(_images_of(ds.train_data(task), local)[0], train_image)
        assert torch.equal(_images_of(ds.test_data(task), local)[0], val_image)


def test_tiny_imagenet_broken_download_is_removed_and_retried(tmp_path, monkeypatch,
                                                             no_proxy):
    """A truncated archive, or a page that is no archive at all, fails the MD5 check: the
    error says so, the file is removed, and the next run downloads it again."""
    served = tmp_path / "served"
    served.mkdir()
    archive = served / "tiny-imagenet-200.zip"
    _make_tiny_zip(archive, tmp_path / "staging")
    whole = archive.read_bytes()
    monkeypatch.setattr(SequentialTinyImageNet, "MD5", _md5(archive))
    data_path = tmp_path / "data"
    with _http_server(served) as url:
        monkeypatch.setattr(SequentialTinyImageNet, "URL", f"{url}/tiny-imagenet-200.zip")
        for broken in (whole[:len(whole) // 2], b"<html>a captive portal</html>"):
            archive.write_bytes(broken)
            with pytest.raises(UserError, match="was corrupt or truncated") as info:
                SequentialTinyImageNet(dataset_args("seq-tinyimg", data_path))
            assert "data not found in" in str(info.value) and "it was removed" in str(info.value)
            assert not (data_path / "tiny-imagenet-200.zip").exists()

        archive.write_bytes(whole)  # the next run downloads it again
        ds = SequentialTinyImageNet(dataset_args("seq-tinyimg", data_path))
    assert len(ds.train_data(0)) == ds.N_CLASSES_PER_TASK


def test_tiny_imagenet_unreachable_download_explains_the_layout(tmp_path, monkeypatch,
                                                               no_proxy):
    with socket.socket() as probe:  # a port nobody listens on: the connection is refused
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    monkeypatch.setattr(SequentialTinyImageNet, "URL", f"http://127.0.0.1:{port}/t.zip")
    data_path = tmp_path / "data"
    with pytest.raises(UserError) as info:
        SequentialTinyImageNet(dataset_args("seq-tinyimg", data_path))
    message = str(info.value)
    assert f"data not found in {data_path} and the download failed" in message
    assert "wnids.txt" in message and "val/val_annotations.txt" in message
    assert "--data_path DIR" in message
