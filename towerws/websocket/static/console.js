// towerws live console: readiness from /readyz, one websocket, messages as they arrive.
// Plain browser JavaScript, no build step; all text goes into the page as textContent.
"use strict";

const POLL_MS = 3000;
const EVENTS_KEPT = 50;

const el = (id) => document.getElementById(id);
const state = {
  ws: null,
  phase: "idle",      // idle | handshake | subscribing | live
  groups: [],         // groups_current of the last reply
  paused: false,
  held: [],           // deliveries received while paused
  received: 0,
  droppedWhilePaused: 0,
};

function clock(date) {
  const pad = (n, w = 2) => String(n).padStart(w, "0");
  return `${pad(date.getHours())}:${pad(date.getMinutes())}:${pad(date.getSeconds())}.${pad(date.getMilliseconds(), 3)}`;
}

function cap() { return Number(el("cap").value); }

// -- readiness ------------------------------------------------------------------------

function showNode(entries) {
  const dl = el("node-details");
  dl.replaceChildren();
  for (const [key, value] of entries) {
    const dt = document.createElement("dt");
    dt.textContent = key;
    const dd = document.createElement("dd");
    dd.textContent = typeof value === "object" && value !== null ? JSON.stringify(value) : String(value);
    dl.append(dt, dd);
  }
}

function setReadiness(cls, text) {
  const pill = el("readiness");
  pill.className = `pill ${cls}`;
  pill.textContent = text;
}

async function pollReadiness() {
  let response;
  try {
    response = await fetch("/readyz", { cache: "no-store", headers: { accept: "application/json" } });
  } catch (err) {
    setReadiness("not-ready", "node unreachable");
    showNode([["error", "cannot reach the node"]]);
    return true;
  }
  el("node-polled").textContent = `polled /readyz at ${clock(new Date())}`;
  if (response.status === 404) {
    setReadiness("unknown", "readiness: not reported");
    showNode([["node", location.host], ["/readyz", "not served by this node"]]);
    el("node-polled").textContent = "";
    return false; // nothing to poll
  }
  let body = null;
  try { body = await response.json(); } catch (err) { body = null; }
  const ready = response.ok;
  setReadiness(ready ? "ready" : "not-ready", ready ? "ready" : `not ready (HTTP ${response.status})`);
  if (body && typeof body === "object" && !Array.isArray(body)) {
    showNode([["node", location.host], ...Object.entries(body)]);
  } else {
    showNode([["node", location.host], ["HTTP", response.status]]);
  }
  return true;
}

async function readinessLoop() {
  if (await pollReadiness()) setTimeout(readinessLoop, POLL_MS);
}

// -- protocol events ------------------------------------------------------------------

function event(text, isError = false) {
  const li = document.createElement("li");
  li.textContent = `${clock(new Date())}  ${text}`;
  if (isError) li.className = "error";
  const list = el("events");
  list.prepend(li);
  while (list.children.length > EVENTS_KEPT) list.lastElementChild.remove();
}

function setConnection(cls, text) {
  const p = el("connection");
  p.className = `status ${cls}`;
  p.textContent = text;
}

// -- messages -------------------------------------------------------------------------

function groupLabel() {
  if (state.groups.length === 1) return { text: state.groups[0], ambiguous: false };
  if (state.groups.length === 0) return { text: "—", ambiguous: true };
  return { text: `one of ${state.groups.length} groups`, ambiguous: true, title: state.groups.join(", ") };
}

function pretty(data) {
  try {
    return JSON.stringify(JSON.parse(data), null, 2);
  } catch (err) {
    return data;
  }
}

function render(message) {
  const li = document.createElement("li");
  const time = document.createElement("span");
  time.className = "time";
  time.textContent = clock(message.at);
  const group = document.createElement("span");
  group.className = message.group.ambiguous ? "group ambiguous" : "group";
  group.textContent = message.group.text;
  if (message.group.title) group.title = message.group.title;
  const pre = document.createElement("pre");
  pre.textContent = pretty(message.data);
  li.append(time, group, pre);
  const list = el("messages");
  list.prepend(li);
  trim();
  el("empty").hidden = true;
}

function trim() {
  const list = el("messages");
  while (list.children.length > cap()) list.lastElementChild.remove();
}

function counters() {
  let text = `received ${state.received} · shown ${el("messages").children.length}`;
  if (state.paused) text += ` · paused, ${state.held.length} waiting`;
  if (state.droppedWhilePaused) text += ` (${state.droppedWhilePaused} dropped)`;
  el("counters").textContent = text;
}

function deliver(data) {
  state.received += 1;
  const message = { at: new Date(), group: groupLabel(), data };
  if (state.paused) {
    state.held.push(message);
    if (state.held.length > cap()) {
      state.held.shift();
      state.droppedWhilePaused += 1;
    }
  } else {
    render(message);
  }
  counters();
}

// -- the websocket --------------------------------------------------------------------

function parseGroups() {
  let groups;
  try {
    groups = JSON.parse(el("groups").value || "{}");
  } catch (err) {
    throw new Error(`groups is not valid JSON: ${err.message}`);
  }
  if (typeof groups !== "object" || groups === null || Array.isArray(groups)) {
    throw new Error('groups must be an object like {"jobs": ["status_changed"], "job_events": [42]}');
  }
  return groups;
}

function subscribe() {
  let groups;
  try {
    groups = parseGroups();
  } catch (err) {
    event(err.message, true);
    setConnection("error", err.message);
    return;
  }
  state.phase = "subscribing";
  state.ws.send(JSON.stringify({ groups }));
  event(`sent {"groups": ${JSON.stringify(groups)}}`);
}

function onMessage(data) {
  if (state.phase === "handshake") {
    let hello = null;
    try { hello = JSON.parse(data); } catch (err) { hello = null; }
    if (hello && hello.accept === true) {
      event(`accepted as user ${hello.user}`);
      setConnection("live", `connected as user ${hello.user}, subscribing…`);
      subscribe();
    } else {
      const reason = (hello && hello.error) || "unexpected first message";
      event(`refused: ${reason}`, true);
      setConnection("error", `refused: ${reason}`);
    }
    return;
  }
  if (state.phase === "subscribing") {
    // Until the reply, {"error": ...} and the reply itself are the server's answers
    // to our groups message; anything else is a message of a group joined earlier.
    let reply = null;
    try { reply = JSON.parse(data); } catch (err) { reply = null; }
    if (reply && typeof reply === "object" && Array.isArray(reply.groups_current)) {
      state.groups = reply.groups_current;
      state.phase = "live";
      event(`subscribed: ${state.groups.join(", ") || "(no groups)"}`);
      setConnection("live", state.groups.length
        ? `live: ${state.groups.join(", ")}`
        : "connected, no groups subscribed");
      el("connect").textContent = "Update subscription";
      return;
    }
    if (reply && typeof reply === "object" && typeof reply.error === "string" && Object.keys(reply).length === 1) {
      event(reply.error, true);
      return;
    }
  }
  deliver(data);
}

function connect() {
  if (state.ws && state.ws.readyState === WebSocket.OPEN) {
    subscribe(); // same connection, new groups: a groups message replaces the earlier ones
    return;
  }
  try {
    parseGroups();
  } catch (err) {
    event(err.message, true);
    setConnection("error", err.message);
    return;
  }
  const scheme = location.protocol === "https:" ? "wss:" : "ws:";
  const token = el("token").value.trim();
  const url = `${scheme}//${location.host}/websocket/` + (token ? `?token=${encodeURIComponent(token)}` : "");
  const ws = new WebSocket(url);
  state.ws = ws;
  state.phase = "handshake";
  state.groups = [];
  setConnection("idle", "connecting…");
  el("disconnect").disabled = false;
  ws.onopen = () => event(`websocket open: ${scheme}//${location.host}/websocket/`);
  ws.onmessage = (ev) => { if (state.ws === ws) onMessage(ev.data); };
  ws.onerror = () => { if (state.ws === ws) event("websocket error", true); };
  ws.onclose = (ev) => {
    if (state.ws !== ws) return;
    state.ws = null;
    state.phase = "idle";
    state.groups = [];
    event(`websocket closed: code ${ev.code}${ev.reason ? ` (${ev.reason})` : ""}`, ev.code !== 1000 && ev.code !== 1005);
    if (!el("connection").classList.contains("error")) setConnection("idle", `not connected (close code ${ev.code})`);
    el("connect").textContent = "Connect & subscribe";
    el("disconnect").disabled = true;
  };
}

function disconnect() {
  if (state.ws) state.ws.close(1000, "console disconnect");
}

function togglePause() {
  state.paused = !state.paused;
  const button = el("pause");
  button.setAttribute("aria-pressed", String(state.paused));
  button.textContent = state.paused ? "Resume" : "Pause";
  if (!state.paused) {
    const held = state.held;
    state.held = [];
    state.droppedWhilePaused = 0;
    for (const message of held) render(message);
  }
  counters();
}

function clearMessages() {
  el("messages").replaceChildren();
  state.held = [];
  state.droppedWhilePaused = 0;
  el("empty").hidden = false;
  counters();
}

document.addEventListener("DOMContentLoaded", () => {
  el("subscribe-form").addEventListener("submit", (ev) => { ev.preventDefault(); connect(); });
  el("disconnect").addEventListener("click", disconnect);
  el("pause").addEventListener("click", togglePause);
  el("clear").addEventListener("click", clearMessages);
  el("cap").addEventListener("change", () => { trim(); counters(); });
  readinessLoop();
});
