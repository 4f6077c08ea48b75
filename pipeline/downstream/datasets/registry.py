"""Dataset name -> reader. The one entry point eval uses to read a downstream dataset."""
from __future__ import annotations

import inspect
import typing
from pathlib import Path
from typing import Any, Callable

from pipeline.common import MflagError, coerce_to_hint
from pipeline.downstream.datasets._common import PROTOCOLS  # also the --protocol choices for callers
from pipeline.downstream.datasets.base import DatasetSpec


def _readers() -> dict[str, Callable[..., DatasetSpec]]:
    # Imported lazily so importing the registry stays cheap (pydicom / PIL load on first use).
    from pipeline.downstream.datasets.chexpert import read_chexpert
    from pipeline.downstream.datasets.covidx import read_covidx
    from pipeline.downstream.datasets.object_cxr import read_object_cxr
    from pipeline.downstream.datasets.rsna import read_rsna
    from pipeline.downstream.datasets.siim import read_siim

    return {"chexpert": read_chexpert, "rsna": read_rsna, "covidx": read_covidx, "siim": read_siim,
            "object-cxr": read_object_cxr}


DATASETS = ("chexpert", "rsna", "covidx", "siim", "object-cxr")
# Reader parameters set by the caller, not by users' --dataset-option.
_CALLER_PARAMS = ("root", "task", "protocol", "require_images")
# The tasks each reader supports (each reader also checks its own with check_task).
TASKS_BY_DATASET = {"chexpert": ("cls",), "rsna": ("cls", "det", "seg"), "covidx": ("cls",),
                    "siim": ("seg", "cls"), "object-cxr": ("det", "cls")}


def check_options(name: str, options: dict[str, Any]) -> dict[str, Any]:
    """``options`` for dataset ``name``'s reader: every key must be one it takes (a MflagError names the
    unknown ones and the accepted ones) and each value is converted to the type it takes. Values may
    be text as typed on the command line (``KEY=VALUE``: "false", "0.1", "a.csv,b.csv") or YAML values;
    text meant as a name is kept exactly as typed ("0001" stays "0001")."""
    key, reader = _reader(name)
    accepted = [p for p in inspect.signature(reader).parameters if p not in _CALLER_PARAMS]
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise MflagError(f"dataset {key!r} has no option(s) {', '.join(unknown)} (accepted: {', '.join(accepted)})")
    hints = typing.get_type_hints(reader)
    return {k: coerce_to_hint(f"dataset {key!r} option {k}", v, hints.get(k), from_text=True)
            for k, v in options.items()}


def _reader(name: str) -> tuple[str, Callable[..., DatasetSpec]]:
    key = str(name).lower().replace("_", "-")
    readers = _readers()
    if key not in readers:
        raise MflagError(f"unknown dataset {name!r} (one of {', '.join(DATASETS)})")
    return key, readers[key]


def load_dataset(name: str, root: str | Path, task: str, protocol: str = "tool", require_images: bool = True,
                 **options: Any) -> DatasetSpec:
    """Read dataset ``name`` (chexpert|rsna|covidx|siim|object-cxr) at ``root`` for ``task``.

    ``protocol``: "tool" or "mgca"; under "mgca" the spec also carries every label-file row in published
    order (``DatasetSpec.label_rows``, what MGCA's splits draw on) and Object-CXR boxes are MGCA's.
    ``require_images=False`` reads the label files alone (``cli.py splits``): an image missing on disk
    is kept as a record without a size instead of being skipped, and nothing fails for it.
    ``options`` go to the reader (e.g. uncertainty=, frontal_only=, label_set=, max_missing=), checked
    and converted by ``check_options``.
    """
    key, reader = _reader(name)
    if protocol not in PROTOCOLS:
        raise MflagError(f"unknown protocol {protocol!r} (one of {', '.join(PROTOCOLS)})")
    options = check_options(key, options)
    root = Path(root)
    if not root.is_dir():
        raise MflagError(f"dataset root {root} is not a directory")
    spec = reader(root, task=task, protocol=protocol, require_images=require_images, **options)
    spec.task, spec.protocol = task, protocol
    return spec
