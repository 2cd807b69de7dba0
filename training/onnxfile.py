"""One ONNX file that predicts as PyTorch does: checkpoints (one, a K-fold vote, a greedy ensemble, the soups) in one
graph that takes uint8 images as the decoder gives them, normalises them with each model's mean/std, turns each
model's outputs into class probabilities (engine.class_probs, as prediction does), optionally with the flipped view,
and averages them with the selection's weights. What a runtime needs to feed it (classes, input sizes, how the
images are resized and cropped) travels inside as metadata. A file is kept only when onnxruntime reproduces PyTorch
on a batch."""
import contextlib
import json
import os
import sys
import re
import warnings
from importlib import metadata as package_metadata
from pathlib import Path

import numpy as np
import torch

from core.files import replace_atomically
from imagedata.augment import Normalize
from training import checkpoint
from training.engine import class_probs

OPSET = 17           # onnxruntime 1.31 runs it everywhere; nothing here needs a newer operator
TOLERANCE = 1e-4     # largest difference of a probability between onnxruntime and PyTorch that a file may keep
FORMAT = 1           # of the metadata; a file without it was not written here
OUTPUT = "probs"
PREPROCESSING = ("each image upright by its EXIF orientation, RGB (transparency over white), centre-cropped to the "
                 "input's aspect ratio, resized bilinearly (PIL) to the input's H x W; fed as uint8 NCHW 0..255; "
                 "mean/std are applied inside the graph")


class Vote(torch.nn.Module):
    """uint8 images (one input per input size) -> the weighted mean of the members' class probabilities."""

    def __init__(self, members, sizes, tta):
        super().__init__()
        self.models = torch.nn.ModuleList(model for model, _, _ in members)
        self.norms = torch.nn.ModuleList(Normalize(meta["mean"], meta["std"]) for _, meta, _ in members)
        self.heads = [meta["classification"] for _, meta, _ in members]
        self.inputs = [sizes.index(tuple(meta["resize"])) for _, meta, _ in members]
        self.weights = [weight for _, _, weight in members]
        self.tta = tta

    def forward(self, *images):
        total = 0
        for model, norm, head, i, weight in zip(self.models, self.norms, self.heads, self.inputs, self.weights):
            total = total + weight * class_probs(model, norm(images[i]), head, self.tta)
        return total


def input_names(sizes):
    return ["image"] if len(sizes) == 1 else [f"image_{h}x{w}" for h, w in sizes]


def exportable(model):
    """efficientnet-pytorch's default swish is a custom autograd Function, which the exporter cannot see into; its
    plain swish computes the same."""
    for m in model.modules():
        if hasattr(m, "set_swish"):
            m.set_swish(memory_efficient=False)
    return model


def describe(sources, metas, sizes, tta, exported_from):
    """The file's metadata: what a runtime needs to feed it and read its answer, and where it came from."""
    import onnx
    import onnxruntime
    names = input_names(sizes)
    members = [dict(checkpoint=str(path), weight=weight, model=m["model"], classification=m["classification"],
                    input=names[sizes.index(tuple(m["resize"]))], mean=list(m["mean"]), std=list(m["std"]))
               for (path, weight), m in zip(sources, metas)]
    shared = {k: members[0][k] for k in ("mean", "std") if all(m[k] == members[0][k] for m in members)}
    try:
        version = package_metadata.version("nni-image-classification")
    except package_metadata.PackageNotFoundError:  # run from a copy that was never installed (NNI's code dir)
        version = "unknown"
    return dict(imgcls_format=FORMAT, classes=list(metas[0]["classes"]), layout=metas[0]["layout"],
                inputs={n: list(s) for n, s in zip(names, sizes)}, output=OUTPUT, preprocessing=PREPROCESSING, **shared,
                tta=tta, members=members, exported_from=exported_from, project_version=version, opset=OPSET,
                versions=dict(torch=torch.__version__, onnx=onnx.__version__, onnxruntime=onnxruntime.__version__))


def unsupported(error):
    """The exporter's complaint -> the operator it names, or its first line."""
    found = re.search(r"operator '([^']+)'", str(error))
    return f"operator {found.group(1)} has no ONNX form at opset {OPSET}" if found else str(error).strip().splitlines()[0]


@contextlib.contextmanager
def quiet_stdout():
    """torch 2.14's TorchScript exporter turns its C++ log on whatever verbose says (setup_onnx_logging tests the
    function _jit_is_onnx_log_enabled, always true, not its value) and writes the whole graph to file descriptor 1 on
    a failure: a refusal would be hundreds of lines, not one."""
    sys.stdout.flush()
    saved = os.dup(1)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 1)
            yield
    finally:
        os.dup2(saved, 1)
        os.close(saved)


def write_graph(vote, samples, names, tmp, what):
    """torch.onnx's TorchScript exporter (dynamo=False): it needs no extra package, and traces every model here."""
    try:
        with warnings.catch_warnings(), torch.no_grad(), quiet_stdout():
            warnings.simplefilter("ignore")  # the exporter's deprecation and tracer notes: not the user's business
            torch.onnx.export(vote, tuple(samples), str(tmp), input_names=names, output_names=[OUTPUT], opset_version=OPSET,
                              dynamic_axes={n: {0: "batch"} for n in [*names, OUTPUT]}, dynamo=False)
    except (RuntimeError, torch.onnx.errors.OnnxExporterError) as e:
        raise ValueError(f"{what} does not export to ONNX: {unsupported(e)}") from None


def check_against_torch(vote, tmp, sizes, names, what, batch=3):
    """onnxruntime against PyTorch on a batch of another size than the export's (the batch axis is dynamic)."""
    generator = torch.Generator().manual_seed(0)
    images = [torch.randint(0, 256, (batch, 3, *size), dtype=torch.uint8, generator=generator) for size in sizes]
    with torch.no_grad():
        expected = vote(*images).numpy()
    got = session(tmp, torch.device("cpu")).run([OUTPUT], {n: x.numpy() for n, x in zip(names, images)})[0]
    worst = float(np.abs(got - expected).max())
    if not worst <= TOLERANCE:
        raise ValueError(f"{what}: onnxruntime's probabilities differ from PyTorch's by {worst:.2e} (more than {TOLERANCE:g}); "
                         f"the file was not kept")
    return worst


def export(sources, out, *, tta=False, exported_from="", log=print):
    """sources: [(checkpoint path, weight)], weights summing to 1 -> out, one .onnx file; ValueError naming the problem
    (a checkpoint, classes that differ, an operator that does not export, a file that does not reproduce PyTorch)."""
    import onnx
    paths = [Path(p) for p, _ in sources]
    metas = [checkpoint.read_meta(p) for p in paths]
    checkpoint.check_compatible(paths, metas)
    sizes = list(dict.fromkeys(tuple(m["resize"]) for m in metas))  # one input per size, in the members' order
    names = input_names(sizes)
    what = f"{paths[0]} ({metas[0]['model']})" if len(paths) == 1 else f"the vote of {len(paths)} checkpoints"
    members = [(exportable(checkpoint.load_model(p)[0]), m, float(w)) for p, m, (_, w) in zip(paths, metas, sources)]
    vote = Vote(members, sizes, tta).eval()
    samples = [torch.zeros(2, 3, *size, dtype=torch.uint8) for size in sizes]
    props = describe([(p, w) for p, (_, w) in zip(paths, sources)], metas, sizes, tta, exported_from)
    checked = {}

    def write(tmp):
        write_graph(vote, samples, names, tmp, what)
        graph = onnx.load(str(tmp))
        for key, value in props.items():
            graph.metadata_props.add(key=key, value=json.dumps(value))
        onnx.save(graph, str(tmp))
        checked["worst"] = check_against_torch(vote, tmp, sizes, names, what)
    Path(out).parent.mkdir(parents=True, exist_ok=True)  # only now: a refusal above leaves nothing behind
    replace_atomically(Path(out), write)
    log(f"wrote {out}: {what}{', flip TTA inside' if tta else ''}; inputs {', '.join(f'{n} {h}x{w}' for n, (h, w) in zip(names, sizes))} "
        f"uint8 NCHW; onnxruntime matches PyTorch within {checked['worst']:.1e}")
    return props


def is_onnx(path):
    return Path(path).suffix.lower() == ".onnx"


def read_meta(path):
    """An exported file's metadata (classes, layout, inputs {name: [H, W]}, tta, members, ...); ValueError naming the file
    when it is missing, not ONNX, or not exported here."""
    import onnx
    from google.protobuf.message import DecodeError
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: no such file")
    try:
        graph = onnx.load(str(path), load_external_data=False)
    except (DecodeError, ValueError, OSError):
        raise ValueError(f"{path}: not an ONNX file") from None
    props = {p.key: p.value for p in graph.metadata_props}
    if "imgcls_format" not in props:
        raise ValueError(f"{path}: an ONNX file without this project's metadata (classes, input sizes): export it with imgcls-export")
    try:
        meta = {k: json.loads(v) for k, v in props.items()}
    except ValueError:
        raise ValueError(f"{path}: its metadata is not JSON (edited?)") from None
    if meta["imgcls_format"] > FORMAT:
        raise ValueError(f"{path}: metadata format {meta['imgcls_format']} is newer than this code's {FORMAT} (update the code)")
    return meta


def session(path, device):
    """An onnxruntime session: CUDA where asked for and installed, else the CPU."""
    import onnxruntime
    providers = ["CPUExecutionProvider"]
    if device.type == "cuda" and "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        providers.insert(0, "CUDAExecutionProvider")
    options = onnxruntime.SessionOptions()
    options.log_severity_level = 3  # warnings about unused initialisers are noise to a user
    try:
        return onnxruntime.InferenceSession(str(path), options, providers=providers)
    except Exception as e:  # onnxruntime's own error types (InvalidGraph, Fail, ...), not importable by name
        raise ValueError(f"{path}: onnxruntime cannot load it ({str(e).strip().splitlines()[0][:200]})") from None
