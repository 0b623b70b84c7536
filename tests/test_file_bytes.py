"""Identical runs write identical files, byte for byte (issue 24: safetensors writes its metadata from a hash map
whose order changes per process, so checksums of two identical adapters differed)."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

from safetensors.torch import load_file

SAVE = """
import sys, torch
from pathlib import Path
from torch_singlora import SingLoRAConfig, get_singlora_model
from torch_singlora.export import export_lora
torch.manual_seed(0)
model = get_singlora_model(torch.nn.Sequential(torch.nn.Linear(8, 6), torch.nn.Linear(6, 8)),
                           SingLoRAConfig(r=2, target_modules=["0", "1"], ramp_up_steps=0))
out = Path(sys.argv[1])
model.save_adapter(out / "adapter")
model.save_adapter(out / "bf16", dtype="bfloat16")  # one more metadata key
export_lora(model, out / "lora")
"""


def _digests(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_two_processes_write_the_same_bytes(tmp_path: Path, monkeypatch) -> None:
    """One other process, and the same saves three times here (safetensors' hash map order varies within a process
    too, so the repeats make a pass by luck on the old writer unlikely)."""
    subprocess.run([sys.executable, "-c", SAVE, str(tmp_path / "one")], check=True, timeout=300)
    for name in ("two", "three", "four"):
        monkeypatch.setattr(sys, "argv", ["-c", str(tmp_path / name)])
        exec(SAVE, {})
    first = _digests(tmp_path / "one")
    assert len(first) == 7 and all(_digests(tmp_path / name) == first for name in ("two", "three", "four"))
    for weights in ("adapter/adapter_model.safetensors", "lora/adapter_model.safetensors"):
        assert load_file(tmp_path / "one" / weights)  # still a file safetensors reads
    header = (tmp_path / "one" / "bf16" / "adapter_model.safetensors").read_bytes()[8:120]
    assert header.startswith(b'{"__metadata__":{"dtype":"bfloat16","format":"singlora","format_version":"1"}')
