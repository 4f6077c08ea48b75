"""One machine-readable line per measured figure, so bench/run_all.py and bench/gpu_bench.py can gather a table."""
from __future__ import annotations

import json


def emit(bench: str, what: str, ratio: float, target: float | None = None, **detail) -> None:
    """Print ``RESULT {...}``: the ratio (this tool over the original approach) measured in this run."""
    print("RESULT " + json.dumps({"bench": bench, "what": what, "ratio": round(float(ratio), 3),
                                  "target": target, **detail}, sort_keys=True), flush=True)


def emit_value(bench: str, what: str, value: float, unit: str, **detail) -> None:
    """Print ``RESULT {...}`` for a figure with no baseline beside it (images/s, a data-wait share)."""
    print("RESULT " + json.dumps({"bench": bench, "what": what, "ratio": None, "value": round(float(value), 3),
                                  "unit": unit, "target": None, **detail}, sort_keys=True), flush=True)


def result_cell(r: dict) -> str:
    """``2.34x`` for a ratio, ``4100 img/s`` for a value."""
    if r.get("ratio") is not None:
        return f"{r['ratio']:.2f}x"
    return f"{r['value']:g} {r.get('unit', '')}".strip()
