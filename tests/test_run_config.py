"""``singlora train --config``: the file's keys are the flags, the command line overrides them, unknown keys and wrong
types are refused by name; ``--print-config`` prints the resolved config; a run keeps it (``RUN/config.yaml``,
``run_info.json``) and ``--config RUN/config.yaml`` repeats the run exactly."""

from __future__ import annotations

import json

import pytest
import torch

from torch_singlora.cli import main

yaml = pytest.importorskip("yaml")
pytest.importorskip("transformers")

from conftest import save_tiny_chat_llama  # noqa: E402


@pytest.fixture(scope="module")
def files(tmp_path_factory, smollm2_tokenizer):
    root = tmp_path_factory.mktemp("config")
    save_tiny_chat_llama(root / "model", smollm2_tokenizer)
    rows = [{"messages": [{"role": "user", "content": f"Say {w}."}, {"role": "assistant", "content": w}]}
            for w in ("red", "green", "blue", "cyan", "pink", "gray", "teal", "gold")]
    (root / "train.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    return root


def _print_config(capsys, *argv: str) -> dict:
    assert main(["train", *argv, "--print-config"]) == 0
    return yaml.safe_load(capsys.readouterr().out)


def test_file_values_flags_override_and_print_config(files, tmp_path, capsys, monkeypatch) -> None:
    monkeypatch.chdir(files)
    (tmp_path / "run.yaml").write_text(
        "task: sft\nmodel: model\ntrain-data: train.jsonl\noutput_dir: out\ntarget_modules: [q_proj, v_proj]\n"
        "lr: 1e-3\nmax_steps: 7\nwarmup: 2\nassistant_only_loss: false\neval_generations: 5\n")
    printed = _print_config(capsys, "--config", str(tmp_path / "run.yaml"), "--max-steps", "9", "--eval-generations",
                            "0")
    assert printed["lr"] == 1e-3 and isinstance(printed["lr"], float)  # YAML reads 1e-3 as text
    assert printed["max_steps"] == 9 and printed["eval_generations"] == 0  # the command line wins
    assert printed["target_modules"] == "q_proj,v_proj" and printed["warmup"] == 2  # read as TrainConfig reads it
    assert printed["assistant_only_loss"] is False and printed["task"] == "sft"
    assert printed["model"] == str(files / "model") and printed["output_dir"] == str(files / "out")  # absolute
    assert printed["max_length"] == 1024 and printed["r"] == 8  # defaults filled in
    assert "beta" not in printed  # only the chosen task's options
    (tmp_path / "run.toml").write_text('task = "dpo"\nmodel = "model"\ntrain_data = "x.jsonl"\noutput_dir = "o"\n'
                                       "beta = 0.25\n")
    printed = _print_config(capsys, "--config", str(tmp_path / "run.toml"))
    assert printed["beta"] == 0.25 and printed["loss_type"] == "sigmoid"


@pytest.mark.parametrize("text, message", [
    ("learning_rate: 1e-3\n", "unknown key 'learning_rate'; did you mean 'lr'?"),
    ("max_stpes: 3\n", "unknown key 'max_stpes'; did you mean 'max_steps'?"),
    ("r: [4]\n", "r: expected an integer, got [4]"),
    ("lr: fast\n", 'lr: expected a number, got "fast"'),
    ("quiet: 1\n", "quiet: expected true or false, got 1"),
    ("r: 4\nr: 8\n", "given twice"),
    ("task: sft\nbeta: 0.2\n", "beta is an option of --task dpo, not of --task sft"),
    ("- lr\n", "expected a mapping of flag names to values, got list"),
])
def test_bad_config_files_are_refused_by_key(tmp_path, capsys, text, message) -> None:
    path = tmp_path / "run.yaml"
    path.write_text(text)
    assert main(["train", "--config", str(path), "--print-config"]) == 2
    assert message in capsys.readouterr().err


def test_run_keeps_its_config_and_repeats_from_it(files, capsys) -> None:
    first, second = files / "first", files / "second"
    assert main(["train", "--task", "sft", "--model", str(files / "model"), "--train-data", str(files / "train.jsonl"),
                 "--output-dir", str(first), "--r", "2", "--max-steps", "3", "--batch-size", "4", "--lr", "5e-2",
                 "--eval-generations", "0", "--quiet", "--no-plot"]) == 0
    kept = yaml.safe_load((first / "config.yaml").read_text())
    assert kept == json.loads((first / "adapter" / "run_info.json").read_text())["config"]
    assert kept["r"] == 2 and kept["max_steps"] == 3 and kept["train_data"] == str(files / "train.jsonl")
    before = {path: path.read_bytes() for path in first.rglob("*") if path.is_file()}
    for flags in ([], ["--overwrite"], ["--resume"]):  # the file read is an input: never rewritten, nothing removed
        assert main(["train", "--config", str(first / "config.yaml"), *flags]) == 2
        err = capsys.readouterr().err
        assert f"is this command's --config {first / 'config.yaml'}: writing there would destroy it" in err, err
        assert {path: path.read_bytes() for path in first.rglob("*") if path.is_file()} == before
    assert main(["train", "--config", str(first / "config.yaml"), "--output-dir", str(second)]) == 0
    from safetensors.torch import load_file

    a, b = (load_file(run / "adapter" / "adapter_model.safetensors") for run in (first, second))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert yaml.safe_load((second / "config.yaml").read_text()) == {**kept, "output_dir": str(second)}
