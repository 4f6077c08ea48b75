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
# The tasks each reader supports (each reader also checks its own with check_task).
TASKS_BY_DATASET = {"chexpert": ("cls",), "rsna": ("cls", "det", "seg"), "covidx": ("cls",),
                    "siim": ("seg", "cls"), "object-cxr": ("det", "cls")}


def check_options(name: str, options: dict[str, Any]) -> dict[str, Any]:
    """``options`` for dataset ``name``'s reader: every key must be one it takes (a MflagError names the
    unknown ones and the accepted ones) and each value is converted to the type it takes. Values may
    be text as typed on the command line (``KEY=VALUE``: "false", "0.1", "a.csv,b.csv") or YAML values;
    text meant as a name is kept exactly as typed ("0001" stays "0001")."""
    key, reader = _reader(name)
    accepted = [p for p in inspect.signature(reader).parameters if p not in ("root", "task")]
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise MflagError(f"dataset {key!r} has no option(s) {', '.join(unknown)} (accepted: {', '.join(accepted)})")
    hints = typing.get_type_hints(reader)
    return {k: _coerce(key, k, v, hints.get(k)) for k, v in options.items()}


def _reader(name: str) -> tuple[str, Callable[..., DatasetSpec]]:
    key = str(name).lower().replace("_", "-")
    readers = _readers()
    if key not in readers:
        raise MflagError(f"unknown dataset {name!r} (one of {', '.join(DATASETS)})")
    return key, readers[key]


def load_dataset(name: str, root: str | Path, task: str, **options: Any) -> DatasetSpec:
    """Read dataset ``name`` (chexpert|rsna|covidx|siim|object-cxr) at ``root`` for ``task``.

    ``options`` go to the reader (e.g. uncertainty=, frontal_only=, label_set=, max_missing=), checked
    and converted by ``check_options``.
    """
    key, reader = _reader(name)
    options = check_options(key, options)
    root = Path(root)
    if not root.is_dir():
        raise MflagError(f"dataset root {root} is not a directory")
    return reader(root, task=task, **options)


_TRUE, _FALSE = ("true", "yes", "on", "1"), ("false", "no", "off", "0")


def _coerce(dataset: str, name: str, value: Any, hint: Any) -> Any:
    """``value`` as the reader's annotation ``hint`` wants it (see ``check_options``)."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    base = args[0] if typing.get_origin(hint) in (typing.Union, types.UnionType) and len(args) == 1 else hint
    if value is None:
        return None

    def bad(what: str) -> MflagError:
        return MflagError(f"dataset {dataset!r} option {name}: expected {what}, got {value!r}")

    if typing.get_origin(base) is tuple:
        items = value.split(",") if isinstance(value, str) else value if isinstance(value, (list, tuple)) else [value]
        return tuple(str(x).strip() for x in items if str(x).strip())
    if base is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in _TRUE + _FALSE:
            return value.strip().lower() in _TRUE
        raise bad("true or false")
    if base in (int, float):
        if isinstance(value, bool):
            raise bad("a number")
        if isinstance(value, str):
            try:
                value = float(value) if base is float else int(value)
            except ValueError:
                raise bad("a number") from None
        if not isinstance(value, (int, float)) or (base is int and not float(value).is_integer()):
            raise bad("a whole number" if base is int else "a number")
        return base(value)
    if base is str:
        if isinstance(value, bool) or not isinstance(value, (str, int, float)):
            raise bad("text")
        return str(value)
    return value
