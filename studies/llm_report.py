"""The LLM study's report (``REPORT.md``) and plots, and the statistics they show (``studies/llm_claim.py``).

``state`` is ``llm_claim.state_of``'s dict: the runs by method and learning rate, each method's chosen rate and its
runs, the convergence runs, training curves, the zero-shot result and parameter counts.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from studies.bbc import mean_std
from studies.common import md_table, pyplot, save_figure, summarize
from studies.llm_task import FULL_GRID, PROMPT, TARGETS, Settings, final_loss
from studies.lr_sensitivity import plot as plot_lr_curves

PAPER = {"singlora": 91.3, "lora": 89.1, "loraplus": 90.2, "dora": 90.6}
PAPER_PARAMS = {"singlora": "12M", "lora": "20M", "loraplus": "20M", "dora": "21M"}
PAPER_SPREAD = "LoRA up to 4.8 points, SingLoRA about 1 point"
NAMES = {"singlora": "SingLoRA", "lora": "LoRA", "loraplus": "LoRA+", "dora": "DoRA"}
COLORS = {"singlora": "tab:red", "lora": "tab:blue", "loraplus": "tab:green", "dora": "tab:purple"}


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


# ----------------------------------------------------------------------------------------------------------------
# Report and plots


def plots(state: dict[str, Any], out: Path, steps: int) -> list[str]:
    """Write the study's PNGs into ``out``; their file names (those that have data so far)."""
    sensitivity = {m: state["table"][m] for m in FULL_GRID if state["table"].get(m)}
    figures = [plot_comparison(state, out), plot_lr_curves(sensitivity, out) if sensitivity else None,
               plot_convergence(state, out, steps)]
    return [f for f in figures if f]


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
    for method, runs in state["long"].items():
        if runs[0]["seed"] == 0 and runs[0]["curve"]["loss"]:
            steps, losses = zip(*runs[0]["curve"]["loss"])
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
    for method, runs in state["long"].items():
        for run in runs:
            if run["curve"]["val"]:
                xs, ys = zip(*run["curve"]["val"])
                ax.plot(xs, [100 * y for y in ys], color=COLORS[method], lw=0.6, alpha=0.5)
        mean = mean_curve([run["curve"]["val"] for run in runs])
        if mean:
            xs, ys = zip(*mean)
            ax.plot(xs, [100 * y for y in ys], marker="o", color=COLORS[method],
                    label=f"{NAMES[method]} lr {state['chosen'][method]:g}, {2 * steps} steps")
        standard = standard_runs(state, method)
        ax.scatter([steps], [summarize(100 * r["val_accuracy"] for r in standard)["mean"]], marker="*", s=90,
                   color=COLORS[method], label=f"{NAMES[method]}, the {steps}-step runs' end")
    ax.set_xlabel("optimizer step"), ax.set_ylabel("validation accuracy (%)"), ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    ax.set_title("convergence check: mean over seeds (thin: single seeds)", fontsize=9)
    save_figure(fig, out / "convergence.png")
    return "convergence.png"


def standard_runs(state: dict[str, Any], method: str) -> list[dict[str, Any]]:
    """The standard-length runs at the chosen rate with the same seeds as ``method``'s long runs (seed order)."""
    by_seed = {r["spec"]["seed"]: r for r in state["finals"][method]}
    return [by_seed[run["seed"]] for run in state["long"][method] if run["seed"] in by_seed]


def mean_curve(curves: list[list[list[float]]]) -> list[tuple[float, float]]:
    """Mean over curves of ``[[step, value], ...]`` at the steps every curve has."""
    steps = sorted(set.intersection(*(set(step for step, _ in curve) for curve in curves))) if curves else []
    values = [dict((step, value) for step, value in curve) for curve in curves]
    return [(step, sum(v[step] for v in values) / len(values)) for step in steps]


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}"


def _rows(state: dict[str, Any]) -> dict[str, Any]:
    """The rows of the report's tables (lists of cells), and ``lrs``: every rate any sensitivity method ran."""
    table, finals, params = state["table"], state["finals"], state["params"]
    param_rows = [[NAMES[m], f"{params[m]['formula']:,}",
                   f"{params[m]['measured']:,}" if params[m]["measured"] else "-",
                   f"{params[m]['formula'] / params['lora']['formula']:.1%}" if "lora" in params else "-",
                   f"{params[m]['llama7b'] / 1e6:.1f}M", PAPER_PARAMS[m]] for m in params]
    sweep_rows = [[NAMES[m], "; ".join(f"{lr:g}: {_pct(table[m][lr][0]['val_accuracy'])}"
                                       + (" **(chosen)**" if lr == state["chosen"].get(m) else "")
                                       for lr in sorted(table[m]))] for m in table if table[m]]
    final_rows = [[NAMES[m], f"{state['chosen'][m]:g}", len(runs), mean_std(runs), mean_std(runs, "test_macro_f1"),
                   f"{100 * min(r['test_accuracy'] for r in runs):.1f} – "
                   f"{100 * max(r['test_accuracy'] for r in runs):.1f}",
                   f"{first(runs, 'adapter_params'):,}",
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
    for method, runs in state["long"].items():
        standard, longer = standard_runs(state, method), [run["result"] for run in runs]
        mean, std, ahead, n = paired(longer, standard)
        long_rows.append([NAMES[method], f"{state['chosen'][method]:g}", n,
                          f"{mean_std(standard, 'val_accuracy')} / {mean_std(standard)}",
                          f"{mean_std(longer, 'val_accuracy')} / {mean_std(longer)}",
                          f"{mean:+.1f} ± {std:.1f} ({ahead}/{n} higher)",
                          ", ".join(f"{s}: {100 * a:.1f}" for s, a in mean_curve([r["curve"]["val"] for r in runs])),
                          _loss_cell([final_loss(r["curve"]) for r in runs])])
    return {"param_rows": param_rows, "sweep_rows": sweep_rows, "final_rows": final_rows, "pair_rows": pair_rows,
            "lrs": lrs, "sens_rows": sens_rows, "by_lr_rows": by_lr_rows, "loss_rows": loss_rows,
            "long_rows": long_rows}


def _design(settings: Settings, added: str) -> str:
    """The report's "Design" section (``added``: the rates added where a best rate sat on the grid's edge)."""
    return f"""## Design

- Model: SmolLM2-135M-Instruct (30 Llama layers, GQA: k/v 576 -> 192, MLP 576 <-> 1536, float32), loaded as
  `LlamaForSequenceClassification`: a fresh 576 -> 5 `score` head on the last token, trained fully by every method
  (like the paper's classification runs). Adapters at r = 8 on {", ".join(TARGETS)} of all 30 layers
  (210 matrices): SingLoRA (this library; alpha = 8, ramp-up T = 1 % of the steps, at least 1, init N(0, 1/n)), LoRA, LoRA+
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
  grid's edge adds the next grid point (added: {added}). Then seeds 1..{settings.seeds - 1} at the chosen rate
  (LoRA+ and DoRA) or at every rate (LoRA and SingLoRA: the sensitivity study). The test split chooses nothing.
- Seeds change the adapter / head initialisation and the example order; the split is fixed."""


def _zero_shot(zero: dict[str, Any]) -> str:
    """The report's zero-shot section: the base instruct model's scores ``zero`` (``zero_shot_cached``)."""
    return f"""## Zero-shot (the base instruct model, test split, {zero['examples']} headlines)

Prompt (user turn of the chat template, default system prompt): `{PROMPT.replace(chr(10), ' / ')}`.

| score | accuracy % |
|---|---|
| exact match (greedy answer, {zero['max_new_tokens']} new tokens, lower case, punctuation stripped) | {_pct(zero['exact_match'])} |
| answer is one of the five label words (any) | {_pct(zero['valid_answer_rate'])} |
| ranked choice (the label whose answer `word<|im_end|>` is most likely) | {_pct(zero['ranked_choice'])} |

Chance is 20 %. The fine-tuned runs below start from this model with a fresh classification head."""


def report(state: dict[str, Any], settings: Settings, notes: dict[str, Any], figures: list[str]) -> str:
    """Study 6's REPORT.md from the study's ``state`` (``state_of``), its settings, the invocation's notes
    (command, complete, wall_s, runs) and the figures' file names."""
    zero, params, rows = state["zero_shot"], state["params"], _rows(state)
    lrs = rows["lrs"]
    window = ", ".join(f"{lr:g}" for lr in state["window"]) or "-"
    added = "; ".join(f"{NAMES[m]} {', '.join(f'{lr:g}' for lr in sorted(set(grid) - set(settings.grid)))}"
                      for m, grid in state["grids"].items() if set(grid) - set(settings.grid)) or "none"
    status = "complete" if notes["complete"] else "PARTIAL (still running or stopped early: see n)"
    figures_md = "\n\n".join(f"![{f}]({f})" for f in figures)
    return f"""# Study 6: the paper's LLM claim on SmolLM2-135M-Instruct (BBC News section from the headline)

Command: `{notes['command']}`   Status: {status}. Wall time of this invocation: {notes['wall_s']:.0f} s (cached runs
count 0); the runs below took {state['run_s']:.0f} s in total when they ran ({len(notes['runs'])} runs).
Machine: 2-core CPU shared with other jobs (0 to ~7 others over the study: seconds per run are not comparable),
one thread per run, `nice -n 10`, {settings.jobs} run(s) at a time.

Paper's claims: LLaMA-7B on MNLI, r = 8 on all seven projections: SingLoRA 91.3 % (12M parameters, "60 % of LoRA's
budget"), LoRA 89.1 % (20M), LoRA+ 90.2 % (20M), DoRA 90.6 % (21M); learning-rate sensitivity: {PAPER_SPREAD}.

{_design(settings, added)}

{_zero_shot(zero)}

## Adapter parameters (r = 8, all seven projections of every layer)

{md_table(["method", "formula, SmolLM2", "measured (PEFT / this library)", "of LoRA", "formula, LLaMA-7B", "paper"], rows['param_rows'])}

SingLoRA stores `max(d_in, d_out) * r` per matrix, LoRA `(d_in + d_out) * r`. On LLaMA-7B (square attention, MLP
4096 <-> 11008) that is {params['singlora']['llama7b'] / params['lora']['llama7b']:.1%} of LoRA: the paper's "60 %".
SmolLM2's GQA makes k/v 576 -> 192 (SingLoRA 576 rows vs LoRA's 768), so here it is
{params['singlora']['formula'] / params['lora']['formula']:.1%}. The classification head (2,880 parameters) is
trained by every method and not counted.

## Method comparison (test accuracy at each method's validation-chosen rate)

{md_table(["method", "lr", "seeds", "test accuracy % (mean ± std)", "macro-F1 %", "min – max", "adapter params", "paper (MNLI)"], rows['final_rows'])}

Seed-paired differences (test accuracy points; same seed = same head init and example order):

{md_table(["difference", "ours (mean ± std over seeds)", "SingLoRA ahead", "paper"], rows['pair_rows'])}

Learning-rate sweep, seed 0, validation accuracy % ({5 * settings.split.val_per_class} headlines):

{md_table(["method", "lr: validation accuracy"], rows['sweep_rows'])}

## Learning-rate sensitivity (LoRA vs SingLoRA, test accuracy %, mean ± std over seeds)

{md_table(["method"] + [f"lr {lr:g}" for lr in lrs] + ["spread, whole grid", f"spread, good range ({window})", "spread val, whole grid"], rows['sens_rows'])}

Spread = max - min over learning rates of the mean accuracy, in points. Good range = the three consecutive rates
with the best mean validation accuracy over both methods and all seeds.

Seed-paired SingLoRA − LoRA at each rate (test points):

{md_table(["lr", "SingLoRA − LoRA (mean ± std)", "SingLoRA ahead"], rows['by_lr_rows'])}

## Convergence

Training loss, mean of the last 8 steps (mean over seeds):

{md_table(["method"] + [f"lr {lr:g}" for lr in lrs], rows['loss_rows'])}

The same runs with twice the steps ({2 * settings.steps}; the linear schedule stretched to the new length) at the
chosen rate, validated every {max(1, settings.steps // 4)} steps (mean ± std over seeds; the difference is paired by seed):

{md_table(["method", "lr", "seeds", f"{settings.steps} steps: val / test %", f"{2 * settings.steps} steps: val / test %", f"test, {2 * settings.steps} − {settings.steps} steps", "validation % during the long runs, mean over seeds (step: acc)", "final training loss"], rows['long_rows'])}

{figures_md}

No timings here: the runs shared the machine with a changing load (each run's seconds per step are in
results.json); speed is measured by `benchmarks/` (`python -m benchmarks.run`).
"""


def first(runs: list[dict[str, Any]], key: str) -> Any:
    """``key`` of the first run that has it (diverged runs have no parameter count or timing)."""
    return next((r[key] for r in runs if r.get(key) is not None), None)


def _loss_cell(values: list[float | None] | None) -> str:
    present = [v for v in values or [] if v is not None]
    return "-" if not present else f"{sum(present) / len(present):.3f}"
