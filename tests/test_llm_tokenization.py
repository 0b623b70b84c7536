"""The assistant-only label mask, token by token, on SmolLM2's real tokenizer and ChatML template (which has no
{% generation %} blocks), against two independent references: a ChatML parse of the tokens, and transformers' own
``return_assistant_tokens_mask`` on the same template with generation blocks added."""

from __future__ import annotations

import copy

import pytest
import torch

from torch_singlora import SingLoRAError
from torch_singlora.llm.data import to_conversation
from torch_singlora.llm.generate import prompt_ids
from torch_singlora.llm.tokenization import (IGNORE_INDEX, SFTCollator, render, set_chat_template,
                                             tokenize_conversation, tokenize_conversations)

CHAT = [{"role": "user", "content": "Capital of France?"}, {"role": "assistant", "content": "Paris.\n"},
        {"role": "user", "content": "And of Italy? Answer in two words."},
        {"role": "assistant", "content": " It's Rome"}]
SYSTEM = [{"role": "system", "content": "You answer in one word."}]
# SmolLM2's template with the assistant's content and end-of-turn inside {% generation %} blocks (same text).
GENERATION_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\n"
    "You are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}"
    "{% if message['role'] == 'assistant' %}{{ '<|im_start|>assistant\n' }}{% generation %}"
    "{{ message['content'] + '<|im_end|>' }}{% endgeneration %}{{ '\n' }}"
    "{% else %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


@pytest.fixture
def tokenizer(smollm2_tokenizer):
    return copy.deepcopy(smollm2_tokenizer)  # tests change the template


def chatml_reference(tokenizer, ids: list[int]) -> list[bool]:
    """Which tokens are the assistant's, by reading ChatML: after '<|im_start|>' the role runs to a newline; in an
    assistant turn, everything after that newline up to and including '<|im_end|>' is the answer."""
    trained, role, in_header, in_answer = [], "", False, False
    for token in tokenizer.convert_ids_to_tokens(ids):
        text = tokenizer.convert_tokens_to_string([token])
        if token == "<|im_start|>":
            in_header, role = True, ""
            trained.append(False)
        elif in_header:
            role += text
            in_header = "\n" not in text
            in_answer = not in_header and role.strip() == "assistant"
            trained.append(False)
        else:
            trained.append(in_answer)
            if token == "<|im_end|>":
                in_answer = False
    return trained


def _mask(labels: list[int]) -> list[bool]:
    return [label != IGNORE_INDEX for label in labels]


@pytest.mark.parametrize("messages", [CHAT, SYSTEM + CHAT, CHAT[:2]])
def test_mask_matches_chatml_token_by_token(tokenizer, messages) -> None:
    conversation = to_conversation({"messages": messages}, "messages", "row 1")
    ids, labels = tokenize_conversation(tokenizer, conversation)
    assert ids == tokenizer(render(tokenizer, messages), add_special_tokens=False)["input_ids"]
    assert _mask(labels) == chatml_reference(tokenizer, ids)
    assert [t for t in labels if t != IGNORE_INDEX] == [i for i, m in zip(ids, _mask(labels)) if m]
    answers = [tokenizer.decode([i for i, m in zip(ids, _mask(labels)) if m])]
    expected = "".join(m["content"] + "<|im_end|>" for m in messages if m["role"] == "assistant")
    assert answers == [expected]  # exactly the answers and their end-of-turn token: no newline, no header


def test_mask_equals_transformers_generation_block_mask(tokenizer) -> None:
    messages = SYSTEM + CHAT
    ours = tokenize_conversation(tokenizer, to_conversation({"messages": messages}, "messages", "r"))
    tokenizer.chat_template = GENERATION_TEMPLATE
    assert render(tokenizer, messages) == render(copy.deepcopy(tokenizer), messages)
    reference = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True,
                                              return_assistant_tokens_mask=True)
    assert ours[0] == list(reference["input_ids"])
    assert _mask(ours[1]) == [bool(m) for m in reference["assistant_masks"]]
    # and the same mask when the generation-block template itself is used (rendering text is identical)
    again = tokenize_conversation(tokenizer, to_conversation({"messages": messages}, "messages", "r"))
    assert again == ours


def test_completion_only_and_whole_text(tokenizer) -> None:
    row = {"prompt": CHAT[:3], "completion": CHAT[3:]}
    conversation = to_conversation(row, "prompt-completion", "r")
    ids, labels = tokenize_conversation(tokenizer, conversation)
    trained = tokenizer.decode([t for t in labels if t != IGNORE_INDEX])
    assert trained == " It's Rome<|im_end|>"  # the completion only, not the prompt's earlier answer
    whole_ids, whole = tokenize_conversation(tokenizer, conversation, assistant_only_loss=False)
    assert whole_ids == ids and whole == ids


def test_no_doubled_special_tokens_and_prompt_is_a_prefix(tokenizer) -> None:
    conversation = to_conversation({"messages": CHAT}, "messages", "r")
    ids, labels = tokenize_conversation(tokenizer, conversation)
    start, end = tokenizer.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"])
    assert ids[0] == start and ids[1] != start  # the template's BOS once; the tokenizer adds none
    assert ids.count(start) == ids.count(end) == 5  # default system + 4 messages, each opened and closed once
    assert ids[-2:] == [end, tokenizer.convert_tokens_to_ids("Ċ")]  # no extra EOS after the template's last turn
    # generation continues exactly where training puts the answer
    prompt = prompt_ids(tokenizer, conversation.prompt)
    assert ids[: len(prompt)] == prompt
    assert _mask(labels).index(True, len(prompt) - 4) == len(prompt)


def test_special_tokens_in_text_are_refused(tokenizer) -> None:
    for content in ("Paris<|im_end|>", "<|im_start|>assistant\nhi"):
        conversation = to_conversation({"prompt": "q", "completion": content}, "prompt-completion", "data.jsonl line 4")
        with pytest.raises(SingLoRAError, match=r"data.jsonl line 4: message 2 contains the special token"):
            tokenize_conversations(tokenizer, [conversation], max_length=None)


def test_truncation_counts_and_drops(tokenizer) -> None:
    short = to_conversation({"prompt": "Hi", "completion": "Hello"}, "prompt-completion", "r1")
    long_answer = to_conversation({"prompt": "Hi", "completion": "word " * 50}, "prompt-completion", "r2")
    long_prompt = to_conversation({"prompt": "word " * 50, "completion": "ok"}, "prompt-completion", "r3")
    full = {c.where: tokenize_conversation(tokenizer, c) for c in (short, long_answer, long_prompt)}
    limit = len(full["r1"][0]) + 5
    dataset = tokenize_conversations(tokenizer, [short, long_answer, long_prompt], max_length=limit)
    assert (len(dataset), dataset.truncated, dataset.dropped) == (2, 2, 1)
    assert [c.where for c in dataset.conversations] == ["r1", "r2"]
    assert dataset.input_ids[1] == full["r2"][0][:limit] and dataset.labels[1] == full["r2"][1][:limit]
    assert dataset.answer_tokens == sum(t != IGNORE_INDEX for labels in dataset.labels for t in labels)
    assert "2 truncated to" in dataset.describe("train") and "1 of them dropped" in dataset.describe("train")
    with pytest.raises(SingLoRAError, match="no example keeps an answer token within --max-length=4"):
        tokenize_conversations(tokenizer, [short], max_length=4)


def test_chat_template_file_missing_template_and_prefix_unsafe_templates(tokenizer, tmp_path) -> None:
    conversation = to_conversation({"messages": CHAT}, "messages", "data.jsonl line 2")
    path = tmp_path / "plain.jinja"
    path.write_text("{% for m in messages %}### {{ m['role'] }}: {{ m['content'] }}{% if m['role'] == 'assistant' %}"
                    "{{ eos_token }}{% endif %}{{ '\\n' }}{% endfor %}"
                    "{% if add_generation_prompt %}### assistant: {% endif %}")
    assert set_chat_template(tokenizer, path) == path.read_text()
    ids, labels = tokenize_conversation(tokenizer, conversation)
    assert tokenizer.decode(ids).startswith("### user: Capital of France?\n### assistant: Paris.")
    # " Paris" is one token holding the template's space: a token overlapping the answer is trained
    assert tokenizer.decode([t for t in labels if t != IGNORE_INDEX]) == " Paris.\n<|im_end|> It's Rome<|im_end|>"

    tokenizer.chat_template = "{{ messages | length }}" + GENERATION_TEMPLATE  # rewrites the start of every prefix
    with pytest.raises(SingLoRAError, match=r"data.jsonl line 2: the chat template renders message 2's prefix"):
        tokenize_conversation(tokenizer, conversation)
    assert tokenize_conversation(tokenizer, conversation, assistant_only_loss=False)[1]  # whole text still works

    tokenizer.chat_template = None
    with pytest.raises(SingLoRAError, match="has no chat template: give one with --chat-template FILE"):
        set_chat_template(tokenizer)
    with pytest.raises(SingLoRAError, match="no such file"):
        set_chat_template(tokenizer, tmp_path / "missing.jinja")
    tokenizer.chat_template = "{{ raise_exception('roles must alternate') }}"
    with pytest.raises(SingLoRAError, match="data.jsonl line 2: the chat template fails: .*roles must alternate"):
        tokenize_conversation(tokenizer, conversation)


def test_collator_pads_right_with_ignored_labels() -> None:
    batch = SFTCollator(pad_id=2)([{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]},
                                   {"input_ids": [8], "labels": [8]}])
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 2, 2]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["input_ids"].dtype == torch.long


def test_a_chat_template_file_that_is_not_utf8_is_named(tmp_path) -> None:
    """`--chat-template` is read once, by the one reader that names the flag (a copy without the UTF-8 check
    read it first and gave a traceback)."""
    from torch_singlora import SingLoRAError
    from torch_singlora.llm.task import SFT, SFTOptions

    bad = tmp_path / "template.jinja"
    bad.write_bytes(b"\xff\xfe{{ messages }}")
    with pytest.raises(SingLoRAError, match="--chat-template .*not UTF-8 text"):
        SFT()._info(SFTOptions(chat_template=str(bad)), 128)
    good = tmp_path / "good.jinja"
    good.write_text("{% for m in messages %}{{ m['content'] }}{% endfor %}")
    assert SFT()._info(SFTOptions(chat_template=str(good)), 128)["chat_template"] == good.read_text()
