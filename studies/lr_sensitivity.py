"""Study 3: learning-rate sensitivity of LoRA vs SingLoRA on all-MiniLM-L6-v2 + BBC News (fixed split).

Five learning rates over two orders of magnitude (1e-4 ... 1e-2), ``--seeds`` seeds each, both methods at r = 8 on
query + value. Reports test (and validation) accuracy per learning rate and the spread (max - min over the learning
rates of the mean accuracy) per method: the paper's measure (LLaMA-7B MNLI: LoRA up to 4.8 points, SingLoRA ~1).
Seed 0 of every run is shared with study 2's sweep (runs are cached by their settings, ``studies/bbc.py``).

Run:  ``nice -n 10 .venv/bin/python -m studies.lr_sensitivity``  (``--quick`` for a smoke run).
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path
from typing import Any

from studies.bbc import (
    add_bench_arguments, bench_from_args, command_line, mean_std, scale_note,
)
from studies.common import environment, limit_threads, md_table, pyplot, save_figure, summarize, write_json, write_text
from studies.method_comparison import WIDE

METHODS = ("lora", "singlora")
PAPER = "LLaMA-7B MNLI learning-rate sweep: LoRA spread up to 4.8 points, SingLoRA about 1 point"


def spread(runs_by_lr: dict[float, list[dict[str, Any]]], key: str) -> float:
    """max - min over learning rates of the mean accuracy (percentage points)."""
    means = [summarize(100 * r[key] for r in runs)["mean"] for runs in runs_by_lr.values()]
    return max(means) - min(means)


def plot(results: dict[str, dict[float, list[dict[str, Any]]]], out: Path) -> str:
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    colors = {"lora": "tab:blue", "singlora": "tab:red"}
    for ax, key, title in zip(axes, ("test_accuracy", "val_accuracy"), ("test", "validation")):
        for method, by_lr in results.items():
            lrs = sorted(by_lr)
            stats = [summarize(100 * r[key] for r in by_lr[lr]) for lr in lrs]
            ax.errorbar(lrs, [s["mean"] for s in stats], yerr=[s["std"] for s in stats], marker="o", capsize=3,
                        color=colors[method], label=method)
            for lr in lrs:
                ax.scatter([lr] * len(by_lr[lr]), [100 * r[key] for r in by_lr[lr]], s=8, color=colors[method],
                           alpha=0.4)
        ax.set_xscale("log"), ax.set_xlabel("learning rate"), ax.set_ylabel(f"{title} accuracy (%)")
        ax.grid(alpha=0.3), ax.legend(fontsize=8)
    fig.suptitle("Accuracy vs learning rate (mean ± std over seeds; dots: single seeds)", fontsize=10)
    save_figure(fig, out / "accuracy_vs_lr.png")
    return "accuracy_vs_lr.png"


def report(results: dict[str, dict[float, list[dict[str, Any]]]], note: str, command: str, figure: str,
           complete: bool, wall: float, task_name: str = "BBC News") -> str:
    lrs = sorted({lr for by_lr in results.values() for lr in by_lr})
    rows = [[method] + [f"{mean_std(by_lr[lr])} (n={len(by_lr[lr])})" if lr in by_lr else "-" for lr in lrs]
            + [f"{spread(by_lr, 'test_accuracy'):.1f}", f"{spread(by_lr, 'val_accuracy'):.1f}"]
            for method, by_lr in results.items()]
    status = "complete" if complete else "PARTIAL (fewer seeds than planned for some learning rates: see n)"
    return f"""# Study 3: learning-rate sensitivity (LoRA vs SingLoRA), all-MiniLM-L6-v2 + {task_name}

Command: `{command}`   Status: {status}. Wall time of this invocation: {wall:.0f} s (cached runs count 0);
the runs below took {sum(r['wall_s'] for by_lr in results.values() for runs in by_lr.values() for r in runs):.0f} s in total when they ran.

Paper's claim: {PAPER}.

{note}

## Test accuracy % (mean ± std over seeds) per learning rate, and spread

{md_table(["method"] + [f"lr {lr:g}" for lr in lrs] + ["spread test (pts)", "spread val (pts)"], rows)}

Spread = max - min over the learning rates of the mean accuracy, in percentage points.

![accuracy vs learning rate]({figure})
"""


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_bench_arguments(parser, "lr_sensitivity")
    parser.add_argument("--lrs", type=float, nargs="+", default=list(WIDE))
    args = parser.parse_args(argv)
    limit_threads(1)
    bench, base = bench_from_args(args)
    command = command_line("studies.lr_sensitivity", argv)
    lrs = args.lrs[:2] if args.quick else args.lrs
    seeds = 1 if args.quick else args.seeds
    results: dict[str, dict[float, list[dict[str, Any]]]] = {m: {} for m in METHODS}
    start = time.perf_counter()

    def publish(complete: bool) -> None:
        steps = next(iter(next(iter(results.values())).values()))[0]["steps"]
        figure = plot(results, args.out)
        wall = time.perf_counter() - start
        spreads = {m: {"test": spread(by_lr, "test_accuracy"), "val": spread(by_lr, "val_accuracy")}
                   for m, by_lr in results.items() if by_lr}
        write_json(args.out / "results.json", {
            "study": "lr_sensitivity", "command": command, "base_run": dataclasses.asdict(base), "complete": complete,
            "wall_s": wall, "environment": environment(), "spread_points": spreads,
            "runs": {m: {str(lr): runs for lr, runs in by_lr.items()} for m, by_lr in results.items()},
        })
        write_text(args.out / "REPORT.md", report(results, scale_note(bench, base, steps), command, figure, complete, wall,
                                                  bench.task_name))

    for seed in range(seeds):  # seed-major, so a stopped study still covers every learning rate
        for lr in lrs:
            for method in METHODS:
                run = bench.run(dataclasses.replace(base, method=method, lr=lr, seed=seed))
                results[method].setdefault(lr, []).append(run)
        publish(complete=False)
    publish(complete=True)
    return results


if __name__ == "__main__":
    main()
