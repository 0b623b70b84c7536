"""What one tenant's traffic costs the others on ``singlora serve`` (issue 21), measured as users meet it: the HTTP
server in this process on SmolLM2-135M-Instruct (float32, one torch thread), clients through the ``openai``
package and raw sockets.

- ``abandon``: a short chat request's latency on an idle server, then right after 16 long requests (400 tokens
  each) whose clients dropped their connections (non-streamed) once every row was running. Before issue 21 the
  abandoned rows ran to their end (111 s against 1.2 s idle).
- ``prefill``: 8 streams decode while a 2,000-token prompt arrives: the running streams' gaps between chunks
  (p50 and max, over the window from the long request's arrival to its first token) with chunked prefill
  (``--max-step-tokens 256``, the default) and without (a budget of 4,096: the whole prompt in one step), and the
  long request's time to its first token.
- ``detok``: streaming detokenization of n tokens of real text: the incremental ``TextStream`` against re-decoding
  the whole text per token (the stream before issue 21; 10.7, 50, 183, 702 ms for 256 ... 2,048 tokens).

    python -m benchmarks.serving_traffic                      # all parts (~5 min on a loaded 2-core CPU)
    python -m benchmarks.serving_traffic --parts detok        # one part: abandon, prefill, detok
"""

from __future__ import annotations

import argparse
import json
import shlex
import socket
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable

import torch

from .measure import machine_description, write_outputs

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


def smollm2() -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from torch_singlora.assets import smollm2_path

    path = smollm2_path()
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval(), AutoTokenizer.from_pretrained(path)


def running_server(model: Any, tokenizer: Any, **limits: Any) -> tuple[Any, int, Callable[[], None]]:
    """A live server (``Service`` + ``create_app``) on 127.0.0.1; returns ``(service, port, stop)``."""
    from torch_singlora.serving.app import create_app, serve_in_thread
    from torch_singlora.serving.service import Limits, Service

    service = Service(model, tokenizer, name="smollm2", limits=Limits(**limits))
    server, thread, port = serve_in_thread(create_app(service))

    def stop() -> None:
        server.should_exit = True
        thread.join()

    return service, port, stop


def wait_until(condition: Callable[[], bool], what: str, timeout_s: float = 600) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        time.sleep(0.01)


def client(port: int) -> Any:
    import openai

    return openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=3600)


def timed_chat(port: int, max_tokens: int) -> float:
    start = time.perf_counter()
    client(port).chat.completions.create(model="smollm2", messages=QUESTION, max_tokens=max_tokens, temperature=0,
                                         extra_body={"ignore_eos": True})
    return time.perf_counter() - start


def part_abandon(model: Any, tokenizer: Any) -> dict[str, Any]:
    service, port, stop = running_server(model, tokenizer, max_batch_size=16)
    try:
        timed_chat(port, 4)  # warm-up
        idle = statistics.median(timed_chat(port, 16) for _ in range(3))
        body = json.dumps({"model": "smollm2", "prompt": "Write a long story.", "max_tokens": 400,
                           "ignore_eos": True, "temperature": 0}).encode()
        sockets = [socket.create_connection(("127.0.0.1", port)) for _ in range(16)]
        for sock in sockets:
            sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        wait_until(lambda: len(service.engine.rows) == 16 and min(len(r.generated) for r in service.engine.rows) >= 2,
                   "the 16 long requests to run")
        rows = list(service.engine.rows)
        at_drop = [len(r.generated) for r in rows]
        for sock in sockets:
            sock.close()
        after = timed_chat(port, 16)
        extra = [len(r.generated) - n for r, n in zip(rows, at_drop)]
    finally:
        stop()
    return {"idle_s": idle, "after_abandon_s": after, "ratio": after / idle, "abandoned": 16,
            "abandoned_max_tokens": 400, "tokens_after_drop_max": max(extra), "tokens_after_drop_mean":
            statistics.mean(extra)}


def stream_gaps(port: int, stamps: list[float], stop: threading.Event) -> None:
    """One stream that records the time of each chunk until ``stop``."""
    stream = client(port).completions.create(model="smollm2", prompt="Tell me a story.", max_tokens=1000,
                                             temperature=0, stream=True, extra_body={"ignore_eos": True})
    for _ in stream:
        stamps.append(time.perf_counter())
        if stop.is_set():
            stream.close()
            return


def part_prefill(model: Any, tokenizer: Any) -> list[dict[str, Any]]:
    readme = Path(__file__).resolve().parents[1].joinpath("README.md").read_text(encoding="utf-8")
    ids = (tokenizer(readme, add_special_tokens=False)["input_ids"] * 3)[:2000]
    rows = []
    for budget in (256, 4096):
        service, port, stop_server = running_server(model, tokenizer, max_batch_size=16, max_step_tokens=budget,
                                                    max_prompt_tokens=4096, max_tokens=4096)
        try:
            stamps: list[list[float]] = [[] for _ in range(8)]
            stop = threading.Event()
            threads = [threading.Thread(target=stream_gaps, args=(port, s, stop)) for s in stamps]
            for thread in threads:
                thread.start()
            wait_until(lambda: min(map(len, stamps)) >= 5 or not all(t.is_alive() for t in threads),
                       "the 8 streams to run")
            arrival = time.perf_counter()
            stream = client(port).completions.create(model="smollm2", prompt=ids, max_tokens=4, temperature=0,
                                                     stream=True)
            next(iter(stream))
            first_token = time.perf_counter()
            stream.close()
            stop.set()
            for thread in threads:
                thread.join()
        finally:
            stop_server()
        gaps = [b - a for s in stamps for a, b in zip(s, s[1:]) if b > arrival and a < first_token]
        before = [b - a for s in stamps for a, b in zip(s, s[1:]) if b < arrival]
        rows.append({"max_step_tokens": budget, "prompt_tokens": len(ids), "running_streams": 8,
                     "gap_p50_before_s": statistics.median(before), "gap_p50_s": statistics.median(gaps),
                     "gap_max_s": max(gaps), "long_ttft_s": first_token - arrival})
    return rows


class _WholeTextStream:
    """The stream before issue 21: the whole text decoded again for every token."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer, self.ids, self.emitted = tokenizer, [], 0

    def push(self, token: int) -> str:
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)
        piece, self.emitted = text[self.emitted:], len(text)
        return piece


def part_detok(tokenizer: Any) -> list[dict[str, Any]]:
    from torch_singlora.serving.text import TextStream

    text = Path(__file__).resolve().parents[1].joinpath("README.md").read_text(encoding="utf-8")
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    rows = []
    for n in (256, 512, 1024, 2048):
        times: dict[str, list[float]] = {"incremental": [], "whole_text": []}
        for _ in range(3):  # interleaved rounds
            for name, make in (("incremental", lambda: TextStream(tokenizer)),
                               ("whole_text", lambda: _WholeTextStream(tokenizer))):
                stream = make()
                start = time.perf_counter()
                for token in ids[:n]:
                    stream.push(token)
                times[name].append(time.perf_counter() - start)
        incremental, whole = min(times["incremental"]), min(times["whole_text"])
        rows.append({"tokens": n, "incremental_ms": 1000 * incremental, "whole_text_ms": 1000 * whole,
                     "incremental_us_per_token": 1e6 * incremental / n})
    return rows


def render(results: dict[str, Any]) -> str:
    lines = [f"Command: `{results['command']}`", "", f"Machine: {results['machine']}", ""]
    if "abandon" in results:
        a = results["abandon"]
        lines += ["## Abandoned requests", "", "| idle latency | after 16 abandoned | ratio | tokens after drop "
                  "(max / mean) |", "|---|---|---|---|",
                  f"| {a['idle_s']:.2f} s | {a['after_abandon_s']:.2f} s | {a['ratio']:.2f}x | "
                  f"{a['tokens_after_drop_max']} / {a['tokens_after_drop_mean']:.1f} |", ""]
    if "prefill" in results:
        lines += ["## A 2,000-token prompt arrives while 8 streams decode", "",
                  "| max_step_tokens | gap p50 before | gap p50 during | gap max during | long request TTFT |",
                  "|---|---|---|---|---|"]
        lines += [f"| {r['max_step_tokens']} | {r['gap_p50_before_s'] * 1000:.0f} ms | {r['gap_p50_s'] * 1000:.0f} ms"
                  f" | {r['gap_max_s'] * 1000:.0f} ms | {r['long_ttft_s']:.2f} s |" for r in results["prefill"]]
        lines.append("")
    if "detok" in results:
        lines += ["## Streaming detokenization", "", "| tokens | incremental | whole text per token |", "|---|---|---|"]
        lines += [f"| {r['tokens']} | {r['incremental_ms']:.1f} ms | {r['whole_text_ms']:.1f} ms |"
                  for r in results["detok"]]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--parts", nargs="+", default=["abandon", "prefill", "detok"],
                        choices=["abandon", "prefill", "detok"])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    model, tokenizer = smollm2()
    results: dict[str, Any] = {"command": shlex.join(["python", "-m", "benchmarks.serving_traffic", *(argv or [])]),
                               "machine": machine_description()}
    if "abandon" in args.parts:
        results["abandon"] = part_abandon(model, tokenizer)
    if "prefill" in args.parts:
        results["prefill"] = part_prefill(model, tokenizer)
    if "detok" in args.parts:
        results["detok"] = part_detok(tokenizer)
    print(write_outputs(results, render, args.out, "serving_traffic", "# Serving under real traffic (issue 21)"))
    return results


if __name__ == "__main__":
    sys.exit(0 if main(sys.argv[1:]) else 1)
