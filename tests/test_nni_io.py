"""search/nni_io.py: an experiment config read and checked (one line naming the file), local, remote and list-valued
training services, the trial command, the search space, nnictl's output and registry."""
import json

import pytest
import yaml

from conftest import ROOT
from search import nni_io

REMOTE = {"platform": "remote", "machineList": [{"host": "gpu1", "user": "u", "port": 2222, "gpuIndices": "0,1"}]}


def write(tmp_path, config):
    path = tmp_path / "c.yml"
    path.write_text(config if isinstance(config, str) else yaml.safe_dump(config))
    return path


@pytest.mark.parametrize("text, reason", [
    ("trialCommand: [python3\n", "not a readable YAML file (expected ',' or ']', but got '<stream end>', line 2)"),
    ("- a\n- b\n", "not an NNI experiment config (not a mapping of its keys)"),
    ("trialConcurrency: 1\n", "not an NNI experiment config (no trialCommand)"),
    ("trialCommand: python3 train.py\n", "not an NNI experiment config (trainingService: a mapping with a platform, or a list of them)"),
    ("trialCommand: python3 train.py\ntrainingService: {platform: remote}\n", "trainingService.machineList is empty"),
    ("trialCommand: python3 train.py\ntrainingService: {platform: remote, machineList: [{user: u}]}\n",
     "trainingService.machineList: {'user': 'u'} is not a machine with a host"),
])
def test_a_config_that_is_no_experiment_is_one_line_naming_the_file(tmp_path, text, reason):
    with pytest.raises(ValueError) as e:
        nni_io.load_config(write(tmp_path, text))
    assert str(e.value) == f"{tmp_path / 'c.yml'}: {reason}"


def test_a_missing_file_is_one_line():
    with pytest.raises(ValueError, match=r"^/no/such\.yml: not a readable YAML file \(No such file or directory\)$"):
        nni_io.load_config("/no/such.yml")


def test_the_shipped_configs_load():
    local, remote = nni_io.load_config(ROOT / "config_local.yml"), nni_io.load_config(ROOT / "config_remote.yml")
    assert not nni_io.is_remote(local) and nni_io.machines_of(local) == []
    assert nni_io.is_remote(remote) and len(nni_io.machines_of(remote)) == 2
    assert nni_io.train_words(nni_io.trial_command(local)) == ["--epochs", "20"]
    assert "lr" in nni_io.search_space(local, ROOT / "config_local.yml")
    assert nni_io.search_space(remote, ROOT / "config_remote.yml") == json.loads((ROOT / "search_space.json").read_text())


def test_training_services_one_or_a_list():
    """NNI v3 takes trialCommand at the top or in the training service, and a list of services (hybrid mode)."""
    one = {"trialCommand": "python3 train.py", "trainingService": REMOTE}
    listed = {"trainingService": [{"platform": "local", "trialCommand": "python3 train.py --lr 0.1"}, REMOTE]}
    for config in (one, listed):
        [m] = nni_io.machines_of(config)
        assert nni_io.is_remote(config) and (m.name, m.gpu_indices, m.ssh_key_file) == ("u@gpu1:2222", [0, 1], "~/.ssh/id_rsa")
    assert nni_io.trial_command(one) == "python3 train.py" and nni_io.trial_command(listed) == "python3 train.py --lr 0.1"
    assert nni_io.setting({"trainingService": {"platform": "local", "trialGpuNumber": 1}}, "trialGpuNumber") == 1
    assert nni_io.trial_command({}) == "" and not nni_io.is_remote({})


def test_search_space_inline_or_from_its_file(tmp_path):
    (tmp_path / "space.json").write_text('{"lr": {"_type": "choice", "_value": [0.1]}}')
    assert nni_io.search_space({"searchSpaceFile": "space.json"}, tmp_path / "c.yml") == {"lr": {"_type": "choice", "_value": [0.1]}}
    assert nni_io.search_space({"searchSpace": {}}, "c.yml") == {}
    with pytest.raises(ValueError, match="no searchSpace or searchSpaceFile"):
        nni_io.search_space({}, "c.yml")
    with pytest.raises(ValueError, match=r"^searchSpaceFile .*nowhere.json: "):
        nni_io.search_space({"searchSpaceFile": "nowhere.json"}, tmp_path / "c.yml")


def test_the_experiment_id_nnictl_prints_and_its_files(tmp_path):
    assert nni_io.exp_id_of("INFO: Starting experiment...\n\x1b[32mINFO: \x1b[0mExperiment ID: \x1b[1mab12CD34\x1b[0m\n") == "ab12CD34"
    assert nni_io.exp_id_of("ERROR: Port 8080 is not idle") is None
    assert nni_io.registry(tmp_path) == {}
    (tmp_path / "nni-experiments").mkdir()
    (tmp_path / "nni-experiments" / ".experiment").write_text(json.dumps({"ab12": {"logDir": str(tmp_path / "exps")}}))
    info = nni_io.registry(tmp_path)["ab12"]
    assert nni_io.database("ab12", info) == tmp_path / "exps" / "ab12" / "db" / "nni.sqlite"
    assert nni_io.log_dir_of(nni_io.database("ab12", info)) == tmp_path / "exps" / "ab12" / "log"


def test_ssh_logs_in_as_the_machine_list_says():
    m = nni_io.Machine(host="gpu1", port=2222, user="u", ssh_key_file="/k")
    base = nni_io.ssh_base(m, 5)
    assert base[:3] == ["ssh", "-p", "2222"] and "BatchMode=yes" in base and base[-1] == "u@gpu1"
    assert base[base.index("-i") + 1] == "/k"


@pytest.mark.parametrize("words, expected", [(["--epochs", "10", "--lr", "0.1"], ["--epochs", "3", "--lr", "0.1"]),
                                             (["--lr", "0.1"], ["--lr", "0.1", "--epochs", "3"])])
def test_with_flag_replaces_a_given_flag_or_appends_it(words, expected):
    assert nni_io.with_flag(words, "--epochs", 3) == expected and words[-1] != "3"  # a new list: the caller's is kept
