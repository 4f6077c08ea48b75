"""PNG plots for the pipeline report: loss curves, singular-value spectra, metric by method."""
from __future__ import annotations

from pathlib import Path
from typing import Collection, Mapping, Sequence

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


def loss_curves(curves: Mapping[str, Mapping[str, Sequence[tuple[int, float]]]], path: Path,
                symlog: Collection[str] = ("orth",)) -> Path:
    """``curves[variant][loss name] = [(step, value), ...]``; one panel per loss name, on a symlog axis
    for the names in ``symlog`` (values over orders of magnitude)."""
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
        if name in symlog:
            ax.set_yscale("symlog")
        ax.legend(fontsize=8)
    fig.tight_layout()
    out = _save(fig, path)
    plt.close(fig)
    return out


def spectra(spectra_by_variant: Mapping[str, Sequence[Mapping]], path: Path) -> Path:
    """``spectra_by_variant[variant] = [spectrum of one run, ...]`` where a run's spectrum is
    ``{"zv": {"centred": [...], "uncentred": [...], "n", "dim"}, "za": {...}}`` (pipeline.pretrain.probes.spectrum).
    Four panels (zv / za x centred / uncentred), one line per variant: the singular values divided by
    their sum (so runs whose features differ in scale compare by shape), averaged over the variant's
    runs, log scale, as Jing et al. (ICLR 2022) plot the embedding spectrum."""
    plt = _pyplot()
    fig, axes = plt.subplots(2, 2, figsize=(11, 7), squeeze=False)
    for row, z in enumerate(("zv", "za")):
        for col, kind in enumerate(("centred", "uncentred")):
            ax = axes[row][col]
            size = None
            for variant, runs in spectra_by_variant.items():
                curves = [run[z][kind] for run in runs if z in run and run[z].get(kind)]
                if not curves:
                    continue
                k = min(len(c) for c in curves)
                shares = [[v / (sum(c) or 1.0) for v in c[:k]] for c in curves]
                mean = [sum(col_) / len(col_) for col_ in zip(*shares)]
                # a centred matrix has rank <= N - 1: its last value is round-off, left out of a log plot
                mean = [m for m in mean if m > 1e-12]
                ax.plot(range(1, len(mean) + 1), mean, label=variant, linewidth=1.2)
                size = (runs[0][z].get("n"), runs[0][z].get("dim"))
            ax.set_yscale("log")
            ax.set_xlabel("singular value index")
            ax.set_ylabel("share of the sum")
            title = f"{z} {kind}" + (" (primary)" if kind == "centred" else "")
            if size:
                title += f", N={size[0]}, D={size[1]}"
            ax.set_title(title, fontsize=9)
    handles, labels = axes[0][0].get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="center right", fontsize=8)
        fig.tight_layout(rect=(0, 0, 0.82, 1))
    out = _save(fig, path)
    plt.close(fig)
    return out


def sweep(rows: Sequence[Mapping], labels: Sequence[str], path: Path, equal_weight: float | None = None) -> Path:
    """The orthogonality-weight sweep: each downstream metric and the centred effective rank of zv
    against the weight (log axis; weight 0, alignment only, as a dashed line), mean ± std over seeds,
    with the weight at which the two terms' gradients on the trunk are equal marked."""
    plt = _pyplot()
    panels = [*labels, "zv centred effective rank"]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.2), squeeze=False)
    for ax, panel in zip(axes[0], panels):
        pts = []
        for r in rows:
            val = r["zv_rank"] if panel == panels[-1] else (r["downstream"].get(panel) or (None, None))[:2]
            if val and val[0] is not None:
                pts.append((r["orth_weight"], val[0], val[1] or 0.0))
        nonzero = [p for p in pts if p[0] > 0]
        if nonzero:
            ax.errorbar([p[0] for p in nonzero], [p[1] for p in nonzero], yerr=[p[2] for p in nonzero],
                        marker="o", capsize=3)
            ax.set_xscale("log")
        for w, m, _ in pts:
            if w == 0:
                ax.axhline(m, linestyle="--", color="grey", label="orth weight 0")
        if equal_weight:
            ax.axvline(equal_weight, linestyle=":", color="red", label="equal gradients")
        ax.set_xlabel("orthogonality weight")
        ax.set_title(panel, fontsize=9)
        ax.legend(fontsize=7)
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
