"""The bottom layer: pure helpers that import nothing else of the project (the module map: docs/design.md)."""
