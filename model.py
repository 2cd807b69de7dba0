"""Model registry: a backbone that yields features, then a head; the two head designs' outputs.

    model = create_model("efficientnet_b0", num_outputs=18, head="512-256")

`classification="multi_head"` asks for 3 + 2 + 3 outputs (mask, gender, age);
`class_log_probs` turns either design into 18-class (or C-class) log-probabilities.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F
from efficientnet_pytorch import EfficientNet

from core.files import load_untrusted
from core.labels import TASK_SIZES


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
    def build(pretrained=False):
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
    def build(pretrained=False):
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
    "BaseModel": lambda pretrained=False: BaseModel(),
    **{f"efficientnet_b{i}": efficientnet(f"b{i}") for i in range(8)},
    **{f"resnet{d}": resnet(d) for d in (18, 34, 50)},
}


class Classifier(nn.Module):
    def __init__(self, backbone, num_outputs, head=(), dropout=0.0):
        super().__init__()
        self.backbone, self.backbone_frozen = backbone, False
        layers, width = [], backbone.num_features
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
        raise ValueError(f"bad --head {spec!r}: expected sizes joined by '-', e.g. 512-256, or 'none'") from None
    if any(s <= 0 for s in sizes):
        raise ValueError(f"bad --head {spec!r}: sizes must be positive")
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


def load_weights(backbone, path):
    """Offline ImageNet weights: a state_dict (or {'state_dict': ...}) for the backbone;
    classifier keys (_fc., fc.) are ignored because our head replaces them."""
    state = load_untrusted(path, f"--weights {path}")
    state = state.get("state_dict", state) if isinstance(state, dict) else None
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        raise ValueError(f"--weights {path}: not a state_dict (a dict of tensors, or {{'state_dict': ...}})")
    # DataParallel saves "module."-prefixed keys: strip before dropping the classifier, which our head replaces
    state = {k.removeprefix("module."): v for k, v in state.items()}
    state = {k: v for k, v in state.items() if not k.startswith(("_fc.", "fc."))}
    own = backbone.state_dict()
    mismatched = [k for k, v in state.items() if k in own and v.shape != own[k].shape]
    if mismatched:
        k = mismatched[0]
        raise ValueError(f"--weights {path} does not fit this backbone: {len(mismatched)} tensors have other shapes "
                         f"(e.g. {k}: {tuple(state[k].shape)} in the file, {tuple(own[k].shape)} here; another variant?)")
    missing, unexpected = backbone.load_state_dict(state, strict=False)
    if unexpected or len(missing) == len(own):
        raise ValueError(f"--weights {path} does not fit this backbone ({len(unexpected)} unexpected keys, e.g. {unexpected[:2]})")


def create_model(name, num_outputs, head="", dropout=0.0, init="default", pretrained=False, weights=None, freeze_backbone=False):
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; valid: {', '.join(MODELS)}")
    if init not in INITS:
        raise ValueError(f"unknown init {init!r}; valid: {', '.join(INITS)}")
    backbone = MODELS[name](pretrained=pretrained and not weights)
    if not (pretrained or weights):
        init_weights(backbone, init)
    if weights:
        load_weights(backbone, weights)
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


def split_heads(logits):
    """multi_head logits (N, 8) -> mask (N, 3), gender (N, 2), age (N, 3)."""
    return torch.split(logits, TASK_SIZES, dim=1)


def class_log_probs(logits, classification):
    """Either head design -> (N, C) class log-probabilities. For multi_head the
    18-class probability is p(mask) * p(gender) * p(age)."""
    if classification != "multi_head":
        return F.log_softmax(logits.float(), dim=1)
    mask, gender, age = (F.log_softmax(t.float(), dim=1) for t in split_heads(logits))
    return (mask[:, :, None, None] + gender[:, None, :, None] + age[:, None, None, :]).flatten(1)
