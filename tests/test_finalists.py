"""search/finalists.py: the search's top distinct configurations plus the defaults, and the fold trainings they need."""
import shlex

import pytest

from search import finalists as selection
from search.trials import Experiment, Trial
from training import flags

COMMAND = "python3 train.py --epochs 20 --resize 64 48"


def trial(tid, metric, **params):
    return Trial(tid, "SUCCEEDED", sequence=int(tid[-1]), params=params, final={"default": metric})


def search(*trials):
    return Experiment("exp12345", "DONE", {}, list(trials), "test")


CMD4 = "python3 train.py --steps 4 --resize 32 24"  # the trial command of the vote and rerun tests


# ----------------------------------------------------------------------------- finalists and jobs
def test_finalists_are_distinct_configurations_by_metric_plus_the_defaults():
    exp = search(trial("t1", 0.80, lr=0.01), trial("t2", 0.90, lr=0.05, criterion={"_name": "focal", "focal_gamma": 2.0}),
                 trial("t3", 0.85, lr=0.01, TRIAL_BUDGET=6),  # t1's configuration, longer: not another finalist
                 trial("t4", 0.70, lr=0.2), Trial("t5", "FAILED", 5, {"lr": 0.3}))
    finalists = selection.select_finalists(exp, COMMAND, top=3)
    assert [(f.name, f.trial, f.search_metric) for f in finalists] == [
        ("top1", "t2", 0.90), ("top2", "t3", 0.85), ("top3", "t4", 0.70), ("defaults", "", None)]
    assert finalists[0].params == {"lr": 0.05, "criterion": "focal", "focal_gamma": 2.0}
    assert finalists[1].params == {"lr": 0.01}  # its TRIAL_BUDGET (--epochs) is not part of it
    assert selection.select_finalists(exp, COMMAND, top=1)[1].name == "defaults"


def test_defaults_not_added_twice():
    default_lr = flags.defaults()["lr"]
    exp = search(trial("t1", 0.9, lr=default_lr), trial("t2", 0.8, lr=0.05))
    finalists = selection.select_finalists(exp, COMMAND, top=2)
    assert [(f.name, f.trial) for f in finalists] == [("defaults", "t1"), ("top2", "t2")]  # the defaults' trial, named so


def test_fold_jobs_train_every_missing_fold_at_the_standalone_length():
    finalists = [selection.Finalist("top1", {"lr": 0.05}), selection.Finalist("defaults", {})]
    jobs = selection.fold_jobs(finalists, 3, done={("top1", 1)})
    assert jobs == [dict(lr=0.05, epochs=0, kfold=3, fold=0), dict(lr=0.05, epochs=0, kfold=3, fold=2),
                    dict(epochs=0, kfold=3, fold=0), dict(epochs=0, kfold=3, fold=1), dict(epochs=0, kfold=3, fold=2)]
    parser = flags.build_parser()
    for job in jobs:  # every job is a valid set of train.py parameters over the trial command
        args = flags.apply_params(parser, parser.parse_args(shlex.split(COMMAND)[2:]), job, "job")
        assert args.epochs == 0 and args.kfold == 3



@pytest.mark.parametrize("statuses", [[], ["RUNNING", "WAITING"], ["FAILED", "FAILED", "FAILED"]])
def test_a_search_with_no_finished_trial_is_refused(statuses):
    """It was finalized as the defaults alone, without a word."""
    exp = search(*[Trial(f"t{i}", s, i, {"lr": 0.01 * (i + 1)}) for i, s in enumerate(statuses)])
    with pytest.raises(ValueError, match=f"nothing to finalize yet: experiment exp12345 has {len(statuses)} trials, "
                                         "none reported a final result .*--defaults_only"):
        selection.select_finalists(exp, COMMAND)
    only = selection.select_finalists(exp, COMMAND, defaults_only=True)
    assert [(f.name, f.params) for f in only] == [("defaults", {})]
