// Tursi's console (docs/console.md): the server's own API, from this page's origin only.
// No framework, no CDN: the page, this script and its style sheet are all it loads.
"use strict";

const API = "/api/v1";
const KEY_ITEM = "tursi-api-key"; // sessionStorage: the key lives as long as the tab
const POLL_MODELS_MS = 1000;
const POLL_SERVER_MS = 2000;

const $ = (selector) => document.querySelector(selector);
const state = { view: "models", models: [], timers: {}, running: null, chat: [] };

// --- the API ---------------------------------------------------------------------------------

class NeedKey extends Error {}

function headers(json) {
  const h = {};
  const key = sessionStorage.getItem(KEY_ITEM);
  if (key) h["Authorization"] = "Bearer " + key;
  if (json) h["Content-Type"] = "application/json";
  return h;
}

async function call(method, path, body, options = {}) {
  const response = await fetch(path, {
    method,
    headers: headers(body !== undefined),
    body: body === undefined ? undefined : JSON.stringify(body),
    signal: options.signal,
  });
  if (response.status === 401) throw new NeedKey();
  if (!response.ok && !options.raw) throw new Error(await errorText(response));
  return options.raw ? response : response.json();
}

async function errorText(response) {
  try {
    const error = (await response.json()).error;
    return `${error.code}: ${error.message}`;
  } catch (_) {
    return `HTTP ${response.status}`;
  }
}

// --- key prompt ------------------------------------------------------------------------------

function askForKey(message) {
  stopPolling();
  for (const view of document.querySelectorAll(".view")) view.hidden = true;
  $("#models tbody").replaceChildren();
  $("#key-prompt").hidden = false;
  $("#key-error").textContent = message || "";
  $("#forget-key").hidden = true;
}

async function useKey(event) {
  event.preventDefault();
  sessionStorage.setItem(KEY_ITEM, $("#key").value.trim());
  $("#key").value = "";
  await start();
}

function forgetKey() {
  sessionStorage.removeItem(KEY_ITEM);
  askForKey();
}

// --- views -----------------------------------------------------------------------------------

function show(view) {
  state.view = view;
  for (const tab of document.querySelectorAll(".tab")) {
    tab.classList.toggle("active", tab.dataset.view === view);
  }
  for (const section of document.querySelectorAll(".view")) {
    section.hidden = section.id !== "view-" + view;
  }
  stopPolling();
  if (view === "models") poll("models", refreshModels, POLL_MODELS_MS);
  if (view === "server") poll("server", refreshServer, POLL_SERVER_MS);
  if (view === "playground") refreshModels().then(fillModelChoice);
}

function poll(name, refresh, every) {
  const tick = async () => {
    try {
      await refresh();
    } catch (error) {
      if (error instanceof NeedKey) return askForKey("That key was not accepted.");
    }
    state.timers[name] = setTimeout(tick, every);
  };
  tick();
}

function stopPolling() {
  for (const timer of Object.values(state.timers)) clearTimeout(timer);
  state.timers = {};
}

async function start() {
  try {
    const status = await call("GET", API + "/status");
    $("#health").textContent = `${status.status}, up ${status.uptime}`;
  } catch (error) {
    if (error instanceof NeedKey) {
      const tried = sessionStorage.getItem(KEY_ITEM);
      return askForKey(tried ? "That key was not accepted." : "");
    }
    throw error;
  }
  $("#key-prompt").hidden = true;
  $("#forget-key").hidden = !sessionStorage.getItem(KEY_ITEM);
  show(state.view);
}

// --- models ----------------------------------------------------------------------------------

async function refreshModels() {
  const body = await call("GET", API + "/models");
  state.models = body.models;
  renderModels();
}

function cell(text) {
  const td = document.createElement("td");
  td.textContent = text ?? "";
  return td;
}

function renderModels() {
  const rows = state.models.map((model) => {
    const tr = document.createElement("tr");
    tr.dataset.model = model.name;
    tr.dataset.status = model.status;
    const quantization = model.quantized ? `${model.bits}-bit ${model.mode}` : model.dtype || "";
    tr.append(
      cell(model.name),
      cell(model.status),
      cell(model.status === "loaded" ? quantization : ""),
      cell(model.memory_usage),
      cell(model.uptime),
      details(model),
      actions(model),
    );
    return tr;
  });
  $("#models tbody").replaceChildren(...rows);
}

function details(model) {
  const td = document.createElement("td");
  td.className = "details";
  if (model.status === "loading") {
    const bar = document.createElement("span");
    bar.className = "progress";
    const fill = document.createElement("div");
    fill.style.width = `${Math.round((model.progress || 0) * 100)}%`;
    bar.append(fill);
    td.append(bar, ` ${Math.round((model.progress || 0) * 100)}% ${model.stage || ""}`);
  } else if (model.status === "failed") {
    td.className = "details error";
    td.textContent = model.error || "failed";
  } else if (model.status === "loaded") {
    td.textContent = [model.device, model.dtype].filter(Boolean).join(", ");
  }
  return td;
}

function actions(model) {
  const td = document.createElement("td");
  td.className = "actions";
  if (model.status === "loaded" || model.status === "loading") {
    const unload = document.createElement("button");
    unload.textContent = "Unload";
    unload.className = "unload";
    unload.onclick = () => act(model.name, "unload", {});
    td.append(unload);
    return td;
  }
  const bits = document.createElement("select");
  bits.className = "bits";
  for (const [value, label] of [["", "full precision"], ["8", "8-bit"], ["4", "4-bit"]]) {
    bits.append(new Option(label, value));
  }
  const mode = document.createElement("select");
  mode.className = "mode";
  for (const value of ["dynamic", "static"]) mode.append(new Option(value, value));
  const load = document.createElement("button");
  load.textContent = "Load";
  load.className = "load";
  load.onclick = () => {
    const body = bits.value ? { quantize: true, bits: Number(bits.value), mode: mode.value } : {};
    act(model.name, "load", body);
  };
  td.append(bits, " ", mode, " ", load);
  return td;
}

async function act(name, action, body) {
  $("#models-error").textContent = "";
  try {
    await call("POST", `${API}/models/${encodeURIComponent(name)}/${action}`, body);
  } catch (error) {
    if (error instanceof NeedKey) return askForKey("That key was not accepted.");
    $("#models-error").textContent = `${action} ${name}: ${error.message}`;
  }
  await refreshModels();
}

// --- server charts ---------------------------------------------------------------------------

async function refreshServer() {
  const [status, history] = await Promise.all([
    call("GET", API + "/status"),
    call("GET", API + "/status/history"),
  ]);
  $("#health").textContent = `${status.status}, up ${status.uptime}`;
  const gpu = status.gpu_usage ? `, GPU ${status.gpu_usage.used} of ${status.gpu_usage.total}` : "";
  $("#now").textContent =
    `${status.active_models} models loaded; ${status.generations.running} running, ` +
    `${status.generations.waiting} waiting; requests ${status.requests.total} ` +
    `(${status.requests.rate}); workers' memory ${status.process_memory.rss}; machine ` +
    `${status.memory_usage.used} of ${status.memory_usage.total}${gpu}`;
  const samples = history.samples;
  const series = (name) => samples.map((s) => [s.time, s[name]]);
  chart($("#chart-requests"), [series("requests_per_second")], "");
  chart($("#chart-tokens"), [series("tokens_per_second")], "");
  chart($("#chart-queue"), [series("running"), series("waiting")], "");
  const mib = (name) => samples.map((s) => [s.time, s[name] === null ? null : s[name] / 2 ** 20]);
  chart($("#chart-memory"), [mib("process_memory_bytes"), mib("gpu_memory_used_bytes")], " MiB");
}

// A line chart of up to two series of [time, value] in an SVG element; its data-latest and
// data-peak attributes say what it shows (tests read them).
function chart(svg, series, unit) {
  const width = svg.clientWidth || 400, height = svg.clientHeight || 140, left = 48, bottom = 16;
  const points = series.flat().filter(([, v]) => v !== null && v !== undefined);
  const ns = "http://www.w3.org/2000/svg";
  const make = (tag, attributes, text) => {
    const element = document.createElementNS(ns, tag);
    for (const [k, v] of Object.entries(attributes)) element.setAttribute(k, v);
    if (text !== undefined) element.textContent = text;
    return element;
  };
  const children = [];
  const peak = Math.max(0, ...points.map(([, v]) => v));
  const top = peak > 0 ? peak * 1.1 : 1;
  const times = points.map(([t]) => t);
  const t0 = Math.min(...times), t1 = Math.max(...times);
  const x = (t) => left + ((t - t0) / Math.max(t1 - t0, 1)) * (width - left - 4);
  const y = (v) => (height - bottom - 10) * (1 - v / top) + 10; // room for the top label
  for (const fraction of [0, 0.5, 1]) {
    const value = top * fraction;
    children.push(make("line", { class: "grid", x1: left, x2: width, y1: y(value), y2: y(value) }));
    children.push(make("text", { class: "axis", x: 2, y: y(value) + 3 }, format(value) + unit));
  }
  if (points.length) {
    const seconds = Math.round(t1 - t0);
    children.push(make("text", { class: "axis", x: left, y: height - 2 }, `last ${seconds} s`));
  }
  series.forEach((data, index) => {
    const drawn = data.filter(([, v]) => v !== null && v !== undefined);
    if (drawn.length < 2) return;
    const path = drawn.map(([t, v]) => `${x(t).toFixed(1)},${y(v).toFixed(1)}`).join(" ");
    children.push(make("polyline", { class: index ? "b" : "a", points: path }));
  });
  svg.replaceChildren(...children);
  const last = series[0].filter(([, v]) => v !== null && v !== undefined).pop();
  svg.dataset.latest = last ? last[1] : "";
  svg.dataset.peak = Math.max(0, ...series[0].filter(([, v]) => v !== null).map(([, v]) => v));
}

function format(value) {
  if (value >= 100) return value.toFixed(0);
  if (value >= 10) return value.toFixed(1);
  return value.toFixed(2);
}

// --- playground ------------------------------------------------------------------------------

function fillModelChoice() {
  const select = $("#play-model");
  const chosen = select.value;
  const loaded = state.models.filter((m) => m.status === "loaded").map((m) => m.name);
  select.replaceChildren(...loaded.map((name) => new Option(name, name)));
  if (loaded.includes(chosen)) select.value = chosen;
  if (!loaded.length) $("#play-error").textContent = "No model is loaded: load one in Models.";
}

function sampling() {
  const body = {
    temperature: Number($("#play-temperature").value),
    top_p: Number($("#play-top-p").value),
    max_tokens: Number($("#play-max-tokens").value),
  };
  const stop = $("#play-stop").value.split("\n").filter((line) => line.length);
  if (stop.length) body.stop = stop;
  const schema = $("#play-schema").value.trim();
  if (schema) body.structured_outputs = { json: JSON.parse(schema) };
  return body;
}

// playRequest(), or null with the reason shown (a JSON schema that does not parse).
function checkedRequest() {
  try {
    return playRequest();
  } catch (error) {
    $("#play-error").textContent = `JSON schema: ${error.message}`;
    return null;
  }
}

// The request the playground sends now: [path, body] (streamed).
function playRequest() {
  const model = $("#play-model").value;
  const text = $("#play-input").value;
  const logprobs = $("#play-logprobs").value;
  if ($("#play-mode").value === "chat") {
    const messages = [...state.chat, { role: "user", content: text }];
    const body = { model, messages, ...sampling(), stream: true };
    if (logprobs !== "") Object.assign(body, { logprobs: true, top_logprobs: Number(logprobs) });
    return ["/v1/chat/completions", body];
  }
  const body = { model, prompt: text, ...sampling(), stream: true, return_full_text: false };
  if (logprobs !== "") body.logprobs = Number(logprobs);
  return [API + "/generate", body];
}

async function run(event) {
  event.preventDefault();
  $("#play-error").textContent = "";
  $("#play-output").textContent = "";
  $("#play-logprobs-out").replaceChildren();
  $("#play-stats").textContent = "";
  const request = checkedRequest();
  if (!request) return;
  const [path, body] = request;
  const controller = new AbortController();
  state.running = controller;
  $("#play-run").disabled = true;
  $("#play-stop-run").disabled = false;
  const started = performance.now();
  let first = null, pieces = 0, output = "";
  const stats = (done) => {
    const now = performance.now();
    const ttft = first === null ? "" : `time to first token ${((first - started) / 1000).toFixed(2)} s`;
    const rate = first === null || now <= first ? "" : `, ${(pieces / ((now - started) / 1000)).toFixed(1)} chunks/s`;
    $("#play-stats").textContent = ttft + rate + (done || "");
  };
  const add = (text, logprobs) => {
    if (first === null && text) first = performance.now();
    pieces += 1;
    output += text;
    $("#play-output").textContent = output;
    for (const entry of logprobs || []) addLogprob(entry);
    stats();
  };
  try {
    const response = await call("POST", path, body, { raw: true, signal: controller.signal });
    if (!response.ok) throw new Error(await errorText(response));
    for await (const [name, data] of events(response)) {
      if (path.startsWith("/v1/")) {
        if (data === "[DONE]") break;
        if (data.error) throw new Error(`${data.error.code}: ${data.error.message}`);
        for (const choice of data.choices || []) {
          add(choice.delta?.content || "", choice.logprobs?.content);
        }
      } else if (name === "text") {
        add(data.text, data.logprobs);
      } else if (name === "done") {
        const seconds = (performance.now() - started) / 1000;
        stats(`; ${data.tokens_generated} tokens in ${data.generation_time} ` +
          `(${(data.tokens_generated / seconds).toFixed(1)} tok/s end to end), ` +
          `finish: ${data.finish_reason}`);
      } else if (name === "error") {
        throw new Error(`${data.error.code}: ${data.error.message}`);
      }
    }
    if (path.startsWith("/v1/")) {
      state.chat.push({ role: "user", content: body.messages.at(-1).content });
      state.chat.push({ role: "assistant", content: output });
      renderChat();
      $("#play-input").value = "";
    }
    $("#play-output").dataset.done = "true";
  } catch (error) {
    if (error instanceof NeedKey) return askForKey("That key was not accepted.");
    $("#play-error").textContent = error.name === "AbortError" ? "stopped" : error.message;
  } finally {
    state.running = null;
    $("#play-run").disabled = false;
    $("#play-stop-run").disabled = true;
  }
}

// Server-sent events of a fetch response: [event name, parsed data] ("[DONE]" as is).
async function* events(response) {
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += value;
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const frame = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      let name = "message";
      const data = [];
      for (const line of frame.split("\n")) {
        if (line.startsWith("event:")) name = line.slice(6).trim();
        else if (line.startsWith("data:")) data.push(line.slice(5).replace(/^ /, ""));
      }
      if (!data.length) continue; // a heartbeat comment
      const text = data.join("\n");
      yield [name, text === "[DONE]" ? text : JSON.parse(text)];
    }
  }
}

function addLogprob(entry) {
  const span = document.createElement("span");
  const p = Math.exp(entry.logprob);
  span.textContent = entry.token;
  span.title = [entry, ...(entry.top_logprobs || [])]
    .map((e) => `${JSON.stringify(e.token)} ${(Math.exp(e.logprob) * 100).toFixed(1)}%`)
    .join("\n");
  span.style.background = `rgba(47, 111, 214, ${(0.1 + 0.5 * p).toFixed(2)})`;
  $("#play-logprobs-out").append(span);
}

function renderChat() {
  const turns = state.chat.map((turn) => {
    const div = document.createElement("div");
    div.className = "turn " + turn.role;
    div.textContent = `${turn.role}: ${turn.content}`;
    return div;
  });
  $("#chat-history").replaceChildren(...turns);
}

function modeChanged() {
  const chat = $("#play-mode").value === "chat";
  $("#play-input-label").textContent = chat ? "Message" : "Prompt";
  $("#play-reset").hidden = !chat;
  $("#chat-history").hidden = !chat;
}

// "Copy as curl" / "Copy as Python": the request the playground would send now.
function snippet(kind) {
  const request = checkedRequest();
  if (!request) return;
  const [path, body] = request;
  const url = location.origin + path;
  const key = sessionStorage.getItem(KEY_ITEM) ? "$TURSI_API_KEY" : null;
  const json = JSON.stringify(body, null, 2);
  let text;
  if (kind === "curl") {
    const auth = key ? ` \\\n  -H "Authorization: Bearer ${key}"` : "";
    text = `curl -N ${url}${auth} \\\n  -H "Content-Type: application/json" \\\n` +
      `  -d '${json.replaceAll("'", "'\\''")}'`;
  } else {
    const auth = key ? `, headers={"Authorization": "Bearer " + os.environ["TURSI_API_KEY"]}` : "";
    // a raw string of the JSON itself: exact, whatever the body holds
    const literal = json.replaceAll("\\", "\\\\").replaceAll("'''", "\\'\\'\\'");
    text = `import json${key ? "\nimport os" : ""}\n\nimport requests\n\n` +
      `body = json.loads('''${literal}''')\n` +
      `with requests.post(${JSON.stringify(url)}, json=body, stream=True${auth}) as response:\n` +
      `    for line in response.iter_lines():\n        if line:\n            print(line.decode())\n`;
  }
  $("#play-snippet").hidden = false;
  $("#play-snippet").textContent = text;
  navigator.clipboard?.writeText(text).catch(() => {});
}

// --- start -----------------------------------------------------------------------------------

document.addEventListener("DOMContentLoaded", () => {
  for (const tab of document.querySelectorAll(".tab")) tab.onclick = () => show(tab.dataset.view);
  $("#key-form").onsubmit = useKey;
  $("#forget-key").onclick = forgetKey;
  $("#play-form").onsubmit = run;
  $("#play-stop-run").onclick = () => state.running?.abort();
  $("#play-reset").onclick = () => { state.chat = []; renderChat(); };
  $("#play-mode").onchange = modeChanged;
  $("#copy-curl").onclick = () => snippet("curl");
  $("#copy-python").onclick = () => snippet("python");
  modeChanged();
  start();
});
