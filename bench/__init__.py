"""Measurements, not tests: speed (benchmark), whether the defaults fit (defaults), whether the search pays (hpo),
whether finalize beats the defaults (finalize); searches is the library hpo and finalize share."""
