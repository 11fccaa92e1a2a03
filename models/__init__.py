"""Continual-learning methods, found by name (the NAME of a ContinualModel subclass)."""
from models.continual_model import ContinualModel
from utils.registry import discover


def model_classes() -> dict[str, type[ContinualModel]]:
    return discover("models", ContinualModel)
