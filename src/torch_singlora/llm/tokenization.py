"""Conversations -> token ids and labels through the tokenizer's chat template, the loss on assistant tokens only.

The template renders the whole conversation once; the text is tokenized with ``add_special_tokens=False`` (the
template already writes BOS / end-of-turn tokens, so nothing is doubled; the same as ``apply_chat_template``).
Which characters are the assistant's comes from the template itself, rendered on prefixes of the conversation:
for each trained assistant message ``i``,

    before = render(messages[:i], add_generation_prompt=True)     # ...<|im_start|>assistant\\n
    after  = render(messages[:i + 1])                             # ...<|im_start|>assistant\\nAnswer<|im_end|>\\n

``after`` must start with ``before`` and the whole rendering with ``after``; the answer is then the characters
``before`` .. ``after`` less its trailing whitespace (the answer and its end-of-turn token, which the model must
learn to produce to stop). A token is trained when its characters (the tokenizer's offsets mapping) overlap an
answer span. This works for templates without ``{% generation %}`` blocks (SmolLM2, Llama, Mistral, Gemma
templates); a template that renders a prefix differently from the whole (e.g. one that rewrites earlier turns) is
refused with an error, rather than guessed: train it with ``assistant_only_loss=False`` or give a template file.

Truncation keeps the start of each example (TRL's ``keep_start``); examples are never packed together. Examples
left with no answer token after truncation are dropped; both counts are reported.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

from ..errors import SingLoRAError
from ..train.lm_loss import IGNORE_INDEX
from .data import Conversation, Message


def read_chat_template(path: str | Path) -> str:
    """The text of the Jinja chat template file ``path`` (``--chat-template``); errors name the flag."""
    path = Path(path)
    if not path.is_file():
        raise SingLoRAError(f"--chat-template {str(path)!r}: no such file (a Jinja chat template)")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise SingLoRAError(f"--chat-template {path}: not UTF-8 text ({exc})") from None


def set_chat_template(tokenizer: Any, path: str | Path | None = None) -> str:
    """Use the Jinja template in file ``path`` (if given), else the tokenizer's own; returns the template text.

    A tokenizer without a template and no file is an error (rendering "role: content" lines by guesswork would
    train a format the model has never seen)."""
    if path is not None:
        tokenizer.chat_template = read_chat_template(path)
    template = getattr(tokenizer, "chat_template", None)
    if not template:
        name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
        raise SingLoRAError(f"tokenizer {name!r} has no chat template: give one with --chat-template FILE (a Jinja "
                            "template, e.g. the chat_template.jinja of an instruct model of the same family)")
    if not isinstance(template, str):
        raise SingLoRAError("the tokenizer has several named chat templates; give one with --chat-template FILE")
    return template


def render(tokenizer: Any, messages: Sequence[Message], *, generation_prompt: bool = False, where: str = "") -> str:
    """The chat template's text for ``messages`` (``add_generation_prompt`` opens the assistant's turn)."""
    try:
        return tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=generation_prompt)
    except Exception as exc:  # jinja2 errors, raise_exception() calls inside templates
        raise SingLoRAError(f"{where or 'messages'}: the chat template fails: {type(exc).__name__}: {exc}") from None


def special_tokens(tokenizer: Any) -> list[str]:
    """The special tokens' texts (BOS, EOS, end-of-turn...): they must not appear inside message contents."""
    added = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    texts = {token.content for token in added.values() if getattr(token, "special", False)}
    texts.update(tokenizer.all_special_tokens)
    return sorted(t for t in texts if t)


def check_contents(conversation: Conversation, specials: Sequence[str]) -> None:
    """Refuse message texts holding a special token's text (it would be read as that token, e.g. an early end of
    turn, or a doubled EOS when an answer already ends with it)."""
    for number, message in enumerate(conversation.messages, start=1):
        for token in specials:
            if token in message["content"]:
                raise SingLoRAError(f"{conversation.where}: message {number} contains the special token {token!r} as "
                                    "text; remove it (the chat template writes the special tokens)")


def answer_spans(tokenizer: Any, conversation: Conversation) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the ``[start, end)`` character span of each trained answer in it."""
    messages, where = conversation.messages, conversation.where
    full = render(tokenizer, messages, where=where)
    spans = []
    for index in conversation.trained:
        before = render(tokenizer, messages[:index], generation_prompt=True, where=where)
        after = render(tokenizer, messages[: index + 1], where=where)
        if not (after.startswith(before) and full.startswith(after)):
            raise SingLoRAError(
                f"{where}: the chat template renders message {index + 1}'s prefix of the conversation differently "
                "from the whole, so the assistant tokens cannot be located; use assistant_only_loss=False "
                "(--no-assistant-only-loss) or a template file (--chat-template) that renders prefixes alike")
        answer = after[len(before):].rstrip()
        if not answer:
            raise SingLoRAError(f"{where}: the chat template renders message {index + 1} as nothing")
        spans.append((len(before), len(before) + len(answer)))
    return full, spans


def tokenize_conversation(tokenizer: Any, conversation: Conversation, *,
                          assistant_only_loss: bool = True) -> tuple[list[int], list[int]]:
    """``(input_ids, labels)`` of one conversation; labels are ``IGNORE_INDEX`` outside the trained answers (all
    tokens trained when ``assistant_only_loss`` is False)."""
    if not assistant_only_loss:
        ids = list(tokenizer(render(tokenizer, conversation.messages, where=conversation.where),
                             add_special_tokens=False)["input_ids"])
        return ids, list(ids)
    full, spans = answer_spans(tokenizer, conversation)
    if not getattr(tokenizer, "is_fast", False):
        raise SingLoRAError("the assistant-only loss needs a fast tokenizer (offsets mapping); this one is "
                            f"{type(tokenizer).__name__}")
    encoded = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    ids = list(encoded["input_ids"])
    labels = [IGNORE_INDEX] * len(ids)
    for position, (start, end) in enumerate(encoded["offset_mapping"]):
        end = max(end, start + 1)  # a zero-width token counts at its position
        if any(start < span_end and end > span_start for span_start, span_end in spans):
            labels[position] = ids[position]
    return ids, labels


@dataclass
class SFTDataset(torch.utils.data.Dataset):
    """Tokenized examples: ``input_ids`` and ``labels`` per example (variable length, never packed), the
    ``conversations`` they came from (prompts and reference answers for generation metrics), and how many
    examples were ``truncated`` to ``max_length`` or ``dropped`` (no answer token left after truncation)."""

    input_ids: list[list[int]]
    labels: list[list[int]]
    conversations: list[Conversation]
    max_length: int | None = None
    truncated: int = 0
    dropped: int = 0
    answer_tokens: int = 0

    def __len__(self) -> int:
        return len(self.input_ids)

    def __getitem__(self, index: int) -> dict[str, list[int]]:
        return {"input_ids": self.input_ids[index], "labels": self.labels[index]}

    def to_hf_dataset(self) -> Any:
        """A ``datasets.Dataset`` with ``input_ids`` and ``labels`` columns: TRL's ``SFTTrainer`` takes it as is
        (already tokenized, so it applies neither its template nor its masks)."""
        import datasets

        return datasets.Dataset.from_dict({"input_ids": self.input_ids, "labels": self.labels})

    def describe(self, name: str) -> str:
        """One line: examples, answer tokens, truncation."""
        return f"{name}: {len(self)} examples, {self.answer_tokens:,} trained tokens{truncation_note(self)}"


def truncation_note(dataset: Any) -> str:
    """``"; N truncated to L tokens, M of them dropped (...)"`` for a tokenized dataset that cut examples, else ``""``
    (``dataset``: ``truncated``, ``dropped``, ``max_length``)."""
    if not dataset.truncated:
        return ""
    dropped = f", {dataset.dropped} of them dropped (no answer token left)" if dataset.dropped else ""
    return f"; {dataset.truncated} truncated to {dataset.max_length} tokens{dropped}"


def tokenize_conversations(tokenizer: Any, conversations: Sequence[Conversation], *, max_length: int | None,
                           assistant_only_loss: bool = True) -> SFTDataset:
    """Tokenize every conversation (``tokenize_conversation``), truncating each to ``max_length`` tokens."""
    specials = special_tokens(tokenizer)
    stops = stop_token_ids(tokenizer)
    ids_list, labels_list, kept = [], [], []
    truncated = dropped = 0
    for conversation in conversations:
        check_contents(conversation, specials)
        ids, labels = tokenize_conversation(tokenizer, conversation, assistant_only_loss=assistant_only_loss)
        if assistant_only_loss and not kept and stops:
            trained = [t for t in labels if t != IGNORE_INDEX]
            if trained and trained[-1] not in stops:
                print(f"singlora: warning: the chat template ends answers with {tokenizer.decode(trained[-1:])!r}, "
                      f"not an end-of-sequence token ({tokenizer.convert_ids_to_tokens(sorted(stops))}): a tuned "
                      "model may not learn to stop", file=sys.stderr)
        if max_length is not None and len(ids) > max_length:
            truncated += 1
            ids, labels = ids[:max_length], labels[:max_length]
            if all(t == IGNORE_INDEX for t in labels):
                dropped += 1
                continue
        ids_list.append(ids)
        labels_list.append(labels)
        kept.append(conversation)
    if not ids_list:
        raise SingLoRAError(f"no example keeps an answer token within --max-length={max_length}: raise it")
    answer_tokens = sum(sum(1 for t in labels if t != IGNORE_INDEX) for labels in labels_list)
    return SFTDataset(ids_list, labels_list, kept, max_length, truncated, dropped, answer_tokens)


def stop_token_ids(tokenizer: Any, generation_config: Any = None) -> set[int]:
    """Token ids that end an answer: the tokenizer's EOS and the generation config's ``eos_token_id``(s)."""
    ids: set[int] = set()
    for value in (getattr(tokenizer, "eos_token_id", None), getattr(generation_config, "eos_token_id", None)):
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(v for v in value if isinstance(v, int))
    return ids


class SFTCollator:
    """Pad examples on the right into ``input_ids`` / ``attention_mask`` / ``labels`` (B, T); padding is
    ``pad_id`` in the inputs and ``IGNORE_INDEX`` in the labels."""

    def __init__(self, pad_id: int) -> None:
        self.pad_id = pad_id

    def __call__(self, items: list[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
        length = max(len(item["input_ids"]) for item in items)
        ids = torch.full((len(items), length), self.pad_id, dtype=torch.long)
        labels = torch.full((len(items), length), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(items), length), dtype=torch.long)
        for row, item in enumerate(items):
            n = len(item["input_ids"])
            ids[row, :n] = torch.tensor(item["input_ids"])
            labels[row, :n] = torch.tensor(item["labels"])
            mask[row, :n] = 1
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}
