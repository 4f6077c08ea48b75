"""One declaration per option: a stage's config dataclass field says everything about an option.

A field declared with :func:`option` carries its help text, choices, bounds and command-line names
in its metadata. From the dataclass alone this module derives:

- the checks of ``__post_init__`` (:func:`check_fields`: type, choices, bounds; an error names the
  field, and ``cli.py`` renames it to the option as typed);
- the click options of the stage's command (``cli.click_params`` builds them from :func:`options_of`;
  this module does not import click);
- the option name of a field for error messages (:func:`option_name`);
- the pipeline YAML's checks (``stages/orchestrate.py`` reads the same fields and types);
- the options table of the docs (:func:`markdown_table`, written to docs/OPTIONS.md).

Cross-field rules (``crop_size <= image_size``) stay in the stage's ``__post_init__`` after
``check_fields(self)``. Why not pydantic: the checks needed are few (types, choices, bounds), a
command line and a YAML file read values differently (``pipeline.common.coerce_to_hint`` decides
both), and errors must be one line naming the option as the user typed it; a small module that
feeds the click options is less code than adapting a validation library to do that.
"""
from __future__ import annotations

import dataclasses
import os
import types
import typing
from typing import Any, Callable, Sequence

from pipeline.common import ConfigError, config_to_dict

_KEY = "mflag_option"


@dataclasses.dataclass(frozen=True)
class Option:
    """What a field's metadata says about its option (see :func:`option`)."""

    help: str
    choices: tuple[Any, ...] | Callable[[], Any] | None = None  # read through allowed()
    min: float | None = None
    max: float | None = None
    min_open: bool = False
    max_open: bool = False
    names: tuple[str, ...] = ()
    show_default: str | None = None
    negatable: bool = True
    exists: str | None = None
    path: str | None = None
    repeat: bool = False
    metavar: str | None = None
    cli: bool = True
    affects_result: bool = True
    added_later: bool = False
    device: bool = False

    def allowed(self) -> tuple[Any, ...] | None:
        """The choices; a function given as ``choices`` (a registry's names) is called each time, so a
        registry entry added after the config class was defined is accepted, listed and documented."""
        return tuple(self.choices()) if callable(self.choices) else self.choices


def option(default: Any = dataclasses.MISSING, *, help: str, choices: Sequence[Any] | None = None,
           min: float | None = None, max: float | None = None, min_open: bool = False, max_open: bool = False,
           names: Sequence[str] = (), show_default: str | None = None, negatable: bool = True,
           exists: str | None = None, path: str | None = None, repeat: bool = False,
           metavar: str | None = None, cli: bool = True, affects_result: bool = True,
           added_later: bool = False, device: bool = False,
           default_factory: Callable[[], Any] | Any = dataclasses.MISSING) -> Any:
    """A dataclass field that is also an option.

    ``help``: the one-line help (the default is appended by click). ``choices``: allowed values, or a
    function returning them, read whenever they are needed (a registry's names, see ``Option.allowed``).
    ``min``/``max``: inclusive bounds (``min_open``/``max_open`` make them exclusive). ``names``:
    the command-line spellings (default ``--field-name``). ``show_default``: text shown instead of
    the default (for defaults computed at run time or ``None`` meaning "derived"). ``negatable``:
    a bool option gets ``--x/--no-x`` (False: a plain ``--x`` flag). ``exists``: ``"dir"``,
    ``"file"`` or ``"any"``: click checks that the path exists. ``path``: ``"dir"`` or ``"file"``: a
    path that need not exist yet but, where it does, must be that kind (an output folder). ``repeat``:
    a list option given once per value (``--fraction 0.1 --fraction 1``) instead of comma-separated.
    ``cli=False``: YAML/API only. ``affects_result=False``: the option changes how a run goes (where it
    writes, how often it logs, which device) but not what it computes, so it stays out of the run's
    fingerprint and a resumed run may change it. ``added_later``: an option added after runs were
    made; at its default it stays out of the fingerprint, so those runs still resume and still count
    as finished (:func:`result_config`). ``device``: the value names a compute device (auto, cpu, cuda
    or cuda:N, :func:`check_device`); which GPU does not enter the fingerprint (``cuda:1`` counts as
    ``cuda``), so a run may resume on another one.

    Bounds are checked by :func:`check_fields` alone (click only shows them in ``--help``), so a bad
    value gets the same one-line message on the command line (``error: --batch-size: must be >= 2,
    got 1``) as in a pipeline YAML; choices are checked by click too, which lists them.
    """
    if choices is not None and not callable(choices):
        choices = tuple(choices)
    meta = {_KEY: Option(help=help, choices=choices, min=min, max=max,
                         min_open=min_open, max_open=max_open, names=tuple(names), show_default=show_default,
                         negatable=negatable, exists=exists, path=path, repeat=repeat, metavar=metavar,
                         cli=cli, affects_result=affects_result, added_later=added_later, device=device)}
    if default_factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=default_factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def options_of(cls) -> list[tuple[dataclasses.Field, Option, Any]]:
    """(field, Option, type hint) of every field of ``cls`` declared with :func:`option`, in order."""
    hints = typing.get_type_hints(cls)
    return [(f, f.metadata[_KEY], hints[f.name]) for f in dataclasses.fields(cls) if _KEY in f.metadata]


def result_config(cfg: Any) -> dict:
    """The fields of the config dataclass instance ``cfg`` that define what a run computes, as a dict
    for its fingerprint: without the ``affects_result=False`` options and without ``added_later``
    options left at their default (see :func:`option`)."""
    d = config_to_dict(cfg)
    for f, opt, _ in options_of(type(cfg)):
        if not opt.affects_result or (opt.added_later and d.get(f.name) == f.default):
            d.pop(f.name, None)
        elif opt.device and str(d.get(f.name)).startswith("cuda:"):
            d[f.name] = "cuda"  # which GPU does not change what is computed
    return d


def check_device(name: str, value: str) -> None:
    """The one spelling check of a device option: auto, cpu, cuda or cuda:N (``name``: the field, for the
    error). Whether that device exists is ``pipeline.distributed.resolve_device``'s to say."""
    if not (value in ("auto", "cpu", "cuda") or (value.startswith("cuda:") and value[5:].isdigit())):
        raise ConfigError(f"{name}: expected auto, cpu, cuda or cuda:N, got {value!r}")


def unwrap_optional(hint: Any) -> tuple[Any, bool]:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        args = typing.get_args(hint)
        inner = [a for a in args if a is not type(None)]
        if len(inner) == 1:
            return inner[0], type(None) in args
    return hint, False


def is_pairs(hint: Any) -> bool:
    """``tuple[tuple[str, Any], ...]``: KEY=VALUE options."""
    if typing.get_origin(hint) is not tuple:
        return False
    args = typing.get_args(hint)
    return len(args) == 2 and args[1] is Ellipsis and typing.get_origin(args[0]) is tuple


def _describe(value: Any) -> str:
    return repr(value) if isinstance(value, str) else str(value)


# --------------------------------------------------------------------------- checks
def check_fields(cfg: Any) -> None:
    """Check every :func:`option` field of the dataclass instance ``cfg`` against its type, choices and
    bounds; a ConfigError names the first bad field (``batch_size: must be >= 2, got 1``)."""
    for f, opt, hint in options_of(type(cfg)):
        value = getattr(cfg, f.name)
        base, optional = unwrap_optional(hint)
        if value is None:
            if optional:
                continue
            raise ConfigError(f"{f.name}: required")
        _check_type(f.name, value, base)
        choices = opt.allowed()
        if choices is not None:
            items = value if typing.get_origin(base) is tuple else (value,)
            bad = [v for v in items if v not in choices]
            if bad:
                raise ConfigError(f"{f.name}: expected one of {', '.join(map(str, choices))}, got "
                                  f"{_describe(bad[0])}")
        if opt.min is not None or opt.max is not None:
            for v in (value if typing.get_origin(base) is tuple else (value,)):
                _check_bounds(f.name, v, opt)
        if opt.device:
            check_device(f.name, value)


def _check_type(name: str, value: Any, hint: Any) -> None:
    if hint is Any:
        return
    origin = typing.get_origin(hint)
    if origin is tuple:
        if not isinstance(value, tuple):
            raise ConfigError(f"{name}: expected a list, got {_describe(value)}")
        args = typing.get_args(hint)
        if len(args) == 2 and args[1] is Ellipsis and typing.get_origin(args[0]) is None:
            for v in value:
                _check_type(name, v, args[0])
        return
    if hint is bool:
        ok = isinstance(value, bool)
    elif hint is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif hint is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    elif hint is str:
        ok = isinstance(value, (str, os.PathLike))  # a pathlib.Path where a path is wanted
    else:
        return
    if not ok:
        what = {bool: "true or false", int: "a whole number", float: "a number", str: "text"}[hint]
        raise ConfigError(f"{name}: expected {what}, got {_describe(value)}")


def _check_bounds(name: str, v: Any, opt: Option) -> None:
    lo_ok = opt.min is None or (v > opt.min if opt.min_open else v >= opt.min)
    hi_ok = opt.max is None or (v < opt.max if opt.max_open else v <= opt.max)
    if not (lo_ok and hi_ok):
        how = "be in " if opt.min is not None and opt.max is not None else "be "
        raise ConfigError(f"{name}: must {how}{_bounds_text(opt)}, got {v}")


# --------------------------------------------------------------------------- command line
def option_names(f: dataclasses.Field, opt: Option) -> tuple[str, ...]:
    return opt.names or ("--" + f.name.replace("_", "-"),)


def option_name(cls, field: str) -> str | None:
    """How the user types ``field`` of ``cls`` on the command line (``--crop-size``), if it is an option."""
    for f, opt, _ in options_of(cls):
        if f.name == field and opt.cli:
            return option_names(f, opt)[0]
    return None


def option_choices(cls, field: str) -> tuple[Any, ...] | None:
    """The allowed values of ``field`` of ``cls`` (None: any value of its type)."""
    for f, opt, _ in options_of(cls):
        if f.name == field:
            return opt.allowed()
    raise KeyError(f"{cls.__name__} has no option {field!r}")


def default_text(default: Any) -> str:
    if isinstance(default, tuple):
        return ",".join(map(str, default))
    return str(default)


# --------------------------------------------------------------------------- docs
def markdown_table(cls, command: str) -> str:
    """The options of ``cls`` as a Markdown table (option, default, meaning), for docs/OPTIONS.md."""
    rows = [f"### `{command}`", "", "| option | default | meaning |", "|---|---|---|"]
    for f, opt, hint in options_of(cls):
        base, _ = unwrap_optional(hint)
        name = ", ".join(f"`{n}`" for n in option_names(f, opt)) if opt.cli else f"`{f.name}` (YAML only)"
        if base is bool and opt.negatable and opt.cli:
            name = f"`{option_names(f, opt)[0]}` / `--no-{option_names(f, opt)[0][2:]}`"
        if opt.cli and option_names(f, opt)[0][2:].replace("-", "_") != f.name:
            name += f" (YAML `{f.name}`)"
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            default = "required"
        elif opt.show_default is not None:
            default = opt.show_default
        elif f.default_factory is not dataclasses.MISSING:
            default = default_text(f.default_factory())
        elif f.default is None or f.default == ():
            default = "-"
        elif opt.repeat:
            default = ", ".join(map(str, f.default))
        else:
            default = default_text(f.default)
        meaning = opt.help
        if opt.allowed() is not None:
            meaning += " One of: " + ", ".join(f"`{c}`" for c in opt.allowed()) + "."
        if opt.min is not None or opt.max is not None:
            meaning += f" Bounds: {_bounds_text(opt)}."
        rows.append(f"| {name} | {_cell(default)} | {_cell(meaning)} |")
    return "\n".join(rows) + "\n"


def _bounds_text(opt: Option) -> str:
    if opt.min is not None and opt.max is not None:
        return f"{'(' if opt.min_open else '['}{opt.min:g}, {opt.max:g}{')' if opt.max_open else ']'}"
    if opt.min is not None:
        return f"{'>' if opt.min_open else '>='} {opt.min:g}"
    return f"{'<' if opt.max_open else '<='} {opt.max:g}"


def _cell(text: str) -> str:
    """Text safe in a Markdown table cell (``<F>`` would otherwise vanish as an HTML tag)."""
    return text.replace("|", "/").replace("<", "&lt;")
