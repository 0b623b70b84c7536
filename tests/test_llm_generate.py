"""Generation: batched left-padded greedy equals a step-by-step argmax reference; streaming equals generation; the
adapter, its merged model and its PEFT export generate the same text; ``singlora generate`` and ``singlora chat``
(driven through stdin) work on a tiny tied Llama with SmolLM2's tokenizer and chat template."""

from __future__ import annotations

import io
import json
import subprocess
import sys

import pytest
import torch

from conftest import save_tiny_chat_llama
from torch_singlora import SingLoRAConfig, SingLoRAError, get_singlora_model
from torch_singlora.cli import main
from torch_singlora.llm.chat import chat_loop
from torch_singlora.llm.generate import (ChatModel, GenerationOptions, generate, load_chat_model, prompt_ids,
                                         stream)
from torch_singlora.llm.metrics import answer_metrics, generation_metrics, normalize_answer, rouge_l

transformers = pytest.importorskip("transformers")

PROMPTS = [[{"role": "user", "content": "Hi"}],
           [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name three colours, please."}],
           [{"role": "user", "content": "Capital of France?"}, {"role": "assistant", "content": "Paris."},
            {"role": "user", "content": "And Italy?"}]]


@pytest.fixture(scope="module")
def folders(tmp_path_factory, smollm2_tokenizer):
    """A tiny tied Llama (``base``), a SingLoRA adapter for it, the merged model and the adapter's PEFT export."""
    from torch_singlora.export import export_lora

    root = tmp_path_factory.mktemp("chat")
    save_tiny_chat_llama(root / "base", smollm2_tokenizer)
    base = transformers.AutoModelForCausalLM.from_pretrained(root / "base")
    torch.manual_seed(1)
    model = get_singlora_model(base, SingLoRAConfig(r=4, alpha=64, target_modules="all-linear", ramp_up_steps=0))
    model.save_adapter(root / "adapter")
    export_lora(root / "adapter", root / "peft", base_model=transformers.AutoModelForCausalLM.from_pretrained(
        root / "base"))
    model.merge_and_unload().save_pretrained(root / "merged")
    smollm2_tokenizer.save_pretrained(root / "merged")
    return root


@pytest.fixture(scope="module")
def base_chat(folders) -> ChatModel:
    return load_chat_model(str(folders / "base"))


def reference_greedy(chat: ChatModel, messages, max_new_tokens: int) -> str:
    """Greedy decoding written out: full forward on the unpadded prompt, argmax, append, until EOS."""
    ids = prompt_ids(chat.tokenizer, messages)
    new: list[int] = []
    with torch.no_grad():
        for _ in range(max_new_tokens):
            token = int(chat.model(input_ids=torch.tensor([ids + new])).logits[0, -1].argmax())
            if token == chat.tokenizer.eos_token_id:
                break
            new.append(token)
    return chat.tokenizer.decode(new, skip_special_tokens=True)


def test_batched_greedy_equals_step_by_step_argmax(base_chat) -> None:
    options = GenerationOptions(max_new_tokens=6, batch_size=3)
    batched = generate(base_chat.model, base_chat.tokenizer, PROMPTS, options)
    assert batched == [reference_greedy(base_chat, p, 6) for p in PROMPTS]
    assert batched == generate(base_chat.model, base_chat.tokenizer, PROMPTS, GenerationOptions(max_new_tokens=6,
                                                                                                  batch_size=1))
    assert len(set(batched)) == 3 and all(batched)


def test_generation_stops_at_eos(folders, smollm2_tokenizer) -> None:
    tokenizer = smollm2_tokenizer
    model = transformers.AutoModelForCausalLM.from_pretrained(folders / "base", tie_word_embeddings=False).eval()
    prompt = prompt_ids(tokenizer, PROMPTS[0])
    with torch.no_grad():  # make EOS the greedy choice right after the first generated token
        first = int(model(input_ids=torch.tensor([prompt])).logits[0, -1].argmax())
        hidden = model.model(input_ids=torch.tensor([prompt + [first]])).last_hidden_state[0, -1]
        model.lm_head.weight[tokenizer.eos_token_id] = hidden * 1e3 / hidden.norm() ** 2
        assert int(model(input_ids=torch.tensor([prompt])).logits[0, -1].argmax()) == first
    assert generate(model, tokenizer, PROMPTS[:1], GenerationOptions(max_new_tokens=8)) == [tokenizer.decode([first])]


def test_stream_joins_to_generate_and_sampling_is_seeded(base_chat) -> None:
    options = GenerationOptions(max_new_tokens=8)
    pieces = list(stream(base_chat.model, base_chat.tokenizer, PROMPTS[1], options))
    assert len(pieces) > 1  # pieces arrive as tokens are generated, not once at the end
    assert "".join(pieces) == generate(base_chat.model, base_chat.tokenizer, PROMPTS[1:2], options)[0]
    sample = GenerationOptions(max_new_tokens=8, do_sample=True, temperature=1.5, seed=3)
    first = generate(base_chat.model, base_chat.tokenizer, PROMPTS, sample)
    assert first == generate(base_chat.model, base_chat.tokenizer, PROMPTS, sample)
    assert first != generate(base_chat.model, base_chat.tokenizer, PROMPTS, GenerationOptions(
        max_new_tokens=8, do_sample=True, temperature=1.5, seed=4))
    with pytest.raises(SingLoRAError, match=r"--temperature=0.0 must be a finite number > 0"):
        generate(base_chat.model, base_chat.tokenizer, PROMPTS, GenerationOptions(do_sample=True, temperature=0.0))


def test_adapter_merged_and_peft_export_generate_the_same(folders, base_chat) -> None:
    options = GenerationOptions(max_new_tokens=8, batch_size=3)
    texts = {}
    for name, (path, adapter) in {"adapter": ("base", "adapter"), "merged": ("merged", None),
                                  "peft": ("base", "peft")}.items():
        chat = load_chat_model(str(folders / path), None if adapter is None else str(folders / adapter))
        texts[name] = generate(chat.model, chat.tokenizer, PROMPTS, options)
    assert texts["adapter"] == texts["merged"] == texts["peft"]
    assert texts["adapter"] != generate(base_chat.model, base_chat.tokenizer, PROMPTS, options)  # it adapts
    with pytest.raises(SingLoRAError, match=r"--adapter .*: no adapter_config.json"):
        load_chat_model(str(folders / "base"), str(folders / "merged"))
    with pytest.raises(SingLoRAError, match=r"adapter folder without run_info.json .* give its base model folder"):
        load_chat_model(str(folders / "adapter"))


def test_a_peft_lora_for_another_model_is_a_one_line_error_naming_adapter(folders, smollm2_tokenizer, tmp_path,
                                                                         capsys) -> None:
    """PEFT's load failures (target modules the base lacks: NoMatchingPeftModuleError; same names, other shapes: a
    multi-line RuntimeError) become one SingLoRAError naming --adapter and the folder, exit 2, no traceback."""
    from peft import LoraConfig, get_peft_model

    bert = transformers.BertModel(transformers.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1,
                                                          num_attention_heads=2, intermediate_size=32))
    get_peft_model(bert, LoraConfig(r=2, target_modules=["query", "value"])).save_pretrained(tmp_path / "bert_lora")
    save_tiny_chat_llama(tmp_path / "wide", smollm2_tokenizer, hidden_size=32, intermediate_size=64)
    wide = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "wide")
    get_peft_model(wide, LoraConfig(r=2, target_modules=["q_proj"])).save_pretrained(tmp_path / "wide_lora")
    capsys.readouterr()
    for command in ("generate", "chat"):
        prompts = ["Hi"] if command == "generate" else []
        assert main([command, str(folders / "base"), *prompts, "--adapter", str(tmp_path / "bert_lora")]) == 2
        err = capsys.readouterr().err[:-1].split("\n")[-1]  # after the base model's loading progress bar
        assert err.startswith(f"singlora {command}: error: --adapter {str(tmp_path / 'bert_lora')!r}: PEFT cannot "
                              "load this LoRA onto the base model (is it a LoRA for another model?): ")
        assert "NoMatchingPeftModuleError: Target modules {" in err and "} not found in the base model." in err
    with pytest.raises(SingLoRAError) as caught:
        load_chat_model(str(folders / "base"), str(tmp_path / "wide_lora"))
    message = str(caught.value)
    assert message.startswith(f"--adapter {str(tmp_path / 'wide_lora')!r}: PEFT cannot load this LoRA onto the base "
                              "model (is it a LoRA for another model?): RuntimeError: Error(s) in loading state_dict")
    assert "\n" not in message and "size mismatch for base_model.model.model.layers.0.self_attn.q_proj" in message


def _peft_copy(folders, tmp_path, name: str):
    copy = tmp_path / name
    copy.mkdir()
    for file in (folders / "peft").iterdir():
        (copy / file.name).write_bytes(file.read_bytes())
    return copy


def test_peft_folders_go_through_the_hostile_input_readers(folders, tmp_path, capsys, monkeypatch) -> None:
    """Issue 24: a pickle-only PEFT folder was handed to PEFT (torch.load: a traceback), a safetensors header of
    length 2**63 gave a traceback, and an update overflowing float32 gave empty answers with exit 0. Each is now a
    one-line error naming the folder (and the pickle, or the module), before any generation."""
    import struct

    from safetensors.torch import load_file, save_file

    pickled = _peft_copy(folders, tmp_path, "pickled")
    tensors = load_file(pickled / "adapter_model.safetensors")
    (pickled / "adapter_model.safetensors").unlink()
    torch.save(tensors, pickled / "adapter_model.bin")
    huge = _peft_copy(folders, tmp_path, "huge_header")
    with open(huge / "adapter_model.safetensors", "r+b") as handle:
        handle.write(struct.pack("<Q", 2**63))
    nan = _peft_copy(folders, tmp_path, "nan")
    key = sorted(tensors)[0]
    save_file({**tensors, key: torch.full_like(tensors[key], float("nan"))}, nan / "adapter_model.safetensors")
    overflow = _peft_copy(folders, tmp_path, "overflow")
    config = json.loads((overflow / "adapter_config.json").read_text())
    (overflow / "adapter_config.json").write_text(json.dumps({**config, "lora_alpha": 1e308, "alpha_pattern": {}}))

    def no_torch_load(*args, **kwargs):
        raise AssertionError("torch.load was called")

    monkeypatch.setattr(torch, "load", no_torch_load)
    cases = {pickled: "found pickled weights ['adapter_model.bin'], which singlora never loads",
             huge: "header declares 9223372036854775808 bytes, over the", nan: f"{key} contains NaN or Inf",
             overflow: "module 'base_model.model.model.layers.0.self_attn.q_proj': its scale 2.5e+307 is beyond"}
    for folder, message in cases.items():
        assert main(["generate", str(folders / "base"), "Hi", "--adapter", str(folder)]) == 2, folder
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, err
        line = err if folder != overflow else err.splitlines()[-1]  # the others before the base model loads
        assert line.startswith(f"singlora generate: error: --adapter {str(folder)!r}: "), err
    assert main(["generate", str(folders / "base"), "Hi", "--adapter", str(folders / "peft"),
                 "--max-new-tokens", "2"]) == 0  # the sound export still loads


def test_generate_command_writes_json_lines(folders, base_chat, tmp_path, capsys) -> None:
    out = tmp_path / "answers.jsonl"
    assert main(["generate", str(folders / "base"), "Hi", "Capital of France?", "--max-new-tokens", "5",
                 "--output", str(out)]) == 0
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["prompt"] for r in records] == [PROMPTS[0], [{"role": "user", "content": "Capital of France?"}]]
    expected = generate(base_chat.model, base_chat.tokenizer, [r["prompt"] for r in records],
                        GenerationOptions(max_new_tokens=5))
    assert [r["completion"] for r in records] == expected

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"messages": PROMPTS[2] + [{"role": "assistant", "content": "Rome."}]}) + "\n")
    assert main(["generate", str(folders / "base"), "--prompts-file", str(prompts), "--max-new-tokens", "5",
                 "--system", "Be brief."]) == 0
    record = json.loads(capsys.readouterr().out)
    assert record["prompt"] == [{"role": "system", "content": "Be brief."}] + PROMPTS[2]
    assert record["reference"] == "Rome."
    assert main(["generate", str(folders / "base")]) == 2
    assert "give prompts as arguments or --prompts-file" in capsys.readouterr().err
    before = out.read_text()
    assert main(["generate", str(folders / "base"), "Hi", "--output", str(out)]) == 2  # nothing is overwritten
    assert "exists; --overwrite replaces it" in capsys.readouterr().err and out.read_text() == before


def test_generate_never_writes_over_its_inputs(folders, tmp_path, capsys) -> None:
    """Issue 24: `generate RUN/adapter "Say hi." --output RUN/adapter/adapter_config.json --overwrite` exited 0 and
    the adapter no longer loaded; `--prompts-file P.jsonl --output P.jsonl --overwrite` replaced the prompts."""
    from torch_singlora.runs import write_run_info

    trained = tmp_path / "run" / "adapter"
    trained.mkdir(parents=True)
    for file in (folders / "adapter").iterdir():
        (trained / file.name).write_bytes(file.read_bytes())
    write_run_info(trained, {"task": "sft", "method": "singlora", "base_model": str(folders / "base"),
                             "tokenizer": str(folders / "base"), "target_modules": [], "max_length": 64})
    prompts, template = tmp_path / "P.jsonl", tmp_path / "chat.jinja"
    prompts.write_text(json.dumps({"prompt": "Hi"}) + "\n")
    template.write_text("{% for m in messages %}{{ m['content'] }}{% endfor %}")
    base, peft = str(folders / "base"), str(folders / "peft")
    cases = {
        (str(trained), "Say hi.", "--output", str(trained / "adapter_config.json")): "lies inside this command's model",
        (base, "--prompts-file", str(prompts), "--output", str(prompts)): "is this command's --prompts-file",
        (base, "Hi", "--chat-template", str(template), "--output", str(template)): "is this command's --chat-template",
        (base, "Hi", "--adapter", peft, "--output", f"{peft}/adapter_model.safetensors"): "lies inside this "
                                                                                         "command's --adapter",
        (str(trained), "Hi", "--output", str(folders / "base" / "config.json")):
            "lies inside this command's base model",
    }
    before = {folder: sorted((p.name, p.read_bytes()) for p in folder.rglob("*") if p.is_file())
              for folder in (tmp_path, folders)}
    for argv, message in cases.items():
        assert main(["generate", *argv, "--overwrite"]) == 2, argv
        assert message in capsys.readouterr().err, argv
    assert before == {folder: sorted((p.name, p.read_bytes()) for p in folder.rglob("*") if p.is_file())
                      for folder in (tmp_path, folders)}


def test_chat_loop_keeps_history_resets_and_streams(base_chat) -> None:
    options = GenerationOptions(max_new_tokens=5)
    lines = iter(["Hi", "  ", "/help", "Capital of France?", "/reset", "Capital of France?", "/exit", "never read"])
    out = io.StringIO()
    writes: list[str] = []
    out.write = lambda text: writes.append(text) or len(text)  # type: ignore[method-assign]
    history = chat_loop(base_chat, options, system="Be brief.", read=lambda prompt: next(lines), out=out)
    answer = lambda messages: generate(base_chat.model, base_chat.tokenizer, [messages], options)[0]  # noqa: E731
    system = {"role": "system", "content": "Be brief."}
    first = answer([system, {"role": "user", "content": "Hi"}])
    second = answer([system, {"role": "user", "content": "Hi"}, {"role": "assistant", "content": first},
                     {"role": "user", "content": "Capital of France?"}])
    fresh = answer([system, {"role": "user", "content": "Capital of France?"}])
    assert history == [system, {"role": "user", "content": "Capital of France?"},
                       {"role": "assistant", "content": fresh}]
    transcript = "".join(writes)
    assert f"{first}\n" in transcript and f"{second}\n" in transcript and "(conversation reset)" in transcript
    assert "unknown command '/help'" in transcript
    assert sum(1 for w in writes if w and w in first) > 1  # the first answer came in several pieces


def test_chat_takes_messages_of_several_lines(base_chat) -> None:
    """Issue 24: every line was a turn, so the README's prompt (a question, a blank line, an article) could not be
    entered. A trailing backslash continues a message; a block between two \"\"\" lines is one message as pasted."""
    lines = iter(["Which section?\\", "\\", "The match ended 2-1.", '"""', "Two lines:", "", "  kept as pasted", '"""',
                  "/exit"])
    out = io.StringIO()
    history = chat_loop(base_chat, GenerationOptions(max_new_tokens=2), read=lambda prompt: next(lines), out=out)
    assert [m["content"] for m in history if m["role"] == "user"] == [
        "Which section?\n\nThe match ended 2-1.", "Two lines:\n\n  kept as pasted"]
    assert 'end a line with \\ to go on, or paste them between two """ lines' in out.getvalue().splitlines()[0]


def test_chat_command_through_stdin(folders, base_chat) -> None:
    script = "Hi\n/reset\nCapital of France?\n/exit\n"
    result = subprocess.run([sys.executable, "-m", "torch_singlora.cli", "chat", str(folders / "base"),
                             "--max-new-tokens", "4"], input=script, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    options = GenerationOptions(max_new_tokens=4)
    hi, france = generate(base_chat.model, base_chat.tokenizer, [PROMPTS[0], [
        {"role": "user", "content": "Capital of France?"}]], options)
    assert result.stdout.split(">>> ")[1:] == [f"{hi}\n", "(conversation reset)\n", f"{france}\n", ""]


def test_answer_metrics() -> None:
    assert normalize_answer("  The Business  section! ") == "business section"
    assert answer_metrics(["Business.", "sport"], ["business", "politics"])["exact_match"] == 0.5

    def lcs_f1(prediction: str, reference: str) -> float:  # ROUGE-L written out: LCS over lower-cased words
        p, r = prediction.lower().split(), reference.lower().split()
        table = [[0] * (len(r) + 1) for _ in range(len(p) + 1)]
        for i, a in enumerate(p):
            for j, b in enumerate(r):
                table[i + 1][j + 1] = table[i][j] + 1 if a == b else max(table[i][j + 1], table[i + 1][j])
        lcs = table[-1][-1]
        return 0.0 if lcs == 0 else 2 * lcs / (len(p) + len(r))

    pairs = [("the cat sat on the mat", "the cat on a mat"), ("Markets fall again", "markets rise"), ("x", "y")]
    assert rouge_l(*zip(*pairs)) == pytest.approx([lcs_f1(p, r) for p, r in pairs])


def test_generation_metrics_score_and_sample(base_chat) -> None:
    from torch_singlora.llm.data import to_conversation

    options = GenerationOptions(max_new_tokens=4)
    outputs = generate(base_chat.model, base_chat.tokenizer, [PROMPTS[0], PROMPTS[0]], options)
    conversations = [to_conversation({"prompt": "Hi", "completion": text}, "prompt-completion", f"r{i}")
                     for i, text in enumerate([outputs[0] or "x", "something else entirely"])]
    metrics = generation_metrics(base_chat.model, base_chat.tokenizer, conversations, options=options, samples=1)
    assert metrics["exact_match"] == (0.5 if outputs[0] else 0.0) and metrics["generated"] == 2
    assert metrics["samples"] == [{"prompt": "Hi", "reference": conversations[0].reference, "generated": outputs[0]}]
