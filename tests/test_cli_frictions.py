"""What a new user met on the command line (issue 24): a busy port, a huge key name, the chat path's hints and
multi-line entry. Each test reproduces the friction first."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from torch_singlora import SingLoRAConfig, get_singlora_model
from torch_singlora.cli import main


def test_serve_on_a_busy_port_fails_before_loading_and_says_why(tmp_path: Path, capsys) -> None:
    """It printed "serving on ..." (after loading the model) and then exited 3."""
    pytest.importorskip("uvicorn")
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        assert main(["serve", "--model", str(tmp_path / "not-even-loaded"), "--port", str(port)]) == 2
    err = capsys.readouterr().err
    assert f"cannot listen on 127.0.0.1:{port}: Address already in use (another server on --port {port}?)" in err
    assert "serving" not in err and "not-even-loaded" not in err


def test_inspect_cuts_a_huge_key_name_instead_of_padding_every_line_to_it(tmp_path: Path, capsys) -> None:
    """A 1 MiB module name made `inspect` print 1 MiB per module line (40 MB for 40 modules)."""
    model = get_singlora_model(torch.nn.Sequential(*[torch.nn.Linear(4, 4) for _ in range(40)]),
                               SingLoRAConfig(r=2, target_modules="all-linear", ramp_up_steps=0))
    model.save_adapter(tmp_path)
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    huge = "-" * 2**20  # sorts first
    tensors[f"{huge}.singlora_A"] = torch.ones(4, 2)
    save_file(tensors, tmp_path / "adapter_model.safetensors", metadata={"format": "singlora", "format_version": "1"})
    assert main(["inspect", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert len(out) < 20_000 and "<1,048,576 characters>" in out and len(out.splitlines()) == 47, len(out)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    (tmp_path / "adapter_config.json").write_text(json.dumps({**config, "r": 3}))  # every A now has the wrong rank
    assert main(["inspect", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert len(err) < 5_000 and "has shape [4, 2]" in err, len(err)
