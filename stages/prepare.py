"""prepare: MIMIC-CXR-JPG images + reports -> webdataset shards, reports.jsonl and a manifest.

Output layout and record formats are in docs/DESIGN.md ("prepare -> shards"). The plan (which image
goes into which shard) is fixed before any decoding from the sorted image list, so shard content is
the same for any worker count and for a resumed run. Each finished shard gets a small done-record in
``OUT/.prepare-state/``; a rerun with the same fingerprint skips shards whose record matches, and a
rerun with another config refuses to touch OUT unless ``force``. Building blocks: ``pipeline.mimic``
reads the index and the report texts, ``pipeline.shards`` plans, encodes and writes the shards and
prepare-report.json.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.common import (
    ConfigError,
    MflagError,
    atomic_open,
    config_to_dict,
    file_sha256,
    fingerprint,
    progress,
    read_json,
    save_config,
    write_json,
)
from pipeline.imaging import DEFAULT_MAX_PIXELS
from pipeline.locks import output_lock
from pipeline.mimic import BadItem, CsvColumnError, MimicImage, load_index, study_texts
from pipeline.options import check_fields, option
from pipeline.shards import (
    IMAGE_EXT,
    EncodeResults,
    PrepareReport,
    Shard,
    TooManyBadItems,
    check_bad,
    done_record,
    encode_image,
    plan_shards,
    write_shard,
)

# encode_image and TooManyBadItems are re-exported: bench/ and tests import them from here.
__all__ = ["FORMAT_VERSION", "PrepareConfig", "PrepareResult", "TooManyBadItems", "encode_image", "run"]

log = logging.getLogger(__name__)

# Bumped when shard content for the same config changes, so old outputs are never mixed with new.
FORMAT_VERSION = 4
STATE_DIR = ".prepare-state"
_FORMATS = tuple(IMAGE_EXT)


@dataclass(frozen=True)
class PrepareConfig:
    """Options of ``prepare mimic`` (each field is the option of the same name, pipeline.options).
    ``reports`` defaults to ``root`` (reports extracted beside images)."""

    root: str = option(help="MIMIC-CXR-JPG root (holds files/ and the metadata/split CSVs, .csv or .csv.gz).",
                       exists="dir")
    out: str = option(help="Output folder.", path="dir")
    reports: str | None = option(None, exists="any",
                                 help="Reports folder (files/pNN/...) or mimic-cxr-reports.zip. Default: --root.")
    size: int = option(256, min=8, max=4096, help="Square output size in pixels.")
    views: tuple[str, ...] = option(("PA", "AP"), help="ViewPosition values to keep.")
    splits: tuple[str, ...] = option(("train", "validate", "test"), help="Splits to write.")
    image_format: str = option(
        "png", names=("--format",), choices=_FORMATS,
        help="Image encoding inside the shards: png (lossless, ~25 KiB per 256 px image), jpg (lossy, smallest), "
             "or raw (uint8 array as a .npy member: 64 KiB per 256 px image, no decode cost when training).")
    jpeg_quality: int = option(95, min=1, max=100, help="Quality for --format jpg.")
    shard_size: int = option(1000, min=1, help="Images per shard.")
    workers: int = option(default_factory=lambda: min(8, os.cpu_count() or 1), min=1, show_default="min(8, CPUs)",
                          help="Decoding processes (output does not depend on it).")
    text_sections: tuple[str, ...] = option(("impression", "findings"), help="Report sections to join, in this order.")
    section_separator: str = option(" ", show_default="one space", help="Text put between sections.")
    max_bad_fraction: float = option(0.01, min=0, max=1,
                                     help="Fail when more than this fraction of images is lost to bad input.")
    crop_border: bool = option(True, help="Crop the black border before scaling, as the original preprocessing did.")
    max_pixels: int = option(DEFAULT_MAX_PIXELS, min=1,
                             help="Images whose header declares more pixels are bad items, never decoded "
                                  "(memory bombs).")
    force: bool = option(False, negatable=False, help="Rebuild OUT even if it holds another config's outputs.")

    def __post_init__(self) -> None:
        def setf(name, value):
            object.__setattr__(self, name, value)

        setf("root", str(self.root))
        setf("out", str(self.out))
        setf("reports", str(self.reports) if self.reports is not None else self.root)
        setf("views", tuple(str(v).strip().upper() for v in self.views if str(v).strip()))
        setf("splits", tuple(str(s).strip().lower() for s in self.splits if str(s).strip()))
        setf("text_sections", tuple(str(s).strip().lower() for s in self.text_sections if str(s).strip()))
        setf("image_format", str(self.image_format).lower().replace("jpeg", "jpg"))
        check_fields(self)
        if not Path(self.root).is_dir():
            raise ConfigError(f"root: {self.root} is not a directory")
        if not Path(self.reports).exists():
            raise ConfigError(f"reports: {self.reports} does not exist")
        if not self.views:
            raise ConfigError("views: give at least one view position (e.g. PA,AP)")
        if not self.splits:
            raise ConfigError("splits: give at least one split (train, validate, test)")
        if not self.text_sections:
            raise ConfigError("text_sections: give at least one report section (e.g. impression,findings)")
        if self.max_pixels < self.size * self.size:
            raise ConfigError(f"max_pixels: {self.max_pixels} is below one {self.size}x{self.size} output image")

    def content_dict(self) -> dict:
        """The settings that change output content (not paths, workers, force or the bad-item limit)."""
        d = {k: v for k, v in config_to_dict(self).items()
             if k not in ("root", "out", "reports", "workers", "force", "max_bad_fraction")}
        if self.image_format != "jpg":
            d.pop("jpeg_quality")
        if self.max_pixels == DEFAULT_MAX_PIXELS:
            d.pop("max_pixels")  # outputs made before the limit existed stay valid at its default
        return d


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
def run(cfg: PrepareConfig) -> PrepareResult:
    """Prepare MIMIC-CXR-JPG into shards under ``cfg.out``; see the module docstring and DESIGN.md.

    Holds OUT's lock (``pipeline.locks``) throughout. A finished output of the same configuration and
    input is only re-checked (nothing is written, so read-only storage is fine)."""
    with output_lock(cfg.out, "prepare", allow_read_only=True) as lock:
        return _run(cfg, lock.writable, lock.require_writable)


def _run(cfg: PrepareConfig, writable: bool, require_writable) -> PrepareResult:
    out = Path(cfg.out)
    shards_dir, state_dir = out / "shards", out / STATE_DIR
    root = Path(cfg.root)
    report = PrepareReport(out, writable)
    _refuse_other_config(cfg, out)

    try:
        index = load_index(root, cfg.views, cfg.splits)
    except CsvColumnError as e:
        report.bad.append(BadItem("missing_column", str(e.path), str(e), {"column": e.column}))
        report.write(status="failed", error=str(e))
        raise
    for b in index.bad:
        report.add_bad(b)
    report.counts["metadata_rows"] = index.n_rows
    report.counts["filtered_view"] = sum(index.filtered["view"].values())
    report.counts["filtered_split"] = sum(index.filtered["split"].values())
    report.filtered = index.filtered
    images = index.images
    report.counts["images_selected"] = len(images)
    # Denominator of the bad fraction: every image that prepare was asked to consider.
    n_considered = len(images) + sum(1 for b in index.bad if b.reason in ("bad_csv_row", "no_split_row"))
    if not images:
        msg = (f"{index.metadata_csv}: no images with views {','.join(cfg.views)} in splits "
               f"{','.join(cfg.splits)} (filtered by view: {index.filtered['view']}, "
               f"by split: {index.filtered['split']})")
        report.write(status="failed", error=msg)
        raise MflagError(msg)

    # ---- report text per study
    by_study: dict[tuple[str, str], list[MimicImage]] = defaultdict(list)
    for img in images:
        by_study[(img.subject_id, img.study_id)].append(img)
    texts, n_no_report = study_texts(by_study, cfg.reports, cfg.text_sections, cfg.section_separator, report)
    n_bad_images = sum(1 for b in index.bad if b.reason in ("bad_csv_row", "no_split_row")) + n_no_report
    report.counts["studies_selected"] = len(by_study)
    report.counts["studies_with_text"] = len(texts)
    check_bad(cfg.max_bad_fraction, report, n_bad_images, n_considered, stage="reading reports")

    # ---- plan: shard assignment from the sorted image list, before any decoding
    plan = plan_shards(images, lambda i: (i.subject_id, i.study_id) in texts, cfg.splits, cfg.shard_size)
    if not plan:
        msg = f"no study among {len(by_study)} has usable report text in sections {','.join(cfg.text_sections)}"
        report.write(status="failed", error=msg)
        raise MflagError(f"{msg}; see {report.path}")
    plan_digest = fingerprint([[s.name, [i.dicom_id for i in s.items]] for s in plan], length=32)
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
        tasks = [(str(root / i.relpath), cfg.size, cfg.crop_border, cfg.image_format, cfg.jpeg_quality,
                  cfg.max_pixels, (i.rows, i.cols) if i.rows and i.cols else None) for s in pending for i in s.items]
        with EncodeResults(tasks, cfg.workers) as results, \
                progress(total=n_pending, desc="prepare", unit="img") as bar:
            for shard in pending:
                running_bad += write_shard(shard, results, shards_dir, state_dir, fp, cfg.root, cfg.image_format,
                                           bar)
                if running_bad > max_bad:
                    break  # the final check below reports it with every item named

    # ---- gather everything from the done-records (they cover resumed and fresh shards alike)
    splits: dict[str, dict] = {s: {"shards": [], "count": 0} for s in cfg.splits}
    sizes: dict[str, int] = {}
    shard_files: dict[str, dict] = {}  # what train-vision checks each tar against before reading it
    written_studies: set[tuple[str, str]] = set()
    study_of = {i.dicom_id: (i.subject_id, i.study_id) for s in plan for i in s.items}
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
    kept = sorted(written_studies, key=lambda k: (int(k[0]), int(k[1])))
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
        "reports": "reports.jsonl", "format_version": FORMAT_VERSION, "shard_files": shard_files,
    })
    report.write(status="ok")
    save_config(cfg, out, stage="prepare", fingerprint=fp)
    log.info("prepared %d images of %d studies into %d shards under %s (%d written, %d reused)",
             n_images, len(kept), len(sizes), shards_dir, len(pending), len(done))
    return PrepareResult(out, fp, splits, n_images, len(kept), len(pending), len(done), dict(report.counts))


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


def _refuse_other_config(cfg: PrepareConfig, out: Path) -> None:
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


def _claim_out(cfg: PrepareConfig, out: Path, fp: str) -> None:
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
