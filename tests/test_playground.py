"""The browser playground that ``singlora serve`` serves at ``/``, driven in a real browser: Playwright for Python
with Debian's ``chromium`` (headless), against a live ``singlora serve`` command on a tiny Llama with SmolLM2's
tokenizer. One server and one browser for the module; each test opens a fresh page.

Every streamed answer is compared with the library's own greedy generation (``SingLoRAModel.generate`` with the
adapter set), token counts with the number of tokens it generated. The ``html`` adapter's head is solved so that
its greedy answer is markup (``<script>...``): the page must show it as text.

Skipped, with the reason, where Playwright or a chromium binary is missing (``.ci/run`` installs Debian's chromium;
``SINGLORA_CHROMIUM`` names another binary). ``python tests/test_playground.py --screenshot docs/playground.png``
makes the README's picture of the compare view on the real SmolLM2-135M-Instruct.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import httpx
import pytest
import torch

from torch_singlora import SingLoRAConfig, SingLoRAModel, assets, get_singlora_model
import torch_singlora.serving
from serving_models import tiny_llama
from torch_singlora.serving.text import chat_prompt_ids

STATIC = Path(torch_singlora.serving.__file__).with_name("static")
KEY = "playground-key"
MARKUP = '<script>window.pwned = 1</script><b>bold</b> & done'  # the html adapter's greedy answer
MARKUP_PROMPT = "Show me some HTML"
ADAPTERS = {
    "alice": SingLoRAConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"], init="gaussian", init_std=0.5,
                            ramp_up_steps=0),
    "bob": SingLoRAConfig(r=8, alpha=4, target_modules=["o_proj", "embed_tokens"], init="gaussian", init_std=0.3,
                          ramp_up_steps=0),
    "html": SingLoRAConfig(r=2, target_modules=["q_proj"], modules_to_save=["lm_head"], init="gaussian",
                           init_std=0.5, ramp_up_steps=0),
    "retired": SingLoRAConfig(r=2, target_modules=["v_proj"], init="gaussian", init_std=0.5, ramp_up_steps=0),
}


def find_chromium() -> str | None:
    """A chromium binary: ``SINGLORA_CHROMIUM``, else ``chromium`` / ``chromium-browser`` on the PATH."""
    for name in (os.environ.get("SINGLORA_CHROMIUM"), "chromium", "chromium-browser"):
        path = shutil.which(name) if name else None
        if path:
            return path
    return None


def skip_reason() -> str | None:
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "Playwright for Python is not installed (pip install playwright; it is in the dev extra)"
    if find_chromium() is None:
        return "no chromium binary (apt-get install chromium, as .ci/run does, or set SINGLORA_CHROMIUM)"
    return None


# ---- the server and the browser (also used by the screenshot script below) -----------------------------------------

@contextlib.contextmanager
def singlora_serve(model: Path, adapter_dir: Path, *options: str, key: str | None = KEY) -> Iterator[Callable[[], str]]:
    """Start the ``singlora serve`` command on a free port, stop it when the block ends. Yields ``ready()``, which
    waits until the server answers and returns its base URL (the caller can work while the server loads)."""
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()
    env = {k: v for k, v in os.environ.items() if k != "SINGLORA_API_KEY"} | ({"SINGLORA_API_KEY": key} if key else {})
    command = [sys.executable, "-m", "torch_singlora.cli", "serve", "--model", str(model), "--adapter-dir",
               str(adapter_dir), "--port", str(port), "--log-level", "warning", "--threads", "1", *options]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    url = f"http://127.0.0.1:{port}/"

    def ready() -> str:
        deadline = time.monotonic() + 120
        while True:
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(url + "health").status_code == 200:
                    return url
            assert process.poll() is None and time.monotonic() < deadline, process.stdout.read()
            time.sleep(0.2)

    try:
        yield ready
    finally:
        process.terminate()
        process.wait(30)


@contextlib.contextmanager
def headless_chromium() -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=find_chromium(), headless=True)
        try:
            yield browser
        finally:
            browser.close()


def open_page(browser: Any, url: str, *, key: str | None = KEY, **context: Any) -> Any:
    """A fresh page on the playground, connected with ``key`` (typed into the API-key field) when given; page
    errors fail the test."""
    page = browser.new_context(**context).new_page()
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.errors = errors
    page.goto(url)
    if key is not None:
        page.fill("#api-key", key)
        page.click("#reload-models")
        page.wait_for_selector("#status:has-text('Connected')")
    return page


def ask(page: Any, text: str, *, temperature: str = "0", max_tokens: str = "", panes: int = 1) -> list[Any]:
    """Type ``text``, send it and wait until the visible panes have finished; returns those panes."""
    page.fill("#temperature", temperature)
    page.fill("#max-tokens", max_tokens)
    page.fill("#prompt", text)
    page.click("#send")
    visible = page.locator(".panes:not([hidden]) .pane")
    assert visible.count() == panes
    wait_finished(page)
    return [visible.nth(i) for i in range(panes)]


def wait_finished(page: Any) -> None:
    """Wait until every visible pane's answer has ended (done, error or stopped)."""
    page.wait_for_function("""() => [...document.querySelectorAll('.panes:not([hidden]) .pane')]
                              .every(pane => ['done', 'error', 'stopped'].includes(pane.dataset.state))""")


def last_answer(pane: Any) -> str:
    return pane.locator(".message.assistant .text").last.text_content()


# ---- the site: a tiny Llama, four adapters, the library's reference, a live server; and a browser ------------------

def teach_markup(model: SingLoRAModel, tokenizer: Any, name: str) -> None:
    """Set adapter ``name``'s own ``lm_head`` copy so that its greedy answer to ``MARKUP_PROMPT`` is ``MARKUP`` then
    the end of turn: the head's rows for the answer's tokens solve ``head @ h_k = 10 * onehot(next token k)`` at the
    answer's positions (hidden 32 >= 23 positions: exact); every other row is zero, so each next token wins by 10."""
    prompt = chat_prompt_ids(tokenizer, [{"role": "user", "content": MARKUP_PROMPT}])
    answer = tokenizer(MARKUP, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    model.set_adapter(name)
    with torch.no_grad():
        hidden = model(torch.tensor([prompt + answer[:-1]]), output_hidden_states=True).hidden_states[-1]
    states = hidden[0, len(prompt) - 1:].double()  # (L, hidden): the state that picks each answer token
    rows = sorted(set(answer))
    wanted = torch.tensor([[10.0 * (token == row) for token in answer] for row in rows], dtype=torch.float64)
    head = model.model.lm_head.copies[name].weight
    with torch.no_grad():
        head.zero_()
        head[rows] = (wanted @ torch.linalg.pinv(states.T)).to(head.dtype)  # (rows, hidden)


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Iterator[dict]:
    from transformers import AutoTokenizer

    root = tmp_path_factory.mktemp("playground")
    tokenizer = AutoTokenizer.from_pretrained(assets.smollm2_path())
    base = tiny_llama(tokenizer)
    base.save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    trained = None
    for name, config in ADAPTERS.items():
        if trained is None:
            trained = get_singlora_model(copy.deepcopy(base), config, name)
        else:
            trained.add_adapter(name, config)
    teach_markup(trained, tokenizer, "html")
    for name in ADAPTERS:
        trained.save_adapter(root / "adapters" / name, name)
    with singlora_serve(root / "model", root / "adapters", "--max-tokens", "64") as ready:
        reference = SingLoRAModel(copy.deepcopy(base), None)  # while the server loads
        for name in ADAPTERS:
            reference.load_adapter(root / "adapters" / name, name, is_trainable=False)
        reference.eval()
        yield {"url": ready(), "tokenizer": tokenizer, "reference": reference, "root": root}


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    """Headless chromium; skips the test, saying why, where Playwright or chromium is missing."""
    reason = skip_reason()
    if reason:
        pytest.skip(reason)
    with headless_chromium() as chromium:
        yield chromium


def greedy(site: dict, model: str, messages: list[dict], max_new_tokens: int) -> tuple[str, int]:
    """The library's greedy answer to ``messages`` (chat template) with adapter ``model`` (``"model"``: the base)
    and the number of tokens it generated."""
    reference, tokenizer = site["reference"], site["tokenizer"]
    ids = chat_prompt_ids(tokenizer, messages)
    with torch.no_grad(), (reference.disable_adapters() if model == "model" else contextlib.nullcontext()):
        if model != "model":
            reference.set_adapter(model)
        out = reference.generate(torch.tensor([ids]), max_new_tokens=max_new_tokens, do_sample=False)
    new = out[0, len(ids):]
    return tokenizer.decode(new, skip_special_tokens=True), len(new)


# ---- the tests -------------------------------------------------------------------------------------------------------

def test_chat_streams_the_library_greedy_answer_over_several_turns(site, browser) -> None:
    page = open_page(browser, site["url"], key=None)
    page.wait_for_selector("#status.error")
    assert "Error 401" in page.text_content("#status") and "API key" in page.text_content("#status")
    page.fill("#api-key", KEY)
    page.press("#api-key", "Enter")
    page.wait_for_selector("#status:has-text('Connected')")
    select = page.locator("#view-chat .model")
    assert [o.get_attribute("value") for o in select.locator("option").all()] == ["model", *ADAPTERS]
    assert select.locator("option").first.text_content() == "model (base)"
    select.select_option("alice")
    page.fill("#system", "Be brief.")
    (pane,) = ask(page, "Hello!", max_tokens="12")
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello!"}]
    text, count = greedy(site, "alice", messages, 12)
    assert last_answer(pane) == text and pane.get_attribute("data-tokens") == str(count) == "12"
    assert "12 tokens" in pane.locator(".stats").text_content() and "tok/s" in pane.locator(".stats").text_content()
    (pane,) = ask(page, "And then?", max_tokens="10")  # the second turn carries the first answer
    messages += [{"role": "assistant", "content": text}, {"role": "user", "content": "And then?"}]
    second, count = greedy(site, "alice", messages, 10)
    assert last_answer(pane) == second and pane.get_attribute("data-tokens") == str(count)
    assert second != greedy(site, "alice", messages[:1] + messages[-1:], 10)[0]  # the history changed the answer
    stop = second[len(second) // 2: len(second) // 2 + 3]  # a stop string cuts the answer before it
    page.fill("#stop", stop)
    page.click("#resend")
    wait_finished(page)
    assert last_answer(pane) == second[: second.index(stop)]
    assert page.locator("#view-chat .message").count() == 4  # resend replaced the last answer
    assert page.evaluate("localStorage.length + sessionStorage.length") == 0 and page.evaluate("document.cookie") == ""
    assert KEY not in page.url and page.errors == []


def test_compare_streams_two_adapters_side_by_side_and_resends(site, browser) -> None:
    page = open_page(browser, site["url"], viewport={"width": 1100, "height": 700})
    posts: list[str] = []
    page.on("request", lambda r: posts.append(r.post_data_json["model"]) if r.method == "POST" else None)
    page.click("#tab-compare")
    assert page.get_attribute("#tab-compare", "aria-selected") == "true" and page.is_hidden("#view-chat")
    page.click("#add-pane")
    assert page.locator("#view-compare .pane").count() == 3
    page.locator("#view-compare .pane").nth(2).locator(".remove").click()
    panes = page.locator("#view-compare .pane")
    assert panes.count() == 2 and panes.nth(0).locator(".remove").is_hidden()  # two at least
    panes.nth(0).locator(".model").select_option("alice")
    panes.nth(1).locator(".model").select_option("bob")
    left, right = ask(page, "Tell me a story.", max_tokens="16", panes=2)
    messages = [{"role": "user", "content": "Tell me a story."}]
    expected = [greedy(site, name, messages, 16) for name in ("alice", "bob")]
    assert expected[0][0] != expected[1][0]
    for pane, (text, count) in zip((left, right), expected):
        assert last_answer(pane) == text and pane.get_attribute("data-tokens") == str(count)
        assert "tok/s" in pane.locator(".stats").text_content()
    assert left.locator(".message.assistant .who").text_content() == "alice"
    assert sorted(posts) == ["alice", "bob"]
    page.click("#resend")
    wait_finished(page)
    assert sorted(posts) == ["alice", "alice", "bob", "bob"]
    assert [last_answer(p) for p in (left, right)] == [text for text, _ in expected]
    assert page.locator("#view-compare .message.assistant").count() == 2
    shot = site["root"] / "compare.png"
    page.screenshot(path=str(shot))
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert page.errors == []


def test_model_text_is_shown_as_text_never_markup(site, browser) -> None:
    page = open_page(browser, site["url"])
    assert greedy(site, "html", [{"role": "user", "content": MARKUP_PROMPT}], 64)[0] == MARKUP
    page.locator("#view-chat .model").select_option("html")
    (pane,) = ask(page, MARKUP_PROMPT)
    assert last_answer(pane) == MARKUP
    assert pane.get_attribute("data-tokens") == str(len(site["tokenizer"](MARKUP, add_special_tokens=False)
                                                        ["input_ids"]) + 1)  # and the end of turn
    assert page.locator(".log script, .log b").count() == 0
    assert page.evaluate("window.pwned") is None and page.errors == []


def test_errors_are_shown_and_the_page_goes_on(site, browser) -> None:
    page = open_page(browser, site["url"])
    select = page.locator("#view-chat .model")
    select.select_option("retired")
    unloaded = httpx.post(site["url"] + "v1/unload_lora_adapter", json={"lora_name": "retired"},
                          headers={"Authorization": f"Bearer {KEY}"})
    assert unloaded.status_code == 200
    (pane,) = ask(page, "Hi")  # the page still lists it: the server answers 404
    note = pane.locator(".message.assistant .note").last
    assert "Error 404" in note.text_content() and "retired" in note.text_content()
    assert pane.get_attribute("data-state") == "error"
    page.wait_for_selector("#view-chat .model option[value='retired']:has-text('not served')", state="attached")
    select.select_option("bob")
    (pane,) = ask(page, "Hi", max_tokens="1000")
    assert "Error 400" in pane.locator(".note").last.text_content()
    assert "max_tokens=1000 exceeds this server's limit of 64" in pane.locator(".note").last.text_content()

    def cut_after_two_pieces(route: Any) -> None:  # the real stream, cut before its end
        events = route.fetch().text().split("\n\n")
        route.fulfill(status=200, headers={"content-type": "text/event-stream"}, body="\n\n".join(events[:3]) + "\n\n")

    page.route("**/v1/chat/completions", cut_after_two_pieces)
    (pane,) = ask(page, "Hi", max_tokens="8")
    assert pane.get_attribute("data-state") == "error"
    assert "connection dropped" in pane.locator(".note").last.text_content()
    messages = [{"role": "user", "content": "Hi"}]
    kept = last_answer(pane)
    assert kept and greedy(site, "bob", messages, 8)[0].startswith(kept)  # the partial answer stays
    page.unroute("**/v1/chat/completions")
    page.click("#resend")
    wait_finished(page)
    assert last_answer(pane) == greedy(site, "bob", messages, 8)[0]
    assert page.errors == []


def tab_to(page: Any, selector: str) -> None:
    """Press Tab until ``selector`` has the focus (at most 30 times)."""
    for _ in range(30):
        page.keyboard.press("Tab")
        if page.evaluate(f"document.activeElement.matches({selector!r})"):
            return
    raise AssertionError(f"{selector} cannot be reached with the Tab key")


def test_phone_width_and_keyboard_only(site, browser) -> None:
    page = open_page(browser, site["url"], key=None, viewport={"width": 360, "height": 740},
                     is_mobile=True, has_touch=True)
    page.wait_for_selector("#status.error")
    assert page.get_attribute("#settings", "open") is None  # folded on a phone
    tab_to(page, "#settings > summary")
    page.keyboard.press("Enter")
    tab_to(page, "#api-key")
    page.keyboard.type(KEY)
    page.keyboard.press("Enter")
    page.wait_for_selector("#status:has-text('Connected')")
    tab_to(page, "#temperature")
    page.keyboard.press("Control+A")
    page.keyboard.type("0")
    tab_to(page, "#view-chat .model")
    page.keyboard.press("ArrowDown")  # model -> alice
    assert page.input_value("#view-chat .model") == "alice"
    tab_to(page, "#prompt")
    page.keyboard.type("Hi there")
    page.keyboard.press("Enter")
    wait_finished(page)
    pane = page.locator("#view-chat .pane")
    assert last_answer(pane) == greedy(site, "alice", [{"role": "user", "content": "Hi there"}], 64)[0]
    assert page.evaluate("document.documentElement.scrollWidth") <= 360  # nothing wider than the phone
    tab_to(page, "#tab-chat")
    page.keyboard.press("ArrowRight")
    assert page.get_attribute("#tab-compare", "aria-selected") == "true"
    assert page.evaluate("document.activeElement.id") == "tab-compare"
    box = page.locator("#view-compare .pane").nth(1).bounding_box()
    assert box["x"] + box["width"] <= 360  # compare panes stack on a phone
    assert page.errors == []


def test_the_server_serves_the_page_and_its_files_without_a_key(site) -> None:
    """Without a browser: ``/`` and its two files come from the package, public; the API still wants the key and
    unknown paths still get OpenAI's JSON 404."""
    page = httpx.get(site["url"])
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert page.text == (STATIC / "index.html").read_text() and "script-src 'self'" in page.text
    for name, kind in (("playground.js", "javascript"), ("playground.css", "text/css")):
        got = httpx.get(site["url"] + "static/" + name)
        assert got.status_code == 200 and kind in got.headers["content-type"]
        assert got.text == (STATIC / name).read_text()
    assert httpx.get(site["url"] + "v1/models").status_code == 401
    missing = httpx.post(site["url"] + "v1/embeddings", json={})
    assert missing.status_code == 404 and "error" in missing.json()
    for path in ("static/%2e%2e/app.py", "static/..%2fapp.py"):  # nothing outside static/
        assert httpx.get(site["url"] + path).status_code == 404


def test_the_page_never_builds_markup_from_text() -> None:
    """The escaping rule, checked in the source too: no HTML parsing API in the script."""
    script = (STATIC / "playground.js").read_text()
    for api in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval(", "new Function"):
        assert api not in script, api


# ---- the README's screenshot ---------------------------------------------------------------------------------------

def screenshot(path: Path) -> None:
    """The compare view on the real SmolLM2-135M-Instruct: the base model beside two untrained adapters (random
    init on q/v, std 0.03 and 0.06: stand-ins for two versions of a tuned adapter) answering the same question."""
    import tempfile

    from transformers import AutoModelForCausalLM

    model_path = Path(assets.smollm2_path())
    base = AutoModelForCausalLM.from_pretrained(model_path)
    with tempfile.TemporaryDirectory() as tmp:
        for name, std in (("support-v1", 0.03), ("support-v2", 0.06)):
            torch.manual_seed(0)
            model = get_singlora_model(copy.deepcopy(base), SingLoRAConfig(
                r=8, target_modules=["q_proj", "v_proj"], init="gaussian", init_std=std, ramp_up_steps=0))
            model.save_adapter(Path(tmp) / "adapters" / name)
        with singlora_serve(model_path, Path(tmp) / "adapters", key=None) as ready, headless_chromium() as browser:
            page = open_page(browser, ready(), key=None, viewport={"width": 1200, "height": 600})
            page.wait_for_selector("#status:has-text('Connected')")
            page.click("#tab-compare")
            page.click("#add-pane")
            ask(page, "What is a good name for a pet turtle?", max_tokens="40", panes=3)
            page.click("#settings > summary")
            page.screenshot(path=str(path))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="write the README's screenshot of the playground's compare view")
    parser.add_argument("--screenshot", type=Path, required=True, help="PNG file to write")
    screenshot(parser.parse_args().screenshot)
