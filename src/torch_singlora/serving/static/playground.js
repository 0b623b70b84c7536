// singlora playground: chat with one model, or compare two to four, streamed from this server's OpenAI API
// (GET v1/models, POST v1/chat/completions with stream=true; the server applies the chat template).
//
// Rules this file keeps:
// - Model and server text is only ever set with textContent: it is never parsed as HTML.
// - The API key lives in its input field only: no localStorage, cookie or URL holds it.
// - A pane is one conversation with one model; the chat view has one pane, the compare view two to four, and every
//   pane answers the same user turns.
"use strict";

const $ = (id) => document.getElementById(id);
const MIN_COMPARE = 2;
const MAX_COMPARE = 4;

const state = {
  models: [],                      // [{id, parent}] from v1/models: the base model first, then the adapters
  view: "chat",                    // "chat" or "compare"
  panes: { chat: [], compare: [] },
  running: new Set(),              // AbortControllers of the streams in flight
};

class ApiError extends Error {
  constructor(status, message, param) {
    super(message);
    this.status = status;
    this.param = param;
  }
}

class StreamDropped extends Error {}

// ---- server calls -------------------------------------------------------------------------------------------------

function headers(json) {
  const result = json ? { "Content-Type": "application/json" } : {};
  const key = $("api-key").value.trim();
  if (key) result.Authorization = `Bearer ${key}`;
  return result;
}

async function apiError(response) {
  let message = response.statusText || "request refused";
  let param;
  try {
    const body = await response.json();
    message = body.error?.message ?? body.detail ?? message;
    param = body.error?.param;
  } catch (_) { /* not JSON: keep the status text */ }
  return new ApiError(response.status, String(message), param);
}

const HINTS = {
  401: " Enter the server's API key in Settings, then press Connect.",
  404: " The model list has been read again.",
  413: " The conversation is larger than this server accepts: press Clear.",
  429: " The server is busy: try again in a moment.",
};

function describe(error) {
  if (error instanceof ApiError) return `Error ${error.status}: ${error.message}${HINTS[error.status] ?? ""}`;
  if (error instanceof StreamDropped) {
    return "The connection dropped before the answer finished; the partial answer is kept (Resend tries again).";
  }
  if (error.name === "AbortError") return "Stopped.";
  return `Cannot reach the server: ${error.message}`;
}

function showStatus(text, isError = false) {
  const status = $("status");
  status.textContent = text;
  status.classList.toggle("error", isError);
  status.setAttribute("role", isError ? "alert" : "status");
}

async function loadModels() {
  showStatus("Reading the model list…");
  try {
    const response = await fetch("v1/models", { headers: headers(false) });
    if (!response.ok) throw await apiError(response);
    const body = await response.json();
    state.models = body.data.map((card) => ({ id: card.id, parent: card.parent ?? null }));
  } catch (error) {
    showStatus(describe(error), true);
    if (error.status === 401) $("api-key").focus();
    return false;
  }
  for (const pane of allPanes()) fillSelect(pane.select, pane.select.value);
  const adapters = state.models.length - 1;
  showStatus(`Connected: ${state.models[0]?.id ?? "no model"} and ${adapters} adapter${adapters === 1 ? "" : "s"}.`);
  return true;
}

// Read one server-sent-events stream of chat chunks; onText(piece) for each text piece; the last usage seen.
async function readStream(response, onText) {
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  let usage = null;
  for (;;) {
    const { value, done } = await reader.read();
    if (done) throw new StreamDropped();  // the body ended without "data: [DONE]"
    buffer = (buffer + value).replace(/\r\n/g, "\n");
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      const data = event.split("\n").filter((line) => line.startsWith("data:"))
        .map((line) => line.slice(5).trimStart()).join("\n");
      if (!data) continue;
      if (data === "[DONE]") {
        reader.cancel().catch(() => {});
        return usage;
      }
      const chunk = JSON.parse(data);
      if (chunk.error) throw new ApiError(chunk.error.code ?? 500, chunk.error.message ?? "error", chunk.error.param);
      if (chunk.usage) usage = chunk.usage;
      for (const choice of chunk.choices ?? []) {
        if (choice.delta?.content) onText(choice.delta.content);
      }
    }
  }
}

function samplingFields() {
  const fields = {};
  const temperature = $("temperature").value;
  if (temperature !== "") fields.temperature = Number(temperature);
  const maxTokens = $("max-tokens").value;
  if (maxTokens !== "") fields.max_tokens = Number(maxTokens);
  const stops = $("stop").value.split("\n").map((s) => s.replace(/\\n/g, "\n").replace(/\\t/g, "\t"))
    .filter((s) => s !== "");
  if (stops.length) fields.stop = stops;
  return fields;
}

// ---- panes --------------------------------------------------------------------------------------------------------

function allPanes() {
  return [...state.panes.chat, ...state.panes.compare];
}

function fillSelect(select, wanted) {
  const options = state.models.map((m) => [m.id, m.parent === null ? `${m.id} (base)` : m.id]);
  if (wanted && !state.models.some((m) => m.id === wanted)) options.push([wanted, `${wanted} (not served)`]);
  select.replaceChildren(...options.map(([value, label]) => new Option(label, value)));
  if (wanted) select.value = wanted;
}

function newPane(view, model) {
  const node = $("pane-template").content.firstElementChild.cloneNode(true);
  const pane = {
    node, messages: [],
    select: node.querySelector(".model"), log: node.querySelector(".log"), stats: node.querySelector(".stats"),
  };
  fillSelect(pane.select, model);
  node.querySelector(".remove").addEventListener("click", () => removePane(pane));
  $(`view-${view}`).append(node);
  state.panes[view].push(pane);
  updateCompareTools();
  return pane;
}

function removePane(pane) {
  const panes = state.panes.compare;
  if (panes.length <= MIN_COMPARE || state.running.size) return;
  panes.splice(panes.indexOf(pane), 1);
  pane.node.remove();
  updateCompareTools();
  panes[0].select.focus();
}

function updateCompareTools() {
  const count = state.panes.compare.length;
  $("add-pane").disabled = count >= MAX_COMPARE;
  for (const pane of state.panes.compare) pane.node.querySelector(".remove").hidden = count <= MIN_COMPARE;
  for (const pane of state.panes.chat) pane.node.querySelector(".remove").hidden = true;
}

// One message of a pane's log: {role, content, node, failed}; an assistant message is labelled with its model.
function addMessage(pane, role, content, label) {
  const node = document.createElement("li");
  node.className = `message ${role}`;
  const who = document.createElement("span");
  who.className = "who";
  who.textContent = label;
  const text = document.createElement("div");
  text.className = "text";
  text.textContent = content;
  const note = document.createElement("p");
  note.className = "note";
  node.append(who, text, note);
  pane.log.append(node);
  const message = { role, content, node, failed: false };
  pane.messages.push(message);
  return message;
}

function setText(message, content) {
  message.content = content;
  message.node.querySelector(".text").textContent = content;
}

function setNote(message, text, isError) {
  const note = message.node.querySelector(".note");
  note.textContent = text;
  note.classList.toggle("error", isError);
}

// The request's messages: the system prompt, then every turn that did not fail.
function conversation(pane) {
  const system = $("system").value;
  const messages = system.trim() ? [{ role: "system", content: system }] : [];
  for (const m of pane.messages) {
    if (!m.failed) messages.push({ role: m.role, content: m.content });
  }
  return messages;
}

function setStats(pane, phase, numbers) {
  pane.node.dataset.state = phase;
  const { tokens, seconds, firstMs } = numbers;
  pane.node.dataset.tokens = String(tokens);
  const parts = [`${tokens} token${tokens === 1 ? "" : "s"}`];
  if (seconds > 0 && tokens > 0) parts.push(`${(tokens / seconds).toFixed(1)} tok/s`);
  if (firstMs !== null) parts.push(`first token ${Math.round(firstMs)} ms`);
  pane.stats.textContent = phase === "streaming" ? `${parts.join(" · ")} …` : parts.join(" · ");
  pane.stats.title = "tokens generated; tokens per second from sending to the last token; time to the first token";
}

function scrollToEnd(pane) {
  const last = pane.log.lastElementChild;
  if (last) last.scrollIntoView({ block: "nearest" });
}

// Stream one answer for the pane's conversation; the answer is shown (escaped) as it arrives.
async function answer(pane) {
  const messages = conversation(pane);
  const model = pane.select.value;
  const reply = addMessage(pane, "assistant", "", model);
  const controller = new AbortController();
  state.running.add(controller);
  const started = performance.now();
  const numbers = { tokens: 0, seconds: 0, firstMs: null };
  setStats(pane, "streaming", numbers);
  pane.node.setAttribute("aria-busy", "true");
  try {
    const response = await fetch("v1/chat/completions", {
      method: "POST", headers: headers(true), signal: controller.signal,
      body: JSON.stringify({ model, messages, stream: true, stream_options: { include_usage: true },
        ...samplingFields() }),
    });
    if (!response.ok) throw await apiError(response);
    const usage = await readStream(response, (piece) => {
      numbers.firstMs ??= performance.now() - started;
      numbers.tokens += 1;
      numbers.seconds = (performance.now() - started) / 1000;
      setText(reply, reply.content + piece);
      setStats(pane, "streaming", numbers);
      scrollToEnd(pane);
    });
    if (usage) numbers.tokens = usage.completion_tokens;
    setStats(pane, "done", numbers);
  } catch (error) {
    failed(pane, reply, error, numbers);
  } finally {
    state.running.delete(controller);
    pane.node.removeAttribute("aria-busy");
  }
}

function failed(pane, reply, error, numbers) {
  const stopped = error.name === "AbortError";
  setNote(reply, describe(error), !stopped);
  setStats(pane, stopped ? "stopped" : "error", numbers);
  if (!reply.content) {  // nothing came back: this turn is not part of the conversation
    reply.failed = true;
    const asked = pane.messages[pane.messages.length - 2];
    if (asked && asked.role === "user") asked.failed = true;
  }
  if (error.status === 404 && (error.param === "model" || /model/i.test(error.message))) loadModels();
  if (error.status === 401) $("api-key").focus();
}

// ---- actions ------------------------------------------------------------------------------------------------------

function visiblePanes() {
  return state.panes[state.view];
}

async function run(panes) {
  setBusy(true);
  try {
    await Promise.all(panes.map(answer));
  } finally {
    setBusy(false);
  }
}

function setBusy(busy) {
  $("send").disabled = busy;
  $("resend").disabled = busy;
  $("stop-streams").disabled = !busy;
  for (const pane of allPanes()) pane.node.querySelector(".remove").disabled = busy;
}

async function send() {
  const prompt = $("prompt");
  const text = prompt.value;
  if (!text.trim() || state.running.size) return;
  if (!state.models.length && !(await loadModels())) return;
  prompt.value = "";
  const panes = visiblePanes();
  for (const pane of panes) addMessage(pane, "user", text, "you");
  await run(panes);
}

// Send the same conversation again: every answer after the last user turn is dropped and asked for anew.
async function resend() {
  if (state.running.size) return;
  const panes = visiblePanes().filter((pane) => pane.messages.some((m) => m.role === "user"));
  if (!panes.length) {
    showStatus("Nothing to send again yet: write a message first.");
    return;
  }
  for (const pane of panes) {
    let last = pane.messages.length - 1;
    while (pane.messages[last].role !== "user") last -= 1;
    for (const message of pane.messages.splice(last + 1)) message.node.remove();
    pane.messages[last].failed = false;
  }
  await run(panes);
}

function stopAll() {
  for (const controller of state.running) controller.abort();
}

function clearAll() {
  stopAll();
  for (const pane of visiblePanes()) {
    pane.messages = [];
    pane.log.replaceChildren();
    pane.stats.textContent = "";
    delete pane.node.dataset.state;
  }
  $("prompt").focus();
}

function showView(view) {
  if (state.running.size) {
    showStatus("Wait for the answers (or press Stop) before switching views.");
    return;
  }
  state.view = view;
  if (view === "compare" && !state.panes.compare.length) {
    const ids = state.models.map((m) => m.id);
    for (let i = 0; i < MIN_COMPARE; i += 1) newPane("compare", ids[i] ?? ids[0]);
  }
  for (const name of ["chat", "compare"]) {
    const tab = $(`tab-${name}`);
    tab.setAttribute("aria-selected", String(name === view));
    tab.tabIndex = name === view ? 0 : -1;
    $(`view-${name}`).hidden = name !== view;
  }
  $("compare-tools").hidden = view !== "compare";
}

function onTabKey(event) {
  if (event.key !== "ArrowLeft" && event.key !== "ArrowRight") return;
  const next = state.view === "chat" ? "compare" : "chat";
  showView(next);
  $(`tab-${next}`).focus();
  event.preventDefault();
}

function addComparePane() {
  const panes = state.panes.compare;
  if (panes.length >= MAX_COMPARE) return;
  const used = new Set(panes.map((p) => p.select.value));
  const free = state.models.find((m) => !used.has(m.id)) ?? state.models[0];
  const pane = newPane("compare", free?.id);
  pane.select.focus();
}

function start() {
  $("tab-chat").addEventListener("click", () => showView("chat"));
  $("tab-compare").addEventListener("click", () => showView("compare"));
  for (const id of ["tab-chat", "tab-compare"]) $(id).addEventListener("keydown", onTabKey);
  $("composer").addEventListener("submit", (event) => { event.preventDefault(); send(); });
  $("prompt").addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
      event.preventDefault();
      send();
    }
  });
  $("resend").addEventListener("click", resend);
  $("stop-streams").addEventListener("click", stopAll);
  $("clear").addEventListener("click", clearAll);
  $("add-pane").addEventListener("click", addComparePane);
  $("reload-models").addEventListener("click", loadModels);
  $("api-key").addEventListener("keydown", (event) => {
    if (event.key === "Enter") { event.preventDefault(); loadModels(); }
  });
  document.addEventListener("keydown", (event) => { if (event.key === "Escape") stopAll(); });
  if (window.matchMedia("(max-width: 40rem)").matches) $("settings").open = false;
  newPane("chat", null);
  loadModels();
}

start();
