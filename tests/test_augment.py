"""The batched random crop + flip against a brute-force search over every crop and flip."""
import torch
import torch.nn.functional as F

from datasets.augment import random_crop_flip
from datasets.continual_dataset import TaskData, iterate_batches

PAD = 4


def _match_crops(x: torch.Tensor, out: torch.Tensor, padding: int):
    """For each sample, every (dy, dx, flipped) whose crop of its own padded input equals it."""
    n, _, h, w = x.shape
    padded = F.pad(x, (padding,) * 4)
    matches = [[] for _ in range(n)]
    for dy in range(2 * padding + 1):
        for dx in range(2 * padding + 1):
            crop = padded[:, :, dy:dy + h, dx:dx + w]
            for flipped, candidate in ((False, crop), (True, crop.flip(3))):
                hit = (candidate == out).flatten(1).all(1)
                for i in torch.nonzero(hit).flatten().tolist():
                    matches[i].append((dy - padding, dx - padding, flipped))
    return matches


def _distinct_batch(n: int, size: int = 12, seed: int = 0) -> torch.Tensor:
    """Random images with no zero pixel, so zeros in a crop can only come from padding."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, 256, (n, 3, size, size), generator=g, dtype=torch.uint8)


def test_shape_and_dtype_are_preserved():
    for x in (_distinct_batch(5), _distinct_batch(5).float() / 255):
        out = random_crop_flip(x, padding=PAD)
        assert out.shape == x.shape and out.dtype == x.dtype
    wide = torch.rand(3, 3, 8, 20)
    assert random_crop_flip(wide, padding=2).shape == wide.shape


def test_every_output_is_a_padded_crop_of_its_own_input():
    torch.manual_seed(0)
    x = _distinct_batch(2000)
    out = random_crop_flip(x, padding=PAD)
    matches = _match_crops(x, out, PAD)
    # exactly one shift/flip of the sample's own image explains each output (random content
    # makes a second explanation, or an explanation from another image, practically impossible)
    assert all(len(m) == 1 for m in matches)
    found = [m[0] for m in matches]
    shifts_y = {dy for dy, _, _ in found}
    shifts_x = {dx for _, dx, _ in found}
    assert shifts_y == set(range(-PAD, PAD + 1)) and shifts_x == set(range(-PAD, PAD + 1))
    flipped = sum(f for _, _, f in found)
    assert 0.4 * len(found) < flipped < 0.6 * len(found)  # about half, over 2000 coin flips


def test_zeros_only_come_from_the_padding():
    torch.manual_seed(1)
    x = _distinct_batch(500)
    out = random_crop_flip(x, padding=PAD)
    h, w = x.shape[2:]
    for (dy, dx, flipped), image in zip((m[0] for m in _match_crops(x, out, PAD)), out):
        inside = torch.zeros(h, w, dtype=torch.bool)
        inside[max(0, -dy):min(h, h - dy), max(0, -dx):min(w, w - dx)] = True
        if flipped:
            inside = inside.flip(1)
        assert torch.equal((image != 0).all(0), inside)  # nonzero exactly where the image is


def test_flip_really_mirrors():
    torch.manual_seed(2)
    x = _distinct_batch(400)
    out = random_crop_flip(x, padding=0)  # no shift: each output is the image or its mirror
    same = (out == x).flatten(1).all(1)
    mirrored = (out == x.flip(3)).flatten(1).all(1)
    assert torch.all(same ^ mirrored)
    assert 0.4 * len(x) < mirrored.sum() < 0.6 * len(x)


def test_iterate_batches_scales_and_keeps_samples_with_their_labels():
    x = _distinct_batch(37, size=8, seed=3)
    y = torch.arange(37)
    data = TaskData(x, y, torch.full((37,), 2))
    seen = []
    for bx, by, bt in iterate_batches(data, 10, shuffle=True, augment=False):
        assert bx.dtype == torch.float32 and len(bx) <= 10
        assert torch.all(bt == 2)
        assert torch.allclose(bx * 255, x[by].float())  # labels travel with their images
        seen += by.tolist()
    assert sorted(seen) == list(range(37))  # every sample exactly once per pass
    batches = list(iterate_batches(data, 10, shuffle=False, augment=True, max_batches=2))
    assert [len(b[0]) for b in batches] == [10, 10]
    assert float(batches[0][0].max()) <= 1.0
