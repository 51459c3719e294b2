"""The simulator's web page: slides, their thumbnails, and the app's results drawn over them.

Every result of the app on a slide is drawn (a region app has one per region, each
listed with its own Cancel); for a taggedPolygon / multiArea app, dragging on a
thumbnail selects the rectangle "Analyse" sends as the region.

One self-contained HTML document (no build step, no external resources: the machines
have no internet).  ``?slide=ID`` shows one slide only.  The server embeds the current state as JSON so the first paint
already shows every overlay; the script then polls ``/ui/state`` every second and
redraws.  Shapes arrive pre-parsed (:func:`.overlay.shapes_of`) in width-normalised
coordinates; the SVG over each thumbnail uses the thumbnail's width as the one scale.
Everything from the app is inserted with DOM APIs (``textContent``/``setAttribute``),
never as markup.
"""

from __future__ import annotations

import json
from typing import Any

#: The outline colour of each slide's drawing area (tests find the frame by it).
FRAME_COLOUR = "#3366CC"

PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>dpatia SPS simulator</title>
<style>
  body { font-family: sans-serif; margin: 16px; background: #f4f4f4; color: #222; }
  header { display: flex; flex-wrap: wrap; gap: 12px; align-items: center; margin-bottom: 12px; }
  h1 { font-size: 20px; margin: 0 12px 0 0; }
  .muted { color: #666; font-size: 12px; }
  #slides { display: flex; flex-wrap: wrap; gap: 16px; }
  .card { background: #fff; border: 1px solid #ccc; border-radius: 6px; padding: 10px; width: 540px; }
  .card h2 { font-size: 15px; margin: 0 0 4px 0; }
  .view { position: relative; display: inline-block; outline: 3px solid __FRAME__; margin: 6px 0; }
  .view img { display: block; }
  .view svg { position: absolute; left: 0; top: 0; }
  .status { font-weight: bold; margin: 4px 0; min-height: 1.2em; }
  table.props { border-collapse: collapse; font-size: 12px; }
  table.props td { border-top: 1px solid #eee; padding: 1px 8px 1px 0; }
  button { margin-right: 6px; }
  #log { font-family: monospace; font-size: 12px; white-space: pre-wrap; background: #fff;
         border: 1px solid #ccc; padding: 6px; max-height: 220px; overflow: auto; margin-top: 16px; }
  .label-img { float: right; height: 60px; border: 1px solid #ddd; }
</style>
</head>
<body>
<header>
  <h1>dpatia SPS simulator</h1>
  <input id="app-url" size="42" placeholder="http://127.0.0.1:5006/dpatia">
  <button id="register">Register app</button>
  <span id="app" class="muted"></span>
</header>
<div class="muted" id="sps"></div>
<div id="slides"></div>
<div id="log"></div>
<script id="initial" type="application/json">__STATE__</script>
<script>
"use strict";
const SVGNS = "http://www.w3.org/2000/svg";
const cards = new Map();
// ?slide=ID shows that slide alone (a bigger focus view, and a stable layout for tests).
const ONLY = new URLSearchParams(location.search).get("slide");
const REGION_TYPES = new Set(["taggedPolygon", "multiArea"]);
let appType = "wholeSlide";

function el(tag, attrs, text) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, v);
  if (text !== undefined) node.textContent = text;
  return node;
}

async function post(path, body) {
  const response = await fetch(path, {method: "POST", headers: {"Content-Type": "application/json"},
                                      body: JSON.stringify(body || {})});
  let answer = null;
  try { answer = await response.json(); } catch (e) { answer = null; }
  if (!response.ok) alert((answer && answer.error) || ("HTTP " + response.status));
  refresh();
  return answer;
}

function makeCard(slide) {
  const card = el("div", {class: "card", id: "slide-" + slide.id});
  if (slide.label) card.appendChild(el("img", {class: "label-img", src: slide.label, alt: "label"}));
  card.appendChild(el("h2", {}, slide.id));
  card.appendChild(el("div", {class: "muted"}, slide.summary));
  const view = el("div", {class: "view"});
  const img = el("img", {src: slide.thumbnail.url, width: slide.thumbnail.width,
                         height: slide.thumbnail.height, alt: "thumbnail of " + slide.id});
  const svg = document.createElementNS(SVGNS, "svg");
  svg.setAttribute("width", slide.thumbnail.width);
  svg.setAttribute("height", slide.thumbnail.height);
  const drawn = document.createElementNS(SVGNS, "g");
  const selection = document.createElementNS(SVGNS, "g");
  svg.appendChild(drawn); svg.appendChild(selection);
  view.appendChild(img); view.appendChild(svg);
  card.appendChild(view);
  const status = el("div", {class: "status"});
  const props = el("table", {class: "props"});
  const buttons = el("div");
  const entry = {svg: drawn, selection, status, props, count: null, list: null, key: null, region: null};
  const base = "/ui/slides/" + encodeURIComponent(slide.id) + "/";
  for (const [action, text] of [["create", "Analyse"], ["notify", "Notify import"], ["cancel", "Cancel"]]) {
    const b = el("button", {"data-action": action}, text);
    // A region app analyses the rectangle dragged on the thumbnail (else the centre).
    b.addEventListener("click", () => post(base + action,
      action === "create" && REGION_TYPES.has(appType) && entry.region ? {region: entry.region} : {}));
    buttons.appendChild(b);
  }
  // Drag on the thumbnail to select a region (width-normalised, as the IA-API sends it).
  let start = null;
  const at = (event) => {
    const box = svg.getBoundingClientRect();
    return [(event.clientX - box.left) / slide.thumbnail.width, (event.clientY - box.top) / slide.thumbnail.width];
  };
  svg.addEventListener("mousedown", (event) => { start = at(event); event.preventDefault(); });
  svg.addEventListener("mousemove", (event) => { if (start) select(entry, start, at(event), slide.thumbnail.width); });
  svg.addEventListener("mouseup", (event) => {
    if (start) select(entry, start, at(event), slide.thumbnail.width, true);
    start = null;
  });
  const count = el("div", {class: "muted"});
  const list = el("div", {class: "results"});
  entry.count = count; entry.list = list;
  card.appendChild(status); card.appendChild(props); card.appendChild(buttons);
  card.appendChild(count); card.appendChild(list);
  document.getElementById("slides").appendChild(card);
  entry.cancel = (id) => post(base + "cancel", {resultId: id});
  entry.press = (id, action) => post(base + "press", {resultId: id, actionId: action});
  cards.set(slide.id, entry);
  return entry;
}

function select(entry, a, b, scale, done) {
  const [x0, x1] = [Math.min(a[0], b[0]), Math.max(a[0], b[0])];
  const [y0, y1] = [Math.min(a[1], b[1]), Math.max(a[1], b[1])];
  while (entry.selection.firstChild) entry.selection.removeChild(entry.selection.firstChild);
  if (x1 - x0 < 0.005 || y1 - y0 < 0.005) { if (done) entry.region = null; return; }
  const rect = document.createElementNS(SVGNS, "rect");
  rect.setAttribute("x", (x0 * scale).toFixed(1)); rect.setAttribute("y", (y0 * scale).toFixed(1));
  rect.setAttribute("width", ((x1 - x0) * scale).toFixed(1));
  rect.setAttribute("height", ((y1 - y0) * scale).toFixed(1));
  rect.setAttribute("stroke", "#FFFFFF"); rect.setAttribute("stroke-dasharray", "4 3");
  rect.setAttribute("fill", "none");
  entry.selection.appendChild(rect);
  if (done) entry.region = [x0, y0, x1, y1];
}

function drawShapes(svg, shapes, scale) {
  while (svg.firstChild) svg.removeChild(svg.firstChild);
  for (const s of shapes) {
    const pts = s.points.map(p => (p[0] * scale).toFixed(1) + "," + (p[1] * scale).toFixed(1)).join(" ");
    if (s.kind === "polygon" || s.kind === "patch") {
      const node = document.createElementNS(SVGNS, "polygon");
      node.setAttribute("points", pts);
      node.setAttribute("stroke", s.stroke);
      node.setAttribute("stroke-width", s.width);
      node.setAttribute("fill", s.fill || "none");
      if (s.fill) node.setAttribute("fill-opacity", s.kind === "patch" ? "0.6" : "0.35");
      svg.appendChild(node);
    } else if (s.kind === "polyline") {
      const node = document.createElementNS(SVGNS, "polyline");
      node.setAttribute("points", pts);
      node.setAttribute("stroke", s.stroke);
      node.setAttribute("stroke-width", s.width);
      node.setAttribute("fill", "none");
      svg.appendChild(node);
    } else if (s.kind === "label") {
      const node = document.createElementNS(SVGNS, "text");
      node.setAttribute("x", (s.points[0][0] * scale).toFixed(1));
      node.setAttribute("y", (s.points[0][1] * scale + 14).toFixed(1));
      node.setAttribute("fill", s.stroke);
      node.setAttribute("font-size", "13");
      node.setAttribute("paint-order", "stroke");
      node.setAttribute("stroke", "#000");
      node.setAttribute("stroke-width", "3");
      node.textContent = s.text;
      svg.appendChild(node);
    }
  }
}

function render(state) {
  const f = state.sps.faults;
  const faults = [];
  if (f.latency) faults.push("latency " + f.latency + " s");
  if (f.errorRate) faults.push(Math.round(f.errorRate * 100) + " % 5xx");
  if (f.dropAfterBytes !== null) faults.push("downloads cut after " + f.dropAfterBytes + " bytes" +
                                             (f.dropCount !== null ? " (next " + f.dropCount + ")" : ""));
  if (f.tokenLifetime !== null) faults.push("tokens expire after " + f.tokenLifetime + " s");
  if (f.down) faults.push("DOWN (" + f.downMode + ")");
  document.getElementById("sps").textContent = "Callback base URL: " + state.sps.callbackUrl +
    " · faults: " + (faults.length ? faults.join(", ") : "none");
  const app = state.app;
  appType = app.inputType || "wholeSlide";
  document.getElementById("app").textContent = app.registration
    ? "registered: " + app.registration.applicationId + " at " + app.registration.url
    : (app.url ? "not registered yet (" + app.url + ")" : "no app registered");
  const input = document.getElementById("app-url");
  if (!input.value && app.url) input.value = app.url;
  for (const slide of state.slides) {
    if (ONLY && slide.id !== ONLY) continue;
    const card = cards.get(slide.id) || makeCard(slide);
    const latest = slide.latest;
    const results = slide.results || [];
    const key = results.map(r => r.id + "/" + r.versionId + "/" + r.cancellable + "/" + (r.actions || []).length).join(",") || "none";
    card.count.textContent = slide.resultCount + " result(s) stored for this slide" +
      (REGION_TYPES.has(appType) ? " · drag on the thumbnail to select a region" : "");
    if (card.key === key) continue;
    card.key = key;
    // Every result of the app is drawn, as the viewer shows them (one per region).
    drawShapes(card.svg, results.flatMap(r => r.shapes), slide.thumbnail.width);
    while (card.list.firstChild) card.list.removeChild(card.list.firstChild);
    if (results.length > 1 || results.some(r => (r.actions || []).length)) {
      for (const r of results) {
        const row = el("div", {class: "muted", "data-result": String(r.id)}, "#" + r.id + " " + r.displayResult + " ");
        if (r.cancellable) {
          const b = el("button", {"data-action": "cancel-result"}, "Cancel");
          b.addEventListener("click", () => card.cancel(r.id));
          row.appendChild(b);
        }
        // patchCollection buttons: a press is a modify with the action's state 1.
        for (const a of r.actions || []) {
          const b = el("button", {"data-action": "press", title: a.tooltip}, a.name);
          b.addEventListener("click", () => card.press(r.id, a.id));
          row.appendChild(b);
        }
        card.list.appendChild(row);
      }
    }
    card.status.textContent = latest ? latest.displayResult : "No result yet";
    while (card.props.firstChild) card.props.removeChild(card.props.firstChild);
    for (const [k, v] of Object.entries(latest ? latest.displayProperties : {})) {
      const row = el("tr");
      row.appendChild(el("td", {}, k)); row.appendChild(el("td", {}, String(v)));
      card.props.appendChild(row);
    }
  }
  document.getElementById("log").textContent = state.log.map(e =>
    new Date(e.time * 1000).toLocaleTimeString() + "  " + e.action + " " + (e.slideId || "") +
    " → " + (e.status === null ? "failed" : e.status) + "  " + e.summary).reverse().join("\\n");
}

async function refresh() {
  try {
    const response = await fetch("/ui/state", {cache: "no-store"});
    if (response.ok) render(await response.json());
  } catch (e) { /* the simulator may be restarting; try again on the next tick */ }
}

document.getElementById("register").addEventListener("click",
  () => post("/ui/register", {url: document.getElementById("app-url").value || null}));
render(JSON.parse(document.getElementById("initial").textContent));
setInterval(refresh, 1000);
</script>
</body>
</html>
"""


def render_page(state: dict[str, Any]) -> bytes:
    """The page with ``state`` embedded (``<`` escaped so no string can close the script)."""
    embedded = json.dumps(state).replace("<", "\\u003c").replace(">", "\\u003e")
    return PAGE.replace("__FRAME__", FRAME_COLOUR).replace("__STATE__", embedded).encode("utf-8")


__all__ = ["FRAME_COLOUR", "render_page"]
