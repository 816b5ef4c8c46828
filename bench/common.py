"""What the benchmarks share: a figure's spread over seeds, and writing the results file."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np


def spread(values: list[float]) -> dict[str, float]:
    """Mean, sample standard deviation (0 for one value), min and max."""
    a = np.asarray(values, dtype=np.float64)
    return {"mean": float(a.mean()), "std": float(a.std(ddof=1)) if len(a) > 1 else 0.0,
            "min": float(a.min()), "max": float(a.max())}


def write_results(out: Path | None, results: dict[str, Any]) -> None:
    """Writes `results` as JSON to `out` (its folder created); nothing without `out`."""
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(results, indent=2, default=float))
