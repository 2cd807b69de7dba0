"""search/nni_tuner.py: SafeTPE (NNI 3.0's parameter swap, start_from_defaults), SafeHyperband and SafeBOHB
(their string parameter ids), and a tuner start that does not pay for BOHB's imports."""
import json
import shlex
import subprocess
import sys

import pytest

from conftest import ROOT
from test_configs import load_yaml
from training import flags


def test_safe_tpe_survives_swapped_parameters():
    """NNI 3.0 (concurrency > 1): the trial that ran parameter id 1 is listed, and ends, as id 0."""
    from search.nni_tuner import SafeTPE
    tuner = SafeTPE(optimize_mode="maximize")
    tuner.update_search_space({"lr": {"_type": "loguniform", "_value": [1e-4, 1e-2]}})
    p0, p1 = tuner.generate_parameters(0), tuner.generate_parameters(1)
    tuner.receive_trial_result(1, p1, 0.5)
    tuner.trial_end(0, True)                 # the dispatcher's (wrong) id from the trial list
    tuner.receive_trial_result(0, p0, 0.7)   # stock TpeTuner: KeyError 0, the dispatcher dies
    tuner.trial_end(1, True)
    assert 1e-4 <= tuner.generate_parameters(2)["lr"] <= 1e-2


def are_train_defaults(params):
    """NNI parameters that leave every train.py flag at its default."""
    parser = flags.build_parser()
    return flags.apply_params(parser, parser.parse_args([]), params, "NNI parameters") == parser.parse_args([])


def test_safe_tpe_starts_from_train_defaults():
    from search.nni_tuner import SafeTPE
    space = load_yaml("config_local.yml")["searchSpace"]
    tuner = SafeTPE(optimize_mode="maximize", start_from_defaults=True, seed=1, tpe_args=dict(n_startup_jobs=2))
    tuner.update_search_space(space)
    first = tuner.generate_parameters(0)
    assert set(first) == set(space) and first["criterion"] == {"_name": flags.build_parser().parse_args([]).criterion}
    assert are_train_defaults(first)  # the first trial is `python train.py`
    tuner.receive_trial_result(0, first, 0.9)  # TPE models it like any other result
    later = [tuner.generate_parameters(i) for i in range(1, 4)]
    assert all(p != first for p in later)
    for i, p in enumerate(later, 1):
        tuner.receive_trial_result(i, p, 0.5)
    assert len(tuner._history["lr",]) == 4


def test_safe_tpe_starts_from_the_trial_command_it_is_given():
    """config_finetune.yml: its space leaves train.py's BaseModel, so the first trial is its trialCommand's flags."""
    from search.nni_tuner import SafeTPE
    raw = load_yaml("config_finetune.yml")
    assert raw["tuner"]["classArgs"]["trial_command"] == raw["trialCommand"]  # the YAML alias, as NNI reads it
    tuner = SafeTPE(**raw["tuner"]["classArgs"])
    tuner.update_search_space(raw["searchSpace"])
    first = tuner.generate_parameters(0)
    parser, words = flags.build_parser(), shlex.split(raw["trialCommand"])[2:]
    assert flags.apply_params(parser, parser.parse_args(words), first, "NNI parameters") == parser.parse_args(words)
    assert first["model"] == "timm/tf_efficientnet_lite0" and first["resize"] == [96, 72] and first["warmup_epochs"] == 1
    with pytest.raises(ValueError, match=r"default model='BaseModel' is not among"):  # without it: train.py's defaults
        SafeTPE(optimize_mode="maximize", start_from_defaults=True).update_search_space(raw["searchSpace"])


@pytest.mark.parametrize("space,message", [
    ({"lr": {"_type": "loguniform", "_value": [0.01, 0.1]}}, r"default lr=0.002 is outside loguniform \[0.01, 0.1\]"),
    ({"optimizer": {"_type": "choice", "_value": ["SGD"]}}, r"default optimizer='AdamW' is not among \['SGD'\]"),
    ({"criterion": {"_type": "choice", "_value": [{"_name": "focal", "focal_gamma": {"_type": "uniform", "_value": [1, 3]}}]}},
     r"default criterion='cross_entropy' is not among \['focal'\]"),
    ({"learning_rate": {"_type": "choice", "_value": [0.1]}}, r"key 'learning_rate' is not a train.py flag"),
])
def test_safe_tpe_refuses_defaults_outside_the_space(space, message):
    from search.nni_tuner import SafeTPE
    with pytest.raises(ValueError, match=message):
        SafeTPE(optimize_mode="maximize", start_from_defaults=True).update_search_space(space)
    SafeTPE(optimize_mode="maximize").update_search_space(space)  # without the option the space is TPE's business


@pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning")  # BOHB's ConfigSpace/statsmodels calls
@pytest.mark.parametrize("name,class_args", [("Hyperband", dict(R=4, eta=2)), ("BOHB", dict(min_budget=1, max_budget=4, eta=2))])
def test_safe_advisors_survive_their_string_parameter_ids(monkeypatch, name, class_args):
    """NNI 3.0's stock Hyperband and BOHB raise TypeError at the first metric (their ids are strings); the Safe ones
    take the results and promote the better half of a round with twice the budget."""
    import nni.runtime.msg_dispatcher_base as base
    from search import nni_tuner
    monkeypatch.setattr(base, "dispatcher_env_vars", base.dispatcher_env_vars._replace(NNI_TUNER_COMMAND_CHANNEL="ws://_unittest_"))
    safe = getattr(nni_tuner, f"Safe{name}")
    for cls in (safe.__bases__[1], safe):
        sent = []
        advisor = cls(optimize_mode="maximize", **class_args)
        advisor.send = lambda command, data: sent.append(json.loads(data) if data else None)
        advisor.handle_initialize({"lr": {"_type": "loguniform", "_value": [1e-4, 1e-2]}})
        advisor.handle_request_trial_jobs(4)
        jobs = [j for j in sent if j and "parameter_id" in j]
        assert [j["parameters"]["TRIAL_BUDGET"] for j in jobs] == [1, 1, 1, 1]
        report = [dict(parameter_id=j["parameter_id"], trial_job_id=f"t{i}", type="FINAL", sequence=0, value=json.dumps(i / 10))
                  for i, j in enumerate(jobs)]
        if cls is not safe:
            with pytest.raises(TypeError, match="'<=' not supported"):
                advisor.handle_report_metric_data(report[0])
            continue
        for data, job in zip(report, jobs):
            advisor.handle_report_metric_data(data)
            advisor.handle_trial_end(dict(trial_job_id=data["trial_job_id"], event="SUCCEEDED", hyper_params=json.dumps(job)))
        advisor.handle_request_trial_jobs(2)
        promoted = [j for j in sent if j and "parameter_id" in j][4:6]
        assert [j["parameters"]["TRIAL_BUDGET"] for j in promoted] == [2, 2]
        assert {j["parameters"]["lr"] for j in promoted} == {jobs[3]["parameters"]["lr"], jobs[2]["parameters"]["lr"]}


def test_tuners_start_without_bohbs_imports():
    """NNI 3.0 fails an experiment whose tuner has not connected within 10 s: SafeTPE must not pay for BOHB's imports."""
    code = "import sys, search.nni_tuner as t; a = 'ConfigSpace' in sys.modules; t.SafeBOHB; print(a, 'ConfigSpace' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert out.stdout.split() == ["False", "True"], out.stderr
