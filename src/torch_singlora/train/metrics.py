"""Metrics, the metrics JSONL log, and the summary table of one or several runs."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Sequence

import torch

METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"


def classification_metrics(predictions: torch.Tensor, labels: torch.Tensor, num_classes: int) -> dict[str, float]:
    """``accuracy`` and ``macro_f1`` (mean over classes of F1; a class never predicted nor present scores 0)."""
    accuracy = (predictions == labels).double().mean().item()
    f1s = []
    for c in range(num_classes):
        tp = ((predictions == c) & (labels == c)).sum().item()
        fp = ((predictions == c) & (labels != c)).sum().item()
        fn = ((predictions != c) & (labels == c)).sum().item()
        f1s.append(0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn))
    return {"accuracy": accuracy, "macro_f1": sum(f1s) / num_classes}


def lm_metrics(total_loss: float, total_tokens: int) -> dict[str, float]:
    """Mean token cross-entropy ``loss`` and ``perplexity`` = exp(loss)."""
    loss = total_loss / max(total_tokens, 1)
    return {"loss": loss, "perplexity": math.exp(min(loss, 700.0))}


class MetricsLog:
    """Append-only JSONL: one object per line (``{"kind": "train"|"eval", "step": ..., ...}``), flushed per line."""

    def __init__(self, path: Path, truncate_after_step: int | None = None) -> None:
        """Open ``path`` for appending; when resuming, first drop lines logged after ``truncate_after_step``."""
        from ..atomic import atomic_write_text

        self.path = path
        kept: list[str] = []
        if truncate_after_step is not None and path.exists():
            kept = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= truncate_after_step]
        if truncate_after_step is None or path.exists():  # a crash here keeps the old log whole
            atomic_write_text(path, "".join(line + "\n" for line in kept))

    def write(self, record: dict[str, Any]) -> None:
        with open(self.path, "a") as handle:
            handle.write(json.dumps(record) + "\n")


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    path = Path(run_dir) / METRICS_FILE
    return [json.loads(line) for line in path.read_text().splitlines() if line] if path.exists() else []


def read_summary(run_dir: str | Path) -> dict[str, Any]:
    path = Path(run_dir) / SUMMARY_FILE
    if not path.is_file():
        from ..errors import SingLoRAError

        raise SingLoRAError(f"{path}: no such file (is {run_dir} a finished `singlora train` output folder?)")
    return json.loads(path.read_text())


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4f}" if abs(value) < 100 else f"{value:,.1f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


COLUMNS = (
    ("name", "run"), ("method", "method"), ("accuracy", "accuracy"), ("macro_f1", "macro-F1"),
    ("perplexity", "perplexity"), ("eval_loss", "eval loss"), ("trainable_params", "trainable params"),
    ("adapter_params", "adapter params"), ("adapter_file_bytes", "adapter file (bytes)"),
    ("seconds_per_step", "s/step"), ("steps", "steps"),
)


def summary_table(summaries: Sequence[dict[str, Any]]) -> str:
    """A Markdown table of run summaries; columns no run has are left out."""
    columns = [(key, title) for key, title in COLUMNS if any(s.get(key) is not None for s in summaries)]
    rows = [[title for _, title in columns]] + [[_fmt(s.get(key)) for key, _ in columns] for s in summaries]
    widths = [max(len(row[i]) for row in rows) for i in range(len(columns))]
    lines = ["| " + " | ".join(cell.ljust(w) for cell, w in zip(row, widths)) + " |" for row in rows]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)
