"""What a new user met on the command line (issue 24): a busy port, a huge key name, the chat path's hints and
multi-line entry. Each test reproduces the friction first."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from torch_singlora import SingLoRAConfig, get_singlora_model
from torch_singlora.cli import main


def test_serve_on_a_busy_port_fails_before_loading_and_says_why(tmp_path: Path, capsys) -> None:
    """It printed "serving on ..." (after loading the model) and then exited 3."""
    pytest.importorskip("uvicorn")
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        assert main(["serve", "--model", str(tmp_path / "not-even-loaded"), "--port", str(port)]) == 2
    err = capsys.readouterr().err
    assert f"cannot listen on 127.0.0.1:{port}: Address already in use (another server on --port {port}?)" in err
    assert "serving" not in err and "not-even-loaded" not in err


def test_inspect_cuts_a_huge_key_name_instead_of_padding_every_line_to_it(tmp_path: Path, capsys) -> None:
    """A 1 MiB module name made `inspect` print 1 MiB per module line (40 MB for 40 modules)."""
    model = get_singlora_model(torch.nn.Sequential(*[torch.nn.Linear(4, 4) for _ in range(40)]),
                               SingLoRAConfig(r=2, target_modules="all-linear", ramp_up_steps=0))
    model.save_adapter(tmp_path)
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    huge = "-" * 2**20  # sorts first
    tensors[f"{huge}.singlora_A"] = torch.ones(4, 2)
    save_file(tensors, tmp_path / "adapter_model.safetensors", metadata={"format": "singlora", "format_version": "1"})
    assert main(["inspect", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert len(out) < 20_000 and "<1,048,576 characters>" in out and len(out.splitlines()) == 47, len(out)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    (tmp_path / "adapter_config.json").write_text(json.dumps({**config, "r": 3}))  # every A now has the wrong rank
    assert main(["inspect", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert len(err) < 5_000 and "has shape [4, 2]" in err, len(err)


@pytest.fixture(scope="module")
def chat_data(tmp_path_factory) -> dict[str, Path]:
    """Chat data as files (messages, prompt/completion) and as a saved DatasetDict with two splits, and a tiny BERT."""
    from conftest import save_tiny_bert

    datasets = pytest.importorskip("datasets")
    root = tmp_path_factory.mktemp("chat_data")
    turn = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    (root / "messages.jsonl").write_text(json.dumps({"messages": turn}) + "\n")
    (root / "pc.jsonl").write_text(json.dumps({"prompt": "hi", "completion": "hello"}) + "\n")
    datasets.DatasetDict({"train": datasets.Dataset.from_list([{"messages": turn}] * 3),
                          "test": datasets.Dataset.from_list([{"messages": turn}])}).save_to_disk(root / "dd")
    save_tiny_bert(root / "bert", hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=16,
                   max_position_embeddings=32)
    return {"root": root, "messages": root / "messages.jsonl", "pc": root / "pc.jsonl", "dd": root / "dd",
            "bert": root / "bert"}


def test_chat_data_given_to_another_task_gets_the_sft_hint(chat_data, capsys) -> None:
    """It said only "has no column 'text' (--text-column)"; a saved DatasetDict was read as class subfolders."""
    cases = {("classification", "messages"): "(chat data in the messages format: --task sft trains on it)",
             ("causal-lm", "pc"): "(chat data in the prompt-completion format: --task sft trains on it)",
             ("classification", "dd"): "a dataset folder saved by `datasets`; classification reads a folder of class "
                                       "subfolders holding text files (--task sft reads dataset folders of chat data)",
             ("causal-lm", "dd"): "a dataset folder saved by `datasets`; causal-lm reads a folder of .txt files"}
    for (task, data), message in cases.items():
        argv = ["train", "--task", task, "--model", str(chat_data["bert"]), "--train-data", str(chat_data[data]),
                "--output-dir", str(chat_data["root"] / "out"), "--quiet"]
        assert main(argv) == 2, (task, data)
        assert message in capsys.readouterr().err, (task, data)


def test_a_dataset_dict_without_a_split_names_the_flag(chat_data) -> None:
    """It said "no split None"."""
    from torch_singlora import SingLoRAError
    from torch_singlora.llm.data import read_conversations

    with pytest.raises(SingLoRAError, match=r"dd: a dataset with the splits \['test', 'train'\]: name the one to "
                                            r"read, e.g. --data-split test \(--eval-data-split for --eval-data\) or "
                                            r"give one split's folder, e.g. .*dd/test"):
        read_conversations(chat_data["dd"])
    assert len(read_conversations(chat_data["dd"], split="train")[0]) == 3
    assert len(read_conversations(chat_data["dd"] / "test")[0]) == 1


def test_train_help_describes_the_sft_formats(capsys) -> None:
    """`train --help` said nothing of the chat formats under --train-data."""
    from torch_singlora.llm.data import FORMATS

    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    help_text = text.split("--train-data TRAIN_DATA training data:", 1)[1].split("--output-dir", 1)[0]
    assert "sft:" in help_text and all(name in help_text for name in FORMATS), help_text
