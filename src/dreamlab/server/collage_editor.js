// The collage editor of the web UI (ui_collage.py; docs/composition.md). Gradio runs this file as the
// js_on_load of a gr.HTML: `element` is the component's root, `props.value` its value (JSON: the canvas's
// width and height, and the images uploaded here by name, base64), `props.layout_id` the elem_id of the
// layout textbox, and `watch` calls back when Python sets the value (the Width and Height sliders).
//
// The layout itself lives in that textbox (the API's `collage` field, images by upload name). Every edit
// here rewrites its text and every edit there redraws this, in the browser, so what Generate sends is
// what is on screen. Coordinates are the layout's pixels; the canvas is shown at `scale` CSS pixels each.

const VIEW = 384; // the canvas's longer side on screen (CSS px); small canvases get an integer scale
const COLORS = ["#e6194b", "#3cb44b", "#4363d8", "#f58231", "#911eb4", "#42d4f4", "#f032e6", "#bfef45"];
const CORNERS = ["nw", "ne", "sw", "se"];

let size = {width: 64, height: 64}; // the canvas (layout pixels)
let uploads = {}; // image name -> base64
let spec = {layers: []}; // the layout, as parsed from the textbox (unknown fields kept)
let selected = -1;
let scale = 1;
let drag = null; // {k, corner (null: move), box at the start, pointer at the start}
let written = null; // the text this editor last wrote into the textbox

const root = element.querySelector(".dl-collage") || element;
root.innerHTML = `
  <div class="dl-toolbar" role="toolbar" aria-label="Collage layers">
    <button type="button" data-act="add">Add layer</button>
    <button type="button" data-act="down" title="Move the selected layer one down the stack">Lower</button>
    <button type="button" data-act="up" title="Move the selected layer one up the stack">Raise</button>
    <button type="button" data-act="delete">Delete</button>
    <label class="dl-button">Image… <input type="file" accept="image/*" class="dl-file"></label>
    <button type="button" data-act="no-image">No image</button>
  </div>
  <div class="dl-main">
    <div class="dl-stage">
      <div class="dl-ruler dl-ruler-x" aria-hidden="true"></div>
      <div class="dl-ruler dl-ruler-y" aria-hidden="true"></div>
      <div class="dl-canvas" tabindex="0" role="application"
           aria-label="Collage canvas: drag a layer to move it, a corner to resize it; arrow keys move the selected layer"></div>
    </div>
    <fieldset class="dl-panel">
      <legend>Selected layer</legend>
      <label>Prompt <input type="text" name="prompt"></label>
      <label>Strength <input type="number" name="strength" min="0" max="1" step="0.05"></label>
      <div class="dl-box">
        <label>x0 <input type="number" name="x0" step="1"></label><label>y0 <input type="number" name="y0" step="1"></label>
        <label>x1 <input type="number" name="x1" step="1"></label><label>y1 <input type="number" name="y1" step="1"></label>
      </div>
      <div class="dl-image-name"></div>
    </fieldset>
  </div>
  <div class="dl-status" aria-live="polite"></div>
  <div class="dl-error" role="alert"></div>`;
const canvas = root.querySelector(".dl-canvas");
const panel = root.querySelector(".dl-panel");
const field = (name) => panel.querySelector(`[name=${name}]`);

const textarea = () => document.querySelector(`#${props.layout_id} textarea`);
const boxOf = (layer) => (Array.isArray(layer.box) && layer.box.length === 4 ? layer.box.map(Number) : [0, 0, size.width, size.height]);
const clamp = (v, lo, hi) => Math.min(Math.max(v, lo), hi);
const colors = new WeakMap(); // layer -> its colour, kept when the stack is reordered

function colorOf(layer) {
  if (!colors.has(layer)) {
    const used = new Set(spec.layers.map((l) => colors.get(l)));
    colors.set(layer, COLORS.find((c) => !used.has(c)) || COLORS[spec.layers.indexOf(layer) % COLORS.length]);
  }
  return colors.get(layer);
}

// --- the layout as text: one layer a line (as ui_collage.layout_text writes it) ----------------------

function fmt(v) {
  if (Array.isArray(v)) return "[" + v.map(fmt).join(", ") + "]";
  if (v && typeof v === "object") return "{" + Object.entries(v).map(([k, x]) => JSON.stringify(k) + ": " + fmt(x)).join(", ") + "}";
  return JSON.stringify(v);
}

function layoutText() {
  const rest = Object.entries(spec).filter(([k]) => k !== "layers").map(([k, v]) => `, ${JSON.stringify(k)}: ${fmt(v)}`).join("");
  const lines = spec.layers.map(fmt);
  const layers = lines.length ? "[\n  " + lines.join(",\n  ") + "\n]" : "[]";
  return '{"layers": ' + layers + rest + "}";
}

function write() {
  // into the textbox, as if typed: Gradio's Textbox takes its value from the input event
  const ta = textarea();
  if (!ta) return;
  written = layoutText();
  ta.value = written;
  ta.dispatchEvent(new Event("input", {bubbles: true}));
}

function read() {
  // from the textbox; a layout that does not parse is reported and the last good one stays drawn
  const ta = textarea();
  if (!ta || ta.value === written) return;
  written = ta.value;
  let parsed;
  try {
    parsed = JSON.parse(ta.value);
    if (!parsed || typeof parsed !== "object" || !Array.isArray(parsed.layers)) throw new Error('write {"layers": [...]}');
    if (!parsed.layers.every((l) => l && typeof l === "object")) throw new Error("every layer is an object");
  } catch (e) {
    showError(`layout: ${e.message}`);
    return;
  }
  spec = parsed;
  selected = Math.min(selected, spec.layers.length - 1);
  draw();
}

function commit() {
  write();
  draw();
}

function saveUploads() {
  props.value = JSON.stringify({width: size.width, height: size.height, images: uploads});
}

function loadValue() {
  try {
    const v = JSON.parse(props.value || "{}");
    size = {width: Number(v.width) || size.width, height: Number(v.height) || size.height};
    uploads = v.images || {};
  } catch (e) {
    showError(`editor: ${e.message}`);
  }
}

// --- drawing -----------------------------------------------------------------------------------------

function showError(text) {
  root.querySelector(".dl-error").textContent = text;
}

function tickStep() {
  // ruler and grid spacing in layout pixels: a power of two at least 24 CSS px apart
  let step = 1;
  while (step * scale < 24) step *= 2;
  return step;
}

function drawRulers(step) {
  for (const [axis, extent] of [["x", size.width], ["y", size.height]]) {
    const ruler = root.querySelector(`.dl-ruler-${axis}`);
    ruler.replaceChildren();
    ruler.style[axis === "x" ? "width" : "height"] = `${extent * scale}px`;
    for (let v = 0; v <= extent; v += step) {
      const tick = document.createElement("span");
      tick.textContent = v;
      tick.style[axis === "x" ? "left" : "top"] = `${v * scale}px`;
      ruler.appendChild(tick);
    }
  }
}

function draw() {
  const side = Math.max(size.width, size.height);
  scale = side <= VIEW ? Math.floor(VIEW / side) : VIEW / side;
  const step = tickStep();
  canvas.style.width = `${size.width * scale}px`;
  canvas.style.height = `${size.height * scale}px`;
  canvas.style.backgroundSize = `${step * scale}px ${step * scale}px`;
  drawRulers(step);
  canvas.replaceChildren();
  const outside = [], problems = [];
  spec.layers.forEach((layer, k) => {
    const [x0, y0, x1, y1] = boxOf(layer);
    if (x0 < 0 || y0 < 0 || x1 > size.width || y1 > size.height) outside.push(k);
    const div = document.createElement("div");
    div.className = "dl-layer" + (k === selected ? " dl-selected" : "") + (outside.includes(k) ? " dl-outside" : "");
    div.dataset.k = k;
    div.style.cssText = `left:${x0 * scale}px;top:${y0 * scale}px;width:${Math.max(0, x1 - x0) * scale}px;` +
      `height:${Math.max(0, y1 - y0) * scale}px;--c:${colorOf(layer)}`;
    const image = layer.image == null ? null : uploads[layer.image];
    if (layer.image != null && !image) problems.push(`layer ${k}: no image ${JSON.stringify(layer.image)} was uploaded here`);
    if (image) {
      const img = document.createElement("img");
      img.src = "data:image/png;base64," + image;
      img.alt = layer.image;
      img.draggable = false;
      div.appendChild(img);
    }
    const label = document.createElement("span");
    label.className = "dl-label";
    label.textContent = `${k} ${layer.prompt || "(no prompt)"}`;
    div.appendChild(label);
    canvas.appendChild(div);
  });
  if (selected >= 0) {
    const [x0, y0, x1, y1] = boxOf(spec.layers[selected]);
    for (const corner of CORNERS) {
      const h = document.createElement("div");
      h.className = `dl-handle dl-${corner}`;
      h.dataset.corner = corner;
      h.style.left = `${(corner.endsWith("w") ? x0 : x1) * scale}px`;
      h.style.top = `${(corner.startsWith("n") ? y0 : y1) * scale}px`;
      canvas.appendChild(h);
    }
  }
  const shown = scale >= 1 ? `${scale}×` : `${Math.round(scale * 100)}%`;
  root.querySelector(".dl-status").textContent =
    `${size.width} × ${size.height} px, shown at ${shown}; grid ${step} px; ${spec.layers.length} of ${props.max_layers} layers (0 is the bottom)`;
  if (outside.length) problems.unshift(`layer ${outside.join(", ")} reaches outside the ${size.width}×${size.height} canvas`);
  showError(problems.join("; "));
  drawPanel();
}

function drawPanel() {
  const layer = spec.layers[selected];
  panel.disabled = !layer;
  root.querySelector("[data-act=add]").disabled = spec.layers.length >= props.max_layers;
  for (const act of ["down", "up", "delete", "no-image"]) root.querySelector(`[data-act=${act}]`).disabled = !layer;
  root.querySelector(".dl-file").disabled = !layer;
  const box = layer ? boxOf(layer) : ["", "", "", ""];
  const values = {prompt: layer?.prompt ?? "", strength: layer?.strength ?? (layer ? 0.25 : ""),
                  x0: box[0], y0: box[1], x1: box[2], y1: box[3]};
  for (const [name, v] of Object.entries(values)) {
    const input = field(name);
    if (document.activeElement !== input) input.value = v; // never under the user's cursor
  }
  root.querySelector(".dl-image-name").textContent = layer && layer.image ? `image: ${layer.image}` : "";
  panel.querySelector("legend").textContent = layer ? `Layer ${selected}` : "Selected layer (none)";
}

// --- editing -----------------------------------------------------------------------------------------

function addLayer() {
  const n = spec.layers.length;
  const w = Math.max(1, Math.round(size.width / 2)), h = Math.max(1, Math.round(size.height / 2));
  const x0 = Math.round(((n % 4) * size.width) / 8), y0 = Math.round(((n % 4) * size.height) / 8);
  spec.layers.push({prompt: "", box: [x0, y0, x0 + w, y0 + h], strength: 0.25});
  selected = n;
  commit();
  field("prompt").focus();
}

function act(name) {
  const k = selected;
  if (name === "add") return addLayer();
  if (k < 0) return;
  if (name === "delete") {
    spec.layers.splice(k, 1);
    selected = Math.min(k, spec.layers.length - 1);
  } else if (name === "up" || name === "down") {
    const j = name === "up" ? k + 1 : k - 1;
    if (j < 0 || j >= spec.layers.length) return;
    [spec.layers[k], spec.layers[j]] = [spec.layers[j], spec.layers[k]];
    selected = j;
  } else if (name === "no-image") {
    delete spec.layers[k].image;
  }
  commit();
}

function uniqueName(name) {
  let candidate = name, n = 1;
  while (candidate in uploads) {
    n += 1;
    candidate = name.replace(/(\.[^.]*)?$/, (ext) => `-${n}${ext}`);
  }
  return candidate;
}

function uploadImage(file) {
  const layer = spec.layers[selected];
  if (!file || !layer) return;
  const reader = new FileReader();
  reader.onload = () => {
    const name = uniqueName(file.name || "image.png");
    uploads[name] = String(reader.result).split(",")[1];
    const img = new Image();
    img.onload = () => {
      // the image fills its box: fit the box to the image's proportions, inside the box it had
      const [x0, y0, x1, y1] = boxOf(layer);
      const k = Math.min((x1 - x0) / img.naturalWidth, (y1 - y0) / img.naturalHeight);
      layer.box = [x0, y0, x0 + Math.max(1, Math.round(img.naturalWidth * k)), y0 + Math.max(1, Math.round(img.naturalHeight * k))];
      layer.image = name;
      saveUploads();
      commit();
    };
    img.onerror = () => showError(`${file.name}: not an image the browser can read`);
    img.src = reader.result;
  };
  reader.readAsDataURL(file);
}

function fromPanel(input) {
  const layer = spec.layers[selected];
  if (!layer) return;
  if (input.name === "prompt") {
    layer.prompt = input.value;
  } else if (input.name === "strength") {
    if (input.value === "" || Number.isNaN(Number(input.value))) return;
    layer.strength = Number(input.value);
  } else {
    const v = parseInt(input.value, 10);
    if (Number.isNaN(v)) return;
    const box = boxOf(layer);
    box[["x0", "y0", "x1", "y1"].indexOf(input.name)] = v;
    layer.box = box;
  }
  commit();
}

function pointerAt(e) {
  return [e.clientX, e.clientY];
}

function onDown(e) {
  if (e.button !== 0) return;
  const handle = e.target.closest(".dl-handle"), layerDiv = e.target.closest(".dl-layer");
  if (!handle && !layerDiv) {
    selected = -1;
    draw();
    return;
  }
  if (!handle) selected = Number(layerDiv.dataset.k);
  drag = {k: selected, corner: handle ? handle.dataset.corner : null, box: boxOf(spec.layers[selected]), from: pointerAt(e)};
  canvas.setPointerCapture(e.pointerId);
  canvas.focus();
  e.preventDefault();
  draw();
}

function onMove(e) {
  if (!drag) return;
  const [px, py] = pointerAt(e);
  const dx = Math.round((px - drag.from[0]) / scale), dy = Math.round((py - drag.from[1]) / scale);
  let [x0, y0, x1, y1] = drag.box;
  if (drag.corner === null) { // move, inside the canvas
    const w = x1 - x0, h = y1 - y0;
    x0 = clamp(x0 + dx, 0, Math.max(0, size.width - w));
    y0 = clamp(y0 + dy, 0, Math.max(0, size.height - h));
    [x1, y1] = [x0 + w, y0 + h];
  } else { // the corner follows the pointer; the box keeps at least one pixel
    if (drag.corner.endsWith("w")) x0 = clamp(x0 + dx, 0, x1 - 1); else x1 = clamp(x1 + dx, x0 + 1, size.width);
    if (drag.corner.startsWith("n")) y0 = clamp(y0 + dy, 0, y1 - 1); else y1 = clamp(y1 + dy, y0 + 1, size.height);
  }
  spec.layers[drag.k].box = [x0, y0, x1, y1];
  draw();
}

function onUp() {
  if (!drag) return;
  drag = null;
  commit();
}

function onKey(e) {
  const layer = spec.layers[selected];
  if (!layer) return;
  if (e.key === "Delete" || e.key === "Backspace") {
    act("delete");
    e.preventDefault();
    return;
  }
  const d = {ArrowLeft: [-1, 0], ArrowRight: [1, 0], ArrowUp: [0, -1], ArrowDown: [0, 1]}[e.key];
  if (!d) return;
  const step = e.shiftKey ? 8 : 1;
  const [x0, y0, x1, y1] = boxOf(layer);
  const dx = clamp(d[0] * step, -x0, size.width - x1), dy = clamp(d[1] * step, -y0, size.height - y1);
  layer.box = [x0 + dx, y0 + dy, x1 + dx, y1 + dy];
  e.preventDefault();
  commit();
}

root.querySelector(".dl-toolbar").addEventListener("click", (e) => {
  const button = e.target.closest("button[data-act]");
  if (button) act(button.dataset.act);
});
root.querySelector(".dl-file").addEventListener("change", (e) => {
  uploadImage(e.target.files[0]);
  e.target.value = "";
});
panel.addEventListener("input", (e) => fromPanel(e.target));
canvas.addEventListener("pointerdown", onDown);
canvas.addEventListener("pointermove", onMove);
canvas.addEventListener("pointerup", onUp);
canvas.addEventListener("pointercancel", onUp);
canvas.addEventListener("keydown", onKey);

watch("value", () => {
  loadValue();
  draw();
});

// The textbox: typed edits redraw at once; a value Gradio sets (a page reload) is noticed by the poll.
document.addEventListener("input", (e) => {
  if (e.target === textarea()) read();
}, true);
setInterval(read, 500);

loadValue();
read();
draw();
