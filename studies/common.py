"""Helpers shared by the studies: thread limits, summary statistics, and writing results (JSON, Markdown, PNG).

Every study writes into one output folder: ``results.json`` (all numbers), ``REPORT.md`` (tables, the command, the
wall time) and PNG plots. Files are written atomically (``torch_singlora.atomic.atomic_write``).
"""

from __future__ import annotations

import json
import math
import os
import platform
import statistics
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch

from torch_singlora.atomic import atomic_write, atomic_write_text


def limit_threads(n: int = 1) -> None:
    """Run on ``n`` CPU threads (the study machine is shared)."""
    torch.set_num_threads(n)
    os.environ.setdefault("OMP_NUM_THREADS", str(n))


def summarize(values: Iterable[float]) -> dict[str, float]:
    """median, quartiles, min, max, mean, std and count of ``values``."""
    xs = sorted(float(v) for v in values)
    if not xs:
        raise ValueError("summarize() needs at least one value")
    q1, _, q3 = statistics.quantiles(xs, n=4, method="inclusive") if len(xs) > 1 else (xs[0], xs[0], xs[0])
    return {
        "n": len(xs), "median": statistics.median(xs), "q25": q1, "q75": q3, "min": xs[0], "max": xs[-1],
        "mean": statistics.fmean(xs), "std": statistics.stdev(xs) if len(xs) > 1 else 0.0,
    }


def fmt(x: float, digits: int = 3) -> str:
    """Compact number: scientific for very small/large magnitudes."""
    if x == 0 or (1e-3 <= abs(x) < 1e4):
        return f"{x:.{digits}g}" if abs(x) < 1 else f"{x:.{digits + 1}g}"
    return f"{x:.{digits - 1}e}"


def md_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub Markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def environment() -> dict[str, Any]:
    """Where the numbers were measured."""
    return {"torch": torch.__version__, "threads": torch.get_num_threads(), "python": platform.python_version(),
            "machine": platform.machine(), "cpu_count": os.cpu_count()}


def write_text(path: Path, text: str) -> None:
    atomic_write_text(path, text)


def write_json(path: Path, data: Any) -> None:
    write_text(path, json.dumps(data, indent=1, sort_keys=False, default=_jsonable) + "\n")


def _jsonable(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def save_figure(fig: Any, path: Path) -> None:
    """Save a matplotlib figure atomically as PNG and close it."""
    import matplotlib.pyplot as plt

    def write(tmp: str) -> None:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")

    atomic_write(path, write)
    plt.close(fig)


def pyplot() -> Any:
    """matplotlib.pyplot on the non-interactive Agg backend (imported only when a study plots)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
