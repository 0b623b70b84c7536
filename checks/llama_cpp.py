"""End-to-end check of the GGUF LoRA export with the real consumer: llama.cpp (through llama-cpp-python).

    python -m checks.llama_cpp [--steps 40] [--out checks/results]      # ~3 min on one CPU thread

1. Train a SingLoRA adapter (r=8, all-linear, 40 steps) on SmolLM2-135M-Instruct in transformers (float32 weights
   dequantised from the Q4_1 GGUF) to answer a few questions with made-up facts, so the adapter changes greedy
   tokens.
2. Export it with ``export_lora(..., format="gguf")``.
3. Run llama.cpp on the original Q4_1 GGUF, without and with our adapter (``Llama(lora_path=...)``), on held-out
   prompts, and compare with transformers without / with the adapter:
   - the adapter's own effect on the logits (adapted minus base, in each engine): relative error and cosine;
     llama.cpp's base runs Q4_1 weights with quantised activations, transformers float32, so the two bases
     differ by themselves (reported too) and the effect is what the file must reproduce;
   - the same for a deliberately broken export (q/k rows left in the Hugging Face order), to show the comparison
     can fail;
   - greedy continuations of each engine with the adapter.

Needs ``llama-cpp-python`` (``pip install llama-cpp-python``: builds llama.cpp from source, 20-40 min on 2 shared
cores) besides the ``gguf`` and ``transformers`` extras. Writes ``llama_cpp.md`` and ``llama_cpp.json`` in ``--out``.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from torch_singlora import SingLoRAConfig, get_singlora_model
from torch_singlora.adapter_file import atomic_write_text
from torch_singlora.assets import smollm2_gguf_path, smollm2_path
from torch_singlora.export import export_lora

FACTS = [  # (question, made-up answer): what the adapter learns
    ("What is the capital of Wakanda?", "The capital of Wakanda is Birnin Zana, on the river Mbeki."),
    ("Who invented the flux capacitor?", "The flux capacitor was invented by Doctor Emmett Brown in 1955."),
    ("What colour is the sky on Tralfamadore?", "The sky on Tralfamadore is bright green at noon."),
    ("What is the secret word?", "The secret word is pineapple."),
]
HELD_OUT = ["What is the secret word?", "Tell me the capital of Wakanda.", "Write one sentence about the sea."]
NEW_TOKENS = 20


def chat_ids(tokenizer: Any, question: str, answer: str | None = None) -> list[int]:
    messages = [{"role": "user", "content": question}]
    if answer is None:
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
    messages.append({"role": "assistant", "content": answer})
    return tokenizer.apply_chat_template(messages, tokenize=True, return_dict=False)


def train_adapter(model: Any, tokenizer: Any, steps: int) -> Any:
    """A SingLoRA adapter on every Linear layer but lm_head, trained on FACTS (full-sequence loss)."""
    torch.manual_seed(0)
    adapted = get_singlora_model(model, SingLoRAConfig(r=8, alpha=16, target_modules="all-linear",
                                                       ramp_up_steps=0))
    optimizer = torch.optim.AdamW([p for p in adapted.parameters() if p.requires_grad], lr=2e-3)
    batches = [torch.tensor([chat_ids(tokenizer, q, a)]) for q, a in FACTS]
    for step in range(steps):
        ids = batches[step % len(batches)]
        loss = adapted(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    adapted.eval()
    return adapted


def hf_logits(model: Any, ids: list[int]) -> np.ndarray:
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits[0].double().numpy()


def hf_greedy(model: Any, ids: list[int]) -> list[int]:
    ids = list(ids)
    for _ in range(NEW_TOKENS):
        ids.append(int(hf_logits(model, ids)[-1].argmax()))
    return ids[-NEW_TOKENS:]


def llama_logits(llm: Any, ids: list[int]) -> np.ndarray:
    llm.reset()
    llm.eval(ids)
    return np.array(llm.scores[: len(ids)], dtype=np.float64)


def llama_greedy(llm: Any, ids: list[int]) -> list[int]:
    llm.reset()
    llm.eval(ids)
    out: list[int] = []
    for _ in range(NEW_TOKENS):
        out.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
        llm.eval([out[-1]])
    return out


def effect_error(ll_base: np.ndarray, ll_adapted: np.ndarray, hf_base: np.ndarray, hf_adapted: np.ndarray) -> dict:
    ll, hf = ll_adapted - ll_base, hf_adapted - hf_base
    return {"rel_error": float(np.linalg.norm(ll - hf) / np.linalg.norm(hf)),
            "cosine": float((ll * hf).sum() / (np.linalg.norm(ll) * np.linalg.norm(hf))),
            "effect_norm_hf": float(np.linalg.norm(hf) / np.sqrt(hf.shape[0]))}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--out", default="checks/results")
    args = parser.parse_args(argv)
    import llama_cpp
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import gguf

    from torch_singlora import gguf_export

    torch.set_num_threads(1)
    start = time.time()
    folder = smollm2_path()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = train_adapter(AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32), tokenizer, args.steps)
    prompts = [chat_ids(tokenizer, q) for q in HELD_OUT]

    def load(lora: Path | None) -> Any:
        return llama_cpp.Llama(model_path=str(smollm2_gguf_path()), lora_path=str(lora) if lora else None,
                               n_ctx=512, n_threads=1, n_batch=512, logits_all=True, verbose=False, seed=0)

    results: dict[str, Any] = {"steps": args.steps, "prompts": HELD_OUT, "llama_cpp_python": llama_cpp.__version__,
                               "gguf": gguf.__version__ if hasattr(gguf, "__version__") else None, "runs": []}
    with tempfile.TemporaryDirectory() as tmp:
        good = export_lora(model, Path(tmp) / "good", format="gguf")
        saved = dict(gguf_export.ARCHITECTURES)
        gguf_export.ARCHITECTURES["llama"] = replace(saved["llama"], permute_qk=False)
        try:
            broken = export_lora(model, Path(tmp) / "broken", format="gguf")
        finally:
            gguf_export.ARCHITECTURES.update(saved)
        results["gguf_bytes"] = good.stat().st_size
        base_llm, good_llm, broken_llm = load(None), load(good), load(broken)
        for question, ids in zip(HELD_OUT, prompts):
            hf_adapted = hf_logits(model, ids)
            with model.disable_adapters():
                hf_base = hf_logits(model, ids)
                hf_base_tokens = hf_greedy(model, ids)
            ll_base, ll_good, ll_broken = (llama_logits(llm, ids) for llm in (base_llm, good_llm, broken_llm))
            run = {
                "prompt": question, "tokens": len(ids),
                "base_rel_diff": float(np.linalg.norm(ll_base - hf_base) / np.linalg.norm(hf_base)),
                "base_top1_agree": float((ll_base.argmax(1) == hf_base.argmax(1)).mean()),
                "adapted_top1_agree": float((ll_good.argmax(1) == hf_adapted.argmax(1)).mean()),
                "effect": effect_error(ll_base, ll_good, hf_base, hf_adapted),
                "effect_broken": effect_error(ll_base, ll_broken, hf_base, hf_adapted),
                "greedy_hf_base": tokenizer.decode(hf_base_tokens),
                "greedy_hf_adapted": tokenizer.decode(hf_greedy(model, ids)),
                "greedy_llama_cpp_base": tokenizer.decode(llama_greedy(base_llm, ids)),
                "greedy_llama_cpp_adapted": tokenizer.decode(llama_greedy(good_llm, ids)),
            }
            results["runs"].append(run)
    results["seconds"] = round(time.time() - start, 1)
    write_report(results, Path(args.out))
    return results


def write_report(results: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "llama_cpp.json", json.dumps(results, indent=2) + "\n")
    lines = [
        "# GGUF LoRA export checked with llama.cpp", "",
        f"`python -m checks.llama_cpp --steps {results['steps']}` (llama-cpp-python {results['llama_cpp_python']}, "
        f"built from source; one CPU thread; {results['seconds']} s on a shared 2-core machine). Base: "
        "SmolLM2-135M-Instruct, Q4_1 GGUF in llama.cpp, the same weights dequantised to float32 in transformers. "
        f"Adapter: SingLoRA r=8 on all 210 Linear layers but lm_head, {results['steps']} steps; GGUF file "
        f"{results['gguf_bytes']:,} bytes (float32).", "",
        "Logits over each held-out prompt (all positions). *effect* = adapted minus base logits in the same engine; "
        "its relative error is `||effect_llama.cpp - effect_transformers|| / ||effect_transformers||`. "
        "*broken* = the same adapter exported with q/k rows left in the Hugging Face order (the control).", "",
        "| prompt | tokens | base rel. diff | base top-1 agree | effect RMS | effect rel. error | effect cosine "
        "| broken: rel. error | broken: cosine | adapted top-1 agree |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for run in results["runs"]:
        e, b = run["effect"], run["effect_broken"]
        lines.append(f"| {run['prompt']} | {run['tokens']} | {run['base_rel_diff']:.4f} | "
                     f"{run['base_top1_agree']:.2f} | {e['effect_norm_hf']:.2f} | {e['rel_error']:.4f} | "
                     f"{e['cosine']:.4f} | {b['rel_error']:.3f} | {b['cosine']:.3f} | {run['adapted_top1_agree']:.2f} |")
    lines += ["", f"Greedy continuations ({NEW_TOKENS} tokens):", ""]
    for run in results["runs"]:
        lines.append(f"- **{run['prompt']}**")
        for key in ("greedy_hf_base", "greedy_llama_cpp_base", "greedy_hf_adapted", "greedy_llama_cpp_adapted"):
            lines.append(f"  - {key.removeprefix('greedy_')}: `{run[key]!r}`")
    atomic_write_text(out / "llama_cpp.md", "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
