"""Metrics, the metrics JSONL log, and the summary table of one or several runs."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from ..errors import SingLoRAError
from ..runs import METRICS_FILE, SUMMARY_FILE


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
    """Append-only JSONL: one object per line (``{"kind": "train"|"eval", "step": ..., ...}``), flushed per line.

    ``records`` counts the lines of this run; a checkpoint stores it, and a resumed run keeps exactly that many
    lines (dropping what the killed run logged after its checkpoint, a torn last line included).
    """

    def __init__(self, path: Path, keep_records: int | None = None,
                 sink: Callable[[dict[str, Any]], None] | None = None) -> None:
        """A new log at ``path`` (``keep_records=None``), or the first ``keep_records`` lines of the old one;
        ``sink`` also gets every record written (``tracking.Trackers.log``)."""
        from ..atomic import atomic_write_text

        self.path, self.sink = path, sink
        kept: list[str] = []
        if keep_records is not None and path.exists():
            kept = read_lines(path)[:keep_records]
            if len(kept) < keep_records:
                print(f"singlora train: warning: {path} has {len(kept)} complete lines, the checkpoint counted "
                      f"{keep_records}; continuing after line {len(kept)}", file=sys.stderr)
        atomic_write_text(path, "".join(line + "\n" for line in kept))  # a crash here keeps the old log whole
        self.records = len(kept)

    def write(self, record: dict[str, Any]) -> None:
        try:
            with open(self.path, "a") as handle:
                handle.write(json.dumps(record) + "\n")
        except OSError as exc:
            raise SingLoRAError(f"{self.path}: cannot write: {exc.strerror or exc}") from exc
        self.records += 1
        if self.sink is not None:
            self.sink(record)


def read_lines(path: Path) -> list[str]:
    """The lines of a metrics log. Text after the last newline is a torn line (the run was killed, or ran out of
    disk space, while writing it) and is left out; any other line that is not a JSON object is an error."""
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError as exc:
        raise SingLoRAError(f"{path}: cannot read: {exc.strerror or exc}") from exc
    lines = text.split("\n")[:-1]
    for number, line in enumerate(lines, start=1):
        try:
            if not isinstance(json.loads(line), dict):
                raise ValueError
        except ValueError:
            raise SingLoRAError(f"{path}: line {number} is not a JSON object") from None
    return lines


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    path = Path(run_dir) / METRICS_FILE
    return [json.loads(line) for line in read_lines(path)] if path.exists() else []


def read_summary(run_dir: str | Path) -> dict[str, Any]:
    from ..untrusted import read_json

    path = Path(run_dir) / SUMMARY_FILE
    if not path.exists():
        raise SingLoRAError(f"{path}: no such file (is {run_dir} a finished `singlora train` output folder?)")
    summary = read_json(path, what="summary of `singlora train`")
    if not isinstance(summary, dict):
        raise SingLoRAError(f"{path}: expected a JSON object")
    return summary


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4f}" if abs(value) < 100 else f"{value:,.1f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


# (summary key, column title). The eval metrics come between "method" and "trainable params": a summary lists its
# own (``summary["metrics"]``), and ``base_<metric>`` columns show the step-0 score where a run recorded one.
FIRST_COLUMNS = (("name", "run"), ("method", "method"))
LAST_COLUMNS = (("trainable_params", "trainable params"), ("adapter_params", "adapter params"),
                ("adapter_file_bytes", "adapter file (bytes)"), ("seconds_per_step", "s/step"), ("steps", "steps"))
TITLES = {"macro_f1": "macro-F1", "eval_loss": "eval loss"}
DEFAULT_METRICS = ("accuracy", "macro_f1", "perplexity", "eval_loss")  # summaries written before "metrics" existed


def _metric_columns(summaries: Sequence[dict[str, Any]]) -> list[tuple[str, str]]:
    names: list[str] = []
    for summary in summaries:
        names += [m for m in summary.get("metrics", DEFAULT_METRICS) if m not in names]
    columns = []
    for name in names:
        title = TITLES.get(name, name.replace("_", " "))
        if any(isinstance(s.get("base"), dict) and name in s["base"] for s in summaries):
            columns.append((f"base.{name}", f"base {title}"))
        columns.append((name, title))
    return columns


def _value(summary: dict[str, Any], key: str) -> Any:
    if key.startswith("base."):
        return (summary.get("base") or {}).get(key[5:])
    return summary.get(key)


def summary_table(summaries: Sequence[dict[str, Any]]) -> str:
    """A Markdown table of run summaries; columns no run has are left out."""
    candidates = [*FIRST_COLUMNS, *_metric_columns(summaries), *LAST_COLUMNS]
    columns = [(key, title) for key, title in candidates
               if any(isinstance(_value(s, key), (int, float, str)) for s in summaries)]
    rows = [[title for _, title in columns]] + [[_fmt(_value(s, key)) for key, _ in columns] for s in summaries]
    widths = [max(len(row[i]) for row in rows) for i in range(len(columns))]
    lines = ["| " + " | ".join(cell.ljust(w) for cell, w in zip(row, widths)) + " |" for row in rows]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)
