"""Where the adapter's time goes: ``python -m benchmarks.profile_adapter [--ops | --model minilm | --ab minilm]``.

- no flag: one adapted Linear's forward + backward at all-MiniLM's shapes (2048 tokens, r = 8, the input
  requiring grad as inside a network), interleaved: the frozen ``base`` Linear alone, SingLoRA's hand-written
  forward and backward (``fused``: ``fused_linear``), SingLoRA by autograd's composition (``autograd``:
  ``functional.factored_update``, ``fused_linear.ENABLED = False``) and PEFT-style ``lora`` (two matrices).
  Medians of thread CPU time (what this process computed; on a shared machine wall time adds the time other
  processes held the core) and of wall time, each over the base's.
- ``--ops``: the ``torch.profiler`` table of the same layer, per op and input shapes, for ``fused`` and
  ``autograd`` (self CPU per call, call counts): which products the adapter adds and what each costs.
- ``--model NAME``: a ``torch.profiler`` table of one training step per method on a workload.
- ``--ab NAME``: whole training steps of base, PEFT LoRA, SingLoRA fused (also with the gradient of x never from
  the merged weight, ``fused_linear.merges_for_grad_x``; with A frozen: the cost of A's gradient apart; and with
  the adapters disabled: what the wrapping modules alone cost) and SingLoRA autograd, interleaved, with the minor
  page faults of each step (memory the allocator gave back to the system and takes again).

``--keep-memory``: glibc keeps the memory the process frees, so that no step page-faults
(``measure.keep_freed_memory``): the computation alone, without the allocator's part, which differs between methods.

``--out DIR`` also writes what is printed to ``DIR/profile_adapter[_ops|_model|_ab_NAME][_keep_memory].md``, with
the command and the load average before and after.
"""

from __future__ import annotations

import argparse
import os
import resource
import shlex
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.profiler import ProfilerActivity, profile

from torch_singlora import SingLoRALayer, fused_linear
from torch_singlora.atomic import atomic_write_text

from .measure import interleaved_clocks, keep_freed_memory
from .methods import METHODS, build_method, start_backward_at, train_step
from .workloads import WORKLOADS

SHAPES = [(384, 384), (384, 1536), (1536, 384)]  # (d_in, d_out) of all-MiniLM's attention and MLP
LAYER_METHODS = ("base", "fused", "autograd", "lora")


def layer_steps(d_in: int, d_out: int, tokens: int, r: int) -> dict[str, Callable[[], None]]:
    """One forward + backward of the layer per method (``LAYER_METHODS``); the input is made by a multiply so
    that it requires grad as inside a network, and its gradient is computed."""
    torch.manual_seed(0)
    x0 = torch.randn(tokens, d_in, requires_grad=True)
    grad = torch.randn(tokens, d_out)
    base = nn.Linear(d_in, d_out).requires_grad_(False)
    layer = SingLoRALayer(base)
    layer.add_adapter("default", r, scale=1.0, ramp_up_steps=1000, dropout=0.0, init="normal", init_std=None)
    layer.active_adapters = ["default"]
    layer.singlora["default"].ramp_step.fill_(500)  # u = 0.5
    lora_A = (torch.randn(r, d_in) / d_in**0.5).requires_grad_()
    lora_B = torch.zeros(d_out, r, requires_grad=True)

    def step(forward: Callable[[torch.Tensor], torch.Tensor], fused: bool = True) -> Callable[[], None]:
        def run() -> None:
            fused_linear.ENABLED = fused
            forward(x0 * 1.0).backward(grad)
            for tensor in (x0, layer.singlora["default"].A, lora_A, lora_B):
                tensor.grad = None
        return run

    return {"base": step(base), "fused": step(layer), "autograd": step(layer, fused=False),
            "lora": step(lambda x: base(x) + F.linear(F.linear(x, lora_A), lora_B) * 0.5)}


def layer_table(tokens: int, r: int, warmup: int, steps: int) -> list[str]:
    lines = [f"One adapted Linear, forward + backward, {tokens} tokens, r = {r}, {steps} interleaved rounds "
             "(median ms; x = over base):", "",
             "| d_in -> d_out | " + " | ".join(f"{m} CPU ms" for m in LAYER_METHODS) + " | "
             + " | ".join(f"{m} wall ms" for m in LAYER_METHODS) + " |",
             "|---|" + "---|" * (2 * len(LAYER_METHODS))]
    try:
        for d_in, d_out in SHAPES:
            wall, cpu = interleaved_clocks(layer_steps(d_in, d_out, tokens, r), warmup, steps)
            cells = []
            for times in (cpu, wall):
                med = {name: statistics.median(t) * 1e3 for name, t in times.items()}
                cells += [f"{med[m]:.2f}" + ("" if m == "base" else f" (x{med[m] / med['base']:.2f})")
                          for m in LAYER_METHODS]
            lines.append(f"| {d_in} -> {d_out} | " + " | ".join(cells) + " |")
            print(lines[-1], flush=True)
    finally:
        fused_linear.ENABLED = True
    return lines


def ops_table(tokens: int, r: int, rounds: int) -> list[str]:
    """``torch.profiler`` of ``rounds`` forward + backward calls per method and shape, per op and input shapes."""
    lines: list[str] = []
    try:
        for d_in, d_out in SHAPES:
            steps = layer_steps(d_in, d_out, tokens, r)
            for name in ("base", "fused", "autograd"):
                for _ in range(2):
                    steps[name]()
                with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
                    for _ in range(rounds):
                        steps[name]()
                events = prof.key_averages(group_by_input_shape=True)
                total = sum(e.self_cpu_time_total for e in events) / rounds / 1e3
                lines += [f"### {d_in} -> {d_out}, {name}: {total:.2f} ms per forward + backward (the profiler's "
                          f"\"Self CPU\" is wall time: it counts preemption), {sum(e.count for e in events) // rounds}"
                          " ops", "", "```",
                          events.table(sort_by="self_cpu_time_total", row_limit=14, max_name_column_width=28,
                                       max_shapes_column_width=70), "```", ""]
                print("\n".join(lines[-6:]), flush=True)
    finally:
        fused_linear.ENABLED = True
    return lines


def model_table(workload_name: str, methods: list[str], r: int) -> list[str]:
    workload = WORKLOADS[workload_name]()
    built = {name: build_method(name, workload.build(), workload.targets, r, alpha=r) for name in methods}
    for _ in range(2):
        for method in built.values():
            train_step(method, workload.batch)
    lines = []
    for name, method in built.items():
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            train_step(method, workload.batch)
        lines += [f"### {name}", "", "```", prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=14),
                  "```", ""]
        print("\n".join(lines[-5:]), flush=True)
    return lines


# What each variant of SingLoRA's training path in ``--ab`` sets in ``fused_linear`` (the rest as the module has it).
AB_VARIANTS = {"singlora": {}, "singlora_gx_written": {"MERGE_RATIO": float("inf")},
               "singlora_autograd": {"ENABLED": False}}


def model_ab(workload_name: str, r: int, warmup: int, steps: int) -> list[str]:
    """Training steps of base, PEFT LoRA and SingLoRA by hand (``singlora``; ``singlora_gx_written``: the gradient
    of x never from the merged weight; ``singlora_frozen_A``: A frozen, so the step's cost without A's gradient;
    ``singlora_wrapper_only``: the adapters disabled, each layer calls its base layer) and by autograd's
    composition, interleaved. The two frozen variants start their backward at the adapted layers, as the base."""
    workload = WORKLOADS[workload_name]()
    built = {name: build_method(name, workload.build(), workload.targets, r, alpha=r) for name in ("base", "lora")}
    built.update({name: build_method("singlora", workload.build(), workload.targets, r, alpha=r)
                  for name in (*AB_VARIANTS, "singlora_frozen_A", "singlora_wrapper_only")})
    for name in ("singlora_frozen_A", "singlora_wrapper_only"):  # A's gradient apart; then the update too
        frozen = built[name].model
        frozen.requires_grad_(False)
        start_backward_at(frozen.model, workload.targets)  # backward still runs as far as with A trainable
    for _, layer in built["singlora_wrapper_only"].model.singlora_layers():
        layer.disabled = True
    defaults = {"ENABLED": fused_linear.ENABLED, "MERGE_RATIO": fused_linear.MERGE_RATIO}
    faults: dict[str, list[int]] = {name: [] for name in built}

    def step(name: str) -> Callable[[], None]:
        def run() -> None:
            for setting, value in {**defaults, **AB_VARIANTS.get(name, {})}.items():
                setattr(fused_linear, setting, value)
            before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            train_step(built[name], workload.batch)
            faults[name].append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
        return run

    try:
        wall, cpu = interleaved_clocks({name: step(name) for name in built}, warmup, steps)
    finally:
        for setting, value in defaults.items():
            setattr(fused_linear, setting, value)
    lines = [f"{workload.description}; {steps} interleaved rounds after {warmup}; per round: the method's CPU time "
             "over the base's in the same round, median (q1-q3 over the rounds: the spread of a ratio)", "",
             "| method | step CPU ms (median) | over base | per round over base | step wall ms (median) | over base "
             "| page faults per step |", "|---|---|---|---|---|---|---|"]
    med = {clock: {n: statistics.median(t) * 1e3 for n, t in times.items()} for clock, times in
           (("cpu", cpu), ("wall", wall))}
    for name in built:
        lines.append(f"| {name} | {med['cpu'][name]:.1f} | {med['cpu'][name] / med['cpu']['base']:.3f} "
                     f"| {_per_round(cpu[name], cpu['base'])} "
                     f"| {med['wall'][name]:.1f} | {med['wall'][name] / med['wall']['base']:.3f} "
                     f"| {statistics.median(faults[name][warmup:]):.0f} |")
    print("\n".join(lines), flush=True)
    return lines


def _per_round(times: list[float], base: list[float]) -> str:
    """``median (q1-q3)`` of ``times[i] / base[i]``: each round's ratio, so that a slow or fast stretch of the
    machine, which moves both, cancels."""
    ratios = [t / b for t, b in zip(times, base)]
    if len(ratios) < 2:
        return f"{ratios[0]:.3f}"
    q1, median, q3 = statistics.quantiles(ratios, n=4)
    return f"{median:.3f} ({q1:.3f}-{q3:.3f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ops", action="store_true", help="torch.profiler table of one layer, per op and shape")
    parser.add_argument("--model", choices=sorted(WORKLOADS), default=None)
    parser.add_argument("--ab", choices=sorted(WORKLOADS), default=None, help="fused vs autograd, whole model")
    parser.add_argument("--steps", type=int, default=None, help="timed rounds (default 25 per layer, 10 for --ab)")
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=["base", "lora", "singlora"])
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--r", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=None, help="also write the tables to DIR/profile_adapter*.md")
    parser.add_argument("--keep-memory", action="store_true",
                        help="glibc keeps freed memory: steps do not page-fault (measure.keep_freed_memory)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.keep_memory:
        keep_freed_memory()
    start_load = os.getloadavg()
    if args.ab:
        lines, suffix = model_ab(args.ab, args.r, warmup=2, steps=args.steps or 10), f"_ab_{args.ab}"
    elif args.model:
        lines, suffix = model_table(args.model, args.methods, args.r), "_model"
    elif args.ops:
        lines, suffix = ops_table(args.tokens, args.r, rounds=args.steps or 10), "_ops"
    else:
        lines, suffix = layer_table(args.tokens, args.r, warmup=3, steps=args.steps or 25), ""
    if args.out is not None:
        suffix += "_keep_memory" if args.keep_memory else ""
        command = "python -m benchmarks.profile_adapter " + " ".join(shlex.quote(a) for a in sys.argv[1:])
        header = [f"Command: `{command.strip()}` ({torch.get_num_threads()} thread(s), torch {torch.__version__})",
                  "", f"Load average (1, 5, 15 min) at the start: {start_load}, at the end: {os.getloadavg()}; "
                  f"{time.strftime('%Y-%m-%d %H:%M')}", ""]
        args.out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(args.out / f"profile_adapter{suffix}.md", "\n".join(header + lines) + "\n")


if __name__ == "__main__":
    main()
