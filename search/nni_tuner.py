"""NNI's TPE, Hyperband and BOHB tuners, made safe to use under NNI 3.0.

NNI 3.0's local and remote training services hand parameter sets to trials in
the order the trials ask for them, not the order they were submitted in
(nni_node/training_service/v3/compat.js). When two trials start together and
the second asks first, they swap parameter sets; the trial list then shows
each with the other's parameters, and when one ends the dispatcher tells the
tuner that the *listed* parameter id ended. TPE drops that id from its running
set, the other trial's final result then finds it missing, and
``TpeTuner.receive_trial_result`` raises ``KeyError`` in the dispatcher thread:
the dispatcher exits and the experiment hangs with no new trials (upstream
issues microsoft/nni#5689, #5739, #5798).

``SafeTPE`` puts a missing parameter id back from TPE's record of every
parameter set it generated before taking the result. The result itself is
always paired correctly: the trial reports the id it really ran.

    tuner:
      codeDirectory: .                      # the repository root
      className: search.nni_tuner.SafeTPE
      classArgs: {optimize_mode: maximize}

``SafeTPE(start_from_defaults=True)`` makes the first trial ``python train.py``'s
own defaults for every key of the search space (a nested choice by its
``_name``, with the option's own keys), then searches as TPE does. The
defaults are a strong configuration (they were chosen on other data); a search
that has to find their region at random spends its budget there, and with only
a dozen trials often ends below them (README, "Does the search pay?"). Starting
from them, the search's best trial is never worse than the defaults on the
validation metric, and TPE's first model of good and bad has a good point in
it (SMAC's initial design evaluates the default configuration first for the
same reason). A default outside the search space stops the tuner with a
UserError naming it. With ``trial_command`` (config_finetune.yml passes its own
trialCommand through a YAML alias), the first trial is that command's flags
instead, so a search whose space leaves train.py's defaults (a pretrained
backbone, its input size) starts from the configuration the config names.

``SafeHyperband`` and ``SafeBOHB``: NNI 3.0's stock Hyperband and BOHB crash
their dispatcher at the first metric a trial reports (the experiment then hangs
with no new trials). Their parameter ids are strings ("0-2_0_3": bracket, round,
index) and NNI 3.0's ``Recoverable.is_created_in_previous_exp`` compares them
with an int (``TypeError: '<=' not supported between instances of 'str' and
'int'``). That check exists for resumed experiments, which neither can resume.

    tuner:
      codeDirectory: .
      className: search.nni_tuner.SafeHyperband
      classArgs: {optimize_mode: maximize, R: 20, eta: 3}
"""
import logging
import math

from nni.algorithms.hpo.hyperband_advisor import Hyperband
from nni.algorithms.hpo.tpe_tuner import TpeTuner
from nni.common.hpo_utils import format_parameters

from core.cli import UserError
from search.nni_io import train_words


def first_trial_flags(trial_command=None):
    """{dest: value} the first trial starts from: trial_command's flags over train.py's defaults (the defaults alone
    without one). Flags train.py refuses raise ValueError naming the command. SafeTPE and preflight both ask here."""
    from training.flags import defaults  # lazy: it imports torch, which only start_from_defaults needs
    if not trial_command:
        return defaults()
    return defaults(train_words(str(trial_command)), f"tuner: trial_command {trial_command!r}")


def default_parameters(space, defaults):
    """`defaults` (train.py's, by argparse dest) for the keys of an NNI search space, in NNI's parameter format."""
    params = {}
    for key, spec in space.items():
        if key not in defaults:
            raise UserError(f"start_from_defaults: search space key {key!r} is not a train.py flag")
        value, kind, values = defaults[key], spec["_type"], spec["_value"]
        if kind == "choice" and all(isinstance(v, dict) for v in values):  # nested: {_name: ..., own keys}
            option = next((v for v in values if v["_name"] == value), None)
            if option is None:
                raise UserError(f"start_from_defaults: train.py's default {key}={value!r} is not among {[v['_name'] for v in values]}")
            params[key] = {"_name": value, **default_parameters({k: v for k, v in option.items() if k != "_name"}, defaults)}
            continue
        if kind == "choice" and value not in values:
            raise UserError(f"start_from_defaults: train.py's default {key}={value!r} is not among {values}")
        if kind != "choice" and not can_draw(kind, values, value):
            raise UserError(f"start_from_defaults: train.py's default {key}={value!r} is outside {kind} {values}")
        params[key] = value
    return params


def can_draw(kind, values, value):
    """Whether a numeric entry can hand a trial `value`: randint's high is exclusive, a normal's values are
    [mu, sigma(, q)] and reach every number (a lognormal's every positive one: format_parameters takes its log)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    if kind == "randint":
        return values[0] <= value < values[1] and float(value).is_integer()
    if "normal" in kind:
        return value > 0 if "log" in kind else math.isfinite(value)
    return values[0] <= value <= values[1]


class SafeTPE(TpeTuner):
    """TPE (same classArgs, and start_from_defaults) that survives the NNI 3.0 parameter swap described above."""

    def __init__(self, *args, start_from_defaults=False, trial_command=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.start_from_defaults, self.trial_command = start_from_defaults, trial_command
        self._first = None  # the defaults' parameters until the first trial takes them
        self._ended = set()  # parameter ids whose trial has ended

    def update_search_space(self, space):
        super().update_search_space(space)
        if self.start_from_defaults and not self._params:
            self._first = default_parameters(space, first_trial_flags(self.trial_command))

    def generate_parameters(self, parameter_id, **kwargs):
        if self._first is None:
            return super().generate_parameters(parameter_id, **kwargs)
        first, self._first = self._first, None
        params = format_parameters(first, self.space)
        self.dedup.add_history(params)
        self._params[parameter_id] = self._running_params[parameter_id] = params
        return first  # not deformat_parameters(params): its log/exp round trip makes lr 0.002 0.0020000000000000005

    def receive_trial_result(self, parameter_id, parameters, value, **kwargs):
        if parameter_id not in self._running_params and parameter_id in self._params:
            self._running_params[parameter_id] = self._params[parameter_id]
            if parameter_id in self._ended:  # a retry's (imgcls-experiment --retry-failed): its trial failed
                logging.getLogger(__name__).info("SafeTPE: the result of parameter id %s, whose trial ended without one, "
                                                 "from its retry: %s", parameter_id, value)
        super().receive_trial_result(parameter_id, parameters, value, **kwargs)

    def trial_end(self, parameter_id, success, **kwargs):
        self._ended.add(parameter_id)
        super().trial_end(parameter_id, success, **kwargs)


class StringIdsSafe:
    """Mixin: a string parameter id was never created by an earlier (resumed) experiment."""

    def is_created_in_previous_exp(self, param_id):
        return False if isinstance(param_id, str) else super().is_created_in_previous_exp(param_id)


class SafeHyperband(StringIdsSafe, Hyperband):
    """Hyperband (same classArgs) whose dispatcher survives its string parameter ids."""


def __getattr__(name):
    """SafeBOHB, made on first use: BOHB's imports (ConfigSpace, statsmodels) cost every other tuner a second or
    more of start-up, and NNI 3.0 fails an experiment whose tuner has not connected within 10 s (seen on a busy CPU)."""
    if name != "SafeBOHB":
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    from nni.algorithms.hpo.bohb_advisor.bohb_advisor import BOHB

    class SafeBOHB(StringIdsSafe, BOHB):
        """BOHB (same classArgs; needs ConfigSpace and statsmodels) whose dispatcher survives its string parameter ids."""

    SafeBOHB.__qualname__ = "SafeBOHB"
    globals()["SafeBOHB"] = SafeBOHB
    return SafeBOHB
