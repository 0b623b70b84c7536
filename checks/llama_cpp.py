"""End-to-end check of the GGUF LoRA export with the real consumer: llama.cpp (through llama-cpp-python).

    python -m checks.llama_cpp [--steps 40] [--out checks/results]      # ~3 min on one CPU thread

1. Train a SingLoRA adapter (r=8, all-linear, 40 steps) on SmolLM2-135M-Instruct in transformers (float32 weights
   dequantised from the Q4_1 GGUF) to answer a few questions with made-up facts, so the adapter changes greedy
   tokens.
2. Export it with ``export_lora(..., format="gguf")``.
3. Run llama.cpp without and with our adapter (``Llama(lora_path=...)``) on held-out prompts, on two bases: the
   original Q4_1 GGUF (what users run; llama.cpp also quantises activations for it, so its base differs from
   transformers' by itself) and an F32 copy of it (every tensor dequantised: exactly the weights transformers
   loads). Compare with transformers without / with the adapter:
   - the adapter's own effect on the logits (adapted minus base, in each engine): relative error and cosine;
   - the same for a deliberately broken export (q/k rows left in the Hugging Face order), to show the comparison
     can fail;
   - greedy continuations of each engine with and without the adapter.

Needs ``llama-cpp-python`` (``pip install llama-cpp-python``: builds llama.cpp from source, 20-40 min on 2 shared
cores) besides the ``gguf`` and ``transformers`` extras. Writes ``llama_cpp.md`` and ``llama_cpp.json`` in ``--out``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from torch_singlora import SingLoRAConfig, get_singlora_model
from torch_singlora.atomic import atomic_write_text
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


@contextlib.contextmanager
def plain_cpu_buffers(llama_cpp: Any) -> Iterator[None]:
    """Load models without llama.cpp's "extra buffer types" (weights repacked for AMX / other CPU kernels;
    ``use_extra_bufts``, which ``Llama()`` does not expose): on this machine (a CPU with AMX) the repacked base
    crashed in its first ``llama_decode`` (SIGSEGV), with or without an adapter. llama.cpp puts LoRA tensors in
    plain CPU buffers anyway ("cannot use buft 'AMX', fallback to CPU")."""
    default = llama_cpp.llama_cpp.llama_model_default_params

    def params() -> Any:
        value = default()
        value.use_extra_bufts = False
        return value

    llama_cpp.llama_cpp.llama_model_default_params = params
    try:
        yield
    finally:
        llama_cpp.llama_cpp.llama_model_default_params = default


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
    """How well llama.cpp's adapter effect (adapted minus base logits) matches transformers'."""
    ll, hf = ll_adapted - ll_base, hf_adapted - hf_base
    return {"rel_error": float(np.linalg.norm(ll - hf) / np.linalg.norm(hf)),
            "cosine": float((ll * hf).sum() / (np.linalg.norm(ll) * np.linalg.norm(hf))),
            "effect_rms": float(np.sqrt((hf ** 2).mean()))}


def float32_copy(source: Path, target: Path) -> Path:
    """``source`` GGUF with every tensor dequantised to F32 (metadata copied): the exact weights transformers
    loads from the quantised file, for a comparison without quantisation in either engine."""
    import gguf

    reader = gguf.GGUFReader(source)
    writer = gguf.GGUFWriter(target, arch=reader.fields["general.architecture"].contents())
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key in ("general.architecture", "general.file_type"):
            continue
        kind = field.types[0]
        writer.add_key_value(key, field.contents(), kind,
                             sub_type=field.types[-1] if kind == gguf.GGUFValueType.ARRAY else None)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    for tensor in reader.tensors:
        writer.add_tensor(tensor.name, gguf.quants.dequantize(tensor.data, tensor.tensor_type))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return target


def export_without_rope_permutation(model: Any, folder: Path) -> Path:
    """The control: the same adapter with q/k ``lora_b`` rows left in the Hugging Face order."""
    from torch_singlora import gguf_export

    saved = dict(gguf_export.ARCHITECTURES)
    gguf_export.ARCHITECTURES["llama"] = replace(saved["llama"], permute_qk=False)
    try:
        return export_lora(model, folder, format="gguf")
    finally:
        gguf_export.ARCHITECTURES.update(saved)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--out", default="checks/results")
    args = parser.parse_args(argv)
    import llama_cpp
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(1)
    start = time.time()
    folder = smollm2_path()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = train_adapter(AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32), tokenizer, args.steps)
    prompts = [chat_ids(tokenizer, q) for q in HELD_OUT]
    reference = []  # transformers: (base logits, adapted logits, base greedy, adapted greedy) per prompt
    for ids in prompts:
        with model.disable_adapters():
            base = (hf_logits(model, ids), hf_greedy(model, ids))
        reference.append((base[0], hf_logits(model, ids), base[1], hf_greedy(model, ids)))

    def load(base: Path, lora: Path | None) -> Any:
        with plain_cpu_buffers(llama_cpp):
            return llama_cpp.Llama(model_path=str(base), lora_path=str(lora) if lora else None, n_ctx=512,
                                   n_threads=1, n_batch=512, logits_all=True, verbose=False, seed=0)

    results: dict[str, Any] = {"steps": args.steps, "llama_cpp_python": llama_cpp.__version__, "runs": []}
    with tempfile.TemporaryDirectory() as tmp:
        good = export_lora(model, Path(tmp) / "good", format="gguf")
        broken = export_without_rope_permutation(model, Path(tmp) / "broken")
        results["gguf_bytes"] = good.stat().st_size
        bases = {"Q4_1": smollm2_gguf_path(), "F32": float32_copy(smollm2_gguf_path(), Path(tmp) / "f32.gguf")}
        for base_name, base_path in bases.items():
            engines = [load(base_path, lora) for lora in (None, good, broken)]
            for question, ids, (hf_base, hf_adapted, hf_base_tokens, hf_tokens) in zip(HELD_OUT, prompts, reference):
                ll_base, ll_good, ll_broken = (llama_logits(llm, ids) for llm in engines)
                results["runs"].append({
                    "base": base_name, "prompt": question, "tokens": len(ids),
                    "base_rel_diff": float(np.linalg.norm(ll_base - hf_base) / np.linalg.norm(hf_base)),
                    "effect": effect_error(ll_base, ll_good, hf_base, hf_adapted),
                    "effect_broken": effect_error(ll_base, ll_broken, hf_base, hf_adapted),
                    "adapted_top1_agree": float((ll_good.argmax(1) == hf_adapted.argmax(1)).mean()),
                    "greedy_transformers_base": tokenizer.decode(hf_base_tokens),
                    "greedy_llama_cpp_base": tokenizer.decode(llama_greedy(engines[0], ids)),
                    "greedy_transformers_adapted": tokenizer.decode(hf_tokens),
                    "greedy_llama_cpp_adapted": tokenizer.decode(llama_greedy(engines[1], ids)),
                })
            del engines
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
        "SmolLM2-135M-Instruct: in llama.cpp the Q4_1 GGUF as shipped, and an F32 copy of it (every tensor "
        "dequantised); in transformers the same weights dequantised to float32 (so the F32 rows compare the same "
        f"weights in both engines). Adapter: SingLoRA r=8 on all 210 Linear layers but lm_head, trained "
        f"{results['steps']} steps on four made-up facts; GGUF adapter file {results['gguf_bytes']:,} bytes (F32).", "",
        "Logits at every position of each held-out prompt. *effect* = adapted minus base logits in the same engine; "
        "*rel. error* = `||effect_llama.cpp - effect_transformers|| / ||effect_transformers||`; *effect RMS* = "
        "transformers' effect per logit. *control* = the same adapter exported with the q/k rows left in the "
        "Hugging Face order (no RoPE permutation): it must do visibly worse.", "",
        "| base in llama.cpp | prompt | tokens | base rel. diff | effect RMS | effect rel. error | effect cosine "
        "| control: rel. error | control: cosine | adapted top-1 agree |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for run in results["runs"]:
        e, b = run["effect"], run["effect_broken"]
        lines.append(f"| {run['base']} | {run['prompt']} | {run['tokens']} | {run['base_rel_diff']:.2e} | "
                     f"{e['effect_rms']:.2f} | {e['rel_error']:.2e} | {e['cosine']:.6f} | {b['rel_error']:.3f} | "
                     f"{b['cosine']:.4f} | {run['adapted_top1_agree']:.2f} |")
    lines += ["", f"Greedy continuations ({NEW_TOKENS} tokens):", ""]
    for run in results["runs"]:
        lines.append(f"- **{run['prompt']}** (llama.cpp base {run['base']})")
        for key in ("greedy_transformers_base", "greedy_llama_cpp_base", "greedy_transformers_adapted",
                    "greedy_llama_cpp_adapted"):
            lines.append(f"  - {key.removeprefix('greedy_')}: `{run[key]!r}`")
    atomic_write_text(out / "llama_cpp.md", "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
