"""The search phase: check an NNI config before it runs (preflight), the tuners it runs (nni_tuner), read its
trials (experiment), and re-rank its best on folds into a submission (finalize); nni_io, trials, space,
finalists and vote are the libraries they share."""
