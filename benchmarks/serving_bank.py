"""The adapter bank's parts of ``python -m benchmarks.serving``: memory per resident adapter, and the cost of a step.

``memory``: 1,000 adapters of mixed ranks {4, 8, 16} (cycled: a third of each) on SmolLM2-135M's q_proj and v_proj,
loaded into one ``AdapterBank(max_rank=16)`` as ``singlora serve`` loads them (default capacity, grown on demand),
and 100 on all 7 projections. Per adapter, by rank: its own SingLoRA weights (``n * r`` numbers per layer), what the
bank holds for it (rows, table entries, coefficient), a PEFT LoRA of the same rank on the same layers (measured: the
``lora_`` tensors of a ``PeftModel`` holding ``--peft-per-rank`` exports of each rank), and, for the whole bank,
every byte it allocated (free rows included) and the growth of the process's resident memory (RSS, what ``ps``
shows for a server), both divided by the adapters' own weights. Then every other adapter is unloaded and as many
are loaded with the next rank (the same rows in all): the bank must not grow (its memory is reused).

``decode`` (and ``prefill``): one step of SmolLM2 (``unmerged_overhead.StepRunner``: 16 sequences, one new token
over a 64-token cache; 4 prompts x 128 tokens) for the base model, the merged model (one r = 8 adapter folded in:
the floor), a ``SingLoRAModel`` holding that adapter unmerged, and an ``AdapterBank`` holding 16 adapters (ranks
4/8/16 on all 7 projections) with every row on one adapter (the r = 8 one), every row on the base model, and the 16
rows on 16 adapters. One thread, interleaved rounds, medians, ratios to the base model in the same process.
"""

from __future__ import annotations

import copy
import gc
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from torch_singlora import SingLoRAConfig, get_singlora_model
from torch_singlora.bank import AdapterBank
from torch_singlora.layers import SingLoRALayer

from .measure import interleaved_times
from .unmerged_overhead import StepRunner
from .workloads import LLAMA_TARGETS

RANKS = (4, 8, 16)


def rss_bytes() -> int | None:
    """The process's resident memory (Linux ``/proc/self/statm``; None elsewhere)."""
    try:
        return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        return None


def write_rank_adapters(base: nn.Module, targets: list[str], folder: Path, lora: bool) -> dict[int, Path]:
    """One random adapter per rank in ``RANKS`` on ``targets`` of ``base`` (a copy), saved under ``folder/r<rank>``,
    with its exact LoRA export under ``folder/lora_r<rank>`` when ``lora``. Returns ``{rank: folder}``."""
    from torch_singlora.export import export_lora

    folders = {}
    for r in RANKS:
        torch.manual_seed(r)
        config = SingLoRAConfig(r=r, alpha=r, target_modules=targets, ramp_up_steps=0, init="gaussian", init_std=0.02)
        model = get_singlora_model(copy.deepcopy(base), config)
        folders[r] = folder / f"r{r}"
        model.save_adapter(folders[r])
        if lora:
            export_lora(model, folder / f"lora_r{r}", format="peft")
    return folders


def unwrap(model: nn.Module) -> nn.Module:
    """``model`` with every SingLoRA wrapper an ``AdapterBank`` put in replaced by the original module."""
    for name, module in list(model.named_modules()):
        if isinstance(module, SingLoRALayer):
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, module.base_layer)
    return model


def peft_bytes_per_rank(base: nn.Module, folder: Path, per_rank: int) -> dict[int, float]:
    """Bytes per adapter of PEFT LoRA, by rank: ``per_rank`` exports of each rank loaded into one ``PeftModel``."""
    from peft import PeftModel

    measured = {}
    for r in RANKS:
        model = PeftModel.from_pretrained(copy.deepcopy(base), folder / f"lora_r{r}", adapter_name="p0")
        for i in range(1, per_rank):
            model.load_adapter(folder / f"lora_r{r}", adapter_name=f"p{i}")
        lora = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if ".lora_" in n)
        measured[r] = lora / per_rank
        del model
        gc.collect()
    return measured


def bank_memory(base: nn.Module, folders: dict[int, Path], count: int) -> tuple[AdapterBank, dict[str, Any]]:
    """Load ``count`` adapters (rank ``RANKS[i % 3]``) into a bank on ``base``; bytes per rank and in total."""
    gc.collect()
    rss = rss_bytes()
    bank = AdapterBank(base, max_rank=max(RANKS))
    start = time.perf_counter()
    for i in range(count):
        bank.load(f"u{i}", folders[RANKS[i % len(RANKS)]])
    load_s = (time.perf_counter() - start) / count
    gc.collect()
    grown = None if rss is None else rss_bytes() - rss
    memory = bank.memory()
    per_rank = {}
    for r in RANKS:
        rows = [memory["per_adapter"][f"u{i}"] for i in range(RANKS.index(r), count, len(RANKS))]
        per_rank[r] = {key: statistics.mean(row[key] for row in rows) for key in ("singlora", "stored", "lora")}
    weights = sum(row["singlora"] for row in memory["per_adapter"].values())
    return bank, {"adapters": count, "per_rank": per_rank, "weights": weights, "allocated": memory["allocated"],
                  "rss_growth": grown, "load_s": load_s}


def reuse(bank: AdapterBank, folders: dict[int, Path], count: int) -> dict[str, Any]:
    """Unload every other adapter, load as many with the next rank (the same rows in all): bytes before / after."""
    before, rss = bank.memory()["allocated"], rss_bytes()
    for i in range(0, count, 2):
        bank.unload(f"u{i}")
    for i in range(0, count, 2):
        bank.load(f"v{i}", folders[RANKS[(i + 1) % len(RANKS)]])
    gc.collect()
    after = bank.memory()
    weights = sum(row["singlora"] for row in after["per_adapter"].values())
    return {"allocated_before": before, "allocated_after": after["allocated"], "weights_after": weights,
            "rss_growth": None if rss is None else rss_bytes() - rss}


def part_memory(settings: dict[str, Any], folder: Path, load_model: Callable[[bool], Any]) -> list[dict[str, Any]]:
    base = load_model(settings["quick"])[0]
    rows = []
    for label, targets, count in (("q_proj,v_proj", ["q_proj", "v_proj"], settings["memory_adapters"]),
                                  ("all 7 projections", list(LLAMA_TARGETS), settings["memory_adapters_all"])):
        source = folder / "memory" / label.split(",")[0].replace(" ", "_")
        folders = write_rank_adapters(base, targets, source, lora=True)
        peft = peft_bytes_per_rank(base, source, settings["peft_per_rank"])
        print(f"memory {label}: {count} adapters ...", file=sys.stderr, flush=True)
        bank, row = bank_memory(base, folders, count)
        for r in RANKS:
            row["per_rank"][r]["peft"] = peft[r]
        row.update(targets=label, reuse=reuse(bank, folders, count))
        rows.append(row)
        del bank
        base = unwrap(base)
        gc.collect()
    return rows


def in_bank(bank: AdapterBank, names: list[str], call: Callable[[], None]) -> Callable[[], None]:
    """``call`` run with example ``b`` on adapter ``names[b]``."""
    def run() -> None:
        with bank.use(names):
            call()
    return run


def part_steps(settings: dict[str, Any], folder: Path, load_model: Callable[[bool], Any]) -> list[dict[str, Any]]:
    """One prefill / decode step: base, merged, ``SingLoRAModel`` unmerged, and the bank's three kinds of batches."""
    base = load_model(settings["quick"])[0]
    folders = write_rank_adapters(base, list(LLAMA_TARGETS), folder / "steps", lora=False)
    model = get_singlora_model(copy.deepcopy(base), SingLoRAConfig(r=8, target_modules=list(LLAMA_TARGETS)))
    model.load_adapter(folders[8], "one")
    model.delete_adapter("default")
    model.eval()
    merged = copy.deepcopy(model).merge_and_unload().eval()
    plain = copy.deepcopy(base)  # every model timed is a copy (the loaded weights may be a file mapping)
    bank = AdapterBank(copy.deepcopy(base), max_rank=max(RANKS))
    names = [f"a{i:02d}" for i in range(16)]
    for i, name in enumerate(names):
        bank.load(name, folders[8] if i == 0 else folders[RANKS[i % len(RANKS)]])
    rows = []
    with torch.no_grad():
        for shape in ("prefill", "decode"):
            run = StepRunner(base, shape, settings["quick"])
            batch = run.batch
            calls = {"base": run(plain), "merged": run(merged), "singlora_model_unmerged": run(model),
                     "bank_one_adapter": in_bank(bank, [names[0]] * batch, run(bank.model)),
                     "bank_all_base": in_bank(bank, ["__base__"] * batch, run(bank.model)),
                     "bank_mixed": in_bank(bank, [names[i % 16] for i in range(batch)], run(bank.model))}
            print(f"steps {shape} ...", file=sys.stderr, flush=True)
            times = interleaved_times(calls, settings["step_warmup"], settings["step_rounds"])
            medians = {name: statistics.median(t) for name, t in times.items()}
            for name, median in medians.items():
                rows.append({"shape": shape, "method": name, "batch": batch, "median_ms": median * 1e3,
                             "over_base": median / medians["base"], "over_merged": median / medians["merged"]})
    return rows


def markdown(results: dict[str, Any]) -> list[str]:
    """The memory and step tables (lines)."""
    lines = []
    mb = 1e6
    if results["rows"].get("memory"):
        lines += ["### memory per resident adapter (float32; SmolLM2-135M; ranks 4, 8, 16 in equal numbers)", "",
                  "| targets | adapters | rank | own SingLoRA weights MB | bank holds MB | / own | PEFT LoRA MB "
                  "(same rank) | bank / LoRA |", "|" + "---|" * 8]
        for row in results["rows"]["memory"]:
            for r, per in row["per_rank"].items():
                lines.append(f"| {row['targets']} | {row['adapters']:,} | {r} | {per['singlora'] / mb:.3f} | "
                             f"{per['stored'] / mb:.3f} | {per['stored'] / per['singlora']:.3f} | "
                             f"{per['peft'] / mb:.3f} | {per['stored'] / per['peft']:.3f} |")
        lines += ["", "| targets | adapters | own weights MB | bank allocated MB (/ own) | RSS growth MB (/ own) | "
                  "load s/adapter | reuse: allocated before -> after MB (/ own after) | reuse: RSS growth MB |",
                  "|" + "---|" * 8]
        for row in results["rows"]["memory"]:
            rss = "-" if row["rss_growth"] is None else \
                f"{row['rss_growth'] / mb:.1f} ({row['rss_growth'] / row['weights']:.3f})"
            reuse_row = row["reuse"]
            reuse_rss = "-" if reuse_row["rss_growth"] is None else f"{reuse_row['rss_growth'] / mb:.1f}"
            lines.append(f"| {row['targets']} | {row['adapters']:,} | {row['weights'] / mb:.1f} | "
                         f"{row['allocated'] / mb:.1f} ({row['allocated'] / row['weights']:.3f}) | {rss} | "
                         f"{row['load_s']:.4f} | {reuse_row['allocated_before'] / mb:.1f} -> "
                         f"{reuse_row['allocated_after'] / mb:.1f} "
                         f"({reuse_row['allocated_after'] / reuse_row['weights_after']:.3f}) | {reuse_rss} |")
        lines.append("")
    if results["rows"].get("steps"):
        lines += ["### one step: base, merged, unmerged, bank (SmolLM2-135M, float32, one thread)", "",
                  "| shape | method | rows | ms (median) | / base | / merged |", "|---|---|---|---|---|---|"]
        for row in results["rows"]["steps"]:
            lines.append(f"| {row['shape']} | {row['method']} | {row['batch']} | {row['median_ms']:.2f} | "
                         f"{row['over_base']:.3f} | {row['over_merged']:.3f} |")
        lines.append("")
    return lines
