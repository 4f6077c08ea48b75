"""Downstream evaluation building blocks: one module per task behind one registry.

- ``data``: decoding into one square store (``ImageSource``), crops and augmentations, torch datasets;
- ``loop``: ``TrainSettings`` and ``fit``, the one epoch loop every head trains with;
- ``recipes``: the ``mgca`` and ``tool`` protocols as one resolved ``Recipe`` per run;
- ``task``: what a trained task gets for one seed (``SeedRun``) and returns (``SeedOutcome``);
- ``cls``, ``seg``, ``det``: heads, losses, evaluation and prediction files of each trained task;
- ``zeroshot``, ``retrieval``: the evaluations without training that score images against texts through
  a pre-training run's projector and text head (``language``, ``prompts``, ``language_metrics``).

``TASKS`` is the registry: a task's name, the module that implements it and whether it trains. The eval
stage, its ``--task`` choices, the pipeline YAML's checks and docs/OPTIONS.md all read it, so adding a
task is its module plus one entry here. ``get_task(name)`` returns the module's ``TASK`` object.
"""
from __future__ import annotations

import dataclasses
import importlib


@dataclasses.dataclass(frozen=True)
class TaskEntry:
    """``module``: where the task's ``TASK`` lives. ``trains``: the task trains a head per seed on a split of
    the dataset (the eval stage's loop); otherwise the task's ``evaluate(cfg, out, embed_file)`` does all of its work
    (``embed_file``: the embed-text stage as a function, for tasks that embed text).
    ``needs_dataset``: it reads a downstream dataset (``--dataset``/``--root``). ``help``: one line."""

    module: str
    trains: bool
    needs_dataset: bool
    help: str


TASKS: dict[str, TaskEntry] = {
    "cls": TaskEntry("pipeline.downstream.cls", True, True, "a linear probe (or --finetune)"),
    "seg": TaskEntry("pipeline.downstream.seg", True, True, "a U-Net"),
    "det": TaskEntry("pipeline.downstream.det", True, True, "a detection head (--det-model)"),
    "zeroshot": TaskEntry("pipeline.downstream.zeroshot", False, True,
                          "zero-shot classification through the text space (--zeroshot-protocol), no training"),
    "retrieval": TaskEntry("pipeline.downstream.retrieval", False, False,
                           "image<->report retrieval over held-out pairs of --shards, no training"),
}


def task_names() -> tuple[str, ...]:
    """The registered tasks (the ``--task`` choices, read when needed so a task registered later is seen)."""
    return tuple(TASKS)


def task_entry(name: str) -> TaskEntry:
    if name not in TASKS:
        raise KeyError(f"unknown task {name!r}; one of {', '.join(TASKS)}")
    return TASKS[name]


def get_task(name: str):
    """The ``TASK`` object of the task registered as ``name``."""
    return importlib.import_module(task_entry(name).module).TASK


def __getattr__(name: str):
    # SeedOutcome, SeedRun, Task live in .task, which imports torch: loaded on first use only, so the registries
    # (this one, datasets.registry, det_heads) stay cheap to import for `cli.py synth`, `splits` and config checks
    if name in ("SeedOutcome", "SeedRun", "Task"):
        return getattr(importlib.import_module("pipeline.downstream.task"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["TASKS", "SeedOutcome", "SeedRun", "Task", "TaskEntry", "get_task", "task_entry", "task_names"]
