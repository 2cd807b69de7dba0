"""imagedata/feed.py: the feed choice (device or loader, and why), and the device feed's batches against the loader's."""
import pytest
import torch

import dataset
from imagedata.feed import choose_feed


GIB = 2**30
FEED_CASES = {  # (requested, image bytes (None: --no_cache), device, free bytes) -> (feed, words in its line)
    "fits on the GPU": (("auto", 1 * GIB, "cuda", 10 * GIB), ("device", "1.0 GiB of decoded images copied to cuda once")),
    "half of free memory still fits": (("auto", 5 * GIB, "cuda", 10 * GIB), ("device", "up to 50% of it for images")),
    "too big for the GPU": (("auto", 6 * GIB, "cuda", 10 * GIB), ("loader", "would not fit: 10.0 GiB free on cuda")),
    "forced onto the GPU": (("device", 6 * GIB, "cuda", 10 * GIB), ("device", "--feed device")),
    "asked for the loader": (("loader", 1 * GIB, "cuda", 10 * GIB), ("loader", "--feed loader")),
    "no cache": (("auto", None, "cuda", 10 * GIB), ("loader", "no cache")),
    "CPU: the cache itself": (("auto", 200 * 2**20, "cpu", None), ("device", "the 200 MiB cache, memory-mapped")),
}


@pytest.mark.parametrize("case", FEED_CASES)
def test_feed_fits_on_the_device_or_falls_back(case):
    (requested, image_bytes, device, free), (feed, words) = FEED_CASES[case]
    chosen, line = choose_feed(requested, image_bytes, torch.device(device), free)
    assert chosen == feed and words in line and "\n" not in line, line


@pytest.mark.parametrize("image_bytes, free, words", [(None, None, "needs the decoded-image cache"),
                                                       (12 * GIB, 10 * GIB, "12.0 GiB of decoded images do not fit in the 10.0 GiB free")])
def test_a_device_feed_that_cannot_work_is_refused(image_bytes, free, words):
    with pytest.raises(ValueError, match=words):
        choose_feed("device", image_bytes, torch.device("cuda" if free else "cpu"), free)


@pytest.mark.parametrize("sampler", ["none", "weighted"])
def test_device_feed_gives_the_loaders_batches(tmp_path, demo_dir, sampler):
    """Same seed, same batches, and the same random streams after them (augmentation draws from the global one)."""
    def epochs(feed):
        torch.manual_seed(5)
        data = dataset.load_training_data(
            dataset="MaskSplitByProfileDataset", data_dir=demo_dir / "train", eval_dir=None, age_bounds=(30, 60), val_ratio=0.2,
            seed=3, kfold=0, fold=0, resize=(32, 24), augmentation="base", sampler=sampler, batch_size=16, valid_batch_size=20,
            num_workers=0, cache_dir=tmp_path / "cache", use_cache=True, device=torch.device("cpu"), feed=feed)
        batches = [batch for _ in range(2) for loader in (data.train_loader, data.val_loader) for batch in loader]
        return data, batches, torch.rand(4), [g.get_state() for g in data.generators]

    (loader, want, *want_rng), (device, got, *got_rng) = epochs("loader"), epochs("device")
    assert (loader.feed, device.feed, device.workers) == ("loader", "device", 0)
    assert len(got) == len(want) > 4
    for (x, y), (wx, wy) in zip(got, want):
        assert x.dtype == wx.dtype == torch.uint8 and x.is_contiguous()
        assert torch.equal(x, wx) and torch.equal(y, wy)
    assert torch.equal(got_rng[0], want_rng[0])
    assert all(torch.equal(a, b) for a, b in zip(got_rng[1], want_rng[1]))
