"""Measurements, not tests (the module map: docs/design.md)."""
