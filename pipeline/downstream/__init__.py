"""Downstream evaluation building blocks: one module per task behind a small registry.

- ``data``: decoding into one square store (``ImageSource``), crops and augmentations, torch datasets;
- ``loop``: ``TrainSettings`` and ``fit``, the one epoch loop every head trains with;
- ``recipes``: the ``mgca`` and ``tool`` protocols as one resolved ``Recipe`` per run;
- ``task``: what a task gets for one seed (``SeedRun``) and returns (``SeedOutcome``);
- ``cls``, ``seg``, ``det``: heads, losses, evaluation and prediction files of each task.

``get_task(name)`` is what the eval stage looks up.
"""
from __future__ import annotations

from pipeline.downstream.task import SeedOutcome, SeedRun, Task

TASK_NAMES = ("cls", "seg", "det")


def get_task(name: str) -> Task:
    """The task registered as ``name`` (cls | seg | det)."""
    from pipeline.downstream import cls, det, seg

    registry = {"cls": cls.TASK, "seg": seg.TASK, "det": det.TASK}
    if name not in registry:
        raise KeyError(f"unknown task {name!r}; one of {', '.join(registry)}")
    return registry[name]


__all__ = ["TASK_NAMES", "SeedOutcome", "SeedRun", "Task", "get_task"]
