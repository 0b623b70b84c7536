"""Diffusion models (diffusers): DreamBooth-style SingLoRA training, fidelity metrics, tiny offline components.

Modules (each imports diffusers / transformers only when used):
``dreambooth`` (loading SD 1.x / SDXL folders, injection, loss, the training run), ``metrics`` (DINO, CLIP-I,
CLIP-T), ``tiny`` (small models built from configs, for tests and the offline study), ``cli`` (the ``dreambooth``
and ``dreambooth-eval`` subcommands).
"""
