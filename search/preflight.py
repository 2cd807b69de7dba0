"""Check an NNI config before `nnictl create`: its search space, then every machine it trains on.

    python search/preflight.py config_remote.yml [--port 8080]
    python search/preflight.py config_local.yml             # the search space and this machine

The search space is checked against train.py's own parser, without starting a trial: every key
is a flag, every entry follows NNI's rules for its _type, every value it can draw (a normal's
mean) coerces to the flag's type and lies in its range, every choice is a valid name, nested
choices are well formed, no key is given twice across nesting levels, the values of different
keys pass together (pairwise, sampled; train.py's optimiser and LR schedule on the model too), and
with start_from_defaults train.py's defaults are in the space. One FAIL line per problem; a WARN
line where only some draws fail (a normal's tails).

For each machine in trainingService.machineList (for a local config: this machine, as imgcls-nnictl starts
its trials: the tools' interpreter first on PATH, in trialCodeDirectory, no ssh or callback) it prints one
OK line, or one FAIL line per check that fails:

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

Exits 1 if any check fails, naming machine and check; the last line counts the FAIL lines. The
search-space checks are search/space.py; what runs on each machine is search/probe.py.
"""
import contextlib
import errno
import importlib.metadata
import json
import math
import os
import shlex
import socket
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from core.cli import Parser, run_main
from search.nni_io import (Machine, flag_value, interpreter_of, load_config, local_machine, machines_of, search_space, setting,
                           python_on, ssh_base, trial_command)
from search.space import defaults_problem, pretrained_models, space_problems

# Runs on each machine, sent over SSH to `python -` (its text on stdin); prints one JSON line.
PROBE = Path(__file__).with_name("probe.py")


@dataclass
class Result:
    machine: Machine
    ok: list[str] = field(default_factory=list)      # "check detail" fragments, in order
    failed: list[tuple[str, str]] = field(default_factory=list)

    def good(self, check, detail):
        self.ok.append(f"{check} {detail}")

    def bad(self, check, message):
        self.failed.append((check, message))

    def lines(self):
        """One FAIL line per problem, so that the summary counts the lines a user reads; else one OK line."""
        if self.failed:
            return [f"FAIL {self.machine.name} {c}: {m}" for c, m in self.failed]
        return [f"OK   {self.machine.name} " + " | ".join(self.ok)]

    def show(self, out):
        """Prints the lines -> the number of problems."""
        print(*self.lines(), sep="\n", file=out, flush=True)
        return len(self.failed)


def problems(n):
    return f"{n} problem{'' if n == 1 else 's'}, see FAIL lines"


# ----------------------------------------------------------------------------- config
def trial_gpu_number(config):
    """trialGpuNumber as an int, or None when the config does not set it."""
    value = setting(config, "trialGpuNumber")
    return None if value is None else int(value)


# ----------------------------------------------------------------------------- checks
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


def probe_args(m, config, space, port, callback, timeout):
    """The JSON argument of search/probe.py: what to look at on that machine."""
    command = trial_command(config)
    models = pretrained_models(command, space)
    return {"data_dir": flag_value(command, "--data_dir"), "python_path": m.python_path,
            "interpreter": interpreter_of(command), "timeout": timeout,
            "callback": [config.get("nniManagerIp"), port] if callback else None,
            "weights": models, "weights_packages": weights_packages(models)}


def weights_packages(models):
    """backbone -> the pip weights package that holds its ImageNet weights, for those that have one (weights.py)."""
    from weights import WEIGHTS_PACKAGES  # lazy: torch's start-up, only for a config with pretrained backbones
    return {m: WEIGHTS_PACKAGES[m.removeprefix("timm/")] for m in models if m.removeprefix("timm/") in WEIGHTS_PACKAGES}


def _run_probe(m, base, args, res, timeout, cwd=None):
    """One probe run with the interpreter NNI uses; its answer as a dict, or None when it failed (recorded in res)."""
    launcher = python_on(m, f"- {shlex.quote(json.dumps(args))}")
    try:
        r = subprocess.run(base + [launcher], input=PROBE.read_text(), capture_output=True, text=True, timeout=timeout + 300,
                           cwd=cwd)
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


def _judge_packages(m, info, args, res, local_nni):
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
            fix = (f"this interpreter's env {info['prefix']}, which imgcls-nnictl puts first on PATH: say python3 in "
                   f"trialCommand, or run the tools with that env's interpreter" if m.local else
                   f"the pythonPath env {info['prefix']}: the remote ~/.bashrc puts it first on PATH; use the absolute "
                   f"interpreter in trialCommand or fix ~/.bashrc")
            res.bad("trial", f"trialCommand's {args['interpreter']!r} is {trial['which'] or '?'} (env {trial['prefix']}), not {fix}")
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
    """Every pretrained backbone's weights: cached there, in an installed weights package, or downloadable from there."""
    states = info.get("weights") or {}
    for name, (state, detail) in states.items():
        if state == "unavailable":
            res.bad("weights", f"{name}: not in the cache there, no weights package, and not downloadable ({detail}): add "
                               f"--weights FILE to trialCommand, or fill that server's cache once "
                               f"(docs/remote.md#weights-on-offline-servers)")
    if states and all(state != "unavailable" for state, _ in states.values()):
        res.good("weights", ", ".join(f"{name} {state}" for name, (state, _) in states.items()))


def check_machine(m, config, space, port, callback, local_nni, timeout, cwd=None):
    """All checks of one machine, as a Result; stops at the first check the others depend on (ssh, python).
    This machine (m.local) is probed with bash in cwd, the trials' code directory."""
    res = Result(m)
    base = ["/bin/bash", "-c"] if m.local else _check_ssh(m, res, timeout)
    if base is None:
        return res
    args = probe_args(m, config, space, port, callback, timeout)
    info = _run_probe(m, base, args, res, timeout, cwd)
    if info is None:
        return res
    _judge_packages(m, info, args, res, local_nni)
    _judge_resources(m, config, port, callback, info, args, res)
    _judge_weights(info, res)
    return res


def check_space(config, config_path, out):
    """The search space's FAIL lines, or one OK line -> the number of problems."""
    try:
        space = search_space(config, config_path)
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


def space_of(config, config_path):
    """The search space, or None where it cannot be read: its FAIL line is out; the machines are checked without the
    backbones it would draw."""
    try:
        return search_space(config, config_path)
    except ValueError:
        return None


def preflight(config_path, port, timeout=10, out=None):
    out = out or sys.stdout  # looked up when called: a caller that redirects stdout (a test's capture) gets the lines
    try:
        config = load_config(config_path)
        machines = machines_of(config)
    except ValueError as e:  # names the file
        print(f"FAIL config {e}", file=out)
        return 1
    failed = check_space(config, config_path, out)
    local = local_machine(config) if not machines else None
    if local is not None:
        code_dir = Path(config_path).parent / str(config.get("trialCodeDirectory", "."))
        res = check_machine(local, config, space_of(config, config_path), port, False, importlib.metadata.version("nni"),
                            timeout, cwd=code_dir if code_dir.is_dir() else None)
        failed += res.show(out)
        print(f"preflight: {'this machine ready' if not failed else problems(failed)}", file=out)
        return 1 if failed else 0
    if not machines:
        print(f"preflight: {'search space ok' if not failed else problems(failed)}; "
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
    space = space_of(config, config_path)
    try:
        for m in machines:
            res = check_machine(m, config, space, port, bool(ip), local_nni, timeout)
            failed += res.show(out)
    finally:
        listener.__exit__(None, None, None)
    summary = f"all {len(machines)} machine(s) ready" if not failed else problems(failed)
    print(f"preflight: {summary}", file=out)
    return 1 if failed else 0


def main(argv=None):
    p = Parser(prog="preflight.py", description=__doc__.split("\n\n")[0])
    p.add_argument("config", type=Path, help="NNI v3 experiment config (remote: every machine is checked too)")
    p.add_argument("--port", type=int, default=8080, help="the port of `nnictl create --port` (default: 8080)")
    p.add_argument("--timeout", type=int, default=10, help="SSH connect timeout in seconds (default: 10)")
    a = p.parse_args(argv)
    return preflight(a.config, a.port, a.timeout)


def cli(argv=None):
    """The checks' FAIL lines go to stdout, by design, and make the exit code 1; other errors are one line on stderr."""
    code = []
    return run_main("preflight.py", lambda argv: code.append(main(argv)), argv) or code[0]


if __name__ == "__main__":
    sys.exit(cli())
