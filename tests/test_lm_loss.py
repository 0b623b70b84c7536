"""The loss only where it counts (``train.lm_loss``): on a tiny Llama in float64 the loss and the adapter's
gradients equal the loss written out in the test from the full (B, T, V) logits (1e-6 asked, 1e-10 met); on the real
SmolLM2 in float32 they equal transformers' own ``model(**batch).loss``; only the trained positions reach the
output layer; the causal-LM task trains and evaluates with it."""

from __future__ import annotations

import pytest
import torch

from conftest import assert_close, tiny_singlora_llama
from torch_singlora import SingLoRAConfig, get_singlora_model
from torch_singlora.train.lm_loss import IGNORE_INDEX, lm_loss, lm_loss_sum, token_logprobs

transformers = pytest.importorskip("transformers")


def padded_batch(vocab: int = 97) -> dict[str, torch.Tensor]:
    """Three right-padded rows (lengths 9, 6, 4) with answer spans (labels) in different places."""
    torch.manual_seed(1)
    lengths, answers = [9, 6, 4], [(5, 9), (2, 4), (1, 4)]
    ids = torch.zeros(3, 9, dtype=torch.long)
    mask = torch.zeros(3, 9, dtype=torch.long)
    labels = torch.full((3, 9), IGNORE_INDEX)
    for row, (n, (a, b)) in enumerate(zip(lengths, answers)):
        ids[row, :n] = torch.randint(1, vocab, (n,))
        mask[row, :n] = 1
        labels[row, a:b] = ids[row, a:b]
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def reference_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean over the trained tokens of -log p(label_t | tokens < t), from the full logits, written out."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    logp = torch.log_softmax(logits.double(), dim=-1)
    terms = []
    for row in range(batch["input_ids"].shape[0]):
        for t in range(1, batch["input_ids"].shape[1]):
            label = int(batch["labels"][row, t])
            if label != IGNORE_INDEX:
                terms.append(-logp[row, t - 1, label])
    return torch.stack(terms).mean()


def adapter_grads(model: torch.nn.Module, loss: torch.Tensor) -> dict[str, torch.Tensor]:
    named = {n: p for n, p in model.named_parameters() if p.requires_grad}
    return dict(zip(named, torch.autograd.grad(loss, list(named.values()))))


def test_loss_and_gradients_equal_the_full_computation_in_float64() -> None:
    model, batch = tiny_singlora_llama(torch.float64), padded_batch()
    expected = reference_loss(model, batch)
    actual = lm_loss(model, batch)
    assert actual.dtype == torch.float64
    assert_close(actual, expected)
    reference, ours = adapter_grads(model, expected), adapter_grads(model, actual)
    assert len(ours) == 7 * 2  # A of q k v o gate up down, 2 layers
    for name in reference:
        assert_close(ours[name], reference[name])


def test_only_trained_positions_reach_the_output_layer() -> None:
    model, batch = tiny_singlora_llama(torch.float64), padded_batch()
    rows = []
    hook = model.get_output_embeddings().register_forward_hook(lambda m, args, out: rows.append(args[0].shape))
    try:
        total, count = lm_loss_sum(model, batch)
    finally:
        hook.remove()
    trained = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
    assert count == trained == 4 + 2 + 3
    assert rows == [torch.Size([trained, 16])]  # (N, hidden), not (B, T, hidden)
    logprobs, example = token_logprobs(model, batch)
    assert example.tolist() == [0] * 4 + [1] * 2 + [2] * 3
    assert_close(-logprobs.sum(), total)


def test_model_without_logits_to_keep_gets_the_same_loss() -> None:
    """A causal LM whose forward takes no ``logits_to_keep`` (an older or custom model): every position is
    projected, the same rows are selected after."""
    from torch_singlora.train.lm_loss import takes_logits_to_keep

    model, batch = tiny_singlora_llama(torch.float64), padded_batch()

    class Plain(torch.nn.Module):
        def __init__(self, inner: torch.nn.Module) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, input_ids, attention_mask=None, position_ids=None, use_cache=None):
            return self.inner(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                              use_cache=use_cache)

    class Old(transformers.LlamaForCausalLM):  # the outermost transformers model decides
        def forward(self, input_ids=None, attention_mask=None, position_ids=None, use_cache=None):
            return super().forward(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                   use_cache=use_cache)

    old = Old(model.model.config).double()
    assert takes_logits_to_keep(model) and not takes_logits_to_keep(Plain(old))
    assert_close(lm_loss(Plain(old), batch), reference_loss(old, batch))


CHATS = [
    [{"role": "user", "content": "Which section of BBC News is this article from? Chelsea won the league."},
     {"role": "assistant", "content": "sports"}],
    [{"role": "system", "content": "Answer briefly."},
     {"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Blue, like the sea."},
     {"role": "user", "content": "Another one?"}, {"role": "assistant", "content": "Green."}],
]


def test_smollm2_loss_and_gradients_equal_transformers_loss_in_float32(smollm2_tokenizer) -> None:
    """The real SmolLM2-135M-Instruct (tied 49,152-word output layer, GQA), two chat examples of different lengths
    through the sft tokenization and padding collator: loss and adapter gradients equal transformers' loss."""
    from torch_singlora.assets import smollm2_path
    from torch_singlora.llm.data import to_conversation
    from torch_singlora.llm.tokenization import SFTCollator, tokenize_conversations

    conversations = [to_conversation({"messages": m}, "messages", f"row {i}") for i, m in enumerate(CHATS)]
    dataset = tokenize_conversations(smollm2_tokenizer, conversations, max_length=None)
    batch = SFTCollator(smollm2_tokenizer.pad_token_id)([dataset[0], dataset[1]])
    base = transformers.AutoModelForCausalLM.from_pretrained(smollm2_path(), dtype=torch.float32)
    model = get_singlora_model(base, SingLoRAConfig(r=4, target_modules=["q_proj", "down_proj"], ramp_up_steps=0))
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.requires_grad:
                parameter.normal_(0, 0.02)
    expected = model(**batch).loss
    actual = lm_loss(model, batch)
    torch.testing.assert_close(actual, expected, rtol=1e-6, atol=1e-6)
    reference, ours = adapter_grads(model, expected), adapter_grads(model, actual)
    for name in reference:
        assert_close(ours[name], reference[name])


def saved_bytes(model: torch.nn.Module, function) -> tuple[int, object]:
    """Bytes of the distinct storages (not ``model``'s weights) that autograd saves for backward while
    ``function()`` runs: the activations a training step holds between forward and backward; and its result."""
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in weights:
            storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        result = function()
    return sum(storages.values()), result


def test_gradient_checkpointing_on_the_sft_path(tmp_path, smollm2_tokenizer) -> None:
    """``singlora train --task sft --gradient-checkpointing`` builds its model with checkpointed layers: the loss
    and every adapter gradient are those of the plain model, for a fraction of the activations kept."""
    from conftest import save_tiny_chat_llama
    from torch_singlora.llm.data import to_conversation
    from torch_singlora.llm.tokenization import tokenize_conversations
    from torch_singlora.train.config import TrainConfig
    from torch_singlora.train.loop import make_method
    from torch_singlora.train.registry import get_task
    from torch_singlora.train.tasks import TaskData

    save_tiny_chat_llama(tmp_path, smollm2_tokenizer, num_hidden_layers=6, hidden_size=64, intermediate_size=256)
    conversations = [to_conversation({"messages": m}, "messages", f"row {i}") for i, m in enumerate(CHATS)]
    dataset = tokenize_conversations(smollm2_tokenizer, conversations, max_length=None)
    task = get_task("sft")
    batch = task.collator(smollm2_tokenizer, {})([dataset[0], dataset[1]])
    results = {}
    for checkpointing in (False, True):
        config = TrainConfig(model=str(tmp_path), task="sft", target_modules="all-linear", ramp_up_steps=0,
                             gradient_checkpointing=checkpointing)
        torch.manual_seed(0)
        method = make_method(config, task, TaskData(None, None, {}), smollm2_tokenizer, total_steps=10)
        method.model.train()
        kept, (loss, _) = saved_bytes(method.model, lambda: task.loss(method.model, batch, {}))
        results[checkpointing] = kept, loss, adapter_grads(method.model, loss)
    (plain_kept, plain_loss, plain_grads), (kept, loss, checkpointed_grads) = results[False], results[True]
    assert kept < plain_kept / 2, (kept, plain_kept)
    torch.testing.assert_close(loss, plain_loss, rtol=0, atol=0)
    assert plain_grads.keys() == checkpointed_grads.keys() and len(plain_grads) == 7 * 6
    for name, grad in plain_grads.items():
        assert grad.abs().sum() > 0
        torch.testing.assert_close(checkpointed_grads[name], grad, rtol=1e-6, atol=1e-7)


def test_peft_lora_model_gets_the_same_loss_and_gradients() -> None:
    """Under PEFT's wrapper (``--method lora``) the selection reaches the transformers model inside."""
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=97, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                      num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True)
    model = peft.get_peft_model(transformers.LlamaForCausalLM(config).double(),
                                peft.LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
    rows = []
    hook = model.get_output_embeddings().register_forward_hook(lambda m, args, out: rows.append(args[0].shape[0]))
    batch = padded_batch()
    actual, expected = lm_loss(model, batch), reference_loss(model, batch)
    hook.remove()
    assert rows[0] == 9  # the trained positions only, then the reference's full 3 x 9
    assert_close(actual, expected)
    for ours, reference in zip(adapter_grads(model, actual).values(), adapter_grads(model, expected).values()):
        assert_close(ours, reference)
