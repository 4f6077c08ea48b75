"""What every corpus reader hands to prepare: the image record, the selection, the shared options.

A corpus module (``pipeline.corpora.<name>``) reads its own files into a :class:`Selection`: the
images to shard (:class:`CorpusImage`, one per image file) and the report text of each study, with
every skipped or bad input already counted in the :class:`~pipeline.corpora.shards.PrepareReport`. From there
``stages.prepare`` is the same for every corpus: plan, encode, write shards, reports.jsonl, manifest.
"""
from __future__ import annotations

import csv
import gzip
import hashlib
import io
import os
import re
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Iterator, Sequence

from pipeline.common import ConfigError, MflagError, config_to_dict, unsafe_id_reason
from pipeline.imaging import DEFAULT_MAX_PIXELS
from pipeline.options import check_fields, option

IMAGE_FORMATS = ("png", "jpg", "raw")  # pipeline.corpora.shards.IMAGE_EXT's keys (imported there from here)
SPLITS = ("train", "validate", "test")
# Split names as corpora and users write them -> the three the loaders read.
SPLIT_ALIASES = {"train": "train", "training": "train", "validate": "validate", "validation": "validate",
                 "valid": "validate", "val": "validate", "dev": "validate", "test": "test", "testing": "test"}


class CorpusError(MflagError):
    """The corpus as a whole cannot be prepared (a missing column, no usable image); names the file."""


@dataclass(frozen=True)
class CorpusImage:
    """One image to shard. ``key`` is unique in the corpus and is the shard member name (and the
    ``dicom_id`` of the sample's JSON, MIMIC's name for it); ``study`` is the report's key (the text
    cache's ``study_id``, unique across the corpus), ``patient`` its patient (``subject_id``);
    ``relpath`` is the image file under the corpus's image root. ``rows``/``cols`` are the image's pixel
    size where the corpus's metadata gives it (MIMIC's DICOM Rows x Columns), None where it does not: an
    image of another size is a degenerate item (``pipeline.imaging.check_degenerate``)."""

    key: str
    patient: str
    study: str
    view: str
    split: str
    relpath: str
    rows: int | None = None
    cols: int | None = None

    @property
    def expected_size(self) -> tuple[int, int] | None:
        """``(rows, cols)`` when the metadata gives both, else None (only the minimum side is checked)."""
        return (self.rows, self.cols) if self.rows and self.cols else None


@dataclass
class Selection:
    """A corpus read for prepare: images, the text of each study by (patient, study), where the image
    paths are relative to, how many images were asked for (the bad fraction's denominator) and how many
    of those were already lost to bad input; ``manifest`` holds extra manifest entries (a drawn split)."""

    images: list[CorpusImage]
    texts: dict[tuple[str, str], tuple[str, list[str]]]
    image_root: Path
    n_considered: int
    n_bad: int
    manifest: dict[str, Any] = field(default_factory=dict)


# --------------------------------------------------------------------------- shared options
def sections_option(what: str = "Report sections") -> Any:
    return option(("impression", "findings"), help=f"{what} to join, in this order.")


def splits_option(default: tuple[str, ...] = SPLITS) -> Any:
    return option(default, help="Splits to write (train, validate, test).")


@dataclass(frozen=True, kw_only=True)
class ShardOptions:
    """The options of every ``prepare <corpus>`` command that do not depend on the corpus: how images
    become shard members and how much bad input is tolerated. A corpus's config subclasses this and adds
    its inputs (``INPUTS``: path fields, not part of the content fingerprint) and its own options."""

    INPUTS: ClassVar[tuple[str, ...]] = ()  # the corpus's input path fields

    out: str = option(help="Output folder.", path="dir")
    size: int = option(256, min=8, max=4096, help="Square output size in pixels.")
    image_format: str = option(
        "png", names=("--format",), choices=IMAGE_FORMATS,
        help="Image encoding inside the shards: png (lossless, ~25 KiB per 256 px image), jpg (lossy, smallest), "
             "or raw (uint8 array as a .npy member: 64 KiB per 256 px image, no decode cost when training).")
    jpeg_quality: int = option(95, min=1, max=100, help="Quality for --format jpg.")
    shard_size: int = option(1000, min=1, help="Images per shard.")
    workers: int = option(default_factory=lambda: min(8, os.cpu_count() or 1), min=1, show_default="min(8, CPUs)",
                          help="Decoding processes (output does not depend on it).")
    section_separator: str = option(" ", show_default="one space", help="Text put between sections.")
    max_bad_fraction: float = option(0.01, min=0, max=1,
                                     help="Fail when more than this fraction of images is lost to bad input.")
    crop_border: bool = option(True, help="Crop the black border before scaling, as the original preprocessing did.")
    max_pixels: int = option(DEFAULT_MAX_PIXELS, min=1,
                             help="Images whose header declares more pixels are bad items, never decoded "
                                  "(memory bombs).")
    force: bool = option(False, negatable=False, help="Rebuild OUT even if it holds another config's outputs.")

    def _set(self, name: str, value: Any) -> None:
        object.__setattr__(self, name, value)

    def __post_init__(self) -> None:
        self._set("out", str(self.out))
        for name in self.INPUTS:
            value = getattr(self, name)
            self._set(name, str(value) if value is not None else None)
        if hasattr(self, "splits"):
            self._set("splits", tuple(str(s).strip().lower() for s in self.splits if str(s).strip()))
        if hasattr(self, "text_sections"):
            self._set("text_sections", tuple(str(s).strip().lower() for s in self.text_sections if str(s).strip()))
        self._set("image_format", str(self.image_format).lower().replace("jpeg", "jpg"))
        self.normalise()
        check_fields(self)
        if hasattr(self, "splits"):
            if not self.splits:
                raise ConfigError("splits: give at least one split (train, validate, test)")
            unknown = [s for s in self.splits if s not in SPLITS]
            if unknown:
                raise ConfigError(f"splits: {','.join(unknown)} is not one of {', '.join(SPLITS)}")
        if hasattr(self, "text_sections") and not self.text_sections:
            raise ConfigError("text_sections: give at least one report section (e.g. impression,findings)")
        if self.max_pixels < self.size * self.size:
            raise ConfigError(f"max_pixels: {self.max_pixels} is below one {self.size}x{self.size} output image")
        self.check()

    def normalise(self) -> None:
        """A corpus's own value clean-up, before the field checks."""

    def check(self) -> None:
        """A corpus's own cross-field checks (inputs exist, ...), after the field checks."""

    def content_dict(self) -> dict:
        """The settings that change output content (not paths, workers, force or the bad-item limit)."""
        d = {k: v for k, v in config_to_dict(self).items()
             if k not in ("out", "workers", "force", "max_bad_fraction", *self.INPUTS)}
        if self.image_format != "jpg":
            d.pop("jpeg_quality")
        if self.max_pixels == DEFAULT_MAX_PIXELS:
            d.pop("max_pixels")  # outputs made before the limit existed stay valid at its default
        return d


# --------------------------------------------------------------------------- helpers for readers
def natural_key(value: str) -> tuple:
    """Sort key: digit runs compare as numbers (``"9" < "10"``, ``"CXR2" < "CXR10"``); for digit-only ids
    the order is that of ``int()``, which ids such as ``CXR1_1_IM-0001`` would not survive."""
    parts = re.split(r"(\d+)", value)
    return tuple(int(p) if i % 2 else p for i, p in enumerate(parts)) + (value,)


def draw_split(unit: str, seed: int, fractions: tuple[float, ...]) -> str:
    """train/validate/test for ``unit`` (a report or patient key) from a hash of seed and key: the same
    unit always lands in the same split, whatever else is in the corpus or the order it is read in."""
    h = hashlib.blake2b(f"{seed}\0{unit}".encode(), digest_size=8).digest()
    u = int.from_bytes(h, "big") / 2.0 ** 64
    acc = 0.0
    for name, frac in zip(SPLITS, fractions):
        acc += frac
        if u < acc:
            return name
    return SPLITS[len(fractions) - 1]


def check_fractions(name: str, fractions: tuple[float, ...]) -> None:
    if len(fractions) != 3 or any(f < 0 for f in fractions) or abs(sum(fractions) - 1.0) > 1e-6:
        raise ConfigError(f"{name}: expected three non-negative fractions (train,validate,test) summing to 1, "
                          f"got {','.join(map(str, fractions))}")


def image_key(relpath: str) -> str:
    """A shard member key for an image path: readable, no dots or slashes (webdataset splits the member
    name at its first dot), unique through a short hash of the whole path."""
    stem = relpath.rsplit(".", 1)[0] if "." in relpath.rsplit("/", 1)[-1] else relpath
    readable = re.sub(r"[^A-Za-z0-9_-]+", "_", stem).strip("_")[-80:] or "image"
    return f"{readable}-{hashlib.blake2b(relpath.encode(), digest_size=4).hexdigest()}"


def unsafe_relpath_reason(relpath: str) -> str | None:
    """Why a path read from a table must not be joined to the image root (it could leave it), or None."""
    return unsafe_id_reason(relpath, allow_subfolders=True)


# --------------------------------------------------------------------------- reading tables
class CsvColumnError(MflagError):
    """A CSV lacks a required column; ``path`` and ``column`` say which."""

    def __init__(self, path: Path, column: str, columns: Sequence[str]):
        self.path, self.column = path, column
        super().__init__(f"{path}: missing required column {column!r} (found: {', '.join(columns) or 'none'})")


@dataclass(frozen=True)
class BadItem:
    """One input problem: ``reason`` (e.g. "missing_image"), where (path or "file:line"), and detail."""

    reason: str
    where: str
    detail: str = ""
    ids: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"reason": self.reason, "where": self.where, "detail": self.detail, **self.ids}


def read_csv(path: str | os.PathLike, required: Sequence[str],
             optional: Sequence[str] = ()) -> Iterator[tuple[int, dict[str, str]]]:
    """Yield ``(line number, {column: value})`` for the ``required`` columns of a .csv or .csv.gz, and
    the ``optional`` ones the header has (None where it has not).

    Raises ``CsvColumnError`` (before yielding anything) when a required column is missing, and
    ``MflagError`` naming the file when it cannot be read. Only required columns are kept, so the
    377k-row metadata CSV stays small in memory.
    """
    path = Path(path)
    try:
        raw = gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")
    except OSError as e:
        raise MflagError(f"{path}: cannot open ({e})") from e
    try:
        with raw, io.TextIOWrapper(raw, encoding="utf-8-sig", newline="") as fh:
            reader = csv.reader(fh)
            try:
                header = next(reader)
            except StopIteration:
                header = []
            header = [h.strip() for h in header]
            for col in required:
                if col not in header:
                    raise CsvColumnError(path, col, header)
            idx = [header.index(c) for c in required]
            opt = {c: header.index(c) for c in optional if c in header}
            width = max(idx) + 1
            for row in reader:
                if not row:
                    continue
                line = reader.line_num
                if len(row) < width:
                    yield line, {c: None for c in required}  # the caller reports the short row
                    continue
                values = {c: row[i].strip() for c, i in zip(required, idx)}
                values.update({c: (row[i].strip() if i < len(row) else None) for c, i in opt.items()})
                yield line, values
    except UnicodeDecodeError:
        raise MflagError(_first_bad_utf8_line(path)) from None
    except (OSError, EOFError, zlib.error, csv.Error) as e:
        raise MflagError(f"{path}: cannot read CSV ({type(e).__name__}: {e})") from e


def _first_bad_utf8_line(path: Path) -> str:
    """The line of a (gzipped) CSV that is not UTF-8, for the one-line error (the CSV is read streaming,
    where the decoder fails a whole chunk ahead of the csv reader)."""
    with gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb") as fh:
        for n, raw in enumerate(fh, 1):
            try:
                raw.decode("utf-8")
            except UnicodeDecodeError as e:
                return (f"{path}: line {n}: not valid UTF-8 (byte 0x{raw[e.start]:02x} at column {e.start + 1}); "
                        "save the file as UTF-8")
    return f"{path}: not valid UTF-8"
