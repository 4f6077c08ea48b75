"""Embedding texts with a frozen text encoder, fast: distinct texts once, sorted by token length.

``embed_many(encoder, jobs, ...)`` yields one ``(emb, truncated, n_distinct)`` per job (a list of
texts). Within a job identical texts are embedded once (dedup), the distinct ones are sorted by token
length and cut into batches of at most ``token_budget`` padded tokens (``plan_batches``), padded only to
their longest member; a background thread tokenizes and collates ahead of the model. A job's result
depends only on its texts, so embed-text's shards are reproducible one by one.
"""
from __future__ import annotations

import queue
import threading
from typing import Any, Iterable, Iterator, Sequence

import numpy as np
import torch

from pipeline.text.models import TextEncoder


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
