"""Dataset name -> reader. The one entry point eval uses to read a downstream dataset."""
from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any, Callable

from pipeline.common import MflagError
from pipeline.datasets.base import DatasetSpec


def _readers() -> dict[str, Callable[..., DatasetSpec]]:
    # Imported lazily so importing the registry stays cheap (pydicom / PIL load on first use).
    from pipeline.datasets.chexpert import read_chexpert
    from pipeline.datasets.covidx import read_covidx
    from pipeline.datasets.object_cxr import read_object_cxr
    from pipeline.datasets.rsna import read_rsna
    from pipeline.datasets.siim import read_siim

    return {"chexpert": read_chexpert, "rsna": read_rsna, "covidx": read_covidx, "siim": read_siim,
            "object-cxr": read_object_cxr}


DATASETS = ("chexpert", "rsna", "covidx", "siim", "object-cxr")


def load_dataset(name: str, root: str | Path, task: str, **options: Any) -> DatasetSpec:
    """Read dataset ``name`` (chexpert|rsna|covidx|siim|object-cxr) at ``root`` for ``task``.

    ``options`` go to the reader (e.g. uncertainty=, frontal_only=, label_set=, max_missing=); an
    option the reader does not take is a MflagError naming it and the accepted ones.
    """
    key = name.lower().replace("_", "-")
    readers = _readers()
    if key not in readers:
        raise MflagError(f"unknown dataset {name!r} (one of {', '.join(DATASETS)})")
    reader = readers[key]
    accepted = [p for p in inspect.signature(reader).parameters if p not in ("root", "task")]
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise MflagError(f"dataset {key!r} has no option(s) {', '.join(unknown)} (accepted: {', '.join(accepted)})")
    root = Path(root)
    if not root.is_dir():
        raise MflagError(f"dataset root {root} is not a directory")
    return reader(root, task=task, **options)
