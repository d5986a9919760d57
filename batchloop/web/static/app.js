// The status page: polls the JSON endpoints every second and updates the tables in place.
// Every value goes in through textContent (never innerHTML): names and errors may hold HTML.
"use strict";

const POLL_MS = 1000;
const TOKEN_KEY = "batchloop-token";
let token = sessionStorage.getItem(TOKEN_KEY) || "";
let actions = [];
const previous = new Map(); // name -> {batches, at}: batches/s between two refreshes
const rates = new Map();

function headers() {
  return token ? { Authorization: "Bearer " + token } : {};
}

function el(tag, cls, text) {
  const node = document.createElement(tag);
  if (cls) node.className = cls;
  if (text !== undefined) node.textContent = text;
  return node;
}

function ago(iso) {
  if (!iso) return "";
  const s = (Date.now() - Date.parse(iso)) / 1000;
  if (Math.abs(s) < 1) return "now";
  const n = Math.round(Math.abs(s));
  return s > 0 ? n + " s ago" : "in " + n + " s";
}

function stateText(w) {
  if (w.stale) return w.state + " (no host)";
  return w.state;
}

function ownerText(w) {
  if (!w.owner) return "";
  return w.owner.hostname + " pid " + w.owner.pid + (w.owner_alive === false ? " (gone)" : "");
}

async function session() {
  const res = await fetch("api/session", { headers: headers(), cache: "no-store" });
  const info = await res.json();
  actions = info.actions;
  const form = document.getElementById("token-form");
  form.hidden = info.read_only;
  document.body.classList.toggle("can-act", info.authorized);
  document.getElementById("token-state").textContent = info.read_only
    ? ""
    : info.authorized ? "actions enabled" : token ? "wrong token" : "read-only";
}

function rowFor(tbody, key) {
  for (const tr of tbody.rows) if (tr.dataset.key === key) return tr;
  return null;
}

function workerRow(w) {
  const tr = el("tr");
  tr.dataset.key = w.name;
  for (const cls of ["name", "state", "owner", "batches num", "rate num", "failures num", "error"]) {
    tr.appendChild(el("td", cls));
  }
  const details = el("details");
  details.appendChild(el("summary"));
  details.appendChild(el("pre"));
  tr.querySelector("td.error").appendChild(details);
  const cell = el("td", "actions");
  for (const action of ["stop", "start", "wake"]) {
    const b = el("button", "act-" + action, action);
    b.type = "button";
    b.addEventListener("click", () => act(action, tr.dataset.key));
    cell.appendChild(b);
  }
  tr.appendChild(cell);
  return tr;
}

function setText(node, text) {
  if (node.textContent !== text) node.textContent = text;
}

function renderWorkers(list) {
  const tbody = document.querySelector("#workers tbody");
  const now = performance.now();
  const seen = new Set();
  list.forEach((w, i) => {
    seen.add(w.name);
    let tr = rowFor(tbody, w.name);
    if (!tr) tr = workerRow(w);
    if (tbody.rows[i] !== tr) tbody.insertBefore(tr, tbody.rows[i] || null);
    const before = previous.get(w.name);
    if (before && now > before.at) {
      rates.set(w.name, Math.max(0, (w.batches - before.batches) / ((now - before.at) / 1000)));
    }
    previous.set(w.name, { batches: w.batches, at: now });
    const rate = rates.get(w.name);
    setText(tr.querySelector(".name"), w.name);
    const state = tr.querySelector(".state");
    setText(state, stateText(w));
    state.className = "state state-" + (w.stale ? "stale" : w.state);
    tr.dataset.state = w.state;
    setText(tr.querySelector(".owner"), ownerText(w));
    setText(tr.querySelector(".batches"), String(w.batches));
    setText(tr.querySelector(".rate"), rate === undefined ? "" : rate.toFixed(1));
    setText(tr.querySelector(".failures"), String(w.consecutive_failures));
    const details = tr.querySelector("details");
    const error = w.last_error || w.config_error || "";
    details.hidden = !error;
    const firstLine = error.split("\n")[0];
    setText(details.querySelector("summary"),
      (firstLine.length > 60 ? firstLine.slice(0, 60) + "\u2026" : firstLine) +
      (w.last_error_at ? " (" + ago(w.last_error_at) + ")" : ""));
    setText(details.querySelector("pre"), error);
    for (const action of ["stop", "start", "wake"]) {
      const b = tr.querySelector(".act-" + action);
      b.hidden = !actions.includes(action) ||
        (action === "stop" && w.state === "stopped") || (action === "start" && w.state !== "stopped");
    }
  });
  for (const tr of Array.from(tbody.rows)) {
    if (!seen.has(tr.dataset.key)) {
      previous.delete(tr.dataset.key);
      tr.remove();
    }
  }
  document.getElementById("no-workers").hidden = list.length > 0;
}

function renderHosts(list) {
  const tbody = document.querySelector("#hosts tbody");
  tbody.replaceChildren();
  for (const h of list) {
    const tr = el("tr");
    tr.dataset.key = h.host_id;
    tr.appendChild(el("td", "", h.host_id));
    tr.appendChild(el("td", "", h.hostname));
    tr.appendChild(el("td", "num", String(h.pid)));
    tr.appendChild(el("td", h.alive ? "" : "state-stopped", h.alive ? "yes" : "no"));
    tr.appendChild(el("td", "", ago(h.heartbeat_at)));
    tr.appendChild(el("td", "", ago(h.started_at)));
    tr.appendChild(el("td", "", (h.owned || []).join(", ")));
    tbody.appendChild(tr);
  }
  const note = document.getElementById("hosts-note");
  note.hidden = list.length > 0;
  note.textContent = "no hosts have registered";
}

const JOB_STATUSES = ["pending", "running", "completed", "failed", "canceled"];

function renderQueues(list) {
  const tbody = document.querySelector("#queues tbody");
  const seen = new Set();
  list.forEach((q, i) => {
    seen.add(q.queue);
    let tr = rowFor(tbody, q.queue);
    if (!tr) {
      tr = el("tr");
      tr.dataset.key = q.queue;
      tr.appendChild(el("td", "queue"));
      for (const s of JOB_STATUSES) tr.appendChild(el("td", "num count-" + s));
      tr.appendChild(el("td", "num total"));
    }
    if (tbody.rows[i] !== tr) tbody.insertBefore(tr, tbody.rows[i] || null);
    setText(tr.querySelector(".queue"), q.queue);
    for (const s of JOB_STATUSES) {
      const n = (q.counts && q.counts[s]) || 0;
      const cell = tr.querySelector(".count-" + s);
      setText(cell, String(n));
      cell.classList.toggle("state-stopped", s === "failed" && n > 0);
      tr.dataset[s] = String(n);
    }
    setText(tr.querySelector(".total"), String(q.total));
  });
  for (const tr of Array.from(tbody.rows)) if (!seen.has(tr.dataset.key)) tr.remove();
  showQueuesNote(list.length ? "" : "no jobs yet: a first dispatch creates a queue's row");
}

function showQueuesNote(text) {
  const note = document.getElementById("queues-note");
  note.hidden = !text;
  note.textContent = text;
}

async function refreshQueues() {
  const res = await fetch("api/queues", { cache: "no-store" });
  if (res.ok) {
    renderQueues(await res.json());
  } else {
    const body = await res.json().catch(() => ({}));
    document.querySelector("#queues tbody").replaceChildren();
    showQueuesNote(body.error || "queues: HTTP " + res.status);
  }
}

async function act(action, name) {
  const res = await fetch("api/workers/" + action, {
    method: "POST",
    headers: Object.assign({ "Content-Type": "application/json" }, headers()),
    body: JSON.stringify({ name: name }),
  });
  if (!res.ok) {
    const body = await res.json().catch(() => ({}));
    showProblem(action + " " + name + ": " + (body.error || res.status));
  }
  await refresh();
}

function showProblem(text) {
  const p = document.getElementById("problem");
  p.hidden = !text;
  p.textContent = text || "";
}

async function refresh() {
  try {
    const res = await fetch("api/workers", { cache: "no-store" });
    if (!res.ok) throw new Error("workers: HTTP " + res.status);
    renderWorkers(await res.json());
    await refreshQueues();
    const hosts = await fetch("api/hosts", { cache: "no-store" });
    if (hosts.ok) {
      renderHosts(await hosts.json());
    } else {
      const body = await hosts.json().catch(() => ({}));
      document.querySelector("#hosts tbody").replaceChildren();
      const note = document.getElementById("hosts-note");
      note.hidden = false;
      note.textContent = body.error || "hosts: HTTP " + hosts.status;
    }
    showProblem("");
    setText(document.getElementById("updated"), "updated " + new Date().toLocaleTimeString());
  } catch (e) {
    showProblem("cannot reach the server: " + e.message);
  }
}

async function loop() {
  await refresh();
  setTimeout(loop, POLL_MS);
}

document.getElementById("token-form").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  token = document.getElementById("token").value;
  sessionStorage.setItem(TOKEN_KEY, token);
  await session();
  await refresh();
});

session().then(loop, (e) => showProblem("cannot reach the server: " + e.message));
