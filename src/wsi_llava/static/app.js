// WSI-LLaVA viewer: pick a slide, see it (its raw image in Deep Zoom when the server has one, else its tile
// grid; viewer.js), chat about it (streamed), and see the tiles the model used for the latest answer in place
// on the slide and as a heatmap. Talks to the same server's /v1 API; no dependencies.
"use strict";

const state = { model: null, slide: null, tiles: null, explain: null, history: [], busy: false };
const $ = (id) => document.getElementById(id);

// ------------------------------------------------------------------------------------------ API

function authHeaders(json) {
  const h = {};
  if (json) h["Content-Type"] = "application/json";
  const key = $("api-key").value.trim();
  if (key) h["Authorization"] = "Bearer " + key;
  return h;
}

async function errorMessage(response) {
  try {
    const body = await response.json();
    if (body && body.error && body.error.message) return body.error.message;
  } catch (e) { /* not JSON */ }
  return response.status + " " + response.statusText;
}

async function api(path, options = {}) {
  const response = await fetch(path, { ...options, headers: authHeaders(Boolean(options.body)) });
  if (!response.ok) throw new Error(await errorMessage(response));
  return response.json();
}

function slidePath(id) {
  return id.split("/").map(encodeURIComponent).join("/");
}

function setStatus(text, isError = false) {
  const el = $("status");
  el.textContent = text;
  el.classList.toggle("error", isError);
}

// ------------------------------------------------------------------------------------- drawing

// Where each tile lands on a canvas: a common scale keeps tiles square and the slide centred.
function tileLayout(canvas, tiles) {
  const size = tiles.tile_size || 256;
  const xs = tiles.coords.map((c) => c[0]);
  const ys = tiles.coords.map((c) => c[1]);
  const minX = Math.min(...xs), minY = Math.min(...ys);
  const width = Math.max(...xs) + size - minX, height = Math.max(...ys) + size - minY;
  const pad = 6;
  const scale = Math.min((canvas.width - 2 * pad) / width, (canvas.height - 2 * pad) / height);
  const offX = (canvas.width - width * scale) / 2, offY = (canvas.height - height * scale) / 2;
  return tiles.coords.map(([x, y]) => [offX + (x - minX) * scale, offY + (y - minY) * scale, Math.max(size * scale, 1)]);
}

const slideView = new SlideView(document.getElementById("slide-view"));

function clearCanvas(canvas) {
  const ctx = canvas.getContext("2d");
  ctx.fillStyle = "#ffffff";
  ctx.fillRect(0, 0, canvas.width, canvas.height);
  return ctx;
}

// The slide's raw image (Deep Zoom) when the server has one, else the grid of its tiles.
async function showSlide(id, tiles) {
  $("slide-view").dataset.tiles = String(tiles.coords.length);
  const grid = (why) => {
    slideView.showGrid(tiles.coords, tiles.tile_size || 256);
    $("view-caption").textContent = why + ": the squares are the tiles the model reads.";
  };
  if (!tiles.image) { grid("No raw slide image"); return; }
  const response = await fetch(`/v1/slides/${slidePath(id)}/deepzoom.dzi`, { headers: authHeaders(false) });
  if (state.slide !== id) return;
  if (!response.ok) {
    const why = await errorMessage(response);
    grid("The slide image cannot be shown");
    setStatus(why, true);
    return;
  }
  const dzi = parseDzi(await response.text());
  if (state.slide !== id) return;
  const base = `/v1/slides/${slidePath(id)}/deepzoom_files/`;
  slideView.showImage(dzi, async (level, col, row) => {
    const tile = await fetch(`${base}${level}/${col}_${row}.jpeg`, { headers: authHeaders(false) });
    if (!tile.ok) throw new Error(await errorMessage(tile));
    return createImageBitmap(await tile.blob());
  });
  $("view-caption").textContent =
    `The slide (${dzi.width} × ${dzi.height} px): drag to pan, wheel or double-click to zoom.`;
}

function clearHeatmap(caption) {
  const canvas = $("heatmap");
  clearCanvas(canvas);
  delete canvas.dataset.selected;
  $("heatmap-caption").textContent = caption;
  state.explain = null;
  slideView.setOverlay([]);
}

// The selected tiles on the slide: level-0 boxes coloured by score (as the heatmap), score as label.
function overlayBoxes(explain, lo, span) {
  const size = state.tiles.tile_size || 256;
  return explain.coords.map(([x, y], k) => {
    const score = explain.tile_scores ? explain.tile_scores[k] : null;
    return { x, y, size, colour: score === null ? "#e4002b" : rampColour((score - lo) / span),
             label: score === null ? "" : score.toFixed(2) };
  });
}

function drawHeatmap(explain) {
  const canvas = $("heatmap");
  const tiles = state.tiles;
  if (!tiles || explain.n_tiles !== tiles.coords.length) {
    clearHeatmap("Heatmap unavailable: the slide's tiles changed; reload the slide");
    return;
  }
  const ctx = clearCanvas(canvas);
  const boxes = tileLayout(canvas, tiles);
  const scores = explain.scores;
  let lo = 0, hi = 1;
  if (scores) {
    lo = Math.min(...scores);
    hi = Math.max(...scores);
  }
  const span = hi - lo || 1;
  boxes.forEach(([x, y, s], i) => {
    ctx.fillStyle = scores ? rampColour((scores[i] - lo) / span) : "#d9d6de";
    ctx.fillRect(x, y, s, s);
  });
  ctx.strokeStyle = "#e4002b";
  ctx.lineWidth = Math.max(1.5, boxes.length ? boxes[0][2] * 0.18 : 1.5);
  const selected = [...new Set(explain.tile_indices)];
  for (const i of selected) {
    const [x, y, s] = boxes[i];
    if (!scores) { ctx.fillStyle = "#f08a4b"; ctx.fillRect(x, y, s, s); }
    ctx.strokeRect(x, y, s, s);
  }
  canvas.dataset.selected = String(selected.length);
  state.explain = explain;
  slideView.setOverlay(overlayBoxes(explain, lo, span));
  $("heatmap-caption").textContent =
    `Selector ${explain.selector}: ${selected.length} of ${explain.n_tiles} tiles used (outlined)` +
    (scores ? `; colour = selector score (${lo.toFixed(3)} … ${hi.toFixed(3)})` : "; this selector gives no scores");
}

// ---------------------------------------------------------------------------------------- chat

function addMessage(role, text) {
  const el = document.createElement("div");
  el.className = "msg " + role;
  el.textContent = text;  // never innerHTML: answers are untrusted text
  $("messages").appendChild(el);
  el.scrollIntoView({ block: "end" });
  return el;
}

function resetConversation() {
  state.history = [];
  $("messages").replaceChildren();
  clearHeatmap("Heatmap of the latest answer: ask a question");
}

function buildMessages(question) {
  const messages = [];
  for (const [q, a] of state.history) {
    messages.push({ role: "user", content: q });
    messages.push({ role: "assistant", content: a });
  }
  messages.push({ role: "user", content: [{ type: "slide", slide: state.slide }, { type: "text", text: question }] });
  return messages;
}

// Reads a server-sent-events body; calls onEvent with each parsed `data:` JSON object.
async function readEvents(response, onEvent) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      for (const line of block.split("\n")) {
        if (!line.startsWith("data:")) continue;
        const data = line.slice(5).trim();
        if (data === "[DONE]") return;
        onEvent(JSON.parse(data));
      }
    }
  }
}

async function ask(question) {
  const body = { model: state.model, messages: buildMessages(question), stream: true, explain: true };
  addMessage("user", question);
  const bubble = addMessage("assistant pending", "");
  let answer = "";
  const response = await fetch("/v1/chat/completions",
    { method: "POST", headers: authHeaders(true), body: JSON.stringify(body) });
  if (!response.ok) {
    bubble.remove();
    throw new Error(await errorMessage(response));
  }
  await readEvents(response, (event) => {
    if (event.error) throw new Error(event.error.message);
    const choice = event.choices && event.choices[0];
    if (choice && choice.delta && choice.delta.content) {
      answer += choice.delta.content;
      bubble.textContent = answer;
    }
    if (event.explain) drawHeatmap(event.explain);
  });
  bubble.classList.remove("pending");
  if (!answer) bubble.textContent = "(empty answer)";
  state.history.push([question, answer]);
}

// ------------------------------------------------------------------------------------ wiring

async function loadSlide(id) {
  state.slide = id;
  resetConversation();
  slideView.clear();
  setStatus("Loading slide " + id + "…");
  const tiles = await api(`/v1/slides/${slidePath(id)}/tiles`);
  if (state.slide !== id) return;  // another slide was picked meanwhile
  state.tiles = tiles;
  $("slide-info").textContent =
    `${tiles.n_used} tiles read of ${tiles.n_total} in the file; tile size ${tiles.tile_size ?? "unknown"} px (${tiles.tile_size_source})`;
  setStatus("");
  await showSlide(id, tiles);
}

async function init() {
  try {
    const models = await api("/v1/models");
    state.model = models.data[0].id;
    $("model-name").textContent = "model: " + state.model;
    const slides = await api("/v1/slides");
    const select = $("slide-select");
    select.replaceChildren();
    for (const s of slides.data) {
      const option = document.createElement("option");
      option.value = s.id;
      option.textContent = s.id;
      select.appendChild(option);
    }
    if (!slides.data.length) { setStatus("No slides under the server's slides root.", true); return; }
    const ids = slides.data.map((s) => s.id);
    if (state.slide && ids.includes(state.slide) && state.tiles) {
      select.value = state.slide;  // keep the current slide and conversation
      setStatus("");
      return;
    }
    await loadSlide(ids[0]);
  } catch (e) {
    setStatus(e.message, true);
  }
}

$("api-key").value = sessionStorage.getItem("wsi-llava-api-key") || "";
let appliedKey = $("api-key").value.trim();
$("api-key").addEventListener("change", () => {
  const key = $("api-key").value.trim();
  if (key === appliedKey) return;
  appliedKey = key;
  sessionStorage.setItem("wsi-llava-api-key", key);
  init();
});
$("slide-select").addEventListener("change", (e) => loadSlide(e.target.value).catch((err) => setStatus(err.message, true)));
$("reset").addEventListener("click", resetConversation);
$("zoom-in").addEventListener("click", () => slideView.zoomCentre(2));
$("zoom-out").addEventListener("click", () => slideView.zoomCentre(0.5));
$("zoom-fit").addEventListener("click", () => slideView.fit());
$("show-overlay").addEventListener("change", (e) => {
  slideView.showOverlay = e.target.checked;
  slideView.requestDraw();
});
$("question").addEventListener("keydown", (e) => {
  if (e.key === "Enter" && !e.shiftKey) { e.preventDefault(); $("ask-form").requestSubmit(); }
});
$("ask-form").addEventListener("submit", async (e) => {
  e.preventDefault();
  const question = $("question").value.trim();
  if (!question || state.busy || !state.slide) return;
  state.busy = true;
  $("send").disabled = true;
  setStatus("Thinking…");
  try {
    await ask(question);
    $("question").value = "";
    setStatus("");
  } catch (err) {
    addMessage("error", err.message);
    setStatus(err.message, true);
  } finally {
    state.busy = false;
    $("send").disabled = false;
  }
});
init();
