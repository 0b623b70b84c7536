"""Study 8 (issue 26, part 2): what tuning costs in forgetting.

PEFT's method-comparison harness reports forgetting next to accuracy. Here: the change of SmolLM2-135M-Instruct's
language-model loss on held-out general text that no run trains on (Debian's ``fortunes``: quotations, jokes and
definitions, a fixed sample of ``--texts`` entries of 10-80 words, each scored as its own document, at most
``--max-tokens`` tokens), after tuning, per method at its chosen learning rate, over seeds. Two tunings:

- ``llm``: study 6's runs (``studies/llm_claim.py``): BBC News section from the headline as sequence
  classification, r = 8 on all seven projections, 48 steps; each method at the rate study 6 chose on validation
  (read from its ``results.json``). The same run settings as study 6, so a shared ``--work`` folder reuses its runs.
  Only the backbone is tuned (plus a fresh ``score`` head): its merged weights go into the base causal LM, whose
  LM head (tied to the embeddings, never adapted) scores the text.
- ``sft``: the sft demo's runs (``torch_singlora.demo.train_args``: ``singlora train --task sft``, every Linear of
  the 30 blocks at r = 8, 30 steps of batch 8, answer-only loss) with a learning rate chosen per method on seed 0 over
  ``--sft-lrs`` by the answer loss on 40 held-out instructions that the demo does not use (its 40 test
  instructions are scored only at the end); then the other seeds at the chosen rate.

Forgetting = held-out loss of the tuned model (adapter merged) minus the base model's, in nats per token
(positive = worse at general text). Every run and every evaluation is cached in the work folder, so a stopped study
resumes.

Run:  ``nice -n 19 .venv/bin/python -m studies.forgetting``  (``--quick``: tiny random Llama, a few seconds).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from studies.bbc import DEFAULT_WORK, command_line
from studies.common import environment, limit_threads, write_json, write_text

FORTUNES = Path("/usr/share/games/fortunes")
NOT_PROSE = ("ascii-art",)  # fortune files of pictures, not text
METHODS = ("singlora", "lora", "loraplus", "dora")
SFT_GRID = (3e-4, 1e-3, 3e-3)
LLM_RESULTS = Path(__file__).parent / "results" / "llm_claim" / "results.json"


# ----------------------------------------------------------------------------------------------------------------
# The held-out text and its loss


def fortunes(folder: Path, count: int, *, min_words: int = 10, max_words: int = 80) -> list[str]:
    """``count`` fortunes of ``min_words``-``max_words`` words from the fortune files in ``folder`` (entries split
    on ``%`` lines, white space collapsed, mostly letters, each once), a fixed random sample (seed 0)."""
    if not folder.is_dir():
        raise SystemExit(f"{folder}: no fortune files; install Debian's fortunes package (apt-get install fortunes) "
                         "or give --fortunes FOLDER")
    entries = set()
    for path in sorted(folder.iterdir()):
        if path.suffix in (".dat", ".u8") or path.name in NOT_PROSE or not path.is_file():
            continue
        for entry in path.read_text(encoding="utf-8", errors="replace").split("\n%\n"):
            text = " ".join(entry.replace("\n%", "").split())
            letters = sum(c.isalpha() for c in text)
            if min_words <= len(text.split()) <= max_words and letters >= 0.7 * len(text.replace(" ", "")):
                entries.add(text)
    if len(entries) < count:
        raise SystemExit(f"{folder}: {len(entries)} usable fortunes, fewer than --texts={count}")
    return random.Random(0).sample(sorted(entries), count)


def heldout_loss(model: Any, tokenizer: Any, texts: list[str], max_tokens: int, batch_size: int = 16
                 ) -> dict[str, float]:
    """Mean next-token loss (nats per predicted token) of a causal LM on ``texts``, each its own document cut at
    ``max_tokens`` tokens (the library's collator and ``token_loss``)."""
    from torch.utils.data import DataLoader

    from torch_singlora.train.data import Collator, TokenizedDataset
    from torch_singlora.train.evaluate import token_loss

    ids = [row[:max_tokens] for row in tokenizer(texts)["input_ids"]]
    loader = DataLoader(TokenizedDataset(ids), batch_size=batch_size, collate_fn=Collator(tokenizer.pad_token_id, True))
    total, count = token_loss(model, loader)
    return {"loss": total / count, "tokens": count}


def tuned_causal_lm(adapter: Path, base_model: str) -> Any:
    """The tuned model of a ``singlora train`` adapter folder, merged, as a causal LM: itself for a causal-LM run;
    for a sequence classifier, the base causal LM with the tuned backbone's merged weights (its LM head, tied to the
    embeddings, is the base model's)."""
    from transformers import AutoModelForCausalLM

    from torch_singlora.train.methods import method_class
    from torch_singlora.runs import load_trained

    trained, info = load_trained(str(adapter), base_model)
    merged = method_class(info["method"]).merged(trained)
    if hasattr(merged, "lm_head"):
        return merged
    causal = AutoModelForCausalLM.from_pretrained(base_model)
    causal.model.load_state_dict(merged.model.state_dict())  # strict: every backbone weight is replaced
    return causal


def cached_loss(path: Path, compute: Any) -> dict[str, float]:
    """``compute()`` once, kept in ``path``."""
    if path.is_file():
        return json.loads(path.read_text())
    result = compute()
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json(path, result)
    return result


@dataclass
class HeldOut:
    """The held-out texts, how they are scored, and the base model's loss on them."""

    texts: list[str]
    max_tokens: int
    base_model: str
    work: Path

    @property
    def key(self) -> str:
        import hashlib

        return hashlib.sha1(json.dumps([self.texts, self.max_tokens]).encode()).hexdigest()[:8]

    def base(self) -> dict[str, float]:
        def compute() -> dict[str, float]:
            from transformers import AutoModelForCausalLM, AutoTokenizer

            model = AutoModelForCausalLM.from_pretrained(self.base_model)
            return heldout_loss(model, AutoTokenizer.from_pretrained(self.base_model), self.texts, self.max_tokens)

        folder = self.work / "forgetting" / f"base_{Path(self.base_model).name}_{self.key}.json"
        return cached_loss(folder, compute)

    def tuned(self, run_dir: Path) -> dict[str, float]:
        """The tuned run's loss and its change from the base model's (``delta``, nats per token)."""
        def compute() -> dict[str, float]:
            from transformers import AutoTokenizer

            model = tuned_causal_lm(run_dir / "adapter", self.base_model)
            return heldout_loss(model, AutoTokenizer.from_pretrained(self.base_model), self.texts, self.max_tokens)

        tuned = cached_loss(run_dir / f"heldout_{self.key}.json", compute)
        base = self.base()["loss"]
        return {**tuned, "base_loss": base, "delta": tuned["loss"] - base, "relative": tuned["loss"] / base - 1}


# ----------------------------------------------------------------------------------------------------------------
# The two tunings


def llm_runs(args: argparse.Namespace) -> tuple[Any, dict[str, float], list[tuple[Any, dict[str, Any]]]]:
    """Study 6's runs at each method's chosen rate and ``args.seeds`` seeds: ``(bench, rates, [(spec, result)])``."""
    from studies.bbc import Split
    from studies.llm_claim import Runner, base_spec
    from studies.llm_task import QUICK_SPLIT, Settings, make_llm_bench

    split = QUICK_SPLIT if args.quick else Split(40, 30, 60, "titles")  # study 6's split
    steps, batch, length = (2, 4, 16) if args.quick else (48, 16, 24)
    settings = Settings(split, steps, batch, length, args.seeds, (), tuple(args.methods), args.jobs)
    bench = make_llm_bench(args.work, split, args.quick)
    if args.quick:
        rates = {m: 1e-3 for m in args.methods}
    else:
        chosen = json.loads(args.llm_results.read_text())["chosen"]
        rates = {m: float(chosen[m]) for m in args.methods}
    specs = [dataclasses.replace(base_spec(settings), method=m, lr=rates[m], seed=s)
             for s in range(args.seeds) for m in args.methods]
    runner = Runner(bench, args.jobs, lambda: None)  # trains through llm_task.train_run, as study 6
    runner.run(specs)
    return bench, rates, [(spec, runner.results[spec]) for spec in specs]


@dataclass(frozen=True)
class SFTRun:
    method: str
    lr: float
    seed: int

    def key(self) -> str:
        return f"{self.method}_lr{self.lr:g}_s{self.seed}"


@dataclass
class SFTBench:
    """The sft demo's runs: its data (plus a validation file), its ``singlora train`` arguments, one folder per run."""

    model: str
    folder: Path
    demo: argparse.Namespace  # what torch_singlora.demo.train_args reads: lr, steps, batch_size, eval_examples, ...

    def run_dir(self, run: SFTRun) -> Path:
        return self.folder / "runs" / run.key()

    def write_data(self) -> None:
        """The demo's train.jsonl and test.jsonl, and val.jsonl: the next held-out instructions (never trained on)."""
        from torch_singlora.llm.examples import bbc_instructions, write_jsonl

        if (self.folder / "val.jsonl").is_file():
            return
        train, test = bbc_instructions(self.demo.task, words=self.demo.words)
        count = self.demo.eval_examples
        self.folder.mkdir(parents=True, exist_ok=True)
        write_jsonl(self.folder / "train.jsonl", train)
        write_jsonl(self.folder / "test.jsonl", test[:count])
        write_jsonl(self.folder / "val.jsonl", test[count : 2 * count])

    def run(self, run: SFTRun) -> dict[str, Any]:
        """Train ``run`` with the demo's arguments (validation on val.jsonl), score the demo's test set; cached."""
        out = self.run_dir(run)
        if (out / "result.json").is_file():
            return json.loads((out / "result.json").read_text())
        from torch_singlora.cli import evaluate, main as cli_main
        from torch_singlora.demo import train_args
        from torch_singlora.train.metrics import read_summary

        argv = train_args(run.method, self.model, self.folder, out.parent, argparse.Namespace(**{
            **vars(self.demo), "lr": run.lr}))
        argv = with_value(with_value(with_value(argv, "--seed", str(run.seed)), "--output-dir", str(out)),
                          "--eval-data", str(self.folder / "val.jsonl"))
        start = time.perf_counter()
        if cli_main(argv) != 0:
            raise RuntimeError(f"singlora {' '.join(argv)} failed")
        summary = read_summary(out)
        test = evaluate(str(out / "adapter"), str(self.folder / "test.jsonl"), quiet=True)
        result = {"run": dataclasses.asdict(run), "argv": argv, "wall_s": time.perf_counter() - start,
                  "val": {k: summary.get(k) for k in ("eval_loss", "exact_match", "rouge_l")},
                  "val_base": {k: summary["base"].get(k) for k in ("eval_loss", "exact_match", "rouge_l")},
                  "test": {k: test.get(k) for k in ("eval_loss", "exact_match", "rouge_l")},
                  "adapter_params": summary.get("adapter_params")}
        write_json(out / "result.json", result)
        print(f"  sft {run.key()}: val loss {result['val']['eval_loss']:.3f}, test exact match "
              f"{result['test']['exact_match']:.3f} ({result['wall_s']:.0f} s)", flush=True)
        return result


def with_value(argv: list[str], flag: str, value: str) -> list[str]:
    """``argv`` with the value after ``flag`` replaced (the flag must be there once)."""
    if argv.count(flag) != 1:
        raise ValueError(f"{flag} appears {argv.count(flag)} times in {argv}")
    i = argv.index(flag)
    return argv[: i + 1] + [value] + argv[i + 2 :]


def sft_runs(args: argparse.Namespace, model: str
             ) -> tuple[dict[str, list[float]], dict[str, float], list[tuple[SFTRun, dict[str, Any], Path]]]:
    """Seed-0 sweeps (a best rate on a grid edge adds the next rate, once per method, unless ``--no-sft-extend``),
    then the other seeds (``--sft-seeds``) at the chosen rate: ``(grids, chosen, [(run, result, run folder)])``."""
    from studies.llm_claim import next_rate

    demo = argparse.Namespace(task="section", steps=2 if args.quick else 30, batch_size=2 if args.quick else 8,
                              words=8 if args.quick else 32, eval_examples=4 if args.quick else 40,
                              samples=0 if args.quick else 3)
    bench = SFTBench(model, args.work / "forgetting" / ("sft_quick" if args.quick else "sft_demo"), demo)
    bench.write_data()
    grids = {m: sorted(args.sft_lrs) for m in args.methods}
    done: dict[SFTRun, dict[str, Any]] = {}

    def val_loss(run: SFTRun) -> float:
        return done[run]["val"]["eval_loss"]

    extended: set[str] = set() if args.sft_extend else set(args.methods)
    while True:
        for lr in sorted({lr for grid in grids.values() for lr in grid}):  # rate by rate: a cut-short study has
            for method in (m for m in args.methods if lr in grids[m]):    # every method at the first rates
                done[SFTRun(method, lr, 0)] = bench.run(SFTRun(method, lr, 0))
        edges = [m for m in args.methods if m not in extended and min(
            grids[m], key=lambda lr: (val_loss(SFTRun(m, lr, 0)), lr)) in (min(grids[m]), max(grids[m]))]
        if not edges:
            break
        for method in edges:
            best = min(grids[method], key=lambda lr: (val_loss(SFTRun(method, lr, 0)), lr))
            grids[method] = sorted(grids[method] + [next_rate(best, up=best == max(grids[method]))])
            extended.add(method)
    chosen = {m: min(grids[m], key=lambda lr: (val_loss(SFTRun(m, lr, 0)), lr)) for m in args.methods}
    for seed in range(1, args.sft_seeds or args.seeds):
        for method in args.methods:
            done[SFTRun(method, chosen[method], seed)] = bench.run(SFTRun(method, chosen[method], seed))
    return grids, chosen, [(run, result, bench.run_dir(run)) for run, result in done.items()]


# ----------------------------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: tiny random Llama, 2 steps per run")
    parser.add_argument("--work", type=Path, default=DEFAULT_WORK, help="runs, cache and data")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "forgetting")
    parser.add_argument("--parts", nargs="+", choices=("llm", "sft"), default=["llm", "sft"])
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--sft-lrs", type=float, nargs="+", default=list(SFT_GRID), help="the sft sweep's grid")
    parser.add_argument("--sft-seeds", type=int, default=None, help="seeds of the sft runs (default: --seeds)")
    parser.add_argument("--sft-extend", action=argparse.BooleanOptionalAction, default=True,
                        help="a best sft rate on the grid's edge adds the next rate (once per method)")
    parser.add_argument("--llm-results", type=Path, default=LLM_RESULTS, help="study 6's results (its chosen rates)")
    parser.add_argument("--fortunes", type=Path, default=FORTUNES, help="folder of Debian fortune files")
    parser.add_argument("--texts", type=int, default=None, help="fortunes scored (default 128; --quick: 8)")
    parser.add_argument("--max-tokens", type=int, default=128, help="tokens per fortune at most")
    parser.add_argument("--jobs", type=int, default=1, help="LLM-study runs trained at a time")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    from studies.forgetting_report import plots, report, summarise

    args = parse_args(argv)
    limit_threads(1)
    args.out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    texts = fortunes(args.fortunes, args.texts or (8 if args.quick else 128))
    parts: dict[str, Any] = {}
    if "llm" in args.parts:
        bench, rates, runs = llm_runs(args)
        held = HeldOut(texts, args.max_tokens, bench.model, args.work)
        rows = [{"method": spec.method, "lr": spec.lr, "seed": spec.seed, "heldout": held.tuned(bench.run_dir(spec)),
                 "task": {"test_accuracy": result["test_accuracy"], "val_accuracy": result["val_accuracy"]},
                 "diverged": bool(result.get("diverged"))} for spec, result in runs]
        parts["llm"] = {"model": bench.model, "rates": rates, "base": held.base(), "runs": rows}
        print(f"llm: {len(rows)} runs scored on {len(texts)} held-out texts", flush=True)
    if "sft" in args.parts:
        from studies.llm_task import smollm2_path, tiny_llama

        model = tiny_llama(args.work) if args.quick else smollm2_path()
        grids, chosen, runs = sft_runs(args, model)
        held = HeldOut(texts, args.max_tokens, model, args.work)
        rows = [{"method": run.method, "lr": run.lr, "seed": run.seed, "heldout": held.tuned(run_dir),
                 "task": {"test_" + k: v for k, v in result["test"].items()} |
                 {"val_" + k: v for k, v in result["val"].items()}} for run, result, run_dir in runs]
        parts["sft"] = {"model": model, "grids": grids, "rates": chosen, "base": held.base(), "runs": rows}
        print(f"sft: {len(rows)} runs scored on {len(texts)} held-out texts", flush=True)
    summary = summarise(parts, {"llm": args.seeds, "sft": args.sft_seeds or args.seeds})
    figures = plots(parts, summary, args.out)
    data = {"study": "forgetting", "command": command_line("studies.forgetting", argv), "wall_s":
            time.perf_counter() - start, "environment": environment(), "settings": {
                k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k not in ("work", "out")},
            "texts": {"source": str(args.fortunes), "count": len(texts), "examples": texts[:5]},
            "parts": parts, "summary": summary}
    write_json(args.out / "results.json", data)
    write_text(args.out / "REPORT.md", report(data, figures))
    print(f"forgetting: {args.out / 'REPORT.md'}", flush=True)
    return data


if __name__ == "__main__":
    main()
