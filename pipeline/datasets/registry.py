"""Dataset name -> reader. The one entry point eval uses to read a downstream dataset."""
from __future__ import annotations

import inspect
import types
import typing
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
    hints = typing.get_type_hints(reader)
    options = {k: _coerce(key, k, v, hints.get(k)) for k, v in options.items()}
    return reader(root, task=task, **options)


def _coerce(dataset: str, name: str, value: Any, hint: Any) -> Any:
    """An option value as the reader's annotation wants it. Options come from the command line
    (``KEY=VALUE``, numbers and booleans already parsed) or YAML: a file list may be one name or a
    comma-separated string, a file name may look like a number."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    base = args[0] if typing.get_origin(hint) in (typing.Union, types.UnionType) and len(args) == 1 else hint
    if value is None:
        return None
    if typing.get_origin(base) is tuple:
        items = value.split(",") if isinstance(value, str) else value if isinstance(value, (list, tuple)) else [value]
        return tuple(str(x).strip() for x in items if str(x).strip())
    if base is str and not isinstance(value, str):
        if isinstance(value, bool):
            raise MflagError(f"dataset {dataset!r} option {name}: expected text, got {value!r}")
        return str(value)
    if base is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if base in (int, float) and (isinstance(value, (str, bool)) or not isinstance(value, (int, float))):
        raise MflagError(f"dataset {dataset!r} option {name}: expected a number, got {value!r}")
    if base is bool and not isinstance(value, bool):
        raise MflagError(f"dataset {dataset!r} option {name}: expected true or false, got {value!r}")
    return value
