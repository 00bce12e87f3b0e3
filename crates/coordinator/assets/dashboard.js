// The dashboard: renders /api/v1 documents and keeps them current from the server-sent event
// stream /api/v1/events (no reload). Every value is inserted as text, never as HTML.
"use strict";

const TERMINAL = ["succeeded", "rolled_back", "rollback_failed", "aborted"];
const DONE_STEPS = ["committed", "skipped", "rolled_back", "untouched"];
const state = { rollout: null, pinned: null, who: null, rollouts: [] };

function el(tag, text, cls) {
  const e = document.createElement(tag);
  if (text !== undefined && text !== null) e.textContent = String(text);
  if (cls) e.className = cls;
  return e;
}
function row(cells) {
  const tr = document.createElement("tr");
  for (const c of cells) tr.appendChild(c instanceof Node ? c : el("td", c));
  return tr;
}
function td(text, cls) { return el("td", text, cls); }
function fill(tbody, rows) { tbody.replaceChildren(...rows); }
function secs(ms) {
  if (ms === null || ms === undefined || ms < 0) return "";
  const s = Math.round(ms / 1000);
  return s < 120 ? s + "s" : Math.floor(s / 60) + "m" + String(s % 60).padStart(2, "0") + "s";
}
function time(ms) { return ms ? new Date(ms).toLocaleString() : ""; }

async function api(path, opts) {
  const r = await fetch(path, Object.assign({ headers: { accept: "application/json" } }, opts || {}));
  const body = await r.json().catch(() => null);
  if (!r.ok) throw new Error(body && body.error ? body.error.message : r.status + " " + r.statusText);
  return body;
}

function renderCluster(c) {
  document.getElementById("cluster-id").textContent = c.cluster_id ? "(" + c.cluster_id + ")" : "";
  const leader = c.leader_id ? "leader " + c.leader_id + " at " + (c.leader_address || "?") : "no leader";
  document.getElementById("cluster-summary").textContent =
    leader + ", term " + (c.term ?? "?") + (c.quorum === false ? " — QUORUM LOST" : "") + (c.note ? " — " + c.note : "");
  fill(document.querySelector("#members tbody"), (c.members || []).map(m => row([
    td(m.id), td(m.address), td(m.role),
    td(m.reachable ? "yes" : "no", m.reachable ? "yes" : "no"),
    td(m.last_contact_ms_ago === null || m.last_contact_ms_ago === undefined ? "" : secs(m.last_contact_ms_ago) + " ago"),
    td(m.lag ?? ""),
  ])));
}

function healthCell(n) {
  const cell = n.health_detail === "being probed" ? td("probing", "muted")
    : td(n.healthy ? "yes" : "no", n.healthy ? "yes" : "no");
  if (n.health_detail) cell.title = n.health_detail;
  return cell;
}

function renderNodes(nodes) {
  fill(document.querySelector("#nodes tbody"), nodes.map(n => row([
    td(n.id), td(n.address),
    td((n.versions || []).map(v => v.version + " " + v.state).join(", ")),
    // The API probes each node at most every 5 s; a node whose first probe has not answered
    // yet is "probing", not unhealthy. The probe's detail is the cell's tooltip.
    healthCell(n),
    td(Object.entries(n.labels || {}).map(([k, v]) => k + "=" + v).join(", ")),
  ])));
}

function renderHistory(list) {
  state.rollouts = list;
  const rows = list.slice().reverse().map(r => {
    const tr = row([td(r.id), td(r.version), td(r.phase, "phase-" + r.phase), td(time(r.created_at_ms)),
      td(secs(r.duration_ms)), td(r.requested_by)]);
    tr.addEventListener("click", () => pin(r.id));
    if (state.pinned === r.id) tr.className = "selected";
    return tr;
  });
  fill(document.querySelector("#history tbody"), rows);
}

async function pin(id) {
  state.pinned = id;
  try { renderRollout(await api("/api/v1/rollouts/" + encodeURIComponent(id))); } catch (e) { alert(e.message); }
  renderHistory(state.rollouts);
}

function gateText(r, n, now) {
  if (n.step !== "verifying" || !n.step_since_ms) return "";
  const inGate = now - n.step_since_ms;
  const g = r.gate || {};
  // The leader probes the gate and knows how long the node has been healthy; from a follower,
  // only the time in the gate is known.
  if (n.healthy_since_ms !== null && n.healthy_since_ms !== undefined && g.min_healthy_ms !== undefined) {
    const healthy = n.healthy_since_ms ? Math.max(0, now - n.healthy_since_ms) : 0;
    return "healthy " + secs(healthy) + " of " + secs(g.min_healthy_ms) + ", deadline in " +
      secs(Math.max(0, g.healthy_deadline_ms - inGate));
  }
  let t = secs(inGate) + " in gate";
  if (g.min_healthy_ms !== undefined) t += ", needs " + secs(g.min_healthy_ms) + " healthy";
  if (g.healthy_deadline_ms !== undefined) t += ", deadline in " + secs(Math.max(0, g.healthy_deadline_ms - inGate));
  return t;
}

function renderRollout(r) {
  state.rollout = r;
  const box = document.getElementById("rollout");
  document.getElementById("rollout-none").hidden = !!r;
  box.hidden = !r;
  if (!r) return;
  const now = Date.now();
  document.getElementById("rollout-title").textContent = r.id + " → " + r.version;
  const head = document.getElementById("rollout-head");
  const end = TERMINAL.includes(r.phase) && r.events && r.events.length ? r.events[r.events.length - 1].at_ms : now;
  head.replaceChildren(el("span", r.phase + (r.awaiting_promotion ? " (waiting for promote)" : ""), "phase-" + r.phase),
    el("span", "  started " + time(r.created_at_ms) + " by " + (r.requested_by || "?") + ", elapsed " + secs(end - r.created_at_ms), "muted"));
  const total = r.nodes.length;
  const done = r.nodes.filter(n => DONE_STEPS.includes(n.step)).length;
  document.getElementById("rollout-bar").style.width = (total ? 100 * done / total : 0) + "%";
  document.getElementById("rollout-progress").textContent = done + "/" + total + " nodes done";
  document.getElementById("rollout-error").textContent = r.error || "";
  fill(document.querySelector("#rollout-nodes tbody"), r.nodes.map(n => {
    const err = [];
    if (n.unresponsive_since_ms) err.push("agent unresponsive for " + secs(now - n.unresponsive_since_ms) + (n.unresponsive_detail ? " (" + n.unresponsive_detail + ")" : ""));
    if (n.error) err.push(n.error);
    return row([td(n.id), td((n.from_version || "-") + " → " + r.version), td(n.step, "step-" + n.step),
      td(n.step_since_ms && !TERMINAL.includes(r.phase) ? secs(now - n.step_since_ms) : ""), td(gateText(r, n, now)),
      td(err.join("; "), "wrap error")]);
  }));
  const events = document.getElementById("events");
  events.replaceChildren(...(r.events || []).map(e => el("li", new Date(e.at_ms).toLocaleTimeString() + "  " + e.message)));
  events.scrollTop = events.scrollHeight;
  renderActions(r);
}

function renderActions(r) {
  const box = document.getElementById("actions");
  box.replaceChildren();
  if (!state.who || !state.who.may_operate) return;
  const acts = [];
  if (r.phase === "paused") acts.push("resume");
  else if (!TERMINAL.includes(r.phase)) acts.push("pause");
  if (r.awaiting_promotion) acts.push("promote");
  if (!TERMINAL.includes(r.phase)) acts.push("abort");
  if (r.phase === "rollback_failed" || r.phase === "succeeded") acts.push("rollback");
  for (const a of acts) {
    const b = el("button", a);
    b.dataset.action = a;
    b.addEventListener("click", async () => {
      if (!confirm(a + " rollout " + r.id + " (" + r.version + ")?")) return;
      try { renderRollout(await api("/api/v1/rollouts/" + encodeURIComponent(r.id) + "/" + a, { method: "POST" })); }
      catch (e) { alert(a + " failed: " + e.message); }
    });
    box.appendChild(b);
  }
}

function connect() {
  const conn = document.getElementById("conn");
  const es = new EventSource("/api/v1/events");
  es.onopen = () => { conn.textContent = "live"; conn.className = "pill live"; };
  es.onerror = () => { conn.textContent = "reconnecting…"; conn.className = "pill lost"; };
  es.addEventListener("cluster", e => renderCluster(JSON.parse(e.data)));
  es.addEventListener("nodes", e => renderNodes(JSON.parse(e.data)));
  es.addEventListener("rollouts", e => renderHistory(JSON.parse(e.data)));
  es.addEventListener("rollout", e => {
    const r = JSON.parse(e.data);
    if (state.pinned === null || state.pinned === r.id) renderRollout(r);
  });
}

async function main() {
  try {
    state.who = await api("/api/v1/whoami");
    document.getElementById("who").textContent = state.who.party + (state.who.may_operate ? " (operator)" : " (read-only)");
  } catch (e) { document.getElementById("who").textContent = e.message; }
  connect();
  // The countdowns and "in step" times move between events.
  setInterval(() => { if (state.rollout && !TERMINAL.includes(state.rollout.phase)) renderRollout(state.rollout); }, 1000);
}
main();
