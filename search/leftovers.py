"""What an NNI experiment whose manager died left running on one machine, and stopping it. Standard library only:
`imgcls-nnictl resume` runs stop() here, and on each server of a remote experiment over SSH, this file and a call of
stop() on the stdin of `python -` (as preflight sends probe.py).

Found by what NNI 3.0 gives each process: a trial's processes carry NNI_EXP_ID; the tuner NNI_LOG_DIRECTORY
.../<EXP_ID>/log (this machine only: it runs beside the manager); a remote trial keeper (a node process that starts
the trials on a server and reconnects to whichever manager listens on its port) its directory
.../nni-experiments/<EXP_ID>/environments/<ENV>/trial_keeper on its command line.
"""
import contextlib
import os
import signal
import time
from pathlib import Path


def stat_fields(pid):
    """/proc/PID/stat after the command's name: state, parent pid, ... (the name may hold spaces and parentheses)."""
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()


def processes():
    """{pid: (parent pid, environ dict, cmdline bytes)} of this user's processes that can be read."""
    found = {}
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            environ = dict(kv.split(b"=", 1) for kv in (proc / "environ").read_bytes().split(b"\0") if b"=" in kv)
            parent = int(stat_fields(proc.name)[1])
            found[int(proc.name)] = (parent, environ, (proc / "cmdline").read_bytes())
        except (OSError, ValueError, IndexError):  # gone meanwhile, or another user's
            continue
    return found


def role(exp_id, environ, cmdline, tuner=True):
    """"tuner", "trial keeper" or "trial" when the process is one of experiment exp_id's, else None."""
    key = exp_id.encode()
    if environ.get(b"NNI_EXP_ID") == key:
        return "trial"
    if b"trial_keeper" in cmdline and f"/nni-experiments/{exp_id}/environments/".encode() in cmdline:
        return "trial keeper"
    log = Path(environ.get(b"NNI_LOG_DIRECTORY", b"").decode(errors="replace"))
    if tuner and environ.get(b"SDK_PROCESS") == b"dispatcher" and log.parent.name == exp_id:
        return "tuner"
    return None


def left_behind(exp_id, table, tuner=True):
    """Pids of experiment exp_id's processes in table (processes()) that outlived its manager ([] while a manager of it
    runs here); with tuner=False, not its tuner (on a server, where none runs). Forks that share their parent's command
    line (data loader workers) are left to end with it."""
    if any(b"nni_node" in cmd and exp_id.encode() in cmd.split(b"\0") for _, _, cmd in table.values()):
        return []
    ours = {pid for pid, (_, env, cmd) in table.items() if role(exp_id, env, cmd, tuner)}
    return sorted(pid for pid in ours if not (table[pid][0] in ours and table[table[pid][0]][2] == table[pid][2]))


def alive(pid):
    """Running: not gone, and not a zombie that nobody reaps (an orphan's parent in a container may never)."""
    try:
        return stat_fields(pid)[0] != "Z"
    except (OSError, IndexError):
        return False


def stop(exp_id, where="", tuner=True, wait_s=60):
    """SIGTERM what experiment exp_id's dead manager left here (a trial then keeps its last finished epoch), SIGKILL
    what has not ended after wait_s; one line naming it, nothing when there is nothing."""
    table = processes()
    pids = left_behind(exp_id, table, tuner)
    if not pids:
        return
    roles = [role(exp_id, table[p][1], table[p][2], tuner) for p in pids]
    trials = sorted({table[p][1].get(b"NNI_TRIAL_JOB_ID", b"").decode() for p in pids} - {""})
    what = [f"its {r}" for r in ("tuner", "trial keeper") if r in roles] + [f"trials {', '.join(trials)}"] * bool(trials)
    print(f"imgcls-nnictl: stopping what the crashed manager of {exp_id} left running{where}: {' and '.join(what)} "
          f"({len(pids)} process{'es' * (len(pids) != 1)}); each trial keeps its last finished epoch", flush=True)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline and any(map(alive, pids)):
        time.sleep(0.2)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)

