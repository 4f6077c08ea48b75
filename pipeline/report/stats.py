"""Paired comparisons over seeds, for the report's verdicts.

A claim compares a measure of two methods (a downstream metric, an effective rank) over replicates
that share a seed: pre-training seed s of one variant against pre-training seed s of the other (same
data order and augmentation draws, same downstream label fraction), or against the downstream seed s
of an init that is not pre-trained. The unit is the per-seed difference d_s = a_s - b_s; its 95%
confidence interval is the paired t interval, mean(d) +/- t_{0.975, n-1} sd(d) / sqrt(n). With three
seeds t_{0.975, 2} = 4.30, so only differences several times the seed spread resolve; a bootstrap over
three pairs has only ten distinct resamples and would understate the uncertainty, so it is not used.

Verdicts: ``agrees`` (the interval excludes 0 on the side the paper claims), ``contradicts`` (it
excludes 0 on the other side), ``inconclusive`` (it covers 0, or fewer than two seed pairs, or a
pre-trained side has a single pre-training run so seed-to-seed variation of pre-training is unmeasured).
A comparison without a claimed direction (an open question) gets ``higher`` / ``lower`` /
``inconclusive``.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Mapping

CONFIDENCE = 0.95
METHOD = "paired t interval over seeds (95%)"


@dataclasses.dataclass(frozen=True)
class Paired:
    """The paired comparison of ``a`` against ``b`` on the seeds both have."""

    seeds: tuple[int, ...]
    values_a: tuple[float, ...]
    values_b: tuple[float, ...]
    diffs: tuple[float, ...]
    mean_a: float
    std_a: float
    mean_b: float
    std_b: float
    mean_diff: float
    ci_low: float
    ci_high: float

    @property
    def n(self) -> int:
        return len(self.seeds)

    def as_dict(self) -> dict:
        return {**dataclasses.asdict(self), "n": self.n, "method": METHOD}


def _mean_std(x: list[float]) -> tuple[float, float]:
    n = len(x)
    if n == 0:
        return math.nan, math.nan
    m = sum(x) / n
    return m, (math.sqrt(sum((v - m) ** 2 for v in x) / (n - 1)) if n > 1 else 0.0)


def t_quantile(df: int, confidence: float = CONFIDENCE) -> float:
    from scipy.stats import t

    return float(t.ppf(0.5 + confidence / 2, df))


def paired(a: Mapping[int, float], b: Mapping[int, float], confidence: float = CONFIDENCE) -> Paired | None:
    """Paired comparison on the seeds present (with finite values) in both ``a`` and ``b``;
    None when they share no seed. With one pair the interval is (nan, nan)."""
    seeds = tuple(sorted(s for s in a if s in b and _finite(a[s]) and _finite(b[s])))
    if not seeds:
        return None
    va, vb = [float(a[s]) for s in seeds], [float(b[s]) for s in seeds]
    d = [x - y for x, y in zip(va, vb)]
    ma, sa = _mean_std(va)
    mb, sb = _mean_std(vb)
    md, sd = _mean_std(d)
    if len(d) < 2:
        lo = hi = math.nan
    else:
        half = t_quantile(len(d) - 1, confidence) * sd / math.sqrt(len(d))
        lo, hi = md - half, md + half
    return Paired(seeds, tuple(va), tuple(vb), tuple(d), ma, sa, mb, sb, md, lo, hi)


def verdict(p: Paired | None, expect: str | None, min_pretrain_runs: int | None = None) -> tuple[str, str]:
    """(verdict, reason). ``expect``: "greater" (the paper claims a > b), "less", or None (no claimed
    direction). ``min_pretrain_runs``: the fewest pre-training runs behind a pre-trained side (None when
    neither side is pre-trained)."""
    if p is None:
        return "inconclusive", "no seed in common"
    if p.n < 2:
        return "inconclusive", "one seed pair"
    if min_pretrain_runs is not None and min_pretrain_runs < 2:
        return "inconclusive", "one pre-training run: its seed-to-seed variation is unmeasured"
    if p.ci_low <= 0 <= p.ci_high:
        return "inconclusive", "the 95% interval covers 0"
    sign = "greater" if p.ci_low > 0 else "less"
    if expect is None:
        return ("higher" if sign == "greater" else "lower"), "the 95% interval excludes 0"
    return ("agrees" if sign == expect else "contradicts"), "the 95% interval excludes 0"


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
