"""Instruction tuning on a budget: non-padding tokens per second and peak memory of ``singlora train --task sft``
(padded batches, ``--packing``, ``--gradient-checkpointing``) against TRL's ``SFTTrainer`` + PEFT LoRA
(``padding_free`` off and on), same model, rank, target modules, data, batch, steps and learning-rate schedule.

    .venv/bin/python -m benchmarks.sft                 # SmolLM2-135M-Instruct, both datasets (~40 min, 1 thread)
    .venv/bin/python -m benchmarks.sft --quick         # a tiny random Llama, 2 steps (what the test runs)

Each run is a child process (``python -m benchmarks.sft --child SPEC``), one at a time, one thread
(``OMP_NUM_THREADS=1``, ``torch.set_num_threads(1)``). A child loads its model and data, trains ``steps`` optimizer
steps of ``batch`` examples, and reports:

- ``tokens_per_cpu_s``: the non-padding input tokens of the steps (the same examples in every run: one epoch of a
  dataset of ``steps * batch`` examples) over the CPU time of the training loop (``time.process_time()``: on a
  shared machine the time the run had a core, which wall time is not); ``tokens_per_s`` over wall time too;
- ``peak_rss_gb``: the child's ``ru_maxrss`` (loading included: the figure a user meets);
- ``losses``: the training loss of every step (the same optimizer steps, so the curves are comparable).

Data, built at run time from text that installs offline (nothing is copied into the repository):
- ``bbc``: the README's chat example, "Which section of BBC News is this article from?" (``llm.examples``,
  ``section``, 60 words of the article): long prompts, one-word answers;
- ``chat``: short chat turns from Debian's ``fortunes`` (``apt-get install fortunes``): "Tell me something about
  <topic>." answered by a fortune of that file (at most 400 characters): short prompts, answers of varied length.

Both are tokenized once by this library (chat template, assistant-only labels, ``--max-length``); TRL gets the same
token ids and labels (``SFTDataset.to_hf_dataset``, as in docs/interop.md), so both train on identical tokens.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

FORTUNES = Path("/usr/share/games/fortunes")
RUNS = {  # name -> (engine, options)
    "singlora": ("singlora", []),
    "singlora --packing": ("singlora", ["--packing"]),
    "singlora --gradient-checkpointing": ("singlora", ["--gradient-checkpointing"]),
    "trl+peft lora": ("trl", {"padding_free": False}),
    "trl+peft lora padding_free": ("trl", {"padding_free": True}),
}


# ---- data -------------------------------------------------------------------------------------------------------


def bbc_rows(count: int, seed: int) -> list[dict]:
    from torch_singlora.llm.examples import bbc_articles, instruction

    articles = bbc_articles()
    sections = sorted({a.section for a in articles})
    random.Random(seed).shuffle(articles)
    return [instruction(article, "section", sections, 60) for article in articles[:count]]


def chat_rows(count: int, seed: int) -> list[dict]:
    if not FORTUNES.is_dir():
        raise SystemExit(f"{FORTUNES} is missing: apt-get install fortunes")
    rows = []
    for path in sorted(p for p in FORTUNES.iterdir() if p.is_file() and not p.suffix and "art" not in p.name):
        for text in path.read_text(encoding="utf-8", errors="replace").split("\n%\n"):
            text = text.strip()
            if text and len(text) <= 400:
                rows.append({"messages": [{"role": "user", "content": f"Tell me something about {path.name}."},
                                          {"role": "assistant", "content": text}]})
    random.Random(seed).shuffle(rows)
    return rows[:count]


def write_data(work: Path, dataset: str, count: int, seed: int = 0) -> Path:
    rows = bbc_rows(count, seed) if dataset == "bbc" else chat_rows(count, seed)
    path = work / f"{dataset}.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def tokenized(model: str, data: Path, max_length: int) -> Any:
    """The dataset as ``singlora train --task sft`` tokenizes it (template, assistant-only labels, truncation)."""
    from transformers import AutoTokenizer

    from torch_singlora.llm.data import read_conversations
    from torch_singlora.llm.tokenization import tokenize_conversations

    tokenizer = AutoTokenizer.from_pretrained(model)
    conversations, _ = read_conversations(data)
    return tokenizer, tokenize_conversations(tokenizer, conversations, max_length=max_length)


# ---- one run (a child process) ----------------------------------------------------------------------------------


def run_singlora(spec: dict) -> dict:
    """``singlora train --task sft`` on ``spec``'s data: the CLI's own config parsing and loop (``prepare`` +
    ``train_epoch``), timed around the steps only (no evaluation, no adapter written)."""
    from torch_singlora.cli import parse_args, train_config
    from torch_singlora.train.loop import prepare, train_epoch

    out = Path(spec["work"]) / spec["name"].replace(" ", "_").replace("-", "")
    argv = ["train", "--task", "sft", "--model", spec["model"], "--train-data", spec["data"], "--output-dir", str(out),
            "--target-modules", "all-linear", "--r", str(spec["r"]), "--alpha", str(spec["r"]), "--lr",
            str(spec["lr"]), "--max-steps", str(spec["steps"]), "--batch-size", str(spec["batch"]),
            "--max-length", str(spec["max_length"]), "--warmup", str(spec["warmup"]), "--ramp-up-steps", "0.01",
            "--save-every", "0", "--quiet", "--no-plot", "--overwrite", *spec["options"]]
    config = train_config(parse_args(argv))
    run = prepare(config)
    run.model.train()
    cpu, wall = time.process_time(), time.perf_counter()
    while run.step < run.total_steps:
        train_epoch(run)
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    run.progress.close()
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {"cpu_s": cpu, "wall_s": wall, "losses": [r["loss"] for r in records if r["kind"] == "train"]}


def run_trl(spec: dict) -> dict:
    """TRL ``SFTTrainer`` + PEFT LoRA (same r, alpha = r, all linear layers, same schedule) on the same tokens."""
    import torch
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM
    from trl import SFTConfig, SFTTrainer

    tokenizer, dataset = tokenized(spec["model"], Path(spec["data"]), spec["max_length"])
    model = AutoModelForCausalLM.from_pretrained(spec["model"], dtype=torch.float32)
    padding_free = spec["options"]["padding_free"]
    args = SFTConfig(output_dir=str(Path(spec["work"]) / "trl"), per_device_train_batch_size=spec["batch"],
                     max_steps=spec["steps"], learning_rate=spec["lr"], lr_scheduler_type="linear",
                     warmup_steps=spec["warmup"], logging_steps=1, save_strategy="no", report_to="none",
                     use_cpu=True, bf16=False, seed=0, padding_free=padding_free,
                     max_length=None if padding_free else spec["max_length"], disable_tqdm=True)
    peft_config = LoraConfig(r=spec["r"], lora_alpha=spec["r"], lora_dropout=0.0, target_modules="all-linear",
                             task_type="CAUSAL_LM")
    trainer = SFTTrainer(model=model, args=args, train_dataset=dataset.to_hf_dataset(), processing_class=tokenizer,
                         peft_config=peft_config)
    cpu, wall = time.process_time(), time.perf_counter()
    trainer.train()
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    return {"cpu_s": cpu, "wall_s": wall, "losses": [r["loss"] for r in trainer.state.log_history if "loss" in r]}


def child(spec: dict) -> None:
    """Run ``spec`` in this process and print its result as one JSON line."""
    import torch

    torch.set_num_threads(1)
    result = (run_singlora if spec["engine"] == "singlora" else run_trl)(spec)
    result["peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux -> GiB
    print("RESULT " + json.dumps(result))


# ---- the parent ---------------------------------------------------------------------------------------------------


def launch(spec: dict, nice: int) -> dict:
    """``spec`` in a fresh child process (one thread, at niceness ``nice``); its result."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    done = subprocess.run(["nice", "-n", str(nice), sys.executable, "-m", "benchmarks.sft", "--child", json.dumps(spec)],
                          capture_output=True, text=True, env=env, cwd=Path(__file__).resolve().parents[1])
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode or not lines:
        raise SystemExit(f"run {spec['name']!r} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def render(results: dict) -> str:
    lines = []
    for dataset, block in results["datasets"].items():
        reference = "trl+peft lora padding_free" if "trl+peft lora padding_free" in block["runs"] else next(
            iter(block["runs"]))
        base = block["runs"][reference]["tokens_per_cpu_s"]
        lines += [f"### {dataset}: {block['examples']} examples, {block['tokens']:,} tokens ({block['answer_tokens']:,} "
                  f"trained), lengths {block['length_min']}-{block['length_max']} (median {block['length_median']}); "
                  f"{results['steps']} steps of {results['batch']}", "",
                  f"| run | tokens/CPU-s | vs {reference} | tokens/s (wall) | peak RSS GiB | mean loss, last half |",
                  "|---|---|---|---|---|---|"]
        for name, run in block["runs"].items():
            half = run["losses"][len(run["losses"]) // 2:]
            lines.append(f"| {name} | {run['tokens_per_cpu_s']:.0f} | {run['tokens_per_cpu_s'] / base:.2f}x | "
                         f"{run['tokens_per_s']:.0f} | {run['peak_rss_gb']:.2f} | {sum(half) / len(half):.4f} |")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--quick", action="store_true", help="a tiny random Llama, 2 steps, 2 runs per dataset")
    parser.add_argument("--datasets", nargs="+", default=["bbc", "chat"], choices=["bbc", "chat"])
    parser.add_argument("--runs", nargs="+", default=list(RUNS), choices=list(RUNS))
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--r", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    parser.add_argument("--stem", default="sft")
    parser.add_argument("--nice", type=int, default=19, help="niceness of the runs (CPU time is measured, so a "
                        "loaded machine slows the benchmark, not its figures)")
    args = parser.parse_args(argv)
    if args.child:
        return child(json.loads(args.child))

    from torch_singlora.assets import smollm2_path

    from .measure import machine_description, write_outputs

    steps = 2 if args.quick else args.steps
    results: dict[str, Any] = {"machine": machine_description(), "steps": steps, "batch": args.batch_size,
                               "max_length": args.max_length, "r": args.r, "lr": args.lr, "datasets": {},
                               "command": "python -m benchmarks.sft " + " ".join(argv if argv is not None
                                                                                  else sys.argv[1:])}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model = quick_model(work) if args.quick else smollm2_path()
        for dataset in args.datasets:
            data = write_data(work, dataset, steps * args.batch_size)
            _, examples = tokenized(model, data, args.max_length)
            lengths = sorted(len(ids) for ids in examples.input_ids)
            block = results["datasets"][dataset] = {
                "examples": len(lengths), "tokens": sum(lengths), "answer_tokens": examples.answer_tokens,
                "length_min": lengths[0], "length_max": lengths[-1], "length_median": lengths[len(lengths) // 2],
                "runs": {}}
            for name in args.runs:
                engine, options = RUNS[name]
                spec = {"name": name, "engine": engine, "options": options, "model": model, "data": str(data),
                        "work": str(work), "steps": steps, "batch": args.batch_size, "max_length": args.max_length,
                        "r": args.r, "lr": args.lr, "warmup": max(1, round(0.06 * steps))}
                result = launch(spec, args.nice)
                result["tokens_per_cpu_s"] = block["tokens"] / result["cpu_s"]
                result["tokens_per_s"] = block["tokens"] / result["wall_s"]
                block["runs"][name] = result
                print(f"{dataset} {name}: {result['tokens_per_cpu_s']:.0f} tokens/CPU-s, "
                      f"{result['peak_rss_gb']:.2f} GB", file=sys.stderr, flush=True)
    title = (f"SFT throughput and memory, one thread ({results['machine']['cpu']}), model "
             f"{'tiny random Llama' if args.quick else 'SmolLM2-135M-Instruct'}, r={args.r}, all linear layers, "
             f"lr {args.lr}. Command: `{results['command']}`")
    print(write_outputs(results, render, args.out, "quick-sft" if args.quick else args.stem, title))


def quick_model(work: Path) -> str:
    """A tiny random Llama with SmolLM2's tokenizer and chat template (for ``--quick``)."""
    import torch
    import transformers

    from torch_singlora.assets import smollm2_path

    tokenizer = transformers.AutoTokenizer.from_pretrained(smollm2_path())
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                      num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                                      tie_word_embeddings=True, pad_token_id=tokenizer.pad_token_id)
    transformers.LlamaForCausalLM(config).save_pretrained(work / "tiny")
    tokenizer.save_pretrained(work / "tiny")
    return str(work / "tiny")


if __name__ == "__main__":
    main()
