"""bench/gpu_workflow.py's refusals, each one line before anything is trained (its whole pipeline runs in
tests/test_gpu_session.py, through the session a GPU machine runs)."""
import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT


def workflow(*args):
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")  # the same answer on a machine with a GPU
    return subprocess.run([sys.executable, "-m", "bench.gpu_workflow", *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=120)


def test_without_a_gpu_the_full_run_is_refused_in_one_line(tmp_path):
    proc = workflow("--work", str(tmp_path))
    assert proc.returncode != 0 and proc.stderr.strip().splitlines() == [
        "gpu_workflow.py: error: no CUDA GPU here: this measures the GPU workflow (--tiny runs its pipeline on the CPU)"]
    assert not any(tmp_path.iterdir())  # refused before anything is made


@pytest.mark.parametrize("flag", ["--people", "--trials", "--k"])
def test_a_count_below_one_is_refused_in_one_line(flag, tmp_path):
    proc = workflow("--tiny", flag, "0", "--work", str(tmp_path / "work"))
    assert proc.returncode != 0 and proc.stderr.strip().splitlines() == [f"gpu_workflow.py: error: {flag} 0: must be 1 or more"]
    assert not (tmp_path / "work").exists()


def test_a_work_dir_drawn_with_other_values_is_refused_not_reused(tmp_path):
    data = tmp_path / "data"
    (data / "train").mkdir(parents=True)
    drawn = dict(people=14, eval_people=7, size=[64, 48], seed=36)
    (data / "drawn.json").write_text(json.dumps(drawn))
    proc = workflow("--tiny", "--people", "20", "--work", str(tmp_path))
    wanted = dict(drawn, people=20)
    assert proc.returncode != 0 and proc.stderr.strip().splitlines() == [
        f"gpu_workflow.py: error: --work {tmp_path} holds a set drawn with {drawn}, not {wanted}: use another --work"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]
