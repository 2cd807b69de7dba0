"""How batches reach the model: ImageDataset, the feed choice (choose_feed: DeviceBatches on the device,
or the DataLoader, Prefetched on a GPU) and the training and validation loaders for it."""
import random
import warnings

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from core.cli import UserError
from imagedata.constants import NO_CACHE_FOR_DEVICE
from imagedata.decode import decode_image


class ImageDataset(Dataset):
    """uint8 CHW tensors (+ label). Reads from the decoded array when there is one, else decodes
    the file. Augmentation happens later, on whole batches on the device (imagedata/augment.py); a
    transform (--albumentations' pipeline) runs here, per image, in the loader's workers."""

    def __init__(self, paths, size, images=None, labels=None, indices=None, transform=None):
        self.paths, self.size, self.images, self.labels, self.transform = paths, size, images, labels, transform
        self.indices = np.arange(len(paths)) if indices is None else np.asarray(indices)

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, i):
        j = int(self.indices[i])
        image = self.images[j] if self.images is not None else decode_image(self.paths[j], self.size)
        if self.transform is not None:
            image = self.transform(image=np.asarray(image))["image"]
        x = torch.from_numpy(np.array(image)).permute(2, 0, 1)  # a copy: the cache is read-only
        return (x, int(self.labels[j])) if self.labels is not None else x


PER_IMAGE = "per_image"  # what choose_feed is asked for when --albumentations transforms each image in the loader
DEVICE_SHARE = 0.5  # of the device's free memory the decoded images may take; the rest is the model's


def loader_workers(requested, cached):
    """-1 = choose: from the cache a batch is a ~1 ms gather that workers would only slow down with inter-process
    copies, on a GPU too (each worker is a fork, and several trials share the box); decoding (no cache) wants
    workers, as many as this process's share of the cores (torch's threads, set from that share by train.py)."""
    if requested >= 0:
        return requested
    return 0 if cached else min(8, torch.get_num_threads())


def choose_feed(requested, image_bytes, device, free_bytes=None):
    """How batches reach the model -> ("device" or "loader", the one line that says why).
    device: the decoded images sit on the training device (copied there once; on a CPU they are the memory-mapped
    cache itself) and each batch is one indexing there: no workers, no collate, no copy per batch. It needs the
    cache (image_bytes None: --no_cache) and, on a GPU, at most DEVICE_SHARE of its free memory (free_bytes).
    loader: the DataLoader, its workers gather or decode, the next batch is copied while this one trains."""
    size = f"{(image_bytes or 0) / 2**20:.0f} MiB" if (image_bytes or 0) < 2**30 else f"{image_bytes / 2**30:.1f} GiB"
    if requested == "device" and image_bytes is None:
        raise UserError(NO_CACHE_FOR_DEVICE)
    if requested == "loader" or image_bytes is None:
        return "loader", "data feed: loader (" + ("--feed loader)" if requested == "loader" else "no cache: the loader decodes the images)")
    if requested == PER_IMAGE:
        return "loader", "data feed: loader, not device (--albumentations runs per image in the loader's workers)"
    if device.type == "cpu":
        return "device", f"data feed: device (the {size} cache, memory-mapped, indexed in place)"
    room = f"{free_bytes / 2**30:.1f} GiB free on {device}, up to {DEVICE_SHARE:.0%} of it for images, the rest for the model"
    if image_bytes > free_bytes:  # forced or not, the copy itself would fail with CUDA's out-of-memory error
        raise UserError(f"--feed device: {size} of decoded images do not fit in the {free_bytes / 2**30:.1f} GiB free on {device}; "
                        f"use --feed auto or loader, or a smaller --resize")
    if requested == "device" or image_bytes <= DEVICE_SHARE * free_bytes:
        return "device", f"data feed: device ({size} of decoded images copied to {device} once; {room}" + \
            ("; --feed device)" if image_bytes > DEVICE_SHARE * free_bytes else ")")
    return "loader", f"data feed: loader, not device ({size} of decoded images would not fit: {room}; --feed device forces it)"


def worker_init(worker_id):
    torch.set_num_threads(1)  # workers only slice and augment; the cores belong to the model
    seed = torch.initial_seed() % 2**32
    random.seed(seed)
    np.random.seed(seed)
    transform = getattr(torch.utils.data.get_worker_info().dataset, "transform", None)
    if transform is not None:  # albumentations draws from its own generator, which every forked worker would share
        transform.set_random_seed(seed)


def device_images(images, device):
    """The uint8 (N, H, W, 3) cache as a tensor on the device: on a CPU the memory-mapped file itself (read-only,
    never written: torch's warning about that is silenced), on a GPU one copy."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        host = torch.from_numpy(images)
    return host if device.type == "cpu" else host.to(device)


class DeviceBatches:
    """A loader whose batches are drawn by indexing images that are already on the device: the epoch's order is
    drawn on the host and sent once, so no step waits for the host. It draws that order from the same batch sampler
    and random streams as a DataLoader with num_workers=0 (one number from its generator, the global one without,
    at each epoch's start), so a fixed seed gives the same batches and the same later random draws either way."""

    def __init__(self, dataset, images, labels, batch_sampler, generator=None):
        self.dataset, self.images, self.labels = dataset, images, labels  # all images (N, H, W, 3) and labels, on the device
        self.batch_sampler, self.generator = batch_sampler, generator
        self.rows = torch.as_tensor(dataset.indices, device=images.device)

    def __len__(self):
        return len(self.batch_sampler)

    def __iter__(self):
        torch.empty((), dtype=torch.int64).random_(generator=self.generator)  # the draw a DataLoader makes for worker seeds
        batches = list(self.batch_sampler)
        order = self.rows[torch.as_tensor([i for b in batches for i in b], device=self.rows.device)]
        start = 0
        for batch in batches:
            rows, start = order[start:start + len(batch)], start + len(batch)
            x = self.images[rows].permute(0, 3, 1, 2).contiguous()  # NCHW, as the loader's collate makes it
            yield x, self.labels[rows]


class Prefetched:
    """A DataLoader's batches on a GPU, each copied on a side stream while the one before trains."""

    def __init__(self, loader, device):
        self.loader, self.dataset, self.device = loader, loader.dataset, device

    def __len__(self):
        return len(self.loader)

    def __iter__(self):
        stream, current = torch.cuda.Stream(self.device), torch.cuda.current_stream(self.device)

        def upload(batch):
            with torch.cuda.stream(stream):
                return None if batch is None else [t.to(self.device, non_blocking=True) for t in batch]

        batches = iter(self.loader)
        following = upload(next(batches, None))
        while following is not None:
            current.wait_stream(stream)
            batch = following
            for t in batch:
                t.record_stream(current)  # the side stream's memory is in use on this one until the step ends
            following = upload(next(batches, None))
            yield tuple(batch)


def make_loaders(train_set, val_set, *, images, labels, sampler, generators, batch_size, valid_batch_size, num_workers, feed,
                 device):
    """The training and validation loaders for the chosen feed -> (train, val, loader workers used)."""
    workers = 0 if feed == "device" else loader_workers(num_workers, images is not None and train_set.transform is None)
    loader_kw = dict(num_workers=workers, pin_memory=device.type == "cuda", persistent_workers=workers > 0,
                     worker_init_fn=worker_init)
    train = DataLoader(train_set, batch_size, shuffle=sampler is None, sampler=sampler,
                       drop_last=len(train_set) > batch_size, generator=generators[0], **loader_kw)
    val = DataLoader(val_set, valid_batch_size, **loader_kw)
    if feed == "device":
        on_device = device_images(images, device), torch.as_tensor(labels, dtype=torch.int64, device=device)
        return DeviceBatches(train_set, *on_device, train.batch_sampler, generators[0]), \
            DeviceBatches(val_set, *on_device, val.batch_sampler), 0
    if device.type == "cuda":
        return Prefetched(train, device), Prefetched(val, device), workers
    return train, val, workers
