"""PNG plots for the pipeline report: loss curves, singular-value spectra, metric by method."""
from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

from pipeline.common import atomic_path


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only; never needs a display
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    return path


def loss_curves(curves: Mapping[str, Mapping[str, Sequence[tuple[int, float]]]], path: Path) -> Path:
    """``curves[variant][loss name] = [(step, value), ...]``; one panel per loss name."""
    plt = _pyplot()
    names = sorted({k for c in curves.values() for k in c})
    fig, axes = plt.subplots(1, len(names), figsize=(4.2 * len(names), 3.2), squeeze=False)
    for ax, name in zip(axes[0], names):
        for variant, c in curves.items():
            pts = c.get(name) or []
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], label=variant)
        ax.set_title(name)
        ax.set_xlabel("step")
        if name.endswith("orth"):
            ax.set_yscale("symlog")
        ax.legend(fontsize=8)
    fig.tight_layout()
    out = _save(fig, path)
    plt.close(fig)
    return out


def spectra(spectra_by_variant: Mapping[str, Sequence[float]], path: Path) -> Path:
    """Normalised singular values of zv on the held-out probe batch, log scale."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    for variant, sv in spectra_by_variant.items():
        total = float(sum(sv)) or 1.0
        ax.plot(range(1, len(sv) + 1), [s / total for s in sv], label=variant)
    ax.set_yscale("log")
    ax.set_xlabel("singular value index")
    ax.set_ylabel("share of the sum")
    ax.set_title("zv singular-value spectrum (held-out batch)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    out = _save(fig, path)
    plt.close(fig)
    return out


def metric_bars(rows: Mapping[str, Mapping[str, tuple[float, float] | None]], metric_names: Mapping[str, str],
                path: Path) -> Path:
    """``rows[task label][method] = (mean, std)``; one panel per task, bars by method."""
    plt = _pyplot()
    tasks = list(rows)
    fig, axes = plt.subplots(1, max(1, len(tasks)), figsize=(4.0 * max(1, len(tasks)), 3.2), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        methods = [m for m, v in rows[task].items() if v is not None]
        means = [rows[task][m][0] for m in methods]
        stds = [rows[task][m][1] for m in methods]
        ax.bar(range(len(methods)), means, yerr=stds, capsize=4, color="#4c72b0")
        ax.set_xticks(range(len(methods)), methods, rotation=20, fontsize=8)
        ax.set_title(f"{task}\n{metric_names.get(task, '')}", fontsize=9)
    fig.tight_layout()
    out = _save(fig, path)
    plt.close(fig)
    return out
