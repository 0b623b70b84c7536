"""Small adapter files: ``save_adapter(..., dtype=...)`` stores A (and saved modules) in float32 / bfloat16 /
float16, records it, loads back into the training dtype; values beyond the dtype's range are refused."""

from __future__ import annotations

import json
import struct

import pytest
import torch
from torch import nn

from conftest import dense_update
from torch_singlora import SingLoRAConfig, SingLoRAError, SingLoRAModel, get_singlora_model


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.wide = nn.Linear(12, 40)
        self.head = nn.Linear(40, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.wide(x)))


def _model() -> tuple[Net, SingLoRAModel]:
    base = Net()
    reference = Net()
    reference.load_state_dict(base.state_dict())
    model = get_singlora_model(base, SingLoRAConfig(r=4, alpha=4, target_modules=["wide"], modules_to_save=["head"],
                                                    ramp_up_steps=0))
    with torch.no_grad():
        model.model.wide.singlora["default"].A.normal_(0, 0.7)
        model.model.head.copies["default"].weight.add_(0.1)
    return reference, model


def _header(path) -> dict:
    data = path.read_bytes()
    (length,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8:8 + length])


def _data_bytes(path) -> int:
    """Bytes of tensor data (the file less its header)."""
    return path.stat().st_size - 8 - struct.unpack("<Q", path.read_bytes()[:8])[0]


@pytest.mark.parametrize("dtype,name", [(torch.bfloat16, "BF16"), (torch.float16, "F16"), ("float32", "F32")])
def test_saved_dtype_round_trip(tmp_path, dtype, name) -> None:
    reference, model = _model()
    model.save_adapter(tmp_path / "full")
    model.save_adapter(tmp_path / "small", dtype=dtype)
    header = _header(tmp_path / "small" / "adapter_model.safetensors")
    assert {entry["dtype"] for key, entry in header.items() if key != "__metadata__"} == {name}
    assert header["__metadata__"]["dtype"] == str(dtype).removeprefix("torch.")
    full, small = (_data_bytes(tmp_path / folder / "adapter_model.safetensors") for folder in ("full", "small"))
    assert small == (full if name == "F32" else full // 2)
    loaded = SingLoRAModel.from_pretrained(reference, tmp_path / "small")
    A = loaded.model.wide.singlora["default"].A
    assert A.dtype == torch.float32  # back in the training dtype
    stored = model.model.wide.singlora["default"].A.detach().to(dtype if isinstance(dtype, torch.dtype) else None)
    assert torch.equal(A.detach(), stored.float())  # exactly the rounded values
    x = torch.randn(5, 12)
    W = reference.wide.weight.double() + dense_update(stored.float(), 40, 12, 1.0)
    head = model.model.head.copies["default"]
    expected = nn.functional.linear(torch.tanh(nn.functional.linear(x.double(), W, reference.wide.bias.double())),
                                    head.weight.to(stored.dtype).double(), head.bias.to(stored.dtype).double())
    torch.testing.assert_close(loaded(x).double(), expected, atol=1e-5, rtol=1e-5)


def test_overflow_and_bad_dtype_refused(tmp_path) -> None:
    _, model = _model()
    with torch.no_grad():
        model.model.wide.singlora["default"].A[0, 0] = 7e4  # beyond float16's 65504
    with pytest.raises(SingLoRAError, match=r"wide.singlora_A: values up to 7e\+04 overflow torch.float16"):
        model.save_adapter(tmp_path / "f16", dtype="float16")
    assert not (tmp_path / "f16").exists()  # nothing written
    model.save_adapter(tmp_path / "bf16", dtype="bfloat16")  # bfloat16 has float32's range
    with pytest.raises(SingLoRAError, match="dtype='float8' must be one of"):
        model.save_adapter(tmp_path / "x", dtype="float8")
    with pytest.raises(SingLoRAError, match="dtype=torch.float64 must be one of"):
        model.save_adapter(tmp_path / "x", dtype=torch.float64)
