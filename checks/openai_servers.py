"""OpenAI-compatible servers run as subprocesses, and the clients ``checks/vllm_cpu.py`` measures them with.

``Server``: start a command in its own process group, wait until ``GET /v1/models`` answers, stop the whole group
on exit (its output goes to a log file). ``greedy_texts``: temperature-0 completions of token-id prompts.
``throughput``: concurrent clients, each sending its requests one after the other; generated tokens per second.
"""

from __future__ import annotations

import os
import platform
import signal
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import httpx


class Server:
    """``with Server(command, port, log, env) as server:`` the server at ``server.url`` until the block ends."""

    def __init__(self, command: list[str], port: int, log: Path, env: dict[str, str], startup_s: float = 600) -> None:
        self.command, self.port, self.log, self.env, self.startup_s = command, port, log, env, startup_s
        self.url = f"http://127.0.0.1:{port}"
        self.process: subprocess.Popen | None = None

    def __enter__(self) -> "Server":
        handle = open(self.log, "w")
        self.process = subprocess.Popen(self.command, stdout=handle, stderr=subprocess.STDOUT, env=self.env,
                                        start_new_session=True)
        handle.close()
        deadline = time.time() + self.startup_s
        while time.time() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.command[:4]} exited with {self.process.returncode}; see {self.log}")
            try:
                if httpx.get(f"{self.url}/v1/models", timeout=5).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(2)
        self.__exit__()
        raise RuntimeError(f"{self.command[:4]} did not answer within {self.startup_s} s; see {self.log}")

    def __exit__(self, *exc: Any) -> None:
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()

    def memory_mb(self) -> float:
        """Resident memory of the server's process group (MB), from ``ps``."""
        out = subprocess.run(["ps", "-o", "rss=", "-g", str(self.process.pid)], capture_output=True, text=True)
        return sum(int(v) for v in out.stdout.split()) / 1024


def complete(client: httpx.Client, url: str, model: str, prompt: list[int], max_tokens: int) -> dict[str, Any]:
    """One greedy completion; ``{"text", "tokens"}``."""
    response = client.post(f"{url}/v1/completions", timeout=3600, json={
        "model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0})
    response.raise_for_status()
    body = response.json()
    return {"text": body["choices"][0]["text"], "tokens": body["usage"]["completion_tokens"]}


def greedy_texts(url: str, models: list[str], prompts: list[list[int]], max_tokens: int) -> dict[str, list[str]]:
    """``{model: [text per prompt]}``, one request at a time."""
    with httpx.Client() as client:
        return {model: [complete(client, url, model, prompt, max_tokens)["text"] for prompt in prompts]
                for model in models}


def throughput(url: str, adapters: list[str], prompts: list[list[int]], clients: int, per_client: int,
               max_tokens: int) -> dict[str, Any]:
    """``clients`` clients (client ``c`` on adapter ``c mod len(adapters)``), each sending ``per_client`` requests
    in turn (``benchmarks.serving.drive``, as the serving benchmark's clients); generated tokens per wall second and
    request latencies."""
    from benchmarks.serving import drive, jobs_for

    with httpx.Client(limits=httpx.Limits(max_connections=clients)) as http:
        def submit(adapter: str, prompt: list[int], emit: Any) -> None:
            def call() -> None:
                try:
                    emit("done", complete(http, url, adapter, prompt, max_tokens)["tokens"])
                except httpx.HTTPError as exc:
                    emit("error", repr(exc))
            threading.Thread(target=call).start()

        return drive(submit, jobs_for(clients, adapters, prompts, per_client), lambda prompt, tokens: tokens)


def machine(vllm: Path) -> dict[str, Any]:
    """What ran the check: CPU, cores, load average, the two torch builds."""
    import torch

    vllm_python = vllm.parent / "python"
    vllm_torch = subprocess.run([str(vllm_python), "-c", "import torch; print(torch.__version__)"],
                                capture_output=True, text=True).stdout.strip()
    return {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
            "load_average": list(os.getloadavg()), "torch": torch.__version__, "vllm_torch": vllm_torch}
