"""Task metrics of generated answers against reference answers, and the sample generations logged with them.

- ``exact_match``: the answer equals the reference after SQuAD's normalisation (lower case, punctuation, the
  articles a/an/the and extra whitespace removed): "Business." matches "business".
- ``rouge_l``: ROUGE-L F-measure (longest common subsequence of words) from Google's ``rouge-score`` package
  (its default tokenizer: lower-cased ASCII letters and digits; no stemming).

Both are means over the examples, in [0, 1].
"""

from __future__ import annotations

import re
import string
from typing import Any, Sequence

from .data import Conversation
from .generate import GenerationOptions, generate

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = str.maketrans("", "", string.punctuation)


def normalize_answer(text: str) -> str:
    """SQuAD's answer normalisation: lower case, no punctuation, no articles, single spaces."""
    text = _ARTICLES.sub(" ", text.lower().translate(_PUNCTUATION))
    return " ".join(text.split())


def exact_match(prediction: str, reference: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(reference))


def rouge_l(predictions: Sequence[str], references: Sequence[str]) -> list[float]:
    """ROUGE-L F-measure of each prediction against its reference."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    return [scorer.score(ref, pred)["rougeL"].fmeasure for pred, ref in zip(predictions, references)]


def answer_metrics(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """``{"exact_match", "rouge_l"}``: means over the pairs."""
    if len(predictions) != len(references) or not predictions:
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    matches = [exact_match(p, r) for p, r in zip(predictions, references)]
    return {"exact_match": sum(matches) / len(matches),
            "rouge_l": sum(rouge_l(predictions, references)) / len(predictions)}


def last_user_message(conversation: Conversation) -> str:
    """The last user turn of the prompt (what a sample line shows)."""
    users = [m["content"] for m in conversation.prompt if m["role"] == "user"]
    return users[-1] if users else ""


def generation_metrics(model: Any, tokenizer: Any, conversations: Sequence[Conversation], *,
                       options: GenerationOptions, samples: int = 3) -> dict[str, Any]:
    """Greedy (or ``options``) answers to the prompts of ``conversations`` scored against their reference answers.

    Returns ``exact_match``, ``rouge_l``, ``generated`` (how many examples) and ``samples``: the first ``samples``
    examples as ``{"prompt", "reference", "generated"}`` (the prompt's last user message)."""
    answers = generate(model, tokenizer, [c.prompt for c in conversations], options)
    metrics: dict[str, Any] = answer_metrics(answers, [c.reference for c in conversations])
    metrics["generated"] = len(conversations)
    metrics["samples"] = [{"prompt": last_user_message(c), "reference": c.reference, "generated": answer}
                          for c, answer in list(zip(conversations, answers))[:samples]]
    return metrics
