"""What a downstream task gets for one seed and what it returns; the base class of cls, seg and det."""
from __future__ import annotations

import abc
import dataclasses
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

from pipeline.common import MflagError
from pipeline.downstream.data import ImageSource, make_transform
from pipeline.downstream.datasets.base import DatasetSpec
from pipeline.downstream.loop import FitResult, TrainSettings
from pipeline.downstream.recipes import Recipe


@dataclasses.dataclass
class SeedRun:
    """One seed's inputs. Indices point into ``source`` (one decoded store shared by every seed);
    ``labels`` (cls) are aligned with ``source``; ``encoder`` is a torchvision ResNet50 with ``fc``
    replaced by Identity (2048-d pooled features); ``cache`` survives from seed to seed of one run."""

    seed: int
    spec: DatasetSpec
    source: ImageSource
    train_idx: list[int]
    val_idx: list[int]
    test_idx: list[int]
    encoder: nn.Module
    recipe: Recipe
    settings: TrainSettings
    labels: np.ndarray | None = None
    cache: dict = dataclasses.field(default_factory=dict)

    def transforms(self):
        """(training transform, evaluation transform) of the recipe, cut to the network input size."""
        r = self.recipe
        return make_transform(r.train_transform, r.image_size), make_transform(r.eval_transform, r.image_size)

    def ids(self, indices) -> list[str]:
        return [self.source.records[i].image_id for i in indices]


@dataclasses.dataclass
class SeedOutcome:
    """The trained head's history, its test metrics and its test predictions (the task's own type,
    written by the task's ``write_predictions``)."""

    fitted: FitResult
    test: dict
    predictions: Any


class Task(abc.ABC):
    """A downstream task: checks a dataset, trains and tests one seed, writes its predictions."""

    name = ""
    predictions_suffix = ""  # seeds/seed-N.predictions<suffix>
    predictions_format = ""  # one line: what the file holds (README "Outputs", docs/DESIGN.md)

    def check(self, spec: DatasetSpec) -> None:
        if self.name not in spec.tasks:
            raise MflagError(f"dataset {spec.name} does not support task {self.name} (it supports "
                             f"{', '.join(spec.tasks)})")

    def needs_masks(self) -> bool:
        return False

    def shares_encoder(self, recipe: Recipe, init: str) -> bool:
        """Whether one encoder can serve every seed (frozen, not random, nothing seed-dependent in it)."""
        return False

    @abc.abstractmethod
    def recipe(self, protocol: str, finetune: bool, dataset: str, fraction: float) -> dict:
        """This task's training defaults under ``protocol`` (``recipes.TOOL_COMMON``/``MGCA_COMMON`` plus its
        own: epochs, patience, lr, transforms, head, loss, features); ``recipes.resolve`` completes them."""

    @abc.abstractmethod
    def primary(self, protocol: str, label_kind: str) -> str:
        """The test metric that heads this task's tables."""

    @abc.abstractmethod
    def run(self, run: SeedRun) -> SeedOutcome:
        """Train the head of this task on ``run`` and test it."""

    @abc.abstractmethod
    def write_predictions(self, path: Path, outcome: SeedOutcome, run: SeedRun) -> None:
        """Write ``outcome.predictions`` of the test images to ``path`` (atomically)."""
