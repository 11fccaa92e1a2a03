"""Seq-Tiny-ImageNet: 10 tasks of 20 classes, 64x64; the official val split is the test set."""
import argparse
import os
import zipfile
from pathlib import Path

from datasets.continual_dataset import RawSplits, SequentialDataset
from datasets.sources import download_failure, load_tiny_imagenet

FOLDER = "tiny-imagenet-200"


class SequentialTinyImageNet(SequentialDataset):
    NAME = "seq-tinyimg"
    N_TASKS = 10
    N_CLASSES_PER_TASK = 20
    IMAGE_SIZE = 64
    TRAIN_PER_CLASS = 500
    # Tiny-ImageNet's channel statistics, as mammoth and the BMKP reference normalise it.
    INPUT_MEAN_STD = ((0.4802, 0.4480, 0.3975), (0.2770, 0.2691, 0.2821))
    URL = "http://cs231n.stanford.edu/tiny-imagenet-200.zip"
    MD5 = "90528d7ca1a48142e341f4ef8d21d0de"  # of the official archive (248,100,043 bytes)

    def load(self, args: argparse.Namespace) -> RawSplits:
        data_path: Path = args.data_path
        root = self._locate(data_path)
        if root is None:
            # Imported here: torchvision adds seconds to the start of every command.
            from torchvision.datasets.utils import check_integrity, download_and_extract_archive
            try:
                download_and_extract_archive(self.URL, download_root=str(data_path),
                                             md5=self.MD5)
            except (OSError, RuntimeError, ValueError, zipfile.BadZipFile) as exc:
                reason = str(exc) or type(exc).__name__
                # A truncated or corrupt archive would fail every later run: remove it.
                archive = data_path / os.path.basename(self.URL)
                if archive.is_file() and not check_integrity(str(archive), self.MD5):
                    archive.unlink()
                    reason = (f"{archive.name} was corrupt or truncated (its MD5 is not "
                              f"{self.MD5}); it was removed, run again to download it anew")
                layouts = (f"{FOLDER}/ or the folder itself holding wnids.txt, "
                           "train/<wnid>/images/*.JPEG, val/images and val/val_annotations.txt")
                raise download_failure(self.NAME, data_path, reason, layouts) from None
            root = self._locate(data_path)
            if root is None:
                raise download_failure(self.NAME, data_path, f"the archive held no {FOLDER}/",
                                       f"{FOLDER}/wnids.txt")
        return load_tiny_imagenet(root, root / ".cache")

    @staticmethod
    def _locate(data_path: Path) -> Path | None:
        for root in (data_path, data_path / FOLDER):
            if (root / "wnids.txt").is_file():
                return root
        return None
