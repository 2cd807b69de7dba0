"""Training augmentations and normalisation, on whole batches on the training device, after the loader:
the loader then only gathers uint8 images from the cache, and no CPU worker stands between the data
and a GPU. Each augmentation takes and returns a float NCHW batch in [0, 255], with its own random
draw per image; dataset.py's TRANSFORMS names their combinations. MixUp and CutMix mix the labels too: the recipe's.
"""
import torch


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


class Normalize(torch.nn.Module):
    """uint8 or [0, 255] float NCHW batch -> normalised float, on the device."""

    def __init__(self, mean, std):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1) * 255)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1) * 255)

    def forward(self, x):
        return (x.float() - self.mean) / self.std
