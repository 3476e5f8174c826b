// The subscriber portal: one page, four views (#overview, #keys, #plan, #sessions), all
// data from /portal/api. Every change sends the page's CSRF token. No framework, no CDN.
"use strict";

const CSRF = document.querySelector('meta[name="csrf-token"]').content;
const VIEWS = ["overview", "keys", "plan", "sessions"];
const MICRO_PER_CREDIT = 10000;
const MICRO_PER_USD = 1000000;

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs)) {
    if (name === "text") node.textContent = value;
    else if (name.startsWith("on")) node.addEventListener(name.slice(2), value);
    else node.setAttribute(name, value);
  }
  for (const child of children) node.append(child);
  return node;
}

function fixed(micro, unit, places) {
  // exact decimal formatting of an integer amount (as the server's proxy.money does)
  const sign = micro < 0 ? "-" : "";
  const abs = Math.abs(micro);
  const whole = Math.floor(abs / unit).toLocaleString("en-US");
  return `${sign}${whole}.${String(abs % unit).padStart(places, "0")}`;
}
const credits = (micro) => fixed(micro, MICRO_PER_CREDIT, 4);
const usd = (micro) => "$" + fixed(micro, MICRO_PER_USD, 6);
const cents = (amount) => "$" + fixed(amount, 100, 2);
const count = (n) => n.toLocaleString("en-US");
// an ISO 8601 time or epoch milliseconds, as "YYYY-MM-DD HH:MM" (UTC)
const when = (time) => (time ? new Date(time).toISOString().slice(0, 16).replace("T", " ") : "—");

async function api(method, path, body) {
  const options = { method, headers: { Accept: "application/json" }, credentials: "same-origin" };
  if (method !== "GET") {
    options.headers["X-CSRF-Token"] = CSRF;
    options.headers["Content-Type"] = "application/json";
    options.body = JSON.stringify(body || {});
  }
  const response = await fetch("/portal/api/" + path, options);
  if (response.status === 401) {
    window.location.assign("/portal/sign-in");
    throw new Error("signed out");
  }
  const data = await response.json();
  if (!response.ok) throw new Error((data.error && data.error.message) || response.statusText);
  return data;
}

function showError(error) {
  document.getElementById("error").textContent = error ? String(error.message || error) : "";
}

function fillTable(id, rows) {
  const body = document.querySelector(`#${id} tbody`);
  body.replaceChildren(...rows);
}

function cell(text, numeric = false) {
  return el("td", numeric ? { class: "num", text } : { text });
}

// overview ---------------------------------------------------------------------------
function setFigure(name, value, note = "") {
  const card = document.querySelector(`[data-figure="${name}"]`);
  card.querySelector(".value").textContent = value;
  const noteNode = card.querySelector(".note");
  if (noteNode) noteNode.textContent = note;
}

function setMeter(name, used, limit, describe) {
  const meter = document.querySelector(`[data-meter="${name}"]`);
  const bar = meter.querySelector("progress");
  if (limit === null || limit === undefined) {
    bar.max = 1;
    bar.value = 0;
    meter.querySelector(".note").textContent = `${describe(used)} (unlimited)`;
    return;
  }
  bar.max = Math.max(limit, 1);
  bar.value = Math.min(Math.max(used, 0), bar.max);
  meter.querySelector(".note").textContent = `${describe(used)} of ${describe(limit)}`;
}

function drawChart(daily) {
  const days = [...new Set(daily.map((row) => row.day))].sort();
  const models = [...new Set(daily.map((row) => row.model))].sort();
  const palette = ["#1f4fb5", "#b45309", "#17803d", "#9f1c12", "#6b21a8", "#0e7490", "#4b5563"];
  const datasets = models.map((model, i) => ({
    label: model,
    backgroundColor: palette[i % palette.length],
    data: days.map((day) => {
      const row = daily.find((r) => r.day === day && r.model === model);
      return row ? row.cost_micro / MICRO_PER_USD : 0;
    }),
  }));
  const existing = Chart.getChart("chart-usage");
  if (existing) existing.destroy();
  new Chart(document.getElementById("chart-usage"), {
    type: "bar",
    data: { labels: days, datasets },
    options: {
      maintainAspectRatio: false,
      animation: false,
      scales: { x: { stacked: true }, y: { stacked: true, title: { display: true, text: "US dollars" } } },
    },
  });
}

async function loadOverview() {
  const [view, use] = await Promise.all([api("GET", "overview"), api("GET", "usage")]);
  const tier = view.tier;
  const allowance = tier.allowance_micro || 0;
  setFigure("tier", tier.name, `status: ${view.status.replace("_", " ")}`);
  setFigure("credits", credits(view.balance_micro), `of ${credits(allowance)} credits · ${usd(view.balance_micro)} of ${usd(allowance)}`);
  setFigure("held", credits(view.held_micro));
  setFigure("cycle", when(view.cycle.end_ms));
  setMeter("credits", view.cost_micro, allowance, credits);
  setMeter("tokens", view.tokens, tier.monthly_tokens, count);
  setMeter("requests", view.requests, tier.monthly_requests, count);
  const banner = document.getElementById("banner");
  if (view.payment_failed) {
    const link = view.payment_failed.invoice_url
      ? el("a", { href: view.payment_failed.invoice_url, text: "Pay the invoice" })
      : el("a", { href: "#plan", text: "Update your card" });
    banner.replaceChildren("Your last payment failed: your paid credits stay usable for a grace period. ", link);
    banner.hidden = false;
  } else {
    banner.hidden = true;
  }
  drawChart(use.daily);
  fillTable(
    "recent",
    use.recent.map((r) =>
      el("tr", {}, cell(when(r.created_at)), cell(`${r.provider}/${r.model}`), cell(count(r.input_tokens), true),
        cell(count(r.output_tokens), true), cell(usd(r.cost_micro) + (r.estimated ? " (estimated)" : ""), true),
        el("td", {}, el("a", { href: "#receipt/" + encodeURIComponent(r.request_id), "aria-label": `Receipt of the request at ${when(r.created_at)}`, text: "receipt" }))),
    ),
  );
  fillTable(
    "credited",
    view.credited.map((r) =>
      // a reset sets the balance (a new cycle's allowance); the others add to it
      el("tr", {}, cell(when(r.created_at)), cell(r.reason || r.kind),
        cell(r.kind === "reset" ? `set to ${credits(r.balance_micro)}` : "+" + credits(r.amount_micro), true)),
    ),
  );
}

// receipt ----------------------------------------------------------------------------
async function loadReceipt(requestId) {
  const r = await api("GET", "usage/" + encodeURIComponent(requestId));
  document.getElementById("receipt-id").textContent = r.id;
  document.getElementById("receipt-api").textContent = "GET /api/usage/" + r.id;
  const tokens = r.tokens || {};
  const prices = r.unit_prices_usd_per_1m || {};
  const rows = [
    ["Time (UTC)", when(r.time)],
    ["Outcome", r.outcome + (r.void_reason ? ` (${r.void_reason})` : "")],
    ["Model", r.provider ? `${r.provider}/${r.model}` : "—"],
    ["Prices", r.price_version ? `version ${r.price_version}, ${r.price_set}` : "—"],
  ];
  for (const [kind, label] of [["input", "Input"], ["cached_input", "Cached input"], ["cache_write", "Cache writes (5 min)"], ["cache_write_1h", "Cache writes (1 h)"], ["output", "Output"]]) {
    if (tokens[kind]) rows.push([label, `${count(tokens[kind])} tokens at $${prices[kind] || "?"} per million`]);
  }
  rows.push(["Cost", `${usd(r.cost_micro_usd)} (${r.cost_credits} credits)${r.estimated ? ", estimated" : ""}`]);
  rows.push(["Credits left after", credits(r.balance_after_micro_usd)]);
  document.getElementById("receipt").replaceChildren(...rows.flatMap(([term, value]) => [el("dt", { text: term }), el("dd", { text: value })]));
}

// keys -------------------------------------------------------------------------------
function revokeButton(key) {
  const label = key.name || key.key_prefix;
  const button = el("button", { type: "button", class: "danger", text: "Revoke", "aria-label": `Revoke key ${label}` });
  button.addEventListener("click", async () => {
    if (button.dataset.armed !== "1") {
      button.dataset.armed = "1";
      button.textContent = "Confirm revoke";
      return;
    }
    button.disabled = true;
    try {
      await api("POST", `keys/${encodeURIComponent(key.id)}/revoke`);
      await loadKeys();
    } catch (error) {
      showError(error);
      button.disabled = false;
    }
  });
  return button;
}

async function loadKeys() {
  const keys = await api("GET", "keys");
  fillTable(
    "keys",
    keys.map((key) => {
      const revoked = key.revoked_at !== null;
      return el("tr", { "data-key": key.id }, cell(key.name || "(unnamed)"), cell(key.key_prefix + "…"), cell(when(key.created_at)),
        cell(key.last_used_day || "never"), cell(revoked ? "revoked" : "active"),
        el("td", {}, revoked ? "" : revokeButton(key)));
    }),
  );
}

document.getElementById("new-key-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  showError(null);
  try {
    const created = await api("POST", "keys", { name: document.getElementById("key-name").value });
    const box = document.getElementById("new-key-box");
    document.getElementById("new-key").value = created.api_key;
    box.hidden = false;
    document.getElementById("new-key").focus();
    document.getElementById("key-name").value = "";
    await loadKeys();
  } catch (error) {
    showError(error);
  }
});

// plan -------------------------------------------------------------------------------
let pending = null; // the change waiting for confirmation

function describeTier(tier) {
  const limit = (value, unit) => (value === null ? `unlimited ${unit}` : `${count(value)} ${unit}`);
  return el(
    "ul",
    {},
    el("li", { text: `${credits(tier.allowance_micro)} credits (${usd(tier.allowance_micro)}) of API use per cycle` }),
    el("li", { text: limit(tier.monthly_tokens, "tokens per cycle") }),
    el("li", { text: limit(tier.monthly_requests, "requests per cycle") }),
    el("li", { text: limit(tier.rpm, "requests per minute") }),
    el("li", { text: `Providers: ${tier.providers.join(", ")}` }),
  );
}

async function choose(tier, action) {
  showError(null);
  try {
    if (action === "subscribe") {
      const session = await api("POST", "plan/checkout", { tier: tier.name });
      window.location.assign(session.url);
      return;
    }
    if (action === "billing_portal") {
      await openBillingPortal();
      return;
    }
    const preview = await api("POST", "plan/preview", { tier: tier.name });
    const text =
      preview.change === "upgrade"
        ? `Upgrade to ${tier.name} now: ${cents(preview.amount_due)} is charged today, prorated for the rest of this period, ` +
          "and you get the difference of the allowances for the rest of the cycle."
        : `Switch to ${tier.name} at the end of this period (${when(preview.effective_at * 1000)} UTC). Nothing is charged now.`;
    pending = tier.name;
    document.getElementById("confirm-text").textContent = text;
    document.getElementById("confirm").hidden = false;
    document.getElementById("confirm-yes").focus();
  } catch (error) {
    showError(error);
  }
}

async function openBillingPortal() {
  const link = await api("POST", "plan/billing-portal");
  window.location.assign(link.url);
}

document.getElementById("confirm-yes").addEventListener("click", async () => {
  const tier = pending;
  document.getElementById("confirm").hidden = true;
  pending = null;
  try {
    const done = await api("POST", "plan/change", { tier });
    document.getElementById("plan-note").textContent =
      done.change === "upgrade"
        ? `Upgrade to ${done.tier} requested (${cents(done.amount_charged)}). The new tier and its credits apply as soon as the payment succeeds.`
        : `Your plan changes to ${done.tier} at the end of this period.`;
  } catch (error) {
    showError(error);
  }
});
document.getElementById("confirm-no").addEventListener("click", () => {
  pending = null;
  document.getElementById("confirm").hidden = true;
});
document.getElementById("billing-portal").addEventListener("click", () => openBillingPortal().catch(showError));

const ACTIONS = { subscribe: "Subscribe", upgrade: "Upgrade", downgrade: "Downgrade", billing_portal: "Cancel in billing portal" };

async function loadPlan() {
  const plans = await api("GET", "plans");
  document.getElementById("billing-portal").hidden = !plans.has_customer;
  document.getElementById("tiers").replaceChildren(
    ...plans.tiers.map((tier) => {
      const card = el("article", { class: "tier" + (tier.action === "current" ? " current" : ""), "data-tier": tier.name },
        el("h2", { text: tier.name }), el("p", { class: "price", text: `$${tier.price_usd} / month` }), describeTier(tier));
      if (tier.action === "current") card.append(el("p", { text: "Your current plan" }));
      else if (ACTIONS[tier.action]) {
        card.append(el("button", { type: "button", text: ACTIONS[tier.action], "aria-label": `${ACTIONS[tier.action]}: ${tier.name}`,
          onclick: () => choose(tier, tier.action) }));
      }
      return card;
    }),
  );
}

// sessions ---------------------------------------------------------------------------
async function loadSessions() {
  const sessions = await api("GET", "sessions");
  fillTable(
    "sessions",
    sessions.map((s) => {
      const action = s.current
        ? el("span", { text: "this browser" })
        : el("button", { type: "button", class: "danger", text: "Sign out", "aria-label": `Sign out the browser signed in ${when(s.created_at)}`,
            onclick: async () => { try { await api("POST", `sessions/${encodeURIComponent(s.id)}/revoke`); await loadSessions(); } catch (e) { showError(e); } } });
      const agent = el("td", { class: "wrap", title: s.user_agent, text: browserName(s.user_agent) });
      return el("tr", { "data-session": s.id }, agent, cell(s.client), cell(when(s.created_at)), cell(when(s.last_seen_at)), el("td", {}, action));
    }),
  );
}

// "Chrome on Linux" from a User-Agent string (the whole string is the cell's title)
function browserName(agent) {
  const browser = [["Edg/", "Edge"], ["Firefox/", "Firefox"], ["Chrome/", "Chrome"], ["Safari/", "Safari"]].find(([t]) => agent.includes(t));
  const system = [["Android", "Android"], ["iPhone", "iPhone"], ["iPad", "iPad"], ["Windows", "Windows"], ["Mac OS X", "macOS"], ["Linux", "Linux"]]
    .find(([t]) => agent.includes(t));
  if (!browser && !system) return agent || "unknown";
  return `${browser ? browser[1] : "A browser"}${system ? " on " + system[1] : ""}`;
}

// routing ----------------------------------------------------------------------------
const LOADERS = { overview: loadOverview, keys: loadKeys, plan: loadPlan, sessions: loadSessions };

async function route() {
  const [name, argument] = location.hash.slice(1).split("/");
  const view = name === "receipt" && argument ? "receipt" : VIEWS.includes(name) ? name : "overview";
  const section = view === "receipt" ? "overview" : view; // a receipt belongs to the overview
  for (const other of [...VIEWS, "receipt"]) document.getElementById(`view-${other}`).hidden = other !== view;
  for (const other of VIEWS) {
    const link = document.getElementById(`nav-${other}`);
    if (other === section) link.setAttribute("aria-current", "page");
    else link.removeAttribute("aria-current");
  }
  showError(null);
  delete document.body.dataset.loaded;
  try {
    await (view === "receipt" ? loadReceipt(decodeURIComponent(argument)) : LOADERS[view]());
    document.body.dataset.loaded = view;
  } catch (error) {
    showError(error);
  }
}

window.addEventListener("hashchange", route);
route();
