"""Small adapter files: the demo's SingLoRA adapter stored as float32, bfloat16 and float16.

    python -m studies.save_dtype [--run RUN_DIR] [--out studies/results/save_dtype]

Trains the classification demo's SingLoRA run (all-MiniLM-L6-v2 on BBC News,
``torch_singlora.demo_classification.train_args``; skipped with
``--run`` pointing at such a run), then saves its adapter with ``save_adapter(..., dtype=...)`` for each dtype,
reloads each file into a fresh float32 base, and measures on the demo's test split (444 articles): accuracy,
held-out cross-entropy, the largest logit change against the float32 adapter, and the same for the merged model
(``merge_and_unload``). Writes ``REPORT.md`` and ``results.json`` in ``--out``; the run and the adapters go to
``runs/save_dtype/``. Measured result: ``studies/results/save_dtype/REPORT.md``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from studies.common import environment, limit_threads, md_table, write_text
from torch_singlora import SingLoRAModel
from torch_singlora.demo_classification import train_args

DTYPES = ("float32", "bfloat16", "float16")
RUNS = Path("runs/save_dtype")  # the training run and the saved adapters (runs/ is not committed)


def demo_config(run: Path) -> Any:
    """The ``TrainConfig`` of the classification demo's SingLoRA run into ``run`` (its flags, parsed as the CLI
    parses them)."""
    from torch_singlora.cli import _add_train, train_config

    parser = argparse.ArgumentParser()
    _add_train(parser.add_subparsers())
    return train_config(parser.parse_args(train_args("singlora", run.parent, 1200)))


def eval_split(run: Path) -> tuple[Any, Any, dict[str, Any]]:
    """``(task, batches, info)``: the test split the demo run evaluated on (same flags, same seed)."""
    from torch_singlora.train.registry import get_task
    from torch_singlora.runs import read_run_info

    config = demo_config(run)
    task = get_task(config.task)
    tokenizer = task.load_tokenizer(config.model, {})
    data = task.load_data(config, tokenizer)
    batches = torch.utils.data.DataLoader(data.eval, batch_size=64, collate_fn=task.collator(tokenizer, data.info))
    return task, batches, read_run_info(run / "adapter")


@torch.no_grad()
def logits_and_labels(model: torch.nn.Module, batches: Any) -> tuple[torch.Tensor, torch.Tensor]:
    model.eval()
    logits, labels = [], []
    for batch in batches:
        logits.append(model(**{k: v for k, v in batch.items() if k != "labels"}).logits.double())
        labels.append(batch["labels"])
    return torch.cat(logits), torch.cat(labels)


def scores(logits: torch.Tensor, labels: torch.Tensor, reference: torch.Tensor | None) -> dict[str, float]:
    return {"accuracy": float((logits.argmax(-1) == labels).double().mean()),
            "loss": float(torch.nn.functional.cross_entropy(logits, labels)),
            "max_logit_change": float((logits - reference).abs().max()) if reference is not None else 0.0}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--run", type=Path, default=None, help="a finished demo SingLoRA run (default: train one)")
    parser.add_argument("--out", type=Path, default=Path("studies/results/save_dtype"))
    args = parser.parse_args(argv)
    limit_threads(1)
    started = time.time()
    run = args.run
    if run is None:
        run = RUNS / "singlora"
        command = [sys.executable, "-m", "torch_singlora.cli", *train_args("singlora", run.parent, 1200), "--quiet"]
        subprocess.run(command, check=True)
    task, batches, info = eval_split(run)
    trained = SingLoRAModel.from_pretrained(task.load_model(info["base_model"], info), run / "adapter")
    rows: list[dict[str, Any]] = []
    reference: torch.Tensor | None = None  # the float32 adapter's logits: every row is compared with them
    for dtype in DTYPES:
        folder = RUNS / "adapters" / dtype
        trained.save_adapter(folder, dtype=dtype)
        model = SingLoRAModel.from_pretrained(task.load_model(info["base_model"], info), folder)
        adapter_logits, labels = logits_and_labels(model, batches)
        merged_logits, _ = logits_and_labels(model.merge_and_unload(), batches)
        reference = adapter_logits if reference is None else reference
        rows.append({"dtype": dtype, "file_bytes": (folder / "adapter_model.safetensors").stat().st_size,
                     "adapter": scores(adapter_logits, labels, reference),
                     "merged": scores(merged_logits, labels, reference)})
        print(json.dumps(rows[-1]), flush=True)
    results = {"run": str(run), "examples": int(labels.numel()), "rows": rows, "environment": environment(),
               "seconds": round(time.time() - started, 1)}
    write_report(results, args.out)
    return results


def write_report(results: dict, out: Path) -> None:
    """``results.json`` and ``REPORT.md`` (the table) in ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    write_text(out / "results.json", json.dumps(results, indent=2) + "\n")
    table = md_table(
        ["stored dtype", "adapter file (bytes)", "accuracy", "held-out loss", "max abs logit change",
         "merged: accuracy", "merged: loss", "merged: max abs logit change"],
        [[r["dtype"], f"{r['file_bytes']:,}", f"{r['adapter']['accuracy']:.4f}", f"{r['adapter']['loss']:.6f}",
          f"{r['adapter']['max_logit_change']:.2e}", f"{r['merged']['accuracy']:.4f}", f"{r['merged']['loss']:.6f}",
          f"{r['merged']['max_logit_change']:.2e}"] for r in results["rows"]])
    write_text(out / "REPORT.md", "\n".join([
        "# Adapter storage dtype on the demo task", "",
        f"`python -m studies.save_dtype` ({results['seconds']} s including the training run, one thread, shared "
        "2-core machine at load 10-13): the demo's SingLoRA adapter (MiniLM on BBC News, r=8, all-linear + the "
        "classifier head, 75 steps) saved with `save_adapter(dtype=...)`, reloaded into a float32 base, evaluated "
        f"on the {results['examples']} test articles; *merged* = the reloaded adapter folded in "
        "(`merge_and_unload`). Logit changes are against the float32 adapter (unmerged).", "", table, ""]))


if __name__ == "__main__":
    main()
