"""bench/gpu_workflow.py --tiny: the GPU workflow's whole pipeline (config_gpu.yml's search, finalize's three
selections, the defaults' runs and K-fold vote, the trial-time figures) on the CPU, so it never rots between
GPU runs. Its figures are a check that it runs, never GPU figures."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT
from sshd import free_port
from test_experiment_nni import nni_env


@pytest.mark.slow
def test_tiny_workflow_runs_config_gpu_search_and_finalize(tmp_path, nni_home):
    work = tmp_path / "work"
    proc = subprocess.run([sys.executable, "-m", "bench.gpu_workflow", "--tiny", "--work", str(work), "--port", str(free_port())],
                          env=nni_env(nni_home), cwd=tmp_path, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads((work / "results.json").read_text())
    assert result["device"] == "cpu" and result["tiny"] and "(tiny: not a GPU figure)" in proc.stdout
    rows = result["eval_f1"]
    assert set(rows) == {"defaults", "defaults_kfold", "search_best", "finalize_winner", "finalize_greedy", "finalize_soup"}
    assert len(rows["defaults"]) == 2 and all(0 <= f <= 1 for v in rows.values() for f in v)
    assert result["search"]["succeeded"] == result["search"]["trials"] == 2
    names = [f["name"] for f in result["finalists"]]
    assert "defaults" in names and result["winner"] in names and len(names) == 2  # SafeTPE's first trial is the command
    # the trials ran config_gpu.yml's command, --amp and --channels_last included, fine-tuning the installed lite0 weights
    saved = [json.loads(p.read_text()) for p in (work / "nni").rglob("trials/*/config.json")]
    assert len(saved) == 2 + 2 * 2  # the search's trials, then every finalist's folds
    assert all((s["model"], s["pretrained"], s["amp"], s["channels_last"]) == ("timm/tf_efficientnet_lite0", True, True, True)
               for s in saved)
    assert sorted(s["lr"] == 0.001 and s["warmup_epochs"] == 1 for s in saved if not s["kfold"]) == [False, True]
    # where a trial's time went, from its own summary.json
    for t in result["trials"]:
        assert 0 < t["imports_s"] <= t["data_s"] <= t["model_s"] <= t["first_step_s"] < t["wall_s"]
        assert 0 < t["efficiency"] <= 1
    assert not (ROOT / "bench" / "results" / "gpu_workflow").exists() or not any(
        Path(ROOT / "bench" / "results" / "gpu_workflow").glob("cpu*"))  # tiny figures are never kept as results


def workflow(*args):
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")  # the same answer on a machine with a GPU
    return subprocess.run([sys.executable, "-m", "bench.gpu_workflow", *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=120)


def test_without_a_gpu_the_full_run_is_refused_in_one_line(tmp_path):
    proc = workflow("--work", str(tmp_path))
    assert proc.returncode != 0 and proc.stderr.strip().splitlines() == [
        "gpu_workflow.py: error: no CUDA GPU here: this measures the GPU workflow (--tiny runs its pipeline on the CPU)"]
    assert not any(tmp_path.iterdir())  # refused before anything is made


def test_a_wheelhouse_without_wheels_or_with_a_broken_one_is_refused_in_one_line(tmp_path):
    proc = workflow("--tiny", "--wheelhouse", str(tmp_path), "--work", str(tmp_path / "work"))
    assert proc.returncode != 0 and proc.stderr.strip().splitlines() == [
        f"gpu_workflow.py: error: --wheelhouse {tmp_path}: no wheels there (build the folder with python -m bench.wheelhouse, "
        f"docs/gpu.md)"]
    (tmp_path / "nni-3.0-py3-none-any.whl").write_bytes(b"cut short in transfer")
    proc = workflow("--tiny", "--wheelhouse", str(tmp_path), "--work", str(tmp_path / "work"))
    line, = proc.stderr.strip().splitlines()
    assert proc.returncode != 0 and line.startswith(f"gpu_workflow.py: error: --wheelhouse {tmp_path}: pip install failed: ERROR")
    assert not (tmp_path / "work").exists()
