"""The downstream datasets, one ``DatasetEntry`` each in ``DATASETS``: the one place a dataset is registered.

An entry holds the dataset's reader, the eval tasks it supports, its synthetic writer (with the options of
``cli.py synth <name>``) and MGCA's split rule. Everything else derives from it when asked (the functions
below read ``DATASETS`` each time, so an entry added later is seen): eval's and ``cli.py splits``'
``--dataset`` choices, the task<->dataset check, the pipeline YAML's checks, docs/OPTIONS.md, the
``cli.py synth`` commands and the YAML ``downstream: synth:`` section (``pipeline.synth.downstream.WRITERS``),
and the (dataset, task) pairs MGCA has a split for. ``load_dataset`` is the one entry point eval uses to read
a downstream dataset.
"""
from __future__ import annotations

import dataclasses
import importlib
import inspect
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Callable

from pipeline.common import MflagError, coerce_to_hint
from pipeline.downstream import TASKS
from pipeline.downstream import mgca_splits as mgca
from pipeline.downstream.datasets._common import PROTOCOLS, check_task  # PROTOCOLS: the --protocol choices
from pipeline.downstream.datasets.base import DatasetSpec, LabelRow
from pipeline.downstream.datasets.chexpert import read_chexpert
from pipeline.downstream.datasets.covidx import read_covidx
from pipeline.downstream.datasets.object_cxr import read_object_cxr
from pipeline.downstream.datasets.rsna import read_rsna
from pipeline.downstream.datasets.siim import read_siim


@dataclasses.dataclass(frozen=True)
class SynthOption:
    """An option of ``cli.py synth <dataset>`` beyond --out, --n, --seed, --image-size and --workers: the
    writer's keyword parameter ``param`` (its default and type come from the writer's signature)."""

    param: str
    help: str
    choices: tuple[str, ...] | None = None
    bounds: tuple[float, float] | None = None


@dataclasses.dataclass(frozen=True)
class DatasetEntry:
    """``reader(root, task=, protocol=, require_images=, **options) -> DatasetSpec``; its other keyword
    parameters are the ``--dataset-option`` names. ``tasks``: the trained eval tasks it supports
    (``pipeline.downstream.TASKS`` names). ``writer``: ``"module:function"`` writing the synthetic dataset
    (``writer(out_dir, n, seed, image_size=, workers=, ...) -> summary``), imported when used because
    ``pipeline.synth.downstream`` derives its ``WRITERS`` from this registry (named here, no import cycle).
    ``synth_size``: the default image side of ``cli.py synth <name>``; ``synth_options``: the writer's
    parameters that command exposes. ``mgca``: MGCA's split rule (``pipeline.downstream.mgca_splits``,
    ``mgca(label_rows, task) -> MgcaLists``) and ``mgca_tasks`` the tasks MGCA splits the dataset for."""

    reader: Callable[..., DatasetSpec]
    tasks: tuple[str, ...]
    writer: str | None = None
    synth_size: int = 512
    synth_options: tuple[SynthOption, ...] = ()
    mgca: Callable[..., mgca.MgcaLists] | None = None
    mgca_tasks: tuple[str, ...] = ()

    def synth_writer(self) -> Callable[..., dict]:
        if self.writer is None:
            raise MflagError("this dataset has no synthetic writer (DatasetEntry.writer)")
        module, _, name = self.writer.partition(":")
        return getattr(importlib.import_module(module), name)


_MONOCHROME1 = SynthOption("monochrome1_fraction", "Share of DICOMs stored inverted as MONOCHROME1.", bounds=(0, 1))

# The readers are imported at the top (all five cost ~10 ms beyond numpy, which the registry needs anyway;
# pydicom and PIL load on first use inside them): naming them lazily would save no start-up time.
DATASETS: dict[str, DatasetEntry] = {
    "chexpert": DatasetEntry(read_chexpert, ("cls",), "pipeline.synth.downstream:write_chexpert", 320,
                             mgca=mgca.chexpert, mgca_tasks=("cls",)),
    "rsna": DatasetEntry(read_rsna, ("cls", "det", "seg"), "pipeline.synth.downstream:write_rsna", 1024,
                         (_MONOCHROME1,), mgca=mgca.rsna, mgca_tasks=("cls", "det", "seg")),
    "covidx": DatasetEntry(read_covidx, ("cls",), "pipeline.synth.downstream:write_covidx", 384,
                           (SynthOption("label_set", "A: normal/pneumonia/COVID-19; B: positive/negative.",
                                        choices=("A", "B")),),
                           mgca=mgca.covidx, mgca_tasks=("cls",)),
    "siim": DatasetEntry(read_siim, ("seg", "cls"), "pipeline.synth.downstream:write_siim", 1024, (_MONOCHROME1,),
                         mgca=mgca.siim, mgca_tasks=("seg",)),
    "object-cxr": DatasetEntry(read_object_cxr, ("det", "cls"), "pipeline.synth.downstream:write_object_cxr", 512,
                               mgca=mgca.object_cxr, mgca_tasks=("det",)),
}
# Reader parameters set by the caller, not by users' --dataset-option.
_CALLER_PARAMS = ("root", "task", "protocol", "require_images")


# --------------------------------------------------------------------------- what derives from it
def dataset_names() -> tuple[str, ...]:
    """The registered datasets (the ``--dataset`` choices of eval and splits, read when needed)."""
    return tuple(DATASETS)


def trained_tasks() -> tuple[str, ...]:
    """The eval tasks that train a head on a dataset (``pipeline.downstream.TASKS``): ``cli.py splits``' tasks."""
    return tuple(name for name, entry in TASKS.items() if entry.trains and entry.needs_dataset)


def dataset_tasks(name: str) -> tuple[str, ...]:
    """The trained tasks dataset ``name`` supports."""
    return _entry(name)[1].tasks


def check_dataset_task(name: str, task: str) -> None:
    """A MflagError unless dataset ``name`` supports ``task`` (``dataset 'x' supports tasks ..., not 'y'``)."""
    key, entry = _entry(name)
    check_task(key, task, entry.tasks)


def mgca_pairs() -> tuple[tuple[str, str], ...]:
    """The (dataset, task) pairs MGCA has a split (and a recipe) for."""
    return tuple((name, task) for name, entry in DATASETS.items() for task in entry.mgca_tasks)


def mgca_lists(dataset: str, task: str, label_rows: dict[str, Sequence[LabelRow]]) -> mgca.MgcaLists:
    """MGCA's lists for ``dataset``/``task`` from the rows a reader kept under protocol "mgca"."""
    if (dataset, task) not in mgca_pairs():
        have = ", ".join(f"{d} {t}" for d, t in mgca_pairs())
        raise mgca.MgcaSplitError(f"MGCA has no {dataset} {task} recipe (it has: {have}); use --protocol tool")
    return DATASETS[dataset].mgca(label_rows, task)


def synth_names() -> tuple[str, ...]:
    """The registered datasets that have a synthetic writer (``cli.py synth <name>``, the YAML's
    ``downstream: synth:``)."""
    return tuple(name for name, entry in DATASETS.items() if entry.writer is not None)


def synth_writer(name: str) -> Callable[..., dict]:
    """The function writing dataset ``name`` synthetically."""
    key, entry = _entry(name)
    if entry.writer is None:
        raise MflagError(f"dataset {key!r} has no synthetic writer; one of {', '.join(synth_names())}")
    return entry.synth_writer()


# --------------------------------------------------------------------------- reading
def check_options(name: str, options: dict[str, Any]) -> dict[str, Any]:
    """``options`` for dataset ``name``'s reader: every key must be one it takes (a MflagError names the
    unknown ones and the accepted ones) and each value is converted to the type it takes. Values may
    be text as typed on the command line (``KEY=VALUE``: "false", "0.1", "a.csv,b.csv") or YAML values;
    text meant as a name is kept exactly as typed ("0001" stays "0001")."""
    key, entry = _entry(name)
    accepted = [p for p in inspect.signature(entry.reader).parameters if p not in _CALLER_PARAMS]
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise MflagError(f"dataset {key!r} has no option(s) {', '.join(unknown)} (accepted: {', '.join(accepted)})")
    hints = typing.get_type_hints(entry.reader)
    return {k: coerce_to_hint(f"dataset {key!r} option {k}", v, hints.get(k), from_text=True)
            for k, v in options.items()}


def _entry(name: str) -> tuple[str, DatasetEntry]:
    key = str(name).lower().replace("_", "-")
    if key not in DATASETS:
        raise MflagError(f"unknown dataset {name!r} (one of {', '.join(DATASETS)})")
    return key, DATASETS[key]


def load_dataset(name: str, root: str | Path, task: str, protocol: str = "tool", require_images: bool = True,
                 **options: Any) -> DatasetSpec:
    """Read dataset ``name`` (one of ``DATASETS``) at ``root`` for ``task``.

    ``protocol``: "tool" or "mgca"; under "mgca" the spec also carries every label-file row in published
    order (``DatasetSpec.label_rows``, what MGCA's splits draw on) and Object-CXR boxes are MGCA's.
    ``require_images=False`` reads the label files alone (``cli.py splits``): an image missing on disk
    is kept as a record without a size instead of being skipped, and nothing fails for it.
    ``options`` go to the reader (e.g. uncertainty=, frontal_only=, label_set=, max_missing=), checked
    and converted by ``check_options``.
    """
    key, entry = _entry(name)
    if protocol not in PROTOCOLS:
        raise MflagError(f"unknown protocol {protocol!r} (one of {', '.join(PROTOCOLS)})")
    options = check_options(key, options)
    root = Path(root)
    if not root.is_dir():
        raise MflagError(f"dataset root {root} is not a directory")
    check_task(key, task, entry.tasks)
    spec = entry.reader(root, task=task, protocol=protocol, require_images=require_images, **options)
    spec.task, spec.protocol, spec.tasks = task, protocol, entry.tasks
    return spec
