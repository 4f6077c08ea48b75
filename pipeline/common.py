"""Small shared utilities: user-facing errors, atomic writes, fingerprints, progress, configs."""
from __future__ import annotations

import contextlib
import dataclasses
import errno
import hashlib
import io
import json
import logging
import os
import re
import shutil
import sys
import tempfile
import time
import types
import typing
from pathlib import Path
from typing import Any, Iterable, Iterator, TypeVar

from pipeline import __version__

log = logging.getLogger(__name__)
T = TypeVar("T")


class MflagError(Exception):
    """An error caused by the user's input or environment; the CLI prints it without a traceback."""


class ConfigError(MflagError):
    """A config value is invalid; the message names the field."""


# --------------------------------------------------------------------------- atomic files
@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp path beside ``path``; on success it is fsync'd and moved onto ``path``.

    On any exception the temp file is removed, so ``path`` only ever holds complete content.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; final files follow the umask like open()
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with open(tmp_path, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp_path, path)
    except BaseException as exc:
        full = _out_of_space(exc, tmp_path.parent)
        with contextlib.suppress(FileNotFoundError):
            tmp_path.unlink()
        if full is not None:
            raise OSError(errno.ENOSPC, f"No space left on device ({full} free there; the file was not "
                                        "written)", str(path)) from exc
        raise


_NEARLY_FULL = 64 << 20  # bytes: torch.save and h5py report a full disk in words of their own


def _out_of_space(exc: BaseException, folder: Path) -> str | None:
    """The space left, as words, when a write failed for lack of it; None for other errors. An OSError
    says so by its errno; a library's own error (torch.save's "unexpected pos", h5py's "file write
    failed") is taken for it when the disk is nearly full at the time of the error."""
    if not isinstance(exc, (OSError, RuntimeError)):
        return None
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        return None
    said = isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT)
    return f"{free / 2**20:.1f} MiB" if said or free < _NEARLY_FULL else None


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "wb", **kwargs: Any):
    """``open`` for writing whose result appears under ``path`` only when the block succeeds."""
    if "r" in mode or "a" in mode:
        raise ValueError("atomic_open is for writing only")
    with atomic_path(path) as tmp:
        with open(tmp, mode, **kwargs) as fh:
            yield fh


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write ``obj`` as indented JSON atomically."""
    with atomic_open(path, "w", encoding="utf-8") as fh:
        json.dump(obj, fh, indent=2, sort_keys=True, default=_json_default)
        fh.write("\n")


def read_json(path: str | os.PathLike) -> Any:
    path = Path(path)
    try:
        return json.loads(read_text_utf8(path))
    except json.JSONDecodeError as e:
        raise MflagError(f"{path}: not valid JSON ({e})") from e


# --------------------------------------------------------------------------- text files
def decode_utf8(data: bytes, path: str | os.PathLike) -> str:
    """A text file's bytes as UTF-8 (a leading byte-order mark dropped: spreadsheet exports write one).
    Bytes that are not UTF-8 are one MflagError naming the file, line and column."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        col = e.start - (data.rfind(b"\n", 0, e.start) + 1) + 1
        raise MflagError(f"{path}: line {line}: not valid UTF-8 (byte 0x{data[e.start]:02x} at column {col}); "
                         "save the file as UTF-8") from None
    return text.removeprefix("\ufeff")


def read_text_utf8(path: str | os.PathLike) -> str:
    """The file's text (:func:`decode_utf8`); a file that cannot be read raises OSError as ``open`` does."""
    with open(path, "rb") as fh:
        return decode_utf8(fh.read(), path)


def open_text_utf8(path: str | os.PathLike) -> io.StringIO:
    """The file's text as a file object for ``csv`` (newlines kept as written), decoded up front so a
    bad byte is named by line (:func:`decode_utf8`) instead of failing mid-iteration."""
    return io.StringIO(read_text_utf8(path), newline="")


_SURROGATES = re.compile("[\ud800-\udfff]")


def replace_surrogates(text: str) -> tuple[str, int]:
    """``text`` with each lone UTF-16 surrogate (a JSON ``"\\ud800"`` escape decodes to one; no UTF-8
    encoder accepts it) replaced by U+FFFD, and how many were replaced."""
    return _SURROGATES.subn("\ufffd", text)


def _json_default(o: Any) -> Any:
    if dataclasses.is_dataclass(o):
        return dataclasses.asdict(o)
    if isinstance(o, Path):
        return str(o)
    if isinstance(o, (set, frozenset)):
        return sorted(o)
    if hasattr(o, "item"):  # numpy / torch scalars
        return o.item()
    if hasattr(o, "tolist"):
        return o.tolist()
    raise TypeError(f"not JSON serializable: {type(o).__name__}")


# --------------------------------------------------------------------------- fingerprints
def canonical_json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=_json_default)


def fingerprint(obj: Any, length: int = 16) -> str:
    """Stable hex digest of a JSON-able object (dict key order does not matter)."""
    return hashlib.sha256(canonical_json(obj).encode("utf-8")).hexdigest()[:length]


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


# --------------------------------------------------------------------------- configs
def config_to_dict(cfg: Any) -> dict:
    """A dataclass config as plain JSON-able values (paths as strings, tuples as lists)."""
    return json.loads(canonical_json(dataclasses.asdict(cfg)))


def save_config(cfg: Any, out_dir: str | os.PathLike, name: str = "config.json", **extra: Any) -> Path:
    """Write the resolved config a stage ran with next to its outputs."""

    path = Path(out_dir) / name
    payload = {"config": config_to_dict(cfg), "mflag_version": __version__, **extra}
    write_json(path, payload)
    return path


# --------------------------------------------------------------------------- progress
class _LogProgress:
    """Plain periodic log lines for non-interactive runs (CI, nohup, SLURM logs)."""

    def __init__(self, iterable, total, desc, unit, every_s):
        self.iterable, self.total, self.desc, self.unit, self.every_s = iterable, total, desc, unit, every_s
        self.n = 0
        self._t0 = self._last = time.monotonic()

    def __iter__(self):
        for item in self.iterable:
            yield item
            self.update(1)
        self.close()

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.monotonic()
        if now - self._last >= self.every_s:
            self._last = now
            self._emit(now)

    def _emit(self, now: float) -> None:
        rate = self.n / max(now - self._t0, 1e-9)
        of = f"/{self.total}" if self.total else ""
        log.info("%s: %d%s %s (%.1f %s/s)", self.desc, self.n, of, self.unit, rate, self.unit)

    def set_postfix_str(self, s: str) -> None:  # tqdm compatibility
        pass

    def close(self) -> None:
        if self.n:
            self._emit(time.monotonic())

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def progress(iterable: Iterable[T] | None = None, total: int | None = None, desc: str = "",
             unit: str = "it", every_s: float = 10.0):
    """A tqdm bar on an interactive terminal, periodic log lines otherwise.

    Usable as an iterator wrapper or as a manual counter (``with progress(total=n) as p: p.update()``).
    Silent when logging is set above INFO (``-q``).
    """
    disable = not log.isEnabledFor(logging.INFO)
    if sys.stderr.isatty() and not disable:
        from tqdm.auto import tqdm

        return tqdm(iterable, total=total, desc=desc, unit=unit, dynamic_ncols=True)
    if iterable is None:
        iterable = iter(())
    if disable:
        every_s = float("inf")
    return _LogProgress(iterable, total, desc, unit, every_s)


class RateLimitedLog:
    """Warn for the first ``first`` events, then at every power of two, so a bad dataset cannot flood
    logs. ``logger``: where the warnings go (default: this module's)."""

    def __init__(self, what: str, first: int = 5, logger: logging.Logger | None = None):
        self.what, self.first, self.n = what, first, 0
        self.log = logger or logging.getLogger(__name__)

    def __call__(self, msg: str) -> None:
        self.n += 1
        n = self.n
        if n <= self.first or (n & (n - 1)) == 0:
            self.log.warning("%s #%d: %s%s", self.what, n, msg,
                             "" if n < self.first else " (further warnings rate-limited)")


_TRUE, _FALSE = ("true", "yes", "on", "1"), ("false", "no", "off", "0")


def coerce_to_hint(where: str, value: Any, hint: Any, from_text: bool = False) -> Any:
    """``value`` checked against the annotation ``hint`` of the option ``where`` names: a whole number
    where an int is wanted (``50.0`` becomes 50; an int stays an int where a float is wanted), a lone
    value where a list is wanted (returned as a list). ``from_text``: strings as typed on a command line
    may also stand for switches ("false"), numbers ("0.1") and comma-separated lists ("a.csv,b.csv").
    Anything else is a MflagError naming ``where`` and what it expected."""
    if hint is None or hint is Any:
        return value
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return coerce_to_hint(where, value, inner[0], from_text) if len(inner) == 1 else value
    original = value

    def bad(what: str) -> MflagError:
        return MflagError(f"{where}: expected {what}, got {original!r}")

    text = from_text and isinstance(value, str)
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is bool:
        if isinstance(value, bool):
            return value
        if text and value.strip().lower() in _TRUE + _FALSE:
            return value.strip().lower() in _TRUE
        raise bad("true or false")
    if hint in (int, float):
        if text:
            try:
                value, number = (float if hint is float else int)(value.strip()), True
            except ValueError:
                raise bad("a whole number" if hint is int else "a number") from None
        if number and hint is float:
            return value
        if number and float(value).is_integer():
            return int(value)
        raise bad("a whole number" if hint is int else "a number")
    if hint is str:
        if isinstance(value, str):
            return value
        if number:
            return str(value)
        raise bad("text")
    if origin is tuple:
        if isinstance(value, dict):
            return value  # key/value options (e.g. dataset_options) are checked by their stage
        if text:
            seq = [x.strip() for x in value.split(",") if x.strip()]
        else:
            seq = list(value) if isinstance(value, (list, tuple)) else [value]
        if len(args) == 2 and args[1] is Ellipsis:
            return [coerce_to_hint(f"{where}[{i}]", x, args[0], from_text) for i, x in enumerate(seq)]
        return seq
    return value


# --------------------------------------------------------------------------- ids from data files
def unsafe_id_reason(value: str, allow_subfolders: bool = False) -> str | None:
    """Why ``value`` (an id read from a CSV/JSON/text file) must not become part of a file path, or None
    when it may. Refused: empty, ``.``/``..``, NUL or other control characters, backslashes, an absolute
    path, and (unless ``allow_subfolders``, for ids that are relative paths such as CheXpert's
    ``Path`` column) any ``/``; with subfolders allowed, every part is checked the same way."""
    if not isinstance(value, str) or not value:
        return "empty"
    if any(ord(c) < 32 or ord(c) == 127 for c in value):
        return "contains a control character"
    if "\\" in value:
        return "contains a backslash"
    if value.startswith("/"):
        return "is an absolute path"
    parts = value.split("/") if allow_subfolders else [value]
    for part in parts:
        if part in ("", ".", ".."):
            return f"has a {part or 'empty'!r} path part" if allow_subfolders else f"is {part!r}"
        if "/" in part:
            return "contains '/'"
    return None


def check_id(value: str, what: str, where: str, allow_subfolders: bool = False) -> str:
    """``value`` unchanged when it is safe as a path part (see ``unsafe_id_reason``); otherwise a
    MflagError naming ``what`` (e.g. "dicom_id") and ``where`` (e.g. "file.csv:12")."""
    why = unsafe_id_reason(value, allow_subfolders)
    if why is not None:
        raise MflagError(f"{where}: {what} {value!r} {why}; ids from data files never become paths outside "
                         "the dataset folder")
    return value
