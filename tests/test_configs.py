"""The shipped NNI configs and search space, without starting NNI: every key and value a train.py flag value,
NNI's own schema check, what .nniignore keeps out of the upload (by NNI's own matcher), and the arithmetic of
config_local.yml's comments on its tuners."""
import json
import math
import os
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from conftest import ROOT
from loss import SOFT_TARGETS
from search.preflight import gpu_problem
from training import flags


def load_yaml(name):
    return yaml.safe_load((ROOT / name).read_text())


def _values_to_try(spec):
    kind, bounds = spec["_type"], spec["_value"]
    if kind == "choice":
        return bounds
    return [bounds[0], bounds[1]]


# what each shipped space must search: the fine-tuning one its own knobs (issue 30), the others the loss too
SEARCHED = {"search_space.json": {"lr", "batch_size", "optimizer", "weight_decay", "augmentation", "head", "criterion", "ema", "average_epochs"},
            "config_local.yml": {"lr", "batch_size", "optimizer", "weight_decay", "augmentation", "head", "criterion"},
            "config_finetune.yml": {"model", "resize", "lr", "warmup_epochs", "weight_decay", "augmentation", "age_bounds"},
            "config_gpu.yml": {"model", "lr", "warmup_epochs", "weight_decay", "augmentation", "age_bounds", "ema", "layer_decay", "average_epochs",
                               "mixup", "cutmix"}}
# the libraries' augmentations, levers of the GPU searches (MixUp and CutMix nested under the criteria that take soft targets)
LIBRARY_LEVERS = {"search_space.json", "config_gpu.yml"}


@pytest.mark.parametrize("where", list(SEARCHED))
def test_search_space_keys_and_values_are_train_flags(where):
    space = json.loads((ROOT / where).read_text()) if where.endswith(".json") else load_yaml(where)["searchSpace"]
    parser = flags.build_parser()
    base = parser.parse_args([])
    assert SEARCHED[where] <= set(space)
    assert space["lr"]["_type"] == "loguniform"
    if "head" in SEARCHED[where]:
        assert any(isinstance(c, dict) and c["_name"] == "focal" and "focal_gamma" in c for c in space["criterion"]["_value"])
    for key, spec in space.items():
        for value in _values_to_try(spec):
            if isinstance(value, dict):  # nested choice: its own hyperparameters at both ends
                for sub, sub_spec in (kv for kv in value.items() if kv[0] != "_name"):
                    for v in _values_to_try(sub_spec):
                        flags.apply_params(parser, base, {key: {"_name": value["_name"], sub: v}}, where)
                flags.apply_params(parser, base, {key: {"_name": value["_name"]}}, where)
            else:
                flags.apply_params(parser, base, {key: value}, where)  # raises on unknown key / bad value
    if where == "search_space.json":
        assert len(space["model"]["_value"]) >= 3
    if where in LIBRARY_LEVERS:
        assert {"randaugment", "trivialaugment"} <= set(space["augmentation"]["_value"])
        criteria = [c if isinstance(c, dict) else {"_name": c} for c in space["criterion"]["_value"]]
        mixed = [c["_name"] for c in criteria if "mixup" in c or "mixup" in space]
        assert mixed and set(mixed) <= set(SOFT_TARGETS)  # MixUp never drawn with a loss that cannot take soft targets


def test_config_remote_is_valid_and_schedules_on_one_gpu_hosts(tmp_path):
    from nni.experiment.config import ExperimentConfig
    raw = load_yaml("config_remote.yml")
    assert raw["nniManagerIp"] and raw["trainingService"]["platform"] == "remote"
    assert "--data_dir" in shlex.split(raw["trialCommand"])
    machines = raw["trainingService"]["machineList"]
    assert len(machines) == 2
    key = tmp_path / "key"
    key.write_text("placeholder")
    for m in machines:
        assert m["pythonPath"].endswith("/bin") and "password" not in m and m["sshKeyFile"]
        # a 1-GPU host must be able to take a trial (NNI 3.0 refuses requests for all of a host's GPUs)
        assert gpu_problem(1, raw.get("trialGpuNumber"), m.get("maxTrialNumberPerGpu", 1), m.get("gpuIndices")) is None
        m["sshKeyFile"] = str(key)
    cwd = os.getcwd()
    os.chdir(ROOT)  # relative paths in the config are relative to it
    try:
        ExperimentConfig(**raw).validate()
        ExperimentConfig.load(str(ROOT / "config_local.yml")).validate()
        ExperimentConfig.load(str(ROOT / "config_finetune.yml")).validate()
        ExperimentConfig.load(str(ROOT / "config_gpu.yml")).validate()
    finally:
        os.chdir(cwd)


def test_config_gpu_shares_one_gpu_as_nni_3_0_schedules():
    """Its trials book 1/maxTrialNumberPerGpu of the GPU: on a 1-GPU machine NNI 3.0 schedules them (a request for
    all of a host's GPUs never is), and several share it only with useActiveGpu: true (with false, a GPU that any
    process uses, the first trial included, is skipped). Each backbone at its own pretraining size."""
    raw = load_yaml("config_gpu.yml")
    service = raw["trainingService"]
    assert service["platform"] == "local" and service["useActiveGpu"] is True
    assert raw["trialGpuNumber"] == 1 and service["maxTrialNumberPerGpu"] >= 2 and raw["trialConcurrency"] <= service["maxTrialNumberPerGpu"]
    assert gpu_problem(1, raw["trialGpuNumber"], service["maxTrialNumberPerGpu"]) is None
    words = shlex.split(raw["trialCommand"])
    assert {"--pretrained", "--amp", "--channels_last"} <= set(words) and "--resize" not in words and "resize" not in raw["searchSpace"]
    assert raw["tuner"]["classArgs"]["trial_command"] == raw["trialCommand"]


def test_nniignore_keeps_data_and_envs_out():
    lines = {l.strip() for l in (ROOT / ".nniignore").read_text().splitlines() if l.strip() and not l.startswith("#")}
    assert {"data/", "runs/", ".git/", ".venv", "venv*/", "__pycache__/"} <= lines  # .venv: a folder, or a link to one


# NNI's own walk over the code directory (nni_node/common/tarball.js) with its own matcher (the `ignore`
# package it ships): directories are asked with a trailing separator, and an ignored one is not entered.
NNI_WALK = """
const fs = require('fs'), path = require('path');
const ig = require(process.argv[1] + '/node_modules/ignore')().add(fs.readFileSync(process.argv[2] + '/.nniignore', 'utf8'));
function* walk(root, rel) {
  for (const entry of fs.readdirSync(path.join(root, rel)).sort()) {
    const relEntry = path.join(rel, entry), isDir = fs.lstatSync(path.join(root, relEntry)).isDirectory();
    if (ig.ignores(relEntry + (isDir ? path.sep : ''))) continue;
    if (isDir) yield* walk(root, relEntry); else yield relEntry;
  }
}
console.log(JSON.stringify([...walk(process.argv[2], '')]));
"""


def test_nniignore_keeps_secrets_out_by_nnis_own_matcher(tmp_path):
    import nni_node
    node_dir = Path(nni_node.__file__).parent
    shutil.copy(ROOT / ".nniignore", tmp_path / ".nniignore")
    secrets = [".ssh/id_ed25519", "id_rsa", "id_rsa.pub", "keys/id_ecdsa", "server.pem", "tls/server.key", ".env", ".env.local",
               ".netrc", ".aws/credentials", ".kaggle/kaggle.json", "cert.p12", "data/demo/train/train.csv", "runs/exp/best.pth"]
    code = ["train.py", "model.py", "training/checkpoint.py", "baseline/kfold.py", "search_space.json", "config_remote.yml"]
    for name in secrets + code:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("x")
    out = subprocess.run([str(node_dir / "node"), "-e", NNI_WALK, str(node_dir), str(tmp_path)],
                         capture_output=True, text=True, check=True).stdout
    uploaded = set(json.loads(out))
    assert uploaded == set(code) | {".nniignore"}, uploaded


def commented_hyperband(config_text):
    """The Hyperband tuner config_local.yml offers in a comment, uncommented."""
    lines = config_text.splitlines()
    start = lines.index("#   tuner:")
    block = [l[1:] for l in lines[start:] if l.startswith("#   ")]
    block = block[:next((i for i, l in enumerate(block[1:], 1) if not l.startswith("     ")), len(block))]
    return yaml.safe_load("\n".join(block))["tuner"]


def test_configs_leave_most_trials_to_the_tuners_model():
    for name in ("config_local.yml", "config_remote.yml", "config_finetune.yml", "config_gpu.yml"):
        raw = load_yaml(name)
        startup = raw["tuner"]["classArgs"]["tpe_args"]["n_startup_jobs"]
        assert 2 <= startup <= raw["maxTrialNumber"] / 3, (name, startup)
    raw = load_yaml("config_local.yml")
    words = shlex.split(raw["trialCommand"])
    tuner = commented_hyperband((ROOT / "config_local.yml").read_text())
    assert tuner["className"] == "search.nni_tuner.SafeHyperband" and tuner["codeDirectory"] == "."
    epochs = int(words[words.index("--epochs") + 1])
    assert tuner["classArgs"]["R"] == epochs  # the longest trial = the TPE trials' length
    # the comment's arithmetic, from NNI's own brackets: one pass, its trials, their shortest and total epochs
    claim = re.search(r"maxTrialNumber to (\d+): one pass through its brackets is \1 trials of (\d+) to (\d+)\s+#\s+"
                      r"epochs, (\d+) epochs in all \(12 trials of (\d+) epochs are (\d+)\)", (ROOT / "config_local.yml").read_text())
    from nni.algorithms.hpo.hyperband_advisor import Bracket
    R, eta = tuner["classArgs"]["R"], tuner["classArgs"]["eta"]
    s_max = math.floor(math.log(R, eta) + 1e-6)
    rounds = []
    for s in range(s_max, -1, -1):
        bracket = Bracket(s, s, s_max, eta, R, "maximize")
        for i in range(s + 1):
            bracket.i = i
            rounds.append(bracket.get_n_r())
    trials, budget = sum(n for n, _ in rounds), sum(n * r for n, r in rounds)
    assert claim and tuple(map(int, claim.groups())) == (trials, min(r for _, r in rounds), R, budget, epochs, 12 * epochs)
    assert raw["maxTrialNumber"] == 12
    from nni.experiment.config import ExperimentConfig
    alternative = {k: v for k, v in raw.items() if k != "assessor"}
    alternative.update(tuner=tuner, maxTrialNumber=trials)
    cwd = os.getcwd()
    os.chdir(ROOT)
    try:
        ExperimentConfig(**alternative).validate()
    finally:
        os.chdir(cwd)
