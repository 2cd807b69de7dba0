"""Check an NNI config before `nnictl create`: its search space, then every machine of a remote one.

    python baseline/preflight.py config_remote.yml [--port 8080]
    python baseline/preflight.py config_local.yml             # the search space only

The search space is checked against train.py's own parser, without starting a trial: every key
is a flag, every entry follows NNI's rules for its _type, every value it can draw (a normal's
mean) coerces to the flag's type and lies in its range, every choice is a valid name, nested
choices are well formed, no key is given twice across nesting levels, the values of different
keys pass together (pairwise, sampled), and with start_from_defaults train.py's defaults are in
the space. One FAIL line per problem; a WARN line where only some draws fail (a normal's tails).

For each machine in trainingService.machineList it prints one line, OK or FAIL:

  ssh       key login with the configured user/port/key (the `ssh` client,
            BatchMode, no known_hosts written)
  python    the interpreter NNI will use (pythonPath/python, else python3)
  nni       importable there, same version as here (the trial keeper needs it)
  torch     importable there
  trial     the interpreter of trialCommand ("python3 train.py ...") as NNI
            runs it: bash -c with pythonPath first on PATH, *after* the remote
            ~/.bashrc (bash reads it for SSH sessions; pyenv/conda lines there
            can put another python3 first): it must be the same environment
  gpu       GPU count (torch.cuda.device_count(), else nvidia-smi -L), and
            whether trialGpuNumber/maxTrialNumberPerGpu can schedule on it
  data      the --data_dir of trialCommand exists on that machine
  callback  a TCP connection from the machine back to nniManagerIp:port
            (preflight listens there itself for the duration of the check)
  weights   with --pretrained (and no --weights): the ImageNet weights of every backbone the
            search can draw are in that machine's cache, or downloadable from it

Exits 1 if any check fails, naming machine and check.
"""
import argparse
import contextlib
import difflib
import errno
import importlib.metadata
import itertools
import json
import math
import os
import random
import shlex
import socket
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script from anywhere

from core.cli import Parser  # noqa: E402

# Runs on the remote machine, fed to `python -` over SSH; prints one JSON line.
PROBE = r'''
import json, os, platform, shutil, socket, subprocess, sys
a = json.loads(sys.argv[1])
out = {"executable": sys.executable, "version": platform.python_version(), "prefix": sys.prefix}
try:
    import nni
    out["nni"] = nni.__version__
except Exception as e:
    out["nni_error"] = "%s: %s" % (type(e).__name__, e)
try:
    import torch
    out["torch"] = torch.__version__
    out["gpus"] = torch.cuda.device_count()
except Exception as e:
    out["torch_error"] = "%s: %s" % (type(e).__name__, e)
if not out.get("gpus") and shutil.which("nvidia-smi"):
    try:
        r = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30)
        out["nvidia_smi_gpus"] = sum(1 for l in r.stdout.splitlines() if l.startswith("GPU "))
    except Exception as e:
        out["nvidia_smi_error"] = str(e)
if a.get("data_dir"):
    d = os.path.expanduser(a["data_dir"])
    out["data"] = {"path": os.path.abspath(d), "is_dir": os.path.isdir(d),
                   "entries": len(os.listdir(d)) if os.path.isdir(d) else 0}
if a.get("interpreter"):
    env = dict(os.environ)
    if a.get("python_path"):
        env["PATH"] = a["python_path"] + os.pathsep + env.get("PATH", "")
    code = "import sys; print(sys.prefix)"
    try:
        r = subprocess.run(["/bin/bash", "-c", a["interpreter"] + " -c " + repr(code) + "; echo $?"],
                           env=env, capture_output=True, text=True, timeout=120)
        lines = r.stdout.split()
        out["trial"] = {"prefix": lines[0] if len(lines) > 1 else None,
                        "which": subprocess.run(["/bin/bash", "-c", "command -v " + a["interpreter"].split()[0]],
                                                env=env, capture_output=True, text=True).stdout.strip(),
                        "error": r.stderr.strip()[-300:]}
    except Exception as e:
        out["trial"] = {"prefix": None, "which": "", "error": str(e)}
def weights_state(name):
    """Where a backbone's ImageNet weights would come from on this machine: (cached|downloadable|unavailable, detail)."""
    import urllib.request
    try:
        if name.startswith("timm/"):
            import timm
            from huggingface_hub import try_to_load_from_cache
            cfg = timm.get_pretrained_cfg(name[len("timm/"):])
            if cfg is None:
                return "unavailable", "timm has no pretrained weights for it"
            if cfg.hf_hub_id:
                for f in ("model.safetensors", "pytorch_model.bin"):
                    if isinstance(try_to_load_from_cache(cfg.hf_hub_id, f), str):
                        return "cached", cfg.hf_hub_id
                url = "https://huggingface.co/%s/resolve/main/model.safetensors" % cfg.hf_hub_id
            else:
                url = cfg.url
        else:
            import torch
            if name.startswith("efficientnet"):
                from efficientnet_pytorch.utils import url_map
                url = url_map["efficientnet-" + name.split("_")[1]]
            else:
                import torchvision
                url = torchvision.models.get_model_weights(name).DEFAULT.url
            path = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(url))
            if os.path.isfile(path):
                return "cached", path
        urllib.request.urlopen(url, timeout=a.get("timeout", 10)).close()  # headers only: the body is never read
        return "downloadable", url
    except Exception as e:
        return "unavailable", "%s: %s" % (type(e).__name__, str(e).splitlines()[0] if str(e) else "")
if a.get("weights"):
    out["weights"] = {name: weights_state(name) for name in a["weights"]}
if a.get("callback"):
    host, port = a["callback"]
    try:
        with socket.create_connection((host, port), timeout=a.get("timeout", 10)):
            out["callback"] = "ok"
    except Exception as e:
        out["callback"] = "%s: %s" % (type(e).__name__, e)
print("PREFLIGHT " + json.dumps(out))
'''


@dataclass
class Machine:
    host: str
    port: int = 22
    user: str = ""
    ssh_key_file: str | None = "~/.ssh/id_rsa"
    password: str | None = None
    python_path: str | None = None
    max_trial_number_per_gpu: int = 1
    gpu_indices: list[int] | None = None
    use_active_gpu: bool = False

    @property
    def name(self):
        return f"{self.user}@{self.host}:{self.port}"


@dataclass
class Result:
    machine: Machine
    ok: list[str] = field(default_factory=list)      # "check detail" fragments, in order
    failed: list[tuple[str, str]] = field(default_factory=list)

    def good(self, check, detail):
        self.ok.append(f"{check} {detail}")

    def bad(self, check, message):
        self.failed.append((check, message))

    def line(self):
        if self.failed:
            msg = "; ".join(f"{c}: {m}" for c, m in self.failed)
            return f"FAIL {self.machine.name} {msg}"
        return f"OK   {self.machine.name} " + " | ".join(self.ok)


# ----------------------------------------------------------------------------- config
def load_config(path):
    data = yaml.safe_load(Path(path).read_text())
    if not isinstance(data, dict):
        raise ValueError(f"{path}: not a YAML mapping")
    return data


def _parse_gpu_indices(value):
    """gpuIndices (an int, "0,1" or a list) as a list of ints; None when not set."""
    if value is None:
        return None
    if isinstance(value, int):
        return [value]
    if isinstance(value, str):
        return [int(v) for v in value.split(",") if v.strip()]
    return [int(v) for v in value]


def machines_of(config):
    ts = config.get("trainingService")
    services = ts if isinstance(ts, list) else [ts]
    remote = [s for s in services if isinstance(s, dict) and s.get("platform") == "remote"]
    if not remote:
        raise ValueError("trainingService has no 'platform: remote' entry")
    machines = []
    for svc in remote:
        for m in svc.get("machineList") or []:
            machines.append(Machine(
                host=str(m["host"]), port=int(m.get("port", 22)), user=str(m.get("user", "")),
                ssh_key_file=m.get("sshKeyFile", "~/.ssh/id_rsa"), password=m.get("password"),
                python_path=m.get("pythonPath"), max_trial_number_per_gpu=int(m.get("maxTrialNumberPerGpu", 1)),
                gpu_indices=_parse_gpu_indices(m.get("gpuIndices")), use_active_gpu=bool(m.get("useActiveGpu", False)),
            ))
    if not machines:
        raise ValueError("trainingService.machineList is empty")
    return machines


def trial_command(config):
    ts = config.get("trainingService")
    cmd = config.get("trialCommand")
    if not cmd and isinstance(ts, dict):
        cmd = ts.get("trialCommand")
    return cmd or ""


def flag_value(command, flag):
    """X of `--flag X` or `--flag=X` in a shell command line, or None."""
    try:
        words = shlex.split(command)
    except ValueError:
        words = command.split()
    for i, w in enumerate(words):
        if w == flag and i + 1 < len(words):
            return words[i + 1]
        if w.startswith(flag + "="):
            return w.split("=", 1)[1]
    return None


def train_words(command):
    """The flags trialCommand gives train.py: the words after train.py (VAR=value prefixes and the interpreter skipped)."""
    try:
        words = shlex.split(command)
    except ValueError:
        return []
    return words[next((i + 1 for i, w in enumerate(words) if Path(w).name == "train.py"), len(words)):]


def interpreter_of(command):
    """First word of trialCommand after VAR=value assignments, if it looks like python, else None."""
    try:
        words = shlex.split(command)
    except ValueError:
        return None
    words = [w for w in words if not ("=" in w and not w.startswith("-") and "/" not in w.split("=")[0])]
    if words and "python" in Path(words[0]).name:
        return words[0]
    return None


def trial_gpu_number(config):
    """trialGpuNumber as an int, or None when the config does not set it."""
    ts = config.get("trainingService")
    value = config.get("trialGpuNumber")
    if value is None and isinstance(ts, dict):
        value = ts.get("trialGpuNumber")
    return None if value is None else int(value)


# ----------------------------------------------------------------------------- checks
def ssh_base(m, timeout):
    cmd = ["ssh", "-p", str(m.port), "-o", "BatchMode=yes", "-o", f"ConnectTimeout={timeout}",
           "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null", "-o", "LogLevel=ERROR"]
    if m.ssh_key_file:
        cmd += ["-i", str(Path(m.ssh_key_file).expanduser()), "-o", "IdentitiesOnly=yes"]
    return cmd + [f"{m.user}@{m.host}" if m.user else m.host]


def _last_line(text):
    lines = [l for l in text.strip().splitlines() if l.strip()]
    return lines[-1].strip() if lines else ""


@contextlib.contextmanager
def callback_listener(ip, port):
    """Listen on ip:port here, so that the remote side has something to connect to."""
    family = socket.AF_INET6 if ":" in ip else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((ip, port))
        sock.listen(64)  # the kernel completes handshakes from the backlog; nothing needs accept()
    except OSError as e:
        sock.close()
        if e.errno == errno.EADDRINUSE:
            raise RuntimeError(f"port {port} on {ip} is already in use here (an experiment running? "
                               f"pick another --port for preflight and nnictl create)") from None
        if e.errno == errno.EADDRNOTAVAIL:
            raise RuntimeError(f"nniManagerIp {ip} is not an address of this machine") from None
        raise RuntimeError(f"cannot listen on {ip}:{port}: {e}") from None
    try:
        yield sock
    finally:
        sock.close()


def gpu_problem(gpus, trial_gpus, per_gpu=1, indices=None):
    """Why NNI 3.0 would never start a trial on a host with `gpus` GPUs, or None.

    trial_gpus is trialGpuNumber (None: not set), indices the gpuIndices list (None: all).

    The trial keeper asks for trialGpuNumber / maxTrialNumberPerGpu GPUs and its
    scheduler (nni_node/common/trial_keeper/task_scheduler/scheduler.js) refuses
    `if (gpuNumber >= this.gpus.length)`: a request for all GPUs of a host, so
    trialGpuNumber: 1 on a 1-GPU host waits forever unless maxTrialNumberPerGpu >= 2.
    """
    if not trial_gpus:
        return None  # no GPU scheduling: trials see every GPU (CUDA_VISIBLE_DEVICES unset)
    per_trial = trial_gpus / per_gpu
    if gpus == 0:
        return f"trialGpuNumber {trial_gpus} but no GPU found there (NNI's scheduler stops: 'No GPU found')"
    if per_trial >= gpus:
        return (f"{gpus} GPU(s) and trialGpuNumber/maxTrialNumberPerGpu = {trial_gpus}/{per_gpu}: NNI 3.0 never "
                f"schedules a trial that asks for all GPUs of a host; set maxTrialNumberPerGpu: 2 "
                f"(or leave trialGpuNumber out)")
    usable = [i for i in (indices if indices is not None else range(gpus)) if i < gpus]
    if len(usable) < math.ceil(per_trial):
        return f"gpuIndices {indices} leave {len(usable)} usable GPU(s), a trial needs {math.ceil(per_trial)}"
    return None


# ----------------------------------------------------------------------------- the search space
NNI_TYPES = ("choice", "randint", "uniform", "quniform", "loguniform", "qloguniform", "normal", "qnormal", "lognormal", "qlognormal")


def search_space(config, config_path):
    """The config's search space: inline searchSpace, or searchSpaceFile relative to the config."""
    if "searchSpace" in config:
        return config["searchSpace"]
    if "searchSpaceFile" not in config:
        raise ValueError("no searchSpace or searchSpaceFile")
    path = Path(config_path).parent / config["searchSpaceFile"]
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"searchSpaceFile {path}: {e}") from None


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
        self.actions = {a.dest: a for a in self.parser._actions if a.dest not in ("help", "config", "resume", "print_flags")}
        self.base = vars(self.parser.parse_args(train_words(trial_command)))
        self.problems, self.warnings = [], []

    def error(self, params):
        """train.py's refusal of NNI parameters (nested choices as NNI sends them) over trialCommand's flags, or None."""
        args = argparse.Namespace(**self.base)
        try:
            self.flags.apply_params(self.parser, args, params, "search space")
            args.weights = None  # a path on the servers, not here
            self.flags.check_args(self.flags.resolve(args))
        except ValueError as e:
            return str(e).removeprefix("search space: ")
        return None

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
    sc = SpaceCheck(trial_command)
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
    with no trial), or None; by SafeTPE's own rule, baseline/nni_tuner.py's default_parameters."""
    tuner = config.get("tuner")
    if not isinstance(tuner, dict) or not isinstance(tuner.get("classArgs"), dict) or not tuner["classArgs"].get("start_from_defaults"):
        return None
    if not str(tuner.get("className", "")).endswith("SafeTPE"):
        return (f"tuner: start_from_defaults is an option of baseline.nni_tuner.SafeTPE, not of "
                f"{tuner.get('className') or tuner.get('name')}: use className: baseline.nni_tuner.SafeTPE, or drop it")
    if not well_formed:
        return None  # default_parameters reads a well-formed space, and would repeat the FAIL lines of a broken one
    from baseline.nni_tuner import default_parameters
    from training import flags
    try:
        default_parameters(space, flags.defaults())
    except ValueError as e:
        return f"{e}: widen that entry to hold it, or set start_from_defaults: false in tuner.classArgs"
    return None


def pretrained_models(command, space):
    """The backbones whose ImageNet weights every trial downloads: with --pretrained and without --weights."""
    words = train_words(command)
    choices = (space or {}).get("pretrained", {}).get("_value", []) if isinstance((space or {}).get("pretrained"), dict) else []
    if "--weights" in words or not ("--pretrained" in words or True in choices):
        return []
    spec = (space or {}).get("model")
    models = spec["_value"] if isinstance(spec, dict) and spec.get("_type") == "choice" else [flag_value(command, "--model") or "BaseModel"]
    return [m for m in models if isinstance(m, str) and m != "BaseModel"]


def _check_ssh(m, res, timeout):
    """The key login; the ssh command prefix for the next checks, or None when it failed (recorded in res)."""
    if m.password is not None and not m.ssh_key_file:
        res.bad("ssh", "password login is not checked (BatchMode); use sshKeyFile with a key in authorized_keys")
        return None
    key = Path(m.ssh_key_file).expanduser() if m.ssh_key_file else None
    if key is not None and not key.is_file():
        res.bad("ssh", f"sshKeyFile {key} not found on this machine")
        return None
    base = ssh_base(m, timeout)
    try:
        r = subprocess.run(base + ["exit 0"], stdin=subprocess.DEVNULL, capture_output=True, text=True,
                           timeout=timeout + 20)
    except subprocess.TimeoutExpired:
        res.bad("ssh", f"no answer within {timeout + 20} s")
        return None
    if r.returncode != 0:
        res.bad("ssh", f"login failed (ssh exit {r.returncode}): {_last_line(r.stderr) or 'no message'}")
        return None
    res.good("ssh", "ok")
    return base


def _probe_args(m, config, port, callback, timeout):
    """The JSON argument of PROBE: what to look at on that machine."""
    command = trial_command(config)
    return {"data_dir": flag_value(command, "--data_dir"), "python_path": m.python_path,
            "interpreter": interpreter_of(command), "timeout": timeout,
            "callback": [config.get("nniManagerIp"), port] if callback else None,
            "weights": pretrained_models(command, config.get("_space"))}


def _run_probe(m, base, args, res, timeout):
    """One probe run with the interpreter NNI uses; its answer as a dict, or None when it failed (recorded in res)."""
    if m.python_path:
        pp = shlex.quote(m.python_path.rstrip("/"))
        launcher = (f'for p in {pp}/python {pp}/python3; do [ -x "$p" ] && exec "$p" - {shlex.quote(json.dumps(args))}; '
                    f'done; echo "no python or python3 in {m.python_path}" >&2; exit 127')
    else:
        launcher = f"exec python3 - {shlex.quote(json.dumps(args))}"
    try:
        r = subprocess.run(base + [launcher], input=PROBE, capture_output=True, text=True, timeout=timeout + 300)
    except subprocess.TimeoutExpired:
        res.bad("python", "probe did not finish within the time limit")
        return None
    found = [l for l in r.stdout.splitlines() if l.startswith("PREFLIGHT ")]
    if r.returncode != 0 or not found:
        where = f"pythonPath {m.python_path}" if m.python_path else "python3 on PATH"
        res.bad("python", f"cannot run python ({where}): {_last_line(r.stderr) or f'exit {r.returncode}'}")
        return None
    info = json.loads(found[-1][len("PREFLIGHT "):])
    res.good("python", f"{info['executable']} {info['version']}")
    return info


def _judge_packages(info, args, res, local_nni):
    """nni, torch and the trial interpreter, from the probe's answer."""
    if "nni" in info:
        if info["nni"] != local_nni:
            res.bad("nni", f"nni {info['nni']} there, {local_nni} here: install nni=={local_nni} in {info['prefix']}")
        else:
            res.good("nni", info["nni"])
    else:
        res.bad("nni", f"not importable by {info['executable']} ({info['nni_error']}): pip install nni=={local_nni}")
    if "torch" in info:
        res.good("torch", info["torch"])
    else:
        res.bad("torch", f"not importable by {info['executable']} ({info['torch_error']})")

    trial = info.get("trial")
    if trial is not None:
        if trial["prefix"] is None:
            res.bad("trial", f"trialCommand's {args['interpreter']!r} does not run there: {trial['error'] or 'no output'}")
        elif os.path.realpath(trial["prefix"]) != os.path.realpath(info["prefix"]):
            res.bad("trial", f"trialCommand's {args['interpreter']!r} is {trial['which'] or '?'} (env {trial['prefix']}), "
                             f"not the pythonPath env {info['prefix']}: the remote ~/.bashrc puts it first on PATH; "
                             f"use the absolute interpreter in trialCommand or fix ~/.bashrc")
        else:
            res.good("trial", "same env")


def _judge_resources(m, config, port, callback, info, args, res):
    """gpu, data and callback, from the probe's answer."""
    gpus = info.get("gpus") or info.get("nvidia_smi_gpus") or 0
    problem = gpu_problem(gpus, trial_gpu_number(config), m.max_trial_number_per_gpu, m.gpu_indices)
    if problem:
        res.bad("gpu", problem)
    else:
        res.good("gpu", f"{gpus}" + ("" if gpus else " (CPU)"))

    data = info.get("data")
    if data is not None:
        if not data["is_dir"]:
            res.bad("data", f"--data_dir {args['data_dir']} is not a directory there")
        elif data["entries"] == 0:
            res.bad("data", f"--data_dir {data['path']} is empty there")
        else:
            res.good("data", data["path"])
    if callback:
        if info.get("callback") == "ok":
            res.good("callback", f"{config['nniManagerIp']}:{port}")
        else:
            res.bad("callback", f"cannot connect back to nniManagerIp {config['nniManagerIp']}:{port} "
                                f"({info.get('callback')}): firewall, wrong nniManagerIp or port")


def _judge_weights(info, res):
    """Every pretrained backbone's weights: cached there, or downloadable from there."""
    states = info.get("weights") or {}
    for name, (state, detail) in states.items():
        if state == "unavailable":
            res.bad("weights", f"{name}: not in the cache there and not downloadable ({detail}): add --weights FILE to "
                               f"trialCommand, or fill that server's cache once (docs/remote.md#weights-on-offline-servers)")
    if states and all(state != "unavailable" for state, _ in states.values()):
        res.good("weights", ", ".join(f"{name} {state}" for name, (state, _) in states.items()))


def check_machine(m, config, port, callback, local_nni, timeout):
    """All checks of one machine, as a Result; stops at the first check the others depend on (ssh, python)."""
    res = Result(m)
    base = _check_ssh(m, res, timeout)
    if base is None:
        return res
    args = _probe_args(m, config, port, callback, timeout)
    info = _run_probe(m, base, args, res, timeout)
    if info is None:
        return res
    _judge_packages(info, args, res, local_nni)
    _judge_resources(m, config, port, callback, info, args, res)
    _judge_weights(info, res)
    return res


def check_space(config, config_path, out):
    """The search space's FAIL lines, or one OK line -> the number of problems."""
    try:
        space = config["_space"] = search_space(config, config_path)
    except ValueError as e:
        print(f"FAIL search space: {e}", file=out)
        return 1
    warnings = []
    problems = space_problems(space, trial_command(config), warnings)
    problems += [p for p in [defaults_problem(config, space, well_formed=not problems)] if p]
    for problem in problems:
        print(f"FAIL search space {problem}", file=out)
    for warning in warnings:  # some trials fail, the search goes on
        print(f"WARN search space {warning}", file=out)
    if not problems:
        print(f"OK   search space: {len(space)} keys, every value a train.py flag value, alone and together ({', '.join(space)})", file=out)
    return len(problems)


def is_remote(config):
    ts = config.get("trainingService")
    return any(isinstance(s, dict) and s.get("platform") == "remote" for s in (ts if isinstance(ts, list) else [ts]))


def preflight(config_path, port, timeout=10, out=sys.stdout):
    try:
        config = load_config(config_path)
        machines = machines_of(config) if is_remote(config) else []
    except (OSError, ValueError, KeyError, TypeError, yaml.YAMLError) as e:
        mark = getattr(e, "problem_mark", None)  # a YAML error's own text runs over several lines
        reason = f"not valid YAML ({e.problem}, line {mark.line + 1})" if mark else " ".join(str(e).split())
        print(f"FAIL config {config_path}: {reason}", file=out)
        return 1
    failed = check_space(config, config_path, out)
    if not machines:
        print(f"preflight: {'search space ok' if not failed else f'{failed} problems, see FAIL lines'}; "
              f"no remote machines to check", file=out)
        return 1 if failed else 0
    local_nni = importlib.metadata.version("nni")
    ip = config.get("nniManagerIp")
    if not ip:
        print(f"FAIL config: nniManagerIp is not set in {config_path}: remote trial keepers cannot call back", file=out)
        failed += 1
    listener = contextlib.nullcontext()
    if ip:
        try:
            listener = callback_listener(str(ip), port)
            listener.__enter__()
        except RuntimeError as e:
            print(f"FAIL config callback: {e}", file=out)
            failed += 1
            listener, ip = contextlib.nullcontext(), None
    try:
        for m in machines:
            res = check_machine(m, config, port, bool(ip), local_nni, timeout)
            print(res.line(), file=out, flush=True)
            failed += bool(res.failed)
    finally:
        listener.__exit__(None, None, None)
    summary = f"all {len(machines)} machine(s) ready" if not failed else f"{failed} problems, see FAIL lines"
    print(f"preflight: {summary}", file=out)
    return 1 if failed else 0


def main(argv=None):
    p = Parser(prog="preflight.py", description=__doc__.split("\n\n")[0])
    p.add_argument("config", type=Path, help="NNI v3 experiment config (remote: every machine is checked too)")
    p.add_argument("--port", type=int, default=8080, help="the port of `nnictl create --port` (default: 8080)")
    p.add_argument("--timeout", type=int, default=10, help="SSH connect timeout in seconds (default: 10)")
    a = p.parse_args(argv)
    return preflight(a.config, a.port, a.timeout)


if __name__ == "__main__":
    sys.exit(main())
