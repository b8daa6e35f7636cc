// vitmerge playground: classify images with the served bundle and show what the router decided.
// Plain browser JavaScript, no build step, no external assets. Read-only: GET /v1/tasks, GET /v1/models,
// POST /v1/classify. URLs are relative, so the page also works behind a path prefix.
"use strict";

const $ = (id) => document.getElementById(id);
const state = { files: [], methods: {}, tasks: null };

/** An element with attributes and children (strings become text nodes: nothing is parsed as HTML). */
function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (key === "class") node.className = value;
    else if (key === "style") node.style.cssText = value;
    else node.setAttribute(key, value);
  }
  for (const child of children.flat()) {
    if (child !== null && child !== undefined) node.append(child instanceof Node ? child : String(child));
  }
  return node;
}

const pct = (p) => `${(100 * p).toFixed(1)}%`;
const ms = (v) => `${v.toFixed(1)} ms`;
const fixed = (v, digits) => (v === null || v === undefined ? "–" : v.toFixed(digits));
const percent = (v) => (v === null || v === undefined ? "–" : pct(v));

/** An API error: the server's JSON error body ({"error": {"code", "message"}}) with the HTTP status. */
class ApiError extends Error {
  constructor(status, code, message) {
    super(message);
    this.status = status;
    this.code = code;
  }
  toString() {
    return `${this.status}${this.code ? " " + this.code : ""}: ${this.message}`;
  }
}

function authHeaders() {
  const key = $("api-key").value.trim();
  return key ? { "X-API-Key": key } : {};
}

/** fetch + JSON; a non-2xx answer throws an ApiError carrying the API's own message. */
async function api(path, init = {}) {
  let response;
  try {
    response = await fetch(path, { ...init, headers: { ...authHeaders(), ...(init.headers || {}) } });
  } catch (err) {
    throw new ApiError(0, "network_error", `the server did not answer (${err.message})`);
  }
  let body = null;
  try {
    body = await response.json();
  } catch (err) {
    body = null;
  }
  if (!response.ok) {
    const error = body && body.error;
    const message = error && typeof error === "object" ? error.message : error;
    throw new ApiError(response.status, error && error.code, message || response.statusText || "request failed");
  }
  return body;
}

function showBanner(error) {
  const banner = $("banner");
  banner.hidden = !error;
  banner.textContent = error ? String(error) : "";
}

// -- bar charts ---------------------------------------------------------------------------------------

/** Rows of label | bar | value; `chosen` (a label) is highlighted. */
function barChart(rows, chosen, cls) {
  return el(
    "div",
    { class: `bars ${cls}` },
    rows.map(([label, p]) =>
      el(
        "div",
        { class: `bar-row${label === chosen ? " chosen" : ""}`, "data-label": label, "data-p": p },
        el("span", { class: "bar-label", title: label }, label),
        el("span", { class: "bar-track" }, el("span", { class: "bar-fill", style: `width:${pct(p)}` })),
        el("span", { class: "bar-value" }, pct(p)),
      ),
    ),
  );
}

/** The timing split the API returns: decode, queue, inference and the rest of total_ms, as one stacked bar. */
function timingView(timing) {
  const other = Math.max(0, timing.total_ms - timing.decode_ms - timing.queue_ms - timing.inference_ms);
  const parts = [
    ["decode", timing.decode_ms],
    ["queue", timing.queue_ms],
    ["inference", timing.inference_ms],
    ["other", other],
  ];
  const total = Math.max(timing.total_ms, 1e-9);
  return el(
    "div",
    { class: "timing" },
    el("div", {}, `total ${ms(timing.total_ms)} · batch sizes ${timing.batch_sizes.join(", ")}`),
    el(
      "div",
      { class: "timing-bar" },
      parts.map(([name, v]) => el("span", { class: `t-${name}`, style: `width:${(100 * v) / total}%` })),
    ),
    el(
      "div",
      { class: "legend" },
      parts.map(([name, v]) => el("span", { class: `timing-${name}` }, el("i", { class: `t-${name}` }), `${name} ${ms(v)}`)),
    ),
  );
}

// -- classify -----------------------------------------------------------------------------------------

function cardHead(file, url) {
  return el(
    "div",
    { class: "card-head" },
    el("img", { class: "thumb", src: url, alt: file.name }),
    el("div", { class: "file-name" }, file.name),
  );
}

async function methodOf(version) {
  if (!(version in state.methods)) {
    try {
      await loadModels(); // a version served since the page loaded (hot swap)
    } catch (err) {
      return "?";
    }
  }
  return state.methods[version] || "?";
}

async function renderPrediction(card, body) {
  const pred = body.predictions[0];
  const task = pred.task;
  const source = task.source === "gate" ? "routed by the gate" : "task given";
  const method = await methodOf(body.model_version);
  card.append(
    el(
      "div",
      { class: "verdict" },
      el("span", { class: "task-name" }, task.name),
      el("span", { class: "badge" }, `${source} · p ${pct(task.probability)}`),
      " → ",
      el("span", { class: "class-label" }, pred.class.label),
      el("span", { class: "badge" }, pct(pred.class.probability)),
    ),
    el("div", { class: "section-title" }, "router: p(task | image)"),
    barChart(Object.entries(task.probabilities), task.name, "router"),
    el("div", { class: "section-title" }, `top ${pred.top_k.length} classes of ${task.name}`),
    barChart(
      pred.top_k.map((c) => [c.label, c.probability]),
      pred.class.label,
      "classes",
    ),
    el("div", { class: "section-title" }, "timing"),
    timingView(body.timing),
    el(
      "div",
      { class: "meta" },
      "bundle ",
      el("span", { class: "version" }, body.model_version),
      " · method ",
      el("span", { class: "method" }, method),
    ),
  );
}

async function classifyOne(file, card) {
  const form = new FormData();
  form.append("image", file, file.name);
  const task = $("task").value;
  if (task) form.append("task", task);
  form.append("top_k", String(Math.min(20, Math.max(1, Number($("top-k").value) || 1))));
  try {
    const body = await api("v1/classify", { method: "POST", body: form });
    await renderPrediction(card, body);
    card.dataset.state = "done";
  } catch (err) {
    card.append(el("div", { class: "error-message" }, String(err)));
    card.dataset.state = "error";
  }
}

async function classifyAll() {
  const results = $("results");
  results.replaceChildren();
  $("run").disabled = state.files.length === 0;
  const jobs = state.files.map(({ file, url }) => {
    const card = el("article", { class: "card", "data-file": file.name, "data-state": "pending" }, cardHead(file, url));
    results.append(card);
    return classifyOne(file, card);
  });
  await Promise.all(jobs);
}

function setFiles(fileList) {
  for (const { url } of state.files) URL.revokeObjectURL(url);
  state.files = Array.from(fileList).map((file) => ({ file, url: URL.createObjectURL(file) }));
  return classifyAll();
}

// -- tasks and versions ---------------------------------------------------------------------------------

function tasksTable(tasks) {
  return el(
    "table",
    { id: "tasks-table" },
    el("tr", {}, el("th", {}, "#"), el("th", {}, "task"), el("th", {}, "classes")),
    tasks.tasks.map((t) =>
      el(
        "tr",
        { "data-task": t.name },
        el("td", { class: "num" }, t.index),
        el("td", {}, t.name),
        el("td", { class: "classes" }, `${t.classes.length}: ${t.classes.join(", ")}`),
      ),
    ),
  );
}

/** Per-task agreement figures of a bundle (given task vs routed), when the bundle has them. */
function agreementTable(rows) {
  return el(
    "table",
    { class: "agreement" },
    el(
      "tr",
      {},
      ["task", "split", "images", "top-1 given", "top-1 routed", "KL given", "KL routed"].map((h) => el("th", {}, h)),
    ),
    rows.map((a) =>
      el(
        "tr",
        { "data-task": a.task },
        el("td", {}, a.task),
        el("td", {}, a.split),
        el("td", { class: "num" }, a.images),
        el("td", { class: "num" }, percent(a.top1_given)),
        el("td", { class: "num" }, percent(a.top1_routed)),
        el("td", { class: "num" }, fixed(a.kl_given, 4)),
        el("td", { class: "num" }, fixed(a.kl_routed, 4)),
      ),
    ),
  );
}

function versionsView(models) {
  const head = ["version", "method", "tasks", "created", "state"].map((h) => el("th", {}, h));
  const rows = [];
  for (const v of models.versions) {
    const flags = [v.serving ? "serving" : null, v.current ? "CURRENT" : null].filter(Boolean).join(", ");
    rows.push(
      el(
        "tr",
        { "data-version": v.version },
        el("td", {}, v.version),
        el("td", {}, v.method),
        el("td", {}, v.tasks.join(", ")),
        el("td", {}, v.created_at),
        el("td", {}, flags),
      ),
    );
    if (Array.isArray(v.agreement) && v.agreement.length) {
      rows.push(el("tr", { "data-agreement": v.version }, el("td", { colspan: "5" }, agreementTable(v.agreement))));
    }
  }
  return el("table", { id: "versions-table" }, el("tr", {}, head), rows);
}

async function loadTasks() {
  const tasks = await api("v1/tasks");
  state.tasks = tasks;
  const select = $("task");
  const chosen = select.value;
  select.replaceChildren(
    el("option", tasks.gate ? { value: "" } : { value: "", disabled: "" }, tasks.gate ? "routed by the gate" : "(no gate: name a task)"),
    tasks.tasks.map((t) => el("option", { value: t.name }, t.name)),
  );
  select.value = tasks.tasks.some((t) => t.name === chosen) ? chosen : tasks.gate ? "" : tasks.tasks[0].name;
  $("tasks").replaceChildren(tasksTable(tasks));
  return tasks;
}

async function loadModels() {
  const models = await api("v1/models");
  for (const v of models.versions) state.methods[v.version] = v.method;
  $("versions").replaceChildren(versionsView(models));
  return models;
}

async function refresh() {
  try {
    const [tasks, models] = await Promise.all([loadTasks(), loadModels()]);
    const method = state.methods[tasks.model_version] || "?";
    $("served").textContent =
      `serving ${tasks.model_version} (${method}) · ${tasks.tasks.length} tasks · ` +
      (tasks.gate ? "the gate routes images without a task" : "no gate: every image needs a task") +
      ` · ${models.versions.length} version(s) in the store`;
    showBanner(null);
  } catch (err) {
    $("served").textContent = "not ready";
    showBanner(err);
  }
}

// -- wiring ---------------------------------------------------------------------------------------------

function showPanel(name) {
  for (const tab of document.querySelectorAll(".tab[data-panel]")) {
    tab.classList.toggle("active", tab.dataset.panel === name);
    $(tab.dataset.panel).hidden = tab.dataset.panel !== name;
  }
}

function wire() {
  for (const tab of document.querySelectorAll(".tab[data-panel]")) {
    tab.addEventListener("click", () => showPanel(tab.dataset.panel));
  }
  $("files").addEventListener("change", (e) => setFiles(e.target.files));
  const drop = $("drop");
  drop.addEventListener("dragover", (e) => {
    e.preventDefault();
    drop.classList.add("over");
  });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (e) => {
    e.preventDefault();
    drop.classList.remove("over");
    if (e.dataTransfer && e.dataTransfer.files.length) setFiles(e.dataTransfer.files);
  });
  $("form").addEventListener("submit", (e) => {
    e.preventDefault();
    classifyAll();
  });
  $("refresh").addEventListener("click", refresh);
  $("api-key").addEventListener("change", refresh);
  refresh();
}

wire();
