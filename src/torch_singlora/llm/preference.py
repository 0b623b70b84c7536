"""Preference pairs in TRL's shapes -> chosen and rejected token sequences, through ``--task sft``'s chat template and
answer masking (``llm.tokenization``).

Shapes (TRL's preference datasets; one per file, from the columns of each row):

==========================  =====================================================  ===============================
shape                       columns                                                prompt
==========================  =====================================================  ===============================
explicit prompt, strings    ``prompt``, ``chosen``, ``rejected``: three strings    one user turn
explicit prompt, messages   ``prompt``: [{"role", "content"}, ...]; ``chosen`` /   the ``prompt`` messages
                            ``rejected``: message lists (the answers)
implicit prompt             ``chosen`` / ``rejected``: two whole conversations     their longest common prefix of
                            (no ``prompt`` column)                                 messages (TRL's extract_prompt)
==========================  =====================================================  ===============================

As in ``--task sft``, strings become chat turns (one user message, one assistant answer) rendered by the chat
template; the loss and the log-probabilities cover the answer's assistant tokens (and its end-of-turn token), found
from the template itself. Each pair is two ``Conversation``s sharing the prompt; a pair whose chosen and rejected
answers are the same, or whose answer is empty, is refused naming its row.

Truncation keeps the start of each sequence (TRL's ``keep_start``); a pair left without an answer token on either
side is dropped, and both counts are reported.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

from ..errors import SingLoRAError
from .data import Conversation, Message, _conversation, _kind, _messages, read_rows
from .tokenization import (IGNORE_INDEX, SFTCollator, check_contents, special_tokens, tokenize_conversation,
                           truncation_note)

COLUMNS = ("chosen", "rejected")  # required; "prompt" is optional (implicit prompt without it)


@dataclass(frozen=True)
class PreferencePair:
    """One preference: ``chosen`` and ``rejected``, the same prompt with either answer (the answer's assistant
    messages carry the loss); ``where``: the row it came from."""

    chosen: Conversation
    rejected: Conversation
    where: str

    @property
    def prompt(self) -> list[Message]:
        return self.chosen.messages[: self.chosen.trained[0]]


def _common_prefix(chosen: list[Message], rejected: list[Message]) -> int:
    """Messages the two conversations share from the start (TRL's ``extract_prompt`` on message lists)."""
    count = 0
    for a, b in zip(chosen, rejected):
        if a != b:
            break
        count += 1
    return count


def to_pair(row: Any, where: str) -> PreferencePair:
    """One row (any shape above) as a checked ``PreferencePair``."""
    if not isinstance(row, dict):
        raise SingLoRAError(f"{where}: expected an object (one preference pair), got {_kind(row)}")
    missing = [column for column in COLUMNS if column not in row]
    if missing:
        raise SingLoRAError(f"{where}: no column {missing[0]!r} (a preference pair needs 'chosen' and 'rejected', "
                            f"and 'prompt' unless both are whole conversations); columns are {sorted(row)}")
    chosen, rejected = row["chosen"], row["rejected"]
    if "prompt" not in row:
        if not (isinstance(chosen, (list, tuple)) and isinstance(rejected, (list, tuple))):
            raise SingLoRAError(f"{where}: without a 'prompt' column, 'chosen' and 'rejected' must be two "
                                f"conversations (lists of messages); got {_kind(chosen)} and {_kind(rejected)}")
        chosen, rejected = _messages(chosen, where, "chosen"), _messages(rejected, where, "rejected")
        shared = _common_prefix(chosen, rejected)
        if shared == 0:
            raise SingLoRAError(f"{where}: 'chosen' and 'rejected' share no first message, so there is no prompt "
                                "(TRL's implicit prompt is their common beginning); give a 'prompt' column")
        prompt, chosen, rejected = chosen[:shared], chosen[shared:], rejected[shared:]
    else:
        prompt = row["prompt"]
        if isinstance(prompt, str) and isinstance(chosen, str) and isinstance(rejected, str):
            prompt = [{"role": "user", "content": prompt}]
            chosen, rejected = [{"role": "assistant", "content": chosen}], [{"role": "assistant", "content": rejected}]
        elif all(isinstance(v, (list, tuple)) for v in (prompt, chosen, rejected)):
            prompt = _messages(prompt, where, "prompt")
            chosen, rejected = _messages(chosen, where, "chosen"), _messages(rejected, where, "rejected")
        else:
            raise SingLoRAError(f"{where}: 'prompt', 'chosen' and 'rejected' are {_kind(prompt)}, {_kind(chosen)} and "
                                f"{_kind(rejected)}: give three strings, or three lists of messages")
    for name, answer in (("chosen", chosen), ("rejected", rejected)):
        if not answer:
            raise SingLoRAError(f"{where}: the {name} answer is empty (it equals the shared prompt)")
        if answer[0]["role"] != "assistant":
            raise SingLoRAError(f"{where}: the {name} answer starts with a {answer[0]['role']} message; it must start "
                                "with the assistant's reply to the prompt")
    if chosen == rejected:
        raise SingLoRAError(f"{where}: the chosen and rejected answers are the same: nothing to prefer")
    if prompt[-1]["role"] == "assistant":
        raise SingLoRAError(f"{where}: the prompt ends with an assistant message; it must end with the user's turn")
    return PreferencePair(_conversation(prompt + chosen, len(prompt), where),
                          _conversation(prompt + rejected, len(prompt), where), where)


def read_pairs(path: str | Path, *, split: str | None = None, encoding: str | None = None) -> list[PreferencePair]:
    """Every row of ``path`` (a file or dataset folder, as ``llm.data.read_rows``) as a checked pair."""
    pairs = [to_pair(row, where) for where, row in read_rows(path, split=split, encoding=encoding)]
    if not pairs:
        raise SingLoRAError(f"{path}: empty dataset (no rows)")
    return pairs


@dataclass
class PreferenceDataset(torch.utils.data.Dataset):
    """Tokenized pairs: per pair the ``input_ids`` and ``labels`` (``IGNORE_INDEX`` outside the answer) of the chosen
    and of the rejected sequence, the ``pairs`` they came from, how many were ``truncated`` to ``max_length`` or
    ``dropped``; ``probe``: training pairs scored at each evaluation beside these (``--eval-train-pairs``)."""

    chosen: list[tuple[list[int], list[int]]]
    rejected: list[tuple[list[int], list[int]]]
    pairs: list[PreferencePair]
    max_length: int | None = None
    truncated: int = 0
    dropped: int = 0
    probe: "PreferenceDataset | None" = None

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> dict[str, list[int]]:
        (chosen_ids, chosen_labels), (rejected_ids, rejected_labels) = self.chosen[index], self.rejected[index]
        return {"chosen_input_ids": chosen_ids, "chosen_labels": chosen_labels,
                "rejected_input_ids": rejected_ids, "rejected_labels": rejected_labels}

    def subset(self, indices: Sequence[int]) -> "PreferenceDataset":
        return PreferenceDataset([self.chosen[i] for i in indices], [self.rejected[i] for i in indices],
                                 [self.pairs[i] for i in indices], self.max_length)

    def describe(self, name: str) -> str:
        return f"{name}: {len(self)} preference pairs{truncation_note(self)}"


def tokenize_pairs(tokenizer: Any, pairs: Sequence[PreferencePair], *, max_length: int | None) -> PreferenceDataset:
    """Tokenize both sides of every pair (``tokenization.tokenize_conversation``, the answer tokens labelled),
    keeping the first ``max_length`` tokens of each sequence; pairs left without an answer token are dropped."""
    specials = special_tokens(tokenizer)
    chosen, rejected, kept = [], [], []
    truncated = dropped = 0
    for pair in pairs:
        sides = []
        for conversation in (pair.chosen, pair.rejected):
            check_contents(conversation, specials)
            ids, labels = tokenize_conversation(tokenizer, conversation)
            sides.append((ids, labels))
        if max_length is not None and any(len(ids) > max_length for ids, _ in sides):
            truncated += 1
            sides = [(ids[:max_length], labels[:max_length]) for ids, labels in sides]
            if any(all(t == IGNORE_INDEX for t in labels) for _, labels in sides):
                dropped += 1
                continue
        chosen.append(sides[0])
        rejected.append(sides[1])
        kept.append(pair)
    if not kept:
        raise SingLoRAError(f"no preference pair keeps an answer token on both sides within --max-length={max_length}:"
                            " raise it")
    return PreferenceDataset(chosen, rejected, kept, max_length, truncated, dropped)


class PreferenceCollator:
    """A batch of B pairs -> one batch of 2B sequences, the B chosen then the B rejected (TRL's concatenated
    forward): padded on the right (``input_ids`` / ``attention_mask`` / ``labels`` (2B, T)), or with ``packing``
    packed into rows (``train.packing.PackingCollator``: ``example_index`` numbers the 2B sequences)."""

    def __init__(self, pad_id: int, packing: bool = False) -> None:
        from ..train.packing import PackingCollator

        self.collate = PackingCollator(pad_id) if packing else SFTCollator(pad_id)

    def __call__(self, items: list[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
        return self.collate([{"input_ids": item[f"{side}_input_ids"], "labels": item[f"{side}_labels"]}
                             for side in COLUMNS for item in items])
