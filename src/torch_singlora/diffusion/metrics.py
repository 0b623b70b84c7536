"""DreamBooth fidelity scores (Ruiz et al. 2023, used by the SingLoRA paper), with models given by local path.

- DINO: mean cosine similarity between the ViT ``[CLS]`` embeddings of every (generated, real subject) image pair.
- CLIP-I: the same with CLIP image embeddings.
- CLIP-T: mean cosine similarity between each generated image's CLIP image embedding and its prompt's CLIP text
  embedding (prompt fidelity).

The math (``pairwise_similarity``, ``paired_similarity``) is separate from the models so it can be checked on known
inputs. Models load with ``local_files_only=True``: e.g. a saved ``facebook/dino-vits16`` and
``openai/clip-vit-large-patch14``.
"""

from __future__ import annotations

import os
from typing import Any, Callable, Sequence

import torch
from torch import Tensor

from ..errors import SingLoRAError

Embed = Callable[[Sequence[Any]], Tensor]


def _check_2d(name: str, x: Tensor) -> None:
    if x.dim() != 2 or x.shape[0] == 0:
        raise SingLoRAError(f"{name} must be a non-empty (N, D) matrix of embeddings, got shape {tuple(x.shape)}")


def pairwise_similarity(generated: Tensor, reference: Tensor) -> float:
    """Mean cosine similarity over all pairs: generated (N, D), reference (M, D) -> mean of the (N, M) matrix."""
    _check_2d("generated", generated)
    _check_2d("reference", reference)
    if generated.shape[1] != reference.shape[1]:
        raise SingLoRAError(f"embedding sizes differ: generated {generated.shape[1]}, reference {reference.shape[1]}")
    a = torch.nn.functional.normalize(generated.double(), dim=1)
    b = torch.nn.functional.normalize(reference.double(), dim=1)
    return float((a @ b.T).mean())


def paired_similarity(images: Tensor, texts: Tensor) -> float:
    """Mean cosine similarity of row i of ``images`` (N, D) with row i of ``texts`` (N, D)."""
    _check_2d("images", images)
    _check_2d("texts", texts)
    if images.shape != texts.shape:
        raise SingLoRAError(f"images {tuple(images.shape)} and texts {tuple(texts.shape)} must pair up row by row")
    return float(torch.nn.functional.cosine_similarity(images.double(), texts.double(), dim=1).mean())


def _check_dir(path: str | os.PathLike, what: str) -> str:
    if not os.path.isdir(path):
        raise SingLoRAError(f"{what} model path {str(path)!r} is not a local folder")
    return str(path)


def load_dino(path: str | os.PathLike) -> Embed:
    """Images (PIL) -> (N, D) ``[CLS]`` embeddings of a local ViT/DINO(v2) model folder."""
    from transformers import AutoImageProcessor, AutoModel

    path = _check_dir(path, "DINO")
    processor = AutoImageProcessor.from_pretrained(path, local_files_only=True)
    model = AutoModel.from_pretrained(path, local_files_only=True).eval()

    @torch.no_grad()
    def embed(images: Sequence[Any]) -> Tensor:
        pixels = processor(images=list(images), return_tensors="pt").pixel_values
        return model(pixel_values=pixels).last_hidden_state[:, 0]

    return embed


def _features(output: Any) -> Tensor:
    """CLIP ``get_*_features`` returns a tensor (transformers 4) or an output with ``pooler_output`` (5)."""
    return output if isinstance(output, Tensor) else output.pooler_output


def load_clip(path: str | os.PathLike) -> tuple[Embed, Embed]:
    """``(embed_images, embed_texts)`` of a local CLIP model folder (``CLIPModel`` + processor + tokenizer)."""
    from transformers import AutoImageProcessor, AutoTokenizer, CLIPModel

    path = _check_dir(path, "CLIP")
    processor = AutoImageProcessor.from_pretrained(path, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    model = CLIPModel.from_pretrained(path, local_files_only=True).eval()

    @torch.no_grad()
    def embed_images(images: Sequence[Any]) -> Tensor:
        pixels = processor(images=list(images), return_tensors="pt").pixel_values
        return _features(model.get_image_features(pixel_values=pixels))

    @torch.no_grad()
    def embed_texts(texts: Sequence[str]) -> Tensor:
        tokens = tokenizer(list(texts), padding=True, truncation=True, return_tensors="pt")
        return _features(model.get_text_features(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask))

    return embed_images, embed_texts


def fidelity_scores(
    generated: Sequence[Any], reference: Sequence[Any], prompts: Sequence[str], *,
    dino_model: str | os.PathLike | None = None, clip_model: str | os.PathLike | None = None,
) -> dict[str, float]:
    """``{"dino", "clip_i", "clip_t"}`` (those whose model is given) for generated images, their ``prompts``
    (one per image) and the real subject images."""
    if len(prompts) != len(generated):
        raise SingLoRAError(f"{len(prompts)} prompts for {len(generated)} generated images: give one per image")
    if dino_model is None and clip_model is None:
        raise SingLoRAError("give dino_model and/or clip_model (local model folders)")
    scores: dict[str, float] = {}
    if dino_model is not None:
        embed = load_dino(dino_model)
        scores["dino"] = pairwise_similarity(embed(generated), embed(reference))
    if clip_model is not None:
        embed_images, embed_texts = load_clip(clip_model)
        generated_embeds = embed_images(generated)
        scores["clip_i"] = pairwise_similarity(generated_embeds, embed_images(reference))
        scores["clip_t"] = paired_similarity(generated_embeds, embed_texts(prompts))
    return scores
