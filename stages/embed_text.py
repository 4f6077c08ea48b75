"""embed-text: run the frozen report encoder once and cache every report's embedding in HDF5 shards.

Keys are sorted and cut into shards of ``shard_size``; shard i belongs to part ``i % parts`` (torchrun
ranks and ``--num-parts/--part`` combine). Each shard is embedded on its own (distinct texts once,
sorted by token length, batches padded only to their longest member, tokenized ahead in a
background thread) and written atomically, so a shard's bytes depend only on its reports: a killed
run resumes by skipping complete shards and ends identical to an uninterrupted one.
"""
from __future__ import annotations

import contextlib
import csv
import errno
import gzip
import hashlib
import io
import json
import logging
import queue
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import numpy as np
import torch

from cache import writer
from cache.format import (
    FORMAT_VERSION,
    INDEX_NAME,
    SHARD_RE,
    STORE_DTYPES,
    CacheError,
    CacheMismatchError,
    content_hash,
    shard_name,
)
from pipeline.common import (ConfigError, MflagError, canonical_json, file_sha256, fingerprint, progress,
                             save_config)
from pipeline.distributed import resolve_precision
from pipeline.locks import OutputLock, output_lock
from pipeline.options import check_fields, option
from pipeline.textmodels import DEFAULT_TEXT_MODEL, POOLINGS, TextEncoder, load_text_model, torch_dtype

log = logging.getLogger(__name__)

DTYPES = ("auto", "fp32", "bf16", "fp16")
ON_EMPTY = ("skip", "error")
# Attributes a resumed run must share with the shards already on disk.
# Not model_id: the same weights in a moved or copied folder (another mount) are the same model, which
# revision, config_hash and tokenizer_hash already pin.
RESUME_ATTRS = ("fingerprint", "revision", "dim", "pooling", "max_length", "dtype",
                "store_dtype", "config_hash", "tokenizer_hash")
_LIST_MAX = 10


class ReportInputError(MflagError):
    """The reports file is unreadable or its rows are bad (the message names file, line and key)."""


@dataclass(frozen=True)
class EmbedTextConfig:
    """Options of ``embed-text`` (each field is the option of the same name, pipeline.options);
    ``out`` gets a ``<fingerprint>/`` cache folder."""

    reports: str = option(help="reports.jsonl from prepare, or any CSV/JSONL file.")
    out: str = option(help="Cache root; the cache goes to OUT/<fingerprint>/.")
    model: str = option(DEFAULT_TEXT_MODEL, help="Hub id or local model directory (offline: a local directory).")
    key_column: str = option("study_id",
                             help="Column (CSV) or field (JSONL) holding the key a training sample is joined on.")
    text_column: str = option("text", help="Column or field holding the report text.")
    pooling: str = option("cls", choices=POOLINGS,
                          help="cls = last_hidden_state[:, 0]; proj = CXR-BERT-specialized projection head.")
    max_length: int = option(512, min=2, max=65536, help="Tokens per report (truncation counted).")
    dtype: str = option("auto", choices=DTYPES, help="Compute dtype; auto = fp16 on CUDA, fp32 on CPU.")
    device: str = option("auto", help="auto, cpu, cuda or cuda:N.")
    token_budget: int | None = option(None, min=1, show_default="8192 CPU, 65536 CUDA",
                                      help="Padded tokens per batch.")
    store_dtype: str = option("float16", choices=STORE_DTYPES,
                              help="Precision of the stored embeddings (float16 halves the cache; lookups return "
                                   "float32).")
    shard_size: int = option(50_000, min=1, help="Reports per HDF5 shard.")
    on_empty: str = option("skip", choices=ON_EMPTY,
                           help="A row with empty text: leave it out of the cache (counted) or stop.")
    num_parts: int = option(1, min=1,
                            help="Split the work across machines; the run that finishes the last part writes "
                                 "index.json.")
    part: int = option(0, min=0, help="Which part this run embeds (0-based).")

    def __post_init__(self) -> None:
        object.__setattr__(self, "reports", str(self.reports))
        object.__setattr__(self, "out", str(self.out))
        check_fields(self)
        if not (self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:")):
            raise ConfigError(f"device: must be auto, cpu, cuda or cuda:N, got {self.device!r}")
        if not self.part < self.num_parts:
            raise ConfigError(f"part: must be in [0, {self.num_parts - 1}], got {self.part}")
        if not self.key_column or not self.text_column:
            raise ConfigError("key_column/text_column: must not be empty")


@dataclass(frozen=True)
class EmbedTextResult:
    cache_dir: Path
    complete: bool          # index.json written (all shards present)
    count: int              # keys in the whole cache
    dim: int
    n_shards: int
    shards_written: int     # by this process
    shards_skipped: int     # by this process, already complete on disk
    n_embedded: int         # distinct texts run through the model by this process
    n_empty: int
    n_truncated: int        # keys truncated at max_length in the shards this process wrote


# --------------------------------------------------------------------------- input
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
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        col = e.start - (data.rfind(b"\n", 0, e.start) + 1) + 1
        raise ReportInputError(f"{path}: line {line}: not valid UTF-8 "
                               f"(byte 0x{data[e.start]:02x} at column {col})") from e
    return text.removeprefix("\ufeff")


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
    for line, key, text in iter_rows(path, key_column, text_column):
        rows += 1
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
    return ReportSet(keys, texts, text_hash(keys, texts), stats)


# --------------------------------------------------------------------------- the embedding path
def tokenize(tokenizer: Any, texts: Sequence[str], max_length: int) -> tuple[list[list[int]], np.ndarray]:
    """Token ids truncated to ``max_length`` (special tokens included) and a truncated-or-not mask."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        # A private copy: the shared tokenizer's truncation/padding state is left untouched, and
        # encode_batch runs in Rust without the GIL, so this overlaps with the model thread.
        from tokenizers import Tokenizer

        tok = Tokenizer.from_str(backend.to_str())
        tok.no_padding()
        tok.enable_truncation(max_length=max_length)
        encs = tok.encode_batch(list(texts), add_special_tokens=True)
        return [e.ids for e in encs], np.array([bool(e.overflowing) for e in encs], dtype=bool)
    full = tokenizer(list(texts), truncation=False)["input_ids"]
    ids = tokenizer(list(texts), truncation=True, max_length=max_length)["input_ids"]
    return ids, np.array([len(f) > max_length for f in full], dtype=bool)


def plan_batches(lengths: Sequence[int], token_budget: int) -> list[np.ndarray]:
    """Indices sorted by length (ties by position), cut so that rows x longest <= token_budget."""
    lengths = np.asarray(lengths)
    order = np.argsort(lengths, kind="stable")
    batches, start = [], 0
    for end in range(1, len(order) + 1):
        if end == len(order) or (end + 1 - start) * lengths[order[end]] > token_budget:
            batches.append(order[start:end])
            start = end
    return batches


def _collate(ids: Sequence[list[int]], rows: np.ndarray, pad_id: int, pin: bool):
    width = max(len(ids[i]) for i in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for j, i in enumerate(rows):
        n = len(ids[i])
        input_ids[j, :n] = torch.tensor(ids[i], dtype=torch.long)
        mask[j, :n] = 1
    if pin:
        input_ids, mask = input_ids.pin_memory(), mask.pin_memory()
    return input_ids, mask


_DONE = object()


def _producer(jobs: Iterable[Sequence[str]], tokenizer, max_length, budget, pad_id, pin, q, stop):
    def put(item) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.2)
                return True
            except queue.Full:
                continue
        return False

    try:
        for texts in jobs:
            first: dict[str, int] = {}
            inverse = np.array([first.setdefault(t, len(first)) for t in texts], dtype=np.int64)
            distinct = list(first)
            ids, truncated = tokenize(tokenizer, distinct, max_length)
            batches = plan_batches([len(x) for x in ids], budget)
            if not put(("start", len(distinct), inverse, truncated)):
                return
            for rows in batches:
                rows_t = torch.from_numpy(rows)
                if not put(("batch", rows_t.pin_memory() if pin else rows_t, *_collate(ids, rows, pad_id, pin))):
                    return
            if not put(("end",)):
                return
        put(_DONE)
    except BaseException as e:  # handed to the consumer, which re-raises it in the main thread
        put(("error", e))


def embed_many(encoder: TextEncoder, jobs: Iterable[Sequence[str]], pooling: str = "cls",
               max_length: int = 512, token_budget: int = 8192, device: str = "cpu",
               prefetch: int = 8) -> Iterator[tuple[np.ndarray, np.ndarray, int]]:
    """For each job (a list of texts), yield ``(emb float32 (n, D), truncated bool (n,), n_distinct)``.

    Identical texts within a job are embedded once. A background thread tokenizes and collates the
    next batches (and jobs) while the model runs; each job's result depends only on its texts.
    """
    dev = torch.device(device)
    pad_id = encoder.tokenizer.pad_token_id
    pad_id = 0 if pad_id is None else int(pad_id)
    q: queue.Queue = queue.Queue(maxsize=prefetch)
    stop = threading.Event()
    worker = threading.Thread(target=_producer, daemon=True, name="embed-tokenize",
                              args=(jobs, encoder.tokenizer, max_length, token_budget, pad_id,
                                    dev.type == "cuda", q, stop))
    worker.start()
    dim = encoder.dim(pooling)
    try:
        with torch.inference_mode():
            out = inverse = truncated = None
            while True:
                item = q.get()
                if item is _DONE:
                    return
                kind = item[0]
                if kind == "error":
                    raise item[1]
                if kind == "start":
                    _, n_distinct, inverse, truncated = item
                    out = torch.empty((n_distinct, dim), dtype=torch.float32, device=dev)
                elif kind == "batch":
                    _, rows, input_ids, mask = item
                    emb = encoder.pool(input_ids.to(dev, non_blocking=True),
                                       mask.to(dev, non_blocking=True), pooling)
                    out[rows.to(dev, non_blocking=True)] = emb
                else:
                    distinct = out.cpu().numpy()
                    yield distinct[inverse], truncated[inverse], len(distinct)
    finally:
        stop.set()
        worker.join(timeout=5)


def embed_texts(encoder: TextEncoder, texts: Sequence[str], **kwargs: Any) -> tuple[np.ndarray, np.ndarray]:
    """``embed_many`` for one list of texts: ``(emb float32 (n, D), truncated bool (n,))``."""
    emb, truncated, _ = next(embed_many(encoder, [texts], **kwargs))
    return emb, truncated


# --------------------------------------------------------------------------- the stage
def content_key(encoder: TextEncoder, reports: ReportSet, config: EmbedTextConfig, dtype: str) -> dict:
    """Everything that determines the cache's bytes; its fingerprint names the cache folder."""
    return {"format": FORMAT_VERSION, "revision": encoder.revision, "config_hash": encoder.config_hash,
            "tokenizer_hash": encoder.tokenizer_hash, "pooling": config.pooling,
            "max_length": config.max_length, "dtype": dtype, "store_dtype": config.store_dtype,
            "text_hash": reports.text_hash, "shard_size": config.shard_size}


def _is_cache_dir(path: Path) -> bool:
    return path.is_dir() and ((path / INDEX_NAME).is_file()
                              or any(SHARD_RE.match(p.name) for p in path.iterdir()))


def _check_existing(path: Path, attrs: dict, keys: Sequence[str]) -> None:
    """An existing shard must come from this very configuration; otherwise stop, touching nothing."""
    try:
        have_keys, _, have = writer.read_shard(path, with_emb=False)
    except Exception as e:
        raise CacheError(f"{path}: existing shard is unreadable ({e}); delete it and rerun") from e
    diffs = [f"{n}={have.get(n)!r} (this run: {attrs[n]!r})" for n in RESUME_ATTRS
             if have.get(n) != attrs[n]]
    if diffs:
        raise CacheMismatchError(f"{path}: written by a different configuration: " + ", ".join(diffs)
                                 + "; nothing was overwritten; choose another --out or delete "
                                 + str(path.parent))
    if have_keys != list(keys):
        raise CacheMismatchError(f"{path}: holds other keys than this run plans for it; nothing was "
                                 f"overwritten; choose another --out or delete {path.parent}")


def _remove_stale_temps(cache_dir: Path, name: str) -> None:
    # Left by a killed run; only this part ever writes shard ``name``, so they are ours to remove.
    for tmp in cache_dir.glob(f".{name}.*.tmp"):
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def finalize_index(cache_dir: Path, n_shards: int, attrs: dict, extra: dict,
                   writable: bool = True) -> bool:
    """Make index.json describe the ``n_shards`` shards once all exist; returns whether the cache is
    complete. Every shard is read back and hashed; an index.json that already says exactly that is left
    as it is (a rerun of a finished cache only re-checks it, also on read-only storage)."""
    paths = [cache_dir / shard_name(i) for i in range(n_shards)]
    if not all(p.is_file() for p in paths):
        return False
    entries, n_trunc = [], 0
    for p in paths:
        keys, emb, shard_attrs = writer.read_shard(p)
        entries.append({"name": p.name, "count": len(keys), "sha256": file_sha256(p),
                        "content_hash": content_hash(keys, emb)})
        n_trunc += int(shard_attrs.get("n_truncated", 0))
    index_attrs = {**attrs, "n_truncated": n_trunc,
                   "truncation": {"max_length": attrs["max_length"], "n_truncated": n_trunc,
                                  "fraction": n_trunc / max(attrs["count"], 1)},
                   **extra}
    if _index_matches(cache_dir, entries, attrs["dim"], index_attrs):
        log.info("embed-text: %s is complete and its index matches every shard; nothing rewritten", cache_dir)
        return True
    if not writable:
        raise CacheError(f"{cache_dir / INDEX_NAME}: missing or out of date, and {cache_dir} is not writable; "
                         "run embed-text where the cache can be written")
    writer.write_index(cache_dir, entries, attrs["dim"], index_attrs)
    return True


def _index_matches(cache_dir: Path, entries: list[dict], dim: int, index_attrs: dict) -> bool:
    """index.json exists and lists exactly ``entries`` with these attributes (JSON-normalised)."""
    path = cache_dir / INDEX_NAME
    if not path.is_file():
        return False
    try:
        have = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    want = json.loads(canonical_json({"shards": entries, "dim": dim, "attrs": index_attrs}))
    return (have.get("shards") == want["shards"] and have.get("dim") == want["dim"]
            and all(have.get("attrs", {}).get(k) == v for k, v in want["attrs"].items()))


def _write_shards(stream, todo, spans, reports, cache_dir, attrs, config, bar):
    """Write each embedded shard as it arrives; yields ``(n_distinct, n_truncated)`` per shard."""
    for i, (emb, truncated, n_distinct) in zip(todo, stream):
        a, b = spans[i]
        name = cache_dir / shard_name(i)
        _remove_stale_temps(cache_dir, name.name)
        shard_attrs = {**attrs, "shard": i, "n_truncated": int(truncated.sum())}
        with np.errstate(over="ignore"):  # overflow is checked for right below, by key
            stored = emb.astype(config.store_dtype)
        bad = ~(np.isfinite(emb).all(axis=1) & np.isfinite(stored).all(axis=1))
        if bad.any():
            keys = [reports.keys[a + j] for j in np.flatnonzero(bad)[:5]]
            raise CacheError(
                f"{name}: {int(bad.sum())} embedding(s) are not finite after the {attrs['dtype']} forward and "
                f"the {config.store_dtype} store (keys {', '.join(keys)}); nothing was written for this shard. "
                "Use --dtype fp32 (and --store-dtype float32 if values exceed 65504), then rerun to resume")
        try:
            writer.write_shard(name, reports.keys[a:b], stored, shard_attrs)
        except OSError as e:
            fix = "free space and rerun" if e.errno in (errno.ENOSPC, errno.EDQUOT) else "fix that and rerun"
            raise CacheError(f"{name}: cannot write shard ({e}); no partial shard was left; {fix} to "
                             "resume") from e
        bar.update(b - a)
        yield n_distinct, int(truncated.sum())


def run(config: EmbedTextConfig) -> EmbedTextResult:
    """Embed every report of ``config.reports`` into ``config.out/<fingerprint>/`` (or into ``out``
    itself when it already is a cache folder); returns where the cache is and what was done."""
    from pipeline.distributed import barrier, cleanup, init_distributed

    # cuda:N is validated against the visible GPUs and becomes the current device (so pinned copies and
    # anything that says just "cuda" use it); under torchrun each rank takes its LOCAL_RANK GPU.
    dist = init_distributed(config.device)
    device = dist.device
    # One run per --out (rank 0 locks for the whole job); parts of a split run lock only their part,
    # so they may run side by side. Temp files of another live run are never touched this way.
    scope = f"part-{config.part}-of-{config.num_parts}" if config.num_parts > 1 else None
    try:
        with output_lock(config.out, "embed-text", dist=dist, scope=scope, allow_read_only=True) as lock:
            return _run(config, device, dist, barrier, lock)
    finally:
        cleanup(dist)


def _run(config: EmbedTextConfig, device: str, dist, barrier, lock: OutputLock | None = None) -> EmbedTextResult:
    lock = lock or OutputLock(Path(config.out), None)  # called without run(): the caller owns the folder
    reports = load_reports(config.reports, config.key_column, config.text_column, config.on_empty)
    dtype = resolve_precision(config.dtype, device, cuda_auto="fp16", field="dtype", cpu_fp16="warn")
    encoder = load_text_model(config.model, config.pooling, device=device, dtype=torch_dtype(dtype))
    if config.max_length > encoder.max_positions:
        raise ConfigError(f"max_length: {config.max_length} exceeds the model's "
                          f"{encoder.max_positions} positions")
    budget = config.token_budget or (65536 if device.startswith("cuda") else 8192)
    fp = fingerprint(content_key(encoder, reports, config, dtype))
    out = Path(config.out)
    cache_dir = out if _is_cache_dir(out) else out / fp
    if not cache_dir.is_dir():
        lock.require_writable("embed-text (a new cache)")
        cache_dir.mkdir(parents=True, exist_ok=True)
    dim = encoder.dim(config.pooling)
    attrs = writer.cache_attrs(dim, len(reports.keys), config.store_dtype, {
        "model_id": encoder.model_id, "revision": encoder.revision, "model_kind": encoder.kind,
        "config_hash": encoder.config_hash, "tokenizer_hash": encoder.tokenizer_hash,
        "pooling": config.pooling, "max_length": config.max_length, "dtype": dtype,
        "text_hash": reports.text_hash, "fingerprint": fp, "shard_size": config.shard_size,
        "text_encoder_params": encoder.n_params, "key_column": config.key_column,
    })

    n_shards = -(-len(reports.keys) // config.shard_size)
    # Shards go to parts first (i % num_parts), then a part's shards to its ranks: parts may run with
    # different numbers of processes (an 8-GPU and a 4-GPU machine) and still cover every shard once.
    own = [i for i in range(n_shards) if i % config.num_parts == config.part][dist.rank::dist.world_size]
    spans = [(i * config.shard_size, min((i + 1) * config.shard_size, len(reports.keys)))
             for i in range(n_shards)]
    # Every shard already on disk is checked before anything is written.
    for i, (a, b) in enumerate(spans):
        if (cache_dir / shard_name(i)).is_file():
            _check_existing(cache_dir / shard_name(i), attrs, reports.keys[a:b])
    todo = [i for i in own if not (cache_dir / shard_name(i)).is_file()]
    skipped = len(own) - len(todo)
    if todo:
        lock.require_writable(f"embed-text ({len(todo)} shard(s) to write)")
    log.info("embed-text: %d reports (%d distinct texts), %d shards, this part writes %d (%d done) "
             "-> %s", len(reports.keys), reports.stats["distinct_texts"], n_shards, len(todo),
             skipped, cache_dir)

    jobs = (reports.texts[spans[i][0]:spans[i][1]] for i in todo)
    with progress(total=sum(spans[i][1] - spans[i][0] for i in todo), desc="embed-text",
                  unit="report") as bar:
        results = contextlib.closing(embed_many(encoder, jobs, config.pooling, config.max_length,
                                                budget, device))
        with results as stream:
            done = list(_write_shards(stream, todo, spans, reports, cache_dir, attrs, config, bar))
    n_embedded = sum(d for d, _ in done)
    n_truncated = sum(t for _, t in done)
    if n_truncated:
        log.info("embed-text: %d reports truncated at %d tokens", n_truncated, config.max_length)

    barrier(dist)
    if dist.is_main:
        extra = {"input": reports.stats}
        try:
            wrote_index = finalize_index(cache_dir, n_shards, attrs, extra, writable=lock.writable)
        except OSError as e:
            raise CacheError(f"{cache_dir / INDEX_NAME}: cannot write the index ({e}); "
                             "the shards are complete: rerun to finish") from e
        if wrote_index:
            if lock.writable:
                save_config(config, cache_dir, resolved={"device": device, "dtype": dtype,
                                                         "token_budget": budget, "cache_dir": cache_dir})
            log.info("embed-text: cache complete: %s", cache_dir)
        else:
            log.info("embed-text: part %d/%d done; index.json is written when all parts are done",
                     config.part, config.num_parts)
    barrier(dist)
    complete = (cache_dir / INDEX_NAME).is_file()
    return EmbedTextResult(cache_dir=cache_dir, complete=complete, count=len(reports.keys), dim=dim,
                           n_shards=n_shards, shards_written=len(todo), shards_skipped=skipped,
                           n_embedded=n_embedded, n_empty=reports.stats["empty"],
                           n_truncated=n_truncated)
