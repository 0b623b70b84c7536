"""Tiny, offline Stable-Diffusion-layout components built from configs (no downloads): for tests and the study.

``tiny_text_conditioning(words)`` gives a word-level tokenizer and a small ``CLIPTextModel``;
``tiny_unet(...)`` a ``UNet2DConditionModel`` whose attention has self- and cross-attention ``to_q`` / ``to_k``
(the cross-attention ``to_k`` is rectangular: ``(channels, cross_attention_dim)``);
``tiny_stable_diffusion(directory)`` writes a complete ``StableDiffusionPipeline`` folder with ``save_pretrained``,
the same layout as SD 1.5 on disk.
"""

from __future__ import annotations

import os
from typing import Any, Sequence

SPECIAL_TOKENS = ("<pad>", "<unk>", "<bos>", "<eos>")
DEFAULT_WORDS = ("a", "photo", "of", "sks", "dog")


def tiny_tokenizer(words: Sequence[str], max_length: int = 8) -> Any:
    """A word-level ``PreTrainedTokenizerFast``: ids 0-3 are ``<pad> <unk> <bos> <eos>``, then ``words``.

    Prompts are lower-cased and split on whitespace and punctuation; unknown words map to ``<unk>``.
    """
    from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS)}
    for word in words:
        vocab.setdefault(word.lower(), len(vocab))
    backend = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.post_processor = processors.TemplateProcessing(
        single="<bos> $A <eos>", special_tokens=[("<bos>", vocab["<bos>"]), ("<eos>", vocab["<eos>"])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", unk_token="<unk>", bos_token="<bos>", eos_token="<eos>",
        model_max_length=max_length,
    )


def tiny_text_encoder(
    vocab_size: int, *, hidden_size: int = 32, layers: int = 2, max_length: int = 8, seed: int = 0
) -> Any:
    """A randomly initialised ``CLIPTextModel`` with ``hidden_size`` = the U-Net's ``cross_attention_dim``."""
    import torch
    from transformers import CLIPTextConfig, CLIPTextModel

    config = CLIPTextConfig(
        vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=2 * hidden_size, num_hidden_layers=layers,
        num_attention_heads=2, max_position_embeddings=max_length, projection_dim=hidden_size,
        pad_token_id=0, bos_token_id=2, eos_token_id=3,
    )
    torch.manual_seed(seed)
    return CLIPTextModel(config)


def tiny_unet(
    *, sample_size: int = 16, in_channels: int = 1, channels: Sequence[int] = (16, 32), cross_attention_dim: int = 16,
    layers_per_block: int = 1, seed: int = 0,
) -> Any:
    """A ``UNet2DConditionModel`` with cross-attention down/up blocks at every resolution and in the mid block."""
    import torch
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=sample_size, in_channels=in_channels, out_channels=in_channels,
        block_out_channels=tuple(channels), layers_per_block=layers_per_block,
        down_block_types=("CrossAttnDownBlock2D",) * len(channels),
        up_block_types=("CrossAttnUpBlock2D",) * len(channels),
        cross_attention_dim=cross_attention_dim, attention_head_dim=8, norm_num_groups=8,
    )


def tiny_stable_diffusion(directory: str | os.PathLike, words: Sequence[str] = DEFAULT_WORDS, seed: int = 0) -> Any:
    """Build a tiny ``StableDiffusionPipeline`` (VAE with 4 latent channels, 16x16 images), ``save_pretrained`` it to
    ``directory`` and return it. Loading the folder back goes through the same code as real SD 1.5 weights."""
    import torch
    from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline

    tokenizer = tiny_tokenizer(words)
    text_encoder = tiny_text_encoder(len(tokenizer), hidden_size=16, seed=seed)
    unet = tiny_unet(sample_size=8, in_channels=4, cross_attention_dim=16, seed=seed)
    torch.manual_seed(seed)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16), layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=8,
        sample_size=16,
    )
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085,
                              beta_end=0.012, steps_offset=1, clip_sample=False)
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.save_pretrained(directory, safe_serialization=True)
    return pipe


def tiny_stable_diffusion_xl(directory: str | os.PathLike, words: Sequence[str] = DEFAULT_WORDS, seed: int = 0) -> Any:
    """Build a tiny ``StableDiffusionXLPipeline`` (two text encoders, ``text_time`` added conditioning), save it to
    ``directory`` and return it: the SDXL folder layout, loadable like real SDXL weights."""
    import torch
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    tokenizer = tiny_tokenizer(words)
    text_encoder = tiny_text_encoder(len(tokenizer), hidden_size=16, seed=seed)
    torch.manual_seed(seed + 1)
    text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
        max_position_embeddings=8, projection_dim=16, pad_token_id=0, bos_token_id=2, eos_token_id=3,
    ))
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32, attention_head_dim=(2, 4), norm_num_groups=8, use_linear_projection=True,
        addition_embed_type="text_time", addition_time_embed_dim=8, projection_class_embeddings_input_dim=16 + 6 * 8,
        transformer_layers_per_block=(1, 1),
    )
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16), layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=8,
        sample_size=32,
    )
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                       steps_offset=1, timestep_spacing="leading")
    pipe = StableDiffusionXLPipeline(
        vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=tokenizer, tokenizer_2=tokenizer,
        unet=unet, scheduler=scheduler,
    )
    pipe.save_pretrained(directory, safe_serialization=True)
    return pipe


def tiny_metric_models(directory: str | os.PathLike, seed: int = 0) -> tuple[str, str]:
    """Random stand-ins for the DINO and CLIP metric models, saved with their processors (and CLIP's tokenizer) as
    ``directory/dino`` and ``directory/clip``, the layout of hub folders; returns the two paths."""
    from pathlib import Path

    import torch
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, ViTConfig, ViTImageProcessor, ViTModel

    root = Path(directory)
    torch.manual_seed(seed)
    ViTModel(ViTConfig(image_size=16, patch_size=8, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                       intermediate_size=32), add_pooling_layer=False).save_pretrained(root / "dino")
    ViTImageProcessor(size={"height": 16, "width": 16}).save_pretrained(root / "dino")
    tokenizer = tiny_tokenizer(DEFAULT_WORDS, max_length=8)
    text = dict(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                num_attention_heads=2, max_position_embeddings=8, eos_token_id=3, bos_token_id=2, pad_token_id=0)
    vision = dict(image_size=16, patch_size=8, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                  num_attention_heads=2)
    CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=8)).save_pretrained(root / "clip")
    CLIPImageProcessor(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16}).save_pretrained(root / "clip")
    tokenizer.save_pretrained(root / "clip")
    return str(root / "dino"), str(root / "clip")
