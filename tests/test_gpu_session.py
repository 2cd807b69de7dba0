"""bench/gpu_session.py: the one command a lent GPU runs, here with --tiny on the CPU (every phase, the workflow's
whole pipeline: config_gpu.yml's search, finalize's three selections, the defaults' runs and K-fold vote), under a
deadline too short for it (what finished comes back, no NNI manager of its own left), and its refusals."""
import json
import os
import subprocess
import sys

import pytest

from bench import gpu_session
from conftest import ROOT
from search import leftovers
from sshd import free_port
from test_experiment_nni import nni_env


def session(tmp_path, home, *args, timeout=900):
    port = free_port()
    proc = subprocess.run([sys.executable, "-m", "bench.gpu_session", "--out", str(tmp_path / "out"), "--work", str(tmp_path / "work"),
                           "--port", str(port), *args], env=nni_env(home), cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    return proc, port, tmp_path / "out"


def read(out, name):
    return json.loads((out / f"{name}.json").read_text())


def managers_on(*ports):
    """NNI managers (node .../nni_node/main.js --port P) still running on these ports."""
    return [pid for pid, (_, _, cmd) in leftovers.processes().items()
            if b"nni_node" in cmd and any(str(p).encode() in cmd.split(b"\0") for p in ports)]


@pytest.mark.slow
def test_tiny_session_brings_home_every_phase(tmp_path, nni_home):
    proc, port, out = session(tmp_path, nni_home, "--tiny")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert sorted(p.name for p in out.iterdir()) == sorted([*(f"{p}.json" for p in gpu_session.PHASES), "session.json", "session.log"])
    assert (out / "session.log").read_text().splitlines()[-1] == \
        "finished: machine, install, bench, workflow, startup; not finished: none"
    assert read(out, "machine")["torch"] and read(out, "machine")["gpu"] is None
    assert read(out, "install")["nni_gpu_info"]["success"] is False  # no GPU here: recorded, not required with --tiny
    (row,) = read(out, "bench")["rows"]
    assert row["model"] == "BaseModel" and row["a"] > 0 and row["b"] > 0 and row["trial_wall_s"] > 0
    assert set(read(out, "startup")["result"]) == {"BaseModel", "lite0"}

    result = read(out, "workflow")
    assert result["device"] == "cpu" and result["tiny"] and result["cut"] == "tiny" and result["exit_code"] == 0
    assert result["finished"] == ["defaults", "search", "finalize_winner", "finalize_greedy", "finalize_soup"]
    rows = result["eval_f1"]
    assert set(rows) == {"defaults", "defaults_kfold", "search_best", "finalize_winner", "finalize_greedy", "finalize_soup"}
    assert len(rows["defaults"]) == 2 and all(0 <= f <= 1 for v in rows.values() for f in v)
    assert result["search"]["succeeded"] == result["search"]["trials"] == 2
    names = [f["name"] for f in result["finalists"]]
    assert "defaults" in names and result["winner"] in names and len(names) == 2  # SafeTPE's first trial is the command
    # the trials ran config_gpu.yml's command, --amp and --channels_last included, fine-tuning the installed lite0 weights
    work = tmp_path / "work" / "workflow"
    saved = [json.loads(p.read_text()) for p in (work / "nni").rglob("trials/*/config.json")]
    assert len(saved) == 2 + 2 * 2  # the search's trials, then every finalist's folds: the process count docs/gpu.md uses
    assert all((s["model"], s["pretrained"], s["amp"], s["channels_last"]) == ("timm/tf_efficientnet_lite0", True, True, True)
               for s in saved)
    assert sorted(s["lr"] == 0.001 and s["warmup_epochs"] == 1 for s in saved if not s["kfold"]) == [False, True]
    for t in result["trials"]:  # where a trial's time went, from its own summary.json
        assert 0 < t["imports_s"] <= t["data_s"] <= t["model_s"] <= t["first_step_s"] < t["wall_s"]
        assert 0 < t["efficiency"] <= 1
    assert not managers_on(port, port + 1)
    assert not any((ROOT / "bench" / "results" / "gpu_workflow").glob("cpu*"))  # tiny figures are never kept as results


@pytest.mark.slow
def test_a_deadline_too_short_brings_home_what_finished_and_leaves_no_manager(tmp_path, nni_home):
    # machine, install and bench take 10 to 25 s of the 84, so the workflow is given its floor of 30 s (the tiny one needs
    # a minute or more alone), and startup then finds too little time: on a faster machine or a slower one alike
    proc, port, out = session(tmp_path, nni_home, "--tiny", "--deadline", "1.4")
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    status = read(out, "session")["status"]
    assert [status[p] for p in ("machine", "install", "bench")] == ["done"] * 3
    assert read(out, "bench")["rows"][0]["b"] > 0
    assert status["workflow"] != "done" and "startup" not in read(out, "session")["finished"]
    workflow = read(out, "workflow")
    assert "finalize_soup" not in workflow.get("finished", []) and "error" in workflow
    last = (out / "session.log").read_text().splitlines()[-1]
    assert last.startswith("finished: machine, install, bench; not finished: workflow (") and "startup (" in last
    assert not managers_on(port, port + 1)


def test_a_wheelhouse_without_nni_stops_the_session_at_the_install(tmp_path, nni_home):
    (tmp_path / "wheels").mkdir()
    (tmp_path / "wheels" / "six-1.0-py3-none-any.whl").write_bytes(b"an unrelated wheel")
    proc, _, out = session(tmp_path, nni_home, "--tiny", "--wheelhouse", str(tmp_path / "wheels"), timeout=120)
    assert proc.returncode == 1
    assert read(out, "session")["status"]["install"] == (f"failed: RuntimeError: --wheelhouse {tmp_path / 'wheels'}: no nni, "
                                                         f"efficientnet-pytorch wheel there (build it with python -m bench.wheelhouse DIR)")
    assert set(read(out, "session")["finished"]) == {"machine"}  # nothing was installed, nothing after it ran


def test_without_out_the_session_is_refused_in_one_line(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "OUT"}
    proc = subprocess.run([sys.executable, "-m", "bench.gpu_session", "--tiny"], env=env, cwd=ROOT, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 1 and proc.stderr.strip().splitlines() == [
        "gpu_session.py: error: --out is not given and $OUT is not set: the results need a folder"]


@pytest.mark.parametrize("trial_s", [20.0, 45.0, 90.0])
def test_the_cut_is_the_largest_whose_counted_processes_fit(trial_s):
    for left_min in (3, 5, 7, 9, 12):
        cut = gpu_session.choose_cut(left_min * 60, trial_s)
        fits = [c for c in gpu_session.CUTS if gpu_session.workflow_minutes(c, trial_s) + 1 <= left_min]
        assert cut == (fits[0] if fits else None)
    assert [gpu_session.workflow_minutes(c, trial_s) for c in gpu_session.CUTS] == \
        sorted((gpu_session.workflow_minutes(c, trial_s) for c in gpu_session.CUTS), reverse=True)
