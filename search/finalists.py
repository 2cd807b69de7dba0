"""finalize's finalists: the search's top distinct configurations (a trial's length and fold are not part of
one) plus the trial command's own flags, and the fold trainings they need."""
import json
from dataclasses import dataclass

from core.cli import UserError
from core.runs import CONFIG
from search.nni_io import train_words
from search.trials import flag_words, flatten, is_number, ranked
from training import flags


@dataclass
class Finalist:
    name: str            # "top1", "top2", ... by rank, or "defaults" (the trial command's own flags)
    params: dict         # flat train.py flags over the trial command ({} for the defaults)
    trial: str = ""      # the search trial it comes from
    search_metric: float = None  # that trial's validation metric (the search's objective, one split)
    config: dict = None  # the resolved train.py flags its folds train with (config.json less its length and fold)


def without_length(values):
    """{flag: value} less how long a run trains, on which fold and where its data lies (the flags' `length` role)."""
    length = flags.having("length")
    return {k: v for k, v in values.items() if k not in length}


def configuration(trial_command, params):
    """The flags a run trains with, without its length and fold: two trials with the same one are one finalist."""
    words = train_words(trial_command) + flag_words(params)
    resolved = flags.run_config(flags.resolve(flags.build_parser().parse_args(words)))
    return json.loads(json.dumps(without_length(resolved)))  # as config.json reads


def ran_configuration(folder):
    """What a fold run trained with, from its own config.json, in configuration()'s terms."""
    return without_length(json.loads((folder / CONFIG).read_text()))


def differences(old, new):
    """Two configurations -> 'flag old -> new' for each flag that differs, for a one-line message."""
    keys = [k for k in dict.fromkeys([*old, *new]) if old.get(k) != new.get(k)]
    return ", ".join(f"--{k} {old.get(k)} -> {new.get(k)}" for k in keys[:3]) + (", ..." if len(keys) > 3 else "")


def finished(exp):
    """The search's trials that reported a final result: only those rank configurations."""
    return [t for t in exp.trials if is_number(t.metric)]


def select_finalists(exp, trial_command, top=3, defaults_only=False):
    """The top distinct configurations by the search's objective, then the trial command's own (the defaults).
    A search with no finished trial is refused (it would be finalized as the defaults alone) unless defaults_only."""
    defaults = configuration(trial_command, {})
    if defaults_only:
        return [Finalist("defaults", {}, config=defaults)]
    if not finished(exp):
        raise UserError(f"nothing to finalize yet: experiment {exp.id} has {len(exp.trials)} trials, none reported a final "
                        f"result (wait for the search, or pass --defaults_only to finalize train.py's defaults alone)")
    finalists = []
    for trial in ranked(exp):
        value = trial.metric if is_number(trial.metric) else trial.best_intermediate_for(exp.maximize)
        if value is None or len(finalists) == top:
            continue
        params = without_length(flatten(trial.params))
        config = configuration(trial_command, params)
        if config not in [f.config for f in finalists]:
            name = "defaults" if config == defaults else f"top{len(finalists) + 1}"  # e.g. SafeTPE's first trial
            finalists.append(Finalist(name, params, trial.id, value, config))
    if all(f.config != defaults for f in finalists):
        finalists.append(Finalist("defaults", {}, config=defaults))
    return finalists


def fold_jobs(finalists, k, done):
    """BatchTuner's parameter sets: every (finalist, fold) not yet home, trained at the standalone length."""
    return [dict(f.params, epochs=0, kfold=k, fold=fold) for f in finalists for fold in range(k) if (f.name, fold) not in done]
