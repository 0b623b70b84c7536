"""2-process DDP and FSDP2 on CPU (gloo): adapters stay identical across ranks, the ramp step agrees, and the result
equals single-process training on the whole batch. FSDP2 follows the recipe of docs/interop.md (unshard, save the
adapter on rank 0, reshard)."""

from __future__ import annotations

import gc

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from conftest import assert_close, dense_update
from torch_singlora import SingLoRAConfig, SingLoRAModel, fused_linear, get_singlora_model

STEPS = 3


def _base() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 10), nn.Tanh(), nn.Linear(10, 3))


def _model() -> SingLoRAModel:
    return get_singlora_model(_base(), SingLoRAConfig(r=2, target_modules=["0", "2"], ramp_up_steps=2))


def _batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The global batch of a step: 8 rows; rank k of 2 takes rows 4k..4k+3."""
    g = torch.Generator().manual_seed(100 + step)
    return torch.randn(8, 6, generator=g), torch.randn(8, 3, generator=g)


def _full(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor, gathered from its shards under FSDP2 (a DTensor), as a plain tensor."""
    return tensor.full_tensor() if type(tensor).__name__ == "DTensor" else tensor.detach().clone()


def _train(model: nn.Module, forward: nn.Module, rows: slice) -> dict[str, torch.Tensor]:
    """``STEPS`` SGD steps on ``rows`` of each batch; returns each ``A`` and its gradient in the first (u = 1 / T)."""
    # lr 0.1: A moves ~0.2. (At 0.5 the run diverged, |A| ~ 3000 after 3 steps, where the summation order of two
    # equally exact float32 backwards alone moved A by 5e-5 relative, and the comparisons below measured chaos.)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model.bind_optimizer(optimizer)
    seen = {}
    for step in range(STEPS):
        x, y = _batch(step)
        loss = (forward(x[rows]) - y[rows]).square().mean()
        loss.backward()
        if step == 0:
            for name, p in model.named_parameters():
                if name.endswith(".A"):
                    seen[f"{name}.value"], seen[f"{name}.grad"] = _full(p), _full(p.grad)
        optimizer.step()
        optimizer.zero_grad()
    return seen


def _wrap(model: nn.Module, how: str) -> nn.Module:
    """The module to call: DDP around the model, or FSDP2 ``fully_shard`` on each adapted layer and on the root."""
    if how == "ddp":
        return nn.parallel.DistributedDataParallel(model)
    from torch.distributed.fsdp import fully_shard

    for _, layer in model.singlora_layers():
        fully_shard(layer)
    return fully_shard(model)


def _save(model: nn.Module, how: str, rank: int, out_dir: str) -> None:
    """Each rank writes the adapter tensors it holds; under FSDP2 after unsharding them (a collective)."""
    units = [] if how == "ddp" else [m for m in model.modules() if hasattr(m, "unshard") and hasattr(m, "reshard")]
    for unit in units:
        unit.unshard()
    if how == "fsdp2":
        assert not any(type(p).__name__ == "DTensor" for p in model.parameters())  # full tensors while unsharded
        if rank == 0:
            model.save_adapter(f"{out_dir}/adapter")
    named = [*model.named_parameters(), *model.named_buffers()]  # (state_dict() gives shards under FSDP2)
    tensors = {k: v.detach().clone() for k, v in named if ".singlora." in k}
    save_file(tensors, f"{out_dir}/rank{rank}.safetensors")
    for unit in units:
        unit.reshard()


def _worker(rank: int, how: str, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    fused_linear.MIN_TOKENS = 0  # these 4-row batches train by the hand-written backward too (a speed rule)
    # and each way of the backward's gradient of x, also a speed rule: written (DDP) and merged (FSDP2)
    fused_linear.MERGE_RATIO = 0.0 if how == "fsdp2" else float("inf")
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        model = _model()
        wrapped = _wrap(model, how)
        seen = _train(model, wrapped, slice(4 * rank, 4 * rank + 4))
        if rank == 0:
            save_file(seen, f"{out_dir}/step1.safetensors")  # optimizer step 1
        _save(model, how, rank, out_dir)
        dist.barrier()  # no rank tears gloo down while the other still talks to it
        # DDP's reducer keeps gloo work alive; freed only at interpreter exit it aborted the process
        # ("terminate called without an active exception") about once in 20 runs. Free it first.
        del wrapped, model
        gc.collect()
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("how", ["ddp", "fsdp2"])
def test_two_cpu_processes(tmp_path, how: str) -> None:
    mp.spawn(_worker, args=(how, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    ranks = [load_file(str(tmp_path / f"rank{r}.safetensors")) for r in range(2)]
    assert ranks[0].keys() == ranks[1].keys() and sum(k.endswith(".A") for k in ranks[0]) == 2
    for key in ranks[0]:
        assert torch.equal(ranks[0][key], ranks[1][key]), key
        if key.endswith(".ramp_step"):
            assert int(ranks[0][key]) == STEPS
    # the gradients of optimizer step 1 (the training forward and backward of each rank, then averaged) against
    # autograd on the dense update in float64, whole batch, from the same A
    seen = load_file(str(tmp_path / "step1.safetensors"))
    base = _base().double()
    name = {i: next(k for k in seen if k.endswith(f"{i}.singlora.default.A.value"))[:-6] for i in ("0", "2")}
    A = {i: seen[f"{name[i]}.value"].double().requires_grad_(True) for i in name}
    x, y = (t.double() for t in _batch(0))
    c = 8 / 2 * 1 / 2  # s = alpha / r = 8 / 2 (the defaults); step 1 of a run trains at u = 1 / T = 1/2
    hidden = torch.tanh(F.linear(x, base[0].weight + dense_update(A["0"], 10, 6, c), base[0].bias))
    out = F.linear(hidden, base[2].weight + dense_update(A["2"], 3, 10, c), base[2].bias)
    for i, grad in zip(A, torch.autograd.grad((out - y).square().mean(), list(A.values()))):
        assert_close(seen[f"{name[i]}.grad"], grad, dtype=torch.float32)
    # the ranks average the two half-batch gradients: the same as one process on the whole batch
    single = _model()
    _train(single, single, slice(0, 8))
    for key, value in single.state_dict().items():
        if key.endswith(".A"):
            assert_close(ranks[0][key], value)
    if how == "fsdp2":  # the adapter file rank 0 wrote loads into a fresh base as the single-process adapter
        loaded = SingLoRAModel.from_pretrained(_base(), tmp_path / "adapter")
        assert loaded.get_ramp_step() == STEPS
        x = _batch(0)[0]
        assert_close(loaded(x), single(x))
