"""BMKP: bilevel memory with knowledge projection (see model.py)."""
from models.bmkp.model import BMKP

__all__ = ["BMKP"]
