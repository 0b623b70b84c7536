"""``singlora dreambooth`` and ``singlora dreambooth-eval`` (registered by ``torch_singlora.cli`` through ``add_parser``).

    singlora dreambooth --pretrained-model SD_FOLDER --instance-data-dir DOG/ --instance-prompt "a photo of sks dog" \\
        --output-dir OUT [--r 8] [--learning-rate 1e-3] [--max-train-steps 400] [--with-prior-preservation ...]
    singlora dreambooth-eval --generated GEN/ --reference DOG/ --prompt "a photo of sks dog on the beach" \\
        --dino-model DINO_FOLDER --clip-model CLIP_FOLDER [--output scores.json]
    singlora dreambooth-eval --pretrained-model SD_FOLDER --adapter OUT/singlora --prompt "..." --num-images 4 \\
        --generated GEN/ --reference DOG/ --clip-model CLIP_FOLDER          # sample first, then score
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import typing
from pathlib import Path
from typing import Any

from ..atomic import atomic_write_text, check_output_file, output_folder
from ..errors import SingLoRAError


def _add_dreambooth_arguments(parser: argparse.ArgumentParser) -> None:
    """One ``--flag`` per ``DreamBoothArgs`` field (required fields are required; lists take several values)."""
    from .dreambooth import DreamBoothArgs

    hints = typing.get_type_hints(DreamBoothArgs)
    for spec in dataclasses.fields(DreamBoothArgs):
        flag = "--" + spec.name.replace("_", "-")
        kind = hints[spec.name]
        help_text = spec.metadata.get("help", "")
        if spec.default is dataclasses.MISSING and spec.default_factory is dataclasses.MISSING:
            parser.add_argument(flag, dest=spec.name, required=True, help=help_text)
        elif kind is bool:
            parser.add_argument(flag, dest=spec.name, action=argparse.BooleanOptionalAction, default=spec.default,
                                help=help_text)
        elif typing.get_origin(kind) is list:
            default = spec.default_factory()
            parser.add_argument(flag, dest=spec.name, nargs="+", default=default,
                                help=f"{help_text} (default: {' '.join(default)})")
        else:
            base = next((a for a in typing.get_args(kind) if a is not type(None)), kind)
            parser.add_argument(flag, dest=spec.name, type=base, default=spec.default,
                                help=f"{help_text} (default: {spec.default})")


def cmd_dreambooth(args: argparse.Namespace) -> None:
    from .dreambooth import DreamBoothArgs, train_dreambooth

    options = DreamBoothArgs(**{spec.name: getattr(args, spec.name) for spec in dataclasses.fields(DreamBoothArgs)})
    model = train_dreambooth(options)
    print(f"adapter: {Path(options.output_dir) / 'singlora'} (step {model.get_ramp_step()})")
    if options.export_lora:
        print(f"diffusers LoRA: {Path(options.output_dir) / 'diffusers_lora'} (pipe.load_lora_weights)")


def _prompts_for(generated: Path, args: argparse.Namespace) -> dict[str, str]:
    if args.prompt is not None:
        from .dreambooth import list_images

        return {path.name: args.prompt for path in list_images(generated)}
    prompts_file = Path(args.prompts_file or generated / "prompts.json")
    if not prompts_file.is_file():
        raise SingLoRAError(f"--prompts-file {str(prompts_file)!r} not found: give --prompt or a JSON "
                            "{image file name: prompt}")
    from ..untrusted import read_json

    prompts = read_json(prompts_file, what="--prompts-file: a JSON {image file name: prompt}")
    if not isinstance(prompts, dict) or not all(isinstance(v, str) for v in prompts.values()):
        raise SingLoRAError(f"--prompts-file {prompts_file}: expected an object {{image file name: prompt}}")
    return prompts


def cmd_dreambooth_eval(args: argparse.Namespace) -> None:
    from PIL import Image

    from .dreambooth import list_images
    from .pipeline import generate_images
    from .metrics import fidelity_scores

    generated = Path(args.generated)
    inputs = {"--pretrained-model": args.pretrained_model, "--adapter": args.adapter, "--reference": args.reference,
              "--dino-model": args.dino_model, "--clip-model": args.clip_model,
              "--prompts-file": None if args.prompt else args.prompts_file or generated / "prompts.json"}
    if args.output:
        check_output_file(args.output, flag="--output", overwrite=args.overwrite, inputs=inputs)
    if args.pretrained_model is not None:
        if args.prompt is None:
            raise SingLoRAError("--pretrained-model samples images first: give --prompt")
        with output_folder(generated, command="dreambooth-eval", inputs=inputs, overwrite=args.overwrite) as tmp:
            generate_images(args.pretrained_model, args.adapter, [args.prompt], tmp, num_images=args.num_images,
                            seed=args.seed, steps=args.inference_steps, resolution=args.resolution)
    elif args.adapter is not None:
        raise SingLoRAError("--adapter needs --pretrained-model (the base it was trained on)")
    if not generated.is_dir():
        raise SingLoRAError(f"--generated {str(generated)!r} is not a folder")
    prompts = _prompts_for(generated, args)
    missing = [name for name in prompts if not (generated / name).is_file()]
    if missing:
        raise SingLoRAError(f"--generated {generated}: prompts name missing images {missing[:3]}")
    names = sorted(prompts)
    images = [Image.open(generated / name).convert("RGB") for name in names]
    reference = [Image.open(path).convert("RGB") for path in list_images(args.reference)]
    scores: dict[str, Any] = fidelity_scores(images, reference, [prompts[n] for n in names],
                                             dino_model=args.dino_model, clip_model=args.clip_model)
    scores.update(num_generated=len(images), num_reference=len(reference))
    text = json.dumps(scores, indent=2)
    print(text)
    if args.output:
        atomic_write_text(args.output, text + "\n")


def add_parser(subparsers: Any) -> None:
    """Register ``dreambooth`` and ``dreambooth-eval`` on an argparse ``subparsers`` object."""
    parser = subparsers.add_parser("dreambooth", help="DreamBooth a diffusers U-Net with SingLoRA (to_q, to_k)",
                                   description=__doc__.split("\n")[0])
    _add_dreambooth_arguments(parser)
    parser.set_defaults(func=cmd_dreambooth)

    parser = subparsers.add_parser("dreambooth-eval", help="DINO / CLIP-I / CLIP-T subject and prompt fidelity")
    parser.add_argument("--generated", required=True, help="folder of generated images (written first with "
                        "--pretrained-model)")
    parser.add_argument("--reference", required=True, help="folder of the real subject images")
    parser.add_argument("--prompt", help="the prompt of every generated image")
    parser.add_argument("--prompts-file", help="JSON {image file name: prompt} (default: GENERATED/prompts.json)")
    parser.add_argument("--dino-model", help="local DINO/ViT model folder (DINO score)")
    parser.add_argument("--clip-model", help="local CLIP model folder (CLIP-I, CLIP-T)")
    parser.add_argument("--output", help="write the scores as JSON here")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --output file, and a "
                        "--generated folder holding other files than an earlier dreambooth-eval's samples")
    parser.add_argument("--pretrained-model", help="sample --num-images for --prompt from this diffusers folder first")
    parser.add_argument("--adapter", help="SingLoRA adapter folder to apply when sampling")
    parser.add_argument("--num-images", type=int, default=4)
    parser.add_argument("--inference-steps", type=int, default=25)
    parser.add_argument("--resolution", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.set_defaults(func=cmd_dreambooth_eval)


def main(argv: list[str] | None = None) -> int:
    """Run these subcommands through the ``singlora`` command line (``python -m torch_singlora.diffusion.cli``)."""
    from ..cli import main as singlora_main

    return singlora_main(argv)


if __name__ == "__main__":
    raise SystemExit(main())
