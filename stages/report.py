"""The pipeline report: results.md with the verdict on each claim of the paper (mean ± std, per-seed
paired differences, a 95% interval and a verdict; ``pipeline.report.stats``), the downstream table, the
collapse diagnostic (centred and uncentred effective ranks of zv and za with N and D), the size of the
loss terms and of their gradients on the shared trunk per variant, the orthogonality-weight sweep,
parameter counts and PNG plots.

Every number comes from the stage outputs it reads (train ``config.json``, ``summary.json``,
``metrics.jsonl``, ``spectrum.json``; eval ``results.json``); nothing is assumed. ``report.json``
holds the same numbers for programs.

Which comparisons are claims follows from the variants' configurations against the reference variant
(``reference``, M-FLAG): a variant that differs from it only in ``orth_weight`` = 0 tests the
orthogonality loss, only in ``align_weight`` = 0 the alignment loss, only in ``orth_weight`` > 0 is a
point of the weight sweep, only in ``orth_on`` or in the text mode with nothing unfrozen is an open
question (no direction claimed), and one that trains the text encoder's last layers tests the paper's
claim that unfreezing the language model collapses the image space. Every pre-trained variant is also
compared with ``baseline`` (random init) downstream.

The reading, the claims and the markdown are ``pipeline.report.build``; the intervals and verdicts
``pipeline.report.stats``; the figures ``pipeline.report.plots``.
"""
from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

from pipeline.common import ConfigError, atomic_open, save_config, write_json
from pipeline.report import build as reporting

log = logging.getLogger(__name__)

@dataclasses.dataclass(frozen=True)
class ReportConfig:
    """``trains``: (variant or ``variant:s<seed>``, train output folder); ``evals``: (stage name
    ``eval:<task>-<ds>:<init>[:s<seed>]``, eval output folder). ``baseline``: the init that pre-training
    is compared against; ``reference``: the variant the ablations are compared against (M-FLAG).
    ``see_also``: lines (markdown) put under the title, e.g. a link to another report."""

    out: str
    trains: tuple[tuple[str, str], ...] = ()
    evals: tuple[tuple[str, str], ...] = ()
    text_cache: str | None = None
    baseline: str = "random"
    reference: str = "mflag"
    title: str = "mflag pipeline results"
    see_also: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not self.trains and not self.evals:
            raise ConfigError("trains/evals: nothing to report")


@dataclasses.dataclass
class ReportResult:
    path: Path
    table: str
    data: dict


# --------------------------------------------------------------------------- the stage
def run(cfg: ReportConfig) -> ReportResult:
    """Write ``results.md``, ``report.json`` and the plots into ``cfg.out``."""
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    data = reporting.collect(cfg.trains, cfg.evals, cfg.baseline, cfg.reference)
    text = reporting.render(data, out, cfg.title, cfg.see_also)
    with atomic_open(out / "results.md", "w", encoding="utf-8") as fh:
        fh.write(text + "\n")
    write_json(out / "report.json", reporting.jsonable(data))
    save_config(cfg, out, stage="report")
    log.info("report: %s", out / "results.md")
    return ReportResult(out / "results.md", text, data)
