"""Sequential datasets, found by name (the NAME of a SequentialDataset subclass)."""
from datasets.continual_dataset import SequentialDataset
from utils.registry import discover


def dataset_classes() -> dict[str, type[SequentialDataset]]:
    return discover("datasets", SequentialDataset)
