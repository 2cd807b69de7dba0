"""The search phase: check, run, read and finalize an NNI search (the module map: docs/design.md)."""
