"""Run the suite: ``python -m benchmarks.run`` (full, minutes) or ``python -m benchmarks.run --quick`` (seconds).

Prints one table per workload and writes ``<out>/results.json`` and ``<out>/results.md``.
See ``benchmarks/README.md`` for what each number means and the latest results.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import shlex
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

from .measure import (directory_bytes, inference_times, interleaved_times, machine_description, median_seconds,
                      optimizer_state_bytes, peak_step_bytes, quartiles, tensor_bytes, trainable)
from .methods import METHODS, Method, build_method, train_step
from .workloads import WORKLOADS, Workload

QUICK_METHODS = ("base", "lora", "lora_again", "singlora", "dense_ref")  # no compile: it takes minutes on CPU


def _square_state_bytes(methods: dict[str, Method]) -> dict[str, int] | None:
    """Optimizer-state bytes over the square adapted layers only: SingLoRA vs LoRA (by construction 0.5)."""
    if "singlora" not in methods or "lora" not in methods:
        return None
    ours, lora = methods["singlora"], methods["lora"]
    lora_root = lora.model.base_model.model
    ours_params, lora_params = [], []
    for name, layer in ours.model.singlora_layers():
        if layer.d_out == layer.d_in:
            ours_params.append(layer.singlora["default"].A)
            peft_layer = lora_root.get_submodule(name)
            lora_params += [peft_layer.lora_A["default"].weight, peft_layer.lora_B["default"].weight]
    return {"singlora": optimizer_state_bytes(ours.optimizer, ours_params),
            "lora": optimizer_state_bytes(lora.optimizer, lora_params), "layers": len(ours_params)}


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or b == 0 else a / b


def run_workload(workload: Workload, names: list[str], r: int, warmup: int, steps: int) -> dict[str, Any]:
    """Build every method on a fresh copy of the base, time them round robin, then the one-off measurements."""
    methods = {name: build_method(name, workload.build(), workload.targets, r, alpha=r) for name in names}
    compile_s = {}
    for name, method in methods.items():  # first call of a compiled module compiles: keep it out of warm-up
        if name.endswith("_compile"):
            start = time.perf_counter()
            train_step(method, workload.batch)
            compile_s[name] = time.perf_counter() - start
    times = interleaved_times({n: (lambda m=m: train_step(m, workload.batch)) for n, m in methods.items()},
                              warmup, steps)
    train: dict[str, Any] = {}
    for name, method in methods.items():
        peak = peak_step_bytes(lambda m=method: train_step(m, workload.batch))
        persistent = tensor_bytes(list(method.model.parameters()) + list(method.model.buffers()))
        state = optimizer_state_bytes(method.optimizer)
        train[name] = {**quartiles(times[name]), "peak_step_bytes": peak, "persistent_bytes": persistent + state,
                       "peak_total_bytes": peak + persistent + state, "optimizer_state_bytes": state,
                       "trainable_params": sum(p.numel() for p in trainable(method.model)),
                       "compile_s": compile_s.get(name)}
    med = {n: t["median_ms"] for n, t in train.items()}
    result: dict[str, Any] = {"description": workload.description, "tokens": workload.tokens, "r": r,
                              "targets": len(workload.targets), "train": train,
                              "load_average_after_timing": list(os.getloadavg())}
    ratios = {
        "step_singlora_over_lora": _ratio(med.get("singlora"), med.get("lora")),
        "step_lora_again_over_lora (noise)": _ratio(med.get("lora_again"), med.get("lora")),
        "overhead_singlora_over_lora": _ratio(
            None if "singlora" not in med or "base" not in med else med["singlora"] - med["base"],
            None if "lora" not in med or "base" not in med else med["lora"] - med["base"]),
        "step_dense_ref_over_singlora": _ratio(med.get("dense_ref"), med.get("singlora")),
        "step_singlora_compile_over_lora": _ratio(med.get("singlora_compile"), med.get("lora")),
        "step_singlora_compile_over_lora_compile": _ratio(med.get("singlora_compile"), med.get("lora_compile")),
        "peak_total_singlora_over_lora": _ratio(train.get("singlora", {}).get("peak_total_bytes"),
                                                train.get("lora", {}).get("peak_total_bytes")),
        "peak_step_singlora_over_lora": _ratio(train.get("singlora", {}).get("peak_step_bytes"),
                                               train.get("lora", {}).get("peak_step_bytes")),
        "optimizer_state_singlora_over_lora": _ratio(train.get("singlora", {}).get("optimizer_state_bytes"),
                                                     train.get("lora", {}).get("optimizer_state_bytes")),
    }
    square = _square_state_bytes(methods)
    if square is not None:
        result["optimizer_state_square_layers"] = square
        ratios["optimizer_state_square_singlora_over_lora"] = _ratio(square["singlora"], square["lora"])
    if "singlora" in methods:
        result.update(_singlora_extras(workload, methods, warmup, steps))
        inference = result["inference"]
        ratios["inference_merged_over_base"] = _ratio(inference["singlora_merged"]["median_ms"],
                                                      inference["base"]["median_ms"])
        ratios["inference_unmerged_over_base"] = _ratio(inference["singlora_unmerged"]["median_ms"],
                                                        inference["base"]["median_ms"])
    result["ratios"] = ratios
    return result


def _singlora_extras(workload: Workload, methods: dict[str, Method], warmup: int, steps: int) -> dict[str, Any]:
    """Inference speed unmerged / merged / base (/ LoRA), adapter file sizes, whole-model merge time."""
    ours = methods["singlora"].model
    merged = copy.deepcopy(ours).merge_and_unload()
    models = {"base": workload.build(), "singlora_unmerged": ours, "singlora_merged": merged}
    if "lora" in methods:
        models["lora_unmerged"] = methods["lora"].model
    inputs = {k: v for k, v in workload.batch.items() if k != "labels"}
    with torch.no_grad():
        ours.eval()
        merged.eval()
        unmerged_out, merged_out = ours(**inputs).logits, merged(**inputs).logits
    times = inference_times(models, workload.batch, warmup, steps)
    inference = {name: {**quartiles(t), "tokens_per_s": workload.tokens / statistics.median(t)}
                 for name, t in times.items()}
    extras: dict[str, Any] = {
        "inference": inference,
        "merged_vs_unmerged_max_abs_diff": float((unmerged_out - merged_out).abs().max()),
        "singlora_step": ours.get_step(),
    }
    files = {"singlora": directory_bytes(lambda d: ours.save_adapter(d))}
    if "lora" in methods:
        files["lora"] = directory_bytes(lambda d: methods["lora"].model.save_pretrained(d))
    extras["adapter_files"] = files
    timing_copy = copy.deepcopy(ours)
    merge = {"singlora_merge_s": median_seconds(timing_copy.merge, 5, after=timing_copy.unmerge)}
    merge["singlora_merge_and_unload_s"] = median_seconds(lambda: copy.deepcopy(ours).merge_and_unload(), 3)
    merge["deepcopy_s (included above)"] = median_seconds(lambda: copy.deepcopy(ours), 3)
    if "lora" in methods:
        lora_copy = copy.deepcopy(methods["lora"].model)
        merge["lora_merge_s"] = median_seconds(lora_copy.merge_adapter, 5, after=lora_copy.unmerge_adapter)
    extras["merge"] = merge
    return extras


# ---- reporting --------------------------------------------------------------------------------------------------

def _mb(n: int | None) -> str:
    return "-" if n is None else f"{n / 2**20:.1f}"


def _fmt(x: float | None, digits: int = 3) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def markdown(results: dict[str, Any]) -> str:
    """The results as Markdown tables (also printed)."""
    lines = [f"Command: `{results['command']}`", "", "Machine: " + ", ".join(
        f"{k}={v}" for k, v in results["machine"].items()), ""]
    for name, w in results["workloads"].items():
        lines += [f"## {name}: {w['description']}", "",
                  "| method | step ms (median) | q1-q3 ms | peak step MB | persistent MB | peak total MB "
                  "| trainable params | optimizer state MB | compile s |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for method, t in w["train"].items():
            lines.append(
                f"| {method} | {t['median_ms']:.1f} | {t['q1_ms']:.1f}-{t['q3_ms']:.1f} | {_mb(t['peak_step_bytes'])} "
                f"| {_mb(t['persistent_bytes'])} | {_mb(t['peak_total_bytes'])} | {t['trainable_params']:,} "
                f"| {_mb(t['optimizer_state_bytes'])} | {_fmt(t['compile_s'], 1)} |")
        lines += ["", "| ratio | value |", "|---|---|"]
        lines += [f"| {k} | {_fmt(v)} |" for k, v in w["ratios"].items()]
        if "inference" in w:
            lines += ["", "| inference (eval, no_grad) | ms (median) | tokens/s |", "|---|---|---|"]
            lines += [f"| {k} | {v['median_ms']:.1f} | {v['tokens_per_s']:.0f} |" for k, v in w["inference"].items()]
            lines += ["", f"merged vs unmerged logits, max abs diff: {w['merged_vs_unmerged_max_abs_diff']:.2e} "
                      f"(at ramp step {w['singlora_step']})", ""]
            lines += ["| adapter files | bytes |", "|---|---|"]
            lines += [f"| {method}: {file} | {size:,} |" for method, files in w["adapter_files"].items()
                      for file, size in files.items()]
            lines += ["", "| merge (whole model) | seconds |", "|---|---|"]
            lines += [f"| {k} | {v:.4f} |" for k, v in w["merge"].items()]
        if "optimizer_state_square_layers" in w:
            sq = w["optimizer_state_square_layers"]
            lines += ["", f"Optimizer state on the {sq['layers']} square layers: SingLoRA {sq['singlora']:,} B, "
                      f"LoRA {sq['lora']:,} B."]
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny models, 1 warm-up + 3 steps, no compile")
    parser.add_argument("--workloads", nargs="+", choices=sorted(WORKLOADS), default=sorted(WORKLOADS))
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=None,
                        help=f"default: all ({', '.join(METHODS)}); with --quick: {', '.join(QUICK_METHODS)}")
    parser.add_argument("--r", type=int, default=8, help="rank for every method (alpha = r)")
    parser.add_argument("--warmup", type=int, default=None, help="warm-up rounds (default 3; quick 1)")
    parser.add_argument("--steps", type=int, default=None, help="timed rounds (default 20; quick 3)")
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (default 1)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results", help="output directory")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    names = list(args.methods or (QUICK_METHODS if args.quick else METHODS))
    warmup = args.warmup if args.warmup is not None else (1 if args.quick else 3)
    steps = args.steps if args.steps is not None else (3 if args.quick else 20)
    command = "python -m benchmarks.run " + " ".join(shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv))
    results: dict[str, Any] = {"command": command.strip(), "machine": machine_description(),
                               "settings": {"methods": names, "warmup": warmup, "steps": steps, "r": args.r,
                                            "quick": args.quick}, "workloads": {}}
    for name in args.workloads:
        workload = WORKLOADS[name](tiny=args.quick)
        print(f"[{time.strftime('%H:%M:%S')}] {workload.name}: {workload.description}", flush=True)
        results["workloads"][workload.name] = run_workload(workload, names, args.r, warmup, steps)
    results["machine"]["load_average_end"] = list(os.getloadavg())
    text = markdown(results)
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = "quick" if args.quick else "results"
    (args.out / f"{stem}.json").write_text(json.dumps(results, indent=2) + "\n")
    (args.out / f"{stem}.md").write_text("# Benchmark results\n\n" + text + "\n")
    return results


if __name__ == "__main__":
    main()
