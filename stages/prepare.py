"""prepare: a corpus's images + reports -> webdataset shards, reports.jsonl and a manifest.

Output layout and record formats are in docs/DESIGN.md ("prepare -> shards"). The plan (which image
goes into which shard) is fixed before any decoding from the sorted image list, so shard content is
the same for any worker count and for a resumed run. Each finished shard gets a small done-record in
``OUT/.prepare-state/``; a rerun with the same fingerprint skips shards whose record matches, and a
rerun with another config refuses to touch OUT unless ``force``. Building blocks: the corpus's module
(``pipeline.corpora``: mimic, openi, chexpert-plus, pairs) reads the image list and the report texts
into one ``Selection``; ``pipeline.corpora.shards`` plans, encodes and writes the shards and prepare-report.json.
Everything after the read is the same for every corpus.
"""
from __future__ import annotations

import json
import logging
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.common import (
    MflagError,
    atomic_open,
    file_sha256,
    fingerprint,
    progress,
    read_json,
    save_config,
    write_json,
)
from pipeline.corpora import corpus_of
from pipeline.corpora.base import BadItem, CorpusError, CsvColumnError, ShardOptions, natural_key
from pipeline.corpora.mimic import MimicConfig
from pipeline.corpora.shards import (
    IMAGE_EXT,
    EncodeResults,
    PrepareReport,
    Shard,
    TooManyBadItems,
    check_bad,
    done_record,
    plan_shards,
    write_shard,
)
from pipeline.locks import output_lock

# TooManyBadItems is what the stage raises over --max-bad-fraction: part of its interface.
__all__ = ["FORMAT_VERSION", "PrepareConfig", "PrepareResult", "TooManyBadItems", "run"]

log = logging.getLogger(__name__)

# Bumped when shard content for the same config changes, so old outputs are never mixed with new.
FORMAT_VERSION = 4
STATE_DIR = ".prepare-state"


# ``prepare mimic``'s config keeps its old name: pipelines, benchmarks and tests build it from here.
PrepareConfig = MimicConfig


@dataclass
class PrepareResult:
    out: Path
    fingerprint: str
    splits: dict[str, dict]  # split -> {"shards": [...], "count": n}
    n_images: int
    n_studies: int
    shards_written: int
    shards_skipped: int
    counts: dict[str, int] = field(default_factory=dict)


# --------------------------------------------------------------------------- stage
def run(cfg: ShardOptions) -> PrepareResult:
    """Prepare the corpus of ``cfg`` (a ``pipeline.corpora`` config) into shards under ``cfg.out``; see the
    module docstring and DESIGN.md.

    Holds OUT's lock (``pipeline.locks``) throughout. A finished output of the same configuration and
    input is only re-checked (nothing is written, so read-only storage is fine)."""
    with output_lock(cfg.out, "prepare", allow_read_only=True) as lock:
        return _run(cfg, lock.writable, lock.require_writable)


def _run(cfg: ShardOptions, writable: bool, require_writable) -> PrepareResult:
    out = Path(cfg.out)
    shards_dir, state_dir = out / "shards", out / STATE_DIR
    report = PrepareReport(out, writable)
    _refuse_other_config(cfg, out)

    try:
        sel = corpus_of(cfg).load().read(cfg, report)
    except (CorpusError, CsvColumnError) as e:
        report.write(status="failed", error=str(e))
        raise
    texts, n_considered, n_bad_images = sel.texts, sel.n_considered, sel.n_bad
    check_bad(cfg.max_bad_fraction, report, n_bad_images, n_considered, stage="reading reports")

    # ---- plan: shard assignment from the sorted image list, before any decoding
    plan = plan_shards(sel.images, lambda i: (i.patient, i.study) in texts, cfg.splits, cfg.shard_size)
    if not plan:
        n_studies = len({(i.patient, i.study) for i in sel.images})
        msg = f"no study among {n_studies} has usable report text in {_text_source(cfg)}"
        report.write(status="failed", error=msg)
        raise MflagError(f"{msg}; see {report.path}")
    plan_digest = fingerprint([[s.name, [i.key for i in s.items]] for s in plan], length=32)
    fp = fingerprint({"version": FORMAT_VERSION, "config": cfg.content_dict(), "plan": plan_digest})
    finished = None if cfg.force else _finished(out, fp, plan)
    if finished is not None:
        log.info("%s already holds this prepare output (fingerprint %s); re-checked %d shards, nothing written",
                 out, fp, len(plan))
        return finished
    require_writable("prepare")
    _claim_out(cfg, out, fp)

    # ---- shards
    done, pending = [], []
    for shard in plan:
        rec = done_record(state_dir, shards_dir, shard, fp)
        (done if rec is not None else pending).append(shard)
    if done:
        log.info("resuming: %d of %d shards already complete", len(done), len(plan))
    n_pending = sum(len(s.items) for s in pending)
    max_bad = cfg.max_bad_fraction * n_considered
    prior_bad = sum(len(read_json(state_dir / f"{s.name}.json")["bad"]) for s in done)
    running_bad = n_bad_images + prior_bad
    if pending:
        channels = getattr(cfg, "channels", 1)
        # (rows, cols) where the corpus's metadata gives them (MIMIC), else None: only the minimum side
        tasks = [(str(sel.image_root / i.relpath), cfg.size, cfg.crop_border, cfg.image_format, cfg.jpeg_quality,
                  cfg.max_pixels, channels, i.expected_size) for s in pending for i in s.items]
        with EncodeResults(tasks, cfg.workers) as results, \
                progress(total=n_pending, desc="prepare", unit="img") as bar:
            for shard in pending:
                running_bad += write_shard(shard, results, shards_dir, state_dir, fp, str(sel.image_root),
                                           cfg.image_format, bar)
                if running_bad > max_bad:
                    break  # the final check below reports it with every item named

    # ---- gather everything from the done-records (they cover resumed and fresh shards alike)
    splits: dict[str, dict] = {s: {"shards": [], "count": 0} for s in cfg.splits}
    sizes: dict[str, int] = {}
    shard_files: dict[str, dict] = {}  # what train-vision checks each tar against before reading it
    written_studies: set[tuple[str, str]] = set()
    study_of = {i.key: (i.patient, i.study) for s in plan for i in s.items}
    for shard in plan:
        rec_path = state_dir / f"{shard.name}.json"
        if not rec_path.is_file():
            continue  # only after an early stop for too many bad items
        rec = read_json(rec_path)
        for b in rec["bad"]:
            report.add_bad(BadItem(b["reason"], b["where"], b["detail"],
                                   {k: b[k] for k in ("dicom_id", "subject_id", "study_id") if k in b}))
            n_bad_images += 1
        if rec["count"]:
            splits[shard.split]["shards"].append(shard.name)
            splits[shard.split]["count"] += rec["count"]
            sizes[shard.name] = rec["count"]
            tar = shards_dir / shard.name
            shard_files[shard.name] = {"count": rec["count"], "bytes": rec["bytes"],
                                       "sha256": rec.get("sha256") or file_sha256(tar)}
        written_studies.update(study_of[k] for k in rec["keys"])
    check_bad(cfg.max_bad_fraction, report, n_bad_images, n_considered, stage="decoding images")

    n_images = sum(sizes.values())
    empty_shards = [s.name for s in plan if s.name not in sizes]
    for name in empty_shards:  # every image of that shard was bad: no empty tar in the manifest
        (shards_dir / name).unlink(missing_ok=True)
    # natural_key orders digit-only ids (MIMIC's) as int() would, and any other id as well
    kept = sorted(written_studies, key=lambda k: (natural_key(k[0]), natural_key(k[1])))
    with atomic_open(out / "reports.jsonl", "w", encoding="utf-8") as fh:
        for subj, study in kept:
            text, used = texts[(subj, study)]
            fh.write(json.dumps({"study_id": study, "subject_id": subj, "text": text, "sections": used,
                                 "n_words": len(text.split())}, ensure_ascii=False) + "\n")
    report.counts.update(images_written=n_images, studies_written=len(kept),
                         studies_without_images=len(texts) - len(kept), shards=len(sizes))
    write_json(shards_dir / "sizes.json", sizes)
    write_json(out / "manifest.json", {
        "splits": splits, "image_format": cfg.image_format, "image_key": IMAGE_EXT[cfg.image_format],
        "size": cfg.size, "fingerprint": fp,
        "config": cfg.content_dict(), "n_images": n_images, "n_studies": len(kept),
        "reports": "reports.jsonl", "format_version": FORMAT_VERSION, **sel.manifest, "shard_files": shard_files,
    })
    report.write(status="ok")
    save_config(cfg, out, stage="prepare", fingerprint=fp)
    log.info("prepared %d images of %d studies into %d shards under %s (%d written, %d reused)",
             n_images, len(kept), len(sizes), shards_dir, len(pending), len(done))
    return PrepareResult(out, fp, splits, n_images, len(kept), len(pending), len(done), dict(report.counts))


def _text_source(cfg: ShardOptions) -> str:
    sections = getattr(cfg, "text_sections", None) or getattr(cfg, "text_column", ())
    return f"{'sections' if hasattr(cfg, 'text_sections') else 'columns'} {','.join(sections)}"


def _finished(out: Path, fp: str, plan: list[Shard]) -> PrepareResult | None:
    """The result of a complete earlier run with fingerprint ``fp`` (every shard's done-record and size
    match, the success files exist), read without writing anything; None otherwise."""
    shards_dir, state_dir = out / "shards", out / STATE_DIR
    if not all(p.is_file() for p in _outputs(out) + [shards_dir / "sizes.json"]):
        return None
    try:
        manifest = read_json(out / "manifest.json")
        stamp = read_json(state_dir / "fingerprint.json")
    except (MflagError, OSError):
        return None
    if manifest.get("fingerprint") != fp or stamp.get("fingerprint") != fp or \
            manifest.get("format_version") != FORMAT_VERSION:
        return None
    if "shard_files" not in manifest:  # written before shard digests: the rerun adds them, encoding nothing
        return None
    if any(done_record(state_dir, shards_dir, shard, fp) is None for shard in plan):
        return None
    try:
        counts = read_json(out / "prepare-report.json").get("counts", {})
    except (MflagError, OSError):
        counts = {}
    return PrepareResult(out, fp, manifest["splits"], int(manifest["n_images"]), int(manifest["n_studies"]), 0,
                         len(plan), dict(counts))


def _outputs(out: Path) -> list[Path]:
    return [out / n for n in ("manifest.json", "reports.jsonl", "prepare-report.json", "config.json")]


def _previous(out: Path) -> tuple[dict | None, bool]:
    """The fingerprint stamp of an earlier run in OUT, and whether OUT holds shards made otherwise."""
    shards_dir, stamp = out / "shards", out / STATE_DIR / "fingerprint.json"
    previous = read_json(stamp) if stamp.is_file() else None
    foreign = previous is None and ((shards_dir.is_dir() and any(shards_dir.glob("*.tar")))
                                    or (out / "manifest.json").exists())
    return previous, foreign


def _refuse_other_config(cfg: ShardOptions, out: Path) -> None:
    """Fail early, before writing anything, when OUT holds another config's outputs (unless force)."""
    if cfg.force:
        return
    previous, foreign = _previous(out)
    if foreign:
        raise MflagError(f"{out}: holds shards or a manifest not made by this prepare run "
                         f"(no {STATE_DIR}/fingerprint.json); use --force to rebuild, or choose another --out")
    if previous is not None:
        old, new = previous.get("config", {}), cfg.content_dict()
        diff = [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in sorted(set(old) | set(new))
                if old.get(k) != new.get(k)]
        if diff:
            raise MflagError(f"{out}: was prepared with a different config ({'; '.join(diff)}); "
                             f"use --force to rebuild, or choose another --out")


def _claim_out(cfg: ShardOptions, out: Path, fp: str) -> None:
    """Make OUT ours for fingerprint ``fp``: refuse another config's or input's outputs unless ``force``."""
    shards_dir, state_dir = out / "shards", out / STATE_DIR
    stamp = state_dir / "fingerprint.json"
    previous, foreign = _previous(out)
    mismatch = previous is not None and previous.get("fingerprint") != fp
    if cfg.force:
        if previous is not None or foreign or shards_dir.exists():
            log.info("--force: removing previous prepare outputs in %s", out)
        for p in _outputs(out):
            p.unlink(missing_ok=True)
        if state_dir.exists():
            shutil.rmtree(state_dir)
        if shards_dir.exists():
            for p in list(shards_dir.glob("*.tar")) + [shards_dir / "sizes.json"]:
                p.unlink(missing_ok=True)
    elif foreign or mismatch:
        _refuse_other_config(cfg, out)  # names the differing settings when the config changed
        old_version = (previous or {}).get("format_version")
        if previous is not None and old_version != FORMAT_VERSION:
            raise MflagError(f"{out}: was prepared by another version of prepare (shard format {old_version}, "
                             f"now {FORMAT_VERSION}); use --force to rebuild, or choose another --out")
        raise MflagError(f"{out}: was prepared from different input data (the image list or reports "
                         f"changed since); use --force to rebuild, or choose another --out")
    # Temp files of a killed run (atomic_path leaves them only on SIGKILL) are never valid shards.
    for tmp in shards_dir.glob(".*.tmp") if shards_dir.exists() else ():
        tmp.unlink(missing_ok=True)
    # A previous run's success files are rewritten at the end; remove them now so a crash in
    # between never leaves a manifest describing shards that are being rebuilt.
    for p in _outputs(out) + [shards_dir / "sizes.json"]:
        p.unlink(missing_ok=True)
    write_json(stamp, {"fingerprint": fp, "config": cfg.content_dict(), "format_version": FORMAT_VERSION})
