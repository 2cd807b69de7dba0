"""imagedata/augment.py: the batched augmentations and Normalize, MixUp and CutMix, torchvision's per image, and a
user's albumentations pipeline from its file."""
import re

import numpy as np
import pytest
import torch

from core.cli import UserError
from imagedata.augment import Normalize, RandomAffine, RandomFlip, create_mix, load_pipeline, rand_augment, trivial_augment
from imagedata.feed import ImageDataset


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


@pytest.mark.parametrize("mixup, cutmix", [(0.2, 0.0), (0.0, 1.0), (0.2, 1.0)])
def test_mixup_and_cutmix_mix_pairs_of_images_and_their_labels(mixup, cutmix):
    """--mixup / --cutmix: torchvision's v2 MixUp and CutMix on the float batch; each target is a distribution over
    the classes made of at most two labels, the image's own among them, in the shares the images were mixed."""
    torch.manual_seed(0)
    x, y = torch.rand(32, 3, 16, 12) * 255, torch.randint(0, 18, (32,))
    mixed, target = create_mix(mixup, cutmix, 18)(x, y)
    assert mixed.shape == x.shape and target.shape == (32, 18) and torch.allclose(target.sum(1), torch.ones(32))
    assert ((target > 0).sum(1) <= 2).all() and (target[torch.arange(32), y] > 0).all()
    assert not torch.equal(mixed, x)


def test_no_mix_without_an_alpha():
    assert create_mix(0.0, 0.0, 18) is None


@pytest.mark.parametrize("transform", [lambda: rand_augment(9), trivial_augment])
def test_library_augmentations_draw_an_operation_per_image(transform):
    """v2's RandAugment on a batch gives every image the same draw; PerImage draws one for each image."""
    torch.manual_seed(0)
    x = torch.full((24, 3, 16, 12), 128.0)
    x[:, :, :8] = 30.0  # two flat halves: most operations change them, each in its own way
    y = transform()(x)
    assert y.shape == x.shape and y.dtype == torch.float32 and 0 <= y.min() and y.max() <= 255
    assert len({tuple(image.flatten().tolist()) for image in y}) > 3


def saved_pipeline(path, *transforms):
    """A pipeline as a user brings one: albumentations' own A.save of an A.Compose."""
    import albumentations as A
    A.save(A.Compose(list(transforms)), str(path), data_format="yaml" if path.suffix == ".yaml" else "json")
    return path


@pytest.mark.parametrize("suffix", [".json", ".yaml"])
def test_a_saved_albumentations_pipeline_runs_per_image_in_the_dataset(tmp_path, suffix):
    import albumentations as A
    path = saved_pipeline(tmp_path / f"aug{suffix}", A.HorizontalFlip(p=1.0), A.RandomBrightnessContrast(p=0.0))
    pipeline = load_pipeline(path, (8, 6), seed=0)
    images = np.random.default_rng(0).integers(0, 256, (4, 8, 6, 3), dtype=np.uint8)
    data = ImageDataset([f"{i}.png" for i in range(4)], (8, 6), images, np.arange(4), transform=pipeline)
    x, label = data[2]
    assert label == 2 and torch.equal(x, torch.from_numpy(images[2][:, ::-1].copy()).permute(2, 0, 1))


@pytest.mark.parametrize("transform, says", [
    ("Normalize", "gives ndarray float32 (8, 6, 3) for a 8x6 image; it must give the image as it came, uint8 8x6x3"),
    ("RandomCrop", "gives ndarray uint8 (4, 4, 3) for a 8x6 image; it must give the image as it came, uint8 8x6x3 "
                   "(end with A.Resize(8, 6)"),
])
def test_a_pipeline_that_changes_the_image_is_refused_in_one_line(tmp_path, transform, says):
    import albumentations as A
    made = {"Normalize": lambda: A.Normalize(), "RandomCrop": lambda: A.RandomCrop(4, 4)}[transform]()
    path = saved_pipeline(tmp_path / "aug.json", made)
    with pytest.raises(UserError, match=re.escape(f"--albumentations {path}: {says}")):
        load_pipeline(path, (8, 6), seed=0)


def test_a_file_that_is_no_pipeline_is_refused_in_one_line(tmp_path):
    (tmp_path / "aug.json").write_text('{"transform": {"__class_fullname__": "NoSuchTransform"}}')
    with pytest.raises(UserError, match=r"--albumentations .*aug.json: not a pipeline albumentations loads and runs \("):
        load_pipeline(tmp_path / "aug.json", (8, 6), seed=0)
    with pytest.raises(UserError, match=r"--albumentations .*missing.json: no such file"):
        load_pipeline(tmp_path / "missing.json", (8, 6), seed=0)
