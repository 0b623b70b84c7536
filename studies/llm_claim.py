"""Study 6 (issue 16): the paper's LLM claim on SmolLM2-135M-Instruct, BBC News section from the headline.

The paper's headline: LLaMA-7B on MNLI, r = 8 on all seven projections, SingLoRA 91.3 % with 60 % of LoRA's
parameters (LoRA 89.1, LoRA+ 90.2, DoRA 90.6), and a learning-rate spread of ~1 point against LoRA's 4.8. Here the
same design on the one real decoder LLM we have offline (``studies/llm_task.py``: task, model, zero-shot):

1. zero-shot score of the base instruct model (exact match and ranked choice, test split);
2. learning-rate sweep of SingLoRA, LoRA, LoRA+ and DoRA on seed 0 over one grid, scored on the validation split;
   a method whose best rate sits on the grid's edge gets the next grid point, until its optimum is interior;
3. the other seeds: the whole grid for LoRA and SingLoRA (the learning-rate sensitivity), each method's chosen
   rate for LoRA+ and DoRA (the method comparison), and a run twice as long at LoRA's and SingLoRA's chosen rate
   with validation every ``steps / 4`` steps (the convergence check).

Every run goes through the training CLI's Python API (``studies.bbc.Bench``), is cached in the work folder by its
settings and checkpointed every 16 steps, so a stopped study resumes where it stopped (one study process per work
folder: a lock refuses a second). ``--jobs 2`` trains two runs at a time (one thread each).

Run:  ``nice -n 10 .venv/bin/python -m studies.llm_claim --jobs 2``  (``--quick`` for a smoke run, ~30 s).
"""

from __future__ import annotations

import argparse
import dataclasses
import fcntl
import json
import math
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Any, Callable, Iterator

from studies.bbc import DEFAULT_WORK, Bench, Split, best_lr, command_line, mean_std
from studies.common import environment, limit_threads, md_table, pyplot, save_figure, summarize, write_json, write_text
from studies.llm_task import (
    LLAMA_7B, PROMPT, QUICK_SPLIT, TARGETS, LLMRunSpec, adapter_params, final_loss, make_llm_bench, read_rows,
    train_run, training_curve, zero_shot_cached,
)
from studies.lr_sensitivity import plot as plot_lr_curves
from studies.lr_sensitivity import spread

METHODS = ("singlora", "lora", "loraplus", "dora")
FULL_GRID = ("singlora", "lora")  # every grid rate x every seed: the learning-rate sensitivity
GRID = (3e-4, 1e-3, 3e-3, 1e-2)  # one grid for every method, fixed before any run (edges extended, see below)
MAX_EXTENSIONS = 2  # grid points added on an edge, per method
PAPER = {"singlora": 91.3, "lora": 89.1, "loraplus": 90.2, "dora": 90.6}
PAPER_PARAMS = {"singlora": "12M", "lora": "20M", "loraplus": "20M", "dora": "21M"}
PAPER_SPREAD = "LoRA up to 4.8 points, SingLoRA about 1 point"
NAMES = {"singlora": "SingLoRA", "lora": "LoRA", "loraplus": "LoRA+", "dora": "DoRA"}
COLORS = {"singlora": "tab:red", "lora": "tab:blue", "loraplus": "tab:green", "dora": "tab:purple"}
CHECKPOINT_EVERY = 16


@dataclasses.dataclass
class Settings:
    """What the study runs (the command's flags)."""

    split: Split
    steps: int
    batch_size: int
    max_length: int
    seeds: int
    grid: tuple[float, ...]
    methods: tuple[str, ...]
    jobs: int
    extensions: int = MAX_EXTENSIONS  # grid points a method may add on an edge


def next_rate(lr: float, up: bool) -> float:
    """The neighbour of ``lr`` on the 1-3-10 grid: 1e-3 -> 3e-3 -> 1e-2 (``up``), 1e-3 -> 3e-4 -> 1e-4 (down)."""
    exponent = math.floor(math.log10(lr) + 1e-9)
    three = lr / 10**exponent > 2
    if up:
        return float(f"{1e1 ** (exponent + 1):g}") if three else float(f"{3 * 10.0**exponent:g}")
    return float(f"{10.0**exponent:g}") if three else float(f"{3 * 10.0 ** (exponent - 1):g}")


def base_spec(settings: Settings) -> LLMRunSpec:
    """The run settings every method shares (``method``/``lr``/``seed`` are filled per run)."""
    return LLMRunSpec(method="singlora", lr=1e-3, epochs=1, max_steps=settings.steps, batch_size=settings.batch_size,
                      max_length=settings.max_length, save_every=CHECKPOINT_EVERY)


def long_spec(spec: LLMRunSpec) -> LLMRunSpec:
    """The convergence check of ``spec``: twice the steps, validation every quarter of the original run."""
    return dataclasses.replace(spec, max_steps=2 * spec.max_steps, eval_every=max(1, spec.max_steps // 4))


class Runner:
    """Trains specs (in ``jobs`` worker processes, one thread each) and calls ``done`` after each finished run."""

    def __init__(self, bench: Bench, jobs: int, done: Callable[[], None]) -> None:
        self.bench, self.jobs, self.done = bench, jobs, done
        self.results: dict[LLMRunSpec, dict[str, Any]] = {}

    def run(self, specs: list[LLMRunSpec]) -> None:
        todo = [s for s in dict.fromkeys(specs) if s not in self.results]
        for spec in [s for s in todo if (self.bench.run_dir(s) / "result.json").is_file()]:
            self.results[spec] = self.bench.run(spec)  # cached: read back
        todo = [s for s in todo if s not in self.results]
        if self.jobs == 1:
            for spec in todo:
                self.results[spec] = train_run(self.bench, spec)
                self.done()
            return
        import multiprocessing

        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(self.jobs, mp_context=context, initializer=limit_threads) as pool:
            futures = {pool.submit(train_run, self.bench, spec): spec for spec in todo}
            for future in as_completed(futures):
                self.results[futures[future]] = future.result()
                self.done()


def seed0_sweeps(runner: Runner, base: LLMRunSpec, settings: Settings, grids: dict[str, list[float]]) -> None:
    """Seed-0 runs of every method over its grid, extending a grid whose best rate is on an edge."""
    added = {m: 0 for m in settings.methods}
    while True:
        runner.run([dataclasses.replace(base, method=m, lr=lr, seed=0) for m in settings.methods for lr in grids[m]])
        extended = False
        for method in settings.methods:
            chosen = best_lr(sweep_results(runner, base, method, grids[method]))
            grid = grids[method]
            if chosen in (min(grid), max(grid)) and added[method] < settings.extensions:
                grid.append(next_rate(chosen, up=chosen == max(grid)))
                grid.sort()
                added[method] += 1
                extended = True
        if not extended:
            return


def sweep_results(runner: Runner, base: LLMRunSpec, method: str, grid: list[float]) -> dict[float, dict[str, Any]]:
    return {lr: runner.results[dataclasses.replace(base, method=method, lr=lr, seed=0)] for lr in grid}


def lock_work_folder(bench: Bench) -> Any:
    """Hold an exclusive lock on the study's run folder for the life of the process (two studies would race)."""
    folder = bench.work / "runs" / bench.label
    folder.mkdir(parents=True, exist_ok=True)
    handle = open(folder / "study.lock", "w")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise SystemExit(f"another studies.llm_claim is running on {folder}; wait for it or use another --work")
    return handle


# ----------------------------------------------------------------------------------------------------------------
# The numbers the report shows


def by_method_lr(runner: Runner, base: LLMRunSpec, methods: tuple[str, ...]) -> dict[str, dict[float, list[dict]]]:
    """``{method: {lr: [results of seeds 0, 1, ...]}}`` of the standard-length runs finished so far."""
    table: dict[str, dict[float, list[dict]]] = {m: {} for m in methods}
    for spec, result in sorted(runner.results.items(), key=lambda kv: kv[0].seed):
        if spec.method in table and spec.max_steps == base.max_steps:
            table[spec.method].setdefault(spec.lr, []).append(result)
    return table


def good_window(table: dict[str, dict[float, list[dict]]], width: int = 3) -> list[float]:
    """The ``width`` consecutive rates (common to LoRA and SingLoRA) with the best mean validation accuracy over
    both methods and all seeds: the "good range" over which the spread is also reported."""
    if not all(table.get(m) for m in FULL_GRID):
        return []
    common = sorted(set(table[FULL_GRID[0]]).intersection(*(table[m] for m in FULL_GRID[1:])))
    if len(common) < width:
        return common

    def score(window: list[float]) -> float:
        return sum(summarize(r["val_accuracy"] for m in FULL_GRID for r in table[m][lr])["mean"] for lr in window)

    return max((common[i : i + width] for i in range(len(common) - width + 1)), key=score)


def paired(a: list[dict], b: list[dict], key: str = "test_accuracy") -> tuple[float, float, int, int]:
    """Seed-paired difference a - b in points: mean, std, seeds where a is ahead, seeds compared."""
    n = min(len(a), len(b))
    diffs = [100 * (a[i][key] - b[i][key]) for i in range(n)]
    if not diffs:
        return math.nan, math.nan, 0, 0
    s = summarize(diffs)
    return s["mean"], s["std"], sum(d > 0 for d in diffs), n


def state_of(runner: Runner, bench: Bench, base: LLMRunSpec, settings: Settings, grids: dict[str, list[float]],
             zero: dict[str, Any], model_config: dict[str, Any]) -> dict[str, Any]:
    """Everything the report and results.json hold, from the runs finished so far."""
    table = by_method_lr(runner, base, settings.methods)
    chosen = {m: best_lr({lr: runs[0] for lr, runs in table[m].items()}) for m in settings.methods if table[m]}
    finals = {m: table[m][lr] for m, lr in chosen.items()}
    long_runs = {}
    for method in FULL_GRID:
        if method in chosen:
            spec = long_spec(dataclasses.replace(base, method=method, lr=chosen[method], seed=0))
            if spec in runner.results:
                long_runs[method] = {"result": runner.results[spec], "curve": training_curve(bench, spec)}
    curves = {m: training_curve(bench, dataclasses.replace(base, method=m, lr=lr, seed=0))
              for m, lr in chosen.items()}
    losses = {m: {f"{lr:g}": [final_loss(training_curve(bench, dataclasses.replace(base, method=m, lr=lr, seed=s)))
                             for s in range(len(runs))] for lr, runs in table[m].items()} for m in table}
    window = good_window(table)
    sensitivity = {m: {"spread_test": spread(table[m], "test_accuracy"), "spread_val": spread(table[m], "val_accuracy"),
                       "window": window,
                       "spread_test_window": spread({lr: table[m][lr] for lr in window}, "test_accuracy")
                       if window else None}
                   for m in FULL_GRID if table.get(m)}
    return {
        "table": table, "chosen": chosen, "finals": finals, "long": long_runs, "curves": curves, "losses": losses,
        "window": window, "sensitivity": sensitivity, "zero_shot": zero, "grids": grids,
        "params": {m: {"formula": adapter_params(model_config, m, base.r), "llama7b": adapter_params(LLAMA_7B, m, base.r),
                       "measured": first(finals[m], "adapter_params") if m in finals else None}
                   for m in settings.methods},
        "run_s": sum(r["wall_s"] for r in runner.results.values()),
    }


# ----------------------------------------------------------------------------------------------------------------
# Report and plots


def plot_comparison(state: dict[str, Any], out: Path) -> str | None:
    if not state["finals"]:
        return None
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.6))
    ax = axes[0]
    for i, (method, runs) in enumerate(state["finals"].items()):
        ys = [100 * r["test_accuracy"] for r in runs]
        ax.scatter([i] * len(ys), ys, color="tab:gray", s=14)
        ax.errorbar([i], [summarize(ys)["mean"]], yerr=[summarize(ys)["std"]], fmt="o", color=COLORS[method], capsize=4)
    zero = state["zero_shot"]
    ax.axhline(100 * zero["ranked_choice"], color="black", ls=":", lw=1, label="zero-shot, ranked choice")
    ax.axhline(100 * zero["exact_match"], color="black", ls="--", lw=1, label="zero-shot, exact match")
    ax.set_xticks(range(len(state["finals"])), [NAMES[m] for m in state["finals"]])
    ax.set_ylabel("test accuracy (%)"), ax.grid(alpha=0.3), ax.legend(fontsize=7)
    ax.set_title("each method at its validation-chosen lr: seeds (gray), mean ± std", fontsize=9)
    ax = axes[1]
    for method, curve in state["curves"].items():
        if curve["loss"]:
            steps, losses = zip(*curve["loss"])
            ax.plot(steps, losses, color=COLORS[method], lw=1, label=f"{NAMES[method]} lr {state['chosen'][method]:g}")
    for method, run in state["long"].items():
        if run["curve"]["loss"]:
            steps, losses = zip(*run["curve"]["loss"])
            ax.plot(steps, losses, color=COLORS[method], lw=0.8, ls=":", label=f"{NAMES[method]}, 2x steps")
    ax.set_yscale("log"), ax.set_xlabel("optimizer step"), ax.set_ylabel("training loss (seed 0)")
    ax.grid(alpha=0.3), ax.legend(fontsize=7)
    fig.suptitle("SmolLM2-135M-Instruct, BBC News headlines, r = 8 on q,k,v,o,gate,up,down", fontsize=10)
    save_figure(fig, out / "comparison.png")
    return "comparison.png"


def plot_convergence(state: dict[str, Any], out: Path, steps: int) -> str | None:
    if not state["long"]:
        return None
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.4))
    for method, run in state["long"].items():
        if run["curve"]["val"]:
            xs, ys = zip(*run["curve"]["val"])
            ax.plot(xs, [100 * y for y in ys], marker="o", color=COLORS[method],
                    label=f"{NAMES[method]} lr {state['chosen'][method]:g}, {2 * steps} steps")
        standard = state["finals"][method][0]["val_accuracy"]
        ax.scatter([steps], [100 * standard], marker="*", s=90, color=COLORS[method],
                   label=f"{NAMES[method]}, the {steps}-step run's end")
    ax.set_xlabel("optimizer step"), ax.set_ylabel("validation accuracy (%)"), ax.grid(alpha=0.3)
    ax.legend(fontsize=7), ax.set_title("convergence check (seed 0)", fontsize=9)
    save_figure(fig, out / "convergence.png")
    return "convergence.png"


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}"


def report(state: dict[str, Any], settings: Settings, notes: dict[str, Any], figures: list[str]) -> str:
    zero, table, finals = state["zero_shot"], state["table"], state["finals"]
    params = state["params"]
    param_rows = [[NAMES[m], f"{params[m]['formula']:,}", f"{params[m]['measured']:,}" if params[m]["measured"] else "-",
                   f"{params[m]['formula'] / params['lora']['formula']:.1%}" if "lora" in params else "-",
                   f"{params[m]['llama7b'] / 1e6:.1f}M", PAPER_PARAMS[m]] for m in params]
    sweep_rows = [[NAMES[m], "; ".join(f"{lr:g}: {_pct(table[m][lr][0]['val_accuracy'])}"
                                       + (" **(chosen)**" if lr == state["chosen"].get(m) else "")
                                       for lr in sorted(table[m]))] for m in table if table[m]]
    final_rows = [[NAMES[m], f"{state['chosen'][m]:g}", len(runs), mean_std(runs), mean_std(runs, "test_macro_f1"),
                   f"{100 * min(r['test_accuracy'] for r in runs):.1f} – {100 * max(r['test_accuracy'] for r in runs):.1f}",
                   f"{first(runs, 'adapter_params'):,}", _median(r["seconds_per_step"] for r in runs),
                   PAPER[m]] for m, runs in finals.items()]
    pair_rows = []
    for other in ("lora", "loraplus", "dora"):
        if "singlora" in finals and other in finals:
            mean, std, ahead, n = paired(finals["singlora"], finals[other])
            pair_rows.append([f"SingLoRA − {NAMES[other]}", f"{mean:+.1f} ± {std:.1f}", f"{ahead}/{n}",
                              f"{PAPER['singlora'] - PAPER[other]:+.1f}"])
    lrs = sorted({lr for m in FULL_GRID for lr in table.get(m, {})})
    sens_rows = [[NAMES[m]] + [f"{mean_std(table[m][lr])} (n={len(table[m][lr])})" if lr in table[m] else "-"
                               for lr in lrs]
                 + [f"{state['sensitivity'][m]['spread_test']:.1f}",
                    "-" if state["sensitivity"][m]["spread_test_window"] is None
                    else f"{state['sensitivity'][m]['spread_test_window']:.1f}",
                    f"{state['sensitivity'][m]['spread_val']:.1f}"]
                 for m in FULL_GRID if m in state["sensitivity"]]
    by_lr_rows = []
    for lr in lrs:
        if all(lr in table.get(m, {}) for m in FULL_GRID):
            mean, std, ahead, n = paired(table["singlora"][lr], table["lora"][lr])
            by_lr_rows.append([f"{lr:g}", f"{mean:+.1f} ± {std:.1f}", f"{ahead}/{n}"])
    loss_rows = [[NAMES[m]] + [_loss_cell(state["losses"][m].get(f"{lr:g}")) for lr in lrs] for m in FULL_GRID
                 if m in state["losses"]]
    long_rows = []
    for method, run in state["long"].items():
        standard = finals[method][0]
        result = run["result"]
        long_rows.append([NAMES[method], f"{state['chosen'][method]:g}",
                          f"{_pct(standard['val_accuracy'])} / {_pct(standard['test_accuracy'])}",
                          f"{_pct(result['val_accuracy'])} / {_pct(result['test_accuracy'])}",
                          ", ".join(f"{s}: {100 * a:.1f}" for s, a in run["curve"]["val"]),
                          _loss_cell([final_loss(run["curve"])])])
    window = ", ".join(f"{lr:g}" for lr in state["window"]) or "-"
    status = "complete" if notes["complete"] else "PARTIAL (still running or stopped early: see n)"
    figures_md = "\n\n".join(f"![{f}]({f})" for f in figures)
    return f"""# Study 6: the paper's LLM claim on SmolLM2-135M-Instruct (BBC News section from the headline)

Command: `{notes['command']}`   Status: {status}. Wall time of this invocation: {notes['wall_s']:.0f} s (cached runs
count 0); the runs below took {state['run_s']:.0f} s in total when they ran ({len(notes['runs'])} runs).
Machine: 2-core CPU shared with ~7 other jobs, one thread per run, `nice -n 10`, {settings.jobs} run(s) at a time.

Paper's claims: LLaMA-7B on MNLI, r = 8 on all seven projections: SingLoRA 91.3 % (12M parameters, "60 % of LoRA's
budget"), LoRA 89.1 % (20M), LoRA+ 90.2 % (20M), DoRA 90.6 % (21M); learning-rate sensitivity: {PAPER_SPREAD}.

## Design

- Model: SmolLM2-135M-Instruct (30 Llama layers, GQA: k/v 576 -> 192, MLP 576 <-> 1536, float32), loaded as
  `LlamaForSequenceClassification`: a fresh 576 -> 5 `score` head on the last token, trained fully by every method
  (like the paper's classification runs). Adapters at r = 8 on {", ".join(TARGETS)} of all 30 layers
  (210 matrices): SingLoRA (this library; alpha = 8, ramp-up T = 1 % of the steps, init N(0, 1/n)), LoRA, LoRA+
  (B at 16x the learning rate) and DoRA (PEFT 0.21, lora_alpha = 8), dropout 0.
- Task: BBC News section (business, entertainment, politics, sports, tech) from the headline alone (the first
  line of each article, 3-18 tokens, median 7; inputs cut at {settings.max_length} tokens, which cuts none). Fixed
  split built at run time from the installed corpus (`studies/bbc.py`): {settings.split.train_per_class} training,
  {settings.split.val_per_class} validation and {settings.split.test_per_class} test headlines per class
  ({5 * settings.split.train_per_class} / {5 * settings.split.val_per_class} / {5 * settings.split.test_per_class};
  one test headline = {100 / (5 * settings.split.test_per_class):.2f} pt; the test set is study 5's).
- Schedule (the training CLI's defaults): AdamW (betas 0.9, 0.999; weight decay 0), linear decay with 6 % warm-up,
  gradient clipping 1.0, batch {settings.batch_size}, {settings.steps} optimizer steps
  (= {settings.steps * settings.batch_size / (5 * settings.split.train_per_class):.2f} epochs over the training
  headlines; the paper ran one epoch over MNLI's 393k pairs), the same for every method.
- Learning rates: one grid {", ".join(f"{lr:g}" for lr in settings.grid)} for every method, fixed before any run;
  seed-0 validation accuracy picks each method's rate (ties: macro-F1, then the smaller rate); a best rate on the
  grid's edge adds the next grid point (done for: {", ".join(f"{NAMES[m]} {', '.join(f'{lr:g}' for lr in sorted(set(state['grids'][m]) - set(settings.grid)))}" for m in state['grids'] if set(state['grids'][m]) - set(settings.grid)) or "none"}). Then seeds 1..{settings.seeds - 1} at the chosen rate
  (LoRA+ and DoRA) or at every rate (LoRA and SingLoRA: the sensitivity study). The test split chooses nothing.
- Seeds change the adapter / head initialisation and the example order; the split is fixed.

## Zero-shot (the base instruct model, test split, {zero['examples']} headlines)

Prompt (user turn of the chat template, default system prompt): `{PROMPT.replace(chr(10), ' / ')}`.

| score | accuracy % |
|---|---|
| exact match (greedy answer, {zero['max_new_tokens']} new tokens, lower case, punctuation stripped) | {_pct(zero['exact_match'])} |
| answer is one of the five label words (any) | {_pct(zero['valid_answer_rate'])} |
| ranked choice (the label whose answer `word<|im_end|>` is most likely) | {_pct(zero['ranked_choice'])} |

Chance is 20 %. The fine-tuned runs below start from this model with a fresh classification head.

## Adapter parameters (r = 8, all seven projections of every layer)

{md_table(["method", "formula, SmolLM2", "measured (PEFT / this library)", "of LoRA", "formula, LLaMA-7B", "paper"], param_rows)}

SingLoRA stores `max(d_in, d_out) * r` per matrix, LoRA `(d_in + d_out) * r`. On LLaMA-7B (square attention, MLP
4096 <-> 11008) that is {params['singlora']['llama7b'] / params['lora']['llama7b']:.1%} of LoRA: the paper's "60 %".
SmolLM2's GQA makes k/v 576 -> 192 (SingLoRA 576 rows vs LoRA's 768), so here it is
{params['singlora']['formula'] / params['lora']['formula']:.1%}. The classification head (2,880 parameters) is
trained by every method and not counted.

## Method comparison (test accuracy at each method's validation-chosen rate)

{md_table(["method", "lr", "seeds", "test accuracy % (mean ± std)", "macro-F1 %", "min – max", "adapter params", "s / step (median)", "paper (MNLI)"], final_rows)}

Seed-paired differences (test accuracy points; same seed = same head init and example order):

{md_table(["difference", "ours (mean ± std over seeds)", "SingLoRA ahead", "paper"], pair_rows)}

Learning-rate sweep, seed 0, validation accuracy % ({5 * settings.split.val_per_class} headlines):

{md_table(["method", "lr: validation accuracy"], sweep_rows)}

## Learning-rate sensitivity (LoRA vs SingLoRA, test accuracy %, mean ± std over seeds)

{md_table(["method"] + [f"lr {lr:g}" for lr in lrs] + ["spread, whole grid", f"spread, good range ({window})", "spread val, whole grid"], sens_rows)}

Spread = max - min over learning rates of the mean accuracy, in points. Good range = the three consecutive rates
with the best mean validation accuracy over both methods and all seeds.

Seed-paired SingLoRA − LoRA at each rate (test points):

{md_table(["lr", "SingLoRA − LoRA (mean ± std)", "SingLoRA ahead"], by_lr_rows)}

## Convergence

Training loss, mean of the last 8 steps (mean over seeds):

{md_table(["method"] + [f"lr {lr:g}" for lr in lrs], loss_rows)}

The same run with twice the steps ({2 * settings.steps}; the linear schedule stretched to the new length), seed 0,
at the chosen rate, validated every {settings.steps // 4} steps:

{md_table(["method", "lr", f"{settings.steps} steps: val / test %", f"{2 * settings.steps} steps: val / test %", "validation % during the long run (step: acc)", "final training loss"], long_rows)}

{figures_md}

Seconds per step are wall-clock on the shared machine (other jobs running, {settings.jobs} study run(s) at a time):
compare them only roughly.
"""


def first(runs: list[dict[str, Any]], key: str) -> Any:
    """``key`` of the first run that has it (diverged runs have no parameter count or timing)."""
    return next((r[key] for r in runs if r.get(key) is not None), None)


def _median(values: Iterator[float | None]) -> str:
    present = [v for v in values if v is not None]
    return "-" if not present else f"{summarize(present)['median']:.2f}"


def _loss_cell(values: list[float | None] | None) -> str:
    present = [v for v in values or [] if v is not None]
    return "-" if not present else f"{sum(present) / len(present):.3f}"


# ----------------------------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: tiny random Llama, 2 steps per run")
    parser.add_argument("--work", type=Path, default=DEFAULT_WORK, help="run outputs, cache and data split")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "llm_claim")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--lrs", type=float, nargs="+", default=list(GRID), help="the one grid of every method")
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--steps", type=int, default=48, help="optimizer steps per run")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-length", type=int, default=24)
    parser.add_argument("--train-per-class", type=int, default=40)
    parser.add_argument("--val-per-class", type=int, default=30)
    parser.add_argument("--test-per-class", type=int, default=60)
    parser.add_argument("--jobs", type=int, default=2, help="runs trained at a time (one thread each)")
    parser.add_argument("--no-long", action="store_true", help="skip the convergence check (twice-as-long runs)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    limit_threads(1)
    if any(m not in args.methods for m in FULL_GRID):
        raise SystemExit(f"--methods must include {FULL_GRID} (the learning-rate sensitivity study)")
    split = QUICK_SPLIT if args.quick else Split(args.train_per_class, args.val_per_class, args.test_per_class,
                                                  "titles")
    if args.quick:  # 2 steps of batch 4 per run, 2 rates for LoRA / SingLoRA, 1 for the others, 1 seed
        settings = Settings(split, 2, 4, 16, 1, tuple(sorted(args.lrs[:2])), tuple(args.methods), args.jobs, 0)
    else:
        settings = Settings(split, args.steps, args.batch_size, args.max_length, args.seeds, tuple(sorted(args.lrs)),
                            tuple(args.methods), args.jobs)
    bench = make_llm_bench(args.work, split, args.quick)
    lock = lock_work_folder(bench)
    base = base_spec(settings)
    command = command_line("studies.llm_claim", argv)
    args.out.mkdir(parents=True, exist_ok=True)
    model_config = json.loads((Path(bench.model) / "config.json").read_text())
    labels = sorted({row["label"] for row in read_rows(bench.data["train"])})
    start = time.perf_counter()
    for method in settings.methods:
        print(f"{NAMES[method]}: {adapter_params(model_config, method, base.r):,} adapter parameters "
              f"({adapter_params(model_config, method, base.r) / adapter_params(model_config, 'lora', base.r):.1%} "
              "of LoRA)", flush=True)
    zero = zero_shot_cached(args.work, bench, labels)
    print(f"zero-shot: exact match {zero['exact_match']:.3f}, ranked choice {zero['ranked_choice']:.3f}", flush=True)
    grids = {m: list(settings.grid[:1] if args.quick and m not in FULL_GRID else settings.grid) for m in settings.methods}
    complete = False

    def publish() -> None:
        state = state_of(runner, bench, base, settings, grids, zero, model_config)
        notes = {"command": command, "complete": complete, "wall_s": time.perf_counter() - start,
                 "runs": list(runner.results)}
        figures = [f for f in (plot_comparison(state, args.out), plot_lr_curves(
            {m: state["table"][m] for m in FULL_GRID if state["table"].get(m)}, args.out) if any(
            state["table"].get(m) for m in FULL_GRID) else None, plot_convergence(state, args.out, settings.steps)) if f]
        write_json(args.out / "results.json", {
            "study": "llm_claim", "command": command, "complete": complete, "wall_s": notes["wall_s"],
            "environment": environment(), "settings": dataclasses.asdict(settings), "base_run": dataclasses.asdict(base),
            "model": model_config.get("_model_name_or_path", bench.model), "zero_shot": zero,
            **{k: state[k] for k in ("chosen", "window", "sensitivity", "params", "grids", "losses", "run_s")},
            "runs": {m: {f"{lr:g}": runs for lr, runs in by_lr.items()} for m, by_lr in state["table"].items()},
            "long": state["long"], "curves": state["curves"],
        })
        write_text(args.out / "REPORT.md", report(state, settings, notes, figures))

    runner = Runner(bench, settings.jobs, publish)
    seed0_sweeps(runner, base, settings, grids)
    publish()
    later = []
    chosen = {m: best_lr(sweep_results(runner, base, m, grids[m])) for m in settings.methods}
    for seed in range(1, settings.seeds):
        for method in settings.methods:
            rates = grids[method] if method in FULL_GRID else [chosen[method]]
            later += [dataclasses.replace(base, method=method, lr=lr, seed=seed) for lr in rates]
    if not args.no_long:  # the convergence check first: it is the longest
        later = [long_spec(dataclasses.replace(base, method=m, lr=chosen[m], seed=0)) for m in FULL_GRID] + later
    runner.run(later)
    complete = True
    publish()
    lock.close()
    return {"results": runner.results, "chosen": chosen, "zero_shot": zero, "out": args.out}


if __name__ == "__main__":
    main()
