// budgetd's admin page: teams, keys and daily spend through the bridge's JSON endpoints.
// No framework and no build step. Text from the server is only ever set as textContent,
// never parsed as HTML, so a team called "<script>" stays a name.

const KEY_STORE = "budgetd.masterKey";
const SVG = "http://www.w3.org/2000/svg";

const $ = (id) => document.getElementById(id);
let selectedTeam = null;

// -- talking to the bridge -------------------------------------------------------------

class ApiError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

async function api(path, { method = "GET", body } = {}) {
  const headers = { Authorization: `Bearer ${sessionStorage.getItem(KEY_STORE) || ""}` };
  if (body !== undefined) headers["Content-Type"] = "application/json";
  const response = await fetch(path, {
    method,
    headers,
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  const text = await response.text();
  let data = null;
  try {
    data = text ? JSON.parse(text) : null;
  } catch {
    data = null;
  }
  if (!response.ok) {
    const message = data?.error?.message || `${response.status} ${response.statusText}`;
    throw new ApiError(response.status, message);
  }
  return data;
}

// -- money: exact nano-USD (budgetd's unit) for display and differences -----------------

function toNanos(usd) {
  return BigInt(Math.round(usd * 1e9));
}

function formatNanos(nanos) {
  const negative = nanos < 0n;
  const abs = negative ? -nanos : nanos;
  const whole = (abs / 1000000000n).toLocaleString("en-US");
  // Cents at least ($2.50), and every digit down to budgetd's nano-USD ($0.0000035).
  const fraction = (abs % 1000000000n).toString().padStart(9, "0").replace(/0+$/, "").padEnd(2, "0");
  return `${negative ? "-" : ""}$${whole}.${fraction}`;
}

function formatUsd(usd) {
  return usd === null || usd === undefined ? "unlimited" : formatNanos(toNanos(usd));
}

function remainingNanos(team) {
  if (team.max_budget === null || team.max_budget === undefined) return null;
  return toNanos(team.max_budget) - toNanos(team.spend || 0);
}

function formatReset(iso, duration) {
  if (!iso) return duration ? "" : "never";
  const at = new Date(iso);
  const seconds = Math.max(0, Math.round((at - Date.now()) / 1000));
  const h = Math.floor(seconds / 3600);
  const m = Math.floor((seconds % 3600) / 60);
  const s = seconds % 60;
  const inText = h ? `${h}h ${m}m` : m ? `${m}m ${s}s` : `${s}s`;
  return `${at.toISOString().slice(0, 16).replace("T", " ")} UTC (in ${inText})`;
}

// -- small DOM helpers ----------------------------------------------------------------------

function cell(text, className) {
  const td = document.createElement("td");
  td.textContent = text;
  if (className) td.className = className;
  return td;
}

function button(text, onClick, className) {
  const b = document.createElement("button");
  b.type = "button";
  b.textContent = text;
  if (className) b.className = className;
  b.addEventListener("click", onClick);
  return b;
}

function say(text, kind = "info") {
  const box = $("message");
  box.textContent = text;
  box.className = `message ${kind}`;
  box.hidden = !text;
}

function usdField(form, name) {
  const raw = form.elements[name].value.trim();
  if (!raw) return undefined;
  const value = Number(raw);
  if (!Number.isFinite(value) || value < 0) throw new Error(`${name}: "${raw}" is not an amount in USD`);
  return value;
}

// -- teams --------------------------------------------------------------------------------

async function loadTeams() {
  const teams = await api("/team/list");
  const body = $("teams").querySelector("tbody");
  body.replaceChildren();
  for (const team of teams) {
    const row = document.createElement("tr");
    row.dataset.teamId = team.team_id;
    if (selectedTeam === team.team_id) row.classList.add("selected");
    const name = document.createElement("td");
    const alias = document.createElement("div");
    alias.textContent = team.team_alias || "(no name)";
    const id = document.createElement("div");
    id.className = "muted mono small";
    id.textContent = team.team_id;
    name.append(alias, id);
    const left = remainingNanos(team);
    row.append(
      name,
      cell(formatUsd(team.max_budget), "num"),
      cell(formatUsd(team.spend), "num"),
      cell(left === null ? "unlimited" : formatNanos(left), left !== null && left < 0n ? "num over" : "num"),
      cell(formatReset(team.budget_reset_at, team.budget_duration)),
    );
    const actions = document.createElement("td");
    actions.append(button("Open", () => selectTeam(team), "ghost"));
    row.append(actions);
    body.append(row);
  }
  $("no-teams").hidden = teams.length > 0;
  $("team-count").textContent = `${teams.length} team${teams.length === 1 ? "" : "s"}`;
  return teams;
}

async function createTeam(event) {
  event.preventDefault();
  const form = event.target;
  try {
    const body = { team_alias: form.elements.team_alias.value.trim() };
    const budget = usdField(form, "max_budget");
    if (budget !== undefined) body.max_budget = budget;
    if (form.elements.budget_duration.value) body.budget_duration = form.elements.budget_duration.value;
    const team = await api("/team/new", { method: "POST", body });
    form.reset();
    say(`Team "${team.team_alias}" created.`, "ok");
    await loadTeams();
    await selectTeam(team);
  } catch (error) {
    say(error.message, "error");
  }
}

// -- one team: keys and chart ---------------------------------------------------------------

async function selectTeam(team) {
  selectedTeam = team.team_id;
  for (const row of $("teams").querySelectorAll("tbody tr")) {
    row.classList.toggle("selected", row.dataset.teamId === team.team_id);
  }
  $("team-detail").hidden = false;
  $("detail-title").textContent = team.team_alias || "(no name)";
  $("detail-id").textContent = team.team_id;
  hideNewKey();
  await Promise.all([loadKeys(), loadChart()]);
}

async function loadKeys() {
  const { keys } = await api(`/key/list?team_id=${encodeURIComponent(selectedTeam)}`);
  const body = $("keys").querySelector("tbody");
  body.replaceChildren();
  for (const key of keys) {
    const row = document.createElement("tr");
    const name = document.createElement("td");
    const alias = document.createElement("div");
    alias.textContent = key.key_alias || key.key_name || key.key_id;
    const id = document.createElement("div");
    id.className = "muted mono small";
    id.textContent = `${key.key_name || ""} ${key.key_id}`.trim();
    name.append(alias, id);
    row.append(
      name,
      cell(key.max_budget === null ? "team's" : formatUsd(key.max_budget), "num"),
      cell(formatUsd(key.spend), "num"),
      cell(key.expires ? key.expires.slice(0, 16).replace("T", " ") : "never"),
    );
    const actions = document.createElement("td");
    actions.append(revokeButton(key));
    row.append(actions);
    body.append(row);
  }
  $("no-keys").hidden = keys.length > 0;
}

function revokeButton(key) {
  // Two clicks, no dialog: the first arms the button, the second revokes.
  const b = button("Revoke", async () => {
    if (!b.classList.contains("armed")) {
      b.classList.add("armed");
      b.textContent = "Confirm revoke";
      return;
    }
    try {
      await api("/key/delete", { method: "POST", body: { keys: [key.key_id] } });
      say(`Key ${key.key_alias || key.key_id} revoked: requests with it are now refused.`, "ok");
      await loadKeys();
    } catch (error) {
      say(error.message, "error");
    }
  }, "danger");
  return b;
}

async function createKey(event) {
  event.preventDefault();
  const form = event.target;
  try {
    const body = { team_id: selectedTeam };
    const alias = form.elements.key_alias.value.trim();
    if (alias) body.key_alias = alias;
    const budget = usdField(form, "max_budget");
    if (budget !== undefined) body.max_budget = budget;
    const issued = await api("/key/generate", { method: "POST", body });
    form.reset();
    $("new-key-value").value = issued.key;
    $("new-key").hidden = false;
    $("new-key-value").select();
    say("Key created.", "ok");
    await loadKeys();
  } catch (error) {
    say(error.message, "error");
  }
}

async function copyKey() {
  const field = $("new-key-value");
  try {
    await navigator.clipboard.writeText(field.value);
  } catch {
    // No clipboard API (a page served over plain http from another host): select and copy.
    field.select();
    document.execCommand("copy");
  }
  $("copy-key").textContent = "Copied";
}

function hideNewKey() {
  $("new-key-value").value = "";
  $("new-key").hidden = true;
  $("copy-key").textContent = "Copy";
}

// -- the chart: one bar per day, drawn as inline SVG ------------------------------------------

function svg(name, attributes, text) {
  const element = document.createElementNS(SVG, name);
  for (const [key, value] of Object.entries(attributes)) element.setAttribute(key, value);
  if (text !== undefined) element.textContent = text;
  return element;
}

async function loadChart() {
  // No dates: budgetd picks the last 30 days up to today on its own clock and time zone.
  const report = await api(`/team/spend/report?team_id=${encodeURIComponent(selectedTeam)}`);
  drawChart(report);
}

function drawChart(report) {
  const days = report.daily;
  const width = 720, height = 220, left = 90, bottom = 28, top = 12, right = 8;
  const plotW = width - left - right, plotH = height - top - bottom;
  const most = Math.max(0, ...days.map((d) => d.spend));
  const chart = svg("svg", {
    viewBox: `0 0 ${width} ${height}`, role: "img",
    "aria-label": `Daily spend from ${report.start_date} to ${report.end_date}`,
  });
  chart.append(svg("line", { x1: left, y1: top + plotH, x2: width - right, y2: top + plotH, class: "axis" }));
  chart.append(svg("text", { x: left - 6, y: top + 10, class: "label end" }, formatUsd(most)));
  chart.append(svg("text", { x: left - 6, y: top + plotH, class: "label end" }, "$0.00"));
  const step = plotW / Math.max(1, days.length);
  days.forEach((d, i) => {
    const h = most > 0 ? (d.spend / most) * plotH : 0;
    const bar = svg("rect", {
      x: (left + i * step + step * 0.15).toFixed(2), y: (top + plotH - h).toFixed(2),
      width: (step * 0.7).toFixed(2), height: Math.max(h, d.spend > 0 ? 1 : 0).toFixed(2),
      class: "bar",
    });
    bar.append(svg("title", {}, `${d.date}: ${formatUsd(d.spend)} in ${d.requests} requests`));
    chart.append(bar);
  });
  if (days.length) {
    chart.append(svg("text", { x: left, y: height - 8, class: "label" }, days[0].date));
    chart.append(svg("text", { x: width - right, y: height - 8, class: "label end" }, days.at(-1).date));
  }
  $("chart").replaceChildren(chart);
  $("chart-range").textContent = `${formatUsd(report.total_spend)} over the last ${days.length} days (${report.timezone})`;
}

// -- session --------------------------------------------------------------------------------

async function signIn(event) {
  event.preventDefault();
  const key = $("master-key").value.trim();
  sessionStorage.setItem(KEY_STORE, key);
  try {
    await showApp();
    $("master-key").value = "";
    say("");
  } catch (error) {
    sessionStorage.removeItem(KEY_STORE);
    // budgetd's own words when it has no master key at all (they say how to set one).
    const wrongKey = error.status === 401 && !/no master key/.test(error.message);
    say(wrongKey ? "That is not budgetd's master key." : error.message, "error");
    showLogin();
  }
}

async function showApp() {
  await loadTeams();
  $("login").hidden = true;
  $("app").hidden = false;
  $("session").hidden = false;
}

function showLogin() {
  $("login").hidden = false;
  $("app").hidden = true;
  $("session").hidden = true;
  $("team-detail").hidden = true;
  selectedTeam = null;
}

function signOut() {
  sessionStorage.removeItem(KEY_STORE);
  hideNewKey();
  say("Signed out.");
  showLogin();
}

async function refresh() {
  try {
    await loadTeams();
    if (selectedTeam) await Promise.all([loadKeys(), loadChart()]);
  } catch (error) {
    say(error.message, "error");
  }
}

$("login-form").addEventListener("submit", signIn);
$("team-form").addEventListener("submit", createTeam);
$("key-form").addEventListener("submit", createKey);
$("copy-key").addEventListener("click", copyKey);
$("dismiss-key").addEventListener("click", hideNewKey);
$("sign-out").addEventListener("click", signOut);
$("refresh").addEventListener("click", refresh);

if (sessionStorage.getItem(KEY_STORE)) {
  showApp().catch(() => {
    sessionStorage.removeItem(KEY_STORE);
    showLogin();
  });
}
