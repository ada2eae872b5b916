// graphflow dashboard: plain browser JavaScript over the service's REST API, no build step and no CDN.
"use strict";

const $ = (id) => document.getElementById(id);
const sleep = (ms) => new Promise((done) => setTimeout(done, ms));
const TOKEN_KEY = "graphflow.token";
const POLL_MS = 1000;

// --- API: JSON over fetch, with the service token asked once when a change is refused -----------------------------
class ApiError extends Error {
  constructor(status, message) { super(message); this.status = status; }
}

async function api(method, path, body) {
  for (let attempt = 0; ; attempt++) {
    const headers = {};
    const token = localStorage.getItem(TOKEN_KEY);
    if (token) headers["Authorization"] = `Bearer ${token}`;
    if (body !== undefined) headers["Content-Type"] = "application/json";
    const response = await fetch(path, {method, headers, body: body === undefined ? undefined : JSON.stringify(body)});
    if (response.status === 401 && attempt === 0) {
      await askToken();
      continue;
    }
    if (response.status === 204) return null;
    const data = await response.json().catch(() => ({error: `${response.status} ${response.statusText}`}));
    if (!response.ok) throw new ApiError(response.status, data.error || `${response.status} ${response.statusText}`);
    return data;
  }
}

function askToken() {
  const dialog = $("token-dialog");
  $("token-input").value = "";
  return new Promise((done) => {
    dialog.addEventListener("close", () => {
      const value = $("token-input").value.trim();
      if (value) localStorage.setItem(TOKEN_KEY, value);
      done();
    }, {once: true});
    dialog.showModal();
  });
}

function text(tag, content, className) {
  const node = document.createElement(tag);
  if (content !== undefined) node.textContent = content;
  if (className) node.className = className;
  return node;
}

function ms(value) { return value === null || value === undefined ? "–" : `${Math.round(value)} ms`; }

// --- live pictures ------------------------------------------------------------------------------------------------
// Grid tiles poll snapshots (each answer waits for the next picture): browsers allow ~6 connections per host, so a
// grid of MJPEG streams would starve the API calls. The large view holds one MJPEG connection.
class SnapshotLoop {
  constructor(stream, img) { this.stream = stream; this.img = img; this.alive = true; this.run(); }

  async run() {
    let after = 0;
    while (this.alive) {
      try {
        const response = await fetch(`/streams/${encodeURIComponent(this.stream)}/preview.jpg?after=${after}`,
                                     {cache: "no-store"});
        if (response.status === 200) {
          after = Number(response.headers.get("X-Preview")) || after;
          const url = URL.createObjectURL(await response.blob());
          const old = this.img.src;
          this.img.src = url;
          if (old.startsWith("blob:")) URL.revokeObjectURL(old);
          this.img.dataset.preview = String(after);
        } else {
          await sleep(response.status === 404 ? 3000 : 500);
        }
      } catch (err) {
        await sleep(1000);
      }
    }
  }

  stop() { this.alive = false; }
}

// --- the grid of streams ------------------------------------------------------------------------------------------
const tiles = new Map();  // stream id -> {node, loop}

function makeTile(stream) {
  const node = text("div", undefined, "tile");
  node.dataset.stream = stream.id;
  const frame = text("div", undefined, "frame");
  const img = text("img");
  img.alt = `live view of ${stream.id}`;
  frame.append(img);
  const caption = text("div", undefined, "caption");
  const name = text("span", stream.id, "name");
  const state = text("span", "", "state");
  const figures = text("span", "", "figures");
  const remove = text("button", "×", "remove danger");
  remove.title = `remove ${stream.id}`;
  remove.addEventListener("click", (event) => { event.stopPropagation(); removeStream(stream.id); });
  caption.append(name, state, figures, remove);
  node.append(frame, caption);
  node.addEventListener("click", () => { location.hash = `#/stream/${encodeURIComponent(stream.id)}`; });
  return {node, img, state, figures, loop: null};
}

function describe(stream) {
  const lat = stream.latency_ms || {};
  const task = stream.task ? `${stream.task} · ` : "";
  return `${task}${(stream.fps || 0).toFixed(1)} fps · p50 ${ms(lat.p50)} · p95 ${ms(lat.p95)} · ${stream.frames} frames`;
}

function renderGrid(streams) {
  const grid = $("grid");
  const seen = new Set();
  for (const stream of streams) {
    seen.add(stream.id);
    let tile = tiles.get(stream.id);
    if (!tile) {
      tile = makeTile(stream);
      tiles.set(stream.id, tile);
      grid.append(tile.node);
    }
    tile.state.textContent = stream.state;
    tile.state.className = `state ${stream.state}`;
    tile.state.title = stream.error || "";
    tile.figures.textContent = describe(stream);
  }
  for (const [id, tile] of tiles) {
    if (!seen.has(id)) {
      if (tile.loop) tile.loop.stop();
      tile.node.remove();
      tiles.delete(id);
    }
  }
  $("empty").hidden = streams.length > 0;
  setGridLive(currentView() === "streams");
}

function setGridLive(on) {
  for (const [id, tile] of tiles) {
    if (on && !tile.loop) tile.loop = new SnapshotLoop(id, tile.img);
    if (!on && tile.loop) { tile.loop.stop(); tile.loop = null; }
  }
}

async function refreshStreams() {
  try {
    const streams = await api("GET", "/streams");
    renderGrid(streams);
    $("status").textContent = `${streams.length} stream${streams.length === 1 ? "" : "s"}`;
    if (detail) detail.update(streams.find((s) => s.id === detail.stream));
  } catch (err) {
    $("status").textContent = `service unreachable (${err.message})`;
  }
}

async function addStream(event) {
  event.preventDefault();
  $("add-error").textContent = "";
  const spec = {id: $("add-id").value.trim(), uri: $("add-uri").value.trim()};
  if (!$("add-task-label").hidden && $("add-task").value) spec.task = $("add-task").value;
  const fps = parseFloat($("add-fps").value);
  if (!Number.isNaN(fps)) spec.fps = fps;
  if ($("add-loop").checked) spec.loop = true;
  if ($("add-realtime").checked) spec.realtime = true;
  try {
    await api("POST", "/streams", spec);
    $("add-form").reset();
    await refreshStreams();
  } catch (err) {
    $("add-error").textContent = err.message;
  }
}

async function removeStream(id) {
  const tile = tiles.get(id);
  if (tile && tile.loop) { tile.loop.stop(); tile.loop = null; }
  try {
    await api("DELETE", `/streams/${encodeURIComponent(id)}`);
  } catch (err) {
    if (err.status !== 404) { $("add-error").textContent = err.message; return; }
  }
  if (detail && detail.stream === id) location.hash = "#/";
  await refreshStreams();
}

// --- geometry of the rules editor: rules are saved normalised (0..1 of the frame), drawn in canvas pixels ----------
function toUnit(points, size) {
  // normalised geometry has every value ≤ 1 (graphflow.vision.rules); pixel geometry is divided by the frame size
  const flat = points.flat();
  if (flat.every((v) => v <= 1)) return points;
  if (!size) return null;
  return points.map(([x, y]) => [x / size.width, y / size.height]);
}

function sideNormal(p1, p2) {
  // unit normal pointing to side A: left of p1 -> p2 as the image is shown (y grows downwards)
  const dx = p2[0] - p1[0], dy = p2[1] - p1[1];
  const length = Math.hypot(dx, dy) || 1;
  return [dy / length, -dx / length];
}

function round4(v) { return Math.round(Math.min(Math.max(v, 0), 1) * 10000) / 10000; }

// --- the large view of one stream ---------------------------------------------------------------------------------
class StreamView {
  constructor(stream) {
    this.stream = stream;
    this.base = `/streams/${encodeURIComponent(stream)}`;
    this.rules = [];
    this.saved = new Set();  // the rules the service applies, as JSON: the video already shows them
    this.drawing = null;  // {kind, points}
    this.size = null;  // frame size in pixels, from preview.json
    this.figures = [];
    this.alive = true;
    $("s-title").textContent = stream;
    $("s-stats").textContent = "";
    $("s-events").replaceChildren();
    $("s-counters").replaceChildren();
    $("r-error").textContent = "";
    $("r-saved").textContent = "";
    this.setDrawing(null);
    $("s-live").src = `${this.base}/preview.mjpg`;
    $("s-live").onload = () => this.paint();
    this.resize = new ResizeObserver(() => this.paint());
    this.resize.observe($("stage"));
    this.loadRules();
    this.loadEvents();
    this.live = new EventSource(`/events/live?stream=${encodeURIComponent(stream)}`);
    this.live.onmessage = (message) => this.addEvent(JSON.parse(message.data), true);
    this.pollFigures();
  }

  close() {
    this.alive = false;
    this.live.close();
    this.resize.disconnect();
    $("s-live").removeAttribute("src");
  }

  update(stream) {
    if (!stream) { $("s-stats").textContent = "removed"; return; }
    $("s-stats").textContent = `${stream.state} · ${describe(stream)} · ${stream.drops} drops`;
  }

  async loadRules() {
    try {
      this.rules = await api("GET", `${this.base}/rules`);
      this.saved = new Set(this.rules.map((r) => JSON.stringify(r)));
      this.renderRules();
    } catch (err) {
      $("r-error").textContent = err.message;
    }
  }

  async saveRules() {
    $("r-error").textContent = "";
    $("r-saved").textContent = "";
    try {
      this.rules = await api("PUT", `${this.base}/rules`, this.rules);
      this.saved = new Set(this.rules.map((r) => JSON.stringify(r)));
      this.renderRules();
      $("r-saved").textContent = "saved, applied live";
    } catch (err) {
      $("r-error").textContent = err.message;
    }
  }

  renderRules() {
    const list = $("r-list");
    list.replaceChildren();
    this.rules.forEach((rule, index) => {
      const item = text("li");
      const what = rule.kind === "line_cross" ? `line ${rule.direction || "both"}` : rule.kind;
      const draft = this.saved.has(JSON.stringify(rule)) ? "" : " (not saved)";
      item.append(text("span", `${rule.id || `${rule.kind}${index}`} · ${what}${draft}`));
      const drop = text("button", "delete", "danger");
      drop.addEventListener("click", () => { this.rules.splice(index, 1); this.renderRules(); });
      item.append(drop);
      list.append(item);
    });
    if (!this.rules.length) list.append(text("li", "no rules", "muted"));
    this.paint();
  }

  setDrawing(kind) {
    this.drawing = kind ? {kind, points: []} : null;
    $("stage").classList.toggle("drawing", Boolean(kind));
    $("r-cancel").hidden = !kind;
    $("r-finish").hidden = kind !== "zone";
    $("r-draw").disabled = Boolean(kind);
    $("r-hint").textContent = !kind ? "" : kind === "zone"
      ? "click the zone's corners on the picture, then Close zone"
      : "click the line's two ends; side A is on the left walking from the first to the second";
    this.paint();
  }

  click(event) {
    if (!this.drawing) return;
    const box = $("s-canvas").getBoundingClientRect();
    const point = [round4((event.clientX - box.left) / box.width), round4((event.clientY - box.top) / box.height)];
    this.drawing.points.push(point);
    if (this.drawing.kind === "line_cross" && this.drawing.points.length === 2) this.finish();
    else this.paint();
  }

  finish() {
    const {kind, points} = this.drawing;
    if (kind === "zone" && points.length < 3) { $("r-error").textContent = "a zone needs at least 3 corners"; return; }
    const used = new Set(this.rules.map((r) => r.id));
    let id = $("r-id").value.trim();  // a rule's own id draws it again, in its place; none: a fresh id
    const prefix = kind === "zone" ? "zone" : "line";
    for (let n = this.rules.length + 1; !id; n++) if (!used.has(`${prefix}${n}`)) id = `${prefix}${n}`;
    const rule = kind === "zone" ? {id, kind, polygon: points}
      : {id, kind, line: points, direction: $("r-direction").value};
    const at = this.rules.findIndex((r) => r.id === id);
    if (at >= 0) this.rules[at] = rule; else this.rules.push(rule);
    $("r-id").value = "";
    $("r-error").textContent = "";
    this.setDrawing(null);
    this.renderRules();
  }

  async pollFigures() {
    while (this.alive) {
      try {
        const info = await api("GET", `${this.base}/preview.json`);
        if (info.width && info.height) this.size = {width: info.width, height: info.height};
        this.figures = info.rules || [];
        this.renderCounters();
        this.showPictures(new Set((info.pictures || []).map(String)));
      } catch (err) {
        if (err.status === 404) return;
      }
      await sleep(POLL_MS);
    }
  }

  showPictures(frames) {
    for (const thumb of $("s-events").querySelectorAll("img[hidden]")) {
      if (frames.has(thumb.dataset.frame)) {
        thumb.src = `${this.base}/events/${thumb.dataset.frame}.jpg`;
        thumb.hidden = false;
      }
    }
  }

  renderCounters() {
    const table = $("s-counters");
    table.replaceChildren();
    for (const rule of this.figures) {
      const row = text("tr");
      row.dataset.rule = rule.id;
      row.append(text("td", rule.id));
      if (rule.counts) {
        row.append(text("td", "A→B"), text("td", String(rule.counts["A->B"] || 0), "n"),
                   text("td", "B→A"), text("td", String(rule.counts["B->A"] || 0), "n"));
      } else if (rule.inside !== undefined) {
        row.append(text("td", "inside"), text("td", String(rule.inside), "n"));
      } else {
        row.append(text("td", rule.kind));
      }
      table.append(row);
    }
    if (!this.figures.length) table.append(text("tr", "no live figures (no rules, or no frame yet)", "muted"));
  }

  async loadEvents() {
    try {
      const rows = await api("GET", `/events?stream=${encodeURIComponent(this.stream)}&limit=30`);
      for (const row of rows.reverse()) this.addEvent(row, false);
    } catch (err) {
      $("r-error").textContent = err.message;
    }
  }

  addEvent(row, live) {
    const ev = row.event || {};
    const item = text("li");
    item.className = live ? "live" : "";
    if (ev.frame !== undefined && ev.frame !== null) {
      // a picture exists only for frames rendered while someone watched: shown once preview.json lists it
      const thumb = text("img");
      thumb.alt = `frame ${ev.frame}`;
      thumb.hidden = true;
      thumb.dataset.frame = String(ev.frame);
      item.append(thumb);
    }
    const parts = [ev.event || row.kind, ev.rule];
    if (ev.direction) parts.push(ev.direction);
    if (ev.track_id !== null && ev.track_id !== undefined) parts.push(`#${ev.track_id} ${ev.label || ""}`);
    const body = text("div");
    body.append(text("div", parts.filter(Boolean).join(" · ")));
    const when = row.ts ? new Date(row.ts * 1000).toLocaleTimeString() : new Date().toLocaleTimeString();
    body.append(text("div", `${when} · frame ${ev.frame ?? "–"}`, "when"));
    item.append(body);
    const list = $("s-events");
    list.prepend(item);
    while (list.children.length > 50) list.lastChild.remove();
  }

  paint() {
    const canvas = $("s-canvas");
    const box = canvas.getBoundingClientRect();
    canvas.width = Math.round(box.width);
    canvas.height = Math.round(box.height);
    const ctx = canvas.getContext("2d");
    ctx.clearRect(0, 0, canvas.width, canvas.height);
    const px = ([x, y]) => [x * canvas.width, y * canvas.height];
    ctx.lineWidth = 2;
    ctx.font = "bold 13px sans-serif";
    for (const rule of this.rules) {  // drafts only: the annotated video draws the applied rules
      if (this.saved.has(JSON.stringify(rule))) continue;
      const points = toUnit(rule.line || rule.polygon || [], this.size);
      if (!points || !points.length) continue;
      this.shape(ctx, points.map(px), Boolean(rule.polygon), "rgba(61,139,253,0.9)", rule.direction);
    }
    if (this.drawing && this.drawing.points.length) {
      this.shape(ctx, this.drawing.points.map(px), false, "rgba(255,80,80,0.95)",
                 this.drawing.kind === "line_cross" ? $("r-direction").value : undefined);
    }
  }

  shape(ctx, points, closed, color, direction) {
    ctx.strokeStyle = color;
    ctx.fillStyle = color;
    ctx.beginPath();
    points.forEach(([x, y], i) => (i ? ctx.lineTo(x, y) : ctx.moveTo(x, y)));
    if (closed) ctx.closePath();
    ctx.stroke();
    for (const [x, y] of points) ctx.fillRect(x - 3, y - 3, 6, 6);
    if (direction !== undefined && points.length === 2) {
      const [p1, p2] = points;
      const [nx, ny] = sideNormal(p1, p2);
      const mx = (p1[0] + p2[0]) / 2, my = (p1[1] + p2[1]) / 2;
      ctx.fillText("A", mx + nx * 18 - 4, my + ny * 18 + 4);
      ctx.fillText("B", mx - nx * 18 - 4, my - ny * 18 + 4);
      const arrows = direction === "both" ? [1, -1] : direction === "A->B" ? [1] : [-1];
      for (const sign of arrows) {  // from the side crossings come from to the side they go to
        const fx = mx + nx * 12 * sign, fy = my + ny * 12 * sign, tx = mx - nx * 12 * sign, ty = my - ny * 12 * sign;
        ctx.beginPath();
        ctx.moveTo(fx, fy);
        ctx.lineTo(tx, ty);
        ctx.lineTo(tx + (nx * sign - ny) * 5, ty + (ny * sign + nx) * 5);
        ctx.moveTo(tx, ty);
        ctx.lineTo(tx + (nx * sign + ny) * 5, ty + (ny * sign - nx) * 5);
        ctx.stroke();
      }
    }
  }
}

// --- the graph page -----------------------------------------------------------------------------------------------
const ENGINE_COLUMNS = ["state", "received", "sent", "dropped", "errors", "busy_s", "depth"];

async function refreshGraph() {
  try {
    const graph = await api("GET", "/graph");
    $("g-title").textContent = `Graph ${graph.name}`;
    const table = engineTable(graph.engines, graph.shared || {});
    table.id = "g-engines";
    $("g-engines").replaceWith(table);
    $("g-edges").replaceChildren(...graph.connections.map((e) => text("li", `${e.from} → ${e.to} (${e.policy})`)));
  } catch (err) {
    $("g-title").textContent = `Graph: ${err.message}`;
  }
}

// --- the tasks page: each task's graph drawn, its engines' live counters and its streams --------------------------
let taskIds = null;  // null: this service runs one graph (no /tasks)

async function loadTasks() {
  const tasks = await api("GET", "/tasks");
  if (!tasks.length) { taskIds = null; return null; }  // a service of one graph (the cluster front) has no tasks
  const ids = tasks.map((t) => t.id);
  if (!taskIds || ids.join() !== taskIds.join()) {  // the camera form's task picker follows the tasks
    const picker = $("add-task");
    picker.replaceChildren(...tasks.map((t) => {
      const option = text("option", t.default ? `${t.id} (default)` : t.id);
      option.value = t.id;
      option.selected = t.default;
      return option;
    }));
    taskIds = ids;
  }
  $("add-task-label").hidden = false;
  $("nav-tasks").hidden = false;
  return tasks;
}

function engineTable(engines, shared) {
  const table = text("table", null, "table");
  const head = text("tr");
  for (const name of ["engine", "type", "placement", ...ENGINE_COLUMNS]) head.append(text("th", name));
  const rows = [head];
  for (const [id, engine] of Object.entries(engines)) {
    const row = text("tr");
    row.dataset.engine = id;
    const type = shared[id] ? `${engine.type} (shared by ${shared[id]} tasks)` : engine.type;
    row.append(text("td", id), text("td", type), text("td", engine.placement));
    for (const name of ENGINE_COLUMNS) {
      const value = (engine.stats || {})[name];
      const shown = value === null || value === undefined ? "–"
        : typeof value === "number" && !Number.isInteger(value) ? value.toFixed(2) : String(value);
      row.append(text("td", shown, typeof value === "number" ? "n" : ""));
    }
    rows.push(row);
  }
  table.replaceChildren(...rows);
  return table;
}

const taskCards = new Map();  // task id → its card (the picture is loaded once per card, counters each refresh)

async function refreshTasks() {
  try {
    const tasks = await loadTasks();
    if (tasks === null) return;
    const list = $("t-list");
    const seen = new Set();
    for (const summary of tasks) {
      seen.add(summary.id);
      const task = await api("GET", `/tasks/${encodeURIComponent(summary.id)}`);
      let card = taskCards.get(task.id);
      if (!card) {
        card = {node: text("article", null, "task"), title: text("h3"), picture: document.createElement("img"),
                engines: text("div"), streams: text("p", null, "muted")};
        card.node.dataset.task = task.id;
        card.picture.alt = `the graph of task ${task.id}`;
        card.picture.src = `/tasks/${encodeURIComponent(task.id)}/graph.png?t=${Date.now()}`;
        card.node.append(card.title, card.picture, card.engines, card.streams);
        taskCards.set(task.id, card);
        list.append(card.node);
      }
      card.title.textContent = `${task.id}${task.default ? " (default)" : ""} — ${task.name}${task.ready ? "" : " (starting)"}`;
      card.engines.replaceChildren(engineTable(task.engines, task.shared || {}));
      card.streams.textContent = task.streams.length ? `streams: ${task.streams.join(", ")}` : "no streams";
    }
    for (const [id, card] of taskCards) {
      if (!seen.has(id)) { card.node.remove(); taskCards.delete(id); }
    }
  } catch (err) {
    $("status").textContent = `tasks: ${err.message}`;
  }
}

// --- views and wiring ---------------------------------------------------------------------------------------------
let detail = null;

function currentView() {
  const hash = location.hash || "#/";
  if (hash.startsWith("#/stream/")) return "stream";
  if (hash === "#/graph") return "graph";
  if (hash === "#/tasks") return "tasks";
  return "streams";
}

function route() {
  const view = currentView();
  $("view-streams").hidden = view !== "streams";
  $("view-stream").hidden = view !== "stream";
  $("view-graph").hidden = view !== "graph";
  $("view-tasks").hidden = view !== "tasks";
  $("nav-streams").classList.toggle("active", view === "streams" || view === "stream");
  $("nav-graph").classList.toggle("active", view === "graph");
  $("nav-tasks").classList.toggle("active", view === "tasks");
  if (view === "tasks") refreshTasks();
  if (detail) { detail.close(); detail = null; }
  setGridLive(view === "streams");
  if (view === "stream") {
    detail = new StreamView(decodeURIComponent(location.hash.slice("#/stream/".length)));
    refreshStreams();
  }
  if (view === "graph") {
    $("g-picture").src = `/graph.png?t=${Date.now()}`;
    refreshGraph();
  }
}

async function tick() {
  for (;;) {
    await sleep(POLL_MS);
    if (currentView() === "graph") await refreshGraph();
    else if (currentView() === "tasks") await refreshTasks();
    else await refreshStreams();
  }
}

$("add-form").addEventListener("submit", addStream);
$("s-remove").addEventListener("click", () => detail && removeStream(detail.stream));
$("s-canvas").addEventListener("click", (event) => detail && detail.click(event));
$("r-draw").addEventListener("click", () => detail && detail.setDrawing($("r-kind").value));
$("r-finish").addEventListener("click", () => detail && detail.drawing && detail.finish());
$("r-cancel").addEventListener("click", () => detail && detail.setDrawing(null));
$("r-direction").addEventListener("change", () => detail && detail.paint());
$("r-save").addEventListener("click", () => detail && detail.saveRules());
window.addEventListener("hashchange", route);
route();
loadTasks().catch(() => {});
refreshStreams();
tick();
