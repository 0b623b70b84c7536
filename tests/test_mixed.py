"""Mixed-adapter batches (``model(x, adapter_names=[...])``, ``torch_singlora.mixed``): every example of a mixed
batch equals that example run alone with its adapter, for every layer kind, ``modules_to_save``, different ranks,
padded batches and generation; the batched kernels against a dense float64 reference; bad calls refused."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_close, dense_update
from torch import nn

from mixed_models import LLAMA_TARGETS, NAMES, EveryKind, add_three_adapters, left_padded, run_alone, tiny_llama
from torch_singlora import SingLoRAConfig, SingLoRAError, get_singlora_model
from torch_singlora.functional import mixed_conv_update, mixed_embedding_update, mixed_factored_update
from torch_singlora.mixed import rows_for, stack_pool


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


def scattered_pool(As: list[torch.Tensor], n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A pool holding each ``A_k.T`` in rows placed out of order among unused rows (as a bank's pool is after
    loads and unloads), and each adapter's ``(W,)`` rows padded with the zero row 0 to ``W = 3``."""
    pool = torch.zeros(1 + 2 * sum(A.shape[1] for A in As), n, dtype=torch.float64)
    free = torch.randperm(pool.shape[0] - 1)[: sum(A.shape[1] for A in As)] + 1
    rows, start = [torch.zeros(3, dtype=torch.long)], 0
    for A in As:
        mine = free[start : start + A.shape[1]]
        pool[mine] = A.T
        rows.append(torch.cat([mine, torch.zeros(3 - len(mine), dtype=torch.long)]))
        start += len(mine)
    pool[0] = 0
    return pool, torch.stack(rows)


@pytest.mark.parametrize("d_out,d_in", [(6, 6), (9, 4), (4, 9)])
def test_mixed_kernels_match_dense_float64(d_out: int, d_in: int) -> None:
    """Each example: x @ (W0 + c_k * A_k[:d_out] A_k[:d_in]^T).T from the definition, ranks 1..3 in one pool whose
    rows lie scattered (a bank's pool after loads and unloads)."""
    n = max(d_out, d_in)
    As = [torch.randn(n, r, dtype=torch.float64) for r in (1, 3, 2)]
    cs = torch.tensor([0.0, 0.5, 2.0, 1.5], dtype=torch.float64)
    pool, adapter_rows = scattered_pool(As, n)
    index = torch.tensor([1, 0, 3, 2, 1])  # 0: no adapter (the zero row, c = 0)
    rows, coefficients = adapter_rows[index], cs[index]
    x = torch.randn(5, 2, d_in, dtype=torch.float64)
    out = mixed_factored_update(x, pool, rows, coefficients, d_out, d_in)
    for b, k in enumerate(index.tolist()):
        expected = torch.zeros(2, d_out, dtype=torch.float64) if k == 0 else \
            x[b] @ dense_update(As[k - 1], d_out, d_in, float(cs[k])).T
        assert_close(out[b], expected)
    in_place = torch.ones(5, 2, d_out, dtype=torch.float64)
    assert mixed_factored_update(x, pool, rows, coefficients, d_out, d_in, out=in_place) is in_place
    assert_close(in_place, out + 1)
    ids = torch.randint(0, d_out, (5, 3))  # an embedding of d_out rows of dimension d_in
    emb = mixed_embedding_update(ids, pool, rows, coefficients, d_out, d_in)
    for b, k in enumerate(index.tolist()):
        table = torch.zeros(d_out, d_in, dtype=torch.float64) if k == 0 else \
            dense_update(As[k - 1], d_out, d_in, float(cs[k]))
        assert_close(emb[b], table[ids[b]])


def test_mixed_conv_kernel_matches_dense_float64() -> None:
    conv = nn.Conv2d(2, 3, 2, padding=1, padding_mode="circular").double()
    n = max(3, 2 * 2 * 2)
    As = [torch.randn(n, r, dtype=torch.float64) for r in (2, 1)]
    pool, adapter_rows = scattered_pool(As, n)
    index = torch.tensor([2, 0, 1])
    out = mixed_conv_update(x := torch.randn(3, 2, 4, 5, dtype=torch.float64), pool, adapter_rows[index],
                            torch.tensor([0.7, 0.0, 0.7], dtype=torch.float64), conv)
    for b, k in enumerate(index.tolist()):
        delta = torch.zeros(3, 8, dtype=torch.float64) if k == 0 else dense_update(As[k - 1], 3, 8, 0.7)
        expected = conv._conv_forward(x[b : b + 1], delta.reshape(3, 2, 2, 2), None)[0]
        assert_close(out[b], expected)


def test_stacked_pool_lists_each_adapter_padded_to_the_highest_rank() -> None:
    As = [torch.randn(5, r, dtype=torch.float64) for r in (2, 3)]
    pool, coefficients = stack_pool(As, [torch.tensor(0.5), torch.tensor(2.0)])
    rows = rows_for(torch.tensor([2, 0, 1]), 3)
    assert pool.shape == (7, 5) and pool[0].abs().sum() == 0 and coefficients.tolist() == [0.0, 0.5, 2.0]
    assert torch.equal(pool[rows[0]], As[1].T) and pool[rows[1]].abs().sum() == 0
    assert torch.equal(pool[rows[2]], torch.cat([As[0].T, torch.zeros(1, 5, dtype=torch.float64)]))


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
    with torch.no_grad():  # still works, and no selection was left active
        assert_close(model(ids, adapter_names=["a", "b"])[:1], run_alone(model, "a", ids[:1]), dtype=torch.float32)
    selection = model.model.up.selection
    assert not selection.active and all(m.selection is selection for m in model.modules() if hasattr(m, "selection"))


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
