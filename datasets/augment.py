"""Batched data augmentation on the training device (no per-sample Python, no PIL)."""
import torch
import torch.nn.functional as F


def random_crop_flip(x: torch.Tensor, padding: int = 4) -> torch.Tensor:
    """Random crop after zero padding plus random horizontal flip, for a whole N x C x H x W batch.

    Every sample gets its own offsets and its own coin flip, exactly as the usual per-image
    RandomCrop(padding) + RandomHorizontalFlip(0.5), but in two tensor operations.
    """
    n, c, h, w = x.shape
    device = x.device
    padded = F.pad(x, (padding, padding, padding, padding))
    dy = torch.randint(0, 2 * padding + 1, (n, 1), device=device)
    dx = torch.randint(0, 2 * padding + 1, (n, 1), device=device)
    rows = (dy + torch.arange(h, device=device))[:, None, :, None]
    cols = (dx + torch.arange(w, device=device))[:, None, None, :]
    samples = torch.arange(n, device=device)[:, None, None, None]
    channels = torch.arange(c, device=device)[None, :, None, None]
    cropped = padded[samples, channels, rows, cols]
    flip = torch.rand(n, device=device) < 0.5
    return torch.where(flip[:, None, None, None], cropped.flip(3), cropped)
