"""Experiment tracking: ``singlora train --report-to tensorboard,wandb,...`` sends every record of ``metrics.jsonl`` to
the trackers named, with ``transformers.Trainer``'s names and behaviour.

    --report-to none            metrics.jsonl only (the default, as Trainer's since transformers 5)
    --report-to all             every tracker below that is installed
    --report-to tensorboard,mlflow   several at once (commas; spaces also separate)

========================  =====================================================================================
tracker (extra)           where, by default (the environment variables are Trainer's)
========================  =====================================================================================
``tensorboard``           ``<output-dir>/runs/<date>_<host>/`` event files (``TENSORBOARD_LOGGING_DIR`` overrides)
``wandb``                 project ``WANDB_PROJECT`` (default ``huggingface``), files under ``<output-dir>/wandb/``
                          (``WANDB_DIR``); ``WANDB_MODE=offline`` keeps the run on disk (``wandb sync`` later)
``mlflow``                ``MLFLOW_TRACKING_URI``, else the folder ``<output-dir>/mlruns`` (MLflow's file store;
                          experiment ``MLFLOW_EXPERIMENT_NAME``)
``trackio``               project ``TRACKIO_PROJECT`` (default ``huggingface``) in trackio's local database
                          (``TRACKIO_DIR``; a Space only when ``TRACKIO_SPACE_ID`` is set)
========================  =====================================================================================

Each record becomes Trainer's tags (``rewrite_logs``): a training step's keys under ``train/`` (``train/loss``,
``train/lr``, ``train/u``, ``train/grad_norm``, DPO's ``train/reward_accuracy``...), an evaluation's under ``eval/``
(``eval_loss`` -> ``eval/loss``, ``eval/accuracy``...), at the record's optimizer step. Numbers are scalars; the
sample generations (``samples``) are text: a Markdown table in TensorBoard, a ``Table`` in wandb and trackio, a JSON
artifact in MLflow. The run's resolved config (``run_config``) is the run's hyperparameters / config.

``--resume`` starts a new tracker run holding the steps after the checkpoint (as Trainer does without the trackers'
own resume settings); ``metrics.jsonl`` holds them all. Each tracker is an optional extra, imported only when named. A tracker that cannot start stops the run before it
trains (an error naming it); one that fails later is dropped with a warning, and the run goes on (``metrics.jsonl``
has everything).
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import socket
import sys
from datetime import datetime
from pathlib import Path
from typing import Any, Callable

from ..errors import SingLoRAError

TRACKERS = ("tensorboard", "wandb", "mlflow", "trackio")
PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow", "trackio": "trackio"}
EXTRAS = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow-skinny", "trackio": "trackio"}


def installed(name: str) -> bool:
    return importlib.util.find_spec(PACKAGES[name]) is not None


def parse_report_to(text: str) -> list[str]:
    """``--report-to``'s trackers: ``none`` -> [], ``all`` -> the installed ones, else the names given (each must be
    known and installed)."""
    names = [name for name in text.replace(" ", ",").split(",") if name]
    if names in ([], ["none"]):
        return []
    if names == ["all"]:
        return [name for name in TRACKERS if installed(name)]
    unknown = [name for name in names if name not in TRACKERS]
    if unknown or len(set(names)) != len(names):
        raise SingLoRAError(f"--report-to={text!r}: give none, all, or some of {', '.join(TRACKERS)} "
                            f"({'unknown: ' + ', '.join(unknown) if unknown else 'a tracker named twice'})")
    missing = [name for name in names if not installed(name)]
    if missing:
        raise SingLoRAError(f"--report-to {', '.join(missing)}: not installed (pip install "
                            f"{' '.join(EXTRAS[name] for name in missing)})")
    return names


def tags(record: dict[str, Any]) -> dict[str, Any]:
    """A ``metrics.jsonl`` record as Trainer's tags: ``train/<key>`` or ``eval/<key>`` (``eval_`` dropped); the
    ``kind`` and ``step`` keys and null values left out."""
    prefix = "eval" if record.get("kind") == "eval" else "train"
    found = {}
    for key, value in record.items():
        if key in ("kind", "step") or value is None:
            continue
        name = key[len("eval_"):] if prefix == "eval" and key.startswith("eval_") else key
        found[f"{prefix}/{name}"] = value
    return found


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def is_table(value: Any) -> bool:
    """A list of flat objects with the same keys (the ``samples`` of an evaluation)."""
    return (isinstance(value, list) and bool(value) and all(isinstance(row, dict) for row in value)
            and all(row.keys() == value[0].keys() for row in value))


def split(values: dict[str, Any]) -> tuple[dict[str, Any], dict[str, tuple[list[str], list[list[str]]]]]:
    """``(numbers and text, tables)`` of a record's tags; a table as ``(columns, rows of text)``."""
    plain = {tag: value for tag, value in values.items() if is_number(value) or isinstance(value, str)}
    tables = {tag: (list(value[0]), [[str(v) for v in row.values()] for row in value])
              for tag, value in values.items() if is_table(value)}
    return plain, tables


def markdown_table(rows: list[dict[str, Any]]) -> str:
    """``rows`` (``is_table``) as a Markdown table (``|`` and newlines escaped)."""
    def cell(value: Any) -> str:
        return str(value).replace("|", "\\|").replace("\n", "<br>")

    columns = list(rows[0])
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(row[c]) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


class Tracker:
    """One tracker of a run: started with the run folder, its name and resolved config; ``log`` a record's tags at
    a step; ``close`` at the end (also when the run fails)."""

    name = ""

    def __init__(self, folder: Path, run_name: str, config: dict[str, Any]) -> None:
        raise NotImplementedError

    def log(self, values: dict[str, Any], step: int) -> None:
        raise NotImplementedError

    def close(self) -> None:
        pass


class TensorBoard(Tracker):
    name = "tensorboard"

    def __init__(self, folder: Path, run_name: str, config: dict[str, Any]) -> None:
        from torch.utils.tensorboard import SummaryWriter

        stamp = f"{datetime.now().strftime('%b%d_%H-%M-%S')}_{socket.gethostname()}"  # Trainer's default_logdir
        self.log_dir = Path(os.path.expanduser(os.environ.get("TENSORBOARD_LOGGING_DIR", "")) or
                            folder / "runs" / stamp)
        self.writer = SummaryWriter(log_dir=str(self.log_dir))
        self.writer.add_text("args", f"```json\n{json.dumps(config, indent=2)}\n```")

    def log(self, values: dict[str, Any], step: int) -> None:
        for tag, value in values.items():
            if is_number(value):
                self.writer.add_scalar(tag, value, step)
            elif isinstance(value, str):
                self.writer.add_text(tag, value, step)
            elif is_table(value):
                self.writer.add_text(tag, markdown_table(value), step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class Wandb(Tracker):
    name = "wandb"

    def __init__(self, folder: Path, run_name: str, config: dict[str, Any]) -> None:
        import wandb

        self.wandb = wandb
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "huggingface"), name=run_name,
                              dir=os.environ.get("WANDB_DIR", str(folder)), config=config)
        self.run.define_metric("train/global_step")
        self.run.define_metric("*", step_metric="train/global_step", step_sync=True)

    def log(self, values: dict[str, Any], step: int) -> None:
        plain, tables = split(values)
        plain.update({tag: self.wandb.Table(columns=columns, data=rows) for tag, (columns, rows) in tables.items()})
        self.run.log({**plain, "train/global_step": step})

    def close(self) -> None:
        self.run.finish()


class MLflow(Tracker):
    name = "mlflow"

    def __init__(self, folder: Path, run_name: str, config: dict[str, Any]) -> None:
        import mlflow
        from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH

        self.mlflow = mlflow
        if not os.environ.get("MLFLOW_TRACKING_URI"):
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 keeps its folder store for opt-ins
            mlflow.set_tracking_uri((folder / "mlruns").resolve().as_uri())
        if os.environ.get("MLFLOW_EXPERIMENT_NAME"):
            mlflow.set_experiment(os.environ["MLFLOW_EXPERIMENT_NAME"])
        self.run = mlflow.start_run(run_name=run_name)
        mlflow.log_params({key: str(value)[:MAX_PARAM_VAL_LENGTH] for key, value in config.items()})

    def log(self, values: dict[str, Any], step: int) -> None:
        numbers = {tag: float(value) for tag, value in values.items() if is_number(value)}
        if numbers:
            self.mlflow.log_metrics(numbers, step=step)
        for tag, value in values.items():
            if isinstance(value, str) or is_table(value):
                self.mlflow.log_text(json.dumps(value, indent=2, ensure_ascii=False), f"{tag}/step_{step}.json")

    def close(self) -> None:
        self.mlflow.end_run()


class Trackio(Tracker):
    name = "trackio"

    def __init__(self, folder: Path, run_name: str, config: dict[str, Any]) -> None:
        import trackio

        self.trackio = trackio
        with contextlib.redirect_stdout(sys.stderr):  # its banner; stdout is the run's summary table
            trackio.init(project=os.environ.get("TRACKIO_PROJECT", "huggingface"), name=run_name, config=config,
                         space_id=os.environ.get("TRACKIO_SPACE_ID"), auto_log_cpu=False, auto_log_gpu=False)

    def log(self, values: dict[str, Any], step: int) -> None:
        plain, tables = split(values)
        plain.update({tag: self.trackio.Table(columns=columns, data=rows) for tag, (columns, rows) in tables.items()})
        self.trackio.log(plain, step=step)

    def close(self) -> None:
        with contextlib.redirect_stdout(sys.stderr):
            self.trackio.finish()


CLASSES: dict[str, type[Tracker]] = {"tensorboard": TensorBoard, "wandb": Wandb, "mlflow": MLflow,
                                     "trackio": Trackio}


class Trackers:
    """The run's trackers (``--report-to``): ``log(record)`` sends a ``metrics.jsonl`` record to each."""

    def __init__(self, names: list[str], folder: Path, run_name: str, config: dict[str, Any]) -> None:
        self.active: list[Tracker] = []
        try:
            for name in names:
                try:
                    self.active.append(CLASSES[name](folder, run_name, config))
                except Exception as exc:  # noqa: BLE001 - any tracker's failure to start, named
                    raise SingLoRAError(f"--report-to {name}: cannot start: {type(exc).__name__}: {exc}") from exc
        except BaseException:
            self.close()
            raise

    def log(self, record: dict[str, Any]) -> None:
        values = tags(record)
        for tracker in list(self.active):
            self._guard(tracker, lambda: tracker.log(values, int(record["step"])))

    def close(self) -> None:
        for tracker in self.active:
            self._guard(tracker, tracker.close)
        self.active = []

    def _guard(self, tracker: Tracker, call: Callable[[], None]) -> None:
        """Run ``call``; on failure warn and drop ``tracker`` (metrics.jsonl still has every record)."""
        try:
            call()
        except Exception as exc:  # noqa: BLE001 - a tracker must not stop training
            print(f"singlora train: warning: --report-to {tracker.name} failed ({type(exc).__name__}: {exc}); "
                  "it is left out from here on (metrics.jsonl has every record)", file=sys.stderr)
            if tracker in self.active:
                self.active.remove(tracker)
