"""The export check for multi-adapter engines (``torch_singlora.engines``, ``singlora export --for vllm``): what
vLLM / LoRAX cannot load is refused before anything is written, every reason listed; the rest exports."""

from __future__ import annotations

import json

import pytest
from mixed_models import tiny_llama

from torch_singlora import SingLoRAConfig, SingLoRAError, get_singlora_model
from torch_singlora.cli import main
from torch_singlora.engines import check_engine_export


def test_every_reason_is_listed_and_a_clean_adapter_passes() -> None:
    model = get_singlora_model(tiny_llama(), SingLoRAConfig(  # tiny_llama ties lm_head to the embeddings
        r=8, target_modules=["q_proj", "v_proj", "lm_head"], modules_to_save=["norm"],
        rank_pattern={"v_proj": 32}, ramp_up_steps=0), "bad")
    model.add_adapter("good", SingLoRAConfig(r=8, target_modules=["q_proj", "v_proj", "down_proj", "embed_tokens"],
                                             ramp_up_steps=0))
    with pytest.raises(SingLoRAError) as caught:
        check_engine_export(model, engine="vllm", adapter_name="bad")
    message = str(caught.value)
    assert "'lm_head' shares its weight with ['model.embed_tokens'] (tied embeddings)" in message
    assert "modules_to_save ['model.norm']" in message
    assert "rank 32 (module 'model.layers.0.self_attn.v_proj', 2 module(s) above 16)" in message
    check_engine_export(model, engine="vllm", adapter_name="good")  # passes: vLLM serves the input embeddings
    with pytest.raises(SingLoRAError, match="rank 8 .* exceeds --max-lora-rank 4") as caught:
        check_engine_export(model, engine="lorax", max_lora_rank=4, adapter_name="good")
    assert "'model.embed_tokens' is an Embedding: lorax serves LoRA on linear layers only" in str(caught.value)
    with pytest.raises(SingLoRAError, match="engine='tgi' must be one of"):
        check_engine_export(model, engine="tgi", adapter_name="good")


def test_singlora_export_for_vllm_refuses_before_writing(tmp_path, capsys) -> None:
    base = tiny_llama()
    base.save_pretrained(tmp_path / "base")
    for name, config in {"wide": SingLoRAConfig(r=16, target_modules=["q_proj", "v_proj"], ramp_up_steps=0),
                         "head": SingLoRAConfig(r=4, target_modules=["lm_head", "q_proj"], ramp_up_steps=0)}.items():
        model = get_singlora_model(tiny_llama(), config)
        model.save_adapter(tmp_path / name)
        info = {"task": "causal-lm", "method": "singlora", "base_model": str(tmp_path / "base"),
                "tokenizer": str(tmp_path / "base"), "target_modules": config.target_modules}
        (tmp_path / name / "run_info.json").write_text(json.dumps(info))
    assert main(["export", str(tmp_path / "wide"), str(tmp_path / "out"), "--for", "vllm", "--max-lora-rank", "8"]) == 2
    assert "exceeds --max-lora-rank 8: start vllm with --max-lora-rank 16" in capsys.readouterr().err
    assert main(["export", str(tmp_path / "head"), str(tmp_path / "out"), "--for", "vllm"]) == 2
    assert "'lm_head' shares its weight" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()  # nothing written
    assert main(["export", str(tmp_path / "wide"), str(tmp_path / "out"), "--max-lora-rank", "8"]) == 2
    assert "give --for vllm" in capsys.readouterr().err
    assert main(["export", str(tmp_path / "wide"), str(tmp_path / "out"), "--for", "vllm", "--max-lora-rank",
                 "16", "--quiet"]) == 0
    written = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert written["r"] == 16 and not written.get("modules_to_save")


def test_singlora_export_for_vllm_prints_every_problem_on_one_line(tmp_path, capsys) -> None:
    """cli.main prints an error as one line (escaping control characters): the problems are joined by "; ", not by
    line breaks that would reach the terminal as a literal backslash-n."""
    tiny_llama().save_pretrained(tmp_path / "base")
    config = SingLoRAConfig(r=32, target_modules=["lm_head", "q_proj"], ramp_up_steps=0)
    get_singlora_model(tiny_llama(), config).save_adapter(tmp_path / "adapter")
    info = {"task": "causal-lm", "method": "singlora", "base_model": str(tmp_path / "base"),
            "tokenizer": str(tmp_path / "base"), "target_modules": config.target_modules}
    (tmp_path / "adapter" / "run_info.json").write_text(json.dumps(info))
    capsys.readouterr()  # save_pretrained's progress bar
    assert main(["export", str(tmp_path / "adapter"), str(tmp_path / "out"), "--for", "vllm"]) == 2
    err = capsys.readouterr().err  # the base model's loading progress bar, then the error line
    assert err.endswith("\n")
    err = err[:-1].split("\n")[-1]
    assert "\\n" not in err
    assert err.startswith(f"singlora export: error: {tmp_path / 'adapter'} cannot be served by vllm from its LoRA "
                          "export: module 'lm_head' shares its weight with ['model.embed_tokens'] (tied "
                          "embeddings): vLLM 0.32 applies a LoRA on it to every request, the base model's included "
                          "(leave it out of target_modules); rank 32 (module ")
    assert "exceeds --max-lora-rank 16: start vllm with --max-lora-rank 32 or more" in err
    assert not (tmp_path / "out").exists()


def test_an_adapter_folder_is_checked_by_its_keys_as_export_writes_it(tmp_path) -> None:
    """The adapted modules are those the file's keys name (its target patterns are metadata), for the engine check
    as for loading and export: patterns that leave the tied lm_head out do not hide it."""
    base = tiny_llama()
    model = get_singlora_model(tiny_llama(), SingLoRAConfig(r=4, target_modules=["lm_head", "q_proj"],
                                                            ramp_up_steps=0))
    model.save_adapter(tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    (tmp_path / "adapter_config.json").write_text(json.dumps({**config, "target_modules": ["q_proj"]}))
    with pytest.raises(SingLoRAError, match="'lm_head' shares its weight"):
        check_engine_export(tmp_path, base, engine="vllm")
