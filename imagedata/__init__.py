"""The data code behind dataset.py's registries, one module per concern (the module map: docs/design.md)."""
