"""The training layer: the flags, the loop's parts, the checkpoint format, prediction (the module map: docs/design.md)."""
