"""One machine-readable line per measured ratio, so bench/run_all.py can gather a table."""
from __future__ import annotations

import json


def emit(bench: str, what: str, ratio: float, target: float | None = None, **detail) -> None:
    """Print ``RESULT {...}``: the ratio (this tool over the original approach) measured in this run."""
    print("RESULT " + json.dumps({"bench": bench, "what": what, "ratio": round(float(ratio), 3),
                                  "target": target, **detail}, sort_keys=True), flush=True)
