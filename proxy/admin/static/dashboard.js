/* costproxy admin dashboard: reads the admin API (same origin, session cookie) and draws
   cards, tables and Chart.js charts. No build step; figures arrive as exact strings. */
"use strict";

const $ = (id) => document.getElementById(id);
const charts = {};
const PALETTE = ["#2457c5", "#e07b00", "#17803d", "#9b2fae", "#b42318", "#0e7490", "#6b7280"];

async function api(path) {
  const response = await fetch("/admin/api/" + path, { credentials: "same-origin", headers: { Accept: "application/json" } });
  if (response.status === 401) {
    window.location.href = "/admin/login";
    throw new Error("signed out");
  }
  const body = await response.json();
  if (!response.ok) throw new Error(body.error ? body.error.message : response.statusText);
  return body;
}

/* formatting ------------------------------------------------------------------------- */
const int = (n) => Number(n).toLocaleString("en-US");
const usd = (s) => (s === null || s === undefined ? "—" : s.startsWith("-") ? "-$" + s.slice(1) : "$" + s);
const pct = (s) => (s === null || s === undefined ? "—" : s + "%");
const plus = (text, raw) => (Number(raw) > 0 ? "+" + text : text);
function microUsd(micro) {  /* integer µ$ to "$d.dddddd" without floating point */
  const n = Number(micro), sign = n < 0 ? "-" : "", abs = Math.abs(n);
  return sign + "$" + Math.floor(abs / 1e6) + "." + String(abs % 1e6).padStart(6, "0");
}
const dollars = (micro) => Number(micro) / 1e6;  /* chart scales only, never shown as a figure */
const isoDay = (d) => d.toISOString().slice(0, 10);
const when = (s) => (s ? s.replace("T", " ").slice(0, 19) : "");

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs || {})) {
    if (name === "class") node.className = value;
    else node.setAttribute(name, value);
  }
  for (const child of children) node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  return node;
}

function card(key, label, value, note, trend) {
  return el("div", { class: "card", "data-figure": key },
    el("div", { class: "label" }, label),
    el("div", { class: "value" }, value),
    el("div", { class: "change" + (trend ? " " + trend : "") }, note || ""));
}

function table(id, headers, rows) {
  const head = el("tr", {}, ...headers.map((h) => el("th", { class: h.num ? "num" : "" }, h.label)));
  const body = rows.map((cells) => el("tr", {}, ...cells.map((c, i) => el("td", { class: headers[i].num ? "num" : "" }, c))));
  $(id).replaceChildren(el("thead", {}, head), el("tbody", {}, ...body));
}

function chart(id, config) {
  if (charts[id]) charts[id].destroy();
  charts[id] = new Chart($(id), config);
}

const trendOf = (raw, goodWhenUp = true) => (Number(raw) === 0 ? "" : (Number(raw) > 0) === goodWhenUp ? "up" : "down");

/* overview --------------------------------------------------------------------------- */
function renderToday(report) {
  const c = report.current, d = report.change, vs = " vs yesterday";
  $("today-date").textContent = c.period.from + " (UTC)";
  $("today-cards").replaceChildren(
    card("today.signups", "Sign-ups", int(c.accounts.signups), plus(int(d.signups), d.signups) + vs, trendOf(d.signups)),
    card("today.upgrades", "Upgrades", int(c.accounts.upgrades), plus(int(d.upgrades), d.upgrades) + vs, trendOf(d.upgrades)),
    card("today.downgrades", "Downgrades", int(c.accounts.downgrades), plus(int(d.downgrades), d.downgrades) + vs, trendOf(d.downgrades, false)),
    card("today.requests", "API requests", int(c.usage.requests), plus(int(d.requests), d.requests) + vs, trendOf(d.requests)),
    card("today.tokens", "Tokens", int(c.usage.tokens), plus(int(d.tokens), d.tokens) + vs, trendOf(d.tokens)),
    card("today.revenue", "Revenue (net)", usd(c.revenue.net_usd), plus(usd(d.net_revenue_usd), d.net_revenue_cents) + vs, trendOf(d.net_revenue_cents)),
    card("today.cost", "API cost", usd(c.api_cost.usd), plus(usd(d.api_cost_usd), d.api_cost_micro) + vs, trendOf(d.api_cost_micro, false)),
    card("today.profit", "Profit", usd(c.profit.usd), plus(usd(d.profit_usd), d.profit_micro) + vs, trendOf(d.profit_micro)),
    card("today.margin", "Margin", pct(c.margin.pct),
      d.margin_pct_points === null ? "no revenue to compare" : plus(d.margin_pct_points, d.margin_pct_points) + " pts" + vs,
      d.margin_pct_points === null ? "" : trendOf(d.margin_pct_points)),
  );
}

function renderMonth(m) {
  $("month-range").textContent = m.period.from + " to " + m.period.to;
  const vsTarget = m.margin.vs_target_pct;
  $("month-cards").replaceChildren(
    card("month.revenue", "Revenue (net)", usd(m.revenue.net_usd), "gross " + usd(m.revenue.gross_usd) + ", " + int(m.revenue.invoices) + " invoices"),
    card("month.arpu", "Revenue per paying user", usd(m.arpu.usd), int(m.arpu.paying_users) + " paying users"),
    card("month.cost", "API cost", usd(m.api_cost.usd), "budget " + usd(m.budget.allocated_usd) + " (" + pct(m.budget.used_pct) + " used)"),
    card("month.profit", "Profit", usd(m.profit.usd), "unused allowance " + usd(m.budget.unused_usd)),
    card("month.margin", "Margin", pct(m.margin.pct), "target " + pct(m.margin.target_pct) + (vsTarget === null ? "" : ", " + plus(vsTarget, vsTarget) + " pts"),
      vsTarget === null ? "" : trendOf(vsTarget)),
    card("month.churn", "Churn", pct(m.churn.rate_pct), int(m.churn.cancellations) + " of " + int(m.churn.paying_users_start) + " paying users", m.churn.cancellations > 0 ? "down" : ""),
    card("month.signups", "Sign-ups", int(m.accounts.signups), int(m.accounts.upgrades) + " upgrades, " + int(m.accounts.downgrades) + " downgrades"),
  );

  const mm = m.margin_model;
  table("margin-model", [{ label: "Margin model" }, { label: "", num: true }], [
    ["Net revenue (after Stripe fees, refunds, disputes)", microUsd(mm.net_revenue_micro)],
    ["API budget (allowances of paid invoices)", microUsd(mm.api_budget_micro)],
    ["Planned profit (net revenue − budget)", microUsd(mm.planned_profit_micro)],
    ["+ Unused allowance", microUsd(mm.unused_allowance_micro)],
    ["− Free-tier API cost", microUsd(mm.free_tier_cost_micro)],
    ["= Profit", microUsd(mm.profit_micro)],
    ["Planned margin", pct(mm.planned_margin_pct)],
    ["Actual margin", pct(mm.actual_margin_pct)],
    ["Target margin", pct(mm.target_margin_pct)],
  ]);
  chart("chart-budget", {
    type: "bar",
    data: {
      labels: ["Budgeted (paid tiers)", "Actual (paid tiers)", "Free tiers"],
      datasets: [{ label: "US$", data: [dollars(m.budget.allocated_micro), dollars(m.budget.used_micro), dollars(m.api_cost.free_tiers_micro)], backgroundColor: [PALETTE[0], PALETTE[1], PALETTE[6]] }],
    },
    options: { plugins: { legend: { display: false } }, scales: { y: { beginAtZero: true } } },
  });

  table("tier-table", [{ label: "Tier" }, { label: "Price", num: true }, { label: "Users", num: true }],
    m.tiers.map((t) => [t.tier, t.price_usd === null ? "—" : usd(t.price_usd), int(t.users)]));
  chart("chart-tiers", {
    type: "doughnut",
    data: { labels: m.tiers.map((t) => t.tier), datasets: [{ data: m.tiers.map((t) => t.users), backgroundColor: PALETTE }] },
    options: { plugins: { legend: { position: "right" } } },
  });

  const providers = m.providers;
  table("provider-table",
    [{ label: "Provider" }, { label: "Requests", num: true }, { label: "Share of requests", num: true }, { label: "Tokens", num: true }, { label: "Cost", num: true }, { label: "Share of cost", num: true }],
    providers.map((p) => [p.provider, int(p.requests), pct(p.request_share_pct), int(p.tokens), usd(p.cost_usd), pct(p.cost_share_pct)]));
  for (const [id, field] of [["chart-provider-requests", "requests"], ["chart-provider-cost", "cost_micro"]]) {
    chart(id, {
      type: "doughnut",
      data: { labels: providers.map((p) => p.provider), datasets: [{ data: providers.map((p) => Number(p[field])), backgroundColor: PALETTE }] },
      options: { plugins: { legend: { position: "right" } } },
    });
  }
}

/* Requests and API cost per day (oldest first), on two y axes. */
function dailyChart(id, page) {
  const rows = page.rows.slice().reverse();
  chart(id, {
    type: "bar",
    data: {
      labels: rows.map((r) => r.day),
      datasets: [
        { label: "Requests", data: rows.map((r) => r.requests), backgroundColor: PALETTE[0], yAxisID: "requests" },
        { label: "API cost (US$)", data: rows.map((r) => dollars(r.cost_micro)), backgroundColor: PALETTE[1], yAxisID: "cost" },
      ],
    },
    options: { scales: { requests: { position: "left", beginAtZero: true }, cost: { position: "right", beginAtZero: true, grid: { drawOnChartArea: false } } } },
  });
}

async function showOverview() {
  const [today, month] = await Promise.all([api("figures?period=today"), api("figures?period=month")]);
  renderToday(today);
  renderMonth(month.current);
  const p = month.current.period;
  dailyChart("chart-daily", await api(`usage?group=day&from=${p.from}&to=${p.to}&limit=31`));
  renderReconciliation(await api("reconcile"));
}

/* reconciliation: each source's last run, its largest shares and its differences --------- */
const share = (s) => (s === null ? "not in their report" : (Number(s) * 100).toFixed(4) + "%");

function renderReconciliation(results) {
  const runs = Object.values(results);
  table("reconcile-table",
    [{ label: "Source" }, { label: "Days" }, { label: "Ran" }, { label: "Rows", num: true },
     { label: "Result" }, { label: "Largest share by kind" }],
    runs.map((r) => [r.source, r.from === r.to ? r.from : r.from + " – " + r.to, when(r.ran_at), int(r.rows),
      r.exceeds ? "beyond " + share(r.tolerance) : r.differences.length ? "within " + share(r.tolerance) : "agrees",
      Object.entries(r.ratios).map(([kind, s]) => kind + " " + share(s)).join(", ") || "—"]));
  if (!runs.length) $("reconcile-table").append(el("caption", {}, "No reconciliation has run: set OPENAI_ADMIN_KEY / ANTHROPIC_ADMIN_KEY for the worker, or run costproxy reconcile."));
  const differences = runs.flatMap((r) => r.differences.map((d) => ({ source: r.source, ...d })));
  table("reconcile-differences",
    [{ label: "Source" }, { label: "Day" }, { label: "Subject" }, { label: "Kind" },
     { label: "Ours", num: true }, { label: "Theirs", num: true }, { label: "Share", num: true }],
    differences.slice(0, 50).map((d) => [d.source, d.day || "—", d.subject, d.kind, int(d.ours), int(d.theirs), share(d.share)]));
}

/* users ------------------------------------------------------------------------------ */
let userOffset = 0;
let userRows = [];

async function loadUsers(more) {
  userOffset = more ? userOffset : 0;
  const q = encodeURIComponent($("user-q").value.trim());
  const page = await api(`users?q=${q}&limit=50&offset=${userOffset}`);
  userRows = more ? userRows.concat(page.items) : page.items;
  userOffset = page.next_offset || userOffset;
  $("users-more").hidden = page.next_offset === null;
  table("users-table", [{ label: "User" }, { label: "Email" }, { label: "Tier" }, { label: "Status" }, { label: "Created" }],
    userRows.map((u) => [el("a", { href: "#/users/" + encodeURIComponent(u.id) }, u.id), u.email, u.tier, u.status, when(u.created_at)]));
}

async function showUser(userId) {
  const today = new Date();
  const from = new Date(today.getTime() - 29 * 86400000);
  const [detail, usage] = await Promise.all([
    api("users/" + encodeURIComponent(userId)),
    api(`usage?group=day&user=${encodeURIComponent(userId)}&from=${isoDay(from)}&to=${isoDay(today)}&limit=30`),
  ]);
  const u = detail.user, a = detail.account || {};
  $("user-title").textContent = u.email + " (" + u.id + ")";
  $("user-cards").replaceChildren(
    card("user.tier", "Tier", a.tier || u.tier, "status " + (a.status || u.status)),
    card("user.balance", "Balance", microUsd(a.balance || 0), "ledger sum " + microUsd(detail.ledger_sum_micro)),
    card("user.held", "Held", microUsd(a.held || 0), int(a.open_holds || 0) + " open holds"),
    card("user.available", "Available", microUsd(detail.available_micro || 0), ""),
    card("user.cycle", "This cycle", int(a.requests || 0) + " requests", int(a.tokens || 0) + " tokens, " + microUsd(a.cost || 0)),
    card("user.cycle_end", "Cycle ends", a.cycle_end ? when(new Date(Number(a.cycle_end)).toISOString()) : "—", ""),
  );
  dailyChart("chart-user-usage", usage);
  table("user-keys", [{ label: "Key" }, { label: "Name" }, { label: "Prefix" }, { label: "Created" }, { label: "Revoked" }],
    detail.keys.map((k) => [k.id, k.name || "—", k.key_prefix + "…", when(k.created_at), k.revoked_at ? when(k.revoked_at) : "active"]));
  table("user-ledger", [{ label: "Time" }, { label: "Kind" }, { label: "Amount", num: true }, { label: "Balance", num: true }, { label: "Reason" }, { label: "Receipt" }],
    detail.ledger.map((e) => [when(e.created_at), e.kind, microUsd(e.amount_micro), microUsd(e.balance_micro), e.reason || "", receiptLink(e)]));
}

/* A request's charge or void is the ledger entry "chg_<request id>" / "void_<request id>". */
function receiptLink(entry) {
  const settled = entry.id.match(/^(?:chg|void)_(.+)$/);
  return settled && (entry.kind === "charge" || entry.kind === "void")
    ? el("a", { href: "#/receipts/" + encodeURIComponent(settled[1]), class: "receipt" }, "receipt")
    : "";
}

async function showReceipt(requestId) {
  const r = await api("usage/" + encodeURIComponent(requestId));
  $("receipt-id").textContent = r.id;
  $("receipt-user").setAttribute("href", "#/users/" + encodeURIComponent(r.user_id));
  const tokens = r.tokens || {}, prices = r.unit_prices_usd_per_1m || {};
  const perMillion = (kind) => (prices[kind] ? "$" + prices[kind] + " / 1M" : "—");
  const rows = [
    ["Time", when(r.time)],
    ["Outcome", r.outcome + (r.void_reason ? " (" + r.void_reason + ")" : "")],
    ["Provider / model", r.provider ? r.provider + " / " + r.model : "—"],
    ["Price version", r.price_version || "—"],
    ["Price set", (r.price_set || "—") + (r.service_tier ? " (service tier " + r.service_tier + ")" : "")],
  ];
  for (const [kind, label] of [["input", "Input"], ["cached_input", "Cached input"], ["cache_write", "Cache writes (5 min)"], ["cache_write_1h", "Cache writes (1 h)"], ["output", "Output"]]) {
    rows.push([label, int(tokens[kind] || 0) + " tokens at " + perMillion(kind)]);
  }
  rows.push(["Reasoning (in output)", int(tokens.reasoning || 0) + " tokens"]);
  rows.push(["Cost", microUsd(r.cost_micro_usd) + " (" + r.cost_credits + " credits)" + (r.estimated ? ", estimated" : "")]);
  rows.push(["Balance after", microUsd(r.balance_after_micro_usd)]);
  table("receipt-table", [{ label: "" }, { label: "" }], rows);
}

/* routing ---------------------------------------------------------------------------- */
async function route() {
  const hash = window.location.hash || "#/";
  const userMatch = hash.match(/^#\/users\/(.+)$/);
  const receiptMatch = hash.match(/^#\/receipts\/(.+)$/);
  const view = receiptMatch ? "receipt" : userMatch ? "user" : hash.startsWith("#/users") ? "users" : "overview";
  for (const name of ["overview", "users", "user", "receipt"]) $("view-" + name).hidden = name !== view;
  $("nav-overview").classList.toggle("active", view === "overview");
  $("nav-users").classList.toggle("active", view !== "overview");
  $("error").hidden = true;
  delete document.body.dataset.loaded;
  try {
    if (view === "overview") await showOverview();
    else if (view === "users") await loadUsers(false);
    else if (view === "receipt") await showReceipt(decodeURIComponent(receiptMatch[1]));
    else await showUser(decodeURIComponent(userMatch[1]));
    document.body.dataset.loaded = view;
  } catch (error) {
    $("error").textContent = "Could not load: " + error.message;
    $("error").hidden = false;
  }
}

document.addEventListener("DOMContentLoaded", () => {
  Chart.defaults.animation = false;
  Chart.defaults.maintainAspectRatio = false;  /* the .chart box sets the height */
  $("user-search").addEventListener("submit", (event) => { event.preventDefault(); loadUsers(false); });
  $("users-more").addEventListener("click", () => loadUsers(true));
  window.addEventListener("hashchange", route);
  route();
});
