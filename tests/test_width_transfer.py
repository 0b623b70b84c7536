"""The width-transfer study (issue 26): its batched trainer against one run per rate through the library's
SingLoRA layers and PEFT's LoRA / LoRA+ (the same init, data, schedule and AdamW), its optimum and transfer
statistics against hand-computed values, and a ``--quick`` smoke run of the whole command."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from studies import width_report, width_transfer  # noqa: E402

TINY = width_transfer.Settings(widths=(12,), lr_exponents=(-6, -3), seeds=1, steps=12, batch=8, inputs=4, outputs=3,
                               rank=4, alpha=4.0, change_rank=2, test_examples=32, log_every=4, ramp=0.25)


class Student(nn.Module):
    """The study's network as ordinary modules: x -> W1 -> tanh -> l2 -> tanh -> l3 -> tanh -> Wo."""

    def __init__(self, net: width_transfer.Network) -> None:
        super().__init__()
        self.l1, self.l2, self.l3, self.lo = (nn.Linear(w.shape[1], w.shape[0], bias=False)
                                              for w in (net.W1, net.W2, net.W3, net.Wo))
        for layer, w in zip((self.l1, self.l2, self.l3, self.lo), (net.W1, net.W2, net.W3, net.Wo)):
            layer.weight.data.copy_(w)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lo(torch.tanh(self.l3(torch.tanh(self.l2(torch.tanh(self.l1(x)))))))


def reference_run(problem: width_transfer.Problem, method: str, lr: float, init: list[list[torch.Tensor]],
                  s: width_transfer.Settings, seed: int) -> float:
    """One rate trained the ordinary way: the library's SingLoRA model or PEFT's LoRA (LoRA+: PEFT's optimizer),
    torch's AdamW, starting from the study's initial factors ``init`` (per layer: A (n, r) and, for LoRA, B (r, n))."""
    model = Student(problem.net)
    if method == "singlora":
        from torch_singlora import SingLoRAConfig, get_singlora_model

        ramp = max(1, round(s.ramp * s.steps))
        model = get_singlora_model(model, SingLoRAConfig(r=s.rank, alpha=s.alpha, target_modules=["l2", "l3"],
                                                         ramp_up_steps=ramp))
        for name, (A,) in zip(("l2", "l3"), init):
            getattr(model.model, name).singlora["default"].A.data.copy_(A)
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
        model.bind_optimizer(optimizer)
    else:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=s.rank, lora_alpha=s.alpha, target_modules=["l2", "l3"]))
        for name, (A, B) in zip(("l2", "l3"), init):
            layer = getattr(model.base_model.model, name)
            layer.lora_A["default"].weight.data.copy_(A.T)  # the study stores lora_A transposed
            layer.lora_B["default"].weight.data.copy_(B.T)
        if method == "loraplus":
            from peft.optimizers import create_loraplus_optimizer

            optimizer = create_loraplus_optimizer(model, torch.optim.AdamW, lr=lr, loraplus_lr_ratio=s.loraplus_ratio,
                                                  weight_decay=0.0)
        else:
            optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    from transformers import get_linear_schedule_with_warmup

    scheduler = get_linear_schedule_with_warmup(optimizer, round(s.warmup * s.steps), s.steps)
    data = torch.Generator().manual_seed(7919 * seed + problem.net.W2.shape[0])
    for _ in range(s.steps):
        x = torch.randn(s.batch, s.inputs, generator=data)
        loss = (model(x) - problem.net.teacher(x)).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        scheduler.step()
    with torch.no_grad():
        return float((model(problem.X) - problem.Y).pow(2).mean()) / problem.base_loss


@pytest.mark.parametrize("method", width_transfer.METHODS)
def test_batched_rates_equal_one_ordinary_run_per_rate(method: str) -> None:
    pytest.importorskip("peft")
    problem = width_transfer.make_problem(12, 0, TINY)
    lrs = [2.0 ** (e - 3 * (method == "loraplus")) for e in TINY.lr_exponents]  # LoRA+'s B at 16x diverges at 2^-3
    torch.manual_seed(0)  # train_configs seeds the same way, so this is its initial state
    adapters = width_transfer.Adapters(method, len(lrs), 12, TINY, TINY.steps)
    results = width_transfer.train_configs(problem, method, lrs, TINY, seed=0)
    for i, lr in enumerate(lrs):
        init = [[adapters.A[layer][i].detach()] + ([adapters.B[layer][i].detach()] if adapters.B[0] else [])
                for layer in range(2)]
        expected = reference_run(problem, method, lr, init, TINY, seed=0)
        assert expected < 0.99  # it learnt something, so the comparison is not between two untouched models
        assert results[i]["final"] == pytest.approx(expected, rel=1e-4)


def test_teacher_change_is_psd_of_rank_k_at_the_stated_size() -> None:
    s = width_transfer.Settings(inputs=6, change_rank=3, change=0.4)
    g = torch.Generator().manual_seed(0)
    h = torch.tanh(torch.randn(500, 6, generator=g, dtype=torch.float64) @ torch.randn(6, 40, generator=g,
                                                                                         dtype=torch.float64))
    W = torch.randn(40, 40, generator=g, dtype=torch.float64) / math.sqrt(40)
    D = width_transfer.teacher_change(h, W, s.change_rank, s.change, g)
    eigenvalues = torch.linalg.eigvalsh(D)
    assert torch.allclose(D, D.T)
    assert (eigenvalues[:-3].abs() < 1e-9).all() and (eigenvalues[-3:] > 0).all()  # PSD, rank 3
    ratio = (h @ D.T).norm(dim=1).mean() / (h @ W.T).norm(dim=1).mean()
    assert ratio.item() == pytest.approx(0.4)
    # the change acts where the inputs vary: its directions carry more of the inputs' variance than random ones
    centred = h - h.mean(0)
    P = torch.linalg.eigh(D).eigenvectors[:, -3:]
    random_P = torch.linalg.qr(torch.randn(40, 3, generator=g, dtype=torch.float64))[0]
    assert (centred @ P).pow(2).sum() > 3 * (centred @ random_P).pow(2).sum()


def test_optimum_refines_between_grid_points_and_flags_edges() -> None:
    # log loss = log 0.01 + (e + 5.3)^2: the parabola through three grid points finds -5.3 exactly
    curve = {e: 0.01 * math.exp((e + 5.3) ** 2) for e in range(-9, -1)}
    result = width_report.optimum(curve)
    assert result["grid"] == -5 and not result["edge"]
    assert result["exponent"] == pytest.approx(-5.3)
    assert result["max_stable"] == -4  # the largest rate whose loss is below the base network's (< 1)
    # a minimum on the edge is not refined, and a neighbour that learnt nothing (>= 1) stops the refinement
    assert width_report.optimum({-3: 0.5, -2: 0.2})["edge"]
    assert width_report.optimum({-4: 0.5, -3: 0.1, -2: 2.4})["exponent"] == -3.0
    assert width_report.optimum({-4: 0.5, -3: 0.1, -2: 2.4})["max_stable"] == -3


def test_transfer_rules_read_the_loss_at_the_scaled_rate() -> None:
    # width 4n's curve is width n's shifted down by exactly one exponent (lr ~ n^-1/2): that rule costs nothing
    base = {e: 0.01 * 2.0 ** ((e + 5) ** 2) for e in range(-12, -1)}
    shifted = {e - 1: v for e, v in base.items() if e - 1 >= -12}
    table = {"singlora": {n: {e: [{"seed": 0, "final": curve[e], "seconds": 0.0}] for e in curve}
                          for n, curve in ((64, {e: base[e] for e in shifted}), (256, shifted))}}
    analysis = width_report.analyse(table)["singlora"]
    assert analysis["slope"]["optimum"]["mean"] == pytest.approx(-0.5)
    rules = analysis["transfer"]
    assert rules["lr ~ n^-1/2"]["256"]["median"] == pytest.approx(1.0)
    assert rules["same lr"]["256"]["median"] == pytest.approx(shifted[-5] / shifted[-6])  # 2^1
    assert rules["lr ~ n^-1"]["256"]["median"] == pytest.approx(shifted[-7] / shifted[-6])


def test_quick_run_writes_the_report_and_resumes_from_the_cache(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    argv = ["--quick", "--work", str(tmp_path / "work"), "--out", str(tmp_path / "out")]
    width_transfer.main(argv)
    data = json.loads((tmp_path / "out" / "results.json").read_text())
    assert data["complete"] and set(data["analysis"]) == set(width_transfer.METHODS)
    assert {p.name for p in (tmp_path / "out").iterdir()} >= {"REPORT.md", "loss_vs_lr.png", "optimum_vs_width.png"}
    assert "## How the best rate moves with width" in (tmp_path / "out" / "REPORT.md").read_text()
    again = width_transfer.main(argv)  # every rate is cached: nothing trains
    assert again["train_s_this_invocation"] == 0.0
    assert again["runs"] == data["runs"]
