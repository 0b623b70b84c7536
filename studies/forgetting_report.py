"""The forgetting study's statistics, plots and ``REPORT.md`` (``studies/forgetting.py``).

``parts`` maps ``llm`` / ``sft`` to ``{"model", "rates" (chosen per method), "base" (held-out loss of the base
model), "runs": [{"method", "lr", "seed", "heldout": {"loss", "delta", "relative", ...}, "task": {...}}]}``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from studies.common import md_table, pyplot, save_figure, summarize

NAMES = {"singlora": "SingLoRA", "lora": "LoRA", "loraplus": "LoRA+", "dora": "DoRA"}
COLORS = {"singlora": "tab:red", "lora": "tab:blue", "loraplus": "tab:green", "dora": "tab:purple"}
TASK_METRIC = {"llm": ("test_accuracy", "test accuracy (BBC headlines)"),
               "sft": ("test_eval_loss", "answer loss on the demo's 40 test instructions")}
PART_TITLES = {"llm": "Study 6 runs (sequence classification of BBC headlines, 48 steps)",
               "sft": "The sft demo's runs (BBC section instructions, 30 steps)"}


def at_chosen_rate(part: dict[str, Any], method: str) -> list[dict[str, Any]]:
    """The runs of ``method`` at its chosen rate, by seed."""
    runs = [r for r in part["runs"] if r["method"] == method and r["lr"] == part["rates"][method]]
    return sorted(runs, key=lambda r: r["seed"])


def summarise(parts: dict[str, Any], seeds: dict[str, int]) -> dict[str, Any]:
    """Per part and method at its chosen rate: the held-out loss change (nats per token, and relative), the task
    metric, and the seed-paired difference from SingLoRA's change (positive = the method forgets more); a part is
    ``complete`` when every method has its ``seeds[part]`` seeds."""
    out: dict[str, Any] = {}
    for name, part in parts.items():
        metric = TASK_METRIC[name][0]
        methods = {}
        reference = {r["seed"]: r["heldout"]["delta"] for r in at_chosen_rate(part, "singlora")} \
            if "singlora" in part["rates"] else {}
        for method in part["rates"]:
            runs = at_chosen_rate(part, method)
            if not runs:
                continue
            paired = [r["heldout"]["delta"] - reference[r["seed"]] for r in runs if r["seed"] in reference]
            methods[method] = {
                "lr": part["rates"][method], "seeds": len(runs),
                "delta": summarize(r["heldout"]["delta"] for r in runs),
                "relative": summarize(r["heldout"]["relative"] for r in runs),
                "task": summarize(r["task"][metric] for r in runs),
                "minus_singlora": summarize(paired) if paired and method != "singlora" else None,
                "singlora_forgets_less": sum(p > 0 for p in paired) if method != "singlora" else None,
            }
        out[name] = {"base_loss": part["base"]["loss"], "tokens": part["base"]["tokens"], "methods": methods,
                     "complete": all(m["seeds"] >= seeds[name] for m in methods.values())}
    return out


def plots(parts: dict[str, Any], summary: dict[str, Any], out: Path) -> list[str]:
    """``forgetting.png`` (change per method, seeds as dots) and ``forgetting_vs_task.png`` (every run)."""
    if not parts:
        return []
    plt = pyplot()
    fig, axes = plt.subplots(1, len(parts), figsize=(5.2 * len(parts), 3.8), squeeze=False)
    for ax, (name, part) in zip(axes[0], parts.items()):
        methods = list(summary[name]["methods"])
        for i, method in enumerate(methods):
            deltas = [r["heldout"]["delta"] for r in at_chosen_rate(part, method)]
            ax.bar(i, summary[name]["methods"][method]["delta"]["mean"], color=COLORS[method], alpha=0.5)
            ax.scatter([i + 0.08 * (j - 1) for j in range(len(deltas))], deltas, color=COLORS[method], s=14,
                       edgecolor="black", linewidth=0.5, zorder=3)
        ax.set_xticks(range(len(methods)), [f"{NAMES[m]}\nlr {part['rates'][m]:g}" for m in methods], fontsize=8)
        ax.axhline(0, color="gray", lw=0.8), ax.grid(axis="y", alpha=0.3)
        ax.set_title(PART_TITLES[name], fontsize=9)
    axes[0][0].set_ylabel("held-out loss after - before (nats / token)")
    fig.suptitle("Forgetting: change of the LM loss on Debian fortunes (bars: mean; dots: seeds)", fontsize=10)
    save_figure(fig, out / "forgetting.png")

    fig, axes = plt.subplots(1, len(parts), figsize=(5.2 * len(parts), 3.8), squeeze=False)
    for ax, (name, part) in zip(axes[0], parts.items()):
        metric, label = TASK_METRIC[name]
        for method in summary[name]["methods"]:
            for chosen in (True, False):
                runs = [r for r in part["runs"] if r["method"] == method and (r["lr"] == part["rates"][method]) == chosen]
                ax.scatter([r["task"][metric] for r in runs], [r["heldout"]["delta"] for r in runs], s=18,
                           color=COLORS[method] if chosen else "none", edgecolor=COLORS[method],
                           label=f"{NAMES[method]}{'' if chosen else ' (other rates, seed 0)'}")
        ax.set_xlabel(label), ax.axhline(0, color="gray", lw=0.8), ax.grid(alpha=0.3)
        ax.set_title(PART_TITLES[name], fontsize=9), ax.legend(fontsize=6)
    axes[0][0].set_ylabel("held-out loss after - before (nats / token)")
    fig.suptitle("What each run learnt vs what it forgot (filled: chosen rate)", fontsize=10)
    save_figure(fig, out / "forgetting_vs_task.png")
    return ["forgetting.png", "forgetting_vs_task.png"]


def _pm(s: dict[str, float] | None, scale: float = 1.0, digits: int = 3) -> str:
    return "-" if not s else f"{scale * s['mean']:+.{digits}f} ± {scale * s['std']:.{digits}f}"


def report(data: dict[str, Any], figures: list[str]) -> str:
    from studies.forgetting import __doc__ as design

    sections = []
    for name, part in data["parts"].items():
        s = data["summary"][name]
        metric, label = TASK_METRIC[name]
        rows = [[NAMES[m], f"{v['lr']:g}", v["seeds"], _pm(v["delta"]), _pm(v["relative"], 100, 2),
                 f"{v['task']['mean']:.3f} ± {v['task']['std']:.3f}", _pm(v["minus_singlora"]),
                 "-" if v["singlora_forgets_less"] is None else f"{v['singlora_forgets_less']}/{v['seeds']}"]
                for m, v in s["methods"].items()]
        text = [f"### {PART_TITLES[name]}",
                f"Base model's held-out loss: {s['base_loss']:.4f} nats per token over {s['tokens']} tokens.",
                md_table(["method", "lr (chosen)", "seeds", "change, nats/token", "change, %", label,
                          "change - SingLoRA's (same seed)", "SingLoRA forgets less"], rows)]
        if name == "sft":
            sweep = sorted((r for r in part["runs"] if r["seed"] == 0), key=lambda r: (r["method"], r["lr"]))
            text += ["Seed-0 sweep (the rate with the lowest validation answer loss is chosen):",
                     md_table(["method", "lr", "validation answer loss", "test answer loss", "test exact match",
                               "held-out change, nats/token"],
                              [[NAMES[r["method"]], f"{r['lr']:g}", f"{r['task']['val_eval_loss']:.3f}",
                                f"{r['task']['test_eval_loss']:.3f}", f"{r['task']['test_exact_match']:.3f}",
                                f"{r['heldout']['delta']:+.4f}"] for r in sweep])]
        sections.append("\n\n".join(text))
    figures_text = "\n\n".join(f"![{f}]({f})" for f in figures)
    examples = "\n".join(f"- {t}" for t in data["texts"]["examples"])
    return f"""# Study 8: forgetting (issue 26, part 2)

Command: `{data['command']}`   Wall time of this invocation: {data['wall_s']:.0f} s (cached runs and evaluations
count 0). One CPU thread, `nice -n 19`, the shared 2-core machine.

Question: is SingLoRA's ramp / single-matrix update kinder to what the model knew? PEFT's method comparison finds
every method above LoRA forgets 1.3-4.3x more.

## Design

{design.split(chr(10) + chr(10), 1)[1].split("Run:")[0].strip()}

Held-out text: {data['texts']['count']} fortunes from `{data['texts']['source']}`, e.g.

{examples}

## Results

Change = held-out loss of the tuned model - the base model's (nats per token; positive = it got worse at general
text), mean ± std over seeds, each method at its chosen rate. The last two columns pair seeds (same data order and
head initialisation).

{(chr(10) * 2).join(sections)}

## Plots

{figures_text}
"""
