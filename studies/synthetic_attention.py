"""Study 1: the paper's synthetic attention experiment (Fig. 1), at full scale, on several targets.

Fit the attention logits of a frozen random "pretrained" pair ``Wq, Wk`` (d x d) to a target ``Z``::

    loss = mean over the (N, N) entries of (X Wq' Wk'^T X^T - Z)^2        X: (N, d) tokens

adapting both ``Wq`` and ``Wk`` with LoRA (rank r, ``W + s * B A``) or SingLoRA (rank 2r, ``W + s * u(t) * A A^T``),
so both have ``2 * d * 2r`` trainable parameters. AdamW, lr 1e-4, 15,000 iterations, as in the paper.

Choices where the paper is silent (all are flags): d = 128, N = 64 tokens, X, Wq, Wk with N(0, 1/d) entries, LoRA
rank 8 / SingLoRA rank 16, alpha = r for both (s = 1), AdamW's default betas (0.9, 0.999) and weight decay 0.01,
LoRA init as PEFT (input factor kaiming_uniform(a=sqrt 5), output factor zero), SingLoRA init as this library
(A ~ N(0, 1/d), ramp-up over 1% of the steps). ``Z = X Wq* Wk*^T X^T`` with ``Wq* = Wq + dQ``, ``Wk* = Wk + dK``
where ``||dQ||_F = 0.5 ||Wq||_F`` and the changes dQ, dK (drawn independently) are:

- ``psd_r``: positive semidefinite of rank r (P P^T, P: d x r): both methods can express it exactly;
- ``psd_2r``: PSD of rank 2r: SingLoRA (rank 2r) can, LoRA (rank r) cannot;
- ``indefinite_r``: symmetric of rank r with r/2 negative eigenvalues: LoRA can, A A^T (PSD) cannot;
- ``dense``: full-rank Gaussian: neither can (the closest thing to "a random attention target").

("Can express" is about each weight on its own; only the product Wq' Wk'^T enters the loss, so a method can
partly compensate through the other matrix.)

All seeds and targets of one method train as one batch of independent problems (AdamW is elementwise, so this is
exactly equal to one optimiser per problem). SingLoRA's update comes from ``torch_singlora.functional`` (the same math
as ``SingLoRALayer``); the factored forward used in the loop is checked against ``functional.delta_matrix``.

Run:  ``nice -n 10 .venv/bin/python -m studies.synthetic_attention``  (``--quick`` for a smoke run).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from torch_singlora import functional
from studies.common import environment, fmt, limit_threads, md_table, pyplot, save_figure, summarize, write_json, write_text

TARGETS = ("psd_r", "psd_2r", "indefinite_r", "dense")
METHODS = ("lora", "singlora")
TARGET_NOTES = {
    "psd_r": "PSD rank r: both can express",
    "psd_2r": "PSD rank 2r: only SingLoRA can express",
    "indefinite_r": "indefinite rank r: only LoRA can express",
    "dense": "dense full rank: neither can express",
}


@dataclass
class Settings:
    """One run of the study (every field is a ``--flag``)."""

    d: int = 128  # width of Wq, Wk (paper: 128)
    tokens: int = 64  # N, rows of X (paper: not given)
    lora_rank: int = 8  # LoRA rank r; SingLoRA gets 2r (equal parameters)
    steps: int = 15_000  # AdamW iterations (paper: 15,000)
    lr: float = 1e-4  # (paper: 1e-4)
    weight_decay: float = 0.01  # AdamW default (paper: not given)
    seeds: int = 24  # independent problems per target (paper: 1,000)
    change: float = 0.5  # ||dW||_F / ||W0||_F of the target change
    ramp_fraction: float = 0.01  # SingLoRA ramp-up T as a fraction of the steps
    log_every: int = 50  # loss-curve resolution (steps)
    targets: tuple[str, ...] = TARGETS


def target_change(kind: str, d: int, r: int, norm: float, g: torch.Generator) -> Tensor:
    """A (d, d) change of the kind named in the module docstring, scaled to Frobenius norm ``norm``."""
    if kind == "psd_r":
        P = torch.randn(d, r, generator=g)
        change = P @ P.T
    elif kind == "psd_2r":
        P = torch.randn(d, 2 * r, generator=g)
        change = P @ P.T
    elif kind == "indefinite_r":
        P = torch.randn(d, r, generator=g)
        signs = torch.tensor([1.0] * (r - r // 2) + [-1.0] * (r // 2))
        change = (P * signs) @ P.T
    elif kind == "dense":
        change = torch.randn(d, d, generator=g)
    else:
        raise ValueError(f"target={kind!r} is not one of {TARGETS}")
    return change * (norm / change.norm())


def make_problems(cfg: Settings) -> dict[str, Tensor]:
    """Batched problems, one per (target, seed), target-major: X (B, N, d), Wq, Wk (B, d, d), Z (B, N, N).

    Seed ``s`` gives the same X, Wq, Wk for every target; only the change differs.
    """
    d, N = cfg.d, cfg.tokens
    X, Wq, Wk, Z = [], [], [], []
    for t, kind in enumerate(cfg.targets):
        for seed in range(cfg.seeds):
            g = torch.Generator().manual_seed(seed)
            x = torch.randn(N, d, generator=g) / math.sqrt(d)
            wq = torch.randn(d, d, generator=g) / math.sqrt(d)
            wk = torch.randn(d, d, generator=g) / math.sqrt(d)
            g.manual_seed(10_000 * (t + 1) + seed)
            dq = target_change(kind, d, cfg.lora_rank, cfg.change * wq.norm().item(), g)
            dk = target_change(kind, d, cfg.lora_rank, cfg.change * wk.norm().item(), g)
            X.append(x), Wq.append(wq), Wk.append(wk)
            Z.append(x @ (wq + dq) @ (wk + dk).T @ x.T)
    return {"X": torch.stack(X), "Wq": torch.stack(Wq), "Wk": torch.stack(Wk), "Z": torch.stack(Z)}


class LoRAPair:
    """LoRA on Wq and Wk of every problem: ``W + s * B_in @ B_out`` with B_in (B, d, r), B_out (B, r, d).

    In ``Q = X W`` form the input-side factor is PEFT's ``lora_A`` (kaiming_uniform(a=sqrt 5), fan_in d) and
    the output-side factor is ``lora_B`` (zeros), so the update starts at 0 as in PEFT.
    """

    def __init__(self, batch: int, d: int, r: int, alpha: float, seed: int) -> None:
        torch.manual_seed(seed)
        bound = 1.0 / math.sqrt(d)  # kaiming_uniform_(a=sqrt(5)) on a (r, d) lora_A
        self.inputs = [torch.empty(batch, d, r).uniform_(-bound, bound).requires_grad_() for _ in range(2)]
        self.outputs = [torch.zeros(batch, r, d, requires_grad=True) for _ in range(2)]
        self.scale = functional.scaling(r, alpha)

    def parameters(self) -> list[Tensor]:
        return self.inputs + self.outputs

    def project(self, XW: Tensor, X: Tensor, which: int) -> Tensor:
        """``X (W + s B_in B_out)`` given ``XW = X W``: (B, N, d)."""
        return XW + ((X @ self.inputs[which]) * self.scale) @ self.outputs[which]

    def on_step(self) -> None:
        pass


class SingLoRAPair:
    """SingLoRA on Wq and Wk of every problem: ``W + s * u(t) * A A^T``, A (B, d, r), init and ramp as the library."""

    def __init__(self, batch: int, d: int, r: int, alpha: float, ramp_steps: int, seed: int) -> None:
        torch.manual_seed(seed)
        self.A = [torch.empty(batch, d, r) for _ in range(2)]
        for A in self.A:
            for i in range(batch):
                functional.init_A(A[i], "normal")
            A.requires_grad_()
        self.scale = functional.scaling(r, alpha)
        self.ramp_steps = ramp_steps
        self.step = torch.zeros((), dtype=torch.long)

    def parameters(self) -> list[Tensor]:
        return self.A

    def coefficient(self) -> Tensor:
        return functional.ramp_value(self.step, self.ramp_steps) * self.scale

    def project(self, XW: Tensor, X: Tensor, which: int) -> Tensor:
        """``X (W + c A A^T)`` given ``XW``, factored as in ``SingLoRALayer``: (B, N, d)."""
        A = self.A[which]
        return XW + ((X @ A) * self.coefficient()) @ A.transpose(1, 2)

    def dense_delta(self, which: int) -> Tensor:
        """``c A A^T`` per problem from ``functional.delta_matrix`` (the library's one formula): (B, d, d)."""
        d = self.A[which].shape[1]
        return torch.func.vmap(functional.delta_matrix, in_dims=(0, None, None, None))(
            self.A[which].detach(), d, d, self.coefficient())

    def on_step(self) -> None:
        self.step += 1


def check_factored_forward(adapter: SingLoRAPair, problems: dict[str, Tensor]) -> None:
    """The loop's factored forward equals ``X (W + delta_matrix(A))`` (fails loudly otherwise)."""
    saved = adapter.step.clone()
    adapter.step.fill_(max(adapter.ramp_steps, 1))  # u = 1, so the check is not trivially about a zero update
    with torch.no_grad():
        X, Wq = problems["X"], problems["Wq"]
        factored = adapter.project(X @ Wq, X, 0)
        dense = X @ (Wq + adapter.dense_delta(0))
    adapter.step.copy_(saved)
    torch.testing.assert_close(factored, dense, atol=1e-5, rtol=1e-4)


def per_problem_loss(adapter: LoRAPair | SingLoRAPair, problems: dict[str, Tensor], XWq: Tensor, XWk: Tensor) -> Tensor:
    """Mean squared error of the attention logits, one value per problem: (B,)."""
    X = problems["X"]
    logits = adapter.project(XWq, X, 0) @ adapter.project(XWk, X, 1).transpose(1, 2)  # (B, N, N)
    return (logits - problems["Z"]).pow(2).mean(dim=(1, 2))


def train(method: str, cfg: Settings, problems: dict[str, Tensor]) -> dict[str, object]:
    """Train one method on every problem at once; returns the loss curve (steps, B) and the wall time."""
    batch = problems["X"].shape[0]
    if method == "lora":
        adapter: LoRAPair | SingLoRAPair = LoRAPair(batch, cfg.d, cfg.lora_rank, cfg.lora_rank, seed=1)
    else:
        rank = 2 * cfg.lora_rank
        ramp_steps = max(1, round(cfg.ramp_fraction * cfg.steps)) if cfg.ramp_fraction > 0 else 0  # as SingLoRAConfig
        adapter = SingLoRAPair(batch, cfg.d, rank, rank, ramp_steps, seed=1)
        check_factored_forward(adapter, problems)
    optimizer = torch.optim.AdamW(adapter.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    X = problems["X"]
    XWq, XWk = X @ problems["Wq"], X @ problems["Wk"]
    curve_steps, curve = [], []
    start = time.perf_counter()
    for step in range(cfg.steps + 1):
        losses = per_problem_loss(adapter, problems, XWq, XWk)
        if step % cfg.log_every == 0 or step == cfg.steps:
            curve_steps.append(step)
            curve.append(losses.detach().clone())
        if step == cfg.steps:
            break
        optimizer.zero_grad(set_to_none=True)
        losses.sum().backward()  # problems are independent: the sum gives each its own gradient
        optimizer.step()
        adapter.on_step()
    wall = time.perf_counter() - start
    params_per_problem = sum(p[0].numel() for p in adapter.parameters())
    return {"steps": curve_steps, "curve": torch.stack(curve), "wall_s": wall, "params": params_per_problem}


def analyse(cfg: Settings, runs: dict[str, dict[str, object]]) -> dict[str, object]:
    """Per target and method: final and initial loss summaries, the median curve with quartiles, win rates."""
    S = cfg.seeds
    out: dict[str, object] = {}
    for t, kind in enumerate(cfg.targets):
        rows = slice(t * S, (t + 1) * S)
        entry: dict[str, object] = {"note": TARGET_NOTES[kind]}
        finals = {}
        for method in METHODS:
            curve = runs[method]["curve"][:, rows]  # (points, S)
            finals[method] = curve[-1]
            q = torch.quantile(curve, torch.tensor([0.25, 0.5, 0.75]), dim=1)
            entry[method] = {
                "final": summarize(curve[-1].tolist()),
                "initial": summarize(curve[0].tolist()),
                "relative_final": summarize((curve[-1] / curve[0]).tolist()),
                "final_per_seed": curve[-1].tolist(),
                "curve_q25": q[0].tolist(), "curve_median": q[1].tolist(), "curve_q75": q[2].tolist(),
            }
        ratio = finals["lora"] / finals["singlora"]
        entry["lora_over_singlora"] = summarize(ratio.tolist())
        entry["singlora_wins"] = int((finals["singlora"] < finals["lora"]).sum())
        out[kind] = entry
    return out


def plot(cfg: Settings, runs: dict[str, dict[str, object]], results: dict[str, object], out_dir: Path) -> list[str]:
    plt = pyplot()
    steps = runs["lora"]["steps"]
    colors = {"lora": "tab:blue", "singlora": "tab:red"}
    fig, axes = plt.subplots(1, len(cfg.targets), figsize=(4.2 * len(cfg.targets), 3.6), squeeze=False)
    for ax, kind in zip(axes[0], cfg.targets):
        for method in METHODS:
            r = results[kind][method]
            ax.plot(steps, r["curve_median"], color=colors[method], label=f"{method} (median)")
            ax.fill_between(steps, r["curve_q25"], r["curve_q75"], color=colors[method], alpha=0.25)
        ax.set_yscale("log"), ax.set_title(TARGET_NOTES[kind], fontsize=9), ax.set_xlabel("iteration")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("MSE of attention logits"), axes[0][0].legend(fontsize=8)
    fig.suptitle(f"Synthetic attention: median and quartiles over {cfg.seeds} seeds")
    save_figure(fig, out_dir / "loss_curves.png")

    fig, ax = plt.subplots(figsize=(1.9 * len(cfg.targets) + 1, 3.6))
    for t, kind in enumerate(cfg.targets):
        for m, method in enumerate(METHODS):
            ys = results[kind][method]["final_per_seed"]
            xs = [t + (m - 0.5) * 0.35 + 0.02 * ((i % 7) - 3) for i in range(len(ys))]
            ax.scatter(xs, ys, s=9, color=colors[method], label=method if t == 0 else None)
    ax.set_xticks(range(len(cfg.targets)), cfg.targets), ax.set_yscale("log"), ax.grid(alpha=0.3)
    ax.set_ylabel(f"final loss after {cfg.steps} iterations"), ax.legend(fontsize=8)
    save_figure(fig, out_dir / "final_loss.png")
    return ["loss_curves.png", "final_loss.png"]


def report(cfg: Settings, runs: dict[str, dict[str, object]], results: dict[str, object], command: str,
           wall: float, figures: list[str]) -> str:
    rows = []
    for kind in cfg.targets:
        r = results[kind]
        for method in METHODS:
            f, rel = r[method]["final"], r[method]["relative_final"]
            rows.append([kind, method, runs[method]["params"], fmt(r[method]["initial"]["median"]),
                         fmt(f["median"]), f"{fmt(f['q25'])} – {fmt(f['q75'])}", f"{fmt(f['min'])} – {fmt(f['max'])}",
                         fmt(rel["median"])])
    ratios = [[kind, TARGET_NOTES[kind], fmt(results[kind]["lora_over_singlora"]["median"]),
               f"{fmt(results[kind]['lora_over_singlora']['min'])} – {fmt(results[kind]['lora_over_singlora']['max'])}",
               f"{results[kind]['singlora_wins']} / {cfg.seeds}"] for kind in cfg.targets]
    settings = "\n".join(f"- `{k}` = {v}" for k, v in dataclasses.asdict(cfg).items())
    return f"""# Study 1: synthetic attention (paper Fig. 1)

Command: `{command}`

Wall time: {wall:.0f} s in total (LoRA {runs['lora']['wall_s']:.0f} s, SingLoRA {runs['singlora']['wall_s']:.0f} s for
all {len(cfg.targets) * cfg.seeds} problems each, batched), 1 CPU thread, shared machine.

Paper's claim: with equal parameter counts, after 15,000 AdamW iterations at lr 1e-4 the final loss is about
1e-5 for SingLoRA against about 1e-2 for LoRA (1,000 seeds; the paper gives no target distribution, X, ranks or init).

## Set-up (what we chose where the paper is silent)

{__doc__.split("Choices where the paper is silent (all are flags): ")[1].split("All seeds")[0].strip()}

Settings of this run:
{settings}

Loss = mean squared error over the N x N logits (the paper's ||.||^2 up to the constant 1/N^2). "relative" = final
loss / loss of the unadapted model on the same problem.

## Final loss

{md_table(["target", "method", "trainable params", "initial (median)", "final median", "final IQR", "final min – max", "final / initial (median)"], rows)}

## LoRA vs SingLoRA per seed (same problem, same seed)

{md_table(["target", "expressible by", "median of LoRA/SingLoRA final loss", "min – max", "SingLoRA lower"], ratios)}

## Loss curves

![loss curves]({figures[0]})

![final losses]({figures[1]})
"""


def parse_args(argv: list[str] | None) -> tuple[Settings, argparse.Namespace]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    defaults = Settings()
    for field in dataclasses.fields(Settings):
        if field.name == "targets":
            parser.add_argument("--targets", nargs="+", choices=TARGETS, default=list(TARGETS))
        else:
            parser.add_argument(f"--{field.name.replace('_', '-')}", type=type(getattr(defaults, field.name)),
                                default=getattr(defaults, field.name))
    parser.add_argument("--quick", action="store_true", help="smoke run: 3 seeds, 200 iterations")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "synthetic_attention")
    args = parser.parse_args(argv)
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(Settings)}
    values["targets"] = tuple(values["targets"])
    if args.quick:
        values.update(seeds=3, steps=200, log_every=20)
    if values["lora_rank"] < 2 or 2 * values["lora_rank"] > values["d"]:
        parser.error(f"--lora-rank={values['lora_rank']} must be in [2, d/2]")
    return Settings(**values), args


def main(argv: list[str] | None = None) -> dict[str, object]:
    cfg, args = parse_args(argv)
    limit_threads(1)
    args.out.mkdir(parents=True, exist_ok=True)
    command = "python -m studies.synthetic_attention" + (" --quick" if args.quick else "")
    start = time.perf_counter()
    problems = make_problems(cfg)
    runs = {}
    for method in METHODS:
        runs[method] = train(method, cfg, problems)
        print(f"{method}: {runs[method]['wall_s']:.0f} s", flush=True)
    results = analyse(cfg, runs)
    wall = time.perf_counter() - start
    figures = plot(cfg, runs, results, args.out)
    data = {"study": "synthetic_attention", "command": command, "settings": dataclasses.asdict(cfg),
            "wall_s": wall, "environment": environment(), "curve_steps": runs["lora"]["steps"],
            "params": {m: runs[m]["params"] for m in METHODS}, "targets": results}
    write_json(args.out / "results.json", data)
    write_text(args.out / "REPORT.md", report(cfg, runs, results, command, wall, figures))
    return data


if __name__ == "__main__":
    main()
