"""Any image-report corpus: a table (CSV, TSV, JSONL or Parquet) of image paths and report text.

One row per image. ``--image-column`` holds the path relative to ``--image-root`` (kept inside it);
``--text-column`` one column, or several joined in the order given (like report sections); optional
``--study-column`` (rows of one study share its report; default: each image is its own study),
``--patient-column`` (default: the study) and ``--split-column`` (train/validate/test, with the usual
spellings; default: drawn per patient from ``--split-seed``, so no patient is in two splits).
Images may be any size, 8/16-bit grey, RGB or DICOM; ``--channels 3`` keeps colour.

Every row that cannot be used is named by ``table:line`` (Parquet: ``table:row N``) and counted in
prepare-report.json: bad rows (an input error, counted against ``--max-bad-fraction``) for a missing
path or image file, a path leaving the image root, a duplicate image path, an unknown split or a row
that contradicts its study's patient, split or text; dropped rows for a study with no text.
"""
from __future__ import annotations

import csv
import gzip
import io
import json
import logging
import math
import os
import zlib
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Iterator

from pipeline.common import ConfigError, MflagError, decode_utf8, replace_surrogates
from pipeline.corpora.base import (
    SPLIT_ALIASES,
    BadItem,
    CorpusError,
    CorpusImage,
    Selection,
    ShardOptions,
    check_fractions,
    draw_split,
    image_key,
    splits_option,
    unsafe_relpath_reason,
)
from pipeline.options import option

log = logging.getLogger(__name__)

TABLE_KINDS = {".csv": "csv", ".tsv": "tsv", ".jsonl": "jsonl", ".ndjson": "jsonl", ".parquet": "parquet",
               ".pq": "parquet"}


@dataclass(frozen=True, kw_only=True)
class PairsConfig(ShardOptions):
    """Options of ``prepare pairs``."""

    INPUTS: ClassVar[tuple[str, ...]] = ("table", "image_root")

    table: str = option(help="The table: .csv, .tsv, .jsonl (each optionally .gz) or .parquet, one row per image.",
                        exists="file")
    image_root: str = option(help="Folder the image paths are relative to; no path may leave it.", exists="dir")
    image_column: str = option("image", help="Column of the image path.")
    text_column: tuple[str, ...] = option(("text",), help="Column(s) of the report text; several are joined in "
                                                          "this order with --section-separator.")
    study_column: str | None = option(None, help="Column of the study (report) id. Default: each image is a study.")
    patient_column: str | None = option(None, help="Column of the patient id. Default: the study.")
    split_column: str | None = option(None, help="Column of the split (train, validate/val/valid, test). "
                                                 "Default: drawn per patient from --split-seed.")
    splits: tuple[str, ...] = splits_option()
    split_seed: int = option(0, help="Seed of the drawn split (without --split-column).")
    split_fractions: tuple[float, ...] = option((0.9, 0.05, 0.05), min=0, max=1,
                                                help="Shares of train, validate and test in the drawn split.")
    channels: int = option(1, min=1, max=3, help="1: grey (colour images are converted); 3: keep RGB in the "
                                                   "shards, the loader and the ResNet input (histopathology, "
                                                   "fundus).")

    def normalise(self) -> None:
        self._set("text_column", tuple(str(c).strip() for c in self.text_column if str(c).strip()))

    def check(self) -> None:
        check_fractions("split_fractions", self.split_fractions)
        if self.channels not in (1, 3):
            raise ConfigError(f"channels: expected 1 (grey) or 3 (RGB), got {self.channels}")
        if not self.text_column:
            raise ConfigError("text_column: give at least one column")
        if table_kind(self.table) is None:
            raise ConfigError(f"table: {self.table}: unknown table type; name it .csv, .tsv, .jsonl or .parquet "
                              "(optionally .gz)")
        if not Path(self.table).is_file():
            raise ConfigError(f"table: {self.table} is not a file")
        if not Path(self.image_root).is_dir():
            raise ConfigError(f"image_root: {self.image_root} is not a directory")

    def content_dict(self) -> dict:
        return {"corpus": "pairs", **super().content_dict()}


def table_kind(path: str | Path) -> str | None:
    name = Path(path).name.lower()
    name = name[:-3] if name.endswith(".gz") else name
    return TABLE_KINDS.get(Path(name).suffix)


def _cell(value: Any) -> str:
    """A table cell as text: None and NaN are empty; 12.0 (a number column read as float) is "12"."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value).strip()


def read_table(path: str | Path) -> tuple[list[str], Iterator[tuple[str, dict[str, str]]]]:
    """The columns of a table and its rows as ``(where, {column: text})``, where = ``path:line`` (CSV,
    JSONL: the line the row starts on) or ``path:row N`` (Parquet). Raises ``MflagError`` naming the
    file when it cannot be read; a JSONL line that is not an object comes back with the key ``None``."""
    path = Path(path)
    kind = table_kind(path)
    if kind == "parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError as e:
            raise MflagError(f"{path}: reading Parquet needs pyarrow (pip install pyarrow), or give the table as "
                             "CSV or JSONL") from e
        try:
            tab = pq.read_table(path)
        except Exception as e:  # pyarrow raises its own types for corrupt files
            raise MflagError(f"{path}: cannot read Parquet ({type(e).__name__}: {e})") from e
        columns = list(tab.column_names)
        rows = tab.to_pylist()
        return columns, ((f"{path}:row {i + 1}", {k: _cell(v) for k, v in r.items()}) for i, r in enumerate(rows))
    try:
        data = path.read_bytes()
        if path.name.lower().endswith(".gz"):
            data = gzip.decompress(data)
    except (OSError, EOFError, zlib.error, gzip.BadGzipFile) as e:
        raise MflagError(f"{path}: cannot read ({type(e).__name__}: {e})") from e
    text = decode_utf8(data, path)  # UTF-8 (BOM tolerated); a bad byte is one line naming file and line
    if kind == "jsonl":
        return _read_jsonl(path, text)
    reader = csv.reader(io.StringIO(text, newline=""), delimiter="\t" if kind == "tsv" else ",")
    try:
        header = [h.strip() for h in next(reader, [])]
    except csv.Error as e:
        raise MflagError(f"{path}:1: cannot read the header ({e})") from e

    def rows() -> Iterator[tuple[str, dict[str, str]]]:
        end = reader.line_num
        while True:
            try:
                row = next(reader)
            except StopIteration:
                return
            except csv.Error as e:
                raise MflagError(f"{path}:{end + 1}: cannot read CSV ({e})") from e
            start, end = end + 1, reader.line_num
            if not any(c.strip() for c in row):
                continue
            if len(row) != len(header):
                yield f"{path}:{start}", {None: f"{len(row)} fields where the header has {len(header)}"}
                continue
            yield f"{path}:{start}", {h: c.strip() for h, c in zip(header, row)}

    return header, rows()


def _read_jsonl(path: Path, text: str) -> tuple[list[str], Iterator[tuple[str, dict[str, str]]]]:
    parsed: list[tuple[str, dict]] = []
    columns: dict[str, None] = {}
    for n, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}:{n}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            parsed.append((where, {None: f"not valid JSON ({e.msg})"}))
            continue
        if not isinstance(obj, dict):
            parsed.append((where, {None: f"a JSON {type(obj).__name__}, not an object"}))
            continue
        columns.update(dict.fromkeys(obj))
        parsed.append((where, {k: _cell(v) for k, v in obj.items()}))
    return list(columns), iter(parsed)


def _under(path: str, root: Path) -> str:
    """A table's image path relative to ``root``: ``./`` prefixes dropped, and an absolute path that lies
    under ``root`` (as written, ``..`` folded) made relative. Anything else is returned unchanged, for
    ``unsafe_relpath_reason`` to refuse."""
    while path.startswith("./"):
        path = path[2:]
    if path.startswith("/"):
        folded = os.path.normpath(path)
        base = os.path.normpath(os.path.abspath(root))
        if folded.startswith(base + os.sep):
            return folded[len(base) + 1:]
    return path


@dataclass
class _Study:
    patient: str
    split: str | None
    text: str = ""
    used: tuple[str, ...] = ()
    where: str = ""


def read(cfg: PairsConfig, report) -> Selection:
    """Rows -> images grouped into studies; every unusable row named and counted (module docstring)."""
    table, root = Path(cfg.table), Path(cfg.image_root)
    columns, rows = read_table(table)
    wanted = [cfg.image_column, *cfg.text_column, cfg.study_column, cfg.patient_column, cfg.split_column]
    for col in (c for c in wanted if c is not None):
        if col not in columns:
            report.bad.append(BadItem("missing_column", str(table), f"no column {col!r}", {"column": col}))
            raise CorpusError(f"{table}: missing column {col!r} (found: {', '.join(columns) or 'none'}); "
                              f"name the columns with --image-column, --text-column, ...")
    n_rows = n_bad = 0
    seen: dict[str, str] = {}  # image path -> where it was first listed
    studies: dict[str, _Study] = {}
    pending: list[tuple[str, str, str, str]] = []  # (where, relpath, study, row text) of rows so far usable
    filtered: Counter = Counter()

    def bad(reason: str, where: str, detail: str, **ids: str) -> None:
        nonlocal n_bad
        n_bad += 1
        report.add_bad(BadItem(reason, where, detail, ids))

    n_surrogates = 0
    for where, row in rows:
        n_rows += 1
        if None in row:
            bad("bad_row", where, str(row[None]))
            continue
        # A JSONL escape such as "\ud800" decodes to a lone UTF-16 surrogate, which no UTF-8 encoder takes:
        # refused in the path and ids (they name files and keys), replaced by U+FFFD in the text and counted.
        ids_with = [c for c in (cfg.image_column, cfg.study_column, cfg.patient_column, cfg.split_column)
                    if c is not None and replace_surrogates(row.get(c, ""))[1]]
        if ids_with:
            bad("bad_row", where, f"{ids_with[0]!r} holds a lone UTF-16 surrogate (an escape such as \\ud800 "
                                  "that encodes no character)")
            continue
        for c in cfg.text_column:
            if c in row:
                row[c], n = replace_surrogates(row[c])
                n_surrogates += bool(n)
        rel = row.get(cfg.image_column, "")
        if not rel:
            bad("bad_row", where, f"empty {cfg.image_column!r}")
            continue
        rel = _under(rel, root)
        why = unsafe_relpath_reason(rel)
        if why is not None:
            bad("unsafe_path", where, f"image path {rel!r} {why}: it must stay inside {root}")
            continue
        if rel in seen:
            bad("duplicate_image", where, f"{rel} is already listed at {seen[rel]}")
            continue
        seen[rel] = where
        study = row.get(cfg.study_column, "") if cfg.study_column else image_key(rel)
        if not study or any(ord(c) < 32 for c in study):
            bad("bad_row", where, f"empty or unprintable {cfg.study_column!r}")
            continue
        patient = row.get(cfg.patient_column, "") if cfg.patient_column else study
        if not patient:
            bad("bad_row", where, f"empty {cfg.patient_column!r}", study_id=study)
            continue
        split = None
        if cfg.split_column:
            raw = row.get(cfg.split_column, "")
            split = SPLIT_ALIASES.get(raw.strip().lower())
            if split is None:
                bad("bad_split", where, f"split {raw!r} is not train, validate (val, valid) or test", study_id=study)
                continue
        st = studies.setdefault(study, _Study(patient, split, where=where))
        if st.patient != patient:
            bad("conflicting_patient", where, f"study {study} has patient {st.patient} at {st.where}, "
                                              f"{patient} here", study_id=study)
            continue
        if split is not None and st.split != split:
            bad("conflicting_split", where, f"study {study} is in {st.split} at {st.where}, {split} here",
                study_id=study)
            continue
        used = tuple(c for c in cfg.text_column if row.get(c, "").strip())
        text = cfg.section_separator.join(" ".join(row[c].split()) for c in used)
        if text and st.text and text != st.text:
            bad("conflicting_text", where, f"study {study} has another report text at {st.where}", study_id=study)
            continue
        if text and not st.text:
            st.text, st.used = text, used
        pending.append((where, rel, study, patient))

    images: list[CorpusImage] = []
    n_considered = n_bad  # every bad row was an image asked for
    for where, rel, study, patient in pending:
        st = studies[study]
        ids = {"study_id": study, "subject_id": patient}
        if not st.text:
            report.add_dropped("no_text", where, f"study {study} has no text in {','.join(cfg.text_column)}", ids)
            continue
        split = st.split or draw_split(patient, cfg.split_seed, cfg.split_fractions)
        if split not in cfg.splits:
            filtered[split] += 1
            continue
        n_considered += 1
        if not (root / rel).is_file():
            n_bad += 1
            report.add_bad(BadItem("missing_image", where, f"{root / rel}: image file not found", ids))
            continue
        images.append(CorpusImage(image_key(rel), patient, study, "", split, rel))
    texts = {(st.patient, key): (st.text, list(st.used)) for key, st in studies.items() if st.text}
    report.filtered = {"split": dict(filtered)}
    report.counts.update(table_rows=n_rows, images_selected=len(images), studies_with_text=len(texts),
                         filtered_split=sum(filtered.values()))
    if n_surrogates:
        report.counts["surrogates_replaced"] = n_surrogates
        log.warning("%s: %d row(s) held lone UTF-16 surrogates in their text, each replaced by U+FFFD", table,
                    n_surrogates)
    if not images:
        raise CorpusError(f"{table}: no row has an image in {root} and report text in "
                          f"{','.join(cfg.text_column)} (bad rows: {dict(report.reason_counts()) or 'none'}; "
                          f"dropped: {len(report.dropped)}; every row is named in {report.path})")
    manifest: dict[str, Any] = {"corpus": "pairs"}
    if cfg.channels != 1:
        manifest["channels"] = cfg.channels
    if not cfg.split_column:
        manifest["split"] = {"drawn": True, "unit": "patient", "seed": cfg.split_seed,
                             "fractions": dict(zip(("train", "validate", "test"), cfg.split_fractions))}
    return Selection(images, texts, root, n_considered, n_bad, manifest)
