// DEparrow dashboard: live updates over Server-Sent Events and the charts (uPlot).
// Plain script, no build step. Pages work without it; it only keeps them current.
"use strict";

const $ = (sel, root = document) => root.querySelector(sel);
const $$ = (sel, root = document) => Array.from(root.querySelectorAll(sel));
const fmtCredits = (micro) => {
  const v = micro / 1e6;
  if (!v) return "0";
  if (Math.abs(v) >= 100) return v.toFixed(0);
  if (Math.abs(v) >= 1) return v.toFixed(2);
  return String(Number(v.toPrecision(3)));
};
// An exact amount ("99.994446") as the money filter shows it (hub/web/filters.py, credits):
// two decimals without a bare ".00", or three significant digits below 0.01. Python's
// f"{n:,.2f}" rounds an exact tie (x.125, x.375...) to even where toFixed rounds it up.
function credits(exact) {
  const n = Number(exact);
  if (!n) return "0";
  const a = Math.abs(n);
  if (a < 0.01) return a >= 1e-4 ? trimZeros(n.toPrecision(3)) : trimZeros(n.toFixed(6));
  let cents = Number(a.toFixed(2).replace(".", ""));
  if (Number.isInteger(a * 8) && (a * 8) % 2 === 1 && cents % 2 === 1) cents -= 1;
  const whole = Math.floor(cents / 100).toString().replace(/\B(?=(\d{3})+$)/g, ",");
  const frac = cents % 100;
  return (n < 0 ? "-" : "") + whole + (frac ? "." + String(frac).padStart(2, "0") : "");
}
const trimZeros = (s) => s.replace(/0+$/, "").replace(/\.$/, "");
window.dpCredits = credits; // for the browser tests

const DAY = 86400;
const charts = {};
window.dpCharts = charts; // for the browser tests and the curious

// --- regions: parts of a page that are fetched again when something they show changes ---
let refreshTimer = null;
const pendingKinds = new Set();
function refreshRegions(kind) {
  pendingKinds.add(kind);
  clearTimeout(refreshTimer);
  refreshTimer = setTimeout(async () => {
    const kinds = new Set(pendingKinds);
    pendingKinds.clear();
    const regions = $$("[data-region]").filter((el) =>
      (el.dataset.refresh || "").split(" ").some((k) => kinds.has(k)));
    if (!regions.length) return;
    const url = document.body.dataset.refreshUrl || location.href;
    const response = await fetch(url, { credentials: "same-origin" });
    if (!response.ok || response.redirected) return;
    const doc = new DOMParser().parseFromString(await response.text(), "text/html");
    for (const el of regions) {
      const fresh = doc.querySelector(`[data-region="${el.dataset.region}"]`);
      if (fresh && fresh.innerHTML !== el.innerHTML) {
        el.innerHTML = fresh.innerHTML;
        if (el.dataset.region === "hourly") redrawHourly();
      }
    }
  }, 250);
}

function setState(kind, id, state) {
  for (const el of $$(`[data-${kind}-state="${id}"]`)) {
    // "completed · exit 3" was rendered by the server, which knows the exit code: keep it.
    if (el.dataset.exit && state === "completed") continue;
    el.textContent = state;
    el.className = `pill s-${state}`;
  }
}

// --- the event stream ---------------------------------------------------------------------
function connect() {
  const dot = $("#live-dot");
  if (!dot || !window.EventSource) return;
  const es = new EventSource("/live");
  es.addEventListener("hello", () => {
    dot.className = "live-dot on";
    dot.title = "Live: updates arrive as they happen";
    // Whatever changed between rendering the page and connecting (or while reconnecting):
    // fetch the live parts once more.
    refreshRegions("job"); refreshRegions("node"); refreshRegions("wallet");
  });
  es.onerror = () => { dot.className = "live-dot off"; dot.title = "Live updates lost; retrying…"; };
  es.addEventListener("job", (e) => {
    const ev = JSON.parse(e.data);
    setState("job", ev.id, ev.state);
    refreshRegions("job");
  });
  es.addEventListener("node", (e) => {
    const ev = JSON.parse(e.data);
    setState("node", ev.id, ev.state);
    refreshRegions("node");
  });
  es.addEventListener("beat", (e) => {
    const ev = JSON.parse(e.data);
    const known = $(`[data-node-state="${ev.id}"]`);
    if (known) setState("node", ev.id, ev.state);
    else if ($('[data-region="nodes"]')) refreshRegions("node"); // a node we have not listed
    const chart = charts.beats;
    if (chart && chart.node === ev.id) {
      chart.beats.push(ev);
      if (chart.beats.length > 240) chart.beats.shift();
      chart.plot.setData(beatSeries(chart.beats));
    }
  });
  es.addEventListener("wallet", (e) => {
    const w = JSON.parse(e.data);
    for (const key of ["balance", "held"]) {
      for (const el of $$(`[data-bind="${key}"]`)) {
        el.textContent = credits(w[key]);
        el.title = `${w[key]} credits`;
      }
    }
    if (charts.wallet) loadWalletChart();
    refreshRegions("wallet");
  });
}

// --- charts -------------------------------------------------------------------------------
function width(el) { return Math.max(280, el.clientWidth); }

const STATE_COLORS = { completed: "#16a34a", running: "#2563eb", assigned: "#60a5fa",
  queued: "#eab308", failed: "#dc2626", cancelled: "#98a2b3" };
const bars = () => uPlot.paths.bars({ size: [0.7, 40] });

function hourlyChart(el) {
  const data = JSON.parse($("#hourly-data").textContent);
  const order = ["completed", "running", "assigned", "queued", "failed", "cancelled"]
    .filter((s) => data.series[s]);
  // Stacked bars: each series is drawn as the running total, the tallest first.
  const totals = [];
  let acc = data.t.map(() => 0);
  for (const s of order) { acc = acc.map((v, i) => v + data.series[s][i]); totals.push(acc); }
  const series = [{}];
  const values = [data.t];
  for (let i = order.length - 1; i >= 0; i--) {
    series.push({ label: order[i], fill: STATE_COLORS[order[i]], stroke: STATE_COLORS[order[i]], paths: bars(), points: { show: false },
      value: (u, v, si, idx) => idx == null ? "" : String(data.series[order[i]][idx]) });
    values.push(totals[i]);
  }
  if (!order.length) { series.push({ label: "jobs", stroke: "#98a2b3" }); values.push(data.t.map(() => 0)); }
  const opts = { width: width(el), height: 220, series,
    scales: { x: { time: true }, y: { range: (u, min, max) => [0, Math.max(4, max * 1.1)] } },
    axes: [{}, { size: 40 }], legend: { live: false } };
  charts.hourly = { plot: new uPlot(opts, values, el), el };
}

// The per-hour counts came again with the page's "hourly" region: draw them (the set of
// states may have changed, so the chart is built afresh rather than given new data).
function redrawHourly() {
  const c = charts.hourly;
  if (!c || !window.uPlot) return;
  c.plot.destroy();
  hourlyChart(c.el);
}

// Earned and spent per day, each kind of money its own series on a log scale: a job of
// 0.003 credits stays visible beside a welcome grant of 100. data[1] and data[2] are the
// day's totals (hidden: the kinds add up to them; the legend can show them).
const WALLET_KINDS = [
  ["earned_by", "work", "node work", "#16a34a"], ["earned_by", "uptime", "uptime", "#22c55e"],
  ["earned_by", "bonus", "bonuses", "#84cc16"], ["earned_by", "grant", "grants", "#0ea5e9"],
  ["earned_by", "received", "received", "#14b8a6"], ["spent_by", "compute", "compute", "#f97316"],
  ["spent_by", "calls", "service calls", "#a855f7"], ["spent_by", "sent", "sent", "#dc2626"],
  ["spent_by", "held", "held (running)", "#eab308"]];

async function loadWalletChart() {
  const c = charts.wallet;
  const r = await fetch(`/wallet/chart.json?days=${c.days}`, { credentials: "same-origin" });
  if (!r.ok) return;
  const d = await r.json();
  const sum = (a) => a.reduce((x, y) => x + y, 0);
  const today = d.t.length - 1;
  const parts = (side) => WALLET_KINDS.filter((k) => k[0] === side && d[side][k[1]][today])
    .map((k) => `${k[2]} ${fmtCredits(d[side][k[1]][today])}`).join(", ");
  for (const el of $$("[data-chart-sum]")) {
    el.innerHTML = `Today: earned <b>${fmtCredits(d.earned[today])}</b>${parts("earned_by") ? ` (${parts("earned_by")})` : ""}, ` +
      `spent <b>${fmtCredits(d.spent[today])}</b>${parts("spent_by") ? ` (${parts("spent_by")})` : ""} · ` +
      `last ${c.days} days: earned <b>${fmtCredits(sum(d.earned))}</b>, spent <b>${fmtCredits(sum(d.spent))}</b> credits`;
  }
  // A kind with nothing in the range is left out; zeros are gaps (a log scale has no 0).
  const kinds = WALLET_KINDS.filter((k) => d[k[0]][k[1]].some((v) => v > 0));
  const key = kinds.map((k) => k[1]).join();
  const data = [d.t, d.earned.map((v) => v / 1e6), d.spent.map((v) => v / 1e6),
    ...kinds.map((k) => d[k[0]][k[1]].map((v) => (v > 0 ? v / 1e6 : null)))];
  if (c.plot && c.key === key) { c.plot.setData(data); return; }
  if (c.plot) c.plot.destroy();
  const value = (u, v) => v == null ? "" : fmtCredits(v * 1e6);
  const series = [{},
    { label: "earned", stroke: "#16a34a", show: false, value },
    { label: "spent", stroke: "#f97316", show: false, value },
    // Markers, not bars: on a log scale a bar's height means little, and markers of several
    // kinds on one day do not hide each other.
    ...kinds.map((k) => ({ label: k[2], stroke: k[3], value, paths: () => null,
      points: { show: true, size: 10, width: 2, fill: k[3] + "99" } }))];
  const opts = { width: width(c.el), height: 240, series, legend: { live: false },
    scales: { x: { time: true, range: (u, min, max) => [min - DAY / 2, max + DAY / 2] },
              y: { distr: 3, log: 10, range: (u, min, max) => [Math.min(0.001, min || 1), 10 ** Math.ceil(Math.log10(Math.max(1, max || 1) * 1.5))] } },
    axes: [{ space: 60, values: (u, ts) => ts.map((t) => new Date(t * 1000).toLocaleDateString(undefined, { month: "short", day: "numeric" })) },
           { size: 60, values: (u, vs) => vs.map((v) => (Math.abs(Math.log10(v) - Math.round(Math.log10(v))) < 1e-6 ? fmtCredits(v * 1e6) : "")) }] };
  c.plot = new uPlot(opts, data, c.el);
  c.key = key;
  c.el.dataset.ready = "1";
}

function beatSeries(beats) {
  return [beats.map((b) => b.t), beats.map((b) => b.load), beats.map((b) => b.cpu)];
}

function beatsChart(el) {
  const beats = JSON.parse($("#beats-data").textContent);
  const opts = { width: width(el), height: 200,
    series: [{}, { label: "load", stroke: "#2563eb", width: 2, fill: "#2563eb22" },
                 { label: "CPU offered", stroke: "#0f766e", width: 2, dash: [6, 4] }],
    legend: { live: false },
    scales: { x: { time: true }, y: { range: (u, min, max) => [0, Math.max(1, max * 1.2)] } },
    axes: [{}, { size: 40 }] };
  charts.beats = { plot: new uPlot(opts, beatSeries(beats), el), beats, node: el.dataset.node };
}

function drawCharts() {
  if (!window.uPlot) return;
  const h = $('[data-chart="hourly"]');
  if (h) hourlyChart(h);
  const w = $('[data-chart="wallet"]');
  if (w) { charts.wallet = { el: w, days: Number(w.dataset.days || 14) }; loadWalletChart(); }
  const b = $('[data-chart="beats"]');
  if (b) beatsChart(b);
  window.addEventListener("resize", () => {
    for (const c of Object.values(charts)) if (c.plot) c.plot.setSize({ width: width(c.el || c.plot.root.parentNode), height: c.plot.height });
  });
}

// --- layout -------------------------------------------------------------------------------
function menu() {
  const button = $("#menu-button");
  const links = $("#top-menu");
  if (!button || !links) return;
  button.addEventListener("click", () => {
    const open = links.classList.toggle("open");
    button.setAttribute("aria-expanded", String(open));
  });
}

// --- forms --------------------------------------------------------------------------------
function submitForm() {
  const form = $("#submit-form");
  if (!form) return;
  const sync = () => {
    const source = $('input[name="source"]:checked', form).value;
    for (const el of $$("[data-source]", form)) el.classList.toggle("inactive", el.dataset.source !== source);
  };
  for (const r of $$('input[name="source"]', form)) r.addEventListener("change", sync);
  sync();
  const example = $("#example", form);
  example.addEventListener("change", () => {
    const opt = example.selectedOptions[0];
    $("#entrypoint", form).value = opt.dataset.entrypoint;
    $("#args", form).value = opt.dataset.args;
  });
  // Changing anything after the price was shown asks for the price again.
  for (const el of $$("input:not([type=hidden]), select", form)) {
    el.addEventListener("change", () => {
      const step = $('input[name="step"]', form);
      if (step && step.value === "confirm") { step.value = "review"; form.submit(); }
    });
  }
  const open = $("#open-submit");
  if (open) open.addEventListener("click", () => { $("#submit").open = true; });
  if (location.hash === "#submit") $("#submit").open = true;
}

function copyButtons() {
  for (const b of $$("[data-copy]")) {
    b.addEventListener("click", async () => {
      const text = $(b.dataset.copy).textContent.trim();
      try { await navigator.clipboard.writeText(text); b.textContent = "Copied"; }
      catch { const r = document.createRange(); r.selectNodeContents($(b.dataset.copy)); getSelection().removeAllRanges(); getSelection().addRange(r); b.textContent = "Selected: press Ctrl+C"; }
    });
  }
}

document.documentElement.classList.add("js"); // the narrow layout folds the menu only with us

document.addEventListener("DOMContentLoaded", () => {
  menu();
  drawCharts();
  submitForm();
  copyButtons();
  connect();
});
