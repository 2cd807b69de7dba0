"""A search space checked against train.py's own parser, without starting a trial (search/preflight.py's first
check): every key is a flag, every entry follows NNI's rules for its _type, every value it can draw (a normal's
mean) coerces to the flag's type and lies in its range, every choice is a valid name, nested choices are well
formed, no key is given twice across nesting levels, the values of different keys pass together (pairwise,
sampled), and with start_from_defaults train.py's defaults are in the space. "Pass" is every check train.py makes
before its first step: its flags', then its optimiser's and LR schedule's on the model (built without weights).
"""
import argparse
import difflib
import itertools
import json
import math
import random

from core.labels import NUM_MASK_CLASSES
from search.nni_io import train_words, trial_command

NNI_TYPES = ("choice", "randint", "uniform", "quniform", "loguniform", "qloguniform", "normal", "qnormal", "lognormal", "qlognormal")


def draws(spec, integer):
    """The values of a search-space entry that every trial must take: its ends as TPE hands them out (a normal's
    mean: its tails only warn, see spread) -> (values, problem or None). NNI 3.0's rules
    (nni/common/hpo_utils/validation.py), which its TPE never checks: it crashes or hangs on a broken entry."""
    kind, value = spec.get("_type") if isinstance(spec, dict) else None, spec.get("_value") if isinstance(spec, dict) else None
    if kind not in NNI_TYPES or not isinstance(value, list) or not value:
        return [], f"{spec!r} is not {{\"_type\": one of {', '.join(NNI_TYPES)}, \"_value\": [...]}}"
    if kind == "choice":
        return value, None
    names = ("mu, sigma" if "normal" in kind else "low, high") + (", q" if kind.startswith("q") else "")
    if len(value) != len(names.split(", ")) or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
        return [], f"{kind} needs numbers [{names}], got {value!r}"
    if kind.startswith("q") and not value[2] > 0:
        return [], f"{kind} needs q > 0 (the step its draws are rounded to), got {value[2]}"
    if "normal" in kind and not value[1] > 0:
        return [], f"{kind} needs sigma > 0, got {value[1]} in [{names}]; for one fixed value use choice [{normal_draw(kind, value, 0):g}]"
    if "normal" not in kind and not value[0] < value[1]:
        ends = " (randint draws low..high-1)" if kind == "randint" else ""
        return [], f"{kind} needs low < high, got {value[0]} and {value[1]}{ends}; for one fixed value use choice [{value[0]}]"
    if kind == "randint":
        if not all(float(v).is_integer() for v in value):
            return [], f"randint needs integer ends, got {value!r}"
        return [int(value[0]), int(value[1]) - 1], None
    if kind in ("loguniform", "qloguniform") and value[0] <= 0:
        return [], f"{kind} needs low > 0, got {value[0]}"
    if kind in ("uniform", "loguniform", "normal", "lognormal") and integer:
        return [], f"{kind} draws fractions for an integer flag: use randint, choice, or q{kind} with q 1"
    if kind.startswith("q") and integer and not float(value[2]).is_integer():
        return [], f"{kind} with q {value[2]} draws fractions for an integer flag: use q 1"
    if "normal" in kind:
        return [normal_draw(kind, value, 0)], None
    if kind.startswith("q"):  # clip(round(x / q) * q, low, high), as nni's deformat_parameters
        return [min(max(on_step(v, value[2]), value[0]), value[1]) for v in value[:2]], None
    return value[:2], None


def on_step(x, q):
    """x rounded to a multiple of q, as TPE hands out q-types (an infinite x stays: train.py refuses it)."""
    return round(x / q) * q if math.isfinite(x / q) else x


def normal_draw(kind, value, z):
    """What a normal-family entry ([mu, sigma] or [mu, sigma, q]) hands a trial z sigmas from its mean."""
    x = value[0] + z * value[1]
    if "log" in kind:
        x = math.exp(min(x, 700))  # exp(N(mu, sigma)): mu may be negative
    return on_step(x, value[2]) if kind.startswith("q") else x


def spread(spec):
    """The draws 3 sigma either side of a normal-family entry's mean (TPE does not clip them), else []."""
    if not isinstance(spec, dict) or "normal" not in str(spec.get("_type")):
        return []
    return [normal_draw(spec["_type"], spec["_value"], z) for z in (-3, 3)]


class SpaceCheck:
    """train.py's parser over trialCommand's flags: takes NNI parameter sets as a trial would."""

    def __init__(self, trial_command):
        # lazy: torch's start-up, only once a config has a space to check
        from training import flags

        self.flags, self.parser = flags, flags.build_parser()
        self.actions = self.flags.settable(self.parser)
        self.base = vars(flags.parse_flags(self.parser, train_words(trial_command), f"trialCommand {trial_command!r}"))
        self.problems, self.warnings = [], []
        self.models = {}  # a model of each set of model flags, built once: covering() asks hundreds of times

    def error(self, params):
        """train.py's refusal of NNI parameters (nested choices as NNI sends them) over trialCommand's flags, or None."""
        args = argparse.Namespace(**self.base)
        try:
            self.flags.apply_params(self.parser, args, params, "search space")
            args.weights = None  # a path on the servers, not here
            self.flags.check_args(self.flags.resolve(args))
            self.optimisation(args)
        except ValueError as e:
            return str(e).removeprefix("search space: ")
        return None

    def optimisation(self, args):
        """What train.py refuses only once its model is built, before the first step: build_recipe's parameter
        groups (--layer_decay needs a timm backbone's layer grouping), optimiser and LR schedule, by their own code.
        The model is built on the meta device without weights: its layers decide, and it costs no memory, no download.
        Its EMA copy is left out: it needs real weights, and refuses no flag."""
        import torch
        from model import create_model, num_outputs
        from optim import create_optimizer, create_scheduler, param_groups

        # --dropout adds a layer without weights: one model stands for every value (a search draws a new one each trial)
        key = json.dumps([args.model, args.classification, args.head, args.init, args.freeze_backbone, args.resize])
        if key not in self.models:
            with torch.device("meta"):  # the class count only sizes the last layer: the mask layout's stands for any
                self.models[key] = create_model(args.model, num_outputs(args.classification, NUM_MASK_CLASSES), head=args.head,
                                                init=args.init, freeze_backbone=args.freeze_backbone, resize=args.resize)
        optimizer = create_optimizer(args.optimizer, param_groups(self.models[key], args.lr, args.weight_decay, args.layer_decay),
                                     args.lr, args.weight_decay, args.momentum)
        # --epochs 0 trains as many as --steps takes on the data: any count stands for it here
        create_scheduler(args.scheduler, optimizer, args.epochs or 1, args.lr_decay_step, args.milestones, args.lr_gamma,
                         args.warmup_epochs)

    def integer(self, key):
        return self.actions[key].type is int and self.actions[key].nargs is None


def entry_values(sc, key, spec, label, wrap, top):
    """The values of one entry that train.py takes alone (wrap: value -> NNI's parameters; top: nested options
    allowed, returned unchecked); each refusal a problem, a normal tail out of range a warning."""
    if key not in sc.actions:
        near = difflib.get_close_matches(key, sc.actions, n=1, cutoff=0.5)
        sc.problems.append(f"{label}: not a train.py flag{f' (did you mean {near[0]}?)' if near else ''}; flags: {', '.join(sc.actions)}")
        return []
    values, problem = draws(spec, sc.integer(key))
    if problem:
        sc.problems.append(f"{label}: {problem}")
        return []
    options = [v for v in values if isinstance(v, dict)] if top else []
    if options:
        unnamed = next((v for v in options if "_name" not in v), None)
        if unnamed is not None or len(options) < len(values):  # NNI would hand the option's specs to the trial as they are
            sc.problems.append(f"{label}: nested choice {unnamed!r} has no '_name'" if unnamed is not None else
                               f"{label}: choice mixes nested options {{_name: ...}} with plain values: write every option as {{_name: ...}}")
            return []
        return options
    good = []
    for value in values:
        error = sc.error(wrap(value))
        sc.problems.extend([f"{label}: {error}"] if error else [])
        good += [] if error else [value]
    for value in spread(spec) if good else []:
        error = sc.error(wrap(value))
        if error:
            low, high = spread(spec)
            sc.warnings.append(f"{label}: {spec['_type']} {spec['_value']} draws {low:g}..{high:g} within 3 sigma, and train.py "
                               f"refuses {error}: a trial that draws it fails; lower sigma, or use (q)uniform, which stays in bounds")
            break
    return good


def option_values(sc, key, option):
    """What one nested option ({_name: ..., its own keys}) hands a trial, as NNI sends it: its name with each end of
    its own keys (at most 16 such sets), those train.py takes alone."""
    name = option["_name"]
    error = sc.error({key: {"_name": name}})
    if error:
        sc.problems.append(f"{key}: {error}")
        return []
    subs = []
    for sub, spec in ((k, v) for k, v in option.items() if k != "_name"):
        values = entry_values(sc, sub, spec, f"{key}={name} {sub}", lambda v, s=sub: {key: {"_name": name, s: v}}, False)
        subs += [[(sub, v) for v in values]] if values else []
    return [{"_name": name, **dict(c)} for c in itertools.islice(itertools.product(*subs), 16)]


def repeated_keys(space):
    """A key at the top level and in a nested option, or in options of two nested choices, one problem each: a trial
    then gets one value (train.py takes the last given) while NNI records another. Options of one choice exclude
    each other, so a key may recur among them."""
    places = {key: ["the top level"] for key in space}
    for key, spec in space.items():
        options = spec.get("_value") if isinstance(spec, dict) and spec.get("_type") == "choice" else None
        for option in (o for o in (options if isinstance(options, list) else []) if isinstance(o, dict) and "_name" in o):
            for sub in (k for k in option if k != "_name"):
                places.setdefault(sub, []).append(f"{key}={option['_name']}")
    return [f"{key}: given at {' and in '.join(dict.fromkeys(where))}: a trial gets one of the values (train.py takes the last "
            f"given) and NNI records another; keep {key} in one place: the top level, or the options of one choice"
            for key, where in places.items() if len({w.split('=')[0] for w in where}) > 1]


def covering(points, rng, limit):
    """Full configurations ({key: value}) in which each value of every key meets each value of every other key at
    least once (greedy pairwise covering), then a few random ones; seeded, at most limit."""
    keys = list(points)
    order = {key: n for n, key in enumerate(keys)}

    def pair(a, i, b, j):
        return ((a, i), (b, j)) if order[a] < order[b] else ((b, j), (a, i))

    uncovered = {pair(a, i, b, j) for n, a in enumerate(keys) for b in keys[n + 1:]
                 for i in range(len(points[a])) for j in range(len(points[b]))}
    configs = []
    while uncovered and len(configs) < limit:
        (a, i), (b, j) = min(uncovered)
        chosen = {a: i, b: j}
        for key in rng.sample(keys, len(keys)):
            if key not in chosen:
                gains = [sum(pair(key, c, o, chosen[o]) in uncovered for o in chosen) for c in range(len(points[key]))]
                chosen[key] = rng.choice([c for c, g in enumerate(gains) if g == max(gains)])
        uncovered -= {pair(x, chosen[x], y, chosen[y]) for x in chosen for y in chosen if order[x] < order[y]}
        configs.append(chosen)
    configs += [{key: rng.randrange(len(points[key])) for key in keys} for _ in range(min(20, limit - len(configs)))]
    return [{key: points[key][i] for key, i in sorted(c.items(), key=lambda kv: order[kv[0]])} for c in configs]


def shown(key, value):
    if isinstance(value, dict):
        return " ".join([f"{key}={value['_name']}"] + [shown(k, v) for k, v in value.items() if k != "_name"])
    return f"{key}={value if isinstance(value, str) else json.dumps(value)}"


def conflicts(sc, points, limit=300):
    """Values that train.py takes alone but refuses together (`--feed device --no_cache`), one problem per set of keys,
    each cut down to the fewest keys that still conflict."""
    if len(points) < 2:
        return []
    found = {}
    for config in covering(points, random.Random(0), limit):
        if sc.error(config) is None:
            continue
        for key in list(config):
            rest = {k: v for k, v in config.items() if k != key}
            config = rest if sc.error(rest) is not None else config
        found.setdefault(tuple(config), config)
    return [f"{' with '.join(shown(k, v) for k, v in c.items())}: {sc.error(c)}: each value passes alone, not together; "
            f"drop one of them from its entry, or make them options of one nested choice" for c in found.values()]


def space_problems(space, trial_command, warnings=None):
    """Every mistake in a search space that would stop a trial at its start or the tuner before it, one message each;
    draws that only some trials would make go to warnings (a list), when given."""
    if not isinstance(space, dict) or not space:
        return ["the search space is empty or not a mapping of flag names"]
    try:
        sc = SpaceCheck(trial_command)
    except ValueError as e:
        return [str(e)]
    sc.problems += repeated_keys(space)
    points = {}
    for key, spec in space.items():
        values = entry_values(sc, key, spec, key, lambda v, k=key: {k: v}, True)
        if values and isinstance(values[0], dict):
            values = [v for option in values for v in option_values(sc, key, option)]
        points.update({key: values} if values else {})
    sc.problems += conflicts(sc, points)
    if warnings is not None:
        warnings += sc.warnings
    return sc.problems


def defaults_problem(config, space, well_formed=True):
    """Why the tuner would stop before the first trial with start_from_defaults (the experiment then sits RUNNING
    with no trial), or None; by SafeTPE's own rule, search/nni_tuner.py's default_parameters."""
    tuner = config.get("tuner")
    if not isinstance(tuner, dict) or not isinstance(tuner.get("classArgs"), dict) or not tuner["classArgs"].get("start_from_defaults"):
        return None
    if not str(tuner.get("className", "")).endswith("SafeTPE"):
        return (f"tuner: start_from_defaults is an option of search.nni_tuner.SafeTPE, not of "
                f"{tuner.get('className') or tuner.get('name')}: use className: search.nni_tuner.SafeTPE, or drop it")
    if not well_formed:
        return None  # default_parameters reads a well-formed space, and would repeat the FAIL lines of a broken one
    from search.nni_tuner import default_parameters, first_trial_flags
    given = tuner["classArgs"].get("trial_command")
    try:
        start = first_trial_flags(given)
    except ValueError as e:
        return str(e)
    if given:  # the first trial runs trialCommand with these values: they must be trialCommand's own
        try:
            own = first_trial_flags(trial_command(config))
        except ValueError:
            own = None  # its own FAIL line says why
        differ = [k for k in space if own is not None and k in start and start[k] != own.get(k)]
        if differ:
            k = differ[0]
            return (f"tuner: trial_command differs from trialCommand in --{k} ({start[k]} there, {own.get(k)} in trialCommand): "
                    f"the first trial would not be the configuration finalize calls the defaults; give both one command "
                    f"(config_finetune.yml: a YAML anchor)")
    try:
        default_parameters(space, start)
    except ValueError as e:
        return f"{e}: widen that entry to hold it, or set start_from_defaults: false in tuner.classArgs"
    return None


def pretrained_models(command, space):
    """The backbones whose ImageNet weights every trial downloads: with --pretrained and without --weights, read as
    train.py reads the command (a command it refuses has its own FAIL line: none here)."""
    from training.flags import defaults  # lazy: torch, only for a space with backbones to look at
    try:
        base = defaults(train_words(command))
    except ValueError:
        return []
    choices = (space or {}).get("pretrained", {}).get("_value", []) if isinstance((space or {}).get("pretrained"), dict) else []
    if base["weights"] or not (base["pretrained"] or True in choices):
        return []
    spec = (space or {}).get("model")
    models = spec["_value"] if isinstance(spec, dict) and spec.get("_type") == "choice" else [base["model"]]
    return [m for m in models if isinstance(m, str) and has_imagenet_weights(m)]


def has_imagenet_weights(name):
    """BaseModel has none; a name train.py refuses has its own FAIL line, and no weights to look for."""
    from model import pretrained_stats
    try:
        return pretrained_stats(name) is not None
    except ValueError:
        return False
