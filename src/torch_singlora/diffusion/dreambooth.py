"""DreamBooth with SingLoRA on a diffusers U-Net, following the diffusers DreamBooth-LoRA recipe.

The paper (SPEC section 3) adapts only the U-Net attention query and key projections (``to_q``, ``to_k``, self- and
cross-attention; the cross-attention ``to_k`` is rectangular: (channels, text hidden size)), lr 1e-3, 400 steps.

Pieces, usable on their own:

- ``pipeline.load_pipeline(path)``: a local diffusers folder (SD 1.5 or SDXL layout) -> pipeline (``pipeline``
  also encodes prompts and images, and samples images with or without an adapter).
- ``add_singlora(unet, ...)``: inject SingLoRA into the U-Net in place -> ``SingLoRAModel``.
- ``denoising_loss(unet, scheduler, latents, text, ...)``: per-sample diffusion MSE (epsilon or v target).
- ``train_dreambooth(DreamBoothArgs(...))``: the whole run with accelerate (prior preservation, mixed precision,
  gradient checkpointing, checkpoints with resume, validation images with a fixed seed), writing
  ``<output_dir>/singlora/`` (our format) and ``<output_dir>/diffusers_lora/`` (``pipe.load_lora_weights``).
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..atomic import atomic_write_text
from ..config import SingLoRAConfig, parse_steps_or_fraction
from ..errors import SingLoRAError
from ..model import SingLoRAModel, get_singlora_model
from ..train.step import OptimizerStep
from .pipeline import encode_images, encode_prompt, is_sdxl, load_pipeline

DEFAULT_TARGETS = ["to_q", "to_k"]
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
MIXED_PRECISION = ("no", "fp16", "bf16")


# ---- adapter and loss -----------------------------------------------------------------------------------------


def add_singlora(
    unet: nn.Module, *, r: int = 8, alpha: float | None = None,
    target_modules: Sequence[str] | str = tuple(DEFAULT_TARGETS),
    ramp_up_steps: int | float = 0.01, total_steps: int | None = 400, init: str = "normal",
) -> SingLoRAModel:
    """Inject SingLoRA into the U-Net in place (all base weights frozen); ``alpha`` defaults to ``r`` (s = 1).

    Defaults are the paper's DreamBooth settings: ``to_q`` + ``to_k``, ramp over 1% of 400 steps.
    """
    targets = target_modules if isinstance(target_modules, str) else list(target_modules)
    config = SingLoRAConfig(
        r=r, alpha=float(r if alpha is None else alpha), target_modules=targets, ramp_up_steps=ramp_up_steps,
        total_steps=total_steps, init=init,
    )
    return get_singlora_model(unet, config)


def denoising_loss(
    unet: nn.Module, scheduler: Any, latents: Tensor, encoder_hidden_states: Tensor, *,
    added_cond_kwargs: dict[str, Tensor] | None = None, generator: torch.Generator | None = None,
) -> Tensor:
    """Per-sample diffusion loss: noise ``latents`` (B, C, H, W) at random timesteps, predict, MSE -> (B,).

    The target follows ``scheduler.config.prediction_type``: ``epsilon`` (the noise) or ``v_prediction``.
    ``encoder_hidden_states``: (B, L, D) text embeddings.
    """
    batch = latents.shape[0]
    noise = torch.randn(latents.shape, generator=generator, device=latents.device, dtype=latents.dtype)
    timesteps = torch.randint(
        0, scheduler.config.num_train_timesteps, (batch,), generator=generator, device=latents.device
    )
    noisy = scheduler.add_noise(latents, noise, timesteps)
    prediction = unet(noisy, timesteps, encoder_hidden_states, added_cond_kwargs=added_cond_kwargs).sample
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        target = noise
    elif kind == "v_prediction":
        target = scheduler.get_velocity(latents, noise, timesteps)
    else:
        raise SingLoRAError(f"scheduler prediction_type={kind!r} is not supported (epsilon, v_prediction)")
    return F.mse_loss(prediction.float(), target.float(), reduction="none").flatten(1).mean(1)


def dreambooth_loss(per_sample: Tensor, num_instance: int, prior_loss_weight: float) -> Tensor:
    """DreamBooth objective on a batch [instance samples, class samples]: mean(instance) + w * mean(class)."""
    loss = per_sample[:num_instance].mean()
    if per_sample.shape[0] > num_instance:
        loss = loss + prior_loss_weight * per_sample[num_instance:].mean()
    return loss


# ---- the training run -----------------------------------------------------------------------------------------


def _opt(default: Any, help: str = "", **kwargs: Any) -> Any:
    """A dataclass field with a ``--help`` text (``metadata["help"]``, as in ``torch_singlora.cli``)."""
    if "default_factory" in kwargs:
        return field(metadata={"help": help}, **kwargs)
    return field(default=default, metadata={"help": help})


@dataclass
class DreamBoothArgs:
    """Options of ``singlora dreambooth`` (names follow diffusers' ``train_dreambooth_lora.py``)."""

    pretrained_model: str = field(metadata={"help": "local diffusers folder (SD 1.x/2.x or SDXL layout)"})
    instance_data_dir: str = field(metadata={"help": "folder with the subject's images (4-5 in the paper)"})
    instance_prompt: str = field(metadata={"help": "prompt with the identifier, e.g. 'a photo of sks dog'"})
    output_dir: str = _opt("dreambooth-singlora", "output folder")
    class_data_dir: str | None = _opt(None, "class images for prior preservation (missing ones are generated)")
    class_prompt: str | None = _opt(None, "prompt of the class images, e.g. 'a photo of dog'")
    with_prior_preservation: bool = _opt(False, "add the prior-preservation loss on class images")
    prior_loss_weight: float = _opt(1.0, "weight of the prior-preservation loss")
    num_class_images: int = _opt(100, "class images wanted in class_data_dir")
    resolution: int = _opt(512, "training image size")
    center_crop: bool = _opt(False, "center crop (default: random crop)")
    train_batch_size: int = _opt(1, "instance images per step (as many class images are added)")
    max_train_steps: int = _opt(400, "optimizer steps (paper: 400)")
    learning_rate: float = _opt(1e-3, "AdamW learning rate (paper: 1e-3)")
    adam_weight_decay: float = _opt(1e-2, "AdamW weight decay")
    max_grad_norm: float = _opt(1.0, "gradient clipping norm")
    r: int = _opt(8, "SingLoRA rank (paper: 8; 16 has LoRA r=8's parameter count)")
    alpha: float | None = _opt(None, "scale numerator, s = alpha / r (default: r)")
    target_modules: list[str] = _opt(None, "U-Net modules to adapt (paper: to_q to_k)",
                                     default_factory=lambda: list(DEFAULT_TARGETS))
    ramp_up_steps: str = _opt("0.01", "ramp u(t): int optimizer steps, or a fraction of max_train_steps (a number "
                                      "with a '.', e.g. 0.01; 1.0 = the whole run)")
    init: str = _opt("normal", "initialisation of A: normal | kaiming_uniform | gaussian")
    gradient_accumulation_steps: int = _opt(1, "micro-batches per optimizer step")
    gradient_checkpointing: bool = _opt(False, "recompute U-Net activations in backward (less memory)")
    mixed_precision: str = _opt("no", "no | fp16 | bf16 (frozen weights in that dtype; A stays float32)")
    checkpointing_steps: int = _opt(0, "save a resumable checkpoint every N steps (0: never)")
    checkpoints_total_limit: int | None = _opt(None, "keep at most this many checkpoints")
    resume_from_checkpoint: str | None = _opt(None, "a checkpoint folder, or 'latest' in output_dir")
    validation_prompt: str | None = _opt(None, "prompt for validation images")
    validation_steps: int = _opt(100, "write validation images every N steps")
    num_validation_images: int = _opt(4, "validation images each time")
    validation_inference_steps: int = _opt(25, "sampler steps for validation and class images")
    seed: int = _opt(0, "seed (data order, noise, validation images)")
    export_lora: bool = _opt(True, "also write the diffusers LoRA layout (pipe.load_lora_weights)")

    def validate(self) -> None:
        """Cross-field checks; errors name the option."""
        if not Path(self.instance_data_dir).is_dir():
            raise SingLoRAError(f"--instance-data-dir {self.instance_data_dir!r} is not a folder")
        if self.with_prior_preservation and (self.class_data_dir is None or self.class_prompt is None):
            raise SingLoRAError("--with-prior-preservation needs --class-data-dir and --class-prompt")
        if self.mixed_precision not in MIXED_PRECISION:
            raise SingLoRAError(f"--mixed-precision {self.mixed_precision!r} must be one of {MIXED_PRECISION}")
        for name in ("resolution", "train_batch_size", "max_train_steps", "gradient_accumulation_steps", "r"):
            if getattr(self, name) < 1:
                raise SingLoRAError(f"--{name.replace('_', '-')} {getattr(self, name)!r} must be >= 1")
        if self.checkpointing_steps < 0 or self.validation_steps < 1:
            raise SingLoRAError("--checkpointing-steps must be >= 0 and --validation-steps >= 1")
        if not self.learning_rate > 0:
            raise SingLoRAError(f"--learning-rate {self.learning_rate!r} must be > 0")
        self.ramp()

    def ramp(self) -> int | float:
        """``ramp_up_steps`` read by the library's one parser: int steps, or a fraction of ``max_train_steps``."""
        return parse_steps_or_fraction(self.ramp_up_steps, "--ramp-up-steps")


def list_images(directory: str | os.PathLike) -> list[Path]:
    """Image files of a folder, sorted; an error naming the folder if there are none."""
    paths = sorted(p for p in Path(directory).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not paths:
        raise SingLoRAError(f"{directory}: no images ({', '.join(IMAGE_SUFFIXES)})")
    return paths


def image_tensor(path: Path, resolution: int, center_crop: bool) -> Tensor:
    """RGB image -> (3, resolution, resolution) in [-1, 1]: shorter side resized to ``resolution``, then cropped."""
    from PIL import Image

    with Image.open(path) as image:
        image = image.convert("RGB")
        scale = resolution / min(image.size)
        size = (max(resolution, round(image.width * scale)), max(resolution, round(image.height * scale)))
        image = image.resize(size, Image.BILINEAR)
        if center_crop:
            left, top = (image.width - resolution) // 2, (image.height - resolution) // 2
        else:
            left = int(torch.randint(0, image.width - resolution + 1, ()).item())
            top = int(torch.randint(0, image.height - resolution + 1, ()).item())
        image = image.crop((left, top, left + resolution, top + resolution))
        data = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8).view(resolution, resolution, 3)
    return data.permute(2, 0, 1).float() / 127.5 - 1.0


def generate_class_images(pipe: Any, args: DreamBoothArgs) -> None:
    """Fill ``class_data_dir`` up to ``num_class_images`` with base-model samples of ``class_prompt`` (as diffusers)."""
    directory = Path(args.class_data_dir)
    directory.mkdir(parents=True, exist_ok=True)
    have = len([p for p in directory.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES])
    generator = torch.Generator(device="cpu").manual_seed(args.seed)
    for index in range(have, args.num_class_images):
        image = pipe(args.class_prompt, num_inference_steps=args.validation_inference_steps, generator=generator,
                     height=args.resolution, width=args.resolution).images[0]
        image.save(directory / f"class_{index:05d}.png")


def _repeat(embeds: Tensor, added: dict[str, Tensor] | None, n: int) -> tuple[Tensor, dict[str, Tensor] | None]:
    """Batch of ``n`` copies of one prompt's embeddings (and added conditioning)."""
    repeated = None if added is None else {k: v.expand(n, *v.shape[1:]) for k, v in added.items()}
    return embeds.expand(n, *embeds.shape[1:]), repeated


def save_validation_images(pipe: Any, args: DreamBoothArgs, step: int) -> list[Path]:
    """``num_validation_images`` samples of ``validation_prompt`` with a fixed seed -> ``output_dir/validation/``."""
    directory = Path(args.output_dir) / "validation"
    directory.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator(device="cpu").manual_seed(args.seed)
    images = pipe(args.validation_prompt, num_images_per_prompt=args.num_validation_images, generator=generator,
                  num_inference_steps=args.validation_inference_steps, height=args.resolution,
                  width=args.resolution).images
    paths = []
    for index, image in enumerate(images):
        paths.append(directory / f"step_{step:06d}_{index}.png")
        image.save(paths[-1])
    return paths


def _checkpoints(output_dir: Path) -> list[Path]:
    found = [p for p in output_dir.glob("checkpoint-*") if p.is_dir() and p.name.split("-")[1].isdigit()]
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))


WEIGHT_DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}  # --mixed-precision


def train_dreambooth(args: DreamBoothArgs) -> SingLoRAModel:
    """Run DreamBooth with SingLoRA; returns the adapted U-Net (``SingLoRAModel``). Writes into ``output_dir``:
    ``singlora/`` (adapter), ``diffusers_lora/`` (if ``export_lora``), ``checkpoint-N/``, ``validation/``."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    args.validate()
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    accelerator = Accelerator(mixed_precision=args.mixed_precision)  # accumulation: OptimizerStep
    set_seed(args.seed)
    pipe = load_pipeline(args.pretrained_model)
    pipe.set_progress_bar_config(disable=True)
    if args.with_prior_preservation:
        generate_class_images(pipe.to(accelerator.device), args)
    model = adapt_unet(pipe, args, accelerator.device)
    parameters = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=args.learning_rate, weight_decay=args.adam_weight_decay)
    model.bind_optimizer(optimizer)  # u(t) counts real optimizer steps (not micro-batches, not skipped fp16 steps)
    optimizer = accelerator.prepare(optimizer)
    checkpoint_adapter_only(accelerator, model)
    examples = Examples(pipe, args, accelerator)
    global_step = resume(accelerator, args, output_dir)
    examples.generator.manual_seed(args.seed + global_step)
    stepper = OptimizerStep(accelerator, pipe.unet, optimizer, None, parameters, max_grad_norm=args.max_grad_norm,
                            check_gradients=args.mixed_precision != "fp16",
                            advice=lambda: _advice(output_dir, args.learning_rate))
    model.train()
    logs: list[dict[str, float]] = []
    while global_step < args.max_train_steps:
        for index in range(args.gradient_accumulation_steps):
            with stepper.accumulating(index == args.gradient_accumulation_steps - 1):
                stepper.backward(examples.loss(), args.gradient_accumulation_steps)
        loss = stepper.step(f"optimizer step {global_step + 1}")
        if loss is None:  # never: DreamBooth stops on a non-finite loss or gradient
            continue
        global_step += 1
        logs.append({"step": global_step, "loss": loss})
        after_step(accelerator, pipe, model, args, global_step)
    return finish(model, args, logs)


def adapt_unet(pipe: Any, args: DreamBoothArgs, device: torch.device) -> SingLoRAModel:
    """Freeze the pipeline, inject SingLoRA into its U-Net and place everything on ``device``: frozen weights in
    the compute dtype (``--mixed-precision``; the SDXL VAE stays float32: it overflows in fp16), ``A`` in float32."""
    weight_dtype = WEIGHT_DTYPES[args.mixed_precision]
    unet = pipe.unet
    for module in (pipe.vae, pipe.text_encoder, getattr(pipe, "text_encoder_2", None), unet):
        if module is not None:
            module.requires_grad_(False)
    model = add_singlora(unet, r=args.r, alpha=args.alpha, target_modules=args.target_modules,
                         ramp_up_steps=args.ramp(), total_steps=args.max_train_steps, init=args.init)
    vae_dtype = torch.float32 if is_sdxl(pipe) else weight_dtype
    for module, dtype in ((unet, weight_dtype), (pipe.text_encoder, weight_dtype), (pipe.vae, vae_dtype),
                          (getattr(pipe, "text_encoder_2", None), weight_dtype)):
        if module is not None:
            module.to(device, **({} if dtype == torch.float32 else {"dtype": dtype}))
    for _, layer in model.singlora_layers():
        for adapter in layer.singlora.values():
            adapter.A.data = adapter.A.data.float()
    if args.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    return model


def checkpoint_adapter_only(accelerator: Any, model: SingLoRAModel) -> None:
    """``accelerator.save_state`` / ``load_state`` write and read the adapter (``<checkpoint>/singlora``), never
    the frozen U-Net; loading copies into the same parameters, so the optimizer state stays theirs."""

    def save_hook(models: list, weights: list, directory: str) -> None:
        model.save_adapter(Path(directory) / "singlora")
        weights.clear()

    def load_hook(models: list, directory: str) -> None:
        model.load_adapter_in_place(Path(directory) / "singlora", model.active_adapters[0])
        models.clear()

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)


class Examples:
    """The training examples: instance images with the instance prompt (and as many class images with the class
    prompt under prior preservation), drawn with ``generator``; prompts are encoded once."""

    def __init__(self, pipe: Any, args: DreamBoothArgs, accelerator: Any) -> None:
        self.pipe, self.args, self.accelerator = pipe, args, accelerator
        self.weight_dtype = WEIGHT_DTYPES[args.mixed_precision]
        self.instance_paths = list_images(args.instance_data_dir)
        self.class_paths = list_images(args.class_data_dir) if args.with_prior_preservation else []
        device = accelerator.device
        self.instance_text = encode_prompt(pipe, args.instance_prompt, args.resolution, device)
        self.class_text = encode_prompt(pipe, args.class_prompt, args.resolution, device) if self.class_paths else None
        self.generator = torch.Generator(device="cpu")

    def _draw(self, paths: list[Path], text: tuple[Tensor, Any]) -> tuple[list[Tensor], Tensor, Any]:
        """``train_batch_size`` images of ``paths`` and as many copies of ``text``'s embeddings."""
        picks = torch.randint(0, len(paths), (self.args.train_batch_size,), generator=self.generator).tolist()
        pixels = [image_tensor(paths[i], self.args.resolution, self.args.center_crop) for i in picks]
        return (pixels, *_repeat(*text, len(picks)))

    def loss(self) -> Tensor:
        """The loss of one micro-batch (``dreambooth_loss``: instance + ``prior_loss_weight`` * class)."""
        pixels, embeds, added = self._draw(self.instance_paths, self.instance_text)
        if self.class_paths:
            class_pixels, class_embeds, class_added = self._draw(self.class_paths, self.class_text)
            pixels += class_pixels
            embeds = torch.cat([embeds, class_embeds])
            added = None if added is None else {k: torch.cat([added[k], class_added[k]]) for k in added}
        latents = encode_images(self.pipe, torch.stack(pixels)).to(self.weight_dtype)
        with self.accelerator.autocast():
            per_sample = denoising_loss(self.pipe.unet, self.pipe.scheduler, latents, embeds.to(self.weight_dtype),
                                        added_cond_kwargs=added)
        return dreambooth_loss(per_sample, self.args.train_batch_size, self.args.prior_loss_weight)


def resume(accelerator: Any, args: DreamBoothArgs, output_dir: Path) -> int:
    """``--resume-from-checkpoint`` (a folder, or ``latest`` in ``output_dir``): load it; the optimizer steps it had
    taken (0 without the option)."""
    if not args.resume_from_checkpoint:
        return 0
    path = (_checkpoints(output_dir) or [None])[-1] if args.resume_from_checkpoint == "latest" else Path(
        args.resume_from_checkpoint)
    if path is None or not Path(path).is_dir():
        raise SingLoRAError(f"--resume-from-checkpoint {args.resume_from_checkpoint!r}: no such checkpoint")
    accelerator.load_state(str(path))
    return int(Path(path).name.split("-")[-1])


def _advice(output_dir: Path, learning_rate: float) -> str:
    """What to do after a non-finite step stopped the run."""
    checkpoints = _checkpoints(output_dir)
    return (f"resume from the last checkpoint ({checkpoints[-1]}) with --resume-from-checkpoint latest"
            if checkpoints else "no checkpoint was written yet") + f" (or lower --learning-rate={learning_rate})"


def after_step(accelerator: Any, pipe: Any, model: SingLoRAModel, args: DreamBoothArgs, step: int) -> None:
    """Every ``checkpointing_steps``: a checkpoint (the oldest removed beyond ``checkpoints_total_limit``); every
    ``validation_steps`` and at the end: validation images."""
    output_dir = Path(args.output_dir)
    if args.checkpointing_steps and step % args.checkpointing_steps == 0:
        if args.checkpoints_total_limit is not None:
            existing = _checkpoints(output_dir)
            for old in existing[: max(0, len(existing) - args.checkpoints_total_limit + 1)]:
                shutil.rmtree(old)
        accelerator.save_state(str(output_dir / f"checkpoint-{step}"))
    if args.validation_prompt and (step % args.validation_steps == 0 or step == args.max_train_steps):
        model.eval()
        save_validation_images(pipe, args, step)
        model.train()


def finish(model: SingLoRAModel, args: DreamBoothArgs, logs: list[dict[str, float]]) -> SingLoRAModel:
    """Write the adapter (``singlora/``), its diffusers LoRA (``diffusers_lora/``) and ``train_log.json``."""
    output_dir = Path(args.output_dir)
    model.eval()
    model.save_adapter(output_dir / "singlora")
    if args.export_lora:
        from ..export import export_lora

        export_lora(model, output_dir / "diffusers_lora", format="diffusers")
    atomic_write_text(output_dir / "train_log.json", json.dumps(logs) + "\n")
    return model
