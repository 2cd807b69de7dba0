"""Shared fixtures and helpers: a tiny demo data set written once per session, a way to run train.py,
CSV reading and calling a tool's cli() in-process."""
import contextlib
import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from core import demo
from core.labels import MASK_FILES

ROOT = Path(__file__).resolve().parents[1]

# Under pytest-xdist (`-n 2 --dist loadfile`: docs/design.md) each worker keeps to a core of its own, and every process it
# starts inherits that and runs torch on one thread (OMP_NUM_THREADS, which train.py takes too): two workers never
# put four spinning threads on two cores. (Three workers sharing the cores took longer: 792 s against 706 s.)
WORKER = os.environ.get("PYTEST_XDIST_WORKER")
if WORKER and hasattr(os, "sched_setaffinity"):
    CORES = sorted(os.sched_getaffinity(0))
    os.sched_setaffinity(0, {CORES[int(WORKER.removeprefix("gw")) % len(CORES)]})
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)

# Small and fast: 24 people x 7 photos at 64x48 trains for an epoch in about a second.
TINY = ["--resize", "64", "48", "--batch_size", "32", "--num_workers", "0"]


@pytest.fixture(scope="session")
def demo_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("data") / "demo"
    return demo.make_demo_data(root, profiles=24, eval_profiles=2, size=(64, 48), seed=1)


@pytest.fixture(scope="session")
def digits_csv(tmp_path_factory):
    """scikit-learn's digits as a Kaggle-style CSV data set (core/demo.py): drawn unlike the mask demo."""
    return demo.make_digits_csv(tmp_path_factory.mktemp("digits"), per_class=24, eval_per_class=4, writers=12, size=32)


@pytest.fixture(scope="session")
def nni_home(tmp_path_factory):
    """HOME for nnictl: its experiment registry lands here, not in the real ~/nni-experiments."""
    home = tmp_path_factory.mktemp("home")
    (home / "mpl").mkdir()
    return home


@contextlib.contextmanager
def tmpfs(path, options):
    """A tmpfs mounted (with mount's options) on path, made here, where mounting is allowed (root); else the test is
    skipped. Unmounted at the end."""
    path.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True).returncode:
        pytest.skip(f"cannot mount a tmpfs ({options}) here")
    try:
        yield path
    finally:
        subprocess.run(["umount", str(path)], capture_output=True)


@pytest.fixture
def read_only_dir(tmp_path):
    """A folder on a read-only file system (root: chmod stops no write)."""
    with tmpfs(tmp_path / "ro", "ro,size=64k") as path:
        yield path


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


def train_env():
    env = {k: v for k, v in os.environ.items() if not k.startswith("NNI_")}
    env["OMP_NUM_THREADS"] = os.environ.get("OMP_NUM_THREADS", "2")
    return env


@pytest.fixture
def run_train(demo_dir, cache_dir, tmp_path):
    """Run train.py in a subprocess on the tiny demo data; extra args win over the defaults given here."""
    def run(*args, data=True, check=True, timeout=300):
        base = ["--model_dir", str(tmp_path / "runs"), "--cache_dir", str(cache_dir), *TINY]
        if data:
            base += ["--data_dir", str(demo_dir / "train"), "--eval_dir", str(demo_dir / "eval")]
        proc = subprocess.run([sys.executable, str(ROOT / "train.py"), *base, *map(str, args)], cwd=tmp_path,
                              env=train_env(), capture_output=True, text=True, timeout=timeout)
        if check and proc.returncode != 0:
            raise AssertionError(f"train.py failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
        return proc
    return run


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


# Image files for the data tests (test_layouts, test_split, test_decode, test_dataset).
def write_image(path, colour=(120, 80, 40), size=(48, 64)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)


def make_profiles(root, people):
    """people: [(id, gender, age)] -> mask layout under root/images."""
    for pid, gender, age in people:
        for stem in MASK_FILES:
            write_image(root / "images" / f"{pid:06d}_{gender}_Asian_{age}" / f"{stem}.jpg")
    return root


def run_cli(cli, capsys, *args):
    """A tool's cli(argv) in-process -> (exit code, stdout, stderr)."""
    try:
        code = cli([*map(str, args)])
    except SystemExit as e:  # argparse's own errors
        code = e.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


class OpensFile:
    """Pickled as open(path, "w"): loading it without weights_only creates the file, i.e. runs code."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def crafted_checkpoint(path, marker):
    meta = dict(state_dict={}, model="BaseModel", classification="single", head="none", dropout=0.0, classes=["a", "b"],
                layout="folder", resize=[64, 48], mean=[0.5] * 3, std=[0.2] * 3, epoch=1, best_metric=0.5,
                optimizer={}, scheduler={}, history=[], args={"epochs": 2})
    torch.save({**meta, "payload": OpensFile(marker)}, path)
    return path


# Finalize's finalists, as its run dir names them, and their flags over train.py's defaults
FINALISTS = {"defaults": [], "top1": ["--lr", "0.003"], "top2": ["--lr", "0.0005", "--dropout", "0.4"]}


@pytest.fixture(scope="session")
def fold_runs(tmp_path_factory, demo_dir, cache_dir):
    """Three finalists x 2 folds of BaseModel (it has BatchNorm), as finalize brings them home (the soup and export
    tests share them: copy before writing a vote into it)."""
    run_dir = tmp_path_factory.mktemp("finalize")
    for name, flags in FINALISTS.items():
        for fold in range(2):
            cmd = [sys.executable, str(ROOT / "train.py"), "--data_dir", str(demo_dir / "train"), "--eval_dir",
                   str(demo_dir / "eval"), "--cache_dir", str(cache_dir), *TINY, "--steps", "24", "--kfold", "2",
                   "--fold", str(fold), "--model_dir", str(run_dir / name), "--name", f"fold{fold}", *flags]
            subprocess.run(cmd, check=True, capture_output=True, timeout=300, env=train_env())
    return run_dir


# Fixtures that start train.py, nnictl or sshd: a test that uses one is slow (pytest -m "not slow" skips it).
# A test that starts such a process itself says @pytest.mark.slow.
SLOW_FIXTURES = {"run_train", "nni_home", "sshd", "runs", "trained", "fold_runs"}


# pytest-xdist (--dist loadfile) hands out scopes, each to one worker, in the order the workers collected them: here a
# scope is a file (its module fixtures made once), test_soup's and test_export's together (fold_runs, a session fixture
# of 20 s: made once), and a single test (its parametrisations together) of the files and tests in APART, which share no
# costly fixture. The scopes go longest first (LONGEST: measured, .ci/run's --durations), so that no long one starts
# last on one worker while the other has nothing left; xdist's own reordering (by number of tests, which put the long
# single tests last) is off. (--dist loadgroup with xdist_group marks put every test anywhere under pytest 9.2 and
# xdist 3.8, marks in the files too.)
TOGETHER = {"tests/test_soup.py": "tests/test_export.py"}
APART = {"tests/test_train.py", "tests/test_gpu_session.py", "tests/test_experiment_nni.py", "tests/test_nnictl.py",
         "tests/test_finalize.py::test_remote_search_finalized_over_ssh",
         "tests/test_finalize.py::test_a_deadline_stops_the_folds_keeps_the_finished_ones_and_a_rerun_trains_the_rest"}
LONGEST = ["tests/test_finalize.py",                                                               # about 120 s
           "tests/test_gpu_session.py::test_tiny_session_brings_home_every_phase",                  # 100
           "tests/test_wheelhouse.py",                                                              # 70
           "tests/test_experiment_nni.py::test_remote_experiment_over_ssh_survives_a_lost_server",  # 45
           "tests/test_finalize.py::test_a_deadline_stops_the_folds_keeps_the_finished_ones_and_a_rerun_trains_the_rest",
           "tests/test_preflight.py",                                                               # 65
           "tests/test_nnictl.py::test_a_crashed_search_resumes_to_its_trial_count_and_its_running_trial_continues",
           "tests/test_finalize.py::test_remote_search_finalized_over_ssh",                         # 60
           "tests/test_gpu_session.py::test_a_deadline_too_short_brings_home_what_finished_and_leaves_no_manager",
           "tests/test_weights.py",                                                                 # 50
           "tests/test_experiment_nni.py::test_budgets_and_the_best_trial_reruns_alike",           # 43
           "tests/test_export.py",                                                                  # 35
           "tests/test_tracking.py",                                                                # 30: two mlflow servers
           "tests/test_kfold.py",
           "tests/test_experiment_nni.py::test_local_experiment",
           "tests/test_experiment_nni.py::test_a_trial_out_of_gpu_memory_fails_in_one_line_and_its_retry_continues_it",
           "tests/test_experiment_nni.py::test_finetune_experiment_starts_from_its_command_on_installed_weights",
           "tests/test_train.py::test_compiled_model_trains_and_saves_plain_weights",              # 20
           "tests/test_experiment_nni.py::test_invalid_parameter_fails_its_trial_only"]


def scope_of(nodeid):
    file, test = nodeid.split("::", 1)[0], nodeid.split("[", 1)[0]
    return test if file in APART or test in APART else TOGETHER.get(file, file)


def pytest_xdist_make_scheduler(config, log):
    if config.getvalue("dist") != "loadfile":
        return None
    from xdist.scheduler import LoadFileScheduling

    class Longest(LoadFileScheduling):
        def _split_scope(self, nodeid):
            return scope_of(nodeid)
    config.option.loadscopereorder = False
    return Longest(config, log)


def pytest_collection_modifyitems(items):
    for item in items:
        if SLOW_FIXTURES & set(item.fixturenames):
            item.add_marker(pytest.mark.slow)
    if WORKER:
        rank = {scope: i for i, scope in enumerate(LONGEST)}
        items.sort(key=lambda item: rank.get(scope_of(item.nodeid), len(LONGEST)))
