"""Packaging check: build the sdist and the wheel, install the wheel into a fresh virtual environment, and use it
as a user would (``singlora --help``, a tiny ``singlora train``, ``singlora inspect``).

    python -m checks.wheel [--keep DIR]        # ~30 s; also run by tests/test_packaging.py

1. ``python -m build --no-isolation``: the sdist, then the wheel built from the unpacked sdist (so a file missing
   from the sdist breaks the wheel too). ``--no-isolation`` uses this environment's setuptools: no download.
2. The wheel must hold exactly the files of ``src/torch_singlora``: the modules users import and the package data
   (the playground's ``serving/static/`` files that ``singlora serve`` serves at ``/``), and nothing else: no
   tests, benchmarks, studies, checks, fuzzing harness (``HARNESS_MODULES``) or other top-level package. The sdist
   must hold the sources and ``pyproject.toml``/``README.md``.
3. A fresh venv (no pip, no packages) gets our wheel with ``pip --python <fresh> install --no-deps``. Its
   dependencies (torch, transformers, ...) come from this environment's site-packages through a ``.pth`` file
   that lists those folders as plain paths: ``.pth`` files inside them (an editable install of this repository)
   are not executed, so the only ``torch_singlora`` the fresh venv can import is the wheel's.
4. In that venv, with ``PYTHONPATH`` unset and the working directory outside the repository: ``torch_singlora``
   must be found in the venv's site-packages, ``singlora --help`` must list the subcommands, and a 2-step
   ``singlora train`` of a tiny random BERT must write its adapter (at step 2); the installed package must hold the
   playground page.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import site
import subprocess
import sys
import sysconfig
import tempfile
import time
import zipfile
import tarfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "torch_singlora"
HARNESS_MODULES = ("fuzz",)  # test harnesses that must not ship (moved out of the package)
SUBCOMMANDS = ("train", "evaluate", "merge", "export", "inspect", "report")


class PackagingError(AssertionError):
    """A packaging check failed; the message says which and shows the command's output."""


def run(command: list[str], *, env: dict[str, str] | None = None, cwd: Path | None = None) -> str:
    """Run ``command``; its stdout, or a ``PackagingError`` with stdout/stderr when it fails."""
    done = subprocess.run([str(c) for c in command], env=env, cwd=cwd, capture_output=True, text=True)
    if done.returncode != 0:
        raise PackagingError(f"{' '.join(map(str, command))} exited {done.returncode}\n{done.stdout}\n{done.stderr}")
    return done.stdout


def build(out: Path) -> tuple[Path, Path]:
    """``(sdist, wheel)`` built from the repository into ``out``."""
    run([sys.executable, "-m", "build", "--no-isolation", "--outdir", out, ROOT])
    (sdist,), (wheel,) = sorted(out.glob("*.tar.gz")), sorted(out.glob("*.whl"))
    return sdist, wheel


def source_files() -> set[str]:
    """``torch_singlora/...`` paths of the source tree's files (modules and package data), relative to ``src``."""
    src = ROOT / "src"
    return {p.relative_to(src).as_posix() for p in (src / PACKAGE).rglob("*")
            if p.is_file() and "__pycache__" not in p.parts}


def check_contents(sdist: Path, wheel: Path) -> dict[str, int]:
    """The wheel ships exactly the package's files (never a harness module, even one put back under src/), the
    sdist the sources; returns the counts."""
    expected = {m for m in source_files() if not (m.endswith(".py") and Path(m).stem in HARNESS_MODULES)}
    with zipfile.ZipFile(wheel) as archive:
        names = [n for n in archive.namelist() if ".dist-info/" not in n]
        entry_points = next(archive.read(n).decode() for n in archive.namelist() if n.endswith("entry_points.txt"))
    shipped = {n for n in names if n.startswith(PACKAGE + "/")}
    if shipped != expected:
        raise PackagingError(f"wheel files differ from src/{PACKAGE}: missing {sorted(expected - shipped)}, "
                             f"unexpected {sorted(shipped - expected)}")
    stray = sorted(n for n in names if not n.startswith(PACKAGE + "/"))
    if stray:
        raise PackagingError(f"wheel holds files outside {PACKAGE}/: {stray[:10]}")
    if "singlora = torch_singlora.cli:main" not in entry_points:
        raise PackagingError(f"wheel has no `singlora` console script:\n{entry_points}")
    with tarfile.open(sdist) as archive:
        members = {Path(*Path(n).parts[1:]).as_posix() for n in archive.getnames()}
    missing = sorted(({"pyproject.toml", "README.md"} | {f"src/{m}" for m in expected}) - members)
    if missing:
        raise PackagingError(f"sdist lacks {missing[:10]}")
    return {"wheel_modules": sum(n.endswith(".py") for n in shipped), "wheel_data": sum(not n.endswith(".py")
            for n in shipped), "sdist_files": len(members)}


def fresh_venv(folder: Path, wheel: Path) -> Path:
    """A new venv at ``folder`` with our wheel (``--no-deps``) and this environment's packages as plain paths;
    returns its ``bin`` folder."""
    run([sys.executable, "-m", "venv", "--without-pip", folder])
    python = folder / "bin" / "python"
    purelib = Path(run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).strip())
    paths = sysconfig.get_paths()
    shared = dict.fromkeys([*site.getsitepackages(), paths["purelib"], paths["platlib"]])
    run([sys.executable, "-m", "pip", "--python", python, "install", "--quiet", "--no-deps", "--no-index", wheel],
        env=clean_environment())  # before the .pth: pip must not see this environment's torch-singlora
    (purelib / "shared-dependencies.pth").write_text("".join(f"{p}\n" for p in shared if Path(p).is_dir()))
    return folder / "bin"


def clean_environment() -> dict[str, str]:
    """``os.environ`` without the variables that would put this repository or environment on ``sys.path``."""
    return {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}


def use_as_a_user(bin_dir: Path, work: Path) -> dict[str, str]:
    """Where the package imports from, ``--help`` and a tiny training in the fresh venv; raises ``PackagingError``."""
    env = clean_environment()
    env["PATH"] = f"{bin_dir}{os.pathsep}{env.get('PATH', '')}"
    python, singlora = bin_dir / "python", bin_dir / "singlora"
    where = f"import importlib.util; print(importlib.util.find_spec({PACKAGE!r}).origin)"  # finds, runs nothing
    location = run([python, "-c", where], env=env, cwd=work).strip()
    if not Path(location).is_relative_to(bin_dir.parent):
        raise PackagingError(f"the fresh venv imported {PACKAGE} from {location}, not from its own site-packages")
    page = Path(location).parent / "serving" / "static" / "index.html"
    if not page.is_file():
        raise PackagingError(f"the installed package has no playground page ({page})")
    help_text = run([singlora, "--help"], env=env, cwd=work)
    absent = [c for c in SUBCOMMANDS if c not in help_text]
    if absent:
        raise PackagingError(f"`singlora --help` does not list {absent}:\n{help_text}")
    _tiny_assets(work)
    run([singlora, "train", "--model", "bert", "--train-data", "train.csv", "--output-dir", "run", "--r", "2",
         "--max-steps", "2", "--batch-size", "4", "--max-length", "16", "--quiet"], env=env, cwd=work)
    adapter = work / "run" / "adapter"
    config = json.loads((adapter / "adapter_config.json").read_text())
    if config.get("ramp_step") != 2 or not (adapter / "adapter_model.safetensors").is_file():
        raise PackagingError(f"`singlora train --max-steps 2` wrote no adapter at step 2 in {adapter}: {config}")
    return {"imported_from": location}


def _tiny_assets(work: Path) -> None:
    """A tiny random BERT classifier base (MiniLM's tokenizer) and a 2-class CSV, written in ``work`` by this
    environment (the fresh venv only reads them)."""
    import torch
    import transformers

    from torch_singlora.assets import minilm_path

    tokenizer = transformers.AutoTokenizer.from_pretrained(minilm_path())
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=16, num_hidden_layers=1,
                                     num_attention_heads=2, intermediate_size=32, max_position_embeddings=32)
    transformers.BertModel(config).save_pretrained(work / "bert")
    tokenizer.save_pretrained(work / "bert")
    with open(work / "train.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["text", "label"])
        writer.writerows([("goal match team", "sport"), ("chip software code", "tech")] * 6)


def check(keep: Path | None = None) -> dict:
    """The whole check (see the module docstring); returns what it measured."""
    start = time.time()
    with tempfile.TemporaryDirectory(prefix="singlora-wheel-") as tmp:
        root = Path(keep) if keep else Path(tmp)
        (root / "work").mkdir(parents=True, exist_ok=True)
        sdist, wheel = build(root / "dist")
        result = {"sdist": sdist.name, "wheel": wheel.name, **check_contents(sdist, wheel)}
        result.update(use_as_a_user(fresh_venv(root / "venv", wheel), root / "work"))
    result["seconds"] = round(time.time() - start, 1)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="build the sdist + wheel and check them in a fresh venv")
    parser.add_argument("--keep", type=Path, default=None, help="build and install here instead of a temp folder")
    args = parser.parse_args(argv)
    try:
        result = check(args.keep)
    except PackagingError as error:
        print(f"packaging check FAILED: {error}", file=sys.stderr)
        return 1
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
