"""Study 4: ramp-up length and initialisation of SingLoRA on all-MiniLM-L6-v2 + BBC News (fixed split).

SingLoRA (r = 8, query + value, lr ``--lr``) with the ramp-up ``T`` at 0, 0.5, 1, 2, 4 and 8 % of the optimizer
steps (the paper's ablation range, where it reports flat accuracy), and the two initialisations: our default
``normal`` (A ~ N(0, 1/n)) against ``kaiming_uniform(a=sqrt 5)`` as public implementations do (entries ~ 1/sqrt(r),
an update much larger than the pretrained weight once u = 1), both at T = 1 %.

A percentage of 20 steps rounds to 0-2 steps, so this study trains with batch 2 for 2 epochs = 100 optimizer
steps over the same 100 training articles (then 0.5 % and 1 % of the steps = 1 step, 8 % = 8 steps).

Run:  ``nice -n 10 .venv/bin/python -m studies.ramp_ablation``  (``--quick`` for a smoke run).
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path
from typing import Any

from studies.bbc import (
    RunSpec, add_bench_arguments, bench_from_args, command_line, mean_std, scale_note,
)
from studies.common import environment, limit_threads, md_table, pyplot, save_figure, summarize, write_json, write_text

RAMPS = ("0", "0.005", "0.01", "0.02", "0.04", "0.08")
INITS = ("normal", "kaiming_uniform")
PAPER = "RoBERTa GLUE: accuracy flat for T from 0.5 % to 8 % of the steps; no init ablation in the paper"


def label(spec: RunSpec) -> str:
    percent = 100 * float(spec.ramp_up)
    return f"T={percent:g}% init={spec.init}"


def plot(groups: dict[str, list[dict[str, Any]]], out: Path) -> str:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 3.6))
    names = list(groups)
    for i, name in enumerate(names):
        ys = [100 * r["test_accuracy"] for r in groups[name]]
        s = summarize(ys)
        ax.scatter([i] * len(ys), ys, s=12, color="tab:gray")
        ax.errorbar([i], [s["mean"]], yerr=[s["std"]], fmt="o", color="tab:red", capsize=4)
    ax.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("test accuracy (%)"), ax.grid(alpha=0.3)
    save_figure(fig, out / "ramp_init.png")
    return "ramp_init.png"


def report(groups: dict[str, list[dict[str, Any]]], note: str, command: str, figure: str, complete: bool,
           wall: float, skipped: list[str]) -> str:
    rows = [[name, runs[0]["ramp_steps"], len(runs), mean_std(runs), mean_std(runs, "val_accuracy"),
             f"{100 * min(r['test_accuracy'] for r in runs):.1f} – {100 * max(r['test_accuracy'] for r in runs):.1f}"]
            for name, runs in groups.items()]
    status = "complete" if complete else "PARTIAL (fewer seeds than planned for some settings: see the seeds column)"
    missing = "\n".join(f"- not run: {s}" for s in skipped)
    return f"""# Study 4: ramp-up length and initialisation (SingLoRA)

Command: `{command}`   Status: {status}. Wall time of this invocation: {wall:.0f} s (cached runs count 0).

Paper's claim: {PAPER}.

{note}

## Accuracy per setting

{md_table(["setting", "T (steps)", "seeds", "test accuracy % (mean ± std)", "validation accuracy %", "test min – max"], rows)}

{missing}

![accuracy per setting]({figure})
"""


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_bench_arguments(parser, "ramp_ablation")
    parser.add_argument("--lr", type=float, default=1e-3, help="SingLoRA learning rate (the paper's 1e-3)")
    parser.add_argument("--batch-size", type=int, default=2)
    args = parser.parse_args(argv)
    limit_threads(1)
    bench, base = bench_from_args(args)
    base = dataclasses.replace(base, method="singlora", lr=args.lr,
                               batch_size=base.batch_size if args.quick else args.batch_size)
    command = command_line("studies.ramp_ablation", argv)
    from torch_singlora.train.loop import TrainConfig

    has_init = "init" in {f.name for f in dataclasses.fields(TrainConfig)}
    settings = [dataclasses.replace(base, ramp_up=t) for t in RAMPS]
    skipped = []
    if has_init:
        settings.append(dataclasses.replace(base, ramp_up="0.01", init="kaiming_uniform"))
    else:
        skipped.append("init=kaiming_uniform: the training CLI (TrainConfig) has no `init` option yet")
    if args.quick:
        settings = settings[:2] + settings[6:]
    seeds = 1 if args.quick else args.seeds
    groups: dict[str, list[dict[str, Any]]] = {}
    start = time.perf_counter()

    def publish(complete: bool) -> None:
        wall = time.perf_counter() - start
        figure = plot(groups, args.out)
        steps = next(iter(groups.values()))[0]["steps"]
        write_json(args.out / "results.json", {
            "study": "ramp_ablation", "command": command, "base_run": dataclasses.asdict(base), "complete": complete,
            "wall_s": wall, "environment": environment(), "skipped": skipped,
            "groups": {name: {"test_accuracy": summarize(r["test_accuracy"] for r in runs), "runs": runs}
                       for name, runs in groups.items()},
        })
        write_text(args.out / "REPORT.md", report(groups, scale_note(bench, base, steps), command, figure, complete,
                                                  wall, skipped))

    for seed in range(seeds):  # seed-major: every setting gets one seed before any gets two
        for spec in settings:
            groups.setdefault(label(spec), []).append(bench.run(dataclasses.replace(spec, seed=seed)))
        publish(complete=False)
    publish(complete=True)
    return groups


if __name__ == "__main__":
    main()
