"""Reading the benchmark images from disk once, and caching the decoded uint8 arrays.

Supported layouts (see the README):
- CIFAR in torchvision's own layout (`cifar-10-batches-py/`, `cifar-100-python/`);
- image folders `{train,test}/<class_name>/<image>` (class folders sorted = label ids);
- Tiny-ImageNet-200 in its original layout (`wnids.txt`, `train/<wnid>/images/*.JPEG`,
  `val/images/*.JPEG` + `val/val_annotations.txt`; val serves as the test set).
"""
from __future__ import annotations

import hashlib
import os
import pickle
import tempfile
import warnings
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image

from datasets.continual_dataset import RawSplits
from utils.errors import UserError

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp"}
CACHE_VERSION = 1


def decode_images(paths: list[Path], size: int) -> torch.Tensor:
    """Decode image files to one uint8 N x 3 x size x size tensor (greyscale becomes RGB)."""
    out = np.empty((len(paths), size, size, 3), dtype=np.uint8)
    for i, path in enumerate(paths):
        try:
            with Image.open(path) as image:
                rgb = image.convert("RGB")
        except OSError as exc:  # UnidentifiedImageError, truncated or unreadable files
            raise UserError(f"{path} cannot be read as an image ({type(exc).__name__}); "
                            "replace or remove the file") from None
        if rgb.size != (size, size):
            raise UserError(f"image {path} is {rgb.size[0]}x{rgb.size[1]}, expected "
                            f"{size}x{size}; check that --data_path holds the right dataset")
        out[i] = np.asarray(rgb)
    return torch.from_numpy(out).permute(0, 3, 1, 2).contiguous()


def _list_images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)


def _fingerprint(files: list[Path]) -> str:
    """Cheap identity of a file set: names, sizes and modification times."""
    digest = hashlib.sha1()
    for f in files:
        stat = f.stat()
        digest.update(f"{f}:{stat.st_size}:{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def cached_decode(cache_dir: Path, name: str, files: list[Path],
                  decode: Callable[[], RawSplits]) -> RawSplits:
    """Decode once, then reuse `cache_dir/<name>.pt` while the source files are unchanged."""
    cache_file = cache_dir / f"{name}.pt"
    key = f"v{CACHE_VERSION}:{_fingerprint(files)}"
    if cache_file.exists():
        try:
            stored = torch.load(cache_file, weights_only=True)
            if stored.get("key") == key:
                return RawSplits(**stored["splits"])
        except (OSError, RuntimeError, KeyError, TypeError, AttributeError, EOFError,
                pickle.UnpicklingError):
            pass  # an unreadable cache is only a cache: decode again and overwrite it
    splits = decode()
    payload = {"key": key, "splits": vars(splits)}
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=cache_dir, suffix=".tmp")
        os.close(fd)
        try:
            torch.save(payload, tmp)
            os.replace(tmp, cache_file)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
    except OSError as exc:
        warnings.warn(f"could not write the decode cache {cache_file} ({exc}); "
                      "the next run will decode the images again")
    return splits


def image_folder_files(root: Path, n_classes: int, dataset: str) -> tuple[list[str], dict]:
    """Class names and per-split file lists of a `{train,test}/<class>/<image>` folder."""
    splits = {}
    classes: list[str] = []
    for split in ("train", "test"):
        split_dir = root / split
        names = sorted(d.name for d in split_dir.iterdir() if d.is_dir())
        if len(names) != n_classes:
            raise UserError(f"{dataset}: {split_dir} has {len(names)} class folders, expected "
                            f"{n_classes}; point --data_path at the {dataset} image folders")
        if classes and names != classes:
            raise UserError(f"{dataset}: {root}/train and {root}/test have different class folders")
        classes = names
        per_class = [_list_images(split_dir / name) for name in names]
        empty = [name for name, files in zip(names, per_class) if not files]
        if empty:
            raise UserError(f"{dataset}: class folder {split_dir / empty[0]} holds no images "
                            f"({len(empty)} empty in {split}); every class needs {split} images")
        splits[split] = [(p, label) for label, files in enumerate(per_class) for p in files]
    return classes, splits


def load_image_folders(root: Path, n_classes: int, size: int, dataset: str,
                       cache_dir: Path) -> RawSplits:
    _, splits = image_folder_files(root, n_classes, dataset)

    def decode() -> RawSplits:
        arrays = {}
        for split, items in splits.items():
            arrays[f"{split}_x"] = decode_images([p for p, _ in items], size)
            arrays[f"{split}_y"] = torch.tensor([label for _, label in items], dtype=torch.long)
        return RawSplits(**arrays)

    files = [p for items in splits.values() for p, _ in items]
    return cached_decode(cache_dir, f"{dataset}-folders", files, decode)


def load_torchvision_cifar(root: Path, class_name: str, download: bool) -> RawSplits:
    """CIFAR-10/100 through torchvision (its own pickled layout; downloads when asked).
    torchvision is imported here, not at start-up, where it would add seconds to every
    command, --help and one-line errors included."""
    import torchvision.datasets

    dataset_cls = getattr(torchvision.datasets, class_name)
    arrays = {}
    for split, train in (("train", True), ("test", False)):
        data = dataset_cls(root=str(root), train=train, download=download)
        arrays[f"{split}_x"] = torch.from_numpy(data.data).permute(0, 3, 1, 2).contiguous()
        arrays[f"{split}_y"] = torch.tensor(data.targets, dtype=torch.long)
    return RawSplits(**arrays)


def tiny_imagenet_files(root: Path) -> tuple[list[str], list[tuple[Path, int]],
                                               list[tuple[Path, int]]]:
    """wnids, train items and val items of an original-layout Tiny-ImageNet-200 folder."""
    wnids = [w.strip() for w in (root / "wnids.txt").read_text().split() if w.strip()]
    wnids = sorted(wnids)
    label = {w: i for i, w in enumerate(wnids)}
    train = [(p, label[w]) for w in wnids for p in _list_images(root / "train" / w / "images")]
    annotations = root / "val" / "val_annotations.txt"
    if not annotations.exists():
        raise UserError(f"seq-tinyimg: {annotations} is missing; the original Tiny-ImageNet "
                        "layout has val/images and val/val_annotations.txt")
    val = []
    for line in annotations.read_text().splitlines():
        fields = line.split("\t")
        if len(fields) >= 2:
            if fields[1] not in label:
                raise UserError(f"seq-tinyimg: {annotations} names class {fields[1]} that is "
                                "not in wnids.txt; the copy is inconsistent")
            val.append((root / "val" / "images" / fields[0], label[fields[1]]))
    if not train or not val:
        raise UserError(f"seq-tinyimg: no images found under {root}/train/<wnid>/images or "
                        f"{root}/val/images")
    return wnids, train, val


def load_tiny_imagenet(root: Path, cache_dir: Path) -> RawSplits:
    _, train, val = tiny_imagenet_files(root)

    def decode() -> RawSplits:
        return RawSplits(
            train_x=decode_images([p for p, _ in train], 64),
            train_y=torch.tensor([y for _, y in train], dtype=torch.long),
            test_x=decode_images([p for p, _ in val], 64),
            test_y=torch.tensor([y for _, y in val], dtype=torch.long))

    files = [p for p, _ in train + val]
    return cached_decode(cache_dir, "seq-tinyimg", files, decode)


def download_failure(dataset: str, data_path: Path, reason: str, layouts: str) -> UserError:
    return UserError(
        f"{dataset}: data not found in {data_path} and the download failed ({reason}). "
        f"Accepted layouts under --data_path: {layouts}. For a local copy pass "
        f"--data_path DIR (e.g. '../shared/data/unpack DEST' then --data_path DEST)")


def load_cifar(data_path: Path, dataset: str, torchvision_class: str, torchvision_folder: str,
               jpeg_folder: str, n_classes: int) -> RawSplits:
    """Find CIFAR under data_path in any supported layout, downloading it when absent."""
    cache_dir = data_path / ".cache"
    if (data_path / torchvision_folder).is_dir():
        return load_torchvision_cifar(data_path, torchvision_class, download=False)
    for root in (data_path, data_path / jpeg_folder):
        if (root / "train").is_dir() and (root / "test").is_dir():
            return load_image_folders(root, n_classes, 32, dataset, cache_dir)
    try:
        return load_torchvision_cifar(data_path, torchvision_class, download=True)
    except (OSError, RuntimeError, ValueError) as exc:
        layouts = (f"{torchvision_folder}/ (torchvision's layout), {{train,test}}/<class>/<image> "
                   f"or {jpeg_folder}/{{train,test}}/<class>/<image> (image folders)")
        raise download_failure(dataset, data_path, str(exc).splitlines()[0] if str(exc) else
                               type(exc).__name__, layouts) from None
