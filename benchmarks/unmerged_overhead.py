"""Unmerged inference overhead: SmolLM2-135M-Instruct with one SingLoRA adapter on all 7 projections (r = 8), eval,
no gradients, against the base model, in one process, rounds interleaved:

- ``base``: a copy of the plain model (no wrappers); ``merged``: ``merge_and_unload()`` of a copy (the floor);
- ``unmerged``: the forward as shipped: each Linear update added into the base output in place
  (``functional.add_factored_update_``, ``layers.IN_PLACE_INFERENCE``);
- ``unmerged_out_of_place``: the previous forward, ``base(x) + update`` (``IN_PLACE_INFERENCE = False``).

Two shapes: ``prefill`` (4 prompts x 128 tokens) and ``decode`` (16 sequences, one new token over a 64-token KV
cache). One thread; medians of interleaved rounds. The concatenated-weight variant the issue suggests (``x @ [W0;
c A_in^T]`` as one GEMM) was measured on single layers and not adopted; see ``serving_results.md``.

    python -m benchmarks.unmerged_overhead            # SmolLM2, ~2 min on a quiet 2-core CPU
    python -m benchmarks.unmerged_overhead --quick    # a tiny Llama, seconds (tests/test_serving_benchmarks.py)
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
from pathlib import Path
from typing import Any, Callable

import torch

from torch_singlora import SingLoRAConfig, get_singlora_model, layers

from .measure import interleaved_times, machine_description, write_outputs
from .workloads import LLAMA_TARGETS


def load_model(quick: bool) -> torch.nn.Module:
    """SmolLM2-135M-Instruct (or a tiny random Llama with ``quick``), float32, eval."""
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    if quick:
        torch.manual_seed(0)
        return LlamaForCausalLM(LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=160,
                                            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2))
    from torch_singlora.assets import smollm2_path

    return AutoModelForCausalLM.from_pretrained(smollm2_path(), dtype=torch.float32)


class StepRunner:
    """``runner(m)``: one timed call of model ``m`` for ``shape``: ``prefill`` (a forward of ``batch`` prompts of
    ``length`` random tokens) or ``decode`` (one new token for ``batch`` sequences over a ``length``-token cache,
    cropped back after each call so that every call sees the same cache). ``model`` gives the vocabulary and the
    cache; every model run must share its architecture."""

    def __init__(self, model: Any, shape: str, quick: bool) -> None:
        from transformers import DynamicCache

        self.shape = shape
        self.batch, length = (4, 128) if shape == "prefill" else (16, 64)
        if quick:
            self.batch, length = self.batch // 2, length // 4
        self.ids = torch.randint(0, model.config.vocab_size, (self.batch, length))
        if shape == "decode":
            with torch.no_grad():
                self.cache = DynamicCache(config=model.config)
                model(input_ids=self.ids, use_cache=True, cache=self.cache)
            self.step = torch.randint(0, model.config.vocab_size, (self.batch, 1))

    def __call__(self, m: Any) -> Callable[[], None]:
        if self.shape == "prefill":
            return lambda: m(input_ids=self.ids)

        def call() -> None:
            m(input_ids=self.step, use_cache=True, cache=self.cache)
            self.cache.crop(-1)  # drop the new token: every call sees the same cache
        return call


def calls(plain: Any, model: Any, merged: Any, shape: str, quick: bool) -> dict[str, Callable[[], None]]:
    """One timed call per method for ``shape`` (``prefill`` or ``decode``)."""
    run = StepRunner(model, shape, quick)

    def out_of_place() -> None:
        layers.IN_PLACE_INFERENCE = False
        try:
            run(model)()
        finally:
            layers.IN_PLACE_INFERENCE = True

    return {"base": run(plain), "merged": run(merged), "unmerged": run(model), "unmerged_out_of_place": out_of_place}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a tiny Llama, few rounds (smoke test)")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    rounds = 3 if args.quick else args.rounds
    base = load_model(args.quick).eval()
    plain = copy.deepcopy(base)
    model = get_singlora_model(base, SingLoRAConfig(r=8, alpha=8, target_modules=list(LLAMA_TARGETS), ramp_up_steps=0,
                                                    init="gaussian", init_std=0.02)).eval()
    merged = copy.deepcopy(model).merge_and_unload().eval()
    results: dict[str, Any] = {"command": "python -m benchmarks.unmerged_overhead" + (" --quick" if args.quick else ""),
                               "machine": machine_description(), "rounds": rounds, "shapes": {}}
    with torch.no_grad():
        for shape in ("prefill", "decode"):
            times = interleaved_times(calls(plain, model, merged, shape, args.quick), args.warmup, rounds)
            medians = {name: statistics.median(t) for name, t in times.items()}
            results["shapes"][shape] = {"median_ms": {k: v * 1e3 for k, v in medians.items()},
                                        "over_base": {k: v / medians["base"] for k, v in medians.items()}}
    print(write_outputs(results, markdown, Path(args.out),
                        "unmerged_overhead_quick" if args.quick else "unmerged_overhead"))
    return results


def markdown(results: dict[str, Any]) -> str:
    lines = [f"Command: `{results['command']}`", "", f"Machine: {results['machine']}", "",
             "| shape | method | ms (median) | / base |", "|---|---|---|---|"]
    for shape, row in results["shapes"].items():
        for name, ms in row["median_ms"].items():
            lines.append(f"| {shape} | {name} | {ms:.2f} | {row['over_base'][name]:.3f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main(sys.argv[1:])
