"""What the search tools know of NNI 3.0 itself, in one place: an experiment config (read and checked), its
training service and machines, its trial command and the train.py flags in it, its search space, `nnictl`,
the REST API, the experiment's files on disk (nnictl's registry, nni.sqlite), SSH to its machines and a
trial's output dir copied home.

Named nni_io, not nni: `python search/preflight.py` puts search/ first on sys.path, where a search/nni.py
would stand in for the nni package itself (and the tuners in search/nni_tuner.py import that).
"""
import json
import re
import shlex
import shutil
import socket
import subprocess
import sys
import tarfile
import tempfile
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import yaml

from core.cli import UserError
from core.files import write_error


# ----------------------------------------------------------------------------- the config
def load_config(path):
    """An NNI v3 experiment config (YAML, read safely) -> dict; UserError in one line naming the file when it
    cannot be read, is no YAML, or is no experiment (no trialCommand, no training service, a remote one
    without machines)."""
    path = Path(path)
    try:
        config = yaml.safe_load(path.read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        raise UserError(f"{path}: not a readable YAML file ({reason_of(e)})") from None
    problem = config_problem(config)
    if problem:
        raise UserError(f"{path}: {problem}")
    return config


def reason_of(error):
    """Why a file did not load, in a few words (a YAML error's own text runs over several lines)."""
    mark = getattr(error, "problem_mark", None)
    if isinstance(error, yaml.YAMLError):
        problem = getattr(error, "problem", None) or str(error).splitlines()[0]
        return f"{problem}, line {mark.line + 1}" if mark else problem
    return getattr(error, "strerror", None) or type(error).__name__


def config_problem(config):
    """Why a loaded YAML document is no NNI experiment config, or None."""
    if not isinstance(config, dict):
        return "not an NNI experiment config (not a mapping of its keys)"
    if not trial_command(config):
        return "not an NNI experiment config (no trialCommand)"
    services = services_of(config)
    if not services or not all(isinstance(s, dict) and s.get("platform") for s in services):
        return "not an NNI experiment config (trainingService: a mapping with a platform, or a list of them)"
    try:
        machines_of(config)
    except (ValueError, TypeError) as e:
        return str(e)
    return None


def services_of(config):
    """The training services of a config: NNI takes one mapping or a list of them (hybrid mode)."""
    ts = config.get("trainingService")
    return ts if isinstance(ts, list) else [] if ts is None else [ts]


def is_remote(config):
    return any(isinstance(s, dict) and s.get("platform") == "remote" for s in services_of(config))


def setting(config, key):
    """A key given at the top level of a config, else in its (first) training service, as NNI reads it; or None."""
    if config.get(key) is not None:
        return config[key]
    return next((s.get(key) for s in services_of(config) if isinstance(s, dict)), None)


def trial_command(config):
    return setting(config, "trialCommand") or ""


def search_space(config, config_path):
    """The config's search space: inline searchSpace, or searchSpaceFile relative to the config."""
    if "searchSpace" in config:
        return config["searchSpace"]
    if "searchSpaceFile" not in config:
        raise UserError("no searchSpace or searchSpaceFile")
    path = Path(config_path).parent / config["searchSpaceFile"]
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"searchSpaceFile {path}: {e}") from None


# ----------------------------------------------------------------------------- its machines
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
    local: bool = False  # this machine, as the local training service uses it

    @property
    def name(self):
        return "this machine" if self.local else f"{self.user}@{self.host}:{self.port}"


def gpu_indices(value):
    """gpuIndices (an int, "0,1" or a list) as a list of ints; None when not set."""
    if value is None:
        return None
    if isinstance(value, int):
        return [value]
    if isinstance(value, str):
        return [int(v) for v in value.split(",") if v.strip()]
    return [int(v) for v in value]


def machines_of(config):
    """The machineList of every remote training service ([] for a config that runs here); UserError for a remote
    service without machines."""
    machines = []
    for svc in (s for s in services_of(config) if isinstance(s, dict) and s.get("platform") == "remote"):
        for m in svc.get("machineList") or []:
            if not isinstance(m, dict) or "host" not in m:
                raise UserError(f"trainingService.machineList: {m!r} is not a machine with a host")
            machines.append(Machine(
                host=str(m["host"]), port=int(m.get("port", 22)), user=str(m.get("user", "")),
                ssh_key_file=m.get("sshKeyFile", "~/.ssh/id_rsa"), password=m.get("password"),
                python_path=m.get("pythonPath"), max_trial_number_per_gpu=int(m.get("maxTrialNumberPerGpu", 1)),
                gpu_indices=gpu_indices(m.get("gpuIndices")), use_active_gpu=bool(m.get("useActiveGpu", False)),
            ))
    if is_remote(config) and not machines:
        raise UserError("trainingService.machineList is empty")
    return machines


def local_machine(config):
    """This machine as NNI's local training service runs trials on it, or None for a config that trains elsewhere.
    imgcls-nnictl puts the bin dir of the interpreter that runs the tools first on PATH: that is its pythonPath."""
    svc = next((s for s in services_of(config) if isinstance(s, dict) and s.get("platform") == "local"), None)
    if svc is None:
        return None
    return Machine(host="localhost", ssh_key_file=None, python_path=str(Path(sys.executable).parent), local=True,
                   max_trial_number_per_gpu=int(svc.get("maxTrialNumberPerGpu", 1)), gpu_indices=gpu_indices(svc.get("gpuIndices")),
                   use_active_gpu=bool(svc.get("useActiveGpu", False)))


def ssh_base(m, timeout):
    """The ssh command that logs in to machine m as NNI does (its user, port and key), never asking anything."""
    cmd = ["ssh", "-p", str(m.port), "-o", "BatchMode=yes", "-o", f"ConnectTimeout={timeout}",
           "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null", "-o", "LogLevel=ERROR"]
    if m.ssh_key_file:
        cmd += ["-i", str(Path(m.ssh_key_file).expanduser()), "-o", "IdentitiesOnly=yes"]
    return cmd + [f"{m.user}@{m.host}" if m.user else m.host]


def python_on(m, arguments):
    """The shell command that runs machine m's python as NNI does (python, else python3, in its pythonPath; else
    python3 on PATH) with `arguments` (shell words, quoted by the caller)."""
    if not m.python_path:
        return f"exec python3 {arguments}"
    pp = shlex.quote(m.python_path.rstrip("/"))
    return (f'for p in {pp}/python {pp}/python3; do [ -x "$p" ] && exec "$p" {arguments}; done; '
            f'echo "no python or python3 in {m.python_path}" >&2; exit 127')


# ----------------------------------------------------------------------------- the trial command
def split(command):
    try:
        return shlex.split(command)
    except ValueError:  # an unbalanced quote: NNI's bash would refuse it, the checks report what they can
        return None


def flag_value(command, flag):
    """X of `--flag X` or `--flag=X` in a shell command line, or None."""
    words = split(command)
    words = command.split() if words is None else words
    for i, w in enumerate(words):
        if w == flag and i + 1 < len(words):
            return words[i + 1]
        if w.startswith(flag + "="):
            return w.split("=", 1)[1]
    return None


def train_words(command):
    """The flags trialCommand gives train.py: the words after train.py (VAR=value prefixes and the interpreter skipped)."""
    words = split(command) or []
    return words[next((i + 1 for i, w in enumerate(words) if Path(w).name == "train.py"), len(words)):]


def with_flag(words, flag, value):
    """A command's words with flag's value set: replaced where the flag is given, else appended."""
    words = list(words)
    if flag in words:
        words[words.index(flag) + 1] = str(value)
    else:
        words += [flag, str(value)]
    return words


def interpreter_of(command):
    """First word of trialCommand after VAR=value assignments, if it looks like python, else None."""
    words = [w for w in split(command) or [] if not ("=" in w and not w.startswith("-") and "/" not in w.split("=")[0])]
    if words and "python" in Path(words[0]).name:
        return words[0]
    return None


# ----------------------------------------------------------------------------- nnictl, the REST API, the files
EXPERIMENT_ID = re.compile(r"Experiment ID: (\w+)")
COLOURS = re.compile(r"\x1b\[[0-9;]*m")


def nnictl(*args, env=None, timeout=180):
    """nnictl of this interpreter, with time for its manager to start (search/nnictl.py) -> (exit code, its output,
    colours removed)."""
    proc = subprocess.run([sys.executable, "-m", "search.nnictl", *args], env=env, capture_output=True, text=True,
                          timeout=timeout)
    return proc.returncode, COLOURS.sub("", proc.stdout + proc.stderr)


def port_problem(port, why=""):
    """Why an NNI manager could not start on port here, by NNI's own test (something answers on localhost:port),
    or None. `nnictl create` meets a busy port with a traceback, finalize after planning its folds."""
    with socket.socket() as sock:
        if sock.connect_ex(("localhost", int(port))) == 0:
            return (f"port {port}{why} is in use here (an experiment on it? `imgcls-nnictl stop --port {port}`; else pick "
                    f"another port)")
    return None


def exp_id_of(nnictl_output):
    """The id `nnictl create` printed, or None."""
    found = EXPERIMENT_ID.search(COLOURS.sub("", nnictl_output))
    return found.group(1) if found else None


def rest(port, path, host="127.0.0.1", timeout=10, body=None, method=None):
    """GET /api/v1/nni/<path> of the experiment on host:port (or `method` with `body` as JSON) -> the answer as JSON.
    A GET answered with nothing (a manager still starting) raises ValueError, as any answer that is not JSON; a PUT's
    empty answer is None."""
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(f"http://{host}:{port}/api/v1/nni/{path}", data=data, method=method,
                                     headers={"Content-Type": "application/json"} if data else {})
    with urllib.request.urlopen(request, timeout=timeout) as r:
        answer = r.read().decode()
    return None if body is not None and not answer.strip() else json.loads(answer)


def registry_path(home=None):
    return (home or Path.home()) / "nni-experiments" / ".experiment"


def registry(home=None):
    """nnictl's registry of experiments: id -> {status, port, logDir, ...}; {} when there is none."""
    try:
        return json.loads(registry_path(home).read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def database(exp_id, info):
    """Where an experiment's nni.sqlite is, from its registry entry."""
    return Path(info.get("logDir") or Path.home() / "nni-experiments") / exp_id / "db" / "nni.sqlite"


def log_dir_of(db):
    """The log dir (nnimanager.log) beside an experiment's database."""
    return Path(db).parent.parent / "log"


def fetch(source, target, machines=(), names=None):
    """A trial's output dir -> target (an existing, empty dir): every file, or only those named.
    source: a local dir, or NNI's remote "host:~/path" (copied with tar over SSH as machines[host] logs in).
    UserError naming what could not be copied (a DiskFull naming the disk when it is this one that is full); what was
    copied so far is left for the caller to remove."""
    target = Path(target)
    if ":" not in source or Path(source).is_dir():
        src = Path(source)
        for name in names or [p.relative_to(src) for p in sorted(src.rglob("*")) if p.is_file()]:
            if not (src / name).is_file():
                raise UserError(f"{src / name}: missing")
            try:
                (target / name).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(src / name, target / name)
            except OSError as e:
                raise write_error(target / name, e) from None
        return
    host, path = source.split(":", 1)
    candidates = [m for m in machines if m.host == host]
    if not candidates:
        raise UserError(f"trial output {source}: no machine {host} in the experiment's machineList")
    path = path.removeprefix("~/")  # ssh runs the command in the user's home
    command = f"tar -C {shlex.quote(path)} -cf - -- " + (shlex.join(names) if names else ".")
    with tempfile.TemporaryFile() as archive:
        for machine in candidates:  # the same host may be listed once per GPU set
            archive.seek(0)
            archive.truncate()
            proc = subprocess.run([*ssh_base(machine, 15), command], stdout=archive, stderr=subprocess.PIPE, timeout=3600)
            if proc.returncode == 0:
                break
        else:
            reason = [line for line in proc.stderr.decode(errors="replace").splitlines() if line.strip()]
            raise UserError(f"{host}:{path}: could not copy ({reason[0] if reason else f'ssh exit {proc.returncode}'})")
        archive.seek(0)
        try:
            with tarfile.open(fileobj=archive) as tar:
                tar.extractall(target, filter="data")  # "data": no absolute paths, links out or devices
        except tarfile.TarError as e:
            raise UserError(f"{host}:{path}: the copy is damaged ({e})") from None
        except OSError as e:  # writing it here: a full disk, named as such
            raise write_error(Path(e.filename) if e.filename else target, e) from None
