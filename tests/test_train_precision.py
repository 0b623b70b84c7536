"""``singlora train --precision bf16`` on CPU really runs the forward in bfloat16 (accelerate's autocast), while the
SingLoRA parameters stay float32 master weights and the saved adapter is float32; ``--precision no`` is the
control (float32 activations), so the check can tell the two apart."""

from __future__ import annotations

import pytest
import torch

from conftest import save_tiny_chat_llama
from torch_singlora.train import loop
from torch_singlora.train.config import TrainConfig

pytest.importorskip("accelerate")
LAYER = "model.layers.0.self_attn.q_proj"


def test_bf16_precision_runs_the_forward_in_bfloat16_with_float32_master_weights(tmp_path, smollm2_tokenizer,
                                                                                 monkeypatch) -> None:
    from accelerate.state import AcceleratorState
    from safetensors import safe_open

    save_tiny_chat_llama(tmp_path / "base", smollm2_tokenizer)
    (tmp_path / "train.txt").write_text("".join(f"line {i}: the quick brown fox jumps over the lazy dog.\n"
                                                for i in range(8)))
    seen: dict[str, list[tuple[torch.dtype, ...]]] = {}
    real_make_method = loop.make_method

    def hooked(config, *args, **kwargs):  # the model the loop trains, with a forward hook on one adapted layer
        method = real_make_method(config, *args, **kwargs)
        layer = dict(method.model.singlora_layers())[LAYER]
        A = layer.singlora["default"].A
        layer.register_forward_hook(lambda module, inputs, output: seen.setdefault(config.precision, []).append(
            (output.dtype, A.dtype, torch.is_autocast_enabled("cpu"))))
        return method

    monkeypatch.setattr(loop, "make_method", hooked)
    for precision in ("no", "bf16"):
        AcceleratorState._reset_state(reset_partial_state=True)  # accelerate keeps one precision per process
        try:
            loop.train(TrainConfig(
                model=str(tmp_path / "base"), train_data=str(tmp_path / "train.txt"), task="causal-lm",
                output_dir=str(tmp_path / precision), target_modules="q_proj,v_proj", r=2, max_steps=1,
                batch_size=2, max_length=16, save_every=0, quiet=True, plot=False, precision=precision))
        finally:
            AcceleratorState._reset_state(reset_partial_state=True)
        with safe_open(str(tmp_path / precision / "adapter" / "adapter_model.safetensors"), "pt") as weights:
            stored = {key: weights.get_tensor(key).dtype for key in weights.keys()}
        assert f"{LAYER}.singlora_A" in stored and set(stored.values()) == {torch.float32}, stored
    assert seen["no"] and set(seen["no"]) == {(torch.float32, torch.float32, False)}
    # bf16: the adapted layer's output is bfloat16 under CPU autocast; its parameter A stays float32
    assert seen["bf16"] and set(seen["bf16"]) == {(torch.bfloat16, torch.float32, True)}
