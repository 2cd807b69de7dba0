"""One ONNX file that predicts as PyTorch does: checkpoints (one, a K-fold vote, a greedy ensemble, the soups) in one
graph that takes uint8 images as the decoder gives them, normalises them with each model's mean/std, turns each
model's outputs into class probabilities (engine.class_probs, as prediction does), optionally with the flipped view,
and averages them with the selection's weights. What a runtime needs to feed it (classes, input sizes, how the
images are resized and cropped) travels inside as metadata, under a content hash of the graph and every entry, so
that an edited or swapped file is refused as an edited checkpoint is. A file is kept only when onnxruntime reproduces
PyTorch on a batch and read_meta accepts it."""
import contextlib
import hashlib
import json
import os
import re
import sys
import warnings
from importlib import metadata as package_metadata
from pathlib import Path

import numpy as np
import torch

from core.cli import UserError
from core.files import replace_atomically
from imagedata.augment import Normalize
from training import checkpoint
from training.engine import class_probs

OPSET = 17           # onnxruntime 1.31 runs it everywhere; nothing here needs a newer operator
TOLERANCE = 1e-4     # largest difference of a probability between onnxruntime and PyTorch that a file may keep
FORMAT = 2           # of the metadata (a file without it was not written here); 2: with HASH_KEY, which 1 lacked
HASH_KEY = "imgcls_hash"
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
        raise UserError(f"{what} does not export to ONNX: {unsupported(e)}") from None


def check_against_torch(vote, tmp, sizes, names, what, batch=3):
    """onnxruntime against PyTorch on a batch of another size than the export's (the batch axis is dynamic)."""
    generator = torch.Generator().manual_seed(0)
    images = [torch.randint(0, 256, (batch, 3, *size), dtype=torch.uint8, generator=generator) for size in sizes]
    with torch.no_grad():
        expected = vote(*images).numpy()
    got = session(tmp, torch.device("cpu")).run([OUTPUT], {n: x.numpy() for n, x in zip(names, images)})[0]
    worst = float(np.abs(got - expected).max())
    if not worst <= TOLERANCE:
        raise UserError(f"{what}: onnxruntime's probabilities differ from PyTorch's by {worst:.2e} (more than {TOLERANCE:g}); "
                        f"the file was not kept")
    return worst


def export(sources, out, *, tta=False, exported_from="", log=print):
    """sources: [(checkpoint path, weight)], weights summing to 1 -> out, one .onnx file; UserError naming the problem
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
        graph.metadata_props.add(key=HASH_KEY, value=json.dumps(content_hash(graph)))
        onnx.save(graph, str(tmp))
        read_meta(tmp)  # the reader inference uses: a file it would refuse is not kept
        checked["worst"] = check_against_torch(vote, tmp, sizes, names, what)
    Path(out).parent.mkdir(parents=True, exist_ok=True)  # only now: a refusal above leaves nothing behind
    replace_atomically(Path(out), write)
    log(f"wrote {out}: {what}{', flip TTA inside' if tta else ''}; inputs {', '.join(f'{n} {h}x{w}' for n, (h, w) in zip(names, sizes))} "
        f"uint8 NCHW; onnxruntime matches PyTorch within {checked['worst']:.1e}")
    return props


def is_onnx(path):
    return Path(path).suffix.lower() == ".onnx"


def content_hash(graph):
    """{"graph": sha256 of the model without its metadata, "metadata": {key: sha256 of its text} for every entry but the
    hash}: the graph and every entry a reader uses (classes name the columns, inputs say what to feed, tta whether to
    flip again) or shows, per entry so that a refusal can say what changed. The entries are taken off while the
    model is serialised, and put back."""
    props = [(p.key, p.value) for p in graph.metadata_props]
    del graph.metadata_props[:]
    try:
        model = hashlib.sha256(graph.SerializeToString(deterministic=True)).hexdigest()
    finally:
        for key, value in props:
            graph.metadata_props.add(key=key, value=value)
    return dict(graph=model, metadata={k: hashlib.sha256(v.encode()).hexdigest() for k, v in props if k != HASH_KEY})


def read_meta(path):
    """An exported file's metadata (classes, layout, inputs {name: [H, W]}, tta, members, ...), checked: its content
    hash, then what prediction reads of it against the graph. UserError naming the file and the problem when it is
    missing, not ONNX, not exported here, exported before files carried a hash, edited, or does not fit its graph."""
    import onnx
    from google.protobuf.message import DecodeError
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such file")
    try:
        graph = onnx.load(str(path), load_external_data=False)
    except (DecodeError, ValueError, OSError):
        raise UserError(f"{path}: not an ONNX file") from None
    props = {}
    for p in graph.metadata_props:
        if p.key in props:  # a reader of the map keeps one of them, and which is its own business
            raise UserError(f"{path}: its metadata holds {p.key} twice (edited?)")
        props[p.key] = p.value
    if "imgcls_format" not in props:
        raise UserError(f"{path}: an ONNX file without this project's metadata (classes, input sizes): export it with imgcls-export")
    check_hash(path, graph, props)
    try:
        meta = {k: json.loads(v) for k, v in props.items()}
    except ValueError:
        raise UserError(f"{path}: its metadata is not JSON (edited?)") from None
    check_entries(path, meta)
    check_graph(path, graph, meta)
    return meta


def check_hash(path, graph, props):
    """UserError unless the file's content hash matches its graph and metadata. A hash present is checked whatever
    the format says; without one, a format-1 file (from before hashes) is refused as one to export again."""
    try:
        version = json.loads(props["imgcls_format"])
    except ValueError:
        version = None
    if not isinstance(version, int) or isinstance(version, bool):
        raise UserError(f"{path}: its metadata format {props['imgcls_format'][:20]} is not a whole number (edited?)")
    if version > FORMAT:
        raise UserError(f"{path}: metadata format {version} is newer than this code's {FORMAT} (update the code)")
    if HASH_KEY not in props:
        if version < 2:
            raise UserError(f"{path}: exported before files carried a content hash (metadata format {version}, no "
                            f"{HASH_KEY}): export it again with imgcls-export")
        raise UserError(f"{path}: metadata format {version} without its content hash ({HASH_KEY} removed?): refused, as an "
                        f"edited file would be; export it again")
    try:
        saved = json.loads(props[HASH_KEY])
    except ValueError:
        saved = None
    if not (isinstance(saved, dict) and isinstance(saved.get("graph"), str) and isinstance(saved.get("metadata"), dict)):
        raise UserError(f"{path}: damaged or edited since it was exported (its {HASH_KEY} is not a content hash)")
    now = content_hash(graph)
    changed = (["the graph"] if now["graph"] != saved["graph"] else []) + sorted(
        k for k in now["metadata"].keys() | saved["metadata"].keys() if now["metadata"].get(k) != saved["metadata"].get(k))
    if changed:
        what = ", ".join(changed[:6]) + (", ..." if len(changed) > 6 else "")
        raise UserError(f"{path}: damaged or edited since it was exported ({what} do not match its content hash)")


def is_size(value):
    return isinstance(value, list) and len(value) == 2 and all(isinstance(x, int) and not isinstance(x, bool) and x > 0 for x in value)


ENTRIES = {  # what prediction reads of a file's metadata -> (what it must be, the test)
    "classes": ("a list of distinct class names", lambda v: isinstance(v, list) and len(v) > 0
                and all(isinstance(c, str) for c in v) and len(set(v)) == len(v)),
    "layout": ("mask or folder", lambda v: v in ("mask", "folder")),
    "inputs": ("{input name: [H, W]}", lambda v: isinstance(v, dict) and len(v) > 0 and all(map(is_size, v.values()))),
    "output": ("the output's name", lambda v: isinstance(v, str)),
    "tta": ("true or false", lambda v: isinstance(v, bool)),
    "members": ("a list of the models", lambda v: isinstance(v, list) and len(v) > 0
                and all(isinstance(m, dict) and isinstance(m.get("model"), str) for m in v)),
    "exported_from": ("text", lambda v: isinstance(v, str)),
}


def check_entries(path, meta):
    """A file whose hash matches but whose entries are not what an export writes (a hash recomputed over an edit,
    a bug): refused naming the entry, rather than failing on it mid-prediction."""
    for key, (what, fits) in ENTRIES.items():
        if key not in meta:
            raise UserError(f"{path}: its metadata has no {key} (edited?)")
        if not fits(meta[key]):
            raise UserError(f"{path}: its metadata's {key} is not {what} (it is {json.dumps(meta[key])[:40]})")


def dims(value_info):
    """A graph input's or output's (element type, [dimension: its size, or None where it is named or unknown])."""
    import onnx
    t = value_info.type.tensor_type
    return (onnx.TensorProto.DataType.Name(t.elem_type).lower(),
            [d.dim_value if d.HasField("dim_value") else None for d in t.shape.dim])


def check_graph(path, graph, meta):
    """The graph takes what the metadata says it is fed (uint8 N x 3 x H x W under each input's name) and answers one
    probability per class under the output's name."""
    fed = {i.name for i in graph.graph.initializer}
    inputs = {i.name: i for i in graph.graph.input if i.name not in fed}
    if sorted(inputs) != sorted(meta["inputs"]):
        raise UserError(f"{path}: its graph's inputs ({', '.join(inputs)}) are not its metadata's ({', '.join(meta['inputs'])})")
    for name, (h, w) in meta["inputs"].items():
        kind, shape = dims(inputs[name])
        if kind != "uint8" or len(shape) != 4 or shape[1:] != [3, h, w]:
            shown = " x ".join("N" if d is None else str(d) for d in shape)
            raise UserError(f"{path}: its graph's input {name} takes {kind} {shown}, its metadata says uint8 N x 3 x {h} x {w}")
    outputs = {o.name: o for o in graph.graph.output}
    if meta["output"] not in outputs:
        raise UserError(f"{path}: its graph has no output {meta['output']} (it answers {', '.join(outputs)})")
    _, shape = dims(outputs[meta["output"]])
    if len(shape) != 2 or shape[1] != len(meta["classes"]):
        answers = (f"{shape[1]} probabilities per image" if len(shape) == 2 and shape[1] else
                   "probabilities of no fixed count" if len(shape) == 2 else f"a {len(shape)}-axis output")
        raise UserError(f"{path}: its graph answers {answers}, its metadata names {len(meta['classes'])} classes")


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
        raise UserError(f"{path}: onnxruntime cannot load it ({str(e).strip().splitlines()[0][:200]})") from None
