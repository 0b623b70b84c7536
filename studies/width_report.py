"""The width-transfer study's statistics, plots and ``REPORT.md`` (``studies/width_transfer.py``).

``table`` is ``width_transfer.collect``'s ``{method: {width: {exponent: [per-seed results]}}}``; a result's
``final`` is its test loss / the base network's (``None``: not finite). Learning rates are ``2^exponent``.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from studies.common import fmt, md_table, pyplot, save_figure, summarize

NAMES = {"singlora": "SingLoRA", "lora": "LoRA", "loraplus": "LoRA+"}
COLORS = {"singlora": "tab:red", "lora": "tab:blue", "loraplus": "tab:green"}
DIVERGED = 10.0  # the loss a non-finite run counts as (every finite diverged run here ends near 2-3)
RULES = {"same lr": 0.0, "lr ~ n^-1/2": 0.5, "lr ~ n^-1": 1.0}  # lr transferred from the smallest width

Table = dict[str, dict[int, dict[int, list[dict[str, Any]]]]]


def loss_of(result: dict[str, Any]) -> float:
    return DIVERGED if result["final"] is None else min(result["final"], DIVERGED)


def seed_curves(by_e: dict[int, list[dict[str, Any]]]) -> dict[int, dict[int, float]]:
    """``{seed: {exponent: loss}}`` for the seeds that have every exponent of the grid."""
    curves: dict[int, dict[int, float]] = {}
    for e, runs in by_e.items():
        for run in runs:
            curves.setdefault(run["seed"], {})[e] = loss_of(run)
    return {seed: curve for seed, curve in sorted(curves.items()) if len(curve) == len(by_e)}


def optimum(curve: dict[int, float]) -> dict[str, Any]:
    """The best exponent of one loss-vs-log2(lr) curve: the grid minimum, refined by a parabola through log loss
    at it and its two neighbours (kept within half a grid step of it; not refined at a grid edge or next to a run
    that learnt nothing, loss >= 1). ``edge``: the minimum is at an end of the grid."""
    exponents = sorted(curve)
    i = min(range(len(exponents)), key=lambda j: (curve[exponents[j]], exponents[j]))
    best, edge = exponents[i], i in (0, len(exponents) - 1)
    refined = float(best)
    if not edge and max(curve[exponents[i - 1]], curve[exponents[i + 1]]) < 1.0:
        refined = vertex([(e, math.log(curve[e])) for e in exponents[i - 1 : i + 2]])
    stable = [e for e in exponents if curve[e] < 1.0]
    return {"exponent": refined, "grid": best, "edge": edge, "loss": curve[best],
            "max_stable": max(stable) if stable else None}


def vertex(points: list[tuple[float, float]]) -> float:
    """The minimum of the parabola through three points ``(x, y)`` (x ascending, the middle y lowest), kept within
    half the spacing of the middle x."""
    (x0, y0), (x1, y1), (x2, y2) = points
    denominator = (x0 - x1) * (x0 - x2) * (x1 - x2)
    a = (x2 * (y1 - y0) + x1 * (y0 - y2) + x0 * (y2 - y1)) / denominator
    b = (x2**2 * (y0 - y1) + x1**2 * (y2 - y0) + x0**2 * (y1 - y2)) / denominator
    if a <= 0:
        return x1
    return max(x1 - (x1 - x0) / 2, min(x1 + (x2 - x1) / 2, -b / (2 * a)))


def interpolated(curve: dict[int, float], exponent: float) -> float:
    """The loss at ``exponent``, linear in log loss between grid points (``nan`` outside the grid)."""
    exponents = sorted(curve)
    if not exponents[0] <= exponent <= exponents[-1]:
        return math.nan
    low = max(e for e in exponents if e <= exponent)
    high = min(e for e in exponents if e >= exponent)
    if low == high:
        return curve[low]
    t = (exponent - low) / (high - low)
    return math.exp((1 - t) * math.log(curve[low]) + t * math.log(curve[high]))


def slope(xs: list[float], ys: list[float]) -> float:
    """Least-squares slope of ``ys`` against ``xs``."""
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)


def analyse(table: Table) -> dict[str, Any]:
    """Per method: per width the optimum of every seed and their summary; the slope of log2 lr* against log2 n
    per seed (the seeds that reached every width); the loss of each transfer rule relative to each width's best."""
    out: dict[str, Any] = {}
    for method, by_n in table.items():
        widths = sorted(by_n)
        per_width, optima = {}, {}
        for n in widths:
            curves = seed_curves(by_n[n])
            optima[n] = {seed: optimum(curve) for seed, curve in curves.items()}
            median_curve = {e: summarize(loss_of(r) for r in runs)["median"] for e, runs in by_n[n].items()}
            entry = {"seeds": len(curves), "median_curve": {str(e): v for e, v in sorted(median_curve.items())},
                     "median_optimum": optimum(median_curve)}
            if curves:
                entry["optimum"] = summarize(o["exponent"] for o in optima[n].values())
                entry["best_loss"] = summarize(o["loss"] for o in optima[n].values())
                entry["edges"] = sum(o["edge"] for o in optima[n].values())
                stable = [o["max_stable"] for o in optima[n].values() if o["max_stable"] is not None]
                entry["max_stable"] = summarize(stable) if stable else None
            per_width[str(n)] = entry
        seeds = sorted(set.intersection(*(set(optima[n]) for n in widths))) if widths else []
        logs = [math.log2(n) for n in widths]
        slopes = {"optimum": [slope(logs, [optima[n][s]["exponent"] for n in widths]) for s in seeds]
                  if len(widths) > 1 else [],
                  "max_stable": [slope(logs, [optima[n][s]["max_stable"] for n in widths]) for s in seeds
                                 if len(widths) > 1 and all(optima[n][s]["max_stable"] is not None for n in widths)]}
        local = {f"{a}-{b}": summarize((optima[b][s]["exponent"] - optima[a][s]["exponent"]) / math.log2(b / a)
                                       for s in seeds) for a, b in zip(widths, widths[1:]) if seeds}
        out[method] = {"widths": per_width, "seeds_at_every_width": seeds,
                       "slope": {k: summarize(v) if v else None for k, v in slopes.items()},
                       "slope_per_seed": slopes, "local_slope": local, "transfer": transfer(by_n, optima, seeds)}
    return out


def transfer(by_n: dict[int, dict[int, list[dict[str, Any]]]], optima: dict[int, dict[int, dict[str, Any]]],
             seeds: list[int]) -> dict[str, dict[str, Any]]:
    """Each rule of ``RULES``: tune the rate on the grid at the smallest width (per seed), scale it by
    ``(n / n_min)^-p``; the loss there over the best loss at width n (1 = as good as tuning at n), per width."""
    widths = sorted(by_n)
    result: dict[str, dict[str, Any]] = {}
    for rule, p in RULES.items():
        per_width = {}
        for n in widths:
            ratios = []
            for seed in seeds:
                curve = seed_curves(by_n[n])[seed]
                exponent = optima[widths[0]][seed]["grid"] - p * math.log2(n / widths[0])
                ratios.append(interpolated(curve, exponent) / optima[n][seed]["loss"])
            finite = [r for r in ratios if not math.isnan(r)]
            per_width[str(n)] = {"per_seed": ratios, **(summarize(finite) if finite else {})}
        result[rule] = per_width
    return result


def extend_grids(analysis: dict[str, Any], grids: dict[str, list[int]], added: dict[tuple[str, int], int],
                 limit: int) -> bool:
    """Add the next exponent on each side of a method's grid where some width's or seed's optimum sits on that
    edge (at most ``limit`` per side); whether any grid grew."""
    grew = False
    for method, grid in grids.items():
        if method not in analysis:
            continue
        edges = set()
        for entry in analysis[method]["widths"].values():
            candidates = [entry["median_optimum"]["grid"]]
            if "optimum" in entry:
                candidates += [entry["optimum"]["min"], entry["optimum"]["max"]]
            edges.update(-1 if c <= min(grid) else 1 for c in candidates if c <= min(grid) or c >= max(grid))
        for side in sorted(edges):
            if added[(method, side)] < limit:
                grid.append(min(grid) - 1 if side < 0 else max(grid) + 1)
                grid.sort()
                added[(method, side)] += 1
                grew = True
    return grew


# ----------------------------------------------------------------------------------------------------------------
# Plots


def plots(table: Table, analysis: dict[str, Any], out: Path) -> list[str]:
    """``loss_vs_lr.png`` (the muP-style plot), ``loss_vs_scaled_lr.png``, ``optimum_vs_width.png``."""
    if not table:
        return []
    return [plot_curves(table, analysis, out, 0.0, "loss_vs_lr.png"),
            plot_curves(table, analysis, out, 0.5, "loss_vs_scaled_lr.png"), plot_optima(analysis, out)]


def plot_curves(table: Table, analysis: dict[str, Any], out: Path, power: float, name: str) -> str:
    """Median test loss against log2(lr * (n / n_min)^power), one curve per width (band: min - max over seeds)."""
    plt = pyplot()
    import matplotlib

    methods = list(table)
    fig, axes = plt.subplots(1, len(methods), figsize=(4.6 * len(methods), 3.8), squeeze=False, sharey=True)
    all_widths = sorted({n for by_n in table.values() for n in by_n})
    colors = matplotlib.colormaps["viridis"]
    for ax, method in zip(axes[0], methods):
        for i, n in enumerate(sorted(table[method])):
            color = colors(i / max(1, len(all_widths) - 1))
            by_e = table[method][n]
            es = sorted(by_e)
            xs = [e + power * math.log2(n / all_widths[0]) for e in es]
            losses = [[loss_of(r) for r in by_e[e]] for e in es]
            ax.plot(xs, [summarize(v)["median"] for v in losses], "-o", ms=3, color=color, label=f"n = {n}")
            ax.fill_between(xs, [min(v) for v in losses], [max(v) for v in losses], color=color, alpha=0.15)
            best = analysis[method]["widths"][str(n)]["median_optimum"]
            ax.plot(best["grid"] + power * math.log2(n / all_widths[0]), best["loss"], "*", ms=11, color=color,
                    markeredgecolor="black")
        ax.set_yscale("log"), ax.set_ylim(top=3), ax.grid(alpha=0.3), ax.set_title(NAMES[method])
        ax.axhline(1.0, color="gray", lw=0.8, ls="--")
        ax.set_xlabel("log2 lr" if power == 0 else f"log2 (lr x (n / {all_widths[0]})^{power:g})")
    axes[0][0].set_ylabel("test loss / base network's (median of seeds)")
    axes[0][-1].legend(fontsize=8)
    fig.suptitle("loss vs learning rate, one curve per width (stars: minimum of the median curve)" if power == 0 else
                 f"the same with the rate scaled by n^{power:g}: aligned optima = the rule transfers", fontsize=10)
    save_figure(fig, out / name)
    return name


def plot_optima(analysis: dict[str, Any], out: Path) -> str:
    """log2 of the best rate (mean ± std over seeds) and of the largest stable rate against log2 width."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for method, a in analysis.items():
        widths = [int(n) for n, w in a["widths"].items() if "optimum" in w]
        if not widths:
            continue
        xs = [math.log2(n) for n in widths]
        ys = [a["widths"][str(n)]["optimum"]["mean"] for n in widths]
        ax.errorbar(xs, ys, yerr=[a["widths"][str(n)]["optimum"]["std"] for n in widths], fmt="-o", capsize=3,
                    color=COLORS[method], label=f"{NAMES[method]}: best lr")
        stable = [(x, a["widths"][str(n)]["max_stable"]["mean"]) for x, n in zip(xs, widths)
                  if a["widths"][str(n)]["max_stable"]]
        if stable:
            ax.plot(*zip(*stable), ":^", mfc="none", color=COLORS[method], label=f"{NAMES[method]}: largest stable lr")
        if method == "singlora":
            for p, style in ((0.0, (0, (1, 3))), (0.5, "--"), (1.0, "-.")):
                ax.plot(xs, [ys[0] - p * (x - xs[0]) for x in xs], ls=style, color="gray", lw=0.9,
                        label=f"slope -{p:g} (lr ~ n^-{p:g})")
    widths = sorted({int(n) for a in analysis.values() for n in a["widths"]})
    ax.set_xticks([math.log2(n) for n in widths], [str(n) for n in widths])
    ax.set_xlabel("width n (log scale)"), ax.set_ylabel("log2 learning rate"), ax.grid(alpha=0.3), ax.legend(fontsize=7)
    ax.set_title("best learning rate vs width (mean ± std over seeds)", fontsize=10)
    save_figure(fig, out / "optimum_vs_width.png")
    return "optimum_vs_width.png"


# ----------------------------------------------------------------------------------------------------------------
# Report


def _pm(s: dict[str, float] | None, digits: int = 2) -> str:
    return "-" if not s else f"{s['mean']:.{digits}f} ± {s['std']:.{digits}f}"


def optimum_table(analysis: dict[str, Any], widths: list[int]) -> str:
    rows = []
    for method, a in analysis.items():
        for n in widths:
            w = a["widths"].get(str(n))
            if w and "optimum" in w:
                rows.append([NAMES[method], n, w["seeds"], _pm(w["optimum"]), f"2^{w['median_optimum']['grid']}",
                             fmt(w["best_loss"]["median"]), _pm(w["max_stable"], 1), w["edges"]])
    return md_table(["method", "n", "seeds", "log2 best lr", "grid best (median curve)", "best loss",
                     "log2 largest stable lr", "edge minima"], rows)


def slope_table(analysis: dict[str, Any]) -> str:
    """The fitted slopes, and the local slope between consecutive widths (mean ± std over seeds)."""
    pairs = list(next(iter(analysis.values()))["local_slope"]) if analysis else []
    rows = [[NAMES[m], _pm(a["slope"]["optimum"]), _pm(a["slope"]["max_stable"]), len(a["seeds_at_every_width"]),
             " ".join(f"{v:+.2f}" for v in a["slope_per_seed"]["optimum"]),
             *(_pm(a["local_slope"].get(pair)) for pair in pairs)] for m, a in analysis.items()]
    return md_table(["method", "slope of best lr", "slope of largest stable lr", "seeds", "per seed",
                     *(f"local slope {pair}" for pair in pairs)], rows)


def transfer_table(analysis: dict[str, Any], widths: list[int]) -> str:
    rows = []
    for method, a in analysis.items():
        for rule in RULES:
            entries = [a["transfer"][rule].get(str(n), {}) for n in widths]
            rows.append([NAMES[method], rule, *(f"{e['median']:.2f} ({e['min']:.2f}-{e['max']:.2f})"
                                                if "median" in e else "-" for e in entries)])
    return md_table(["method", "rule", *(f"n = {n}" for n in widths)], rows)


def grid_tables(analysis: dict[str, Any], widths: list[int]) -> str:
    """Per method: the median loss at every (width, rate)."""
    tables = []
    for method, a in analysis.items():
        exponents = sorted({int(e) for w in a["widths"].values() for e in w["median_curve"]})
        rows = [[n, *(fmt(a["widths"][str(n)]["median_curve"].get(str(e), math.nan)) for e in exponents)]
                for n in widths if str(n) in a["widths"]]
        tables.append(f"**{NAMES[method]}** (median over seeds of test loss / base network's)\n\n"
                      + md_table(["n \\ lr", *(f"2^{e}" for e in exponents)], rows))
    return "\n\n".join(tables)


def report(table: Table, analysis: dict[str, Any], data: dict[str, Any], figures: list[str]) -> str:
    from studies.width_transfer import __doc__ as design

    methods = list(analysis)
    widths = sorted({n for by_n in table.values() for n in by_n})
    runs = sum(len(runs) for by_n in table.values() for by_e in by_n.values() for runs in by_e.values())
    seconds = sum(r["seconds"] for by_n in table.values() for by_e in by_n.values() for runs in by_e.values()
                  for r in runs)
    settings_text = "\n".join(f"- `{k}` = {v}" for k, v in data["settings"].items())
    figures_text = "\n\n".join(f"![{f}]({f})" for f in figures)
    return f"""# Study 7: learning-rate transfer across width (issue 26, part 1)

Command: `{data['command']}`   Status: {'complete' if data['complete'] else 'running (partial results)'}.
{runs} runs ({len(methods)} methods x {len(widths)} widths x learning rates x seeds), {seconds:.0f} s of training in
total when they ran; wall time of this invocation {data['wall_s']:.0f} s (cached runs count 0). One CPU thread,
`nice -n 19`, on the shared 2-core machine.

Paper's claim: with a single matrix, a learning rate of order n^-1/2 gives stable feature learning at any width,
where LoRA needs LoRA+'s two rates. Questions: (1) does SingLoRA's best rate move less with width than LoRA's?
(2) does SingLoRA's best rate follow n^-1/2 (so that lr x sqrt(n) transfers)?

## Design

{design.split(chr(10) + chr(10), 1)[1].split("Run:")[0].strip()}

Settings:
{settings_text}

## Best learning rate per width

log2 of the best rate per seed (refined by a parabola through the grid minimum and its neighbours; ± = std over
seeds), the grid minimum of the median curve, the median best loss, the largest rate whose run still learnt
(loss < 1; log2, mean ± std) and how many seeds had their minimum on the grid's edge.

{optimum_table(analysis, widths)}

## How the best rate moves with width

Slope of log2(best lr) against log2(n), fitted per seed over all widths (mean ± std over seeds): 0 = the same rate
transfers, -0.5 = lr ~ n^-1/2 (the paper's rule for SingLoRA), -1 = lr ~ n^-1. Local slope a-b: the change of log2(best
lr) from width a to width b per doubling.

{slope_table(analysis)}

## What transferring a rate tuned at n = {widths[0]} costs

The rate tuned on the grid at the smallest width, moved to width n by each rule (interpolated between grid
points): test loss there / best test loss at width n, median (min-max) over seeds. 1.00 = as good as tuning at n.

{transfer_table(analysis, widths)}

## Plots

{figures_text}

## All learning rates

{grid_tables(analysis, widths)}
"""
