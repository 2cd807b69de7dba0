"""search/trials.py: parameters as train.py flags, Hyperband's string parameter ids, and the assessor's stops
read from nnimanager.log."""
import shlex

from search import trials
from training import flags


def test_best_command_from_params():
    params = {"lr": 0.001, "batch_size": 64.0, "criterion": {"_name": "focal", "focal_gamma": 2.5},
              "resize": [64, 48], "freeze_backbone": True, "pretrained": False, "head": "512-256"}
    cmd = trials.best_command("python3 train.py --data_dir '/data/my set' --lr 0.1 --epochs 20 --freeze_backbone", params)
    assert shlex.split(cmd) == ["python3", "train.py", "--data_dir", "/data/my set", "--epochs", "20",
                                "--lr", "0.001", "--batch_size", "64", "--criterion", "focal", "--focal_gamma", "2.5",
                                "--resize", "64", "48", "--freeze_backbone", "--head", "512-256"]
    args = flags.build_parser().parse_args(shlex.split(cmd)[2:])
    assert args.criterion == "focal" and args.focal_gamma == 2.5 and args.batch_size == 64 and args.resize == [64, 48]


def test_trial_budget_becomes_epochs_in_the_best_command():
    """Hyperband's TRIAL_BUDGET is shown, and re-run, as the --epochs train.py trained."""
    params = {"TRIAL_BUDGET": 4, "lr": 0.01}
    assert trials.flatten(params) == {"epochs": 4, "lr": 0.01}
    cmd = trials.best_command("python3 train.py --epochs 13 --resize 64 48", params)
    assert shlex.split(cmd) == ["python3", "train.py", "--resize", "64", "48", "--lr", "0.01", "--epochs", "4"]


def test_hyperband_parameter_ids_are_kept_as_text():
    rows = [("a1", "SUCCEEDED", 0, [{"parameter_id": "0-2_0_0", "parameters": {"lr": 0.01, "TRIAL_BUDGET": 1}}], ""),
            ("b2", "SUCCEEDED", 1, [{"parameter_id": "0-2_1_0", "parameters": {"lr": 0.01, "TRIAL_BUDGET": 4}}], "")]
    metrics = [("a1", "0-2_0_0", "FINAL", '"0.5"'), ("b2", "0-2_1_0", "FINAL", '"0.7"')]
    exp = trials.assemble("x", "DONE", {}, rows, metrics, "test", ({}, set()))
    assert [(t.parameter_id, t.params["TRIAL_BUDGET"], t.metric) for t in trials.ranked(exp)] == [("0-2_1_0", 4, 0.7), ("0-2_0_0", 1, 0.5)]


def test_assessor_stop_is_listed_as_early_stopped(tmp_path):
    """NNI 3.0 lists an assessor stop as USER_CANCELED; the summary tells it from a user's
    cancel by nnimanager.log (lines as NNI 3.0 writes them)."""
    (tmp_path / "nnimanager.log").write_text(
        '[2026-11-24 03:59:07] INFO (LocalV3.local) Trial parameter: tl7g8 {"parameter_id": 1, '
        '"parameter_source": "algorithm", "parameters": {"lr": 0.01}}\n'
        '[2026-11-24 03:59:22] INFO (NNIManager) cancelTrialJob: "tl7g8"\n'
        '[2026-11-24 04:00:01] INFO (NNIManager) User cancelTrialJob: Ab3dE\n')
    rows = [("tl7g8", "USER_CANCELED", 1, [], ""), ("Ab3dE", "USER_CANCELED", 2, [], "")]
    exp = trials.assemble("x", "DONE", {}, rows, [], "test", trials.read_manager_log(tmp_path))
    assert {t.id: t.status for t in exp.trials} == {"tl7g8": "EARLY_STOPPED", "Ab3dE": "USER_CANCELED"}
    assert exp.trials[0].params == {"lr": 0.01}


def test_every_flag_of_a_config_json_as_words_parses_back_to_it():
    """finalize reads a fold's config.json back as train.py words (flag_words): each value must parse to itself, an
    empty list (--tracker's default) too, which nargs="+" refused."""
    config = flags.defaults()
    assert flags.run_config(flags.resolve(flags.build_parser().parse_args(trials.flag_words(config)))) == config
