"""Training augmentations and normalisation, on whole batches on the training device, after the loader:
the loader then only gathers uint8 images from the cache, and no CPU worker stands between the data
and a GPU. Each augmentation takes and returns a float NCHW batch in [0, 255], with its own random
draw per image; dataset.py's TRANSFORMS names their combinations. MixUp and CutMix (create_mix) mix the labels
too: train_one_epoch applies them after the augmentation. A user's albumentations pipeline (load_pipeline) runs per image
in the loader, before them.
"""
from pathlib import Path

import numpy as np
import torch

from core.cli import UserError, one_line
from core.files import check_file


class RandomFlip(torch.nn.Module):
    def forward(self, x):
        flip = torch.rand(len(x), 1, 1, 1, device=x.device) < 0.5
        return torch.where(flip, x.flip(3), x)


class RandomAffine(torch.nn.Module):
    """Rotation, shift, zoom (and the horizontal flip, which is one more affine map)
    in a single bilinear resample; edges are filled with edge pixels."""

    def __init__(self, degrees=10.0, translate=0.05, scale=(0.9, 1.1), flip=True):
        super().__init__()
        self.degrees, self.translate, self.scale, self.flip = degrees, translate, scale, flip

    def forward(self, x):
        n, device = len(x), x.device
        angle = torch.empty(n, device=device).uniform_(-self.degrees, self.degrees).deg2rad()
        zoom = torch.empty(n, device=device).uniform_(*self.scale)
        shift = torch.empty(n, 2, device=device).uniform_(-2 * self.translate, 2 * self.translate)
        mirror = torch.where(torch.rand(n, device=device) < 0.5, -1.0, 1.0) if self.flip else torch.ones(n, device=device)
        cos, sin = angle.cos() / zoom, angle.sin() / zoom
        theta = torch.stack([torch.stack([cos * mirror, -sin, shift[:, 0]], 1),
                             torch.stack([sin * mirror, cos, shift[:, 1]], 1)], 1)
        grid = torch.nn.functional.affine_grid(theta, list(x.shape), align_corners=False)
        return torch.nn.functional.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


class ColorJitter(torch.nn.Module):
    """Brightness, contrast and saturation, each scaled by a factor in [1 - strength, 1 + strength]."""

    def __init__(self, strength=0.3):
        super().__init__()
        self.strength = strength

    def forward(self, x):
        b, c, s = (1 + torch.empty(3, len(x), 1, 1, 1, device=x.device).uniform_(-self.strength, self.strength)).unbind(0)
        x = x * b
        grey_mean = luma(x).mean((2, 3), keepdim=True)
        x = (x - grey_mean) * c + grey_mean
        grey = luma(x)
        return ((x - grey) * s + grey).clamp(0, 255)


def luma(x):
    """Grey (N, 1, H, W) of an RGB batch: plain arithmetic, as a weights tensor would be a copy to the device every step."""
    return 0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3]


class GaussianNoise(torch.nn.Module):
    def __init__(self, sigma=8.0):
        super().__init__()
        self.sigma = sigma

    def forward(self, x):
        return (x + torch.randn_like(x) * self.sigma).clamp(0, 255)



class PerImage(torch.nn.Module):
    """A torchvision v2 transform drawn for each image on its own, on the device: on a batch, v2 draws one operation and
    magnitude per call, which every image would share. uint8 in, as they expect."""

    def __init__(self, transform):
        super().__init__()
        self.transform = transform

    def forward(self, x):
        return torch.stack([self.transform(image) for image in x.round().clamp(0, 255).to(torch.uint8)]).float()


def rand_augment(magnitude):
    from torchvision.transforms import v2  # here, not at the top: seconds of imports a run without it never pays
    return PerImage(v2.RandAugment(num_ops=2, magnitude=magnitude))


def trivial_augment():
    from torchvision.transforms import v2
    return PerImage(v2.TrivialAugmentWide())


def create_mix(mixup, cutmix, num_classes):
    """--mixup / --cutmix ALPHA (0: off): torchvision's v2 MixUp and CutMix, one of them per batch when both are on ->
    a callable (float batch, labels) -> (mixed batch, soft targets (N, C)), or None."""
    from torchvision.transforms import v2
    mixes = [mix(alpha=alpha, num_classes=num_classes) for mix, alpha in ((v2.MixUp, mixup), (v2.CutMix, cutmix)) if alpha]
    return None if not mixes else mixes[0] if len(mixes) == 1 else v2.RandomChoice(mixes)


def load_pipeline(path, size, seed):
    """--albumentations FILE: a pipeline albumentations saved (A.save: .json, or .yaml / .yml) -> the pipeline, seeded,
    checked on a blank image of the run's size: it must keep the size and give uint8 HWC, as the images it feeds stay
    batched and are normalised on the device. Per image in the loader's workers (ImageDataset), not on the device."""
    check_file("--albumentations", path)
    try:
        import albumentations
    except ImportError:
        raise UserError("--albumentations needs the albumentations package: pip install albumentations") from None
    try:
        pipeline = albumentations.load(str(path), data_format="yaml" if Path(path).suffix in (".yaml", ".yml") else "json")
        out = pipeline(image=np.zeros((*size, 3), np.uint8))["image"]
    except Exception as e:  # noqa: BLE001 - whatever the file holds, one line naming it
        raise UserError(f"--albumentations {path}: not a pipeline albumentations loads and runs ({type(e).__name__}: "
                        f"{one_line(e)})") from None
    if not (isinstance(out, np.ndarray) and out.shape == (*size, 3) and out.dtype == np.uint8):
        got = f"{type(out).__name__} {getattr(out, 'dtype', '')} {tuple(getattr(out, 'shape', ()))}"
        raise UserError(f"--albumentations {path}: gives {got} for a {size[0]}x{size[1]} image; it must give the image as it "
                        f"came, uint8 {size[0]}x{size[1]}x3 (end with A.Resize({size[0]}, {size[1]}); no Normalize or ToTensorV2: "
                        f"the device normalises)")
    pipeline.set_random_seed(seed)
    return pipeline


class Normalize(torch.nn.Module):
    """uint8 or [0, 255] float NCHW batch -> normalised float, on the device."""

    def __init__(self, mean, std):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1) * 255)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1) * 255)

    def forward(self, x):
        return (x.float() - self.mean) / self.std
