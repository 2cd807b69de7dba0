"""search/preflight.py against a real OpenSSH server on 127.0.0.1 (tests/sshd.py)."""
import contextlib
import io
import json
import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from search import preflight as pf
from search.nni_io import flag_value, interpreter_of, load_config, train_words
from search.preflight import gpu_problem
from search.space import covering, pretrained_models, space_problems
from conftest import ROOT
from sshd import free_port, keygen, start_sshd


@pytest.fixture(scope="module")
def sshd(tmp_path_factory):
    with start_sshd(tmp_path_factory.mktemp("sshd")) as server:
        yield server


@pytest.fixture
def data_dir(tmp_path):
    d = tmp_path / "data" / "train"
    d.mkdir(parents=True)
    (d / "train.csv").write_text("id,gender,race,age,path\n")
    return d


def write_config(tmp_path, sshd, data_dir, *, interpreter=sys.executable, **machine):
    entry = {"host": sshd.host, "port": sshd.port, "user": sshd.user, "sshKeyFile": str(sshd.key_file),
             "pythonPath": str(Path(sys.executable).parent)}
    entry.update(machine)
    config = {
        "searchSpaceFile": "search_space.json",
        "trialCommand": f"{interpreter} train.py --data_dir {data_dir} --epochs 2",
        "trialCodeDirectory": ".",
        "trialConcurrency": 1,
        "nniManagerIp": "127.0.0.1",
        "tuner": {"name": "TPE", "classArgs": {"optimize_mode": "maximize"}},
        "trainingService": {"platform": "remote", "machineList": [entry]},
    }
    path = tmp_path / "config_remote.yml"
    path.write_text(yaml.safe_dump(config))
    shutil.copyfile(ROOT / "search_space.json", tmp_path / "search_space.json")
    return path, config


def machine_line(proc):
    """The line preflight printed for the (one) machine, after the search space's."""
    return next(line for line in proc.stdout.splitlines() if "@127.0.0.1:" in line)


def preflight(config_path, port=None):
    """preflight.py's cli in this process, as its console script calls it (its real process: tests/test_cli_errors.py,
    and the probe it sends runs in one of its own) -> its exit code, stdout and stderr."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = pf.cli([str(config_path), "--port", str(port or free_port()), "--timeout", "5"])
    return subprocess.CompletedProcess(["preflight.py"], code, out.getvalue(), err.getvalue())


def test_all_checks_pass_against_loopback_sshd(tmp_path, sshd, data_dir):
    path, _ = write_config(tmp_path, sshd, data_dir)
    port = free_port()
    proc = preflight(path, port)
    assert proc.returncode == 0, proc.stdout + proc.stderr + sshd.log()
    line = machine_line(proc)
    assert line.startswith(f"OK   {sshd.user}@127.0.0.1:{sshd.port} ")
    for part in ("ssh ok", f"python {sys.executable}", "nni 3.0", "torch ", "trial same env", "gpu ",
                 f"data {data_dir}", f"callback 127.0.0.1:{port}"):
        assert part in line, line
    assert "all 1 machine(s) ready" in proc.stdout


def test_wrong_ssh_port_fails_on_ssh(tmp_path, sshd, data_dir):
    path, _ = write_config(tmp_path, sshd, data_dir, port=free_port())
    proc = preflight(path)
    assert proc.returncode == 1
    line = machine_line(proc)
    assert line.startswith(f"FAIL {sshd.user}@127.0.0.1:") and " ssh: login failed" in line
    assert "Connection refused" in line


def test_wrong_key_fails_on_ssh(tmp_path, sshd, data_dir):
    other = keygen(tmp_path / "not_authorized")
    path, _ = write_config(tmp_path, sshd, data_dir, sshKeyFile=str(other))
    proc = preflight(path)
    assert proc.returncode == 1
    line = machine_line(proc)
    assert line.startswith(f"FAIL {sshd.user}@127.0.0.1:{sshd.port} ssh: login failed")
    assert "Permission denied" in line


def test_missing_key_file_and_missing_data_dir(tmp_path, sshd, data_dir):
    path, _ = write_config(tmp_path, sshd, data_dir, sshKeyFile=str(tmp_path / "nope"))
    proc = preflight(path)
    assert proc.returncode == 1 and "ssh: sshKeyFile" in proc.stdout and "not found" in proc.stdout

    path, _ = write_config(tmp_path, sshd, tmp_path / "no" / "such" / "dir")
    proc = preflight(path)
    assert proc.returncode == 1
    line = machine_line(proc)
    assert line.startswith("FAIL ") and "data: --data_dir" in line and "not a directory" in line
    assert "ssh:" not in line and "callback:" not in line  # only the failing check is named


def test_trial_interpreter_of_another_env_fails(tmp_path, sshd, data_dir):
    # The venv's base interpreter is another environment than pythonPath (the venv):
    # the same situation as a ~/.bashrc that puts pyenv/conda shims before pythonPath.
    base = os.path.realpath(sys.executable)
    if os.path.realpath(sys.prefix) == os.path.realpath(sys.base_prefix):
        pytest.skip("tests do not run in a virtual environment")
    path, _ = write_config(tmp_path, sshd, data_dir, interpreter=base)
    proc = preflight(path)
    assert proc.returncode == 1
    assert "trial: trialCommand's" in proc.stdout and "not the pythonPath env" in proc.stdout


def test_gpu_request_on_cpu_host_fails(tmp_path, sshd, data_dir):
    path, config = write_config(tmp_path, sshd, data_dir)
    config["trialGpuNumber"] = 1
    path.write_text(yaml.safe_dump(config))
    proc = preflight(path)
    assert proc.returncode == 1 and "gpu: trialGpuNumber 1 but no GPU found" in proc.stdout


def test_config_problems(tmp_path, sshd, data_dir):
    path, config = write_config(tmp_path, sshd, data_dir)
    del config["nniManagerIp"]
    path.write_text(yaml.safe_dump(config))
    proc = preflight(path)
    assert proc.returncode == 1 and "FAIL config: nniManagerIp is not set" in proc.stdout

    path, _ = write_config(tmp_path, sshd, data_dir)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        proc = preflight(path, busy.getsockname()[1])
    assert proc.returncode == 1 and "FAIL config callback: port" in proc.stdout and "already in use" in proc.stdout


def test_gpu_rules_of_nni_3_0():
    assert gpu_problem(1, 1, 1) and "maxTrialNumberPerGpu: 2" in gpu_problem(1, 1, 1)
    assert gpu_problem(1, 1, 2) is None          # 0.5 GPU per trial: schedules
    assert gpu_problem(2, 1, 1) is None
    assert gpu_problem(2, 2, 1) is not None      # all GPUs of the host: never
    assert gpu_problem(1, None) is None and gpu_problem(0, None) is None
    assert gpu_problem(4, 1, 1, [7]) is not None  # gpuIndices outside the host


def test_command_parsing():
    cmd = "OMP_NUM_THREADS=1 python3 train.py --data_dir '/data/my set/train' --epochs=3"
    assert flag_value(cmd, "--data_dir") == "/data/my set/train"
    assert flag_value(cmd, "--epochs") == "3"
    assert flag_value(cmd, "--port") is None
    assert interpreter_of(cmd) == "python3"
    assert interpreter_of("/opt/venv/bin/python train.py") == "/opt/venv/bin/python"
    assert interpreter_of("bash run.sh") is None


# ----------------------------------------------------------------------------- the search space
SPACE_MISTAKES = {
    "not a flag": ({"learning_rate": {"_type": "loguniform", "_value": [1e-4, 1e-2]}}, "learning_rate: not a train.py flag"),
    "fractional batch_size": ({"batch_size": {"_type": "choice", "_value": [32, 48.5]}}, "batch_size: parameter 'batch_size' must be int"),
    "uniform for an int": ({"batch_size": {"_type": "uniform", "_value": [16, 64]}}, "batch_size: uniform draws fractions"),
    "q 0.5 for an int": ({"warmup_epochs": {"_type": "quniform", "_value": [0, 5, 0.5]}}, "warmup_epochs: quniform with q 0.5"),
    "out of range": ({"dropout": {"_type": "uniform", "_value": [0.0, 1.5]}}, "dropout: --dropout 1.5: must be in [0, 1)"),
    "log of 0": ({"lr": {"_type": "loguniform", "_value": [0, 0.01]}}, "lr: loguniform needs low > 0"),
    "bad choice": ({"optimizer": {"_type": "choice", "_value": ["AdamW", "Adamw"]}}, "optimizer: parameter 'optimizer': 'Adamw' is not one of"),
    "bad model": ({"model": {"_type": "choice", "_value": ["resnet18", "vgg"]}}, "model: parameter 'model': unknown model 'vgg'; valid: BaseModel"),
    "bad timm model": ({"model": {"_type": "choice", "_value": ["timm/convnext_tinny"]}}, "nearest: timm/convnext_tiny"),
    "list of 1": ({"resize": {"_type": "choice", "_value": [[224]]}}, "resize: parameter 'resize' must be a list of 2"),
    "nested without _name": ({"criterion": {"_type": "choice", "_value": [{"focal_gamma": 2}]}}, "criterion: nested choice"),
    "nested unknown key": ({"criterion": {"_type": "choice", "_value": [{"_name": "focal", "focal_gama": {"_type": "uniform", "_value": [1, 2]}}]}},
                           "criterion=focal focal_gama: not a train.py flag (did you mean focal_gamma?)"),
    "nested out of range": ({"criterion": {"_type": "choice", "_value": [{"_name": "label_smoothing", "smoothing": {"_type": "uniform", "_value": [0.1, 1.0]}}]}},
                            "criterion=label_smoothing smoothing: --smoothing 1.0: must be in [0, 1)"),
    "unknown _type": ({"seed": {"_type": "unifrom", "_value": [1, 2]}}, "seed: {'_type': 'unifrom'"),
}


@pytest.mark.parametrize("case", list(SPACE_MISTAKES))
def test_search_space_mistake_is_one_fail_line_naming_the_key(case):
    space, message = SPACE_MISTAKES[case]
    problems = space_problems(space, "python3 train.py --epochs 2")
    assert len(problems) == 1 and message in problems[0], problems


@pytest.mark.parametrize("name", ["config_local.yml", "config_finetune.yml", "config_remote.yml", "config_gpu.yml"])
def test_shipped_search_spaces_pass(name, capsys):
    config = load_config(ROOT / name)
    assert pf.check_space(config, ROOT / name, sys.stdout) == 0
    assert capsys.readouterr().out.startswith("OK   search space: ")


def test_a_local_configs_space_problem_is_a_fail_line_and_this_machine_is_checked(tmp_path):
    config = {"searchSpace": SPACE_MISTAKES["bad choice"][0], "trialCommand": "python3 train.py", "trainingService": {"platform": "local"}}
    (tmp_path / "c.yml").write_text(yaml.safe_dump(config))
    proc = preflight(tmp_path / "c.yml")
    lines = proc.stdout.splitlines()
    assert proc.returncode == 1 and len(lines) == 3, proc.stdout + proc.stderr
    assert lines[0] == "FAIL search space optimizer: parameter 'optimizer': 'Adamw' is not one of SGD, Adam, AdamW"
    assert lines[1].startswith("OK   this machine python ") and lines[2] == "preflight: 1 problem, see FAIL lines"


def test_a_trial_command_train_py_refuses_is_one_fail_line(tmp_path):
    """It stopped preflight with argparse's exit (status 2) before any FAIL line or other check."""
    config = {"searchSpace": {"lr": {"_type": "choice", "_value": [0.001]}}, "trialCommand": "python3 train.py --modle x",
              "trainingService": {"platform": "local"}}
    (tmp_path / "c.yml").write_text(yaml.safe_dump(config))
    proc = preflight(tmp_path / "c.yml")
    lines = proc.stdout.splitlines()
    assert proc.returncode == 1 and len(lines) == 3 and proc.stderr == "", proc.stdout + proc.stderr
    assert lines[0] == "FAIL search space trialCommand 'python3 train.py --modle x': unrecognized arguments: --modle x"
    assert lines[2] == "preflight: 1 problem, see FAIL lines"


@pytest.mark.slow
def test_this_machine_is_checked_as_its_trials_run(tmp_path):
    """Local preflight checked the space only: a backbone without weights here, or a trial interpreter without
    torch, passed, and every trial failed."""
    config = load_config(ROOT / "config_finetune.yml")
    config["searchSpace"] = {"model": {"_type": "choice", "_value": ["timm/tf_efficientnet_lite0", "timm/resnet18"]}}
    config["trialCodeDirectory"] = str(ROOT)
    (tmp_path / "c.yml").write_text(yaml.safe_dump(config))
    proc = preflight(tmp_path / "c.yml")
    lines = proc.stdout.splitlines()
    assert proc.returncode == 1 and lines[0].startswith("OK   search space"), proc.stdout + proc.stderr
    assert lines[1].startswith("FAIL this machine weights: timm/resnet18: not in the cache there, no weights package, and not "
                               "downloadable"), lines[1]
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", tmp_path / "bare"], check=True)  # an env without torch
    bare = tmp_path / "bare" / "bin" / "python"
    config.update(trialCommand=config["trialCommand"].replace("python3", str(bare), 1), tuner={"name": "TPE"})
    config["searchSpace"]["model"]["_value"] = ["timm/tf_efficientnet_lite0"]
    (tmp_path / "c.yml").write_text(yaml.safe_dump(config))
    lines = preflight(tmp_path / "c.yml").stdout.splitlines()
    assert lines[1].startswith(f"FAIL this machine trial: trialCommand's {str(bare)!r} is {bare} (env {tmp_path / 'bare'}), "
                               f"not this interpreter's env {sys.prefix}, which imgcls-nnictl puts first on PATH"), lines
    assert lines[2] == "preflight: 1 problem, see FAIL lines"


def test_space_checked_against_the_flags_after_train_py():
    """An env prefix, as docs/remote.md suggests for offline servers (HF_HUB_OFFLINE=1 python3 train.py ...)."""
    space = SPACE_MISTAKES["bad choice"][0]
    assert space_problems(space, "HF_HUB_OFFLINE=1 /opt/env/bin/python train.py --epochs 2") == \
        space_problems(space, "python3 train.py --epochs 2")
    assert train_words("HF_HUB_OFFLINE=1 python3 train.py --pretrained") == ["--pretrained"]


def test_pretrained_models_are_those_the_search_can_draw():
    space = {"model": {"_type": "choice", "_value": ["BaseModel", "timm/convnext_tiny", "resnet50"]}}
    assert pretrained_models("python3 train.py --pretrained", space) == ["timm/convnext_tiny", "resnet50"]
    assert pretrained_models("python3 train.py", space) == []
    assert pretrained_models("python3 train.py --pretrained --weights /w.pth", space) == []
    assert pretrained_models("python3 train.py --pretrained --model efficientnet_b3", {}) == ["efficientnet_b3"]


# What NNI 3.0's TPE and train.py do with each entry: TPE never validates a space, it crashes (randint [32, 32]: "high <=
# 0"; q 0: ZeroDivisionError) or samples forever (uniform low > high) in the dispatcher, and the experiment sits RUNNING.
def spec(kind, *value):
    return {"_type": kind, "_value": list(value)}


NNI_RULE_MISTAKES = {
    "randint one value": ({"batch_size": spec("randint", 32, 32)}, "batch_size: randint needs low < high, got 32 and 32"),
    "randint reversed": ({"batch_size": spec("randint", 64, 16)}, "batch_size: randint needs low < high, got 64 and 16"),
    "q 0": ({"lr": spec("quniform", 0.001, 0.01, 0)}, "lr: quniform needs q > 0"),
    "uniform reversed": ({"dropout": spec("uniform", 0.4, 0.1)}, "dropout: uniform needs low < high"),
    "loguniform one value": ({"lr": spec("loguniform", 0.01, 0.01)}, "lr: loguniform needs low < high"),
    "normal negative sigma": ({"lr": spec("normal", 0.01, -0.001)}, "lr: normal needs sigma > 0, got -0.001"),
    "qnormal zero sigma": ({"batch_size": spec("qnormal", 64, 0, 1)}, "batch_size: qnormal needs sigma > 0, got 0"),
    "lognormal negative sigma": ({"lr": spec("lognormal", -6, -1)}, "lr: lognormal needs sigma > 0, got -1"),
    "qlognormal zero sigma": ({"batch_size": spec("qlognormal", 3.5, 0, 1)}, "batch_size: qlognormal needs sigma > 0, got 0"),
    "conflict together": ({"feed": spec("choice", "device"), "no_cache": spec("choice", True)},
                          "feed=device with no_cache=true: --feed device needs the decoded-image cache: drop --no_cache"),
    "conflict among others": ({"lr": spec("loguniform", 1e-4, 1e-2), "feed": spec("choice", "auto", "device"),
                               "dropout": spec("uniform", 0.0, 0.4), "no_cache": spec("choice", False, True)},
                              "feed=device with no_cache=true: "),
    "conflict in a nested option": ({"feed": spec("choice", "loader", "device"),
                                     "criterion": spec("choice", {"_name": "cross_entropy"}, {"_name": "focal", "no_cache": spec("choice", True)})},
                                    "feed=device with criterion=focal no_cache=true: "),
    "conflict in the schedule": ({"scheduler": spec("choice", "cosine", "plateau"), "warmup_epochs": spec("choice", 0, 2)},
                                 "scheduler=plateau with warmup_epochs=2: --warmup_epochs needs an epoch schedule"),
    "key at two levels": ({"lr": spec("loguniform", 1e-4, 1e-2), "criterion": spec("choice", {"_name": "focal", "lr": spec("choice", 5.0)})},
                          "lr: given at the top level and in criterion=focal: "),
    "key in two nested choices": ({"criterion": spec("choice", {"_name": "focal", "lr": spec("choice", 0.01)}),
                                   "optimizer": spec("choice", {"_name": "SGD", "lr": spec("choice", 0.1)})},
                                  "lr: given at criterion=focal and in optimizer=SGD: "),
}


@pytest.mark.parametrize("case", list(NNI_RULE_MISTAKES))
def test_what_tpe_or_train_py_refuse_is_one_fail_line(case):
    space, message = NNI_RULE_MISTAKES[case]
    problems = space_problems(space, "python3 train.py --epochs 2")
    assert len(problems) == 1 and message in problems[0], problems


VALID_SPACES = {
    "lognormal mu < 0": {"lr": spec("lognormal", -6, 1)},           # exp(N(-6, 1)): 1.2e-4..0.05 within 3 sigma
    "qlognormal int q 1": {"batch_size": spec("qlognormal", 3.5, 0.5, 1)},  # 7.0..148.0, floats train.py takes as ints
    "qnormal int": {"batch_size": spec("qnormal", 64, 8, 1)},
    "normal in bounds": {"dropout": spec("normal", 0.2, 0.05)},
    "randint high exclusive": {"batch_size": spec("randint", 16, 65), "warmup_epochs": spec("randint", 0, 1)},
    "quniform int": {"batch_size": spec("quniform", 16, 64, 16), "warmup_epochs": spec("quniform", 1.5, 3, 1)},
    "sibling options share a key": {"criterion": spec("choice", {"_name": "focal", "smoothing": spec("choice", 0.1)},
                                                      {"_name": "label_smoothing", "smoothing": spec("uniform", 0.05, 0.2)})},
    "feed device with the cache": {"feed": spec("choice", "auto", "device"), "no_cache": spec("choice", False)},
}


@pytest.mark.parametrize("case", list(VALID_SPACES))
def test_what_train_py_takes_is_accepted(case):
    out = io.StringIO()
    assert pf.check_space({"searchSpace": VALID_SPACES[case], "trialCommand": "python3 train.py --epochs 2"}, "c.yml", out) == 0
    assert out.getvalue().startswith("OK   search space: ") and len(out.getvalue().splitlines()) == 1, out.getvalue()


def test_normal_tails_warn_and_a_bad_mean_fails():
    """TPE draws normals unclipped: normal [0.2, 0.5] for dropout drew -0.31 and trials failed."""
    out = io.StringIO()
    config = {"searchSpace": {"dropout": spec("normal", 0.2, 0.5)}, "trialCommand": "python3 train.py"}
    assert pf.check_space(config, "c.yml", out) == 0
    lines = out.getvalue().splitlines()
    assert lines[0].startswith("WARN search space dropout: normal [0.2, 0.5] draws -1.3..1.7 within 3 sigma") and \
        "--dropout -1.3: must be in [0, 1)" in lines[0] and "lower sigma" in lines[0], lines
    assert lines[1].startswith("OK   search space: ") and len(lines) == 2
    warnings = []
    assert space_problems({"lr": spec("normal", 0.001, 0.001)}, "python3 train.py", warnings) == [] and \
        warnings[0].startswith("lr: normal [0.001, 0.001] draws -0.002..0.004")
    assert space_problems({"dropout": spec("normal", 1.5, 0.1)}, "python3 train.py") == ["dropout: --dropout 1.5: must be in [0, 1)"]


def safe_tpe_refuses(space):
    from search.nni_tuner import SafeTPE
    try:
        SafeTPE(optimize_mode="maximize", start_from_defaults=True).update_search_space(space)
    except ValueError:
        return True
    return False


@pytest.mark.parametrize("space,refused", [
    ({"optimizer": spec("choice", "SGD")}, "train.py's default optimizer='AdamW' is not among ['SGD']"),
    ({"batch_size": spec("randint", 16, 64)}, "default batch_size=64 is outside randint [16, 64]"),  # high is exclusive
    ({"dropout": spec("normal", 0.2, 0.05), "lr": spec("lognormal", -6, 1)}, None),  # [mu, sigma]: every value can be drawn
    ({"batch_size": spec("randint", 16, 65)}, None),
])
def test_start_from_defaults_is_checked_by_safe_tpe_rule(space, refused):
    """SafeTPE raised on a space without train.py's defaults, and the experiment sat RUNNING with 0 trials."""
    config = {"searchSpace": space, "trialCommand": "python3 train.py",
              "tuner": {"className": "search.nni_tuner.SafeTPE", "classArgs": {"optimize_mode": "maximize", "start_from_defaults": True}}}
    out = io.StringIO()
    assert pf.check_space(config, "c.yml", out) == (1 if refused else 0), out.getvalue()
    if refused:
        assert out.getvalue().startswith("FAIL search space start_from_defaults: ") and refused in out.getvalue()
        assert "set start_from_defaults: false" in out.getvalue()
    else:
        assert out.getvalue().startswith("OK   search space: ")
    assert safe_tpe_refuses(space) == bool(refused)
    config["tuner"]["classArgs"]["start_from_defaults"] = False
    assert pf.check_space(config, "c.yml", io.StringIO()) == 0
    config["tuner"] = {"name": "TPE", "classArgs": {"start_from_defaults": True}}
    assert pf.check_space(config, "c.yml", out) == 1 and "start_from_defaults is an option of search.nni_tuner.SafeTPE" in out.getvalue()


@pytest.mark.parametrize("command,refused", [
    ("python3 train.py --model timm/tf_efficientnet_lite0 --lr 0.001", None),
    ("python3 train.py --lr 0.001", "default model='BaseModel' is not among ['timm/tf_efficientnet_lite0']"),
    ("python3 train.py --modle timm/tf_efficientnet_lite0", "unrecognized arguments: --modle timm/tf_efficientnet_lite0"),
])
def test_start_from_a_trial_command_is_checked_as_safe_tpe_starts(command, refused):
    """config_finetune.yml's classArgs.trial_command: the first trial takes that command's flags."""
    from search.nni_tuner import SafeTPE
    space = {"model": spec("choice", "timm/tf_efficientnet_lite0"), "lr": spec("loguniform", 1e-4, 1e-2)}
    args = {"optimize_mode": "maximize", "start_from_defaults": True, "trial_command": command}
    config = {"searchSpace": space, "trialCommand": command, "tuner": {"className": "search.nni_tuner.SafeTPE", "classArgs": args}}
    out = io.StringIO()
    assert pf.check_space(config, "c.yml", out) == (1 if refused else 0), out.getvalue()
    assert (refused or "OK   search space: ") in out.getvalue() and len(out.getvalue().splitlines()) == 1, out.getvalue()
    tuner = SafeTPE(**args)
    if refused:  # the tuner's own error, not argparse's exit inside NNI's dispatcher
        with pytest.raises(ValueError, match=re.escape(refused)):
            tuner.update_search_space(space)
    else:
        tuner.update_search_space(space)
        assert tuner.generate_parameters(0) == {"model": "timm/tf_efficientnet_lite0", "lr": 0.001}


def test_combinations_cover_every_pair_within_the_bound():
    import random
    points = {f"k{n}": list(range(n % 5 + 1)) for n in range(12)} | {"wide": list(range(12))}
    configs = covering(points, random.Random(0), 300)
    assert configs == covering(points, random.Random(0), 300) and len(configs) <= 300
    assert all(set(c) == set(points) for c in configs)
    pairs = {(a, c[a], b, c[b]) for c in configs for a in c for b in c if a < b}
    assert all((a, i, b, j) in pairs for a in points for b in points if a < b for i in points[a] for j in points[b])
    assert len(covering(points, random.Random(0), 10)) == 10


# ----------------------------------------------------------------------------- pretrained weights on the servers
def fake_cached_weights(home):
    """What the servers' caches hold after one download: timm's test_efficientnet in huggingface_hub's cache, and
    torchvision's resnet18 in torch.hub's -> the files made (to remove after)."""
    import timm
    import torchvision
    repo = timm.get_pretrained_cfg("test_efficientnet").hf_hub_id
    root = home / ".cache" / "huggingface" / "hub" / f"models--{repo.replace('/', '--')}"
    files = [root / "refs" / "main", root / "snapshots" / ("0" * 40) / "model.safetensors",
             home / ".cache" / "torch" / "hub" / "checkpoints" / Path(torchvision.models.ResNet18_Weights.DEFAULT.url).name]
    for f in files:
        if f.exists():
            pytest.skip(f"{f} exists: this machine's real cache")
    files[0].parent.mkdir(parents=True)
    files[0].write_text("0" * 40)
    files[1].parent.mkdir(parents=True)
    files[1].write_bytes(b"weights")
    return root, files[2]


@pytest.mark.slow
def test_weights_check_over_ssh(tmp_path, sshd, data_dir):
    """With --pretrained, every backbone the search can draw: cached on the server, else in an installed weights
    package, else downloadable from it (not here: no network), else FAIL with the fix."""
    path, config = write_config(tmp_path, sshd, data_dir, interpreter=sys.executable)
    config["trialCommand"] += " --pretrained"
    path.write_text(yaml.safe_dump(config))
    models = ["timm/test_efficientnet", "resnet18", "timm/tf_efficientnet_lite0"]  # the last from its weights package
    (tmp_path / "search_space.json").write_text(json.dumps({"model": {"_type": "choice", "_value": models}}))
    home = Path(os.path.expanduser(f"~{sshd.user}"))
    hf_repo, resnet = fake_cached_weights(home)
    try:
        line = machine_line(preflight(path))
        assert line.startswith("FAIL ") and "weights: resnet18: not in the cache there, no weights package, and not " \
            "downloadable" in line, line
        assert "--weights FILE" in line and "timm/test_efficientnet" not in line and "lite0" not in line
        resnet.parent.mkdir(parents=True, exist_ok=True)
        resnet.write_bytes(b"weights")
        proc = preflight(path)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert "weights timm/test_efficientnet cached, resnet18 cached, timm/tf_efficientnet_lite0 package" in machine_line(proc)
    finally:
        shutil.rmtree(hf_repo, ignore_errors=True)
        resnet.unlink(missing_ok=True)


def test_a_tuner_trial_command_other_than_trial_command_is_one_fail_line():
    """Preflight passed it, and the first trial was then not the configuration finalize calls the defaults."""
    config = load_config(ROOT / "config_finetune.yml")
    config["tuner"]["classArgs"]["trial_command"] = config["trialCommand"].replace("--lr 0.001", "--lr 0.003")
    out = io.StringIO()
    assert pf.check_space(config, ROOT / "config_finetune.yml", out) == 1
    assert out.getvalue().splitlines() == [
        "FAIL search space tuner: trial_command differs from trialCommand in --lr (0.003 there, 0.001 in trialCommand): the "
        "first trial would not be the configuration finalize calls the defaults; give both one command (config_finetune.yml: "
        "a YAML anchor)"]
    config["tuner"]["classArgs"]["trial_command"] = config["trialCommand"] + " --epochs 9"  # not searched: the same first trial
    assert pf.check_space(config, ROOT / "config_finetune.yml", io.StringIO()) == 0


# ----------------------------------------------------------------------------- every problem a FAIL line, all counted
def gpu_config(tmp_path, models=(), **changes):
    """config_gpu.yml as a user edits it: `models` added to the search space's model choices."""
    config = load_config(ROOT / "config_gpu.yml")
    config["searchSpace"]["model"]["_value"] += list(models)
    config.update(trialCodeDirectory=str(ROOT), **changes)
    config["tuner"]["codeDirectory"] = str(ROOT)
    (tmp_path / "config_gpu.yml").write_text(yaml.safe_dump(config))
    return tmp_path / "config_gpu.yml", config


def summary_counts_fail_lines(proc):
    lines = proc.stdout.splitlines()
    fails = [line for line in lines if line.startswith("FAIL ")]
    n = len(fails)
    assert lines[-1] == f"preflight: {n} problem{'s' if n != 1 else ''}, see FAIL lines", proc.stdout
    return fails


def test_a_model_train_py_refuses_is_a_fail_line_and_the_machine_is_still_checked(tmp_path):
    """timm/tf_efficientnet_lite9 in config_gpu.yml's models: its FAIL line, then the same text as `preflight.py:
    error:` from the weights check, exit 1, without this machine's checks or the summary."""
    path, _ = gpu_config(tmp_path, ["timm/tf_efficientnet_lite9"])
    proc = preflight(path)
    assert proc.returncode == 1 and proc.stderr == "", proc.stdout + proc.stderr
    fails = summary_counts_fail_lines(proc)
    assert fails[0].startswith("FAIL search space model: parameter 'model': unknown timm model 'tf_efficientnet_lite9'")
    assert sum("unknown timm model" in line for line in proc.stdout.splitlines()) == 1, proc.stdout
    assert any(line.startswith(("OK   this machine python ", "FAIL this machine ")) for line in proc.stdout.splitlines())


def test_a_non_timm_model_with_layer_decay_searched_fails_together(tmp_path):
    """efficientnet_b0 in config_gpu.yml's models while layer_decay 0.85/0.95 is searched: preflight said OK alone
    and together, and every trial that drew the pair failed in train.py's optimiser."""
    path, config = gpu_config(tmp_path, ["efficientnet_b0"])
    out = io.StringIO()
    assert pf.check_space(config, path, out) == 1, out.getvalue()
    [line] = out.getvalue().splitlines()  # which of the two values the pairwise covering meets first depends on the space
    assert re.fullmatch(
        r"FAIL search space model=efficientnet_b0 with layer_decay=0\.(85|95): --layer_decay needs a timm backbone \(--model "
        r"timm/<name>\): EfficientNet has no layer grouping: each value passes alone, not together; drop one of them from "
        r"its entry, or make them options of one nested choice", line), line


def test_each_problem_of_a_machine_is_a_fail_line_and_counted(tmp_path):
    """Two problems of this machine were one FAIL line, counted as '1 problems'."""
    config = {"searchSpace": {"lr": spec("choice", 0.001)}, "trialGpuNumber": 64,  # more GPUs than any host has
              "trialCommand": f"python3 train.py --data_dir {tmp_path / 'nowhere'}", "trialCodeDirectory": str(ROOT),
              "trainingService": {"platform": "local"}}
    (tmp_path / "c.yml").write_text(yaml.safe_dump(config))
    proc = preflight(tmp_path / "c.yml")
    assert proc.returncode == 1 and proc.stderr == "", proc.stdout + proc.stderr
    fails = summary_counts_fail_lines(proc)
    assert [line.split(":")[0] for line in fails] == ["FAIL this machine gpu", "FAIL this machine data"], proc.stdout
    assert proc.stdout.splitlines()[-1] == "preflight: 2 problems, see FAIL lines"
