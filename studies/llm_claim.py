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
from typing import Any, Callable

from studies.bbc import DEFAULT_WORK, Bench, Split, best_lr, command_line
from studies.common import environment, limit_threads, write_json, write_text
from studies.llm_report import NAMES, first, good_window, plots, report
from studies.llm_task import (
    FULL_GRID, LLAMA_7B, METHODS, QUICK_SPLIT, LLMRunSpec, Settings, adapter_params, final_loss,
    make_llm_bench, read_rows, train_run, training_curve, zero_shot_cached,
)
from studies.lr_sensitivity import spread

GRID = (3e-4, 1e-3, 3e-3, 1e-2)  # one grid for every method, fixed before any run (edges extended, see below)
CHECKPOINT_EVERY = 16


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
        "params": {m: {"formula": adapter_params(model_config, m, base.r),
                       "llama7b": adapter_params(LLAMA_7B, m, base.r),
                       "measured": first(finals[m], "adapter_params") if m in finals else None}
                   for m in settings.methods},
        "run_s": sum(r["wall_s"] for r in runner.results.values()),
    }


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
    grids = {m: list(settings.grid[:1] if args.quick and m not in FULL_GRID else settings.grid)
             for m in settings.methods}
    complete = False

    def publish() -> None:
        state = state_of(runner, bench, base, settings, grids, zero, model_config)
        notes = {"command": command, "complete": complete, "wall_s": time.perf_counter() - start,
                 "runs": list(runner.results)}
        figures = plots(state, args.out, settings.steps)
        write_json(args.out / "results.json", {
            "study": "llm_claim", "command": command, "complete": complete, "wall_s": notes["wall_s"],
            "environment": environment(), "settings": dataclasses.asdict(settings),
            "base_run": dataclasses.asdict(base), "model": model_config.get("_model_name_or_path", bench.model),
            "zero_shot": zero,
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
