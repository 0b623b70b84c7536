"""Offline proof that DreamBooth with SingLoRA learns a subject, compared with LoRA (diffusers recipe, PEFT).

No pretrained diffusion weights exist offline, so the study builds its own small world on Fashion-MNIST
(Debian package ``dataset-fashion-mnist``; images downsampled to 16x16, pixel space, no VAE):

1. A tiny text-conditioned ``UNet2DConditionModel`` + tiny ``CLIPTextModel`` (word-level tokenizer) is trained as a
   class-conditional generator ("a photo of a <class>") on 9 classes; the subject class (ankle boot) is held out.
2. A small CNN classifier is trained on all 10 classes: the measuring instrument.
3. DreamBooth: ``n_instance`` boot images with the prompt "a photo of sks sneaker" (``sks`` is a token the text
   encoder never saw), 400 steps, adapters on U-Net attention ``to_q`` + ``to_k`` (self- and cross-attention), text
   encoder frozen. Methods: SingLoRA r=8 and r=16, PEFT LoRA r=8 (SingLoRA r=16 and LoRA r=8 have about equal
   parameters). Each method's lr is chosen from a sweep on a validation seed that is not a measurement seed, then
   the chosen lr runs on the measurement seeds; fixed-lr rows with ``to_v`` + ``to_out.0`` added are extras.
4. Measured on samples (DDIM, classifier-free guidance): subject accuracy = fraction of "a photo of sks" samples
   the classifier calls "ankle boot"; nearest-neighbour distance of those samples to the instance images;
   retention = classifier accuracy on the 9 known classes' prompts after adaptation.

Run: ``nice -n 10 .venv/bin/python studies/dreambooth_fashion/run.py`` (writes results.json, REPORT.md, grid.png
beside this file). ``--quick`` for a smoke run. Needs ``apt-get install dataset-fashion-mnist``.
"""

from __future__ import annotations

import argparse
import copy
import gzip
import json
import platform
import struct
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from torch_singlora.atomic import atomic_write, atomic_write_text
from torch_singlora.diffusion.dreambooth import DEFAULT_TARGETS, add_singlora, denoising_loss
from torch_singlora.diffusion.tiny import tiny_text_encoder, tiny_tokenizer

HERE = Path(__file__).resolve().parent
DATA_DIR = Path("/usr/share/datasets/fashion-mnist")
CLASS_WORDS = ["tshirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "boot"]
SUBJECT_TOKEN = "sks"
MAX_LENGTH = 8


@dataclass
class StudyConfig:
    """Sizes and settings of the study (defaults: the committed full run)."""

    image_size: int = 16
    channels: tuple[int, ...] = (16, 32)
    text_dim: int = 16                # = cross_attention_dim: cross-attention to_k is (32, 16)
    base_steps: int = 3000
    base_batch: int = 32
    base_lr: float = 1e-3
    base_schedule: str = "cosine"     # after a linear warm-up: "constant" or "cosine" (decay to 10% of base_lr)
    uncond_prob: float = 0.1          # prompt dropout during base training, for classifier-free guidance
    classifier_epochs: int = 2
    classifier_train_size: int = 60000
    subject_class: int = 9            # ankle boot: held out of base training
    n_instance: int = 5
    db_steps: int = 400               # the paper's 400 iterations
    db_batch: int = 4
    n_subject_samples: int = 64
    n_retention_per_class: int = 8
    sample_steps: int = 20
    guidance: float = 1.0             # classifier-free guidance scale (1 = none): see REPORT.md for why 1
    seeds: tuple[int, ...] = (0, 1, 2)   # the final measurement seeds
    class_noun: str = "sneaker"       # DreamBooth's "a [V] [class noun]": the nearest known class ("" = none)
    # (method, r, targets: a key of TARGETS): lr chosen from sweep_lrs on sweep_seed alone, then run on every seed
    sweep: tuple[tuple[str, int, str], ...] = (("singlora", 8, "qk"), ("singlora", 16, "qk"), ("lora", 8, "qk"))
    sweep_lrs: tuple[float, ...] = (3e-4, 1e-3, 3e-3, 1e-2, 3e-2)
    sweep_seed: int = 100             # a validation seed: not one of ``seeds``
    methods: tuple[tuple[str, int, float, str], ...] = (  # fixed-lr extras: (method, r, lr, targets)
        ("singlora", 16, 1e-3, "qkvo"), ("lora", 8, 1e-3, "qkvo"),
    )
    threads: int = 1


QUICK = dict(base_steps=30, classifier_epochs=1, classifier_train_size=2000, db_steps=10, n_subject_samples=8,
             n_retention_per_class=2, sample_steps=4, seeds=(0,), sweep=(("singlora", 8, "qk"), ("lora", 8, "qk")),
             sweep_lrs=(1e-3, 1e-2), methods=())
TARGETS = {"qk": DEFAULT_TARGETS, "qkvo": [*DEFAULT_TARGETS, "to_v", "to_out.0"]}  # qk: the paper's setting


# ---- data -----------------------------------------------------------------------------------------------------


def read_idx(path: Path) -> np.ndarray:
    """An IDX file (the MNIST format, gzip-compressed) -> uint8 array."""
    with gzip.open(path, "rb") as handle:
        data = handle.read()
    _, _, kind, ndim = struct.unpack(">BBBB", data[:4])
    if kind != 0x08:
        raise ValueError(f"{path}: IDX type {kind:#x}, expected unsigned bytes (0x08)")
    shape = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def load_fashion_mnist(size: int, root: Path = DATA_DIR) -> dict[str, Tensor]:
    """Fashion-MNIST resized to ``size`` x ``size``, pixels in [-1, 1]: train/test images (N, 1, S, S) and labels."""
    if not (root / "train-images-idx3-ubyte.gz").is_file():
        raise SystemExit(f"Fashion-MNIST not found in {root}: run `apt-get install dataset-fashion-mnist` (Debian)")
    out: dict[str, Tensor] = {}
    for split, prefix in (("train", "train"), ("test", "t10k")):
        images = torch.from_numpy(read_idx(root / f"{prefix}-images-idx3-ubyte.gz").copy()).float()[:, None] / 255.0
        images = F.interpolate(images, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        out[f"{split}_x"] = images * 2 - 1
        out[f"{split}_y"] = torch.from_numpy(read_idx(root / f"{prefix}-labels-idx1-ubyte.gz").astype(np.int64))
    return out


# ---- models ---------------------------------------------------------------------------------------------------


def build_unet(config: StudyConfig, seed: int = 0) -> nn.Module:
    """Pixel-space U-Net: a plain ResNet block at full resolution, cross-attention blocks below and in the middle."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=config.image_size, in_channels=1, out_channels=1, block_out_channels=config.channels,
        layers_per_block=1, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=config.text_dim, attention_head_dim=8,
        norm_num_groups=8,
    )


class Classifier(nn.Module):
    """Small CNN: (B, 1, 16, 16) -> (B, 10) logits."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear(64 * 16, 128), nn.ReLU(), nn.Linear(128, 10),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


def train_classifier(data: dict[str, Tensor], epochs: int, size: int, seed: int = 0) -> tuple[Classifier, float]:
    """Train on the first ``size`` training images (all 10 classes); returns the classifier and its test accuracy."""
    torch.manual_seed(seed)
    model = Classifier()
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    x, y = data["train_x"][:size], data["train_y"][:size]
    for _ in range(epochs):
        for batch in torch.randperm(len(x)).split(256):
            loss = F.cross_entropy(model(x[batch]), y[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return model.eval(), accuracy(model, data["test_x"], data["test_y"])


@torch.no_grad()
def accuracy(model: nn.Module, x: Tensor, y: Tensor) -> float:
    predictions = torch.cat([model(chunk).argmax(1) for chunk in x.split(1024)])
    return float((predictions == y).float().mean())


class TextConditioning:
    """Tokenizer + text encoder; ``embed(prompts)`` -> (B, MAX_LENGTH, hidden_size)."""

    def __init__(self, hidden_size: int, seed: int = 0) -> None:
        self.tokenizer = tiny_tokenizer(["a", "photo", "of", SUBJECT_TOKEN, *CLASS_WORDS], max_length=MAX_LENGTH)
        self.encoder = tiny_text_encoder(len(self.tokenizer), hidden_size=hidden_size, max_length=MAX_LENGTH, seed=seed)

    def ids(self, prompts: list[str]) -> Tensor:
        return self.tokenizer(prompts, padding="max_length", max_length=MAX_LENGTH, truncation=True,
                              return_tensors="pt").input_ids

    def embed(self, prompts: list[str]) -> Tensor:
        return self.encoder(self.ids(prompts)).last_hidden_state


def class_prompt(label: int) -> str:
    return f"a photo of a {CLASS_WORDS[label]}"


def scheduler() -> object:
    from diffusers import DDPMScheduler

    return DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear", beta_start=1e-4, beta_end=0.02,
                         prediction_type="epsilon")


def lr_factor(step: int, total: int, kind: str) -> float:
    """Learning-rate multiplier at ``step`` of ``total``: linear warm-up over the first 5%, then constant or a
    cosine decay to 0.1."""
    warmup = max(1, total // 20)
    if step < warmup:
        return (step + 1) / warmup
    if kind == "constant":
        return 1.0
    if kind == "cosine":
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return 0.1 + 0.45 * (1 + float(np.cos(np.pi * progress)))
    raise ValueError(f"base_schedule={kind!r} must be 'constant' or 'cosine'")


def train_base(config: StudyConfig, data: dict[str, Tensor], seed: int = 0) -> tuple[nn.Module, TextConditioning, list[float]]:
    """Class-conditional training on every class but the subject's; U-Net and text encoder train jointly."""
    unet, text = build_unet(config, seed), TextConditioning(config.text_dim, seed)
    keep = data["train_y"] != config.subject_class
    x, y = data["train_x"][keep], data["train_y"][keep]
    noise_scheduler = scheduler()
    parameters = list(unet.parameters()) + list(text.encoder.parameters())
    optimizer = torch.optim.AdamW(parameters, lr=config.base_lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, config.base_steps, config.base_schedule))
    generator = torch.Generator().manual_seed(seed)
    losses = []
    unet.train()
    for step in range(config.base_steps):
        batch = torch.randint(0, len(x), (config.base_batch,), generator=generator)
        prompts = [class_prompt(int(label)) for label in y[batch]]
        drop = torch.rand(len(prompts), generator=generator) < config.uncond_prob
        prompts = ["" if d else p for p, d in zip(prompts, drop.tolist())]
        loss = denoising_loss(unet, noise_scheduler, x[batch], text.embed(prompts), generator=generator).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        schedule.step()
        losses.append(float(loss.detach()))
        if (step + 1) % 500 == 0:
            print(f"base step {step + 1}/{config.base_steps}: loss {np.mean(losses[-100:]):.4f}", flush=True)
    unet.eval()
    text.encoder.eval().requires_grad_(False)
    return unet, text, losses


@torch.no_grad()
def sample(unet: nn.Module, cond: Tensor, uncond: Tensor, *, steps: int, guidance: float, seed: int) -> Tensor:
    """DDIM with classifier-free guidance. ``cond``: (B, L, D) prompt embeddings; ``uncond``: (1, L, D).
    Returns (B, 1, S, S) images in [-1, 1]."""
    from diffusers import DDIMScheduler

    ddim = DDIMScheduler.from_config(scheduler().config)
    ddim.set_timesteps(steps)
    batch, size = cond.shape[0], unet.config.sample_size
    x = torch.randn(batch, 1, size, size, generator=torch.Generator().manual_seed(seed))
    text = torch.cat([cond, uncond.expand(batch, -1, -1)])
    for t in ddim.timesteps:
        if guidance == 1.0:  # no guidance: the conditional prediction alone (the unconditional one would cancel)
            eps = unet(x, t, cond).sample
        else:
            eps_cond, eps_uncond = unet(torch.cat([x, x]), t, text).sample.chunk(2)
            eps = eps_uncond + guidance * (eps_cond - eps_uncond)
        x = ddim.step(eps, t, x).prev_sample
    return x.clamp(-1, 1)


# ---- DreamBooth -----------------------------------------------------------------------------------------------


def subject_prompt(config: StudyConfig) -> str:
    return f"a photo of {SUBJECT_TOKEN} {config.class_noun}".strip()


def add_adapter(unet: nn.Module, method: str, r: int, steps: int, targets: list[str]) -> tuple[nn.Module, list[nn.Parameter]]:
    """SingLoRA (this library) or LoRA (PEFT through diffusers' ``unet.add_adapter``, as in the diffusers recipe)
    on ``targets``; alpha = r for both. Returns the model to call and its trainable parameters."""
    if method == "singlora":
        model = add_singlora(unet, r=r, target_modules=targets, ramp_up_steps=0.01, total_steps=steps)
    elif method == "lora":
        from peft import LoraConfig

        unet.requires_grad_(False)
        unet.add_adapter(LoraConfig(r=r, lora_alpha=r, init_lora_weights="gaussian", target_modules=targets))
        model = unet
    else:
        raise ValueError(f"method={method!r} must be 'singlora' or 'lora'")
    return model, [p for p in model.parameters() if p.requires_grad]


def dreambooth(base: nn.Module, text: TextConditioning, instances: Tensor, method: str, r: int, lr: float,
               targets: list[str], config: StudyConfig, seed: int) -> tuple[nn.Module, int, list[float], float]:
    """Adapt a copy of ``base`` to ``instances`` (N, 1, S, S) with the subject prompt ('a photo of sks sneaker').
    Returns (adapted U-Net, trainable parameter count, losses, seconds)."""
    torch.manual_seed(seed)
    unet = copy.deepcopy(base)
    model, parameters = add_adapter(unet, method, r, config.db_steps, targets)
    optimizer = torch.optim.AdamW(parameters, lr=lr, weight_decay=1e-2)
    if method == "singlora":
        model.bind_optimizer(optimizer)
    with torch.no_grad():
        embeds = text.embed([subject_prompt(config)])
    noise_scheduler = scheduler()
    generator = torch.Generator().manual_seed(seed)
    losses = []
    start = time.perf_counter()
    model.train()
    for _ in range(config.db_steps):
        batch = torch.randint(0, len(instances), (config.db_batch,), generator=generator)
        loss = denoising_loss(model, noise_scheduler, instances[batch], embeds.expand(len(batch), -1, -1),
                              generator=generator).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        losses.append(float(loss.detach()))
    model.eval()
    return unet, sum(p.numel() for p in parameters), losses, time.perf_counter() - start


def evaluate(unet: nn.Module, text: TextConditioning, classifier: nn.Module, instances: Tensor,
             config: StudyConfig, seed: int) -> tuple[dict[str, float], Tensor]:
    """Subject accuracy, nearest-neighbour distance to the instances, retention on the known classes.
    Returns (metrics, the subject samples)."""
    with torch.no_grad():
        uncond = text.embed([""])
        subject = text.embed([subject_prompt(config)]).expand(config.n_subject_samples, -1, -1)
        known = [c for c in range(10) if c != config.subject_class]
        labels = torch.tensor(known).repeat_interleave(config.n_retention_per_class)
        retention_embeds = text.embed([class_prompt(int(c)) for c in labels])
    kwargs = dict(steps=config.sample_steps, guidance=config.guidance)
    subject_images = sample(unet, subject, uncond, seed=seed + 1000, **kwargs)
    retention_images = sample(unet, retention_embeds, uncond, seed=seed + 2000, **kwargs)
    with torch.no_grad():
        predicted = classifier(subject_images).argmax(1)
    distances = torch.cdist(subject_images.flatten(1), instances.flatten(1)).min(1).values / subject_images[0].numel() ** 0.5
    metrics = {
        "subject_accuracy": float((predicted == config.subject_class).float().mean()),
        "subject_nn_rms": float(distances.mean()),
        "retention_accuracy": accuracy(classifier, retention_images, labels),
    }
    return metrics, subject_images


# ---- report ---------------------------------------------------------------------------------------------------


def save_grid(rows: list[tuple[str, Tensor]], path: Path, columns: int = 8, scale: int = 4) -> None:
    """One labelled row of images per entry: images (N, 1, S, S) in [-1, 1] -> PNG."""
    from PIL import Image, ImageDraw

    size = rows[0][1].shape[-1] * scale
    label_width = 150
    canvas = Image.new("L", (label_width + columns * (size + 2), len(rows) * (size + 2)), color=255)
    draw = ImageDraw.Draw(canvas)
    for row, (label, images) in enumerate(rows):
        draw.text((4, row * (size + 2) + size // 2 - 6), label, fill=0)
        for column, image in enumerate(images[:columns]):
            pixels = ((image[0].clamp(-1, 1) + 1) * 127.5).round().byte().numpy()
            tile = Image.fromarray(pixels, mode="L").resize((size, size), Image.NEAREST)
            canvas.paste(tile, (label_width + column * (size + 2), row * (size + 2)))
    canvas.save(path)


def table(rows: list[dict], with_std: bool) -> list[str]:
    """Markdown table of summary rows (``with_std``: mean ± std over seeds) or of single sweep runs."""
    lines = [
        "| method | r | lr | targets | trainable params | subject accuracy | NN distance (RMS) | retention accuracy | final loss | train s |"
        + (" chosen |" if not with_std else ""),
        "|---|---|---|---|---|---|---|---|---|---|" + ("---|" if not with_std else ""),
    ]
    for row in rows:
        subject, retention = f"{row['subject_accuracy']:.3f}", f"{row['retention_accuracy']:.3f}"
        if with_std:
            subject += f" ± {row['subject_accuracy_std']:.3f}"
            retention += f" ± {row['retention_accuracy_std']:.3f}"
        loss = "-" if row["final_loss"] is None else format(row["final_loss"], ".4f")
        line = (f"| {row['method']} | {row['r']} | {row['lr']:g} | {row['targets']} | {row['params']:,} | {subject} | "
                f"{row['subject_nn_rms']:.3f} | {retention} | {loss} | {row['train_seconds']:.0f} |")
        if not with_std:
            line += " **yes** |" if row.get("chosen") else " |"
        lines.append(line)
    return lines


def write_report(results: dict, path: Path) -> None:
    config = results["config"]
    lines = [
        "# DreamBooth on Fashion-MNIST: SingLoRA vs LoRA (offline study)",
        "",
        f"Command: `{results['command']}`. Wall time {results['wall_seconds']:.0f} s (process CPU time "
        f"{results['cpu_seconds']:.0f} s) on {results['machine']}, {config['threads']} thread(s), a CPU shared with "
        f"other jobs. Base generator: {config['base_steps']} steps, batch {config['base_batch']}, lr "
        f"{config['base_lr']:g} ({config['base_schedule']} schedule after a 5% warm-up), trained in "
        f"{results['base']['seconds']:.0f} s"
        f"{' (loaded from --base-cache; the wall time above excludes it)' if results['base_from_cache'] else ''}, final loss "
        f"{results['base']['final_loss']:.4f}. Classifier ({config['classifier_epochs']} epoch(s) on "
        f"{config['classifier_train_size']} training images, all 10 classes): test accuracy "
        f"{results['classifier_test_accuracy']:.3f}.",
        "",
        f"Subject: {config['n_instance']} Fashion-MNIST 'ankle boot' images (a class held out of base training), "
        f"prompt '{results['subject_prompt']}'; {config['db_steps']} steps, batch {config['db_batch']}, adapters on "
        f"U-Net attention (self- and cross-): targets qk = `to_q` + `to_k` (the paper's), qkvo = + `to_v`, "
        f"`to_out.0`; alpha = r. Samples: DDIM {config['sample_steps']} steps, "
        f"guidance {config['guidance']} (1 = none; why: README.md); {config['n_subject_samples']} subject samples and "
        f"{config['n_retention_per_class']} per known class per seed.",
        "",
    ]
    if results["sweep"]:
        lines += [
            f"## Learning-rate choice (validation seed {config['sweep_seed']}, not a measurement seed)",
            "",
            f"Each method ran once at each lr in {list(config['sweep_lrs'])} on seed {config['sweep_seed']}. Chosen: "
            "the highest subject accuracy + retention accuracy; ties go to the lower NN distance, then the lower lr.",
            "",
            *table(results["sweep"], with_std=False),
            "",
        ]
    lines += [
        f"## Final comparison (seeds {list(config['seeds'])}, mean ± std)",
        "",
        *table(results["summary"], with_std=True),
        "",
        f"Subject accuracy: fraction of '{results['subject_prompt']}' samples the classifier labels 'ankle boot'. NN "
        "distance: RMS pixel distance (pixels in [-1, 1]) from each subject sample to the nearest instance image. "
        "Retention: classifier accuracy on samples of the 9 known class prompts after adaptation (the base row is "
        "the unadapted model). Final loss: mean DreamBooth loss over the last 50 steps. Trainable params: SingLoRA "
        "r * max(out, in) per matrix, LoRA r * (out + in), so SingLoRA r=16 and LoRA r=8 on qk are about equal."
        + (f" 'reference base': the generator loaded from {results['reference_base']}, evaluated the same way."
           if results.get("reference_base") else ""),
        "",
        "![samples](grid.png)",
        "",
        f"Grid rows: the instance images, then '{results['subject_prompt']}' samples from the base model and each "
        f"adapted model (seed {config['seeds'][0]}).",
        "",
    ]
    atomic_write_text(path, "\n".join(lines))


def load_base(config: StudyConfig, saved: dict) -> tuple[nn.Module, TextConditioning]:
    """The U-Net and text encoder from a cache dict written by ``cached_base``, in eval mode and frozen."""
    unet, text = build_unet(config), TextConditioning(config.text_dim)
    unet.load_state_dict(saved["unet"])
    text.encoder.load_state_dict(saved["text"])
    text.encoder.eval().requires_grad_(False)
    return unet.eval(), text


def cached_base(config: StudyConfig, data: dict[str, Tensor], cache: Path | None) -> tuple[nn.Module, TextConditioning, list[float], float, bool]:
    """``train_base``, or its saved result from ``cache`` (a .pt file of state dicts, written after training) when
    it exists and matches ``config``'s base settings. Returns (U-Net, text, losses, training seconds, from cache)."""
    key = {k: v for k, v in asdict(config).items() if k in ("image_size", "channels", "text_dim", "base_steps",
                                                           "base_batch", "base_lr", "base_schedule", "uncond_prob",
                                                           "subject_class")}
    if cache is not None and cache.is_file():
        saved = torch.load(cache, weights_only=True)
        if saved["key"] == json.dumps(key, sort_keys=True):
            return (*load_base(config, saved), saved["losses"], saved["seconds"], True)
    start = time.perf_counter()
    unet, text, losses = train_base(config, data)
    seconds = time.perf_counter() - start
    if cache is not None:
        state = {"key": json.dumps(key, sort_keys=True), "unet": unet.state_dict(),
                 "text": text.encoder.state_dict(), "losses": losses, "seconds": seconds}
        atomic_write(cache, lambda tmp: torch.save(state, tmp))
    return unet, text, losses, seconds, False


def choose_lr(rows: list[dict]) -> float:
    """The learning rate of the sweep ``rows`` (one method, one validation seed) with the highest subject accuracy
    + retention accuracy (learning the subject and keeping the known classes count alike); ties go to the lower
    nearest-neighbour distance, then the lower lr."""
    if not rows:
        raise ValueError("choose_lr: no sweep rows")
    best = max(rows, key=lambda row: (row["subject_accuracy"] + row["retention_accuracy"], -row["subject_nn_rms"],
                                      -row["lr"]))
    return best["lr"]


@dataclass
class Setup:
    """What every DreamBooth run of one study shares: the base model, its text encoder, the classifier, the
    instance images."""

    config: StudyConfig
    base: nn.Module
    text: TextConditioning
    classifier: nn.Module
    instances: Tensor


def run_one(setup: Setup, method: str, r: int, lr: float, targets: str, seed: int) -> tuple[dict, Tensor]:
    """One DreamBooth run and its evaluation: (the run's record, its subject samples)."""
    unet, params, losses, seconds = dreambooth(setup.base, setup.text, setup.instances, method, r, lr, TARGETS[targets],
                                               setup.config, seed)
    metrics, images = evaluate(unet, setup.text, setup.classifier, setup.instances, setup.config, seed)
    print(f"{method} r={r} lr={lr:g} {targets} seed={seed}: {metrics} ({seconds:.0f} s)", flush=True)
    return {"method": method, "r": r, "lr": lr, "targets": targets, "seed": seed, "params": params,
            "final_loss": float(np.mean(losses[-50:])), "train_seconds": seconds, **metrics}, images


def base_record(setup: Setup, unet: nn.Module, text: TextConditioning, label: str, seed: int) -> tuple[dict, Tensor]:
    """Evaluation of an unadapted model: (its record, its subject samples)."""
    metrics, images = evaluate(unet, text, setup.classifier, setup.instances, setup.config, seed)
    print(f"{label} seed={seed}: {metrics}", flush=True)
    return {"method": label, "r": 0, "lr": 0.0, "targets": "-", "seed": seed, "params": 0, "final_loss": None,
            "train_seconds": 0.0, **metrics}, images


def sweep_lrs(setup: Setup) -> tuple[list[dict], dict[tuple[str, int, str], float]]:
    """Every ``config.sweep`` entry at every ``config.sweep_lrs`` on ``config.sweep_seed``; returns the sweep runs
    (each with ``chosen``) and the chosen lr per entry."""
    config, runs, chosen = setup.config, [], {}
    for method, r, targets in config.sweep:
        rows = [run_one(setup, method, r, lr, targets, config.sweep_seed)[0] for lr in config.sweep_lrs]
        chosen[(method, r, targets)] = choose_lr(rows)
        runs += [{**row, "chosen": row["lr"] == chosen[(method, r, targets)]} for row in rows]
    return runs, chosen


def summarize(runs: list[dict]) -> list[dict]:
    """Mean (and subject accuracy std) over seeds per (method, r, lr, targets), in first-seen order."""
    summary = []
    for key in dict.fromkeys((run["method"], run["r"], run["lr"], run["targets"]) for run in runs):
        group = [run for run in runs if (run["method"], run["r"], run["lr"], run["targets"]) == key]
        row = {"method": key[0], "r": key[1], "lr": key[2], "targets": key[3], "params": group[0]["params"]}
        for metric in ("subject_accuracy", "subject_nn_rms", "retention_accuracy", "final_loss", "train_seconds"):
            values = [run[metric] for run in group if run[metric] is not None]
            row[metric] = float(np.mean(values)) if values else None
        for metric in ("subject_accuracy", "retention_accuracy"):
            row[f"{metric}_std"] = float(np.std([run[metric] for run in group]))
        row["n_seeds"] = len(group)
        summary.append(row)
    return summary


def run(config: StudyConfig, data: dict[str, Tensor], out_dir: Path, command: str, base_cache: Path | None = None,
        reference_base: Path | None = None) -> dict:
    """The whole study; writes results.json, REPORT.md and grid.png into ``out_dir`` and returns the results.
    ``reference_base``: another cached base generator (e.g. an earlier run's), evaluated beside the base on the
    final seeds."""
    torch.set_num_threads(config.threads)
    if config.sweep_seed in config.seeds:
        raise ValueError(f"sweep_seed={config.sweep_seed} must not be one of seeds={config.seeds}")
    start, cpu_start = time.perf_counter(), time.process_time()
    out_dir.mkdir(parents=True, exist_ok=True)
    base, text, base_losses, base_seconds, from_cache = cached_base(config, data, base_cache)
    print(f"base generator: {config.base_steps} steps in {base_seconds:.0f} s, loss {np.mean(base_losses[-50:]):.4f}",
          flush=True)
    classifier, classifier_accuracy = train_classifier(data, config.classifier_epochs, config.classifier_train_size)
    print(f"classifier test accuracy {classifier_accuracy:.3f}", flush=True)
    generator = torch.Generator().manual_seed(1234)
    subject_indices = (data["train_y"] == config.subject_class).nonzero().flatten()
    pick = subject_indices[torch.randperm(len(subject_indices), generator=generator)[: config.n_instance]]
    setup = Setup(config, base, text, classifier, data["train_x"][pick])

    sweep_runs, chosen = [], {}
    if config.sweep:
        sweep_runs, chosen = sweep_lrs(setup)
        sweep_runs.insert(0, base_record(setup, base, text, "base", config.sweep_seed)[0])
    runs, grid = [], [("instance images", setup.instances)]
    for seed in config.seeds:
        record, images = base_record(setup, base, text, "base", seed)
        runs.append(record)
        if seed == config.seeds[0]:
            grid.append(("base (no adapter)", images))
    if reference_base is not None:
        reference, reference_text = load_base(config, torch.load(reference_base, weights_only=True))
        runs += [base_record(setup, reference, reference_text, "reference base", seed)[0] for seed in config.seeds]
    final = [(method, r, lr, targets) for (method, r, targets), lr in chosen.items()] + list(config.methods)
    for method, r, lr, targets in final:
        for seed in config.seeds:
            record, images = run_one(setup, method, r, lr, targets, seed)
            runs.append(record)
            if seed == config.seeds[0]:
                grid.append((f"{method} r={r} lr={lr:g} {targets}", images))

    results = {
        "command": command,
        "machine": f"{platform.machine()} CPU, torch {torch.__version__}",
        "config": asdict(config),
        "subject_prompt": subject_prompt(config),
        "base_from_cache": from_cache,
        "reference_base": None if reference_base is None else str(reference_base),
        "wall_seconds": time.perf_counter() - start,
        "cpu_seconds": time.process_time() - cpu_start,
        "base": {"seconds": base_seconds, "final_loss": float(np.mean(base_losses[-50:]))},
        "classifier_test_accuracy": classifier_accuracy,
        "chosen_lrs": [{"method": m, "r": r, "targets": t, "lr": lr} for (m, r, t), lr in chosen.items()],
        "summary": summarize(runs),
        "sweep": sweep_runs,
        "runs": runs,
    }
    atomic_write_text(out_dir / "results.json", json.dumps(results, indent=2) + "\n")
    write_report(results, out_dir / "REPORT.md")
    save_grid(grid, out_dir / "grid.png")
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=HERE, help="output folder (default: beside this script)")
    parser.add_argument("--quick", action="store_true", help="a smoke run with tiny step counts")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--class-noun", default=StudyConfig.class_noun,
                        help="class noun of the subject prompt ('' for 'a photo of sks')")
    parser.add_argument("--base-cache", type=Path, default=None,
                        help="reuse the trained base generator from this .pt file (written on first use)")
    parser.add_argument("--reference-base", type=Path, default=None,
                        help="also evaluate this cached base generator (a --base-cache file of another run)")
    args = parser.parse_args()
    config = StudyConfig(threads=args.threads, class_noun=args.class_noun, **(QUICK if args.quick else {}))
    command = "python studies/dreambooth_fashion/run.py" + (" --quick" if args.quick else "")
    if args.threads != 1:
        command += f" --threads {args.threads}"
    if args.class_noun != StudyConfig.class_noun:
        command += f" --class-noun '{args.class_noun}'"
    if args.base_cache is not None:
        command += f" --base-cache {args.base_cache}"
    if args.reference_base is not None:
        command += f" --reference-base {args.reference_base}"
    results = run(config, load_fashion_mnist(config.image_size), args.out, command, args.base_cache,
                  args.reference_base)
    print(json.dumps(results["summary"], indent=2))
    print(f"wall time {results['wall_seconds']:.0f} s -> {args.out}")


if __name__ == "__main__":
    main()
