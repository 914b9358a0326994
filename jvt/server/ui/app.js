// The chat page of `jvt serve`: talks only to this server's /v1/models and
// /v1/chat/completions (streamed). Model and user text is only ever put into the page as
// text nodes (renderMarkdown builds elements and sets textContent), never as HTML.
"use strict";

const STORE_KEY = "jvt-chat";
const $ = (id) => document.getElementById(id);

const state = load();
let running = null; // {controller, conversation} while a reply streams
let modelId = null; // the first model of /v1/models, once loaded

function load() {
  try {
    const saved = JSON.parse(localStorage.getItem(STORE_KEY));
    if (saved && Array.isArray(saved.conversations)) return saved;
  } catch (_) { /* a corrupt entry starts afresh */ }
  return {conversations: [], current: null, settings: {}};
}

function save() {
  localStorage.setItem(STORE_KEY, JSON.stringify(state));
}

function current() {
  let conv = state.conversations.find((c) => c.id === state.current);
  if (!conv) {
    conv = {id: String(Date.now()) + Math.random().toString(16).slice(2), title: "New chat",
            messages: []};
    state.conversations.unshift(conv);
    state.current = conv.id;
  }
  return conv;
}

function headers() {
  const h = {"Content-Type": "application/json"};
  const key = $("api-key").value.trim();
  if (key) h.Authorization = "Bearer " + key;
  return h;
}

// -- errors ---------------------------------------------------------------------------------

function showError(text) {
  const box = $("error");
  box.textContent = text;
  box.hidden = !text;
}

async function errorText(response) {
  let message = response.statusText;
  try {
    const body = await response.json();
    if (body && body.error && body.error.message) message = body.error.message;
  } catch (_) { /* not JSON: keep the status text */ }
  const hint = {401: " Enter the server's API key in Settings.",
                503: " The server is busy; try again in a moment."}[response.status] || "";
  return `Error ${response.status}: ${message}.${hint}`;
}

// -- Markdown, as DOM nodes -----------------------------------------------------------------

const INLINE = /(`[^`\n]+`|\*\*[^*\n]+\*\*|\*[^*\n]+\*)/;

function appendInline(parent, text) {
  for (const part of text.split(INLINE)) {
    if (!part) continue;
    let node;
    if (part.length > 2 && part.startsWith("`") && part.endsWith("`")) {
      node = document.createElement("code");
      node.textContent = part.slice(1, -1);
    } else if (part.length > 4 && part.startsWith("**") && part.endsWith("**")) {
      node = document.createElement("strong");
      node.textContent = part.slice(2, -2);
    } else if (part.length > 2 && part.startsWith("*") && part.endsWith("*")) {
      node = document.createElement("em");
      node.textContent = part.slice(1, -1);
    } else {
      node = document.createTextNode(part);
    }
    parent.appendChild(node);
  }
}

function renderMarkdown(text) {
  // Fenced code blocks, headings, bullet and numbered lists, paragraphs; inline code, bold,
  // italics. An unclosed fence (a reply still streaming) renders as code up to the end.
  const root = document.createElement("div");
  const lines = text.split("\n");
  let list = null;
  for (let i = 0; i < lines.length; i++) {
    const line = lines[i];
    if (line.startsWith("```")) {
      const code = [];
      for (i++; i < lines.length && !lines[i].startsWith("```"); i++) code.push(lines[i]);
      const pre = document.createElement("pre");
      const el = document.createElement("code");
      el.textContent = code.join("\n");
      pre.appendChild(el);
      root.appendChild(pre);
      list = null;
      continue;
    }
    const heading = /^(#{1,6})\s+(.*)$/.exec(line);
    const bullet = /^\s*(?:[-*+]|(\d+)[.)])\s+(.*)$/.exec(line);
    if (heading) {
      const el = document.createElement("h" + Math.min(heading[1].length + 2, 6));
      appendInline(el, heading[2]);
      root.appendChild(el);
      list = null;
    } else if (bullet) {
      const tag = bullet[1] ? "ol" : "ul";
      if (!list || list.tagName.toLowerCase() !== tag) {
        list = document.createElement(tag);
        root.appendChild(list);
      }
      const li = document.createElement("li");
      appendInline(li, bullet[2]);
      list.appendChild(li);
    } else if (line.trim()) {
      const p = document.createElement("p");
      appendInline(p, line);
      root.appendChild(p);
      list = null;
    } else {
      list = null;
    }
  }
  return root;
}

// -- the page -------------------------------------------------------------------------------

function messageNode(message) {
  const box = document.createElement("div");
  box.className = "message " + message.role;
  const role = document.createElement("div");
  role.className = "role";
  role.textContent = message.role;
  box.appendChild(role);
  const body = document.createElement("div");
  body.className = "content";
  body.appendChild(renderMarkdown(message.content));
  box.appendChild(body);
  if (message.stats) {
    const stats = document.createElement("div");
    stats.className = "stats";
    stats.textContent = message.stats;
    box.appendChild(stats);
  }
  return box;
}

function render() {
  const conv = current();
  const list = $("conversations");
  list.replaceChildren(...state.conversations.map((c) => {
    const li = document.createElement("li");
    li.textContent = c.title;
    li.className = c.id === conv.id ? "current" : "";
    li.addEventListener("click", () => {
      if (running) return;
      state.current = c.id;
      save();
      render();
    });
    return li;
  }));
  $("system-prompt").value = conv.system || "";
  $("messages").replaceChildren(...conv.messages.map(messageNode));
  $("messages").scrollTop = $("messages").scrollHeight;
}

function setRunning(on) {
  $("send").hidden = on;
  $("stop").hidden = !on;
}

function number(id, parse) {
  const value = parse($(id).value);
  if (!Number.isFinite(value)) throw new Error(`${id.replace("-", "_")} must be a number`);
  return value;
}

// -- talking to the server ------------------------------------------------------------------

async function loadModel() {
  try {
    const response = await fetch("v1/models", {headers: headers()});
    if (!response.ok) {
      $("model-name").textContent = "no model";
      showError(await errorText(response));
      return;
    }
    const models = (await response.json()).data;
    modelId = models.length ? models[0].id : null;
    $("model-name").textContent = modelId || "no model";
    showError("");
  } catch (e) {
    $("model-name").textContent = "server unreachable";
    showError("Cannot reach the server: " + e.message);
  }
}

async function* events(response) {
  // Server-sent events of a streamed completion: each parsed `data:` payload until [DONE].
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const {value, done} = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, {stream: true});
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      for (const line of event.split("\n")) {
        if (!line.startsWith("data: ")) continue;
        const data = line.slice(6);
        if (data === "[DONE]") return;
        yield JSON.parse(data);
      }
    }
  }
}

async function send() {
  const text = $("input").value;
  if (running || !text.trim()) return;
  const conv = current();
  let body;
  try {
    body = {
      stream: true, stream_options: {include_usage: true},
      temperature: number("temperature", parseFloat), top_p: number("top-p", parseFloat),
      max_tokens: number("max-tokens", (v) => parseInt(v, 10)),
    };
  } catch (e) {
    showError(e.message);
    return;
  }
  conv.system = $("system-prompt").value;
  if (conv.messages.length === 0) conv.title = text.trim().slice(0, 40);
  conv.messages.push({role: "user", content: text});
  const reply = {role: "assistant", content: ""};
  conv.messages.push(reply);
  $("input").value = "";
  showError("");
  render();
  const history = conv.messages.slice(0, -1).map((m) => ({role: m.role, content: m.content}));
  body.messages = conv.system.trim() ? [{role: "system", content: conv.system}, ...history]
                                     : history;
  if (modelId) body.model = modelId;
  const controller = new AbortController();
  running = {controller, conversation: conv};
  setRunning(true);
  const node = $("messages").lastElementChild.querySelector(".content");
  const started = performance.now();
  let first = null;
  let usage = null;
  let stopped = false;
  try {
    const response = await fetch("v1/chat/completions", {
      method: "POST", headers: headers(), body: JSON.stringify(body),
      signal: controller.signal});
    if (!response.ok) throw new Error(await errorText(response));
    for await (const chunk of events(response)) {
      if (chunk.error) throw new Error(`Error ${chunk.error.code}: ${chunk.error.message}`);
      if (chunk.usage) usage = chunk.usage;
      const delta = chunk.choices && chunk.choices[0] && chunk.choices[0].delta;
      if (delta && delta.content) {
        if (first === null) first = performance.now();
        reply.content += delta.content;
        node.replaceChildren(renderMarkdown(reply.content));
        $("messages").scrollTop = $("messages").scrollHeight;
      }
    }
  } catch (e) {
    if (e.name === "AbortError") {
      stopped = true;
    } else {
      showError(e.message);
    }
  } finally {
    const end = performance.now();
    const parts = [];
    if (first !== null) parts.push(`TTFT ${((first - started) / 1000).toFixed(2)} s`);
    if (usage && first !== null && usage.completion_tokens > 1 && end > first) {
      const rate = (usage.completion_tokens - 1) / ((end - first) / 1000);
      parts.push(`${usage.completion_tokens} tokens, ${rate.toFixed(1)} tokens/s`);
    }
    if (stopped) parts.push("stopped");
    reply.stats = parts.join(" · ");
    if (!reply.content && !stopped) { // failed: the message goes back to the input box
      conv.messages.splice(-2, 2);
      $("input").value = text;
    }
    running = null;
    setRunning(false);
    save();
    render();
  }
}

function stop() {
  if (running) running.controller.abort();
}

function init() {
  const s = state.settings;
  for (const [id, key] of [["temperature", "temperature"], ["top-p", "top_p"],
                           ["max-tokens", "max_tokens"], ["api-key", "api_key"]]) {
    if (s[key] !== undefined) $(id).value = s[key];
    $(id).addEventListener("change", () => {
      s[key] = $(id).value;
      save();
      if (id === "api-key") loadModel();
    });
  }
  $("system-prompt").addEventListener("change", () => {
    current().system = $("system-prompt").value;
    save();
  });
  $("composer").addEventListener("submit", (e) => {
    e.preventDefault();
    send();
  });
  $("input").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey && !e.isComposing) {
      e.preventDefault();
      send();
    }
  });
  $("stop").addEventListener("click", stop);
  $("new-chat").addEventListener("click", () => {
    if (running) return;
    state.current = null;
    current();
    save();
    render();
  });
  $("clear-history").addEventListener("click", () => {
    if (running) return;
    state.conversations = [];
    state.current = null;
    save();
    render();
  });
  render();
  loadModel();
}

init();
