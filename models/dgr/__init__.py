"""Deep Generative Replay (see model.py); its generator, a task-conditional VAE, in vae.py."""
from models.dgr.model import Dgr

__all__ = ["Dgr"]
