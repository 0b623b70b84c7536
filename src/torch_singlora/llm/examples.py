"""Instruction data built at run time from real text that installs offline: BBC News (2,225 articles in 5
sections, 2,060 distinct stories; the first line of each article is its headline). Nothing is copied into the
repository.

Tasks (chat ``messages`` rows, one user turn and the answer):
- ``section``: "Which section of BBC News is this article from? Answer with one word: ..." -> ``sports``
  (scored by exact match);
- ``headline``: "Write the headline of this BBC News article." -> the article's first line (scored by ROUGE-L);
- ``mix``: each article gets one of the two, alternately.

Preference pairs for ``--task dpo`` (TRL's ``prompt`` / ``chosen`` / ``rejected`` message lists), same articles and
split as ``section``:
- ``section-pairs``: the ``section`` question; chosen: the section; rejected, alternately, a wrong section (drawn
  with ``seed``) or a verbose answer that ignores "one word" ("This article is from the sports section of BBC
  News.").

The article text shown is the first ``words`` words of its body (the headline left out). The split is fixed and
stratified by section (``seed``), so every run and method sees the same examples.

    python -m torch_singlora.llm.examples section data/     # data/train.jsonl + data/test.jsonl
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from ..errors import SingLoRAError

TASKS = ("section", "headline", "mix")
PAIR_TASKS = ("section-pairs",)


@dataclass(frozen=True)
class Article:
    section: str
    title: str
    body: str


def bbc_articles(path: str | Path | None = None) -> list[Article]:
    """The BBC News articles (``assets.bbc_news_path()`` by default), sorted by section and file name, each story
    once: an article whose headline or body came earlier is left out (2,225 files, 2,060 distinct stories), so no
    held-out example repeats a training one."""
    from ..assets import bbc_news_path
    from ..datafiles import read_text

    root = Path(path or bbc_news_path())
    articles, seen = [], set()
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        for file in sorted(folder.glob("*.txt")):
            title, _, body = read_text(file).strip().partition("\n")
            article = Article(folder.name, title.strip(), " ".join(body.split()))
            if article.title not in seen and article.body not in seen:  # the corpus repeats ~130 stories
                articles.append(article)
                seen.update((article.title, article.body))
    if not articles:
        raise SingLoRAError(f"{root}: no articles (expected one folder per section holding .txt files)")
    return articles


def _excerpt(body: str, words: int) -> str:
    tokens = body.split()
    return " ".join(tokens[:words]) + (" ..." if len(tokens) > words else "")


def instruction(article: Article, task: str, sections: Sequence[str], words: int) -> dict:
    """One ``messages`` row for ``article``."""
    text = _excerpt(article.body, words)
    if task == "section":
        question = (f"Which section of BBC News is this article from? Answer with one word: "
                    f"{', '.join(sections[:-1])} or {sections[-1]}.\n\n{text}")
        answer = article.section
    elif task == "headline":
        question, answer = f"Write the headline of this BBC News article.\n\n{text}", article.title
    else:
        raise SingLoRAError(f"task {task!r} must be one of {TASKS}")
    return {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]}


def bbc_instructions(task: str = "section", *, words: int = 60, test_fraction: float = 0.2, seed: int = 0,
                     path: str | Path | None = None) -> tuple[list[dict], list[dict]]:
    """``(train rows, test rows)``: a fixed split stratified by section, each article one instruction."""
    if task not in TASKS:
        raise SingLoRAError(f"task {task!r} must be one of {TASKS}")
    articles = bbc_articles(path)
    sections = sorted({a.section for a in articles})
    rng = random.Random(seed)
    train, test = [], []
    for section in sections:
        members = [a for a in articles if a.section == section]
        rng.shuffle(members)
        cut = round(len(members) * test_fraction)
        test += members[:cut]
        train += members[cut:]
    rng.shuffle(train)
    rng.shuffle(test)

    def rows(chosen: list[Article]) -> list[dict]:
        kinds = [task] * len(chosen) if task != "mix" else [("section", "headline")[i % 2] for i in range(len(chosen))]
        return [instruction(a, kind, sections, words) for a, kind in zip(chosen, kinds)]

    return rows(train), rows(test)


def preference_pair(row: dict, index: int, sections: Sequence[str], rng: random.Random) -> dict:
    """The ``section-pairs`` pair of a ``section`` row (see the module docstring)."""
    prompt, answer = row["messages"][:-1], row["messages"][-1]["content"]
    if index % 2 == 0:
        rejected = rng.choice([s for s in sections if s != answer])
    else:
        rejected = f"This article is from the {answer} section of BBC News."
    return {"prompt": prompt, "chosen": [{"role": "assistant", "content": answer}],
            "rejected": [{"role": "assistant", "content": rejected}]}


def bbc_preferences(*, words: int = 60, test_fraction: float = 0.2, seed: int = 0,
                    path: str | Path | None = None) -> tuple[list[dict], list[dict]]:
    """``(train pairs, test pairs)``: ``section-pairs`` over ``bbc_instructions("section")``'s split."""
    train, test = bbc_instructions("section", words=words, test_fraction=test_fraction, seed=seed, path=path)
    sections = sorted({row["messages"][-1]["content"] for row in train + test})
    rng = random.Random(seed)
    return ([preference_pair(row, i, sections, rng) for i, row in enumerate(train)],
            [preference_pair(row, i, sections, rng) for i, row in enumerate(test)])


def write_jsonl(path: str | Path, rows: Sequence[dict]) -> Path:
    """Write ``rows`` as JSON lines to ``path`` atomically (an I/O failure: ``SingLoRAError`` naming ``path``)."""
    from ..atomic import atomic_write_text

    atomic_write_text(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
    return Path(path)


def write_examples(output_dir: str | Path, rows: dict[str, Sequence[dict]], *, overwrite: bool = False
                   ) -> list[Path]:
    """Write ``<output_dir>/<name>.jsonl`` for each ``name, rows`` under the output-file policy: an existing file is
    replaced only with ``overwrite``, checked for every file before anything is written; an unwritable place is a
    ``SingLoRAError`` naming the path. Other files in ``output_dir`` are left alone."""
    from ..atomic import check_output_file

    output = Path(output_dir)
    paths = [output / f"{name}.jsonl" for name in rows]
    for path in paths:
        check_output_file(path, flag="output", overwrite=overwrite)
    if output.exists() and not output.is_dir():
        raise SingLoRAError(f"output folder {str(output)!r} exists and is not a folder")
    try:
        output.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise SingLoRAError(f"output folder {str(output)!r}: cannot create it: {exc.strerror or exc}") from exc
    return [write_jsonl(path, examples) for path, examples in zip(paths, rows.values())]


def main(argv: Sequence[str] | None = None) -> int:
    """The command line; returns the exit status (0, or 2 with a one-line error on stderr)."""
    prog = "python -m torch_singlora.llm.examples"
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    parser.add_argument("task", choices=TASKS + PAIR_TASKS)
    parser.add_argument("output_dir", help="writes train.jsonl and test.jsonl here (other files there are kept)")
    parser.add_argument("--words", type=int, default=60, help="words of each article shown (default: 60)")
    parser.add_argument("--test-fraction", type=float, default=0.2)
    parser.add_argument("--max-train", type=int, default=0, help="keep at most this many training rows (0 = all)")
    parser.add_argument("--max-test", type=int, default=0, help="keep at most this many test rows (0 = all)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--overwrite", action="store_true", help="replace existing train.jsonl / test.jsonl")
    args = parser.parse_args(argv)
    try:
        if args.task in PAIR_TASKS:
            train, test = bbc_preferences(words=args.words, test_fraction=args.test_fraction, seed=args.seed)
        else:
            train, test = bbc_instructions(args.task, words=args.words, test_fraction=args.test_fraction,
                                           seed=args.seed)
        rows = {"train": train[: args.max_train or None], "test": test[: args.max_test or None]}
        paths = write_examples(args.output_dir, rows, overwrite=args.overwrite)
    except SingLoRAError as exc:
        from ..inspection import printable  # one line, whatever the path holds

        print(f"{prog}: error: {printable(exc)}", file=sys.stderr)
        return 2
    for path, examples in zip(paths, rows.values()):
        print(f"{path}: {len(examples)} examples")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
