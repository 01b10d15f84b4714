// The chat page: streams /v1/chat/completions (server-sent events) and polls /stats for the routed-expert
// heatmap and the gauges. Plain browser JavaScript, no build step, nothing fetched from elsewhere.
"use strict";

const POLL_MS = 500;
const WINDOW = new URLSearchParams(location.search).get("window");  // seconds of routing the heatmap shows
const $ = (id) => document.getElementById(id);
const conversation = [];  // the conversation sent with each request: {role, content}
let model = null;
let busy = null;  // the AbortController of the reply being streamed
let lastStats = null;

function addMessage(role, text) {
  const div = document.createElement("div");
  div.className = `msg ${role}`;
  div.textContent = text;
  $("messages").appendChild(div);
  div.scrollIntoView({block: "end"});
  return div;
}

function setBusy(controller) {
  busy = controller;
  $("send").textContent = controller ? "Stop" : "Send";
  $("send").classList.toggle("stop", !!controller);
}

async function* sseEvents(response) {
  // The payloads of a server-sent event stream, one per "data:" line, until [DONE].
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

async function send(text) {
  const messages = [];
  const system = $("system").value.trim();
  if (system) messages.push({role: "system", content: system});
  conversation.push({role: "user", content: text});
  addMessage("user", text);
  const bubble = addMessage("assistant", "");
  bubble.dataset.state = "streaming";
  const controller = new AbortController();
  setBusy(controller);
  const started = performance.now();
  let reply = "", finish = null, usage = null, firstToken = null;
  try {
    const response = await fetch("v1/chat/completions", {
      method: "POST", headers: {"Content-Type": "application/json"}, signal: controller.signal,
      body: JSON.stringify({model, messages: messages.concat(conversation), stream: true,
                            stream_options: {include_usage: true},
                            max_tokens: Number($("max-tokens").value) || 64,
                            temperature: Number($("temperature").value)}),
    });
    if (!response.ok) {
      const body = await response.json().catch(() => ({}));
      throw new Error(body.error ? body.error.message : `HTTP ${response.status}`);
    }
    for await (const chunk of sseEvents(response)) {
      if (chunk.error) throw new Error(chunk.error.message);
      if (chunk.usage) usage = chunk.usage;
      for (const choice of chunk.choices || []) {
        const delta = choice.delta && choice.delta.content;
        if (delta) {
          if (firstToken === null) firstToken = performance.now();
          reply += delta;
          bubble.textContent = reply;
          bubble.scrollIntoView({block: "end"});
        }
        if (choice.finish_reason) finish = choice.finish_reason;
      }
    }
    conversation.push({role: "assistant", content: reply});
    const meta = document.createElement("span");
    meta.className = "meta";
    const seconds = (performance.now() - started) / 1000;
    meta.textContent = [finish && `finish: ${finish}`, usage && `${usage.completion_tokens} tokens`,
                        firstToken && `first token ${((firstToken - started) / 1000).toFixed(2)} s`,
                        `${seconds.toFixed(2)} s`].filter(Boolean).join(" · ");
    bubble.appendChild(meta);
    bubble.dataset.state = "done";
  } catch (err) {
    conversation.pop();  // the question stays on screen but is not sent again
    bubble.dataset.state = "error";
    bubble.className = "msg error";
    bubble.textContent = (reply ? reply + "\n" : "") + (err.name === "AbortError" ? "(stopped)" : `Error: ${err.message}`);
  } finally {
    setBusy(null);
  }
}

function shade(x) {
  // 0 -> near white, 1 -> dark blue, through the accent colour.
  const stops = [[244, 246, 251], [47, 111, 222], [11, 31, 77]];
  const t = Math.max(0, Math.min(1, x)) * 2;
  const [a, b] = t <= 1 ? [stops[0], stops[1]] : [stops[1], stops[2]];
  const f = t <= 1 ? t : t - 1;
  return `rgb(${a.map((v, i) => Math.round(v + (b[i] - v) * f)).join(",")})`;
}

function drawHeatmap(stats) {
  const canvas = $("heatmap");
  const {layers, counts} = stats.expert_tokens;
  const nLayers = layers.length, nExperts = stats.expert_tokens.n_experts;
  const width = $("heatmap-wrap").clientWidth || 300;
  const cell = Math.min(40, Math.max(4, Math.floor((width - 28) / Math.max(nExperts, 1))));
  const label = 28;
  canvas.width = label + cell * nExperts;
  canvas.height = Math.max(cell, 4) * nLayers;
  const ctx = canvas.getContext("2d");
  ctx.fillStyle = "#fff";
  ctx.fillRect(0, 0, canvas.width, canvas.height);
  const perLayer = $("per-layer").checked;
  const overall = Math.max(1, ...counts.flat());
  let total = 0;
  counts.forEach((row, i) => {
    const top = Math.max(1, ...row);
    row.forEach((n, e) => {
      total += n;
      ctx.fillStyle = shade(n / (perLayer ? top : overall));
      ctx.fillRect(label + e * cell, i * cell, cell - (cell > 6 ? 1 : 0), cell - (cell > 6 ? 1 : 0));
    });
    const every = cell >= 9 ? 1 : Math.ceil(10 / cell);  // small cells: label every few layers, legibly
    if (i % every === 0) {
      ctx.fillStyle = "#6b6b75";
      ctx.font = `${Math.max(8, Math.min(11, cell))}px system-ui`;
      ctx.textBaseline = "middle";
      ctx.fillText(`L${layers[i]}`, 2, i * cell + cell / 2);
    }
  });
  canvas.dataset.total = String(total);
  canvas.dataset.updates = String(Number(canvas.dataset.updates) + 1);
  canvas.dataset.cell = String(cell);
  $("legend-max").textContent = perLayer ? "layer max" : String(overall);
  $("window").textContent = `(last ${stats.window_seconds.toFixed(0)} s: ${total} picks)`;
}

function updateGauges(stats) {
  $("g-running").max = stats.max_batch_size;
  $("g-running").value = stats.running;
  $("v-running").textContent = `${stats.running} / ${stats.max_batch_size}`;
  $("v-queue").textContent = String(stats.queue_depth);
  const used = stats.kv_cache_blocks_used, totalBlocks = stats.kv_cache_blocks_total;
  $("g-kv").value = totalBlocks ? used / totalBlocks : 0;
  $("v-kv").textContent = `${used} / ${totalBlocks} blocks (${stats.kv_cache_tokens} tokens)`;
  if (lastStats) {
    const dt = (stats.time - lastStats.time) || 1;
    $("v-tps").textContent = ((stats.generation_tokens_total - lastStats.generation_tokens_total) / dt).toFixed(1);
  }
  lastStats = stats;
}

async function poll() {
  try {
    const response = await fetch(WINDOW ? `stats?window=${encodeURIComponent(WINDOW)}` : "stats");
    if (!response.ok) throw new Error(`HTTP ${response.status}`);
    const stats = await response.json();
    drawHeatmap(stats);
    updateGauges(stats);
    $("status").textContent = "live";
    $("status").className = "pill ok";
  } catch (err) {
    $("status").textContent = "offline";
    $("status").className = "pill bad";
  }
  setTimeout(poll, POLL_MS);
}

function tooltip(event) {
  const canvas = $("heatmap"), tip = $("tooltip");
  if (!lastStats) return;
  const rect = canvas.getBoundingClientRect();
  const scale = canvas.width / rect.width, cell = Number(canvas.dataset.cell);
  const x = (event.clientX - rect.left) * scale - 28, y = (event.clientY - rect.top) * scale;
  const e = Math.floor(x / cell), i = Math.floor(y / cell);
  const {layers, counts} = lastStats.expert_tokens;
  if (e < 0 || i < 0 || i >= counts.length || e >= counts[i].length) { tip.hidden = true; return; }
  tip.hidden = false;
  tip.textContent = `layer ${layers[i]}, expert ${e}: ${counts[i][e]} tokens`;
  tip.style.left = `${event.clientX - rect.left + 12}px`;
  tip.style.top = `${event.clientY - rect.top + 12}px`;
}

async function init() {
  try {
    const models = await (await fetch("v1/models")).json();
    model = models.data[0].id;
    $("model-name").textContent = `${model} · context ${models.data[0].max_model_len} tokens`;
  } catch (err) {
    $("model-name").textContent = "model not loaded yet (reload when /health is ok)";
  }
  $("composer").addEventListener("submit", (event) => {
    event.preventDefault();
    if (busy) { busy.abort(); return; }
    const text = $("prompt").value.trim();
    if (!text) return;
    $("prompt").value = "";
    send(text);
  });
  $("prompt").addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey) { event.preventDefault(); $("composer").requestSubmit(); }
  });
  $("clear").addEventListener("click", () => { conversation.length = 0; $("messages").replaceChildren(); });
  $("per-layer").addEventListener("change", () => lastStats && drawHeatmap(lastStats));
  $("heatmap").addEventListener("mousemove", tooltip);
  $("heatmap").addEventListener("mouseleave", () => { $("tooltip").hidden = true; });
  poll();
}

init();
