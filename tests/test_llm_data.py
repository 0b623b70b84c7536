"""Chat data: every format and source reads to the same conversations; every wrong value is refused naming the file,
the row and the column (nothing is stringified, converted or dropped silently)."""

from __future__ import annotations

import json

import pytest

from torch_singlora import SingLoRAError
from torch_singlora.llm.data import read_conversations, read_prompts

datasets = pytest.importorskip("datasets")

CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Capital of France?"},
        {"role": "assistant", "content": "Paris."}, {"role": "user", "content": "And of Italy?"},
        {"role": "assistant", "content": "Rome."}]


def _jsonl(path, rows) -> str:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def _read(path, **kwargs):
    conversations, data_format = read_conversations(path, **kwargs)
    return [(c.messages, c.trained) for c in conversations], data_format


def test_formats_become_conversations_with_the_trained_turns(tmp_path) -> None:
    rows, fmt = _read(_jsonl(tmp_path / "m.jsonl", [{"messages": CHAT, "id": 7}]))
    assert fmt == "messages" and rows == [(CHAT, (2, 4))]  # every assistant turn; extra columns ignored

    pairs = [{"prompt": "Capital of France?", "completion": "Paris."}]
    rows, fmt = _read(_jsonl(tmp_path / "p.jsonl", pairs))
    assert fmt == "prompt-completion"
    assert rows == [([{"role": "user", "content": "Capital of France?"}, {"role": "assistant", "content": "Paris."}],
                     (1,))]

    conversational = [{"prompt": CHAT[:4], "completion": CHAT[4:]}]  # TRL's conversational prompt-completion
    rows, _ = _read(_jsonl(tmp_path / "c.jsonl", conversational))
    assert rows == [(CHAT, (4,))]  # the completion only (TRL's completion_only_loss), not the prompt's answer

    alpaca = [{"instruction": "Translate.", "input": "bonjour", "output": "hello"},
              {"instruction": "Say hi.", "input": "", "output": "hi"}, {"instruction": "Say yo.", "output": "yo"}]
    rows, fmt = _read(_jsonl(tmp_path / "a.jsonl", alpaca))
    assert fmt == "alpaca"
    assert [m[0]["content"] for m, _ in rows] == ["Translate.\n\nbonjour", "Say hi.", "Say yo."]
    assert [m[1]["content"] for m, _ in rows] == ["hello", "hi", "yo"]

    sharegpt = [{"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]}]
    rows, fmt = _read(_jsonl(tmp_path / "s.jsonl", sharegpt))
    assert fmt == "conversations" and rows == [([{"role": "user", "content": "Hi"},
                                                 {"role": "assistant", "content": "Hello"}], (1,))]


def test_every_source_reads_the_same_rows(tmp_path) -> None:
    rows = [{"prompt": f"Q{i}, with a comma\nand a line break", "completion": f"00{i}"} for i in range(3)]
    expected, _ = _read(_jsonl(tmp_path / "d.jsonl", rows))
    (tmp_path / "array.json").write_text(json.dumps(rows))
    _jsonl(tmp_path / "lines.json", rows)
    dataset = datasets.Dataset.from_list(rows)
    dataset.to_csv(str(tmp_path / "d.csv"), index=False)
    dataset.to_parquet(str(tmp_path / "d.parquet"))
    dataset.save_to_disk(str(tmp_path / "disk"))
    datasets.DatasetDict(train=dataset, test=dataset.select([0])).save_to_disk(str(tmp_path / "splits"))
    (tmp_path / "files").mkdir()
    _jsonl(tmp_path / "files" / "train.jsonl", rows)
    for source in ("array.json", "lines.json", "d.csv", "d.parquet", "disk", "files"):
        assert _read(str(tmp_path / source))[0] == expected, source
    assert _read(str(tmp_path / "splits"), split="train")[0] == expected
    assert _read(str(tmp_path / "splits"), split="test")[0] == expected[:1]
    assert expected[0][0][1]["content"] == "000"  # CSV cells stay text: "000" is not the number 0
    with pytest.raises(SingLoRAError, match=r"no split 'validation'; the splits are \['test', 'train'\]"):
        read_conversations(tmp_path / "splits", split="validation")
    with pytest.raises(SingLoRAError, match="the splits .* name the one to read, e.g. --data-split test"):  # no choice
        read_conversations(tmp_path / "splits")


@pytest.mark.parametrize("row, message", [
    ({"messages": "Hi"}, r"line 2, column 'messages': expected a non-empty list of messages, got str"),
    ({"messages": []}, r"line 2, column 'messages': expected a non-empty list of messages, got an empty list"),
    ({"messages": [{"role": "bot", "content": "x"}]}, r"line 2, column 'messages', message 1: role 'bot' is not one"),
    ({"messages": [{"role": "user", "content": ["a", "b"]}, {"role": "assistant", "content": "x"}]},
     r"line 2, column 'messages', message 1: 'content' must be a string, got a list"),
    ({"messages": [{"role": "user", "content": None}, {"role": "assistant", "content": "x"}]},
     r"message 1: 'content' must be a string, got null"),
    ({"messages": [{"role": "user", "content": "q", "tool_calls": [1]}, {"role": "assistant", "content": "x"}]},
     r"message 1: unsupported key\(s\) \['tool_calls'\]"),
    ({"messages": [{"role": "user"}, {"role": "assistant", "content": "x"}]}, r"message 1: no 'content' key"),
    ({"messages": [{"role": "user", "content": "q"}]}, r"line 2: the last message is a user message"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "system", "content": "s"},
                   {"role": "assistant", "content": "x"}]}, r"line 2: message 2 is a system message"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "  "}]},
     r"line 2: message 2 is an empty assistant answer"),
    ({"prompt": "q"},
     r"line 2: no column 'messages' \(format 'messages' needs \['messages'\]\); columns are \['prompt'\]"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": 42}]},
     r"message 2: 'content' must be a string, got a number \(42\)"),
    (["not", "an", "object"], r"bad.jsonl line 2: expected an object \(one row\), got list"),
])
def test_wrong_values_are_refused_naming_file_row_and_column(tmp_path, row, message) -> None:
    good = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}
    path = _jsonl(tmp_path / "bad.jsonl", [good, row])
    with pytest.raises(SingLoRAError, match=message) as info:
        read_conversations(path)
    assert str(tmp_path / "bad.jsonl") in str(info.value)


@pytest.mark.parametrize("rows, message", [
    ([{"prompt": ["a"], "completion": "b"}], r"row 1: 'prompt' is a list and 'completion' is str"),
    ([{"prompt": "q", "completion": None}], r"'prompt' is str and 'completion' is null"),
    ([{"instruction": "i", "output": ["x"]}], r"row 1, column 'output': expected a string, got a list"),
    ([{"instruction": 3, "output": "x"}], r"row 1, column 'instruction': expected a string, got a number \(3\)"),
    ([{"instruction": "i", "input": {"a": 1}, "output": "x"}], r"column 'input': expected a string, got an object"),
    ([{"text": "raw"}], r"fit no chat format \(raw text: use --task causal-lm\)"),
    ([{"messages": [], "prompt": "p", "completion": "c"}], r"fit several formats \['messages', 'prompt-completion'\]"),
    ([{"conversations": [{"from": "alien", "value": "x"}]}], r"from 'alien' is not one of system, human, user, gpt"),
])
def test_format_specific_errors(tmp_path, rows, message) -> None:
    (tmp_path / "bad.json").write_text(json.dumps(rows))
    with pytest.raises(SingLoRAError, match=message):
        read_conversations(tmp_path / "bad.json")


def test_file_level_errors(tmp_path) -> None:
    """What only chat data has; the rules of the files themselves (JSON, CSV, encodings) are test_datafiles.py's."""
    with pytest.raises(SingLoRAError, match="unsupported file type '.txt'"):
        (tmp_path / "x.txt").write_text("hi")
        read_conversations(tmp_path / "x.txt")
    with pytest.raises(SingLoRAError, match="does not exist"):
        read_conversations(tmp_path / "missing.jsonl")
    _jsonl(tmp_path / "good.jsonl", [{"prompt": "q", "completion": "a"}])
    with pytest.raises(SingLoRAError, match="data format 'chatml' must be 'auto' or one of"):
        read_conversations(tmp_path / "good.jsonl", data_format="chatml")


def test_parquet_nulls_are_refused_by_row(tmp_path) -> None:
    rows = [{"prompt": "q1", "completion": "a1"}, {"prompt": "q2", "completion": None}]
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "d.parquet"))
    with pytest.raises(SingLoRAError, match=r"d.parquet row 2: 'prompt' is str and 'completion' is null"):
        read_conversations(tmp_path / "d.parquet")


def test_prompts_files(tmp_path) -> None:
    (tmp_path / "p.txt").write_text("First prompt\n\nSecond prompt\n")
    assert read_prompts(tmp_path / "p.txt") == [([{"role": "user", "content": "First prompt"}], None),
                                                ([{"role": "user", "content": "Second prompt"}], None)]
    rows = [{"prompt": "Open question"}, {"messages": CHAT[:2]}, {"messages": CHAT},
            {"prompt": "Q", "completion": "A"}]
    prompts = read_prompts(_jsonl(tmp_path / "p.jsonl", rows))
    assert prompts == [([{"role": "user", "content": "Open question"}], None), (CHAT[:2], None), (CHAT[:4], "Rome."),
                       ([{"role": "user", "content": "Q"}], "A")]
    with pytest.raises(SingLoRAError, match=r"line 1, column 'prompt': expected a non-empty list of messages, got a "
                                            r"number"):
        read_prompts(_jsonl(tmp_path / "bad.jsonl", [{"prompt": 5}]))


def test_bbc_instructions_are_built_from_the_real_articles(tmp_path) -> None:
    from pathlib import Path

    from torch_singlora.assets import bbc_news_path
    from torch_singlora.llm.examples import bbc_instructions, main

    train, test = bbc_instructions("headline", words=10_000)  # whole bodies
    assert (len(train), len(test)) == (1647, 413)  # 2,060 distinct stories of the 2,225 files
    files = sorted(Path(bbc_news_path()).glob("*/*.txt"))
    first_lines = {}
    for file in files:
        raw = file.read_bytes()
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            text = raw.decode("latin-1")
        first_lines.setdefault(text.strip().splitlines()[0].strip(), []).append(file)
    questions = [row["messages"][0]["content"] for row in train + test]
    assert len(set(questions)) == 2060  # each story once: no held-out example repeats a training one
    for row in test[:20]:  # the answer is the article's first line; the question shows its body, not the title
        user, answer = row["messages"][0]["content"], row["messages"][1]["content"]
        assert answer in first_lines and answer not in user
        assert user.startswith("Write the headline of this BBC News article.\n\n")
    sections, _ = bbc_instructions("section", words=12)
    assert all(row["messages"][0]["content"].endswith(" ...") for row in sections)  # 12 words shown
    assert sorted({row["messages"][1]["content"] for row in sections}) == ["business", "entertainment", "politics",
                                                                            "sports", "tech"]
    assert bbc_instructions("headline", words=10_000) == (train, test)  # a fixed split
    assert main(["section", str(tmp_path), "--max-test", "7"]) == 0
    assert len((tmp_path / "test.jsonl").read_text().splitlines()) == 7
    assert main(["section", str(tmp_path)]) == 2  # nothing replaced silently (test_examples_command_...)
    conversations, fmt = read_conversations(tmp_path / "train.jsonl")
    assert fmt == "messages" and len(conversations) == 1647


def test_examples_command_keeps_files_and_reports_unwritable_places_in_one_line(tmp_path, capsys) -> None:
    """``python -m torch_singlora.llm.examples``: the output-file policy (an existing train/test.jsonl is replaced only
    with --overwrite, checked before anything is written; other files stay) and a one-line error naming the path,
    exit 2, where the folder cannot be made (under a regular file: root ignores permission bits)."""
    from torch_singlora.llm.examples import main

    prog = "python -m torch_singlora.llm.examples: error: "
    data = tmp_path / "data"
    data.mkdir()
    (data / "notes.txt").write_text("mine")
    (data / "test.jsonl").write_text("user's\n")
    assert main(["section", str(data), "--max-train", "3", "--max-test", "2"]) == 2
    assert capsys.readouterr().err == f"{prog}output {str(data / 'test.jsonl')!r} exists; --overwrite replaces it\n"
    assert sorted(p.name for p in data.iterdir()) == ["notes.txt", "test.jsonl"]  # train.jsonl not written either
    assert (data / "test.jsonl").read_text() == "user's\n"
    assert main(["section", str(data), "--max-train", "3", "--max-test", "2", "--overwrite"]) == 0
    assert capsys.readouterr().out == f"{data / 'train.jsonl'}: 3 examples\n{data / 'test.jsonl'}: 2 examples\n"
    assert [len(read_conversations(data / f"{n}.jsonl")[0]) for n in ("train", "test")] == [3, 2]
    assert (data / "notes.txt").read_text() == "mine"

    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    assert main(["section", str(blocker / "sub")]) == 2
    assert capsys.readouterr().err == (f"{prog}output folder {str(blocker / 'sub')!r}: cannot create it: Not a "
                                       "directory\n")
    assert main(["section", str(blocker)]) == 2
    assert capsys.readouterr().err == f"{prog}output folder {str(blocker)!r} exists and is not a folder\n"
    assert blocker.read_text() == "x"
