"""training/flags.py in-process: the parser's defaults and help, --config layering, NNI parameters with
their types and nested choices, TRIAL_BUDGET, and the range checks (no train.py process needed)."""
import argparse
import json
import os
import subprocess
import sys

import pytest
from conftest import ROOT

from training import flags


@pytest.fixture
def parser_args():
    parser = flags.build_parser()
    return parser, parser.parse_args([])


def test_params_merge_with_types_and_nested_choices(parser_args):
    parser, args = parser_args
    params = {"lr": 0.01, "batch_size": 32.0, "resize": [64, 48], "freeze_backbone": True,
              "criterion": {"_name": "focal", "focal_gamma": 1.5}, "model": "resnet18"}
    flags.apply_params(parser, args, params, "NNI parameters")
    assert (args.lr, args.batch_size, args.resize, args.freeze_backbone) == (0.01, 32, [64, 48], True)
    assert isinstance(args.batch_size, int)
    assert (args.criterion, args.focal_gamma, args.model) == ("focal", 1.5, "resnet18")


@pytest.mark.parametrize("params,message", [
    ({"learning_rate": 0.1}, "unknown parameter 'learning_rate'; valid: data_dir"),
    ({"batch_size": 32.5}, "'batch_size' must be int"),
    ({"lr": "fast"}, "'lr' must be float"),
    ({"model": "vgg"}, "parameter 'model': unknown model 'vgg'; valid: BaseModel"),
    ({"model": "timm/convnxt_tiny"}, "parameter 'model': unknown timm model 'convnxt_tiny'; nearest: timm/convnext_tiny"),
    ({"resize": 128}, "'resize' must be a list of 2"),
    ({"pretrained": "yes"}, "'pretrained' must be true/false"),
    ({"criterion": {"_name": "focal", "gama": 2}}, "unknown parameter 'gama'"),
    ({"criterion": {"focal_gamma": 2}}, "without '_name'"),
])
def test_params_rejected_with_key_named(parser_args, params, message):
    parser, args = parser_args
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        flags.apply_params(parser, args, params, "NNI parameters")


@pytest.mark.parametrize("budget,epochs", [(9, 9), (1, 1), (3.0, 3), (2.5, 3), (1e-3, 1)])
def test_trial_budget_sets_the_epochs(parser_args, budget, epochs):
    """Hyperband's (int) and BOHB's (float) TRIAL_BUDGET: epochs, rounded up, over the trial command's --epochs."""
    parser, args = parser_args
    args.epochs = 13
    flags.apply_params(parser, args, flags.trial_flags({"TRIAL_BUDGET": budget, "lr": 0.01}), "NNI parameters")
    assert (args.epochs, args.lr) == (epochs, 0.01)


@pytest.mark.parametrize("budget", [0, -2, "9", True, None, float("nan")])
def test_trial_budget_refuses_what_is_not_a_length(budget):
    with pytest.raises(ValueError, match="TRIAL_BUDGET must be a positive number of epochs"):
        flags.trial_flags({"TRIAL_BUDGET": budget})


def test_nni_parameters_go_over_the_command_line_and_the_budget_over_both():
    args = flags.parse_args(["--lr", "0.5", "--epochs", "7"], {"lr": 0.01, "TRIAL_BUDGET": 3})
    assert (args.lr, args.epochs) == (0.01, 3)
    with pytest.raises(ValueError, match="NNI parameters: unknown parameter 'learning_rate'"):
        flags.parse_args([], {"learning_rate": 0.1})


def test_yaml_config_sets_defaults_that_flags_override(tmp_path):
    (tmp_path / "c.yml").write_text("lr: 0.01\nresize: [32, 24]\ncriterion: focal\nfocal_gamma: 3\nfreeze_backbone: true\n")
    args = flags.parse_args(["--config", str(tmp_path / "c.yml"), "--lr", "0.5"])
    assert (args.lr, args.resize, args.criterion, args.focal_gamma, args.freeze_backbone) == (0.5, [32, 24], "focal", 3.0, True)
    (tmp_path / "bad.yml").write_text("lr: fast\n")
    with pytest.raises(ValueError, match="'lr' must be float"):
        flags.parse_args(["--config", str(tmp_path / "bad.yml")])


def test_command_line_flags_win_over_the_config_even_at_their_default(tmp_path):
    (tmp_path / "c.yml").write_text("lr: 0.01\nepochs: 3\namp: true\nno_cache: true\n")
    args = flags.parse_args(["--config", str(tmp_path / "c.yml"), "--lr", "0.002", "--epochs", "12", "--no-amp", "--cache"])
    assert (args.lr, args.epochs, args.amp, args.no_cache) == (0.002, 12, False, False)


@pytest.mark.parametrize("argv,message", [
    (["--lr", "-1"], "--lr -1.0: must be positive"),
    (["--val_ratio", "1.5"], "--val_ratio 1.5: must be between 0 and 1"),
    (["--resize", "0", "48"], "--resize 0 48: must be positive sizes"),
    (["--age_bounds", "60", "30"], "--age_bounds 60 30: must be 0 < LOW < HIGH"),
    (["--kfold", "3", "--fold", "3"], "--kfold 3 --fold 3: need K >= 2"),
    (["--milestones", "0"], "--milestones 0: must be epochs, counted from 1"),
    (["--dropout", "1"], "--dropout 1.0: must be in [0, 1)"),
    (["--dataset", "ImageFolderDataset", "--classification", "multi_head"], "multi_head needs a mask-layout dataset"),
    (["--ema_warmup"], "--ema_warmup warms up --ema's moving average, which is off (--ema 0)"),  # config.json said both
    (["--mixup", "0.2", "--criterion", "focal"], "--mixup and --cutmix train on soft targets: they need --classification "
     "single and a criterion of cross_entropy, weighted_cross_entropy, label_smoothing, not single with focal"),
    (["--cutmix", "1", "--classification", "multi_head"], "not multi_head with cross_entropy"),
    (["--randaugment_magnitude", "31"], "--randaugment_magnitude 31: must be 0..30"),
])
def test_ranges_refused_with_the_flag_named(argv, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        flags.parse_args(argv)


def test_help_shows_defaults():
    text = flags.build_parser().format_help()
    assert "(default: 1000)" in text and "(default: BaseModel)" in text and "optimisation:" in text
    for group in ("data:", "model:", "optimisation:", "run:"):
        assert group in text


def test_defaults_are_the_parsers_and_what_config_json_holds():
    d = flags.defaults()
    assert d == flags.run_config(flags.parse_args([]))
    assert (d["lr"], d["steps"], d["model"], d["resize"]) == (2e-3, 1000, "BaseModel", [128, 96])
    assert not set(flags.having("started")) & set(d)
    # config.json re-runs: every key is a flag the parser takes back with the same value
    args = flags.apply_params(flags.build_parser(), argparse.Namespace(**flags.defaults()), d, "config.json")
    assert flags.run_config(args) == d


@pytest.mark.slow
def test_print_flags_prints_the_resolved_flags_and_touches_nothing(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("lr: 0.01\nepochs: 3\n")
    out = subprocess.run([sys.executable, str(ROOT / "train.py"), "--print_flags", "--config", str(config), "--epochs", "4",
                          "--model_dir", str(tmp_path / "runs"), "--data_dir", str(tmp_path / "missing")],
                         capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    printed = json.loads(out.stdout)
    expected = flags.defaults()
    expected.update(lr=0.01, epochs=4, model_dir=str(tmp_path / "runs"), data_dir=str(tmp_path / "missing"))
    assert printed == json.loads(json.dumps(expected))  # tuples as lists
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.yaml"]  # no run dir, no data made or read


def test_data_dirs_are_stored_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = flags.defaults(["--data_dir", "data/train", "--eval_dir", "~/eval"])
    assert (config["data_dir"], config["eval_dir"]) == (str(tmp_path / "data" / "train"), os.path.expanduser("~/eval"))
    assert flags.defaults()["data_dir"] is None  # the demo data: found where it is made


def test_resume_refuses_what_it_cannot_change_and_takes_the_rest():
    saved = argparse.Namespace(**flags.defaults())
    flags.check_resume(saved, {"epochs": 30, "lr": 0.1})  # length and LR may change
    assert {"dataset", "seed", "model", "optimizer"} <= set(flags.having("resume"))
    for key in flags.having("resume"):
        with pytest.raises(ValueError, match=f"--resume: --{key} .* differs from the run's"):
            flags.check_resume(saved, {key: "something else"})


def test_a_flag_added_in_one_place_is_parsed_recorded_refused_on_resume_searched_and_owned_as_declared(monkeypatch, request):
    """Adding a flag once, with its roles, is the whole edit: every list of flags is asked of the parser."""
    stock = flags.add_run_flags
    flags.declared.cache_clear()  # declared once per process: again here with the throwaway flag, and after without it
    request.addfinalizer(flags.declared.cache_clear)

    def with_throwaway(g):
        stock(g)
        flags.flag(g, "--zz_depth", roles=("resume", "kfold"), limit=flags.POSITIVE, type=int, default=3, help="a test's")
    monkeypatch.setattr(flags, "add_run_flags", with_throwaway)
    args = flags.parse_args(["--zz_depth", "5"])
    assert args.zz_depth == 5 and flags.defaults()["zz_depth"] == 3 and flags.run_config(args)["zz_depth"] == 5
    with pytest.raises(ValueError, match="--zz_depth 0: must be positive"):
        flags.parse_args(["--zz_depth", "0"])
    with pytest.raises(ValueError, match="--resume: --zz_depth 4 differs from the run's 3"):
        flags.check_resume(argparse.Namespace(**flags.defaults()), {"zz_depth": 4})
    assert flags.apply_params(flags.build_parser(), argparse.Namespace(**flags.defaults()), {"zz_depth": 7}, "NNI").zz_depth == 7
    from search.space import space_problems
    assert space_problems({"zz_depth": {"_type": "choice", "_value": [2, 4]}}, "python3 train.py") == []
    assert space_problems({"zz_depth": {"_type": "choice", "_value": [0, 4]}}, "python3 train.py") == ["zz_depth: --zz_depth 0: must be positive"]
    from baseline import kfold
    with pytest.raises(ValueError, match="--zz_depth is set by kfold.py for every fold"):
        kfold.check_train_args(["--zz_depth", "2"])
    assert "zz_depth" not in flags.having("length") and "zz_depth" in flags.having("kfold")


def test_the_flags_are_declared_once_per_process(monkeypatch):
    """having() and limits() ask one parser, built once, however often a soup or a search asks."""
    built = []
    stock = flags.build_parser
    monkeypatch.setattr(flags, "build_parser", lambda: built.append(1) or stock())
    flags.declared.cache_clear()
    for _ in range(5):
        flags.having("shape"), flags.limits(), flags.having("resume")
    flags.declared.cache_clear()
    assert built == [1]
