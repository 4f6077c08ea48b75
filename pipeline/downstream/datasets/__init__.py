"""Readers of the downstream datasets in their published formats (see docs/DESIGN.md)."""
