"""Local diffusers pipelines (Stable Diffusion 1.x / 2.x and SDXL folders): loading, prompt and image encoding,
and sampling images with or without a SingLoRA adapter (what DreamBooth training and its evaluation share)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import Tensor

from ..atomic import atomic_write_text
from ..errors import SingLoRAError
from ..model import SingLoRAModel
from ..untrusted import read_json


def pipeline_class_name(path: str | os.PathLike) -> str:
    """``_class_name`` of a local diffusers folder's ``model_index.json``; a clear error if it is not one."""
    index = Path(path) / "model_index.json"
    if not index.is_file():
        raise SingLoRAError(f"pretrained_model={str(path)!r}: no model_index.json, not a local diffusers folder")
    document = read_json(index, what="a diffusers model index")
    if not isinstance(document, dict) or not isinstance(document.get("_class_name"), str):
        raise SingLoRAError(f"{index}: not a diffusers model index (no '_class_name' string)")
    return document["_class_name"]


def is_sdxl(pipe: Any) -> bool:
    """True for a pipeline with SDXL's two text encoders and added conditioning."""
    return getattr(pipe, "text_encoder_2", None) is not None


def load_pipeline(path: str | os.PathLike, torch_dtype: torch.dtype | None = None) -> Any:
    """Load a Stable Diffusion 1.x/2.x or SDXL pipeline from a local diffusers folder (no network)."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    name = pipeline_class_name(path)
    cls = StableDiffusionXLPipeline if "XL" in name else StableDiffusionPipeline
    kwargs: dict[str, Any] = {"local_files_only": True}
    if torch_dtype is not None:
        kwargs["torch_dtype"] = torch_dtype
    if cls is StableDiffusionPipeline:
        kwargs.update(safety_checker=None, requires_safety_checker=False)
    return cls.from_pretrained(str(path), **kwargs)


def encode_prompt(
    pipe: Any, prompt: str, resolution: int, device: torch.device
) -> tuple[Tensor, dict[str, Tensor] | None]:
    """Text embeddings (1, L, D) of a prompt, and SDXL's ``added_cond_kwargs`` (None for SD 1.x/2.x)."""
    with torch.no_grad():
        if not is_sdxl(pipe):
            return pipe.encode_prompt(prompt, device, 1, False)[0], None
        embeds, _, pooled, _ = pipe.encode_prompt(prompt, device=device, num_images_per_prompt=1,
                                                  do_classifier_free_guidance=False)
    size = (resolution, resolution)
    time_ids = pipe._get_add_time_ids(size, (0, 0), size, dtype=embeds.dtype,
                                      text_encoder_projection_dim=pipe.text_encoder_2.config.projection_dim)
    return embeds, {"text_embeds": pooled, "time_ids": time_ids.to(device)}


def encode_images(pipe: Any, pixels: Tensor) -> Tensor:
    """VAE latents (B, C, h, w) of images ``pixels`` (B, 3, H, W) in [-1, 1], scaled by the VAE's factor."""
    vae = pipe.vae
    with torch.no_grad():
        latents = vae.encode(pixels.to(vae.device, vae.dtype)).latent_dist.sample()
    return latents * vae.config.scaling_factor


def generate_images(
    pretrained_model: str | os.PathLike, adapter_dir: str | os.PathLike | None, prompts: Sequence[str],
    out_dir: str | os.PathLike,
    *, num_images: int = 4, seed: int = 0, steps: int = 25, resolution: int | None = None, guidance_scale: float = 7.5,
) -> dict[str, str]:
    """Sample ``num_images`` per prompt (fixed seed) from a local pipeline, with a SingLoRA adapter folder if given;
    writes PNGs into ``out_dir`` and returns ``{file name: prompt}`` (also saved as ``prompts.json``)."""
    pipe = load_pipeline(pretrained_model)
    pipe.set_progress_bar_config(disable=True)
    if adapter_dir is not None:
        SingLoRAModel.from_pretrained(pipe.unet, adapter_dir)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    size = {} if resolution is None else {"height": resolution, "width": resolution}
    names: dict[str, str] = {}
    for index, prompt in enumerate(prompts):
        generator = torch.Generator(device="cpu").manual_seed(seed + index)
        images = pipe(prompt, num_images_per_prompt=num_images, generator=generator, num_inference_steps=steps,
                      guidance_scale=guidance_scale, **size).images
        for k, image in enumerate(images):
            name = f"prompt{index:03d}_{k:02d}.png"
            image.save(out / name)
            names[name] = prompt
    atomic_write_text(out / "prompts.json", json.dumps(names, indent=2) + "\n")
    return names
