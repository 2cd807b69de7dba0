"""After training: predict, ensemble, score, K folds (the module map: docs/design.md)."""
