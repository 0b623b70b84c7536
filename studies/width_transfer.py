"""Study 7 (issue 26, part 1): does the best learning rate of SingLoRA transfer across width?

The paper's theory (infinite width, following LoRA+): with one matrix there is no inter-matrix scale conflict, and
a learning rate of order ``n^-1/2`` gives stable feature learning at any width ``n``, where LoRA with one learning
rate cannot (LoRA+ gives B a larger rate). Under Adam (each entry moves by about the learning rate ``eta``), the
change of a layer's output ``dW h`` for an input ``h`` of norm ``sqrt(n)`` is, for SingLoRA ``s A A^T`` (A ~ N(0, 1/n)),
dominated by ``A (dA^T h) = Theta(eta sqrt(n))``: so ``eta* ~ n^-1/2``. For LoRA ``B A`` (B = 0 at the start),
B's steps change the output by ``Theta(eta)`` and A's by ``Theta(eta n)`` once B is non-zero: one rate cannot suit
both. This study measures where the best rate lands as the width grows.

Set-up (teacher-student; every number is a flag): a family of frozen random tanh MLPs of width ``n``
(``x (d) -> W1 -> n -> W2 -> n -> W3 -> n -> Wo -> c``; N(0, 1/fan_in) weights, the same depth, data and task at
every width). The teacher is the same network with a positive semidefinite change of rank ``k`` added to each hidden
matrix W2 and W3 (``beta P P^T``, P spanning k random directions drawn from the covariance of that matrix's inputs,
beta setting ``mean ||dW h|| / mean ||W h|| = change``), so its effect on the output does not
vanish with width and the frozen readout forces the student to change its hidden features (feature learning). A
PSD change of rank k <= r is one both SingLoRA and LoRA can express exactly. The student adapts W2 and W3 with
SingLoRA (this library's init N(0, 1/n), ramp over 1 % of the steps), LoRA (PEFT's init: input factor
kaiming_uniform(a = sqrt 5), output factor 0) or LoRA+ (LoRA with B at ``loraplus_ratio`` times the rate), r = alpha
= 8, trained by AdamW (weight decay 0, the CLI's linear schedule with 6 % warm-up, no clipping) on fresh Gaussian
inputs every step, over a grid of learning rates (powers of 2). Score: mean squared error on a fixed test set,
divided by the unadapted model's (1 = nothing learnt).

All learning rates of one (width, seed, method) train together as a batch of independent problems (one parameter
leaf and one optimizer group per rate; AdamW is elementwise, so this equals one optimizer per rate). Each rate's
result is cached in the work folder, so a stopped study resumes and an extended grid trains only the new rates.

Run:  ``nice -n 19 .venv/bin/python -m studies.width_transfer``  (``--quick``: a smoke run of a few seconds).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor

from studies.bbc import DEFAULT_WORK, command_line
from studies.common import environment, limit_threads, write_json, write_text
from torch_singlora import functional

METHODS = ("singlora", "lora", "loraplus")


@dataclass(frozen=True)
class Settings:
    """What the study runs (every field is a ``--flag``)."""

    widths: tuple[int, ...] = (128, 256, 512, 1024, 2048)  # n, the width of the hidden layers
    lr_exponents: tuple[int, ...] = tuple(range(-14, -2))  # the learning-rate grid: 2^e
    seeds: int = 3  # seed s: base network, teacher, adapter init and data stream
    steps: int = 400  # AdamW steps per run
    batch: int = 64  # fresh inputs per step
    inputs: int = 32  # d, input dimension
    outputs: int = 8  # c, readout dimension
    rank: int = 8  # r of every adapter
    alpha: float = 8.0
    change_rank: int = 4  # k, rank of the teacher's change of each hidden matrix
    change: float = 0.5  # mean ||dW h|| / mean ||W h|| of the teacher's change
    warmup: float = 0.06  # linear warm-up, fraction of the steps
    ramp: float = 0.01  # SingLoRA's ramp-up T, fraction of the steps
    loraplus_ratio: float = 16.0  # LoRA+: B's learning rate / A's
    test_examples: int = 2048
    log_every: int = 20  # training-loss curve resolution (steps)
    max_extensions: int = 3  # grid points a method may add on each edge where an optimum sits

    def run_key(self) -> str:
        """What a cached result depends on besides (width, seed, method, rate): every field but the selection."""
        fields = {k: v for k, v in dataclasses.asdict(self).items()
                  if k not in ("widths", "lr_exponents", "seeds", "max_extensions")}
        return hashlib.sha1(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:10]


# ----------------------------------------------------------------------------------------------------------------
# The problem: base network, teacher, test set


@dataclass
class Network:
    """The frozen network of one width and seed: ``W1`` (n, d), ``W2``, ``W3`` (n, n), ``Wo`` (c, n), and the
    teacher's changes ``D2``, ``D3`` (n, n) of the two hidden matrices."""

    W1: Tensor
    W2: Tensor
    W3: Tensor
    Wo: Tensor
    D2: Tensor
    D3: Tensor

    def outputs(self, x: Tensor, update: Callable[[Tensor, int], Tensor]) -> Tensor:
        """``x`` (B, d) -> (K, B, c) with ``update(h, layer)`` added to the hidden matrix ``layer`` (0: W2, 1: W3)
        for its inputs ``h`` ((B, n) or (K, B, n)): (K, B, n)."""
        h1 = torch.tanh(x @ self.W1.T)  # (B, n), the same for every configuration
        h2 = torch.tanh(h1 @ self.W2.T + update(h1, 0))  # (K, B, n)
        h3 = torch.tanh(h2 @ self.W3.T + update(h2, 1))
        return h3 @ self.Wo.T

    def teacher(self, x: Tensor) -> Tensor:
        """The target: ``(B, d) -> (B, c)``."""
        return self.outputs(x, lambda h, layer: h @ (self.D2, self.D3)[layer].T)


@dataclass
class Problem:
    """A network, its test set ``X`` (N, d), ``Y`` (N, c) = teacher(X), and the base network's test MSE."""

    net: Network
    X: Tensor
    Y: Tensor
    base_loss: float


def teacher_change(h: Tensor, W: Tensor, k: int, change: float, g: torch.Generator) -> Tensor:
    """``beta P P^T`` (n, n): P (n, k) an orthonormal basis of k random combinations of the centred inputs ``h``
    (N, n) of ``W`` (directions drawn from the inputs' covariance, so the change acts where the inputs vary);
    ``beta`` makes ``mean ||D h|| = change * mean ||W h||``."""
    centred = h - h.mean(0)
    P = torch.linalg.qr(centred.T @ torch.randn(h.shape[0], k, generator=g, dtype=h.dtype))[0]  # (n, k)
    D = P @ P.T
    beta = change * (h @ W.T).norm(dim=1).mean() / (h @ D).norm(dim=1).mean()
    return beta * D


def make_problem(n: int, seed: int, s: Settings) -> Problem:
    """The base network and teacher of width ``n`` for ``seed`` (the same for every method and rate)."""
    g = torch.Generator().manual_seed(1_000_003 * seed + n)
    d, c = s.inputs, s.outputs
    W1 = torch.randn(n, d, generator=g) / math.sqrt(d)
    W2, W3 = (torch.randn(n, n, generator=g) / math.sqrt(n) for _ in range(2))
    Wo = torch.randn(c, n, generator=g) / math.sqrt(n)
    calibration = torch.randn(4096, d, generator=g)
    h1 = torch.tanh(calibration @ W1.T)
    D2 = teacher_change(h1, W2, s.change_rank, s.change, g)
    h2 = torch.tanh(h1 @ (W2 + D2).T)
    D3 = teacher_change(h2, W3, s.change_rank, s.change, g)
    net = Network(W1, W2, W3, Wo, D2, D3)
    X = torch.randn(s.test_examples, d, generator=g)
    Y = net.teacher(X)
    base = per_config_loss(net, X, Y, lambda h, layer: h.new_zeros((1, *h.shape[-2:])))
    return Problem(net, X, Y, float(base[0]))


# ----------------------------------------------------------------------------------------------------------------
# The adapters of K configurations at once


class Adapters:
    """One method's adapters on W2 and W3 for K configurations (learning rates): one leaf per configuration and
    matrix, so that each has its own optimizer group.

    ``update(h, layer)``: the adapter's output for inputs ``h`` ((B, n), or (K, B, n) per configuration): (K, B, n).
    SingLoRA: ``c (h A) A^T`` with ``c = s u(t)`` (``functional.ramp_value``); LoRA: ``s (h A_in) B_out``.
    """

    def __init__(self, method: str, configs: int, n: int, s: Settings, steps: int) -> None:
        if method not in METHODS:
            raise ValueError(f"method={method!r} is not one of {METHODS}")
        self.method, self.scale = method, functional.scaling(s.rank, s.alpha)
        self.ramp_steps = max(1, round(s.ramp * steps)) if s.ramp > 0 else 0  # as SingLoRAConfig
        self.step = torch.zeros((), dtype=torch.long)
        if method == "singlora":
            self.A = [[torch.empty(n, s.rank) for _ in range(configs)] for _ in range(2)]
            for leaf in (a for layer in self.A for a in layer):
                functional.init_A(leaf, "normal")
            self.B: list[list[Tensor]] = [[], []]
        else:  # PEFT: lora_A (r, n) kaiming_uniform(a=sqrt 5) = U(-1/sqrt n, 1/sqrt n), here stored transposed
            bound = 1.0 / math.sqrt(n)
            self.A = [[torch.empty(n, s.rank).uniform_(-bound, bound) for _ in range(configs)] for _ in range(2)]
            self.B = [[torch.zeros(s.rank, n) for _ in range(configs)] for _ in range(2)]
        for leaf in self.leaves():
            leaf.requires_grad_()

    def leaves(self) -> list[Tensor]:
        return [t for layer in self.A + self.B for t in layer]

    def groups(self, lrs: list[float], loraplus_ratio: float) -> list[dict[str, Any]]:
        """AdamW parameter groups: configuration i at ``lrs[i]`` (LoRA+: its B at ``ratio * lrs[i]``)."""
        groups = []
        for i, lr in enumerate(lrs):
            groups.append({"params": [self.A[0][i], self.A[1][i]], "lr": lr})
            if self.B[0]:
                ratio = loraplus_ratio if self.method == "loraplus" else 1.0
                groups.append({"params": [self.B[0][i], self.B[1][i]], "lr": lr * ratio})
        return groups

    def update(self, h: Tensor, layer: int) -> Tensor:
        A = torch.stack(self.A[layer])  # (K, n, r)
        if self.method == "singlora":
            coefficient = functional.ramp_value(self.step, self.ramp_steps) * self.scale
            return ((h @ A) * coefficient) @ A.mT
        return ((h @ A) * self.scale) @ torch.stack(self.B[layer])


def per_config_loss(net: Network, x: Tensor, y: Tensor, update: Callable[[Tensor, int], Tensor]) -> Tensor:
    """Mean squared error of each configuration's student on ``x`` (B, d) against ``y`` (B, c): (K,)."""
    return (net.outputs(x, update) - y).pow(2).mean(dim=(-2, -1))


def linear_schedule(step: int, total: int, warmup: int) -> float:
    """The CLI's ``--scheduler linear`` (transformers): warm-up from 0, then linear decay to 0."""
    if step < warmup:
        return step / max(1, warmup)
    return max(0.0, (total - step) / max(1, total - warmup))


def train_configs(problem: Problem, method: str, lrs: list[float], s: Settings, seed: int) -> list[dict[str, Any]]:
    """Train ``method`` at every rate of ``lrs`` on ``problem`` (one batch of independent runs); per rate: the final
    test loss / base loss (``None`` if not finite), the training-loss curve (same scale) and the seconds per run."""
    n = problem.net.W2.shape[0]
    torch.manual_seed(seed)
    adapters = Adapters(method, len(lrs), n, s, s.steps)
    optimizer = torch.optim.AdamW(adapters.groups(lrs, s.loraplus_ratio), betas=(0.9, 0.999), eps=1e-8,
                                  weight_decay=0.0)
    warmup = round(s.warmup * s.steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda t: linear_schedule(t, s.steps, warmup))
    data = torch.Generator().manual_seed(7919 * seed + n)  # the same input stream for every method and rate
    start, curve, window = time.perf_counter(), [], []
    for step in range(s.steps):
        x = torch.randn(s.batch, s.inputs, generator=data)
        adapters.step += 1  # step k runs at u = min(k / T, 1), as the library's training forwards (layers.py)
        losses = per_config_loss(problem.net, x, problem.net.teacher(x), adapters.update)
        optimizer.zero_grad(set_to_none=True)
        losses.sum().backward()  # the configurations are independent: the sum gives each its own gradient
        optimizer.step()
        scheduler.step()
        window.append(losses.detach() / problem.base_loss)
        if len(window) == s.log_every or step == s.steps - 1:
            curve.append((step + 1, torch.stack(window).mean(0)))
            window = []
    with torch.no_grad():
        final = per_config_loss(problem.net, problem.X, problem.Y, adapters.update) / problem.base_loss
    seconds = (time.perf_counter() - start) / len(lrs)
    return [{"final": float(final[i]) if math.isfinite(final[i]) else None,
             "curve": [[step, float(v[i]) if math.isfinite(v[i]) else None] for step, v in curve],
             "seconds": seconds} for i in range(len(lrs))]


# ----------------------------------------------------------------------------------------------------------------
# Cached runs


@dataclass
class Cache:
    """Per-rate results under ``<work>/width_transfer/<settings key>/n<width>_s<seed>_<method>/lr2^<e>.json``."""

    work: Path
    settings: Settings

    def path(self, n: int, seed: int, method: str, exponent: int) -> Path:
        return (self.work / "width_transfer" / self.settings.run_key() / f"n{n}_s{seed}_{method}"
                / f"lr2^{exponent}.json")

    def get(self, n: int, seed: int, method: str, exponent: int) -> dict[str, Any] | None:
        path = self.path(n, seed, method, exponent)
        return json.loads(path.read_text()) if path.is_file() else None

    def run(self, n: int, seed: int, method: str, exponents: list[int]) -> float:
        """Train the rates of ``exponents`` not cached yet (one batch), cache each; returns the seconds spent."""
        todo = [e for e in exponents if self.get(n, seed, method, e) is None]
        if not todo:
            return 0.0
        start = time.perf_counter()
        problem = make_problem(n, seed, self.settings)
        results = train_configs(problem, method, [2.0**e for e in todo], self.settings, seed)
        for e, result in zip(todo, results):
            self.path(n, seed, method, e).parent.mkdir(parents=True, exist_ok=True)
            write_json(self.path(n, seed, method, e), {"width": n, "seed": seed, "method": method, "exponent": e,
                                                       "base_loss": problem.base_loss, **result})
        return time.perf_counter() - start


def run_unit(cache: Cache, unit: tuple[int, int, str], exponents: list[int]) -> tuple[tuple[int, int, str], float]:
    """A worker process's job: one (width, seed, method) over ``exponents``."""
    limit_threads(1)
    return unit, cache.run(*unit, exponents)


def collect(cache: Cache, grids: dict[str, list[int]]) -> dict[str, dict[int, dict[int, list[dict[str, Any]]]]]:
    """``{method: {width: {exponent: [result of seed 0, 1, ...]}}}`` of the cached results (seeds in order, only
    those cached)."""
    s = cache.settings
    table: dict[str, dict[int, dict[int, list[dict[str, Any]]]]] = {}
    for method, grid in grids.items():
        for n in s.widths:
            for e in grid:
                runs = [cache.get(n, seed, method, e) for seed in range(s.seeds)]
                runs = [r for r in runs if r is not None]
                if runs:
                    table.setdefault(method, {}).setdefault(n, {})[e] = runs
    return table


# ----------------------------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> tuple[Settings, argparse.Namespace]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    defaults = Settings()
    for field in dataclasses.fields(Settings):
        value = getattr(defaults, field.name)
        flag = f"--{field.name.replace('_', '-')}"
        if isinstance(value, tuple):
            parser.add_argument(flag, type=int, nargs="+", default=list(value))
        else:
            parser.add_argument(flag, type=type(value), default=value)
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--quick", action="store_true", help="smoke run: widths 16, 32; 30 steps; 2 seeds")
    parser.add_argument("--work", type=Path, default=DEFAULT_WORK, help="cached runs")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "width_transfer")
    parser.add_argument("--jobs", type=int, default=1, help="(width, seed, method) units trained at a time")
    parser.add_argument("--publish-every", type=float, default=300.0,
                        help="seconds between rewrites of the report while the study runs (and once at the end)")
    args = parser.parse_args(argv)
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(Settings)}
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}
    if args.quick:
        values.update(widths=(16, 32), lr_exponents=(-7, -6, -5, -4, -3), seeds=2, steps=30, batch=16, inputs=8,
                      outputs=4, rank=4, alpha=4.0, change_rank=2, test_examples=128, log_every=10, max_extensions=1)
    settings = Settings(**values)
    if settings.change_rank > settings.rank:
        parser.error(f"--change-rank={settings.change_rank} must be <= --rank={settings.rank} (both methods "
                     "must be able to express the teacher's change)")
    if min(settings.widths) < settings.rank:
        parser.error(f"--widths must be >= --rank={settings.rank}")
    return settings, args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    from studies.width_report import analyse, extend_grids, plots, report

    settings, args = parse_args(argv)
    limit_threads(1)
    cache = Cache(args.work, settings)
    args.out.mkdir(parents=True, exist_ok=True)
    command = command_line("studies.width_transfer", argv)
    grids = {m: list(settings.lr_exponents) for m in args.methods}
    added = {(m, side): 0 for m in args.methods for side in (-1, 1)}
    start, spent = time.perf_counter(), {"train_s": 0.0, "published": time.perf_counter()}

    def publish(complete: bool) -> dict[str, Any]:
        table = collect(cache, grids)
        analysis = analyse(table)
        figures = plots(table, analysis, args.out)
        data = {"study": "width_transfer", "command": command, "complete": complete, "settings":
                dataclasses.asdict(settings), "grids": grids, "environment": environment(),
                "wall_s": time.perf_counter() - start, "train_s_this_invocation": spent["train_s"],
                "analysis": analysis,
                "runs": {m: {str(n): {str(e): [{k: r[k] for k in ("seed", "final", "seconds")} for r in runs]
                                      for e, runs in by_e.items()} for n, by_e in by_n.items()}
                         for m, by_n in table.items()}}
        write_json(args.out / "results.json", data)
        write_text(args.out / "REPORT.md", report(table, analysis, data, figures))
        return data

    def progress() -> None:
        if time.perf_counter() - spent["published"] >= args.publish_every:
            publish(False)
            spent["published"] = time.perf_counter()

    def run_all() -> None:
        # seed-major: every width gets seed 0 first, so a partial study already spans the widths
        units = [(n, seed, m) for seed in range(settings.seeds) for n in settings.widths for m in args.methods]
        if args.jobs == 1:
            for unit in units:
                spent["train_s"] += cache.run(*unit, grids[unit[2]])
                progress()
            return
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor, as_completed

        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(args.jobs, mp_context=context) as pool:
            futures = [pool.submit(run_unit, cache, unit, grids[unit[2]]) for unit in units]
            for future in as_completed(futures):
                spent["train_s"] += future.result()[1]
                progress()

    while True:
        run_all()
        if not extend_grids(analyse(collect(cache, grids)), grids, added, settings.max_extensions):
            break
    data = publish(True)
    print(f"width transfer: {args.out / 'REPORT.md'}", flush=True)
    return data


if __name__ == "__main__":
    main()
