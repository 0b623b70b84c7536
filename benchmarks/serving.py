"""Multi-tenant serving: N concurrent clients over M adapters, SingLoRA's mixed batches against serving one request
at a time and against PEFT's mixed-batch forward (``adapter_names=``) with the same adapters exported to LoRA; the
memory of 1,000 resident adapters of mixed ranks, and the cost of one step on one adapter vs the base and merged
models (``serving_bank.py``). All in one process, one torch thread.

Every generation backend runs through the same continuous-batching engine (``torch_singlora.serving.engine``), so
the rows differ only in how a batch's adapters are applied:

- ``singlora_mixed``: ``AdapterBank`` (gather each row's ``A`` from a stacked bank, two ``bmm`` per layer);
- ``one_at_a_time``: the same engine with ``max_batch_size=1`` (serving requests one after the other);
- ``peft_mixed``: PEFT's ``_mixed_batch_forward`` (a Python loop over the batch's adapters, per layer) with the
  exact LoRA export of the same adapters (``export_lora``), engine and requests identical;
- ``singlora_mixed_http``: ``singlora_mixed`` behind the HTTP server, clients using the ``openai`` package.

Workloads: ``llm`` = SmolLM2-135M-Instruct, adapters on all 7 projections (r = 8), chat prompts of 20-40 tokens,
32 new tokens each (greedy, no early stop, so every request does the same work); ``classify`` = all-MiniLM-L6-v2
with a 5-class head per adapter (``modules_to_save``), every Linear adapted (r = 8), one BBC News article (<= 128
tokens) per request. Client ``c`` uses adapter ``c mod M`` and sends its requests one after the other. Throughput =
tokens (generated, or classified) / wall time; latency = submit to last token, per request.

    python -m benchmarks.serving                      # everything (~40 min on a loaded 2-core CPU)
    python -m benchmarks.serving --parts memory steps # some parts: llm, classify, memory, steps
    python -m benchmarks.serving --quick              # tiny models, seconds (tests/test_serving_benchmarks.py)
"""

from __future__ import annotations

import argparse
import copy
import gc
import shlex
import statistics
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from torch_singlora import SingLoRAConfig, get_singlora_model
from torch_singlora.bank import AdapterBank
from torch_singlora.export import export_lora
from torch_singlora.serving.engine import (ClassificationEngine, ClassificationRequest, GenerationEngine,
                                           GenerationRequest, SamplingParams)

from . import serving_bank
from .measure import machine_description, write_outputs
from .workloads import LLAMA_TARGETS

ALL_LINEAR_LLAMA = list(LLAMA_TARGETS)
QUESTIONS = ["What is the capital of France?", "Write a haiku about the sea.", "Explain photosynthesis briefly.",
             "Give me three tips for learning a language.", "What is 17 times 23?", "Name a famous painter.",
             "How do airplanes stay in the air?", "Suggest a name for a cat."]


# ---- models and adapters ------------------------------------------------------------------------------------------

def llm_model(quick: bool) -> tuple[nn.Module, list[list[int]]]:
    """SmolLM2 (or a tiny Llama) in float32 eval, and the prompts' token ids."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    if quick:
        torch.manual_seed(0)
        model = LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                             num_attention_heads=4, num_key_value_heads=2))
        return model.eval(), [list(range(3, 3 + 5 + i % 4)) for i in range(len(QUESTIONS))]
    from torch_singlora.assets import smollm2_path
    from torch_singlora.llm.generate import prompt_ids

    tokenizer = AutoTokenizer.from_pretrained(smollm2_path())
    prompts = [prompt_ids(tokenizer, [{"role": "user", "content": q}]) for q in QUESTIONS]
    return AutoModelForCausalLM.from_pretrained(smollm2_path(), dtype=torch.float32).eval(), prompts


def classify_model(quick: bool) -> tuple[nn.Module, list[list[int]]]:
    """all-MiniLM-L6-v2 with a 5-class head (or a tiny BERT), and BBC News articles' token ids (<= 128)."""
    from transformers import (AutoModelForSequenceClassification, AutoTokenizer, BertConfig,
                              BertForSequenceClassification)

    if quick:
        torch.manual_seed(0)
        model = BertForSequenceClassification(BertConfig(vocab_size=128, hidden_size=32, num_hidden_layers=2,
                                                         num_attention_heads=2, intermediate_size=64, num_labels=5))
        return model.eval(), [list(range(2, 12 + i)) for i in range(8)]
    from torch_singlora.assets import bbc_news_path, minilm_path

    tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    articles = sorted(Path(bbc_news_path()).glob("*/*.txt"))[::50][:32]
    texts = [a.read_text(encoding="latin-1") for a in articles]
    sequences = [tokenizer(t, truncation=True, max_length=128)["input_ids"] for t in texts]
    torch.manual_seed(0)
    return AutoModelForSequenceClassification.from_pretrained(minilm_path(), num_labels=5).eval(), sequences


def write_adapters(base: nn.Module, count: int, config: SingLoRAConfig, folder: Path, lora: bool) -> list[str]:
    """``count`` adapters of random ``A`` (and random heads) saved under ``folder/singlora/<name>``, with their
    exact LoRA export under ``folder/lora/<name>`` when ``lora``. Returns the names."""
    names = [f"a{i:03d}" for i in range(count)]
    model = get_singlora_model(copy.deepcopy(base), config, names[0])
    for i, name in enumerate(names):
        torch.manual_seed(1000 + i)
        for _, layer in model.singlora_layers():
            layer.singlora[names[0]].reset_parameters()
        for _, wrapper in model.trainable_copies():
            for p in wrapper.copies[names[0]].parameters():
                nn.init.normal_(p, std=0.2)
        model.save_adapter(folder / "singlora" / name, names[0])
        if lora:
            export_lora(model, folder / "lora" / name, format="peft")
    return names


def singlora_backend(base: nn.Module, folder: Path, names: list[str], max_rank: int) -> AdapterBank:
    bank = AdapterBank(base, max_rank=max_rank, capacity=len(names))
    for name in names:
        bank.load(name, folder / "singlora" / name)
    return bank


def peft_backend(base: nn.Module, folder: Path, names: list[str]) -> tuple[nn.Module, Callable]:
    """A ``PeftModel`` holding every exported LoRA, and its mixed-batch hooks as a ``use_adapters`` context."""
    from peft import PeftModel

    model = PeftModel.from_pretrained(base, folder / "lora" / names[0], adapter_name=names[0])
    for name in names[1:]:
        model.load_adapter(folder / "lora" / name, adapter_name=name)
    model.eval()
    return model, lambda rows: model._enable_peft_forward_hooks(adapter_names=rows)


# ---- clients ------------------------------------------------------------------------------------------------------

def drive(submit: Callable[[str, list[int], Callable[[str, Any], None]], None], jobs: list[list[tuple[str, list[int]]]],
          tokens_of: Callable[[list[int], Any], int]) -> dict[str, Any]:
    """Run one thread per client (``jobs[c]``: its requests in order); each waits for a request's end before the next.
    Returns throughput (tokens / wall second), latencies and counts."""
    latencies: list[float] = []
    tokens = [0]
    lock = threading.Lock()

    def client(requests: list[tuple[str, list[int]]]) -> None:
        for adapter, prompt in requests:
            done = threading.Event()
            result: dict[str, Any] = {}

            def emit(kind: str, value: Any) -> None:
                if kind != "token":
                    result["kind"], result["value"] = kind, value
                    done.set()

            start = time.perf_counter()
            submit(adapter, prompt, emit)
            done.wait()
            if result["kind"] == "error":
                raise RuntimeError(result["value"])
            with lock:
                latencies.append(time.perf_counter() - start)
                tokens[0] += tokens_of(prompt, result["value"])

    threads = [threading.Thread(target=client, args=(requests,)) for requests in jobs]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - start
    ordered = sorted(latencies)
    return {"clients": len(jobs), "requests": len(latencies), "tokens": tokens[0], "wall_s": wall,
            "tokens_per_s": tokens[0] / wall, "p50_s": statistics.median(ordered),
            "p99_s": ordered[min(len(ordered) - 1, round(0.99 * (len(ordered) - 1)))]}


def jobs_for(clients: int, adapters: list[str], prompts: list[list[int]], per_client: int) -> list[list[tuple]]:
    return [[(adapters[c % len(adapters)], prompts[(c + k) % len(prompts)]) for k in range(per_client)]
            for c in range(clients)]


@contextmanager
def running(engine: Any):
    engine.start()
    try:
        yield engine
    finally:
        engine.stop()


def generation_run(model: nn.Module, use: Callable, jobs: list, max_tokens: int, batch: int) -> dict[str, Any]:
    engine = GenerationEngine(model, use, max_batch_size=batch, batch_window_s=0.02)
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0)  # no stop tokens: exactly max_tokens each

    def submit(adapter: str, prompt: list[int], emit: Callable) -> None:
        engine.submit(GenerationRequest(adapter, prompt, params, emit))

    with running(engine):
        stats = drive(submit, jobs, lambda prompt, reason: max_tokens)
    return {**stats, "forwards": engine.steps, "most_rows": engine.most_rows}


def classification_run(model: nn.Module, use: Callable, jobs: list, batch: int, pad: int) -> dict[str, Any]:
    engine = ClassificationEngine(model, use, pad_token_id=pad, max_batch_size=batch, batch_window_s=0.02)

    def submit(adapter: str, prompt: list[int], emit: Callable) -> None:
        engine.submit(ClassificationRequest(adapter, [prompt], emit))

    with running(engine):
        stats = drive(submit, jobs, lambda prompt, probs: len(prompt))
    return {**stats, "forwards": engine.steps, "most_rows": engine.most_rows}


def http_run(base: nn.Module, folder: Path, names: list[str], jobs: list, max_tokens: int, batch: int) -> dict:
    """``singlora_mixed`` behind the HTTP server (``Service`` + ``create_app`` on 127.0.0.1), clients through the
    ``openai`` package sending token-id prompts; stop tokens off, as in the engine runs."""
    import openai
    from transformers import AutoTokenizer

    from torch_singlora.assets import smollm2_path
    from torch_singlora.serving.app import create_app, serve_in_thread
    from torch_singlora.serving.service import Limits, Service

    service = Service(base, AutoTokenizer.from_pretrained(smollm2_path()), name="base", max_rank=8,
                      capacity=len(names), limits=Limits(max_batch_size=batch, batch_window_ms=20,
                                                         max_choices=1, max_queue=4096))
    for name in names:
        service.add_adapter(name, folder / "singlora" / name)
    service.stop_token_ids = frozenset()  # every request generates max_tokens, as in the engine runs
    server, thread, port = serve_in_thread(create_app(service))
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=3600)

    def submit(adapter: str, prompt: list[int], emit: Callable) -> None:
        def call() -> None:
            try:
                out = client.completions.create(model=adapter, prompt=prompt, max_tokens=max_tokens, temperature=0)
                emit("done", out.usage.completion_tokens)
            except Exception as exc:  # noqa: BLE001 - reported by drive()
                emit("error", repr(exc))
        threading.Thread(target=call).start()

    try:
        stats = drive(submit, jobs, lambda prompt, generated: generated)
    finally:
        server.should_exit = True
        thread.join()
    return {**stats, "forwards": service.engine.steps, "most_rows": service.engine.most_rows}


# ---- parts --------------------------------------------------------------------------------------------------------

def part_llm(settings: dict[str, Any], folder: Path) -> list[dict[str, Any]]:
    base, prompts = llm_model(settings["quick"])
    config = SingLoRAConfig(r=8, alpha=8, target_modules=ALL_LINEAR_LLAMA, ramp_up_steps=0, init="gaussian",
                            init_std=0.02)
    most = max(m for _, m in settings["configs"])
    names = write_adapters(base, most, config, folder / "llm", lora=True)
    bank = singlora_backend(copy.deepcopy(base), folder / "llm", names, max_rank=8)
    peft_model, peft_use = peft_backend(copy.deepcopy(base), folder / "llm", names)
    rows = []
    for clients, count in settings["configs"]:
        jobs = jobs_for(clients, names[:count], prompts, settings["per_client"])
        sequential = jobs_for(min(clients, settings["sequential_clients"]), names[:count], prompts,
                              settings["per_client"])
        runs = {"singlora_mixed": lambda: generation_run(bank.model, bank.use, jobs, settings["max_tokens"], clients),
                "one_at_a_time": lambda: generation_run(bank.model, bank.use, sequential, settings["max_tokens"], 1),
                "peft_mixed": lambda: generation_run(peft_model.base_model.model, peft_use, jobs,
                                                     settings["max_tokens"], clients)}
        if clients == min(c for c, _ in settings["configs"]):
            runs["singlora_mixed_http"] = lambda: http_run(copy.deepcopy(base), folder / "llm", names[:count], jobs,
                                                           settings["max_tokens"], clients)
        for backend, run in runs.items():
            print(f"llm {clients}x{count} {backend} ...", file=sys.stderr, flush=True)
            rows.append({"workload": "llm", "config": f"{clients}x{count}", "backend": backend, **run()})
    return rows


def part_classify(settings: dict[str, Any], folder: Path) -> list[dict[str, Any]]:
    base, sequences = classify_model(settings["quick"])
    config = SingLoRAConfig(r=8, alpha=8, target_modules="all-linear", modules_to_save=["classifier"],
                            ramp_up_steps=0, init="gaussian", init_std=0.02)
    most = max(m for _, m in settings["configs"])
    names = write_adapters(base, most, config, folder / "classify", lora=True)
    bank = singlora_backend(copy.deepcopy(base), folder / "classify", names, max_rank=8)
    peft_model, peft_use = peft_backend(copy.deepcopy(base), folder / "classify", names)
    pad = base.config.pad_token_id or 0
    rows = []
    for clients, count in settings["configs"]:
        jobs = jobs_for(clients, names[:count], sequences, settings["classify_per_client"])
        runs = {"singlora_mixed": lambda: classification_run(bank.model, bank.use, jobs, clients, pad),
                "one_at_a_time": lambda: classification_run(bank.model, bank.use, jobs, 1, pad),
                "peft_mixed": lambda: classification_run(peft_model.base_model.model, peft_use, jobs, clients, pad)}
        for backend, run in runs.items():
            print(f"classify {clients}x{count} {backend} ...", file=sys.stderr, flush=True)
            rows.append({"workload": "classify", "config": f"{clients}x{count}", "backend": backend, **run()})
    return rows


# ---- the command --------------------------------------------------------------------------------------------------

PARTS = ["llm", "classify", "memory", "steps"]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--parts", nargs="+", default=PARTS, choices=PARTS,
                        help="what to measure (a subset writes serving_<parts>.md, beside the whole run's serving.md)")
    parser.add_argument("--configs", nargs="+", default=["16x16", "64x64"], help="CLIENTSxADAPTERS")
    parser.add_argument("--max-tokens", type=int, default=32, help="new tokens per request")
    parser.add_argument("--per-client", type=int, default=1, help="generation requests per client")
    parser.add_argument("--classify-per-client", type=int, default=4, help="classification requests per client")
    parser.add_argument("--sequential-clients", type=int, default=16,
                        help="clients of the one-at-a-time run (it is slow; its throughput does not depend on it)")
    parser.add_argument("--memory-adapters", type=int, default=1000, help="adapters on q_proj, v_proj (memory)")
    parser.add_argument("--memory-adapters-all", type=int, default=102, help="adapters on all 7 projections")
    parser.add_argument("--peft-per-rank", type=int, default=10, help="LoRA exports of each rank PEFT loads")
    parser.add_argument("--step-rounds", type=int, default=15, help="timed rounds of the steps part")
    parser.add_argument("--quick", action="store_true", help="tiny models, small counts: a smoke test")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    torch.set_num_threads(1)
    settings = {"quick": args.quick, "configs": [tuple(int(v) for v in c.split("x")) for c in args.configs],
                "max_tokens": args.max_tokens, "per_client": args.per_client,
                "classify_per_client": args.classify_per_client, "sequential_clients": args.sequential_clients,
                "memory_adapters": args.memory_adapters, "memory_adapters_all": args.memory_adapters_all,
                "peft_per_rank": args.peft_per_rank, "step_rounds": args.step_rounds, "step_warmup": 2}
    if args.quick:
        settings.update(configs=[(3, 3)], max_tokens=4, classify_per_client=2, sequential_clients=3,
                        memory_adapters=12, memory_adapters_all=6, peft_per_rank=2, step_rounds=2, step_warmup=1)
    command = "python -m benchmarks.serving " + " ".join(shlex.quote(a) for a in (argv or []))
    results: dict[str, Any] = {"command": command.strip(), "machine": machine_description(), "settings": {
        k: v for k, v in settings.items()}, "rows": {}}
    parts = {"llm": part_llm, "classify": part_classify,
             "memory": lambda s, f: serving_bank.part_memory(s, f, llm_model),
             "steps": lambda s, f: serving_bank.part_steps(s, f, llm_model)}
    with tempfile.TemporaryDirectory() as tmp:
        for part in args.parts:
            results["rows"][part] = parts[part](settings, Path(tmp))
            gc.collect()
    stem = "serving" + "".join(f"_{part}" for part in args.parts if args.parts != PARTS) + "_quick" * args.quick
    print(write_outputs(results, markdown, Path(args.out), stem))
    return results


def markdown(results: dict[str, Any]) -> str:
    lines = [f"Command: `{results['command']}`", "", f"Machine: {results['machine']}", ""]
    for workload in ("llm", "classify"):
        rows = results["rows"].get(workload)
        if not rows:
            continue
        unit = "generated tokens/s" if workload == "llm" else "classified tokens/s"
        lines += [f"### {workload}", "", f"| clients x adapters | backend | clients | requests | {unit} | vs one at a "
                  "time | vs peft_mixed | p50 s | p99 s | forwards | most rows |", "|" + "---|" * 11]
        for row in rows:
            same = {r["backend"]: r for r in rows if r["config"] == row["config"]}
            speed = row["tokens_per_s"]
            lines.append(f"| {row['config']} | {row['backend']} | {row['clients']} | {row['requests']} | {speed:.1f} | "
                         f"{speed / same['one_at_a_time']['tokens_per_s']:.2f} | "
                         f"{speed / same['peft_mixed']['tokens_per_s']:.2f} | {row['p50_s']:.2f} | "
                         f"{row['p99_s']:.2f} | "
                         f"{row['forwards']} | {row['most_rows']} |")
        lines.append("")
    lines += serving_bank.markdown(results)
    return "\n".join(lines)


if __name__ == "__main__":
    main(sys.argv[1:])
