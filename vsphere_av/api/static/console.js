// The dashboard's only script (no framework, nothing fetched from elsewhere).
// The token lives in an HttpOnly cookie set by POST /login; changes send the
// X-Requested-With header the server demands of cookie-authenticated changes.
"use strict";

const STATES = ["protected", "stale", "infected", "unprotected", "unreachable"];

function say(text, isError) {
  const box = document.getElementById("message");
  if (!box) return;
  box.textContent = text;
  box.className = isError ? "message error" : "message";
  box.hidden = false;
}

async function call(method, url, body) {
  const options = {method, credentials: "same-origin",
                   headers: {"X-Requested-With": "vsphere-av"}};
  if (body !== undefined) {
    options.headers["Content-Type"] = "application/json";
    options.body = JSON.stringify(body);
  }
  const response = await fetch(url, options);
  let data = null;
  try { data = await response.json(); } catch (e) { data = null; }
  return {ok: response.ok, status: response.status, data};
}

function setUpLogin() {
  const form = document.getElementById("login-form");
  if (!form) return;
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    const token = document.getElementById("token").value.trim();
    const result = await call("POST", "/login", {token});
    if (result.ok) {
      window.location.assign("/");
    } else {
      say((result.data && result.data.error) || "login refused", true);
    }
  });
}

function setUpLogout() {
  const button = document.getElementById("logout");
  if (!button) return;
  button.addEventListener("click", async () => {
    await call("POST", "/logout");
    window.location.assign("/login");
  });
}

function setUpQuarantine() {
  for (const button of document.querySelectorAll("button.restore, button.purge")) {
    button.addEventListener("click", async () => {
      const id = button.dataset.id;
      const restore = button.classList.contains("restore");
      if (!restore && !window.confirm("Delete the quarantined bytes for good?")) return;
      const result = restore
        ? await call("POST", `/api/v1/quarantine/${encodeURIComponent(id)}/restore`, {})
        : await call("DELETE", `/api/v1/quarantine/${encodeURIComponent(id)}`);
      if (!result.ok) {
        say(`${restore ? "restore" : "purge"} refused (${result.status}): ` +
            ((result.data && result.data.error) || ""), true);
        return;
      }
      const row = result.data;
      say(restore ? `restored ${row.path} in ${row.vm}` : `purged ${row.id} (${row.path})`);
      const cell = document.querySelector(`tr[data-id="${CSS.escape(id)}"] td.restored`);
      if (cell && row.restored) cell.textContent = row.restored;
      if (!restore) button.closest("tr").remove();
    });
  }
}

function redrawFleet(vms) {
  const table = document.getElementById("fleet-totals");
  if (!table) return;
  const clusterOf = JSON.parse(table.dataset.clusters || "{}");
  const zero = () => Object.fromEntries(STATES.map((s) => [s, 0]));
  const total = zero();
  const clusters = {};
  for (const vm of vms) {
    const state = STATES.includes(vm.state) ? vm.state : "unprotected";
    const host = vm.host || "(no host)";
    const name = clusterOf[host] || "(no cluster)";
    const cluster = clusters[name] = clusters[name] || {total: zero(), hosts: {}};
    cluster.hosts[host] = cluster.hosts[host] || zero();
    total[state] += 1;
    cluster.total[state] += 1;
    cluster.hosts[host][state] += 1;
  }
  const body = table.tBodies[0];
  body.replaceChildren();
  const addRow = (label, counts, cls, key) => {
    const tr = body.insertRow();
    tr.className = cls;
    if (cls !== "total") tr.dataset[cls] = key;
    const th = document.createElement("th");
    th.textContent = (cls === "host" ? "\u00a0\u00a0" : "") + label;
    tr.appendChild(th);
    for (const s of STATES) {
      const td = tr.insertCell();
      td.dataset.state = s;
      td.textContent = String(counts[s]);
    }
  };
  addRow("all hosts", total, "total");
  for (const name of Object.keys(clusters).sort()) {
    addRow(name, clusters[name].total, "cluster", name);
    for (const host of Object.keys(clusters[name].hosts).sort()) {
      addRow(host, clusters[name].hosts[host], "host", host);
    }
  }
  for (const vm of vms) {
    const cell = document.querySelector(`#vms tr[data-moref="${CSS.escape(vm.moref)}"] td:nth-child(3)`);
    if (cell) { cell.textContent = vm.state; cell.className = `state-${vm.state}`; }
  }
}

function setUpLive() {
  const status = document.getElementById("live-state");
  if (!status || !window.EventSource) return;
  const source = new EventSource("/api/v1/events");
  source.onopen = () => { status.textContent = "live"; };
  source.onerror = () => { status.textContent = "event stream interrupted, retrying…"; };
  source.addEventListener("audit", async (event) => {
    const entry = JSON.parse(event.data);
    const recent = document.getElementById("recent-events");
    const item = document.createElement("li");
    item.value = entry.seq;
    item.textContent = `${entry.time.slice(11, 19)} ${entry.action} (${entry.actor})`;
    recent.prepend(item);
    while (recent.children.length > 8) recent.lastElementChild.remove();
    const result = await call("GET", "/api/v1/vms");
    if (result.ok) redrawFleet(result.data.vms);
  });
}

document.addEventListener("DOMContentLoaded", () => {
  setUpLogin();
  setUpLogout();
  setUpQuarantine();
  setUpLive();
});
