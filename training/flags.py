"""train.py's flags, whole: the parser (the one source of defaults), types and ranges, the --config
file and the resumed run's flags under the command line, NNI's parameters (with Hyperband's and
BOHB's TRIAL_BUDGET) on top. The tuner and preflight import it without starting a run.

    args = parse_args(argv, nni_params)        # flags < --config or --resume's config.json < command line < NNI
    defaults(words)                             # {dest: value} of every flag as config.json spells them: the defaults, or a command's

What a flag is, beyond its type and default, is declared where it is added (`flag(..., roles=..., limit=...)`),
and every list of flags the code needs is asked of the flags as declared, one parser per process (`having(role)`, `limits()`):
    started   how this run was started (--config, --resume): not in config.json, not a parameter
    resume    fixed on resume: changing it would change what last.pth means (the split, the shapes, the optimiser)
    length    how long or on which fold a run trains, or where its data lies: not part of a configuration
              (finalize's finalists are configurations)
    kfold     set by kfold.py for each fold: refused after its --
    shape     what a model's weight shapes depend on: averaged (souped) weights must share it
"""
import argparse
import contextlib
import functools
import io
import math
import os

from core.cli import Parser, UserError
from core.files import check_file, read_mapping
from core.labels import DEFAULT_AGE_BOUNDS
from core.runs import RETRY_OF
from dataset import CSV_FLAGS, DATASETS, TRANSFORMS
from imagedata.constants import DEFAULT_CACHE_DIR, FEEDS, NO_CACHE_FOR_DEVICE
from imagedata.layouts import IMAGE_COLUMNS, LABEL_COLUMNS
from loss import LOSSES, SOFT_TARGETS
from model import CLASSIFICATIONS, DEFAULT_SIZE, INITS, TIMM_PREFIX, check_model_name, input_config
from optim import OPTIMIZERS, SCHEDULERS
from training import checkpoint
from training.tracking import TRACKERS

NAMES = {"model": check_model_name}  # names checked beyond a choices list (timm's models are too many to list)
DATA_PLACES = ("data_dir", "eval_dir", "albumentations")  # files on the machine that trains: made absolute
# What a number must be; NaN fails every test. Values outside would train on silently.
POSITIVE, NON_NEGATIVE = (lambda v: 0 < v < math.inf, "positive"), (lambda v: v >= 0, "0 or more")
FRACTION = (lambda v: 0 <= v < 1, "in [0, 1)")


def flag(g, *names, roles=(), limit=None, **kwargs):
    """g.add_argument, with what the flag is (roles, see the module docstring) and the range its value must lie in."""
    action = g.add_argument(*names, **kwargs)
    action.roles, action.limit = frozenset(roles), limit
    return action


@functools.cache
def declared():
    """The flags as declared, from one parser per process that nothing changes (parse_args builds its own)."""
    return tuple(build_parser()._actions)


def having(role):
    """The dest names of the flags declared with role, in the parser's order."""
    return tuple(dict.fromkeys(a.dest for a in declared() if role in getattr(a, "roles", ())))


def limits():
    """{dest: (test, what it must be)} of every flag declared with a limit."""
    return {a.dest: a.limit for a in declared() if getattr(a, "limit", None)}


def settable(parser):
    """{dest: action} of the flags a --config file, a resumed run's config.json or NNI may set."""
    return {a.dest: a for a in parser._actions if a.dest != "help" and "started" not in getattr(a, "roles", ())}


def build_parser():
    p = Parser(prog="train.py", description="Train an image classifier (standalone or as an NNI trial).",
               formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_data_flags(p.add_argument_group("data"))
    add_model_flags(p.add_argument_group("model"))
    add_optimisation_flags(p.add_argument_group("optimisation"))
    add_run_flags(p.add_argument_group("run"))
    return p


def add_data_flags(g):
    flag(g, "--data_dir", roles=("resume", "length"), default=None,
         help="training data (mask layout: DATA/train; folder layout: DATA/<class>/); "
              "unset = demo data in data/demo, made on first use")
    flag(g, "--eval_dir", roles=("length",), default=None,
         help="eval data to predict after training: mask layout DATA/eval; else a folder of images or a CSV of image "
              "ids (unset with demo data = the demo eval split)")
    flag(g, "--dataset", roles=("resume",), default="MaskSplitByProfileDataset", choices=list(DATASETS), help="layout and split")
    # where a CsvDataset's labels are: data, so fixed on resume and no part of a configuration
    flag(g, "--labels_csv", roles=("resume", "length"), default=None,
         help="CsvDataset: the CSV of images and labels, a file under the data dir or a path (unset: the data dir's one .csv)")
    for name, usual in (("image", IMAGE_COLUMNS), ("label", LABEL_COLUMNS)):
        flag(g, f"--{name}_column", roles=("resume", "length"), default=None,
             help=f"CsvDataset: the {name} column (unset: the first of {', '.join(usual)}, case aside)")
    flag(g, "--group_column", roles=("resume", "length"), default=None,
         help="CsvDataset: keep each group (a patient, a person, a scene) on one side of the split")
    flag(g, "--fold_column", roles=("resume", "length"), default=None,
         help="CsvDataset: the CSV's own folds, for --kfold K --fold i (K = the number of its fold values)")
    flag(g, "--age_bounds", roles=("resume",), limit=(lambda v: 0 < v[0] < v[1], "0 < LOW < HIGH"), nargs=2, type=int,
         default=list(DEFAULT_AGE_BOUNDS), metavar=("LOW", "HIGH"),
         help="age band bounds the model trains on (mask layout); validation is always scored on the data's own "
              f"bands, {DEFAULT_AGE_BOUNDS[0]} and {DEFAULT_AGE_BOUNDS[1]}")
    flag(g, "--val_ratio", roles=("resume",), limit=(lambda v: 0 < v < 1, "between 0 and 1"), type=float, default=0.2,
         help="validation share")
    flag(g, "--kfold", roles=("resume", "length", "kfold"), type=int, default=0,
         help="K for stratified group k-fold (0 = off: use --val_ratio)")
    flag(g, "--reshuffle_val", action=argparse.BooleanOptionalAction, default=False,
         help="under NNI, every trial validates on its own people: the split is seeded by --seed + the trial's "
              "sequence number (Nagler et al. 2024); no effect standalone or with --kfold")
    flag(g, "--fold", roles=("resume", "length", "kfold"), type=int, default=0, help="which fold is validation, 0..K-1")
    flag(g, "--resize", roles=("resume", "shape"), limit=(lambda v: v is None or min(v) > 0, "positive sizes"), nargs=2, type=int,
         default=None, metavar=("H", "W"),
         help=f"input size after centre crop (unset: {DEFAULT_SIZE[0]} {DEFAULT_SIZE[1]}, or a --pretrained timm model's own "
              f"input size, e.g. 224 224)")
    flag(g, "--augmentation", default="flip_affine", choices=list(TRANSFORMS),
         help="training augmentation, on the device batch (randaugment, trivialaugment: torchvision's, drawn per image)")
    flag(g, "--albumentations", default=None, metavar="FILE",
         help="a pipeline albumentations saved (A.save: .json or .yaml), run per image in the loader's workers before "
              "--augmentation (base: it alone); it must keep the image's size and type")
    flag(g, "--randaugment_magnitude", limit=(lambda v: 0 <= v <= 30, "0..30"), type=int, default=9,
         help="--augmentation randaugment's strength (torchvision's magnitude; 2 operations per image)")
    flag(g, "--mixup", limit=NON_NEGATIVE, type=float, default=0.0,
         help="MixUp's alpha (0 = off; 0.2 to 0.8 is usual): pairs of images blended, their labels as soft targets")
    flag(g, "--cutmix", limit=NON_NEGATIVE, type=float, default=0.0,
         help="CutMix's alpha (0 = off; 1.0 is usual): a patch of one image pasted into another; with --mixup, either per batch")
    flag(g, "--sampler", default="none", choices=["none", "weighted"], help="weighted = inverse class frequency")
    flag(g, "--feed", default="auto", choices=list(FEEDS),
         help="how batches reach the model: device = the decoded images on the training device, each batch one "
              "indexing there (needs the cache; on a GPU, at most half its free memory); loader = DataLoader "
              "workers; auto = device where the images fit")
    flag(g, "--num_workers", limit=(lambda v: v >= -1, "-1 (from the CPU count) or more"), type=int, default=-1,
         help="loader workers with --feed loader (-1 = from the CPU count)")
    flag(g, "--cache_dir", default=str(DEFAULT_CACHE_DIR), help="decoded-image cache shared by trials")
    flag(g, "--no_cache", action="store_true", help="decode images every epoch instead of caching them")
    flag(g, "--cache", dest="no_cache", action="store_false", help="use the cache (undoes no_cache from --config)")


def add_model_flags(g):
    flag(g, "--model", roles=("resume", "shape"), default="BaseModel", metavar="NAME",
         help=f"backbone: BaseModel, efficientnet_b0..b7, resnet18/34/50, or {TIMM_PREFIX}<name>, any timm model")
    flag(g, "--classification", roles=("resume", "shape"), default="single", choices=CLASSIFICATIONS,
         help="single 18-way head, or multi_head = mask/gender/age heads (mask layout)")
    flag(g, "--head", roles=("resume", "shape"), default="none", help="hidden layers of the head, e.g. 512-256 (BN, ReLU, dropout each)")
    flag(g, "--dropout", limit=FRACTION, type=float, default=0.2, help="dropout in the head")
    flag(g, "--init", default="default", choices=INITS, help="weight init of new layers")
    flag(g, "--pretrained", action=argparse.BooleanOptionalAction, default=False,
         help="start from ImageNet weights: --weights, else the hub caches or an installed weights package, else a download")
    flag(g, "--weights", default=None, help="offline ImageNet weights file for the backbone")
    flag(g, "--freeze_backbone", roles=("resume",), action=argparse.BooleanOptionalAction, default=False, help="train the head only")


def add_optimisation_flags(g):
    flag(g, "--epochs", roles=("length",), limit=NON_NEGATIVE, type=int, default=0,
         help="epochs (0 = as many as --steps takes on this data)")
    flag(g, "--steps", limit=POSITIVE, type=int, default=1000,
         help="training length in optimiser steps when --epochs is 0: a small data set gets more epochs, a large one fewer")
    flag(g, "--batch_size", limit=POSITIVE, type=int, default=64, help="training batch size")
    flag(g, "--valid_batch_size", limit=POSITIVE, type=int, default=256, help="validation/eval batch size")
    flag(g, "--lr", limit=POSITIVE, type=float, default=2e-3, help="learning rate")
    flag(g, "--optimizer", roles=("resume",), default="AdamW", choices=list(OPTIMIZERS), help="optimizer")
    flag(g, "--weight_decay", limit=NON_NEGATIVE, type=float, default=1e-4, help="weight decay")
    flag(g, "--momentum", limit=NON_NEGATIVE, type=float, default=0.9, help="SGD momentum")
    flag(g, "--scheduler", roles=("resume",), default="cosine", choices=list(SCHEDULERS), help="LR schedule")
    flag(g, "--lr_decay_step", limit=POSITIVE, type=int, default=20, help="step: epochs per decay; plateau: patience")
    flag(g, "--milestones", limit=(lambda v: min(v) >= 1, "epochs, counted from 1"), nargs="+", type=int, default=[10, 20, 25],
         help="multistep: epochs where LR is multiplied by --lr_gamma")
    flag(g, "--lr_gamma", limit=POSITIVE, type=float, default=0.1, help="LR decay factor (step, multistep, plateau)")
    flag(g, "--warmup_epochs", limit=NON_NEGATIVE, type=int, default=0, help="linear LR warmup over the first N epochs")
    flag(g, "--clip_grad", limit=NON_NEGATIVE, type=float, default=0.0, help="clip the gradient norm to this (0 = off)")
    flag(g, "--layer_decay", roles=("resume",), limit=FRACTION, type=float, default=0.0,
         help="layer-wise LR decay for a timm backbone (timm's grouping, e.g. 0.75: each layer's LR that much below the one "
              "above it, the head at --lr; 0 = off)")
    flag(g, "--average_epochs", roles=("resume",), limit=NON_NEGATIVE, type=int, default=0,
         help="at the end, average the weights of the best K epochs greedily (an epoch joins when validation does not drop, "
              "BatchNorm recomputed) into best.pth; 0 or 1 = off")
    flag(g, "--ema", roles=("resume",), limit=FRACTION, type=float, default=0.0,
         help="keep an exponential moving average of the weights with this decay per step (timm's ModelEmaV3, e.g. 0.999; "
              "0 = off): validation, best.pth and the eval prediction use the averaged weights")
    flag(g, "--ema_warmup", roles=("resume",), action=argparse.BooleanOptionalAction, default=False,
         help="--ema's decay grows with the step count up to DECAY (timm's warmup: 0.9 after 32 steps, 0.99 after 1000), "
              "so a short run's average does not reach back to the untrained head")
    flag(g, "--criterion", default="cross_entropy", choices=list(LOSSES),
         help="loss (weighted_cross_entropy: class weights from the training counts)")
    flag(g, "--focal_gamma", limit=NON_NEGATIVE, type=float, default=2.0, help="focal loss gamma")
    flag(g, "--smoothing", limit=FRACTION, type=float, default=0.1, help="label smoothing")
    flag(g, "--metric", roles=("resume",), default="accuracy", choices=["accuracy", "f1"],
         help="picks the best checkpoint; NNI's 'default'")
    flag(g, "--early_stopping", limit=NON_NEGATIVE, type=int, default=0, help="stop after N epochs without improvement (0 = off)")


def add_run_flags(g):
    flag(g, "--name", roles=("kfold",), default="exp", help="run name: runs/<name>, incremented (exp2, exp3, ...)")
    flag(g, "--model_dir", roles=("kfold",), default="runs", help="where runs go")
    flag(g, "--device", default="auto", choices=["auto", "cpu", "cuda"], help="auto = CUDA when available")
    flag(g, "--amp", action=argparse.BooleanOptionalAction, default=False, help="mixed precision on CUDA (bf16 where supported, else fp16)")
    flag(g, "--channels_last", action=argparse.BooleanOptionalAction, default=False,
         help="channels-last memory format: faster convolutions on CUDA, often on a CPU too (docs/speed.md)")
    flag(g, "--threads", limit=NON_NEGATIVE, type=int, default=0,
         help="torch's CPU threads (0 = OMP_NUM_THREADS where set, else the cores this process may use, shared among "
              "its NNI experiment's trials running beside it on this machine)")
    flag(g, "--cudnn_benchmark", action=argparse.BooleanOptionalAction, default=False,
         help="autotune every convolution shape on CUDA: faster steps after a much longer first one; "
              "pays in long runs (measured in docs/speed.md)")
    flag(g, "--compile", default="none", choices=["none", "default", "reduce-overhead", "max-autotune"],
         help="torch.compile the model in this mode (reduce-overhead adds CUDA graphs on a GPU): its first steps "
              "wait for the compile, train and eval each, then steps run faster; whether it pays within a run "
              "is measured by bench/benchmark.py --compile (docs/speed.md)")
    flag(g, "--tracker", nargs="*", default=[], choices=list(TRACKERS),  # "*": config.json's [] read back as words parses
         help="also log the run to these (flags, epochs, figures, summary): W&B offline into the run dir without an API key")
    flag(g, "--tracker_uri", default=None,
         help="MLflow's tracking server or store (default: sqlite:///MODEL_DIR/mlflow.db, its files in MODEL_DIR/mlruns)")
    flag(g, "--tracker_project", default="imgcls",
         help="the W&B project (WANDB_PROJECT wins) or MLflow experiment of a standalone run; an NNI trial's is its experiment")
    flag(g, "--tracker_checkpoint", action=argparse.BooleanOptionalAction, default=False, help="upload best.pth to the trackers too")
    flag(g, "--seed", roles=("resume",), type=int, default=42, help="random seed")
    flag(g, "--config", roles=("started",), default=None, help="JSON/YAML file of flag values (keys = dest names); flags override it")
    flag(g, "--resume", roles=("started", "kfold"), default=None, help="last.pth of a run to continue in its directory")
    flag(g, "--print_flags", roles=("started",), action="store_true",
         help="print every flag's value (after --config, --resume and NNI's parameters) as JSON and exit, "
              "reading and writing nothing else")


# ----------------------------------------------------------------------------- values from files and NNI
def coerce(action, value):
    """A value from a config file or NNI -> the type its flag would give, or UserError."""
    key = action.dest
    if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction, argparse.BooleanOptionalAction)):
        if not isinstance(value, bool):
            raise UserError(f"parameter {key!r} must be true/false, got {value!r}")
        return value
    if action.nargs is not None:
        if not isinstance(value, (list, tuple)) or (action.nargs == 2 and len(value) != 2):
            raise UserError(f"parameter {key!r} must be a list of {action.nargs} values, got {value!r}")
        return [coerce_one(action, key, v) for v in value]
    return coerce_one(action, key, value)


def coerce_one(action, key, value):
    kind = action.type or str
    if value is None and action.default is None:
        return None
    if kind is int and isinstance(value, float) and value.is_integer():  # TPE's quniform yields 32.0
        value = int(value)
    ok = isinstance(value, str) if kind is str else (isinstance(value, (int, float)) and not isinstance(value, bool))
    if not ok or (kind is int and not isinstance(value, int)):
        raise UserError(f"parameter {key!r} must be {kind.__name__}, got {value!r}")
    value = kind(value)
    if action.choices is not None and value not in action.choices:
        raise UserError(f"parameter {key!r}: {value!r} is not one of {', '.join(map(str, action.choices))}")
    if key in NAMES:
        try:
            NAMES[key](value)
        except ValueError as e:
            raise UserError(f"parameter {key!r}: {e}") from None
    return value


def apply_params(parser, args, params, source):
    """Merge a {dest: value} dict (config file or NNI; nested {"_name": ...} choices
    flattened) into args. Unknown keys and wrong types stop the run."""
    actions = settable(parser)
    flat = {}
    for key, value in params.items():
        if isinstance(value, dict):
            value = dict(value)
            if "_name" not in value:
                raise UserError(f"{source}: parameter {key!r} is a dict without '_name'")
            flat[key] = value.pop("_name")
            flat.update(value)
        else:
            flat[key] = value
    for key, value in flat.items():
        if key not in actions:
            raise UserError(f"{source}: unknown parameter {key!r}; valid: {', '.join(actions)}")
        try:
            setattr(args, key, coerce(actions[key], value))
        except ValueError as e:
            raise UserError(f"{source}: {e}") from None
    return args


def trial_flags(params):
    """A trial's parameters as train.py's flags. RETRY_OF goes: it says what the trial continues, not how it trains.
    NNI's Hyperband and BOHB add TRIAL_BUDGET to each trial's parameters (R / max_budget in their classArgs is the
    longest trial): here a budget is epochs, rounded up (BOHB's are floats)."""
    params = {k: v for k, v in params.items() if k != RETRY_OF}
    if "TRIAL_BUDGET" not in params:
        return params
    budget = params.pop("TRIAL_BUDGET")
    if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not 0 < budget < 1e6:
        raise UserError(f"TRIAL_BUDGET must be a positive number of epochs, got {budget!r}")
    params["epochs"] = math.ceil(budget - 1e-6)
    return params


def parse_args(argv=None, nni_params=None):
    """Flags given on the command line over (--config file or the resumed run's config) over defaults;
    then NNI's parameters (a trial's nni.get_next_parameter()) on top."""
    parser = build_parser()
    args = parser.parse_args(argv)
    base = vars(parser.parse_args([]))
    explicit = given_flags(argv)
    if args.resume:
        check_file("--resume", args.resume)
        saved = checkpoint.read_meta(args.resume).get("args", {})
        args = apply_params(parser, argparse.Namespace(**base), saved, f"--resume {args.resume}")
        check_resume(args, explicit)
    elif args.config:
        args = apply_params(parser, argparse.Namespace(**base), read_mapping(args.config, "--config"), f"--config {args.config}")
    vars(args).update(explicit)
    if nni_params is not None:
        apply_params(parser, args, trial_flags(nni_params), "NNI parameters")
    check_args(args)
    return resolve(args)


def resolve(args):
    """Fill in what depends on other flags: an unset --resize is a pretrained timm model's own input size, else
    DEFAULT_SIZE; the data dirs made absolute. config.json then records the size and the dirs the run used."""
    args.resize = list(input_config(args.model, args.resize, args.pretrained)[0])
    for key in DATA_PLACES:  # absolute: the tools that rebuild a run's split find its data from any directory
        if getattr(args, key):
            setattr(args, key, os.path.abspath(os.path.expanduser(getattr(args, key))))
    return args


def given_flags(argv):
    """{dest: value} of the flags on the command line, also those equal to their default."""
    parser = build_parser()
    for action in parser._actions:
        action.default = argparse.SUPPRESS
    return vars(parser.parse_args(argv))


def run_config(args):
    """The resolved flags, re-runnable with --config (config.json, and a checkpoint's args)."""
    started = having("started")
    return {k: v for k, v in vars(args).items() if k not in started}


def defaults(words=(), what="train.py"):
    """{dest: value} of every flag that config.json holds: train.py's defaults (with `words`' flags), without running it.
    Flags train.py refuses raise ValueError naming `what`."""
    return run_config(resolve(parse_flags(build_parser(), list(words), what)))


def parse_flags(parser, words, what):
    """parser.parse_args(words), a refusal raised as ValueError naming `what` rather than argparse's exit: preflight
    goes on to its other checks, and a tuner's dispatcher says why it stopped."""
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            return parser.parse_args(words)
    except SystemExit:
        said = (err.getvalue().strip().splitlines() or ["its flags do not parse"])[-1]
        raise UserError(f"{what}: {said.split(' error: ', 1)[-1]}") from None


# ----------------------------------------------------------------------------- ranges
def check_args(args):
    for key, (ok, must) in limits().items():
        value = getattr(args, key)
        if not ok(value):
            raise UserError(f"--{key} {' '.join(map(str, value)) if isinstance(value, list) else value}: must be {must}")
    check_model_name(args.model)
    if args.kfold and not (args.kfold >= 2 and 0 <= args.fold < args.kfold):
        raise UserError(f"--kfold {args.kfold} --fold {args.fold}: need K >= 2 and 0 <= fold < K")
    if args.weights:
        check_file("--weights", args.weights)
    if args.feed == "device" and args.no_cache:  # here too, not only when the data is read: preflight runs this
        raise UserError(NO_CACHE_FOR_DEVICE)
    if args.feed == "device" and args.albumentations:
        raise UserError("--albumentations runs per image in the loader's workers: give --feed auto or loader, not device")
    if args.ema_warmup and not args.ema:  # else config.json would record a warmup of nothing
        raise UserError("--ema_warmup warms up --ema's moving average, which is off (--ema 0): give --ema DECAY too, "
                        "or drop --ema_warmup")
    given = [k for k in CSV_FLAGS if getattr(args, k)]
    if given and args.dataset != "CsvDataset":
        raise UserError(f"--{given[0]} reads a CSV data set: give --dataset CsvDataset too, or drop it")
    if (args.mixup or args.cutmix) and (args.criterion not in SOFT_TARGETS or args.classification != "single"):
        raise UserError(f"--mixup and --cutmix train on soft targets: they need --classification single and a criterion of "
                        f"{', '.join(SOFT_TARGETS)}, not {args.classification} with {args.criterion}")
    if args.classification == "multi_head" and DATASETS[args.dataset][0] != "mask":
        raise UserError(f"--classification multi_head needs a mask-layout dataset, not {args.dataset}")


def check_resume(saved, explicit):
    """A resumed run continues the same training: refuse flags that would change what last.pth means."""
    fixed = having("resume")

    def same(key):  # config.json holds the data dirs absolute
        given, was = explicit[key], getattr(saved, key)
        return given == was or (key in DATA_PLACES and given and was and os.path.abspath(given) == os.path.abspath(was))
    changed = [k for k in fixed if k in explicit and not same(k)]
    if changed:
        k = changed[0]
        raise UserError(f"--resume: --{k} {explicit[k]} differs from the run's {getattr(saved, k)}; resuming cannot change "
                        f"{', '.join(fixed)} (start a new run with --config on its config.json instead)")
