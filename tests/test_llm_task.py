"""``singlora train --task sft`` end to end on a tiny tied Llama with SmolLM2's tokenizer and chat template: the loss
is the mean cross-entropy of the answer tokens only (checked against a loss written out in the test), the base
model's score is recorded at step 0 and equals ``singlora evaluate`` of the base model without an adapter, and the
trained adapter, its ``singlora merge`` folder and its ``singlora export`` (loaded with stock PEFT) answer alike."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import save_tiny_chat_llama
from torch_singlora.cli import main
from torch_singlora.llm.generate import GenerationOptions, generate, load_chat_model

transformers = pytest.importorskip("transformers")

WORDS = "red green blue cyan pink gold grey teal plum lime".split()


def _rows(n: int) -> list[dict]:
    return [{"messages": [{"role": "system", "content": "Answer with one word."},
                          {"role": "user", "content": f"Which colour comes after {WORDS[i % 10]}?"},
                          {"role": "assistant", "content": WORDS[(i + 1) % 10]},
                          {"role": "user", "content": "And the one before it?"},
                          {"role": "assistant", "content": WORDS[(i - 1) % 10]}]} for i in range(n)]


@pytest.fixture(scope="module")
def run(tmp_path_factory, smollm2_tokenizer):
    root = tmp_path_factory.mktemp("sft")
    save_tiny_chat_llama(root / "base", smollm2_tokenizer)
    for name, rows in (("train", _rows(24)), ("test", _rows(6))):
        (root / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert main(["train", "--task", "sft", "--model", str(root / "base"), "--train-data", str(root / "train.jsonl"),
                 "--eval-data", str(root / "test.jsonl"), "--output-dir", str(root / "run"), "--max-steps", "4",
                 "--batch-size", "4", "--lr", "3e-2", "--eval-generations", "4",
                 "--max-new-tokens", "3", "--eval-samples", "2", "--quiet", "--no-plot"]) == 0
    return root


def answer_loss(model, tokenizer, rows: list[dict]) -> float:
    """Mean cross-entropy over the assistant answers' tokens (and their <|im_end|>), written out: each answer is
    located by rendering the conversation up to it, so no mask from the code under test is used."""
    losses = []
    with torch.no_grad():
        for row in rows:
            messages = row["messages"]
            ids = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"]
            logp = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].double(), -1)
            for i, message in enumerate(messages):
                if message["role"] != "assistant":
                    continue
                start = len(tokenizer.apply_chat_template(messages[:i], tokenize=True, return_dict=True,
                                                          add_generation_prompt=True)["input_ids"])
                answer = tokenizer(message["content"] + "<|im_end|>", add_special_tokens=False)["input_ids"]
                assert ids[start:start + len(answer)] == answer
                losses += [-float(logp[p - 1, ids[p]]) for p in range(start, start + len(answer))]
    return sum(losses) / len(losses)


def test_sft_run_records_base_and_tuned_scores_on_answer_tokens(run, smollm2_tokenizer) -> None:
    summary = json.loads((run / "run" / "summary.json").read_text())
    records = [json.loads(line) for line in (run / "run" / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if r["kind"] == "eval"]
    assert [r["step"] for r in evals] == [0, 4]
    assert summary["base"] == {k: v for k, v in evals[0].items() if k not in ("kind", "step")}
    test_rows = _rows(6)
    base = transformers.AutoModelForCausalLM.from_pretrained(run / "base")
    assert summary["base"]["eval_loss"] == pytest.approx(answer_loss(base, smollm2_tokenizer, test_rows), rel=1e-5)
    tuned = load_chat_model(str(run / "run" / "adapter"))
    assert summary["eval_loss"] == pytest.approx(answer_loss(tuned.model, smollm2_tokenizer, test_rows), rel=1e-5)
    assert summary["eval_loss"] < summary["base"]["eval_loss"]
    answers = generate(tuned.model, tuned.tokenizer, [r["messages"][:-1] for r in test_rows[:4]],
                       GenerationOptions(max_new_tokens=3))
    assert summary["samples"] == [{"prompt": "And the one before it?", "reference": r["messages"][-1]["content"],
                                   "generated": a} for r, a in zip(test_rows[:2], answers[:2])]
    assert summary["generated"] == 4 and 0 <= summary["rouge_l"] <= 1
    info = json.loads((run / "run" / "adapter" / "run_info.json").read_text())
    assert info["task"] == "sft" and info["assistant_only_loss"] is True and info["chat_template"] is None
    assert info["truncated"] == {"train": 0, "train_dropped": 0, "eval": 0, "eval_dropped": 0}


def test_evaluate_base_model_and_adapter(run, tmp_path) -> None:
    summary = json.loads((run / "run" / "summary.json").read_text())
    out = tmp_path / "base.json"
    assert main(["evaluate", "--model", str(run / "base"), "--task", "sft", "--data", str(run / "test.jsonl"),
                 "--eval-generations", "4", "--max-new-tokens", "3", "--eval-samples", "2", "--output", str(out),
                 "--quiet"]) == 0
    base = json.loads(out.read_text())
    for key in ("eval_loss", "exact_match", "rouge_l", "samples"):
        assert base[key] == pytest.approx(summary["base"][key]) if key != "samples" else base[key] == summary[
            "base"][key]
    out = tmp_path / "adapter.json"  # a new file: evaluate --output replaces an existing one only with --overwrite
    assert main(["evaluate", str(run / "run" / "adapter"), "--data", str(run / "test.jsonl"), "--output", str(out),
                 "--quiet"]) == 0
    assert json.loads(out.read_text())["eval_loss"] == pytest.approx(summary["eval_loss"], rel=1e-6)


def test_adapter_merged_and_exported_answer_alike(run, tmp_path) -> None:
    adapter = run / "run" / "adapter"
    assert main(["merge", str(adapter), str(tmp_path / "merged"), "--quiet"]) == 0
    assert main(["export", str(adapter), str(tmp_path / "peft"), "--quiet"]) == 0
    prompts = [r["messages"][:2] for r in _rows(5)]
    answers = []
    for path, extra in ((adapter, None), (tmp_path / "merged", None), (run / "base", tmp_path / "peft")):
        chat = load_chat_model(str(path), None if extra is None else str(extra))
        answers.append(generate(chat.model, chat.tokenizer, prompts, GenerationOptions(max_new_tokens=6)))
    assert answers[0] == answers[1] == answers[2]
    base = load_chat_model(str(run / "base"))
    assert answers[0] != generate(base.model, base.tokenizer, prompts, GenerationOptions(max_new_tokens=6))


def test_chat_template_file_and_whole_text_loss(run, tmp_path, smollm2_tokenizer) -> None:
    template = tmp_path / "template.jinja"
    template.write_text("{% for m in messages %}<|im_start|>{{ m['role'] }}: {{ m['content'] }}<|im_end|>{{ '\\n' }}"
                        "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant: {% endif %}")
    out = tmp_path / "run"
    assert main(["train", "--task", "sft", "--model", str(run / "base"), "--train-data", str(run / "train.jsonl"),
                 "--output-dir", str(out), "--max-steps", "1", "--batch-size", "4", "--chat-template", str(template),
                 "--no-assistant-only-loss", "--eval-split", "0.25", "--eval-generations", "0", "--quiet",
                 "--no-plot"]) == 0
    info = json.loads((out / "adapter" / "run_info.json").read_text())
    assert info["chat_template"] == template.read_text() and info["assistant_only_loss"] is False
    chat = load_chat_model(str(out / "adapter"))
    assert chat.tokenizer.chat_template == template.read_text()
    assert main(["merge", str(out / "adapter"), str(tmp_path / "merged"), "--quiet"]) == 0
    merged = transformers.AutoTokenizer.from_pretrained(tmp_path / "merged")
    assert merged.chat_template == template.read_text()  # the merged model carries the template it learned
    summary = json.loads((out / "summary.json").read_text())
    assert "exact_match" not in summary and summary["base"]["eval_loss"] > 0


def test_bad_chat_data_is_refused_naming_row_and_column(run, tmp_path, capsys) -> None:
    rows = _rows(3)
    rows[2]["messages"][1]["content"] = ["a", "list"]
    (tmp_path / "bad.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert main(["train", "--task", "sft", "--model", str(run / "base"), "--train-data", str(tmp_path / "bad.jsonl"),
                 "--output-dir", str(tmp_path / "out"), "--max-steps", "1", "--quiet"]) == 2
    assert "bad.jsonl line 3, column 'messages', message 2: 'content' must be a string, got a list" in \
        capsys.readouterr().err
    assert not (tmp_path / "out" / "adapter").exists()


def _train(run, out, *extra: str) -> dict:
    assert main(["train", "--task", "sft", "--model", str(run / "base"), "--eval-data", str(run / "test.jsonl"),
                 "--output-dir", str(out), "--lr", "3e-2", "--eval-generations", "0", "--quiet", "--no-plot",
                 "--save-every", "0", *extra]) == 0
    return json.loads((out / "summary.json").read_text())


def _adapter(out) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(out / "adapter" / "adapter_model.safetensors")


def test_packing_changes_speed_not_the_result(run, tmp_path) -> None:
    """--packing with --grad-accum and the assistant-only loss, on messages and on prompt/completion rows: the same
    adapter and losses as the padded run (and the base model's step-0 loss, evaluated on packed rows)."""
    rows = _rows(24)
    for i, row in enumerate(rows):  # one long conversation (~90 tokens) in 4, else one exchange (28): packed 2 a row
        row["messages"] = row["messages"] + row["messages"][1:] if i % 4 == 0 else row["messages"][:3]
    messages, completions = tmp_path / "train.jsonl", tmp_path / "completions.jsonl"
    messages.write_text("".join(json.dumps(r) + "\n" for r in rows))
    completions.write_text("".join(json.dumps({"prompt": r["messages"][:-1], "completion": r["messages"][-1:]}) + "\n"
                                   for r in rows))
    common = ("--max-steps", "3", "--batch-size", "4", "--grad-accum", "2", "--max-length", "128")
    for data in (messages, completions):
        padded = _train(run, tmp_path / f"{data.stem}-padded", "--train-data", str(data), *common)
        packed = _train(run, tmp_path / f"{data.stem}-packed", "--train-data", str(data), *common, "--packing")
        assert packed["config"]["task_options"]["packing"] is True
        for summary in (packed, packed["base"]):
            reference = padded if summary is packed else padded["base"]
            assert summary["eval_loss"] == pytest.approx(reference["eval_loss"], rel=1e-6)
        ours, reference = _adapter(tmp_path / f"{data.stem}-packed"), _adapter(tmp_path / f"{data.stem}-padded")
        assert ours.keys() == reference.keys()
        for key in reference:
            torch.testing.assert_close(ours[key], reference[key], rtol=1e-5, atol=1e-5)
    losses = [[json.loads(line)["loss"] for line in (tmp_path / f"train-{kind}" / "metrics.jsonl").read_text()
               .splitlines() if json.loads(line)["kind"] == "train"] for kind in ("padded", "packed")]
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)
    out = tmp_path / "evaluated.json"  # singlora evaluate of the packed run packs as it trained (run_info.json)
    assert main(["evaluate", str(tmp_path / "train-packed" / "adapter"), "--data", str(run / "test.jsonl"),
                 "--output", str(out), "--quiet"]) == 0
    trained = json.loads((tmp_path / "train-packed" / "summary.json").read_text())
    assert json.loads(out.read_text())["eval_loss"] == pytest.approx(trained["eval_loss"], rel=1e-6)


def test_cut_and_dropped_examples_are_reported_under_quiet(run, tmp_path, capsys) -> None:
    rows = _rows(8)
    rows[1]["messages"][0]["content"] = "Answer with one word. " * 40  # the answers fall beyond --max-length
    rows[2]["messages"][-1]["content"] = "plum " * 60  # its last answer is cut
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    summary = _train(run, tmp_path / "out", "--train-data", str(tmp_path / "train.jsonl"), "--max-length", "64",
                     "--max-steps", "1", "--batch-size", "4")
    err = capsys.readouterr().err
    assert "singlora train: train: 7 examples" in err and "2 truncated to 64 tokens, 1 of them dropped" in err
    assert "eval:" not in err  # nothing cut there: quiet
    counts = {"train": 2, "train_dropped": 1, "eval": 0, "eval_dropped": 0}
    assert summary["truncated"] == counts
    assert json.loads((tmp_path / "out" / "adapter" / "run_info.json").read_text())["truncated"] == counts
