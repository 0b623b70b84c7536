"""Chat / instruction data in the dataset shapes TRL reads, checked value by value.

Formats (one per file, detected from the columns of the first row, or named with ``data_format``):

==================  ==============================================  ===========================================
format              columns                                         loss (``assistant_only_loss=True``)
==================  ==============================================  ===========================================
``messages``        ``messages``: [{"role", "content"}, ...]        every assistant message (TRL's
                    roles ``system`` (first only), ``user``,        ``assistant_only_loss``)
                    ``assistant``; ends with an assistant message
``prompt-completion`` ``prompt`` + ``completion``: two strings      the completion only (TRL's
                    (one user turn, one assistant turn), or two     ``completion_only_loss``)
                    message lists (conversational)
``alpaca``          ``instruction``, ``output``, optional ``input`` the output; the user turn is the
                                                                    instruction, then a blank line and the input
``conversations``   ShareGPT: [{"from": human/gpt/system, "value"}]  every ``gpt`` message
==================  ==============================================  ===========================================

Sources: ``.jsonl`` / ``.json`` / ``.csv`` files (read by ``torch_singlora.datafiles``, as for every task: its
encoding and strict JSON rules; every CSV cell is text: nothing is converted to numbers), ``.parquet``, a
``datasets`` ``save_to_disk`` folder, or any other folder ``datasets.load_dataset`` reads (data files named by split,
e.g. ``train.jsonl``, ``test.jsonl``). Folders holding several splits need the split's name (``split``).

Nothing is converted silently: a list, object, number or null where a string is expected, an unknown role or
message key, an empty answer, or a missing column is a ``SingLoRAError`` naming the file, the row (``line N`` for
JSON lines) and the column. Extra columns (ids, sources) are ignored. ``null`` is accepted only for alpaca's
optional ``input`` and for message keys other than role/content (``datasets`` fills absent struct keys with null).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from .. import datafiles
from ..datafiles import existing
from ..errors import SingLoRAError

ROLES = ("system", "user", "assistant")
# format -> required columns (a row matches a format when it has all of them)
FORMATS: dict[str, tuple[str, ...]] = {
    "messages": ("messages",),
    "prompt-completion": ("prompt", "completion"),
    "alpaca": ("instruction", "output"),
    "conversations": ("conversations",),
}
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}
FILE_TYPES = (*datafiles.FILE_TYPES, ".parquet")

Message = dict[str, str]


@dataclass(frozen=True)
class Conversation:
    """One example: ``messages`` (checked; the last one is the assistant's answer), ``trained``: the indices of the
    assistant messages that carry the loss, ``where``: the row it came from (for error messages)."""

    messages: list[Message]
    trained: tuple[int, ...]
    where: str

    @property
    def prompt(self) -> list[Message]:
        """The conversation before the final answer (what a model is asked at evaluation)."""
        return self.messages[:-1]

    @property
    def reference(self) -> str:
        """The final assistant answer (the reference for exact match / ROUGE-L)."""
        return self.messages[-1]["content"]


def _kind(value: Any) -> str:
    """A value's JSON type, for error messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return f"a number ({value!r})"
    if isinstance(value, (list, tuple)):
        return "a list"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


def _string(value: Any, where: str, column: str) -> str:
    if not isinstance(value, str):
        raise SingLoRAError(f"{where}, column {column!r}: expected a string, got {_kind(value)}")
    return value


# ---- rows from files and folders ---------------------------------------------------------------------------------

def _select_split(loaded: Any, path: Path, split: str | None) -> Any:
    """The ``Dataset`` of a loaded ``Dataset`` / ``DatasetDict``."""
    import datasets

    if isinstance(loaded, datasets.Dataset):
        if split is not None:
            raise SingLoRAError(f"{path}: a single dataset (no splits), but split {split!r} was asked for")
        return loaded
    splits = sorted(loaded)
    if split is None and len(splits) == 1:
        return loaded[splits[0]]
    if split is None:
        one = f" or give one split's folder, e.g. {path / splits[0]}" if (path / splits[0]).is_dir() else ""
        raise SingLoRAError(f"{path}: a dataset with the splits {splits}: name the one to read, e.g. --data-split "
                            f"{splits[0]} (--eval-data-split for --eval-data){one}")
    if split not in loaded:
        raise SingLoRAError(f"{path}: no split {split!r}; the splits are {splits} (name one)")
    return loaded[split]


def _dataset_rows(path: Path, split: str | None) -> Iterator[tuple[str, Any]]:
    import datasets

    saved = (path / "dataset_dict.json").is_file() or (path / "state.json").is_file()
    try:
        loaded = datasets.load_from_disk(str(path)) if saved else datasets.load_dataset(str(path))
    except (ValueError, FileNotFoundError) as exc:  # datasets' errors for folders it cannot read
        raise SingLoRAError(f"{path}: not a dataset folder `datasets` can read ({exc})") from None
    dataset = _select_split(loaded, path, split)
    label = f"{path} [{split}]" if split else str(path)
    for number, row in enumerate(dataset, start=1):
        yield f"{label} row {number}", row


def read_rows(path: str | Path, *, split: str | None = None, encoding: str | None = None) -> Iterator[tuple[str, Any]]:
    """``(where, row)`` for every row of a data file or dataset folder (see the module docstring)."""
    path = existing(path)
    if path.is_dir():
        yield from _dataset_rows(path, split)
        return
    suffix = path.suffix.lower()
    if suffix not in FILE_TYPES:
        raise SingLoRAError(f"{path}: unsupported file type {suffix!r} (use {', '.join(FILE_TYPES)} or a dataset "
                            "folder)")
    if split is not None:
        raise SingLoRAError(f"{path}: a single file has no splits, but split {split!r} was asked for")
    if suffix == ".parquet":
        import datasets

        dataset = datasets.load_dataset("parquet", data_files=str(path), split="train")
        for number, row in enumerate(dataset, start=1):
            yield f"{path} row {number}", row
        return
    yield from datafiles.read_rows(path, encoding)


# ---- rows -> conversations ---------------------------------------------------------------------------------------

def _messages(value: Any, where: str, column: str, sharegpt: bool = False) -> list[Message]:
    """Check a list of messages; ShareGPT's ``from``/``value`` become ``role``/``content``."""
    role_key, content_key = ("from", "value") if sharegpt else ("role", "content")
    if not isinstance(value, (list, tuple)) or not value:
        got = "an empty list" if isinstance(value, (list, tuple)) else _kind(value)
        raise SingLoRAError(f"{where}, column {column!r}: expected a non-empty list of messages, got {got}")
    messages = []
    for number, message in enumerate(value, start=1):
        at = f"{where}, column {column!r}, message {number}"
        if not isinstance(message, dict):
            raise SingLoRAError(f"{at}: expected an object with {role_key!r} and {content_key!r}, got "
                                f"{_kind(message)}")
        extra = sorted(k for k, v in message.items() if k not in (role_key, content_key) and v is not None)
        if extra:
            raise SingLoRAError(f"{at}: unsupported key(s) {extra} (only {role_key!r} and {content_key!r} are read)")
        for key in (role_key, content_key):
            if key not in message:
                raise SingLoRAError(f"{at}: no {key!r} key")
        role = message[role_key]
        roles = SHAREGPT_ROLES if sharegpt else ROLES
        if not isinstance(role, str) or role not in roles:
            raise SingLoRAError(f"{at}: {role_key} {role!r} is not one of {', '.join(roles)}")
        content = message[content_key]
        if not isinstance(content, str):
            raise SingLoRAError(f"{at}: {content_key!r} must be a string, got {_kind(content)}")
        messages.append({"role": SHAREGPT_ROLES[role] if sharegpt else role, "content": content})
    return messages


def _conversation(messages: list[Message], first_trained: int, where: str) -> Conversation:
    """Check the order of the turns; the assistant messages from ``first_trained`` on carry the loss."""
    for number, message in enumerate(messages, start=1):
        if message["role"] == "system" and number > 1:
            raise SingLoRAError(f"{where}: message {number} is a system message; only the first message may be")
    if messages[-1]["role"] != "assistant":
        raise SingLoRAError(f"{where}: the last message is a {messages[-1]['role']} message; an example must end "
                            "with the assistant's answer")
    trained = tuple(i for i, m in enumerate(messages) if m["role"] == "assistant" and i >= first_trained)
    for index in trained:
        if not messages[index]["content"].strip():
            raise SingLoRAError(f"{where}: message {index + 1} is an empty assistant answer: nothing to learn")
    return Conversation(messages, trained, where)


def to_conversation(row: Any, data_format: str, where: str) -> Conversation:
    """One row of ``data_format`` as a checked ``Conversation``."""
    if not isinstance(row, dict):
        raise SingLoRAError(f"{where}: expected an object (one example), got {_kind(row)}")
    missing = [column for column in FORMATS[data_format] if column not in row]
    if missing:
        raise SingLoRAError(f"{where}: no column {missing[0]!r} (format {data_format!r} needs "
                            f"{list(FORMATS[data_format])}); columns are {sorted(row)}")
    if data_format == "messages":
        return _conversation(_messages(row["messages"], where, "messages"), 0, where)
    if data_format == "conversations":
        return _conversation(_messages(row["conversations"], where, "conversations", sharegpt=True), 0, where)
    if data_format == "alpaca":
        instruction = _string(row["instruction"], where, "instruction")
        extra = row.get("input")
        extra = "" if extra is None else _string(extra, where, "input")
        user = f"{instruction}\n\n{extra}" if extra.strip() else instruction
        return _conversation([{"role": "user", "content": user},
                              {"role": "assistant", "content": _string(row["output"], where, "output")}], 1, where)
    prompt, completion = row["prompt"], row["completion"]
    if isinstance(prompt, str) and isinstance(completion, str):
        return _conversation([{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}], 1,
                             where)
    if isinstance(prompt, (list, tuple)) and isinstance(completion, (list, tuple)):
        prompt_messages = _messages(prompt, where, "prompt")
        return _conversation(prompt_messages + _messages(completion, where, "completion"), len(prompt_messages),
                             where)
    raise SingLoRAError(f"{where}: 'prompt' is {_kind(prompt)} and 'completion' is {_kind(completion)}: give two "
                        "strings, or two lists of messages")


def detect_format(row: Any, where: str) -> str:
    """The format whose columns ``row`` has; an error if none or several match."""
    if not isinstance(row, dict):
        raise SingLoRAError(f"{where}: expected an object (one example), got {_kind(row)}")
    matches = [name for name, columns in FORMATS.items() if all(c in row for c in columns)]
    if len(matches) == 1:
        return matches[0]
    if matches:
        raise SingLoRAError(f"{where}: columns {sorted(row)} fit several formats {matches}; name one (data_format)")
    hint = " (raw text: use --task causal-lm)" if "text" in row else ""
    wanted = "; ".join(f"{name}: {list(columns)}" for name, columns in FORMATS.items())
    raise SingLoRAError(f"{where}: columns {sorted(row)} fit no chat format{hint}; expected {wanted}")


def read_conversations(path: str | Path, *, data_format: str = "auto", split: str | None = None,
                       encoding: str | None = None) -> tuple[list[Conversation], str]:
    """Every row of ``path`` as a checked ``Conversation``; returns ``(conversations, format)``."""
    if data_format != "auto" and data_format not in FORMATS:
        raise SingLoRAError(f"data format {data_format!r} must be 'auto' or one of {list(FORMATS)}")
    conversations: list[Conversation] = []
    for where, row in read_rows(path, split=split, encoding=encoding):
        if data_format == "auto":
            data_format = detect_format(row, where)
        conversations.append(to_conversation(row, data_format, where))
    if not conversations:
        raise SingLoRAError(f"{path}: empty dataset (no rows)")
    return conversations, data_format


def read_prompts(path: str | Path, *, encoding: str | None = None) -> list[tuple[list[Message], str | None]]:
    """Prompts for ``singlora generate``: ``(messages, reference answer or None)`` per prompt.

    A ``.txt`` file holds one prompt per non-empty line (one user message each). Other files and dataset folders
    hold rows with a ``prompt`` (a string, or a list of messages) and no ``completion``, or ``messages`` ending with
    a user message, or whole examples in any training format (the prompt is the conversation before the final
    answer, and that answer is the reference)."""
    path = Path(path)
    if path.is_file() and path.suffix.lower() == ".txt":
        lines = [line for line in datafiles.read_text(path, encoding).splitlines() if line.strip()]
        if not lines:
            raise SingLoRAError(f"{path}: no prompt (no non-empty line)")
        return [([{"role": "user", "content": line}], None) for line in lines]
    prompts: list[tuple[list[Message], str | None]] = []
    for where, row in read_rows(path, encoding=encoding):
        open_prompt = isinstance(row, dict) and (
            ("prompt" in row and "completion" not in row)
            or (isinstance(row.get("messages"), list) and row["messages"]
                and isinstance(row["messages"][-1], dict) and row["messages"][-1].get("role") != "assistant"))
        if not open_prompt:
            conversation = to_conversation(row, detect_format(row, where), where)
            prompts.append((conversation.prompt, conversation.reference))
            continue
        column = "prompt" if "prompt" in row else "messages"
        value = row[column]
        messages = [{"role": "user", "content": value}] if isinstance(value, str) else _messages(value, where, column)
        if messages[-1]["role"] == "assistant":
            raise SingLoRAError(f"{where}, column {column!r}: the prompt ends with an assistant message")
        prompts.append((messages, None))
    if not prompts:
        raise SingLoRAError(f"{path}: no prompt (no rows)")
    return prompts
