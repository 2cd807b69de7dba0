import pytest
import torch

import model as M


@pytest.fixture(autouse=True)
def seed():
    torch.manual_seed(0)


@pytest.mark.parametrize("classification", M.CLASSIFICATIONS)
@pytest.mark.parametrize("name", list(M.MODELS))
def test_forward_shape_and_finite(name, classification):
    outputs = M.num_outputs(classification, 18)
    net = M.create_model(name, outputs, head="32").eval()
    with torch.no_grad():
        logits = net(torch.randn(2, 3, 64, 48))
    assert logits.shape == (2, 8 if classification == "multi_head" else 18)
    assert torch.isfinite(logits).all()
    probs = M.class_log_probs(logits, classification).exp()
    assert probs.shape == (2, 18)
    assert torch.allclose(probs.sum(1), torch.ones(2), atol=1e-5)


def test_multi_head_product_matches_heads():
    logits = torch.randn(4, 8)
    probs = M.class_log_probs(logits, "multi_head").exp()
    mask, gender, age = (t.softmax(1) for t in M.split_heads(logits))
    # class 11 = incorrect(1) * 6 + female(1) * 3 + old(2)
    assert torch.allclose(probs[:, 11], mask[:, 1] * gender[:, 1] * age[:, 2])


def test_head_spec_builds_bn_relu_dropout():
    net = M.create_model("BaseModel", 5, head="64-32", dropout=0.3)
    kinds = [type(m).__name__ for m in net.head]
    assert kinds == ["Linear", "BatchNorm1d", "ReLU", "Dropout"] * 2 + ["Linear"]
    assert net.head[0].out_features == 64 and net.head[4].out_features == 32 and net.head[-1].out_features == 5
    assert net.head[3].p == 0.3


@pytest.mark.parametrize("spec", ["512-abc", "0", "-5"])
def test_bad_head_spec(spec):
    with pytest.raises(ValueError, match="--head"):
        M.create_model("BaseModel", 5, head=spec)


def test_freeze_backbone_really_freezes():
    net = M.create_model("resnet18", 18, freeze_backbone=True)
    assert all(not p.requires_grad for p in net.backbone.parameters())
    assert all(p.requires_grad for p in net.head.parameters())
    before = [p.clone() for p in net.backbone.parameters()]
    opt = torch.optim.SGD([p for p in net.parameters() if p.requires_grad], lr=0.1)
    net(torch.randn(2, 3, 64, 64)).sum().backward()
    opt.step()
    assert all(torch.equal(a, b) for a, b in zip(before, net.backbone.parameters()))


@pytest.mark.parametrize("init", ["xavier", "kaiming"])
def test_init_changes_weights(init):
    torch.manual_seed(0)
    default = M.create_model("BaseModel", 3)
    torch.manual_seed(0)
    custom = M.create_model("BaseModel", 3, init=init)
    assert not torch.equal(default.head[-1].weight, custom.head[-1].weight)
    assert torch.count_nonzero(custom.head[-1].bias) == 0


@pytest.mark.parametrize("name", ["efficientnet_b0", "resnet18"])
def test_offline_weights_file_is_loaded(tmp_path, name):
    source = M.MODELS[name]()
    with torch.no_grad():
        for p in source.parameters():
            p.fill_(0.125)
    path = tmp_path / "imagenet.pth"
    torch.save(source.state_dict(), path)
    net = M.create_model(name, 18, pretrained=True, weights=str(path))
    assert all(torch.all(p == 0.125) for p in net.backbone.parameters())
    assert not torch.all(net.head[-1].weight == 0.125)


def test_weights_file_errors(tmp_path):
    with pytest.raises(ValueError, match="no such file"):
        M.create_model("efficientnet_b0", 18, weights=str(tmp_path / "nowhere.pth"))
    torch.save(M.MODELS["resnet18"]().state_dict(), tmp_path / "resnet.pth")
    with pytest.raises(ValueError, match="does not fit"):
        M.create_model("efficientnet_b0", 18, weights=str(tmp_path / "resnet.pth"))


def test_failed_download_names_weights_flag(monkeypatch, tmp_path):
    # a dead proxy stands in for a machine without internet, whatever the machine has
    for var in ("https_proxy", "HTTPS_PROXY", "http_proxy", "HTTP_PROXY"):
        monkeypatch.setenv(var, "http://127.0.0.1:9")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(M.WeightsError, match="--weights"):
        M.create_model("efficientnet_b0", 18, pretrained=True)


def test_unknown_names_list_valid_ones():
    with pytest.raises(ValueError, match="BaseModel.*efficientnet_b7.*resnet50"):
        M.create_model("vgg16", 18)
    with pytest.raises(ValueError, match="xavier"):
        M.create_model("BaseModel", 18, init="orthogonal")


def test_weights_of_another_variant_is_one_clear_error(tmp_path):
    torch.save(M.MODELS["efficientnet_b1"]().state_dict(), tmp_path / "b1.pth")
    with pytest.raises(ValueError, match=r"b1.pth does not fit efficientnet_b0: \d+ tensors have other shapes .*another variant"):
        M.create_model("efficientnet_b0", 18, weights=str(tmp_path / "b1.pth"))


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_weights_of_a_smaller_sibling_are_refused_not_half_loaded(tmp_path, suffix):
    # resnet18's keys are a subset of resnet34's with the same shapes: only the tensors it lacks tell them apart
    import timm
    from safetensors.torch import save_file
    state, path = timm.create_model("resnet18", num_classes=0).state_dict(), tmp_path / f"resnet18{suffix}"
    save_file(state, path) if suffix == ".safetensors" else torch.save(state, path)
    with pytest.raises(ValueError) as e:
        M.create_model("timm/resnet34", 18, weights=str(path))
    assert str(e.value) == (f"--weights {path} does not fit timm/resnet34: 80 of 180 tensors would stay random "
                            f"(e.g. layer1.2.conv1.weight); another backbone?")
    net = M.create_model("timm/resnet18", 18, weights=str(path))
    assert net.backbone.state_dict().keys() == state.keys()
    assert all(torch.equal(v, state[k]) for k, v in net.backbone.state_dict().items())


def test_weights_without_batchnorm_counters_load(tmp_path):
    # torchvision's own ImageNet files predate num_batches_tracked: a file without them is whole
    source = M.MODELS["resnet18"]()
    torch.save({k: v for k, v in source.state_dict().items() if not k.endswith("num_batches_tracked")}, tmp_path / "old.pth")
    net = M.create_model("resnet18", 18, weights=str(tmp_path / "old.pth"))
    assert all(torch.equal(p, q) for p, q in zip(net.backbone.parameters(), source.parameters()))


def test_weights_saved_under_data_parallel_load(tmp_path):
    from efficientnet_pytorch import EfficientNet
    source = EfficientNet.from_name("efficientnet-b0")  # with its ImageNet classifier, as such files come
    with torch.no_grad():
        for p in source.parameters():
            p.fill_(0.25)
    torch.save({f"module.{k}": v for k, v in source.state_dict().items()}, tmp_path / "dp.pth")
    net = M.create_model("efficientnet_b0", 18, pretrained=True, weights=str(tmp_path / "dp.pth"))
    assert all(torch.all(p == 0.25) for p in net.backbone.parameters())


def test_frozen_backbone_keeps_batchnorm_statistics():
    torch.manual_seed(0)
    net = M.create_model("BaseModel", 5, head="16", freeze_backbone=True)
    before = {k: v.clone() for k, v in net.backbone.state_dict().items()}
    opt = torch.optim.SGD([p for p in net.parameters() if p.requires_grad], lr=0.1)
    net.train()
    for _ in range(3):
        loss = net(torch.randn(8, 3, 32, 24) * 3 + 1).logsumexp(1).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert all(torch.equal(before[k], v) for k, v in net.backbone.state_dict().items())
    assert net.training and net.head.training and not net.backbone.training
    assert not torch.equal(net.head[1].running_mean, torch.zeros(16))  # the head's own BatchNorm still learns


@pytest.mark.parametrize("name", list(M.MODELS))
def test_batchnorm_running_statistics_keep_up(name):
    # efficientnet-pytorch's own momentum, 0.01, left efficientnet_b0 trained from scratch predicting one class
    # in eval mode for all 8 epochs of a run (validation accuracy 0.18 throughout); at 0.1 it reached 0.84 in 6.
    net = M.create_model(name, 18)
    momenta = {m.momentum for m in net.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)}
    assert momenta == {0.1}


# ----------------------------------------------------------------------------- timm backbones
# timm's own test models: the architectures of EfficientNet, ConvNeXt, ViT (fixed input size) and ResNet at a
# size a CPU test builds in well under a second, and MobileNetV3 (its pre-logits layer is wider than its
# num_features); random weights, nothing is downloaded
TIMM_MODELS = ["timm/test_efficientnet", "timm/test_convnext", "timm/test_vit", "timm/test_resnet", "timm/mobilenetv3_small_050"]


@pytest.mark.parametrize("classification", M.CLASSIFICATIONS)
@pytest.mark.parametrize("name", TIMM_MODELS)
def test_timm_forward_shape_and_finite(name, classification):
    net = M.create_model(name, M.num_outputs(classification, 18), head="32", resize=(64, 48)).eval()
    with torch.no_grad():
        logits = net(torch.randn(2, 3, 64, 48).contiguous(memory_format=torch.channels_last))
    assert logits.shape == (2, 8 if classification == "multi_head" else 18) and torch.isfinite(logits).all()
    assert torch.allclose(M.class_log_probs(logits, classification).exp().sum(1), torch.ones(2), atol=1e-5)


@pytest.mark.parametrize("name", TIMM_MODELS[:2])
def test_timm_freeze_backbone_really_freezes(name):
    net = M.create_model(name, 18, freeze_backbone=True)
    assert not any(p.requires_grad for p in net.backbone.parameters())
    assert all(p.requires_grad for p in net.head.parameters())


def timm_weights(name, value):
    """A timm model's whole state_dict, its ImageNet classifier included, as such files come."""
    import timm
    source = timm.create_model(name.removeprefix("timm/"))
    with torch.no_grad():
        for p in source.parameters():
            p.fill_(value)
    return source.state_dict()


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
@pytest.mark.parametrize("name", TIMM_MODELS)
def test_timm_offline_weights_in_both_formats(tmp_path, name, suffix):
    from safetensors.torch import save_file
    state, path = timm_weights(name, 0.125), tmp_path / f"imagenet{suffix}"
    save_file(state, path) if suffix == ".safetensors" else torch.save(state, path)
    net = M.create_model(name, 18, pretrained=True, weights=str(path), resize=(64, 48))  # a ViT's made for 160
    assert all(torch.allclose(p, torch.full_like(p, 0.125)) for p in net.backbone.parameters())
    assert not torch.all(net.head[-1].weight == 0.125)


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_timm_weights_of_another_model_refused(tmp_path, suffix):
    from safetensors.torch import save_file
    state, path = timm_weights("timm/test_convnext", 0.5), tmp_path / f"convnext{suffix}"
    save_file(state, path) if suffix == ".safetensors" else torch.save(state, path)
    with pytest.raises(ValueError, match=r"convnext.* does not fit timm/test_efficientnet"):
        M.create_model("timm/test_efficientnet", 18, weights=str(path))
    path.write_bytes(b"not weights at all")
    with pytest.raises(ValueError, match="not a (safetensors|PyTorch) file|refused"):
        M.create_model("timm/test_efficientnet", 18, weights=str(path))


def test_timm_unknown_name_is_one_line_with_the_nearest():
    with pytest.raises(ValueError) as e:
        M.create_model("timm/convnext_tinny", 18)
    assert len(str(e.value).splitlines()) == 1 and "nearest: timm/convnext_tiny" in str(e.value), e.value
    with pytest.raises(ValueError, match=r"unknown timm model 'efficientnet_b0x'; nearest: timm/efficientnet_b0"):
        M.check_model_name("timm/efficientnet_b0x")


def test_timm_failed_download_names_weights_flag(monkeypatch, tmp_path):
    from huggingface_hub import constants
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # a server without internet, at once instead of after retries
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    with pytest.raises(M.WeightsError, match=r"no ImageNet weights for timm/test_efficientnet here: not in huggingface_hub's cache "
                                             r"or torch.hub's .*no weights package for it, and the download failed .*--weights FILE"):
        M.create_model("timm/test_efficientnet", 18, pretrained=True)


@pytest.mark.parametrize("name,stats", [("timm/test_convnext", ((0.5,) * 3, (0.5,) * 3)), ("resnet18", M.IMAGENET_STATS),
                                        ("timm/test_efficientnet", M.IMAGENET_STATS), ("BaseModel", None)])
def test_pretrained_stats_are_the_weights_own(name, stats):
    assert M.pretrained_stats(name) == stats
