"""Readers of the downstream datasets in their published formats (see docs/DESIGN.md), each registered once in
``registry.DATASETS`` (reader, tasks, synthetic writer, MGCA split rule)."""
