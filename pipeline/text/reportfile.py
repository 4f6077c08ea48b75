"""Reading the reports file that embed-text embeds: JSONL or CSV/TSV, optionally gzipped.

``load_reports(path, key_column, text_column, on_empty) -> ReportSet``: one text per key (identical
repeats merged, conflicting ones refused), empty texts skipped or refused, keys sorted, and the
``text_hash`` that goes into the cache fingerprint. Every error names the file and line.
"""
from __future__ import annotations

import csv
import gzip
import hashlib
import io
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

from pipeline.common import MflagError, decode_utf8, replace_surrogates

log = logging.getLogger(__name__)

_LIST_MAX = 10


class ReportInputError(MflagError):
    """The reports file is unreadable or its rows are bad (the message names file, line and key)."""


@dataclass(frozen=True)
class ReportSet:
    keys: list[str]          # sorted, unique
    texts: list[str]         # aligned with keys
    text_hash: str
    stats: dict[str, Any]


def _decode(path: Path) -> str:
    try:
        data = path.read_bytes()
    except OSError as e:
        raise ReportInputError(f"{path}: cannot read reports ({e.strerror or e})") from e
    if path.suffix == ".gz":
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError) as e:
            raise ReportInputError(f"{path}: not a valid gzip file ({e})") from e
    try:
        return decode_utf8(data, path)
    except MflagError as e:
        raise ReportInputError(str(e)) from None


def _is_csv(path: Path, content: str) -> bool:
    suffixes = [s for s in path.suffixes if s != ".gz"]
    last = suffixes[-1].lower() if suffixes else ""
    if last in (".csv", ".tsv"):
        return True
    if last in (".jsonl", ".json", ".ndjson"):
        return False
    return not content.lstrip().startswith("{")


def iter_rows(path: str | Path, key_column: str, text_column: str) -> Iterator[tuple[int, str, str]]:
    """``(line, key, text)`` for each row of a JSONL or CSV/TSV file (optionally .gz).

    Raises ReportInputError naming the file and line for undecodable bytes, bad JSON, missing
    columns, or empty keys. A missing/null text becomes "" (the caller decides about empties).
    """
    path = Path(path)
    content = _decode(path)
    if _is_csv(path, content):
        delim = "\t" if ".tsv" in path.suffixes else ","
        reader = csv.DictReader(io.StringIO(content, newline=""), delimiter=delim)
        fields = reader.fieldnames or []
        for col in (key_column, text_column):
            if col not in fields:
                raise ReportInputError(f"{path}: no column {col!r} in header (columns: {', '.join(fields)})")
        prev = reader.line_num
        for row in reader:
            line, prev = prev + 1, reader.line_num
            yield line, _key(row.get(key_column), path, line), row.get(text_column) or ""
        return
    for line, raw in enumerate(content.split("\n"), 1):
        if not raw.strip():
            continue
        try:
            row = json.loads(raw)
        except json.JSONDecodeError as e:
            raise ReportInputError(f"{path}: line {line}: not valid JSON ({e.msg})") from e
        if not isinstance(row, dict):
            raise ReportInputError(f"{path}: line {line}: expected a JSON object")
        for col in (key_column, text_column):
            if col not in row:
                raise ReportInputError(f"{path}: line {line}: no field {col!r} "
                                       f"(fields: {', '.join(row)})")
        text = row[text_column]
        if text is not None and not isinstance(text, str):
            raise ReportInputError(f"{path}: line {line}: field {text_column!r} is not a string")
        yield line, _key(row[key_column], path, line), text or ""


def _key(value: Any, path: Path, line: int) -> str:
    key = "" if value is None else str(value).strip()
    if not key:
        raise ReportInputError(f"{path}: line {line}: empty key")
    if replace_surrogates(key)[1]:
        raise ReportInputError(f"{path}: line {line}: key {key!r} holds a lone UTF-16 surrogate (an escape such as "
                               "\\ud800 that encodes no character); fix the key")
    return key


def _short(text: str, n: int = 60) -> str:
    return repr(text if len(text) <= n else text[:n] + "...")


def text_hash(keys: Sequence[str], texts: Sequence[str]) -> str:
    """sha256 over the (key, text) pairs in key order: the texts part of the cache fingerprint."""
    h = hashlib.sha256()
    for k, t in zip(keys, texts):
        h.update(k.encode("utf-8") + b"\0" + t.encode("utf-8") + b"\0")
    return h.hexdigest()


def load_reports(path: str | Path, key_column: str = "study_id", text_column: str = "text",
                 on_empty: str = "skip") -> ReportSet:
    """Read and validate the reports: one text per key (identical repeats are merged), empty texts
    skipped (counted) or rejected per ``on_empty``; keys come back sorted."""
    by_key: dict[str, tuple[str, int]] = {}
    conflicts: list[str] = []
    empties: list[str] = []
    rows = repeats = 0
    surrogate_lines: list[int] = []
    for line, key, text in iter_rows(path, key_column, text_column):
        rows += 1
        text, n = replace_surrogates(text)  # no UTF-8 encoder (tokenizer, hash, HDF5) accepts a lone one
        if n:
            surrogate_lines.append(line)
        if key in by_key:
            old, old_line = by_key[key]
            if old == text:
                repeats += 1
            else:
                conflicts.append(f"key {key!r}: line {old_line} {_short(old)} vs line {line} {_short(text)}")
            continue
        by_key[key] = (text, line)
    if conflicts:
        more = f" (+{len(conflicts) - _LIST_MAX} more)" if len(conflicts) > _LIST_MAX else ""
        raise ReportInputError(f"{path}: {len(conflicts)} key(s) with two different texts: "
                               + "; ".join(conflicts[:_LIST_MAX]) + more)
    for key, (text, line) in by_key.items():
        if not text.strip():
            empties.append(f"{key!r} (line {line})")
    if empties and on_empty == "error":
        more = f" (+{len(empties) - _LIST_MAX} more)" if len(empties) > _LIST_MAX else ""
        raise ReportInputError(f"{path}: {len(empties)} report(s) with empty text: "
                               + ", ".join(empties[:_LIST_MAX]) + more
                               + "; use --on-empty skip to leave them out of the cache")
    keys = sorted(k for k, (t, _) in by_key.items() if t.strip())
    texts = [by_key[k][0] for k in keys]
    if empties:
        log.warning("%s: skipping %d report(s) with empty text", path, len(empties))
    if not keys:
        raise ReportInputError(f"{path}: no non-empty reports")
    stats = {"file": Path(path).name, "rows": rows, "keys": len(keys), "empty": len(empties),
             "repeated_rows": repeats, "distinct_texts": len(set(texts))}
    if surrogate_lines:  # only then: a finished cache's recorded stats stay as they were
        stats["surrogates_replaced"] = len(surrogate_lines)
        log.warning("%s: %d report(s) held lone UTF-16 surrogates (e.g. line %d), each replaced by U+FFFD; "
                    "counted in the cache's input stats", path, len(surrogate_lines), surrogate_lines[0])
    return ReportSet(keys, texts, text_hash(keys, texts), stats)
