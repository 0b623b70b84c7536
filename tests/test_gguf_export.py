"""GGUF LoRA export for llama.cpp: the file read back with gguf's own reader matches the SingLoRA update computed
here from ``A`` (dense float64), with llama.cpp's tensor names, orientation, q/k row order and alpha scaling.

The end-to-end check with llama.cpp itself (logits of the base GGUF + our adapter against transformers) is
``scripts/llama_cpp_check.py``; its committed output is ``docs/llama_cpp_check.md``.
"""

from __future__ import annotations

import pytest
import torch

from conftest import dense_update, expected_coefficient
from torch_singlora import SingLoRAConfig, SingLoRAError, get_singlora_model
from torch_singlora.export import export_lora

gguf = pytest.importorskip("gguf")
transformers = pytest.importorskip("transformers")

# transformers module suffix -> llama.cpp tensor, written out here (not taken from gguf's TensorNameMap)
LLAMA_NAMES = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
               "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
               "mlp.down_proj": "ffn_down"}
HEADS, KV_HEADS, HEAD_DIM = 4, 2, 8


def _interleave(rows: torch.Tensor, n_head: int) -> torch.Tensor:
    """llama.cpp's q/k row order, written out: in each head, row 2i is HF row i and row 2i+1 is HF row i + h/2."""
    head = rows.shape[0] // n_head
    order = [h * head + i + half * head // 2 for h in range(n_head) for i in range(head // 2) for half in (0, 1)]
    return rows[order]


def _tiny_llama(**config):
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=64, hidden_size=HEADS * HEAD_DIM, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, **config))


def _adapted(**overrides):
    fields = dict(r=4, alpha=6.0, target_modules="all-linear", ramp_up_steps=10,
                  rank_pattern={"model.layers.1.mlp.up_proj": 2})
    fields.update(overrides)
    model = get_singlora_model(_tiny_llama(), SingLoRAConfig(**fields))
    with torch.no_grad():
        for _, layer in model.singlora_layers():
            layer.singlora["default"].A.normal_(0, 0.5)
    model.set_ramp_step(5)  # u = 0.5: the ramp must be folded in
    return model


def _read(path):
    reader = gguf.GGUFReader(path)
    fields = {name: field.contents() for name, field in reader.fields.items()}
    tensors = {t.name: t for t in reader.tensors}
    return fields, tensors


def _values(tensor) -> torch.Tensor:
    """A tensor of the file as float64, numpy order (the reverse of ggml's ne order)."""
    return torch.from_numpy(gguf.quants.dequantize(tensor.data, tensor.tensor_type).copy()).double()


def test_gguf_file_matches_dense_reference(tmp_path) -> None:
    model = _adapted()
    path = export_lora(model, tmp_path, format="gguf")
    assert path == tmp_path / "adapter_model.gguf"
    fields, tensors = _read(path)
    assert fields["general.architecture"] == "llama"
    assert fields["general.type"] == "adapter"
    assert fields["adapter.type"] == "lora"
    alpha = fields["adapter.lora.alpha"]
    assert alpha == 4.0  # the most common rank
    expected_names = set()
    for name, layer in model.singlora_layers():
        _, _, block, suffix = name.split(".", 3)
        base = f"blk.{block}.{LLAMA_NAMES[suffix]}.weight"
        expected_names |= {base + ".lora_a", base + ".lora_b"}
        A = layer.singlora["default"].A.detach()
        r = A.shape[1]
        lora_a, lora_b = tensors[base + ".lora_a"], tensors[base + ".lora_b"]
        assert lora_a.tensor_type == lora_b.tensor_type == gguf.GGMLQuantizationType.F32
        # ggml ne order: lora_a [d_in, r], lora_b [r, d_out] (what llama-adapter.cpp checks against the base)
        assert list(lora_a.shape) == [layer.d_in, r] and list(lora_b.shape) == [r, layer.d_out]
        expected = dense_update(A, layer.d_out, layer.d_in, expected_coefficient(r, 6.0, 5, 10))
        if suffix == "self_attn.q_proj":
            expected = _interleave(expected, HEADS)
        elif suffix == "self_attn.k_proj":
            expected = _interleave(expected, KV_HEADS)
        got = (alpha / r) * _values(lora_b) @ _values(lora_a)  # what llama.cpp adds at --lora-scaled 1
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert set(tensors) == expected_names and len(expected_names) == 2 * 14


def test_rope_permutation_matches_the_real_base_gguf() -> None:
    """The row order applied to lora_b of q/k is the one llama.cpp's converter applied to SmolLM2's own weights:
    the dequantised GGUF q/k tensors equal the transformers weights (converted from that GGUF) so permuted."""
    from safetensors import safe_open

    from torch_singlora.assets import smollm2_gguf_path, smollm2_path
    from torch_singlora.gguf_export import rope_permute

    folder = smollm2_path()
    config = transformers.AutoConfig.from_pretrained(folder)
    tensors = {t.name: t for t in gguf.GGUFReader(smollm2_gguf_path()).tensors}
    with safe_open(f"{folder}/model.safetensors", "pt") as weights:
        for module, tensor, heads in (("q_proj", "attn_q", config.num_attention_heads),
                                      ("k_proj", "attn_k", config.num_key_value_heads)):
            hf = weights.get_tensor(f"model.layers.7.self_attn.{module}.weight").double()
            base = _values(tensors[f"blk.7.{tensor}.weight"])
            assert not torch.equal(base, hf)
            torch.testing.assert_close(rope_permute(hf, heads), base, atol=0, rtol=0)
            torch.testing.assert_close(_interleave(hf, heads), base, atol=0, rtol=0)


@pytest.mark.parametrize("dtype,qtype,tolerance", [(torch.float16, "F16", 2e-3), (torch.bfloat16, "BF16", 2e-2)])
def test_gguf_half_precision(tmp_path, dtype, qtype, tolerance) -> None:
    model = _adapted(target_modules=["v_proj"], rank_pattern={})
    fields, tensors = _read(export_lora(model, tmp_path, format="gguf", dtype=dtype))
    layer = dict(model.singlora_layers())["model.layers.0.self_attn.v_proj"]
    A = layer.singlora["default"].A.detach()
    lora_a, lora_b = tensors["blk.0.attn_v.weight.lora_a"], tensors["blk.0.attn_v.weight.lora_b"]
    assert lora_a.tensor_type == lora_b.tensor_type == gguf.GGMLQuantizationType[qtype]
    assert list(lora_a.shape) == [layer.d_in, 4] and list(lora_b.shape) == [4, layer.d_out]
    got = _values(lora_b) @ _values(lora_a) * fields["adapter.lora.alpha"] / 4
    expected = dense_update(A, layer.d_out, layer.d_in, expected_coefficient(4, 6.0, 5, 10))
    torch.testing.assert_close(got, expected, atol=tolerance, rtol=tolerance)


def test_gguf_refusals(tmp_path) -> None:
    model = _adapted(target_modules=["v_proj"], rank_pattern={})
    with torch.no_grad():
        dict(model.singlora_layers())["model.layers.1.self_attn.v_proj"].singlora["default"].A.mul_(1e6)
    with pytest.raises(SingLoRAError, match=r"blk.1.attn_v.weight.lora_\w would hold Inf"):
        export_lora(model, tmp_path / "f16", format="gguf", dtype=torch.float16)
    assert not (tmp_path / "f16" / "adapter_model.gguf").exists()
    with pytest.raises(SingLoRAError, match="dtype"):
        export_lora(model, tmp_path / "f64", format="gguf", dtype=torch.float64)
    embedding = get_singlora_model(_tiny_llama(), SingLoRAConfig(r=2, target_modules=["embed_tokens", "q_proj"]))
    with pytest.raises(SingLoRAError, match="'model.embed_tokens' .embedding. has no GGUF LoRA tensor"):
        export_lora(embedding, tmp_path / "e", format="gguf")
    head = get_singlora_model(_tiny_llama(), SingLoRAConfig(r=2, target_modules=["lm_head"]))
    with pytest.raises(SingLoRAError, match="'lm_head' .linear. has no GGUF LoRA tensor"):
        export_lora(head, tmp_path / "h", format="gguf")
    saved = get_singlora_model(_tiny_llama(), SingLoRAConfig(r=2, target_modules=["q_proj"],
                                                            modules_to_save=["model.norm"]))
    with pytest.raises(SingLoRAError, match="modules_to_save"):
        export_lora(saved, tmp_path / "s", format="gguf")
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=32))
    with pytest.raises(SingLoRAError, match="model_type 'gpt2' is not supported"):
        export_lora(get_singlora_model(gpt2, SingLoRAConfig(r=2, target_modules=["c_attn"])), tmp_path / "g",
                    format="gguf")
    assert not any(tmp_path.rglob("*.gguf"))


def test_gguf_from_adapter_directory_equals_from_model(tmp_path) -> None:
    model = _adapted()
    model.save_adapter(tmp_path / "adapter")
    from_model = export_lora(model, tmp_path / "a", format="gguf")
    from_dir = export_lora(tmp_path / "adapter", tmp_path / "b", format="gguf", base_model=_tiny_llama())
    (fields_a, tensors_a), (fields_b, tensors_b) = _read(from_model), _read(from_dir)
    assert fields_a["adapter.lora.alpha"] == fields_b["adapter.lora.alpha"] and set(tensors_a) == set(tensors_b)
    for name, tensor in tensors_a.items():
        torch.testing.assert_close(_values(tensors_b[name]), _values(tensor), atol=1e-6, rtol=1e-6)


def test_singlora_export_save_dtype_float16_gguf(tmp_path, capsys) -> None:
    """``singlora export --format gguf --save-dtype float16`` (the flag of every format, as train's): the lora
    tensors read back with gguf's reader are F16 and equal the float32 export rounded to float16; a PEFT export
    with the flag stores F16 safetensors; an unknown dtype is refused before anything is read."""
    import json

    from safetensors import safe_open

    from torch_singlora.cli import main

    _tiny_llama().save_pretrained(tmp_path / "base")
    model = _adapted(target_modules=["q_proj", "v_proj"], rank_pattern={})
    model.save_adapter(tmp_path / "adapter")
    (tmp_path / "adapter" / "run_info.json").write_text(json.dumps({
        "task": "causal-lm", "method": "singlora", "base_model": str(tmp_path / "base"),
        "tokenizer": str(tmp_path / "base"), "target_modules": ["q_proj", "v_proj"]}))
    export = ["export", str(tmp_path / "adapter"), "--format", "gguf", "--quiet"]
    assert main(export[:2] + [str(tmp_path / "f32")] + export[2:]) == 0
    assert main(export[:2] + [str(tmp_path / "f16")] + export[2:] + ["--save-dtype", "float16"]) == 0
    (fields32, tensors32), (fields16, tensors16) = (_read(tmp_path / name / "adapter_model.gguf")
                                                    for name in ("f32", "f16"))
    assert fields16["adapter.lora.alpha"] == fields32["adapter.lora.alpha"]
    assert set(tensors16) == set(tensors32) and len(tensors16) == 8  # 2 layers x (q, v) x (lora_a, lora_b)
    for name, tensor in tensors16.items():
        assert tensors32[name].tensor_type == gguf.GGMLQuantizationType.F32
        assert tensor.tensor_type == gguf.GGMLQuantizationType.F16, name
        assert torch.equal(_values(tensor), _values(tensors32[name]).float().half().double()), name

    assert main(["export", str(tmp_path / "adapter"), str(tmp_path / "peft16"), "--save-dtype", "float16",
                 "--quiet"]) == 0
    with safe_open(str(tmp_path / "peft16" / "adapter_model.safetensors"), "pt") as weights:
        assert {weights.get_tensor(key).dtype for key in weights.keys()} == {torch.float16}
    capsys.readouterr()
    with pytest.raises(SystemExit) as exited:
        main(export[:2] + [str(tmp_path / "bad")] + export[2:] + ["--save-dtype", "int8"])
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert "singlora export: error: argument --save-dtype: invalid choice: 'int8' (choose from " in err
    assert all(name in err.split("choose from")[1] for name in ("float32", "bfloat16", "float16"))
    assert not (tmp_path / "bad").exists()
