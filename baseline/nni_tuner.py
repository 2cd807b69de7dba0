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
      className: baseline.nni_tuner.SafeTPE
      classArgs: {optimize_mode: maximize}

``SafeHyperband`` and ``SafeBOHB``: NNI 3.0's stock Hyperband and BOHB crash
their dispatcher at the first metric a trial reports (the experiment then hangs
with no new trials). Their parameter ids are strings ("0-2_0_3": bracket, round,
index) and NNI 3.0's ``Recoverable.is_created_in_previous_exp`` compares them
with an int (``TypeError: '<=' not supported between instances of 'str' and
'int'``). That check exists for resumed experiments, which neither can resume.

    tuner:
      codeDirectory: .
      className: baseline.nni_tuner.SafeHyperband
      classArgs: {optimize_mode: maximize, R: 13, eta: 3}
"""
from nni.algorithms.hpo.bohb_advisor.bohb_advisor import BOHB
from nni.algorithms.hpo.hyperband_advisor import Hyperband
from nni.algorithms.hpo.tpe_tuner import TpeTuner


class SafeTPE(TpeTuner):
    """TPE (same classArgs) that survives the NNI 3.0 parameter swap described above."""

    def receive_trial_result(self, parameter_id, parameters, value, **kwargs):
        if parameter_id not in self._running_params and parameter_id in self._params:
            self._running_params[parameter_id] = self._params[parameter_id]
        super().receive_trial_result(parameter_id, parameters, value, **kwargs)


class StringIdsSafe:
    """Mixin: a string parameter id was never created by an earlier (resumed) experiment."""

    def is_created_in_previous_exp(self, param_id):
        return False if isinstance(param_id, str) else super().is_created_in_previous_exp(param_id)


class SafeHyperband(StringIdsSafe, Hyperband):
    """Hyperband (same classArgs) whose dispatcher survives its string parameter ids."""


class SafeBOHB(StringIdsSafe, BOHB):
    """BOHB (same classArgs; needs ConfigSpace and statsmodels) whose dispatcher survives its string parameter ids."""
