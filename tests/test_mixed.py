"""Mixed-adapter batches (``model(x, adapter_names=[...])``, ``torch_singlora.mixed``): every example of a mixed
batch equals that example run alone with its adapter, for every layer kind, ``modules_to_save``, different ranks,
padded batches and generation; the batched kernels against a dense float64 reference; bad calls refused."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_close, dense_update
from helpers import NAMES, EveryKind, add_three_adapters, run_alone, tiny_llama
from torch import nn

from torch_singlora import SingLoRAConfig, SingLoRAError, get_singlora_model
from torch_singlora.functional import mixed_conv_update, mixed_embedding_update, mixed_factored_update
from torch_singlora.mixed import stack_bank

def test_every_layer_kind_and_saved_module_match_each_example_alone() -> None:
    model = add_three_adapters(EveryKind(), ["emb", "conv1", "conv2", "up", "down"], ["head"])
    ids = torch.randint(0, 30, (len(NAMES), 7))
    with torch.no_grad():
        mixed = model(ids, adapter_names=NAMES)
        alone = [run_alone(model, name, ids[i : i + 1])[0] for i, name in enumerate(NAMES)]
        base = run_alone(model, "__base__", ids)
    for i, name in enumerate(NAMES):
        assert_close(mixed[i], alone[i], dtype=torch.float32)
        if name != "__base__":  # the adapter does change this example's output
            assert (mixed[i] - base[i]).abs().max() > 1e-2


def test_transformers_conv1d_and_gradients_flow_through_the_mixed_path() -> None:
    from transformers.pytorch_utils import Conv1D

    model = add_three_adapters(nn.Sequential(Conv1D(9, 4), nn.Tanh(), Conv1D(3, 9)), ["0", "2"])
    x = torch.randn(len(NAMES), 5, 4)
    model.set_adapter(["a", "b", "c"])  # all require grad
    mixed = model(x, adapter_names=NAMES)
    mixed.square().sum().backward()  # eval mode, but autograd still works (e.g. attributions)
    assert all(a.A.grad.abs().sum() > 0 for a in model.model[0].singlora.values())
    with torch.no_grad():
        for i, name in enumerate(NAMES):
            assert_close(mixed[i], run_alone(model, name, x[i : i + 1])[0], dtype=torch.float32)


@pytest.mark.parametrize("d_out,d_in", [(6, 6), (9, 4), (4, 9)])
def test_mixed_kernels_match_dense_float64(d_out: int, d_in: int) -> None:
    """Each example: x @ (W0 + c_k * A_k[:d_out] A_k[:d_in]^T).T from the definition, ranks 1..3 in one bank."""
    n = max(d_out, d_in)
    As = [torch.randn(n, r, dtype=torch.float64) for r in (1, 3, 2)]
    cs = [torch.tensor(c, dtype=torch.float64) for c in (0.5, 2.0, 1.5)]
    bank, coefficients = stack_bank(As, cs)
    assert bank.shape == (4, 3, n) and bank[0].abs().sum() == 0
    index = torch.tensor([1, 0, 3, 2, 1])
    x = torch.randn(5, 2, d_in, dtype=torch.float64)
    out = mixed_factored_update(x, bank, coefficients, index, d_out, d_in)
    for b, k in enumerate(index.tolist()):
        expected = torch.zeros(2, d_out, dtype=torch.float64) if k == 0 else \
            x[b] @ dense_update(As[k - 1], d_out, d_in, float(cs[k - 1])).T
        assert_close(out[b], expected)
    ids = torch.randint(0, d_out, (5, 3))  # an embedding of d_out rows of dimension d_in
    emb = mixed_embedding_update(ids, bank, coefficients, index, d_out, d_in)
    for b, k in enumerate(index.tolist()):
        table = torch.zeros(d_out, d_in, dtype=torch.float64) if k == 0 else \
            dense_update(As[k - 1], d_out, d_in, float(cs[k - 1]))
        assert_close(emb[b], table[ids[b]])


def test_mixed_conv_kernel_matches_dense_float64() -> None:
    conv = nn.Conv2d(2, 3, 2, padding=1, padding_mode="circular").double()
    n = max(3, 2 * 2 * 2)
    As = [torch.randn(n, r, dtype=torch.float64) for r in (2, 1)]
    bank, coefficients = stack_bank(As, [torch.tensor(0.7, dtype=torch.float64)] * 2)
    index = torch.tensor([2, 0, 1])
    x = torch.randn(3, 2, 4, 5, dtype=torch.float64)
    out = mixed_conv_update(x, bank, coefficients, index, conv)
    for b, k in enumerate(index.tolist()):
        delta = torch.zeros(3, 8, dtype=torch.float64) if k == 0 else dense_update(As[k - 1], 3, 8, 0.7)
        expected = conv._conv_forward(x[b : b + 1], delta.reshape(3, 2, 2, 2), None)[0]
        assert_close(out[b], expected)


LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "down_proj", "embed_tokens"]


def left_padded(prompts: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(map(len, prompts))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    return ids, (ids != 0).long()


def test_padded_llama_batch_logits_match_each_prompt_alone() -> None:
    model = add_three_adapters(tiny_llama(), LLAMA_TARGETS)
    prompts = [[5, 6, 7, 8, 9], [10, 11], [12, 13, 14], [15], [16, 17, 18, 19], [20, 21, 22]]
    ids, mask = left_padded(prompts)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask, adapter_names=NAMES).logits
        for i, (prompt, name) in enumerate(zip(prompts, NAMES)):
            alone = run_alone(model, name, input_ids=torch.tensor([prompt])).logits[0]
            assert_close(logits[i, -len(prompt):], alone, dtype=torch.float32)


def test_generate_with_adapter_names_matches_each_prompt_alone_greedy_and_beams() -> None:
    model = add_three_adapters(tiny_llama(), LLAMA_TARGETS)
    prompts = [[5, 6, 7], [10, 11], [12, 13, 14], [15], [16, 17, 18], [20, 21]]
    ids, mask = left_padded(prompts)
    options = dict(max_new_tokens=6, do_sample=False, pad_token_id=0, eos_token_id=None)
    with torch.no_grad():
        mixed = model.generate(input_ids=ids, attention_mask=mask, adapter_names=NAMES, **options)
        beams = model.generate(input_ids=ids, attention_mask=mask, adapter_names=NAMES, num_beams=2, **options)
        distinct = set()
        for i, (prompt, name) in enumerate(zip(prompts, NAMES)):
            alone = run_alone(model, name, input_ids=torch.tensor([prompt]), generate=True, **options)
            assert mixed[i, ids.shape[1]:].tolist() == alone[0, len(prompt):].tolist()
            alone_beams = run_alone(model, name, input_ids=torch.tensor([prompt]), generate=True, num_beams=2,
                                    **options)
            assert beams[i, ids.shape[1]:].tolist() == alone_beams[0, len(prompt):].tolist()
            distinct.add(tuple(alone[0, len(prompt):].tolist()))
        assert len(distinct) > 3  # the adapters generate different continuations


def test_refusals_name_the_problem_and_leave_the_model_usable() -> None:
    model = add_three_adapters(EveryKind(), ["emb", "up"], ["head"])
    ids = torch.randint(0, 30, (2, 7))
    with pytest.raises(SingLoRAError, match="unknown adapter.*'zed'"):
        model(ids, adapter_names=["a", "zed"])
    with pytest.raises(SingLoRAError, match="one adapter name per example"):
        model(ids, adapter_names="a")
    with pytest.raises(SingLoRAError, match="does not split into the 3 examples"):
        model(ids, adapter_names=["a", "b", "a"])
    model.train()
    with pytest.raises(SingLoRAError, match="model.eval"):
        model(ids, adapter_names=["a", "b"])
    model.eval()
    with model.disable_adapters(), pytest.raises(SingLoRAError, match="disable_adapters"):
        model(ids, adapter_names=["a", "b"])
    model.set_adapter("a")
    model.merge()
    with pytest.raises(SingLoRAError, match="merged"):
        model(ids, adapter_names=["a", "b"])
    model.unmerge()
    with torch.no_grad():  # still works, and no selection was left behind
        assert_close(model(ids, adapter_names=["a", "a"]), run_alone(model, "a", ids), dtype=torch.float32)
    assert all(layer.selection is None for _, layer in model.singlora_layers())


def test_inference_adds_updates_in_place_with_the_same_values(monkeypatch) -> None:
    """Unmerged inference accumulates Linear / Conv1D updates into the base output (``IN_PLACE_INFERENCE``): the
    same values as the out-of-place sum, single adapter and mixed batch; with gradients it stays out of place."""
    from torch_singlora import layers

    calls = []
    real = layers.add_factored_update_
    monkeypatch.setattr(layers, "add_factored_update_", lambda *a, **k: calls.append(1) or real(*a, **k))
    model = add_three_adapters(tiny_llama(), LLAMA_TARGETS)
    ids, mask = left_padded([[5, 6, 7, 8], [9, 10], [11, 12, 13]])
    model.set_adapter("b")
    outputs = {}
    for in_place in (True, False):
        monkeypatch.setattr(layers, "IN_PLACE_INFERENCE", in_place)
        with torch.no_grad():
            outputs[in_place] = (model(input_ids=ids, attention_mask=mask).logits,
                                 model(input_ids=ids, attention_mask=mask, adapter_names=NAMES[:3]).logits)
    assert len(calls) == 6  # b adapts q, v and down_proj (and the embedding) in 2 layers: 6 in-place adds
    assert_close(outputs[True][0], outputs[False][0], dtype=torch.float32)
    assert_close(outputs[True][1], outputs[False][1], dtype=torch.float32)
    monkeypatch.setattr(layers, "IN_PLACE_INFERENCE", True)
    with_grad = model(input_ids=ids, attention_mask=mask).logits
    assert len(calls) == 6 and with_grad.requires_grad
    assert_close(with_grad.detach(), outputs[False][0], dtype=torch.float32)


def test_in_place_inference_follows_the_ramp_and_the_config(monkeypatch) -> None:
    """The in-place path reads ``c = s * u`` as a number, refreshed whenever the step, T or s changes."""
    layer = nn.Linear(6, 6)
    model = get_singlora_model(nn.Sequential(layer), SingLoRAConfig(r=2, target_modules=["0"], ramp_up_steps=10,
                                                                   init="gaussian", init_std=0.5)).eval()
    x = torch.randn(3, 6)
    adapter = model.model[0].singlora["default"]
    A, s = adapter.A.detach(), adapter.scale
    for step in (5, 10, 2):
        model.set_ramp_step(step)
        with torch.no_grad():
            out = model(x)
        expected = x.double() @ (layer.weight.double() + dense_update(A, 6, 6, s * min(step / 10, 1.0))).T
        assert_close(out, expected + layer.bias.double(), dtype=torch.float32)
    adapter.scale = 3.0  # e.g. a config replaced in place
    with torch.no_grad():
        out = model(x)
    assert_close(out, x.double() @ (layer.weight.double() + dense_update(A, 6, 6, 0.6)).T + layer.bias.double(),
                 dtype=torch.float32)
