"""PNG curves from ``metrics.jsonl``: training loss and eval metric per optimizer step, several runs side by side."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Sequence

from ..atomic import atomic_write
from ..errors import SingLoRAError
from .metrics import read_metrics, read_summary


def plot_runs(run_dirs: Sequence[str | Path], output: str | Path, names: Sequence[str] | None = None) -> Path:
    """Write one PNG with two panels: training loss and the headline eval metric (the first of the summary's
    ``metrics``: accuracy for classification, eval loss for causal LM; an evaluation at step 0 is the base model).

    Each run is one line per panel, labelled by ``names`` (default: the run's name in its summary).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (loss_ax, eval_ax) = plt.subplots(1, 2, figsize=(11, 4))
    eval_key = "eval_loss"
    for index, run_dir in enumerate(run_dirs):
        records = read_metrics(run_dir)
        try:
            summary = read_summary(run_dir)
        except ValueError:  # a run still going: no summary yet
            summary = {}
        label = names[index] if names else summary.get("name", Path(run_dir).name)
        train = [r for r in records if r["kind"] == "train"]
        evals = [r for r in records if r["kind"] == "eval"]
        eval_key = (summary.get("metrics") or ["accuracy" if any("accuracy" in r for r in evals) else eval_key])[0]
        loss_ax.plot([r["step"] for r in train], [r["loss"] for r in train], label=label)
        eval_ax.plot([r["step"] for r in evals], [r.get(eval_key) for r in evals], marker="o", label=label)
    loss_ax.set(title="training loss", xlabel="optimizer step", ylabel="loss")
    eval_ax.set(title=f"eval {eval_key.replace('eval_', '')}", xlabel="optimizer step", ylabel=eval_key)
    for axis in (loss_ax, eval_ax):
        axis.grid(alpha=0.3)
        axis.legend()
    figure.tight_layout()
    image = io.BytesIO()
    figure.savefig(image, format="png", dpi=100)
    plt.close(figure)
    output = Path(output)
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise SingLoRAError(f"{output}: cannot create its folder: {exc.strerror or exc}") from exc
    atomic_write(output, lambda tmp: Path(tmp).write_bytes(image.getvalue()))  # a full disk: an error naming it
    return output
