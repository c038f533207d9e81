"""The web UI: one self-contained page (HTML, CSS and JavaScript, nothing fetched from elsewhere) that
talks to the same ``/api`` routes as any script. It builds the same GenerationRequest JSON.

It is not Gradio: no Gradio release accepts the pinned Pillow 13 (all require ``pillow<13``), so the UI
is plain browser code instead (see docs/serving.md)."""

from __future__ import annotations

PAGE = r"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>dreamlab</title>
<style>
:root { --bg: #f6f6f4; --panel: #fff; --line: #d9d9d4; --text: #1e1e1c; --muted: #6b6b66; --accent: #3b5bdb; --bad: #c92a2a; }
* { box-sizing: border-box; }
body { margin: 0; font: 14px/1.4 system-ui, sans-serif; background: var(--bg); color: var(--text); }
header { padding: 10px 18px; border-bottom: 1px solid var(--line); background: var(--panel); display: flex; gap: 12px; align-items: baseline; }
header h1 { font-size: 18px; margin: 0; }
header span { color: var(--muted); }
main { display: grid; grid-template-columns: minmax(320px, 420px) 1fr; gap: 16px; padding: 16px; }
section { background: var(--panel); border: 1px solid var(--line); border-radius: 8px; padding: 12px 14px; }
h2 { font-size: 15px; margin: 0 0 8px; }
label { display: block; margin: 6px 0 2px; color: var(--muted); font-size: 12px; }
textarea, input[type=text], input[type=number], select { width: 100%; padding: 5px 7px; border: 1px solid var(--line); border-radius: 5px; font: inherit; background: #fff; }
textarea { resize: vertical; min-height: 54px; }
.row { display: grid; grid-template-columns: 1fr 1fr 1fr; gap: 8px; }
.row2 { display: grid; grid-template-columns: 1fr 1fr; gap: 8px; }
.modes { display: flex; gap: 12px; margin: 8px 0; }
.modes label { display: inline; color: var(--text); font-size: 14px; }
button { font: inherit; padding: 6px 14px; border-radius: 5px; border: 1px solid var(--line); background: #fff; cursor: pointer; }
button.primary { background: var(--accent); border-color: var(--accent); color: #fff; }
button:disabled { opacity: .5; cursor: default; }
.actions { display: flex; gap: 8px; margin-top: 12px; }
.note { color: var(--muted); font-size: 12px; }
#error { color: var(--bad); min-height: 1.4em; margin-top: 6px; white-space: pre-wrap; }
#editor { position: relative; display: inline-block; margin-top: 6px; border: 1px solid var(--line); }
#editor img, #editor canvas { display: block; width: 256px; image-rendering: pixelated; }
#mask-canvas { position: absolute; left: 0; top: 0; opacity: .55; cursor: crosshair; touch-action: none; }
progress { width: 100%; height: 14px; }
.pix { image-rendering: pixelated; width: 128px; height: 128px; object-fit: contain; background: repeating-conic-gradient(#eee 0 25%, #fff 0 50%) 0 0 / 16px 16px; border: 1px solid var(--line); }
#results, #gallery { display: flex; flex-wrap: wrap; gap: 10px; }
figure { margin: 0; width: 130px; }
figcaption { font-size: 12px; overflow: hidden; text-overflow: ellipsis; white-space: nowrap; }
figure .tools { display: flex; gap: 6px; font-size: 12px; }
figure .tools button { padding: 1px 6px; font-size: 12px; }
#meta { white-space: pre-wrap; font: 12px ui-monospace, monospace; background: #fafaf8; border: 1px solid var(--line); padding: 6px; max-height: 160px; overflow: auto; }
.hidden { display: none !important; }
</style>
</head>
<body>
<header><h1>dreamlab</h1><span id="model-name"></span></header>
<main>
<section id="form-panel">
  <h2>Generate</h2>
  <label for="prompt">Prompt</label>
  <textarea id="prompt" placeholder="red apple"></textarea>
  <label for="negative">Negative prompt</label>
  <textarea id="negative" placeholder="blurry"></textarea>
  <div class="row2">
    <div><label for="sampler">Sampler</label><select id="sampler"></select></div>
    <div><label for="schedule">Schedule</label><select id="schedule"></select></div>
  </div>
  <div class="row">
    <div><label for="steps">Steps</label><input id="steps" type="number" min="1" value="20"></div>
    <div><label for="cfg">Guidance scale</label><input id="cfg" type="number" min="0" max="50" step="0.5" value="5"></div>
    <div><label for="batch">Batch</label><input id="batch" type="number" min="1" value="1"></div>
  </div>
  <div class="row">
    <div><label for="seed">Seed (blank: random)</label><input id="seed" type="number" min="0" placeholder="random"></div>
    <div><label for="width">Width</label><input id="width" type="number" min="8" step="8" placeholder="model"></div>
    <div><label for="height">Height</label><input id="height" type="number" min="8" step="8" placeholder="model"></div>
  </div>
  <div class="modes" role="radiogroup" aria-label="task">
    <label><input type="radio" name="mode" value="txt2img" checked> Text to image</label>
    <label><input type="radio" name="mode" value="img2img"> Image to image</label>
    <label><input type="radio" name="mode" value="inpaint"> Inpaint</label>
  </div>
  <div id="image-inputs" class="hidden">
    <label for="init-file">Source image</label>
    <input id="init-file" type="file" accept="image/png,image/jpeg,image/webp">
    <label for="strength">Strength <span id="strength-value">0.75</span></label>
    <input id="strength" type="range" min="0" max="1" step="0.05" value="0.75">
    <div id="mask-tools" class="hidden">
      <label for="brush">Mask brush (paint what to repaint) <span id="brush-value">24</span> px</label>
      <input id="brush" type="range" min="4" max="96" value="24">
      <button id="clear-mask" type="button">Clear mask</button>
    </div>
    <div id="editor" class="hidden"><img id="init-preview" alt="source image"><canvas id="mask-canvas"></canvas></div>
  </div>
  <label for="control-file">Control image</label>
  <input id="control-file" type="file" disabled aria-describedby="control-note">
  <div id="control-note" class="note">ControlNet is not in the engine yet: this input is disabled.</div>
  <div class="actions">
    <button id="generate" class="primary" type="button">Generate</button>
    <button id="cancel" type="button" disabled>Cancel</button>
  </div>
  <div id="error" role="alert"></div>
</section>
<section>
  <h2>Progress</h2>
  <progress id="progress" max="1" value="0"></progress>
  <div id="status" class="note">idle</div>
  <div style="display:flex; gap:10px; margin-top:8px">
    <img id="preview" class="pix hidden" alt="preview of the current estimate">
    <div id="results"></div>
  </div>
  <h2 style="margin-top:16px">Gallery</h2>
  <div class="row2" style="margin-bottom:8px">
    <input id="search" type="text" placeholder="search prompts" aria-label="search prompts">
    <div class="note" id="gallery-count"></div>
  </div>
  <div id="gallery"></div>
  <div id="meta" class="hidden"></div>
</section>
</main>
<script>
"use strict";
const $ = (id) => document.getElementById(id);
let job = null, source = null, events = null;
let maskCanvas = null;   // white = repaint, on black, at the source image's size

async function api(path, options) {
  const r = await fetch(path, options);
  if (!r.ok) {
    let detail = r.status + " " + r.statusText;
    try { detail = (await r.json()).detail || detail; } catch (e) {}
    throw new Error(detail);
  }
  return r.status === 204 ? null : r.json();
}

function option(select, value, text) {
  const o = document.createElement("option"); o.value = value; o.textContent = text; select.appendChild(o);
}

async function init() {
  const info = await api("/api/info");
  $("model-name").textContent = "model: " + info.model.name + " (" + info.model.sample_size + " px)";
  for (const [name, kind] of Object.entries(info.samplers)) { option($("sampler"), name, name); $("sampler").lastChild.title = kind; }
  $("sampler").value = "dpmpp_2m";
  for (const name of info.schedules) option($("schedule"), name, name);
  $("schedule").value = "karras";
  $("steps").max = info.limits.max_steps; $("batch").max = info.limits.max_batch;
  $("width").max = $("height").max = info.limits.max_side;
  refreshGallery();
}

function mode() { return document.querySelector("input[name=mode]:checked").value; }

function showMode() {
  $("image-inputs").classList.toggle("hidden", mode() === "txt2img");
  $("mask-tools").classList.toggle("hidden", mode() !== "inpaint");
  $("mask-canvas").classList.toggle("hidden", mode() !== "inpaint");
}

function loadSource(file) {
  const reader = new FileReader();
  reader.onload = () => {
    source = reader.result;  // data URL of the file's own bytes
    const img = $("init-preview");
    img.onload = () => {
      const c = $("mask-canvas");
      c.width = img.naturalWidth; c.height = img.naturalHeight;
      c.style.height = (256 * img.naturalHeight / img.naturalWidth) + "px";
      maskCanvas = document.createElement("canvas");
      maskCanvas.width = c.width; maskCanvas.height = c.height;
      clearMask();
      $("editor").classList.remove("hidden");
    };
    img.src = source;
  };
  reader.readAsDataURL(file);
}

function clearMask() {
  if (!maskCanvas) return;
  const m = maskCanvas.getContext("2d");
  m.fillStyle = "#000"; m.fillRect(0, 0, maskCanvas.width, maskCanvas.height);
  const c = $("mask-canvas"); c.getContext("2d").clearRect(0, 0, c.width, c.height);
  maskCanvas.dirty = false;
}

function paint(e) {
  const c = $("mask-canvas");
  const rect = c.getBoundingClientRect();
  const sx = c.width / rect.width;
  const x = (e.clientX - rect.left) * sx, y = (e.clientY - rect.top) * sx;
  const r = Math.max(0.5, $("brush").value / 2 * sx);
  for (const [ctx, color] of [[c.getContext("2d"), "#e03131"], [maskCanvas.getContext("2d"), "#fff"]]) {
    ctx.fillStyle = color; ctx.beginPath(); ctx.arc(x, y, r, 0, 2 * Math.PI); ctx.fill();
  }
  maskCanvas.dirty = true;
}

function binaryMask() {
  // the brush is anti-aliased; the mask is sent hard-edged: a pixel is repainted or kept, not blended
  const out = document.createElement("canvas");
  out.width = maskCanvas.width; out.height = maskCanvas.height;
  const ctx = out.getContext("2d");
  const data = maskCanvas.getContext("2d").getImageData(0, 0, out.width, out.height);
  for (let i = 0; i < data.data.length; i += 4) {
    const v = data.data[i] >= 128 ? 255 : 0;
    data.data[i] = data.data[i + 1] = data.data[i + 2] = v; data.data[i + 3] = 255;
  }
  ctx.putImageData(data, 0, 0);
  return out;
}

function stripDataUrl(url) { return url.slice(url.indexOf(",") + 1); }

function buildRequest() {
  const req = {
    prompt: $("prompt").value, negative_prompt: $("negative").value,
    sampler: $("sampler").value, schedule: $("schedule").value,
    steps: Number($("steps").value), cfg_scale: Number($("cfg").value), batch: Number($("batch").value),
  };
  if ($("seed").value !== "") req.seed = Number($("seed").value);
  if ($("width").value !== "") req.width = Number($("width").value);
  if ($("height").value !== "") req.height = Number($("height").value);
  if (mode() !== "txt2img") {
    if (!source) throw new Error("choose a source image for " + (mode() === "inpaint" ? "inpainting" : "image to image"));
    req.init_image = stripDataUrl(source);
    req.strength = Number($("strength").value);
    if (mode() === "inpaint") {
      if (!maskCanvas || !maskCanvas.dirty) throw new Error("paint the region to repaint on the image first");
      req.mask_image = stripDataUrl(binaryMask().toDataURL("image/png"));
    }
  }
  return req;
}

function setBusy(busy) { $("generate").disabled = busy; $("cancel").disabled = !busy; }

function showJob(j) {
  const p = $("progress");
  if (j.state === "queued") { $("status").textContent = "queued" + (j.position ? ", " + j.position + " ahead" : ""); p.removeAttribute("value"); }
  else if (j.state === "running") { p.max = j.total || 1; p.value = j.step; $("status").textContent = "step " + j.step + " / " + j.total; }
  else if (j.state === "done") { p.max = 1; p.value = 1; $("status").textContent = "done: " + j.images.length + " image(s), seed " + j.images.map(i => i.seed).join(", "); }
  else { p.max = 1; p.value = 0; $("status").textContent = j.state + (j.error ? ": " + j.error : ""); }
  if (j.preview) { $("preview").src = j.preview; $("preview").classList.remove("hidden"); }
}

function figure(im, withTools) {
  const f = document.createElement("figure");
  f.dataset.imageId = im.id;
  const img = document.createElement("img");
  img.className = "pix"; img.src = im.url; img.alt = im.prompt; img.title = im.prompt;
  const cap = document.createElement("figcaption");
  cap.textContent = (im.prompt || "(no prompt)") + " · " + im.seed;
  f.append(img, cap);
  if (withTools) {
    const tools = document.createElement("div"); tools.className = "tools";
    const info = document.createElement("button"); info.textContent = "info"; info.type = "button";
    info.onclick = async () => {
      const meta = await api("/api/gallery/" + im.id);
      $("meta").textContent = meta.parameters + "\n\n" + JSON.stringify(meta.manifest, null, 1);
      $("meta").classList.remove("hidden");
    };
    const del = document.createElement("button"); del.textContent = "delete"; del.type = "button"; del.className = "delete";
    del.onclick = async () => { await api("/api/gallery/" + im.id, { method: "DELETE" }); refreshGallery(); };
    const dl = document.createElement("a"); dl.href = im.url; dl.download = "dreamlab-" + im.id + ".png"; dl.textContent = "png";
    tools.append(info, del, dl); f.append(tools);
  }
  return f;
}

async function refreshGallery() {
  const q = encodeURIComponent($("search").value);
  const page = await api("/api/gallery?limit=60&q=" + q);
  $("gallery").replaceChildren(...page.items.map(im => figure(im, true)));
  $("gallery-count").textContent = page.total + " image(s)";
}

async function generate() {
  $("error").textContent = "";
  let req;
  try { req = buildRequest(); } catch (e) { $("error").textContent = e.message; return; }
  setBusy(true);
  $("results").replaceChildren(); $("preview").classList.add("hidden");
  try {
    job = await api("/api/jobs", { method: "POST", headers: { "content-type": "application/json" }, body: JSON.stringify(req) });
  } catch (e) { $("error").textContent = e.message; setBusy(false); return; }
  showJob(job);
  events = new EventSource("/api/jobs/" + job.id + "/events");
  const onEvent = (ev) => { const j = JSON.parse(ev.data); showJob(j); return j; };
  events.addEventListener("progress", onEvent);
  events.addEventListener("end", (ev) => {
    const j = onEvent(ev); events.close(); events = null; setBusy(false);
    $("preview").classList.add("hidden");
    if (j.state === "done") { $("results").replaceChildren(...j.images.map(im => figure(im, false))); }
    else if (j.state === "failed") { $("error").textContent = j.error; }
    refreshGallery();
  });
  events.onerror = () => { if (events && events.readyState === EventSource.CLOSED) { setBusy(false); $("error").textContent = "lost the connection to the server"; } };
}

async function cancel() {
  if (!job) return;
  try { await api("/api/jobs/" + job.id + "/cancel", { method: "POST" }); } catch (e) { $("error").textContent = e.message; }
}

document.querySelectorAll("input[name=mode]").forEach(r => r.addEventListener("change", showMode));
$("init-file").addEventListener("change", (e) => { if (e.target.files[0]) loadSource(e.target.files[0]); });
$("strength").addEventListener("input", () => { $("strength-value").textContent = $("strength").value; });
$("brush").addEventListener("input", () => { $("brush-value").textContent = $("brush").value; });
$("clear-mask").addEventListener("click", clearMask);
const mc = $("mask-canvas");
let painting = false;
mc.addEventListener("pointerdown", (e) => { if (!maskCanvas) return; painting = true; mc.setPointerCapture(e.pointerId); paint(e); });
mc.addEventListener("pointermove", (e) => { if (painting) paint(e); });
mc.addEventListener("pointerup", () => { painting = false; });
$("generate").addEventListener("click", generate);
$("cancel").addEventListener("click", cancel);
let searchTimer = null;
$("search").addEventListener("input", () => { clearTimeout(searchTimer); searchTimer = setTimeout(refreshGallery, 250); });
init().catch(e => { $("error").textContent = "cannot reach the server: " + e.message; });
</script>
</body>
</html>
"""


def page() -> str:
    return PAGE
