"""The data code behind dataset.py's registries, one module per concern (middle layer, with dataset.py;
it never imports dataset.py). Named imagedata, not data: data/ holds the users' and the demo's images,
and .gitignore and .nniignore leave it out, so NNI would not upload a package there.

    constants  what the flags need (feeds, cache dir, the dataset and augmentation names): no torch, numpy or PIL
    layouts    image files, the mask and folder layouts, the eval dir, DataError
    split      random, by profile, k-fold
    decode     the one decoder, and the decoded-image cache shared by trials (locks, temp files)
    augment    the GPU augmentations and Normalize, on whole batches on the device
    feed       ImageDataset, the feed choice (DeviceBatches, the DataLoader, Prefetched), the loaders
"""
