"""Run the suite: ``python -m benchmarks.run`` (full, minutes) or ``python -m benchmarks.run --quick`` (seconds).

Prints one table per workload and writes ``<out>/results.json`` and ``<out>/results.md``.
``--preset gpu`` (what ``benchmarks/gpu.sh`` runs): CUDA, bf16 base weights, the Llama-3.2-1B-shaped config and
larger batches, eager methods, into ``results/gpu/``.
See ``benchmarks/README.md`` for what each number means and the latest results.
"""

from __future__ import annotations

import argparse
import copy
import gc
import os
import shlex
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch

from .measure import (directory_bytes, inference_times, interleaved_clocks, keep_freed_memory, machine_description,
                      median_seconds, optimizer_state_bytes, peak_step_bytes, quartiles, synchronizer, tensor_bytes,
                      timed, trainable, write_outputs)
from .methods import METHODS, Method, build_method, train_step
from .workloads import WORKLOADS, Workload

QUICK_METHODS = ("base", "lora", "lora_again", "singlora", "dense_ref")  # no compile: it takes minutes on CPU
EAGER_METHODS = tuple(m for m in METHODS if not m.endswith("_compile"))
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
# --preset gpu: settings (flags given explicitly win) and each workload's (batch size, sequence length).
GPU_PRESET: dict[str, Any] = {"device": "cuda", "dtype": "bfloat16", "llama_size": "1b", "warmup": 5, "steps": 30,
                              "workloads": ("llama", "minilm"),
                              "methods": EAGER_METHODS, "out": Path(__file__).parent / "results" / "gpu"}
GPU_SIZES = {"minilm": (128, 128), "llama": (8, 512)}


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


def _dtypes(tensors) -> list[str]:
    return sorted({str(t.dtype).removeprefix("torch.") for t in tensors})


def run_workload(workload: Workload, names: list[str], r: int, warmup: int, steps: int,
                 device: str = "cpu", extras: bool = True) -> dict[str, Any]:
    """Build every method on a fresh copy of the base, time them round robin, then the one-off measurements
    (``extras=False``: training steps only, no inference / adapter files / merge timings)."""
    methods = {name: build_method(name, workload.build(), workload.targets, r, alpha=r) for name in names}
    sync = synchronizer(device)
    compile_s = {}
    for name, method in methods.items():  # first call of a compiled module compiles: keep it out of warm-up
        if name.endswith("_compile"):
            compile_s[name] = timed(lambda m=method: train_step(m, workload.batch), sync)
    times, cpu_times = interleaved_clocks({n: (lambda m=m: train_step(m, workload.batch))
                                          for n, m in methods.items()}, warmup, steps, sync)
    train: dict[str, Any] = {}
    for name, method in methods.items():
        peak = peak_step_bytes(lambda m=method: train_step(m, workload.batch), device)
        persistent = tensor_bytes(list(method.model.parameters()) + list(method.model.buffers()))
        state = optimizer_state_bytes(method.optimizer)
        train[name] = {**quartiles(times[name]), "cpu_median_ms": statistics.median(cpu_times[name]) * 1e3,
                       "peak_step_bytes": peak, "persistent_bytes": persistent + state,
                       "peak_total_bytes": peak + persistent + state, "optimizer_state_bytes": state,
                       "trainable_params": sum(p.numel() for p in trainable(method.model)),
                       "compile_s": compile_s.get(name),
                       "frozen_dtypes": _dtypes(p for p in method.model.parameters() if not p.requires_grad),
                       "trainable_dtypes": _dtypes(trainable(method.model))}
    med = {n: t["median_ms"] for n, t in train.items()}
    result: dict[str, Any] = {"description": workload.description, "tokens": workload.tokens, "r": r,
                              "targets": len(workload.targets), "train": train,
                              "load_average_after_timing": list(os.getloadavg())}
    ratios = {
        "step_singlora_over_base": _ratio(med.get("singlora"), med.get("base")),
        "step_lora_over_base": _ratio(med.get("lora"), med.get("base")),
        "step_singlora_compile_over_base_compile": _ratio(med.get("singlora_compile"), med.get("base_compile")),
        "step_lora_compile_over_base_compile": _ratio(med.get("lora_compile"), med.get("base_compile")),
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
    cpu = {n: t["cpu_median_ms"] for n, t in train.items()}
    for ratio, (a, b) in {"cpu_step_singlora_over_base": ("singlora", "base"),
                          "cpu_step_lora_over_base": ("lora", "base"),
                          "cpu_step_singlora_compile_over_base_compile": ("singlora_compile", "base_compile")}.items():
        ratios[ratio] = _ratio(cpu.get(a), cpu.get(b))
    square = _square_state_bytes(methods)
    if square is not None:
        result["optimizer_state_square_layers"] = square
        ratios["optimizer_state_square_singlora_over_lora"] = _ratio(square["singlora"], square["lora"])
    if extras and "singlora" in methods:
        result.update(_singlora_extras(workload, methods, warmup, steps, sync))
        inference = result["inference"]
        ratios["inference_merged_over_base"] = _ratio(inference["singlora_merged"]["median_ms"],
                                                      inference["base"]["median_ms"])
        ratios["inference_unmerged_over_base"] = _ratio(inference["singlora_unmerged"]["median_ms"],
                                                        inference["base"]["median_ms"])
    result["ratios"] = ratios
    return result


def _singlora_extras(workload: Workload, methods: dict[str, Method], warmup: int, steps: int,
                     sync: Callable[[], None]) -> dict[str, Any]:
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
    times = inference_times(models, workload.batch, warmup, steps, sync)
    inference = {name: {**quartiles(t), "tokens_per_s": workload.tokens / statistics.median(t)}
                 for name, t in times.items()}
    extras: dict[str, Any] = {
        "inference": inference,
        "merged_vs_unmerged_max_abs_diff": float((unmerged_out.float() - merged_out.float()).abs().max()),
        "singlora_step": ours.get_ramp_step(),
    }
    files = {"singlora": directory_bytes(lambda d: ours.save_adapter(d))}
    if "lora" in methods:
        files["lora"] = directory_bytes(lambda d: methods["lora"].model.save_pretrained(d))
    extras["adapter_files"] = files
    timing_copy = copy.deepcopy(ours)
    merge = {"singlora_merge_s": median_seconds(timing_copy.merge, 5, after=timing_copy.unmerge, sync=sync)}
    merge["singlora_merge_and_unload_s"] = median_seconds(lambda: copy.deepcopy(ours).merge_and_unload(), 3,
                                                          sync=sync)
    merge["deepcopy_s (included above)"] = median_seconds(lambda: copy.deepcopy(ours), 3, sync=sync)
    if "lora" in methods:
        lora_copy = copy.deepcopy(methods["lora"].model)
        merge["lora_merge_s"] = median_seconds(lora_copy.merge_adapter, 5, after=lora_copy.unmerge_adapter, sync=sync)
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
    if "settings" in results:
        lines += ["Settings: " + ", ".join(f"{k}={v}" for k, v in results["settings"].items()), ""]
    for name, w in results["workloads"].items():
        lines += [f"## {name}: {w['description']}", "",
                  "| method | step ms (median) | q1-q3 ms | CPU ms (median) | peak step MB | persistent MB "
                  "| peak total MB | trainable params | optimizer state MB | compile s |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for method, t in w["train"].items():
            lines.append(
                f"| {method} | {t['median_ms']:.1f} | {t['q1_ms']:.1f}-{t['q3_ms']:.1f} "
                f"| {_fmt(t.get('cpu_median_ms'), 1)} | {_mb(t['peak_step_bytes'])} "
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


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The command line; settings a preset can fill default to None here and are resolved by ``resolve``."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny models, 1 warm-up + 3 steps, no compile")
    parser.add_argument("--preset", choices=["gpu"], default=None,
                        help="gpu: --device cuda --dtype bfloat16 --llama-size 1b, llama batch 8 x 512, minilm "
                             "128 x 128, 5 warm-up + 30 steps, eager methods, --out results/gpu")
    parser.add_argument("--workloads", nargs="+", choices=sorted(WORKLOADS), default=None,
                        help=f"default: all ({', '.join(sorted(WORKLOADS))}); --preset gpu: llama minilm")
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=None,
                        help=f"default: all ({', '.join(METHODS)}); with --quick: {', '.join(QUICK_METHODS)}")
    parser.add_argument("--device", choices=["cpu", "cuda"], default=None, help="default cpu")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                        help="base weights (and so activations) in this dtype; adapters stay float32 (default "
                             "float32)")
    parser.add_argument("--llama-size", choices=["small", "1b"], default=None,
                        help="small: 4 layers, hidden 512 (default); 1b: Llama-3.2-1B's shapes")
    parser.add_argument("--batch-size", type=int, default=None, help="every workload's batch size")
    parser.add_argument("--seq-len", type=int, default=None, help="every workload's sequence length")
    parser.add_argument("--train-only", action="store_true",
                        help="training steps only: skip inference, adapter files and merge timings")
    parser.add_argument("--r", type=int, default=8, help="rank for every method (alpha = r)")
    parser.add_argument("--warmup", type=int, default=None, help="warm-up rounds (default 3; quick 1)")
    parser.add_argument("--steps", type=int, default=None, help="timed rounds (default 20; quick 3)")
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (default 1)")
    parser.add_argument("--keep-memory", action="store_true",
                        help="glibc keeps freed memory: steps do not page-fault (measure.keep_freed_memory)")
    parser.add_argument("--out", type=Path, default=None, help="output directory (default benchmarks/results)")
    parser.add_argument("--stem", default=None, help="output file names <stem>.json / .md (default results; "
                                                     "quick: quick)")
    return parser.parse_args(argv)


def resolve(args: argparse.Namespace) -> dict[str, Any]:
    """Settings: an explicit flag, else the preset's value, else the default (``--quick`` has its own)."""
    preset = GPU_PRESET if args.preset == "gpu" else {}

    def pick(key: str, default: Any) -> Any:
        value = getattr(args, key)
        return value if value is not None else preset.get(key, default)

    settings = {
        "methods": list(pick("methods", QUICK_METHODS if args.quick else METHODS)),
        "warmup": pick("warmup", 1 if args.quick else 3), "steps": pick("steps", 3 if args.quick else 20),
        "workloads": list(pick("workloads", sorted(WORKLOADS))), "r": args.r, "quick": args.quick, "preset": args.preset,
        "device": pick("device", "cpu"),
        "dtype": pick("dtype", "float32"), "llama_size": pick("llama_size", "small"),
        "batch_size": args.batch_size, "seq_len": args.seq_len, "threads": args.threads,
        "train_only": args.train_only, "keep_memory": args.keep_memory,
        "out": pick("out", Path(__file__).parent / "results"),
        "stem": args.stem or ("quick" if args.quick else "results"),
    }
    if settings["device"] == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch.cuda.is_available() is False (torch "
                         f"{torch.__version__}, built with CUDA {torch.version.cuda})")
    if settings["steps"] < 1 or settings["warmup"] < 0:
        raise SystemExit(f"--steps must be >= 1 and --warmup >= 0, got {settings['steps']} / {settings['warmup']}")
    return settings


def workload_kwargs(name: str, settings: dict[str, Any]) -> dict[str, Any]:
    """Keyword arguments of ``WORKLOADS[name]``: device, dtype, sizes (flags, else the preset's, else defaults)."""
    kwargs: dict[str, Any] = {"tiny": settings["quick"], "device": settings["device"],
                              "dtype": DTYPES[settings["dtype"]]}
    if settings["preset"] == "gpu":
        kwargs["batch_size"], kwargs["seq_len"] = GPU_SIZES[name]
    if settings["batch_size"] is not None:
        kwargs["batch_size"] = settings["batch_size"]
    if settings["seq_len"] is not None:
        kwargs["seq_len"] = settings["seq_len"]
    if name == "llama":
        kwargs["size"] = settings["llama_size"]
    return kwargs


def _release(device: str) -> None:
    """Between workloads: free the last one's models (compiled graphs hold them; on CUDA, cached blocks too)."""
    torch._dynamo.reset()
    gc.collect()
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()


def write_results(results: dict[str, Any], out: Path, stem: str) -> str:
    """Write ``<out>/<stem>.json`` and ``.md`` (after every workload: a run cut short keeps what it finished)."""
    gpu = results["machine"].get("gpu")
    title = "# Benchmark results" + (f" on {gpu} (CUDA {results['machine']['cuda']})" if gpu else "")
    return write_outputs(results, markdown, out, stem, title)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    settings = resolve(parse_args(argv))
    torch.set_num_threads(settings["threads"])
    if settings["keep_memory"]:
        keep_freed_memory()
    device, names = settings["device"], settings["methods"]
    command = "python -m benchmarks.run " + " ".join(shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv))
    results: dict[str, Any] = {"command": command.strip(), "machine": machine_description(device),
                               "settings": {k: v for k, v in settings.items() if k != "out"}, "workloads": {}}
    for name in settings["workloads"]:
        workload = WORKLOADS[name](**workload_kwargs(name, settings))
        print(f"[{time.strftime('%H:%M:%S')}] {workload.name}: {workload.description}", flush=True)
        results["workloads"][workload.name] = run_workload(workload, names, settings["r"], settings["warmup"],
                                                           settings["steps"], device, not settings["train_only"])
        del workload
        _release(device)
        text = write_results(results, Path(settings["out"]), settings["stem"])
    print(text)
    return results


if __name__ == "__main__":
    main()
