"""``singlora train``'s learning-rate schedule: transformers' shapes, with the warm-up counting the step being
taken (issue 24: transformers' warm-up runs step 1 at lr 0), and ``--warmup`` honoured by every schedule."""

from __future__ import annotations

import pytest
import torch

from torch_singlora.train.schedule import SCHEDULES, lr_factor, make_scheduler, short_run_warnings

transformers = pytest.importorskip("transformers")


@pytest.mark.parametrize("name", SCHEDULES)
@pytest.mark.parametrize("warmup, total", [(0, 5), (1, 1), (3, 10), (6, 100), (10, 4)])
def test_factors_are_transformers_with_the_warm_up_one_step_on(name: str, warmup: int, total: int) -> None:
    """Step k = i + 1: during the warm-up k / W (transformers' i / W: 0 at step 1), after it transformers' own
    factors (constant: its constant_with_warmup)."""
    reference = transformers.get_scheduler(name if name != "constant" else "constant_with_warmup",
                                           torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0),
                                           num_warmup_steps=warmup, num_training_steps=total).lr_lambdas[0]
    ours = lr_factor(name, warmup, total)
    for i in range(total):
        assert ours(i) == pytest.approx((i + 1) / warmup if i < warmup else reference(i)), i
        assert ours(i) > 0, i  # no step of the run is wasted at lr 0


def test_the_scheduler_gives_each_step_its_factor() -> None:
    parameter = torch.zeros(1, requires_grad=True)
    optimizer = torch.optim.SGD([parameter], lr=2.0)
    scheduler = make_scheduler("linear", optimizer, warmup_steps=2, total_steps=4)
    used = []
    for _ in range(4):
        used.append(optimizer.param_groups[0]["lr"])  # what the step runs at
        optimizer.step()
        scheduler.step()
    assert used == pytest.approx([2.0 * 1 / 2, 2.0 * 2 / 2, 2.0 * 2 / 2, 2.0 * 1 / 2])


def test_short_runs_say_what_they_will_not_reach() -> None:
    assert short_run_warnings(10, 2, 5) == []
    warm, ramp = short_run_warnings(3, 4, 12)
    assert "warm-up (4 steps" in warm and "only 0.75 x --lr" in warm
    assert "ramp (T = 12 steps" in ramp and "u reaches 0.25 at the last step" in ramp
    assert short_run_warnings(3, 0, None) == []
