"""embed-text: run the frozen report encoder once and cache every report's embedding in HDF5 shards.

Keys are sorted and cut into shards of ``shard_size``; shard i belongs to part ``i % parts`` (torchrun
ranks and ``--num-parts/--part`` combine). Each shard is embedded on its own (distinct texts once,
sorted by token length, batches padded only to their longest member, tokenized ahead in a
background thread) and written atomically, so a shard's bytes depend only on its reports: a killed
run resumes by skipping complete shards and ends identical to an uninterrupted one.

Building blocks: ``pipeline.text.reportfile`` reads the reports, ``pipeline.text.embedding`` runs the encoder
(dedup, length-sorted token-budget batches), ``cache.build`` checks, writes and indexes the shards.
"""
from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from pathlib import Path

from cache import writer
from cache.build import check_existing, finalize_index, is_cache_dir, write_shards
from cache.format import FORMAT_VERSION, INDEX_NAME, STORE_DTYPES, CacheError, shard_name
from pipeline.common import ConfigError, fingerprint, progress, save_config
from pipeline.distributed import barrier, cleanup, init_distributed, resolve_precision
from pipeline.locks import OutputLock, output_lock
from pipeline.options import check_fields, option
from pipeline.text.embedding import embed_many
from pipeline.text.models import DEFAULT_TEXT_MODEL, POOLINGS, TextEncoder, load_text_model, torch_dtype
from pipeline.text.reportfile import ReportInputError, ReportSet, load_reports

# ReportInputError is what the stage raises for a bad reports file: part of its interface.
__all__ = ["EmbedTextConfig", "EmbedTextResult", "ReportInputError", "content_key", "embed_file", "run"]

log = logging.getLogger(__name__)

DTYPES = ("auto", "fp32", "bf16", "fp16")
ON_EMPTY = ("skip", "error")


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
    device: str = option("auto", device=True, help="auto, cpu, cuda or cuda:N.")
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


# --------------------------------------------------------------------------- the stage
def content_key(encoder: TextEncoder, reports: ReportSet, config: EmbedTextConfig, dtype: str) -> dict:
    """Everything that determines the cache's bytes; its fingerprint names the cache folder."""
    return {"format": FORMAT_VERSION, "revision": encoder.revision, "config_hash": encoder.config_hash,
            "tokenizer_hash": encoder.tokenizer_hash, "pooling": config.pooling,
            "max_length": config.max_length, "dtype": dtype, "store_dtype": config.store_dtype,
            "text_hash": reports.text_hash, "shard_size": config.shard_size}


def embed_file(reports: Path, out: Path, *, model: str, pooling: str, max_length: int, dtype: str, device: str,
               shard_size: int) -> Path:
    """This stage as a function for other stages (eval's zero-shot prompts): embed the JSONL ``reports``
    (``key``, ``text``) into a float32 cache under ``out`` and return its folder. ``dtype`` is the compute
    dtype a training cache recorded ("auto" where it is not one of ``DTYPES``)."""
    return run(EmbedTextConfig(
        reports=str(reports), out=str(out), model=model, key_column="key", text_column="text", pooling=pooling,
        max_length=max_length, dtype=dtype if dtype in DTYPES else "auto", device=device, store_dtype="float32",
        shard_size=shard_size, on_empty="error")).cache_dir


def run(config: EmbedTextConfig) -> EmbedTextResult:
    """Embed every report of ``config.reports`` into ``config.out/<fingerprint>/`` (or into ``out``
    itself when it already is a cache folder); returns where the cache is and what was done."""

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
    cache_dir = out if is_cache_dir(out) else out / fp
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
            check_existing(cache_dir / shard_name(i), attrs, reports.keys[a:b])
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
            done = list(write_shards(stream, todo, spans, reports.keys, cache_dir, attrs,
                                     config.store_dtype, bar))
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
                save_config(config, cache_dir, stage="embed-text",
                            resolved={"device": device, "dtype": dtype, "token_budget": budget,
                                      "cache_dir": cache_dir})
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
