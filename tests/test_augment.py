"""imagedata/augment.py: the batched augmentations and Normalize."""
import torch

from imagedata.augment import Normalize, RandomAffine, RandomFlip


def test_flip_mirrors_about_half_the_batch():
    torch.manual_seed(0)
    x = torch.arange(8.0).repeat(64, 3, 4, 1)
    y = RandomFlip()(x)
    flipped = [torch.equal(b, a.flip(2)) for a, b in zip(x, y)]
    assert all(f or torch.equal(a, b) for f, a, b in zip(flipped, x, y))
    assert 16 < sum(flipped) < 48


def test_affine_without_motion_is_identity():
    x = torch.rand(2, 3, 16, 12) * 255
    still = RandomAffine(degrees=0, translate=0, scale=(1, 1), flip=False)
    assert torch.allclose(still(x), x, atol=1e-3)


def test_normalize_uses_mean_std():
    norm = Normalize([0.5, 0.5, 0.5], [0.25, 0.25, 0.25])
    x = torch.full((1, 3, 2, 2), 255, dtype=torch.uint8)
    assert torch.allclose(norm(x), torch.full((1, 3, 2, 2), 2.0))
