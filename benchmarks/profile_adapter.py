"""Where the adapter's time goes: ``python -m benchmarks.profile_adapter [--model minilm] [--methods ...]``.

Without ``--model``: one adapted layer's forward + backward, interleaved, for the layouts we tried (all-MiniLM
shapes, 2048 tokens, r=8): ``sliced`` (the first version: products on slices of ``A`` (n, r)), ``factored``
(``functional.factored_update``: one contiguous ``(r, n)`` copy of ``A``) and PEFT-style ``lora`` (two
matrices). With ``--model``: a ``torch.profiler`` table of one training step per method. With ``--ab``: whole
training steps of base, PEFT LoRA, SingLoRA and SingLoRA with the ``sliced`` forward, interleaved.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

from torch_singlora.functional import factored_update

from .measure import interleaved_times, quartiles
from .methods import METHODS, build_method, train_step
from .workloads import WORKLOADS


def sliced_update(x: torch.Tensor, A: torch.Tensor, d_out: int, d_in: int, c: torch.Tensor) -> torch.Tensor:
    """The first version of the forward: the same function as ``factored_update``, on slices of (n, r) ``A``."""
    return F.linear(F.linear(x, A[:d_in].T) * c, A[:d_out])


def layer_table(tokens: int, r: int, warmup: int, steps: int) -> None:
    for d_in, d_out in [(384, 384), (384, 1536), (1536, 384)]:
        x = torch.randn(tokens, d_in)
        grad = torch.randn(tokens, d_out)
        A = torch.randn(max(d_in, d_out), r, requires_grad=True)
        lora_A = torch.randn(r, d_in, requires_grad=True)
        lora_B = torch.randn(d_out, r, requires_grad=True)
        c = torch.tensor(0.5)

        def run(fn):
            def step() -> None:
                fn().backward(grad)
                for p in (A, lora_A, lora_B):
                    p.grad = None
            return step

        times = interleaved_times({
            "sliced": run(lambda: sliced_update(x, A, d_out, d_in, c)),
            "factored": run(lambda: factored_update(x, A, d_out, d_in, c)),
            "lora": run(lambda: F.linear(F.linear(x, lora_A), lora_B) * 0.5),
        }, warmup, steps)
        row = ", ".join(f"{name} {quartiles(t)['median_ms']:.2f} ms" for name, t in times.items())
        print(f"{d_in:>5} -> {d_out:<5} fwd+bwd, {tokens} tokens, r={r}: {row}")


def model_table(workload_name: str, methods: list[str], r: int) -> None:
    workload = WORKLOADS[workload_name]()
    built = {name: build_method(name, workload.build(), workload.targets, r, alpha=r) for name in methods}
    for _ in range(2):
        for method in built.values():
            train_step(method, workload.batch)
    for name, method in built.items():
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            train_step(method, workload.batch)
        print(f"===== {name}\n" + prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))


def model_ab(workload_name: str, r: int, warmup: int, steps: int) -> None:
    """Training steps of SingLoRA with ``factored_update`` vs ``sliced_update``, beside base and PEFT LoRA."""
    import torch_singlora.layers

    workload = WORKLOADS[workload_name]()
    built = {name: build_method(name, workload.build(), workload.targets, r, alpha=r)
             for name in ("base", "lora", "singlora")}
    built["singlora_sliced"] = build_method("singlora", workload.build(), workload.targets, r, alpha=r)
    sliced = {id(layer.singlora["default"].A) for _, layer in built["singlora_sliced"].model.singlora_layers()}

    def dispatch(x, A, d_out, d_in, c):  # the layers call torch_singlora.layers.factored_update
        return (sliced_update if id(A) in sliced else factored_update)(x, A, d_out, d_in, c)

    torch_singlora.layers.factored_update = dispatch
    try:
        times = interleaved_times({n: (lambda m=m: train_step(m, workload.batch)) for n, m in built.items()},
                                  warmup, steps)
    finally:
        torch_singlora.layers.factored_update = factored_update
    med = {name: quartiles(t)["median_ms"] for name, t in times.items()}
    for name, ms in med.items():
        overhead = (ms - med["base"]) / (med["lora"] - med["base"])
        print(f"{name:>16}: {ms:8.1f} ms/step, overhead vs LoRA's {overhead:.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=sorted(WORKLOADS), default=None)
    parser.add_argument("--ab", choices=sorted(WORKLOADS), default=None, help="sliced vs factored, whole model")
    parser.add_argument("--steps", type=int, default=10, help="timed rounds for --ab")
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=["base", "lora", "singlora"])
    parser.add_argument("--r", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.ab:
        model_ab(args.ab, args.r, warmup=2, steps=args.steps)
    elif args.model:
        model_table(args.model, args.methods, args.r)
    else:
        layer_table(tokens=2048, r=args.r, warmup=3, steps=25)


if __name__ == "__main__":
    main()
