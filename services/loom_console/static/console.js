// The agentloom console: plain DOM, no framework, no build step.
// Run data is always rendered as text (textContent), never parsed as HTML.
"use strict";

const state = { csrf: "", statuses: {}, live: null, listLive: null };

// ------------------------------------------------------------------ small helpers

function h(tag, attrs, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k === "class") el.className = v;
    else if (k === "text") el.textContent = String(v);
    else if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
    else el.setAttribute(k, v === true ? "" : String(v));
  }
  for (const c of children.flat()) {
    if (c === null || c === undefined || c === false) continue;
    el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return el;
}

// replaceChildren, leaving out the absent parts (null would become the text "null")
function put(el, ...children) {
  el.replaceChildren(...children.flat().filter((c) => c !== null && c !== undefined && c !== false));
  return el;
}

function json(value) { return JSON.stringify(value, null, 2); }
function pre(value) { return h("pre", { tabindex: 0 }, typeof value === "string" ? value : json(value)); }
function badge(status) { return h("span", { class: `badge s-${status}`, "data-status": status }, status); }
function when(iso) { return iso ? new Date(iso).toLocaleString() : "–"; }
function ms(v) {
  if (v === null || v === undefined) return "–";
  if (v < 1000) return `${v.toFixed(v < 10 ? 1 : 0)} ms`;
  if (v < 60000) return `${(v / 1000).toFixed(2)} s`;
  return `${(v / 60000).toFixed(1)} min`;
}
function money(v) { return v ? `$${v.toFixed(4)}` : "–"; }
function runLink(id) { return h("a", { href: `#/run/${encodeURIComponent(id)}` }, id); }

function notice(text, bad) {
  const el = document.getElementById("notice");
  el.className = bad ? "bad" : "";
  el.textContent = text || "";
}

function main(...children) {
  const m = document.getElementById("main");
  put(m, ...children);
  return m;
}

class ApiFailure extends Error {
  constructor(status, body) {
    const err = (body && body.error) || {};
    super(`${err.code || status}: ${err.message || "request failed"}`);
    this.status = status;
    this.body = body;
  }
}

async function api(path, options) {
  const opts = options || {};
  const init = { method: opts.method || "GET", headers: {} };
  if (opts.body !== undefined) {
    init.method = "POST";
    init.headers["Content-Type"] = "application/json";
    init.headers["X-Loom-CSRF"] = state.csrf;
    init.body = JSON.stringify(opts.body);
  }
  const res = await fetch(path, init);
  const body = await res.json().catch(() => ({}));
  if (!res.ok && !opts.allowError) throw new ApiFailure(res.status, body);
  return opts.allowError ? { status: res.status, body } : body;
}

function closeLive() {
  if (state.live) { state.live.close(); state.live = null; }
  if (state.listLive) { state.listLive.close(); state.listLive = null; }
}

function debounce(fn, wait) {
  let t = null;
  return (...args) => { clearTimeout(t); t = setTimeout(() => fn(...args), wait); };
}

// One call at a time: a call asked for meanwhile runs once, after it.
function serial(fn) {
  let running = false;
  let again = false;
  const run = async () => {
    if (running) { again = true; return; }
    running = true;
    try { await fn(); } finally {
      running = false;
      if (again) { again = false; run(); }
    }
  };
  return run;
}

// At most one call per `wait` ms, the last one always made: a busy run keeps redrawing
// (a debounce would wait for a quiet moment that may never come).
function throttle(fn, wait) {
  let last = 0;
  let timer = null;
  return () => {
    if (timer) return;
    const due = Math.max(0, last + wait - Date.now());
    timer = setTimeout(() => { timer = null; last = Date.now(); fn(); }, due);
  };
}

function params() {
  const hash = location.hash.slice(1) || "/runs";
  const [path, query] = hash.split("?");
  return { path, query: new URLSearchParams(query || "") };
}

// ------------------------------------------------------------------ router

async function route() {
  closeLive();
  notice("");
  const { path, query } = params();
  try {
    if (path.startsWith("/run/")) await runPage(decodeURIComponent(path.slice(5)), query);
    else if (path === "/submit") submitPage();
    else if (path === "/diff") await diffPage(query);
    else await runsPage(query);
  } catch (e) {
    main(h("h1", {}, "Something went wrong"), h("p", { class: "field-error" }, e.message));
  }
  document.getElementById("main").focus({ preventScroll: true });
}

// ------------------------------------------------------------------ runs list

const FILTERS = [
  ["since", "Started since", "1h, 2d or a date"],
  ["until", "Started before", "1h, 2d or a date"],
  ["tool", "Tool", "e.g. echo"],
  ["model", "Model", ""],
  ["error", "Error code", ""],
  ["label", "Label", "key=value"],
];

async function runsPage(query) {
  const form = h("form", { class: "filters", role: "search", "aria-label": "Filter runs" });
  const status = h("select", { name: "status", id: "f-status" },
    h("option", { value: "" }, "any"),
    Object.keys(state.statuses).map((s) => h("option", { value: s, selected: query.get("status") === s }, s)));
  form.append(h("label", { for: "f-status" }, "Status", status));
  for (const [name, text, hint] of FILTERS) {
    form.append(h("label", {}, text, h("input", { name, value: query.get(name) || "", placeholder: hint, size: 12 })));
  }
  form.append(h("button", { type: "submit", class: "primary" }, "Filter"));
  form.addEventListener("submit", (ev) => {
    ev.preventDefault();
    const q = new URLSearchParams();
    for (const [k, v] of new FormData(form)) if (v) q.set(k, v);
    location.hash = `#/runs?${q}`;
  });
  const waiting = h("section", { "aria-label": "Runs waiting for people" });
  const body = h("tbody");
  const table = h("div", { class: "scroll" }, h("table", { id: "runs" },
    h("caption", { class: "muted" }, "Newest first; updates live"),
    h("thead", {}, h("tr", {}, ["Run", "Plan", "Status", "Started", "Duration", "Steps", "Tokens", "Cost", "Waiting for"]
      .map((t, i) => h("th", { scope: "col", class: i > 3 && i < 8 ? "num" : (i === 8 ? "hide-narrow" : "") }, t)))),
    body));
  const more = h("button", { type: "button", hidden: true }, "More runs");
  main(h("h1", {}, "Runs"), form, waiting, table, more);

  let after = "";
  const load = async (append) => {
    const q = new URLSearchParams(query);
    q.set("limit", "50");
    if (append) q.set("after", after);
    const page = await api(`/api/runs?${q}`);
    after = page.next_after;
    more.hidden = !after;
    const rows = page.runs.map(runRow);
    if (append) body.append(...rows); else put(body, ...rows);
    if (!append && !query.get("status")) {
      // what waits for people comes first, whatever page of the list is shown
      const people = (await api("/api/runs?status=suspended&limit=20")).runs;
      put(waiting, people.length ? [h("h2", {}, `Waiting for people (${people.length}${people.length === 20 ? "+" : ""})`),
        h("ul", { id: "waiting" }, people.map((r) => h("li", {}, runLink(r.run_id), ` ${r.name || ""} — `, r.waiting.join("; "))))] : null);
    }
    if (!page.runs.length && !append) body.append(h("tr", {}, h("td", { colspan: 9, class: "muted" }, "No runs match.")));
  };
  more.addEventListener("click", () => load(true).catch((e) => notice(e.message, true)));
  await load(false);
  const reload = throttle(serial(() => load(false).catch((e) => notice(e.message, true))), 1000);
  state.listLive = new EventSource("/api/runs/live");
  state.listLive.addEventListener("progress", reload);
}

function runRow(r) {
  return h("tr", { "data-run": r.run_id },
    h("td", { class: "mono" }, runLink(r.run_id), r.forked_from ? h("div", { class: "muted" }, "fork of ", runLink(r.forked_from)) : null),
    h("td", {}, r.name || h("span", { class: "muted" }, "(unnamed)"),
      Object.entries(r.labels).map(([k, v]) => h("div", { class: "muted mono" }, `${k}=${v}`))),
    h("td", {}, badge(r.status)),
    h("td", {}, when(r.started_at)),
    h("td", { class: "num" }, ms(r.duration_ms)),
    h("td", { class: "num" }, `${r.steps_done}/${r.steps_total}`),
    h("td", { class: "num" }, r.input_tokens + r.output_tokens || "–"),
    h("td", { class: "num" }, money(r.cost_usd)),
    h("td", { class: "hide-narrow" }, r.waiting.join("; ")));
}

// ------------------------------------------------------------------ one run

const ENDED = ["completed", "failed", "rejected", "cancelled"];
const TABS = ["Timeline", "Events", "State", "Trace", "Calls", "Stats"];

async function runPage(runId, query) {
  const rid = encodeURIComponent(runId);
  let view = await api(`/api/runs/${rid}`);
  const header = h("section", { "aria-label": "Run" });
  const actions = h("div", { class: "actions", role: "group", "aria-label": "Act on the run" });
  const suspensions = h("section", { "aria-label": "Waiting for a person" });
  const result = h("section", { "aria-live": "polite", id: "action-result" });
  const tablist = h("div", { role: "tablist", "aria-label": "Views of the run" });
  const panel = h("section", { role: "tabpanel", id: "panel", tabindex: 0 });
  let tab = TABS.includes(query.get("tab")) ? query.get("tab") : "Timeline";
  const eventsView = { after: 0, follow: true, selected: null };

  const drawHeader = () => {
    put(header, 
      h("h1", {}, view.name || "run", " ", h("span", { class: "mono muted" }, view.run_id), " ", badge(view.status)),
      h("div", { class: "facts" },
        fact("Started", when(view.started_at)), fact("Ended", when(view.ended_at)),
        fact("Duration", ms(view.duration_ms)), fact("Events", String(view.events)),
        fact("Steps", `${view.stats.succeeded || 0} ok, ${view.stats.failed || 0} failed, ${view.stats.running || 0} running of ${view.stats.total || 0}`),
        fact("Tokens", String(view.input_tokens + view.output_tokens)), fact("Cost", money(view.cost_usd)),
        view.forked_from ? fact("Fork of", runLink(view.forked_from), ` from ${view.fork_from_step}`) : null,
        Object.keys(view.labels).length ? fact("Labels", Object.entries(view.labels).map(([k, v]) => `${k}=${v}`).join(", ")) : null),
      view.error ? h("div", { class: "card" }, h("strong", {}, "Error"), pre(view.error)) : null,
      view.output !== null && view.output !== undefined ? h("details", {}, h("summary", {}, "Output"), pre(view.output)) : null,
      h("details", {}, h("summary", {}, "Input"), pre(view.input)));
    drawActions();
    drawSuspensions();
  };

  const act = async (label, path, body, after) => {
    notice(`${label}…`);
    try {
      const r = await api(`/api/runs/${rid}/${path}`, { body });
      notice(`${label}: done${r.status ? ` (${r.status})` : ""}`);
      if (after) after(r);
      await refresh();
    } catch (e) { notice(`${label} refused: ${e.message}`, true); }
  };

  const drawActions = () => {
    const ended = ENDED.includes(view.status);
    put(actions, 
      h("button", { type: "button", class: "danger", disabled: ended, onclick: () => {
        if (confirm(`Cancel run ${view.run_id}?`)) act("Cancel", "control", { action: "cancel", reason: "from the console" });
      } }, "Cancel"),
      view.paused
        ? h("button", { type: "button", disabled: ended, onclick: () => act("Unpause", "control", { action: "unpause" }) }, "Unpause")
        : h("button", { type: "button", disabled: ended, onclick: () => act("Pause", "control", { action: "pause", reason: "from the console" }) }, "Pause"),
      h("button", { type: "button", onclick: () => replayRun(rid, result) }, "Replay"),
      h("button", { type: "button", onclick: () => forkDialog(rid, view) }, "Fork…"),
      h("button", { type: "button", onclick: () => { location.hash = `#/diff?a=${rid}`; } }, "Diff with…"));
  };

  const drawSuspensions = () => {
    put(suspensions, ...view.suspensions.map((s) => resumeForm(rid, s, refresh)));
  };

  const drawTabs = () => {
    put(tablist, ...TABS.map((t) => h("button", {
      role: "tab", type: "button", id: `tab-${t}`, "aria-selected": String(t === tab), "aria-controls": "panel",
      tabindex: t === tab ? 0 : -1,
      onclick: () => { tab = t; drawTabs(); drawPanel(); },
      onkeydown: (ev) => {
        const i = TABS.indexOf(t);
        const next = ev.key === "ArrowRight" ? TABS[(i + 1) % TABS.length] : ev.key === "ArrowLeft" ? TABS[(i + TABS.length - 1) % TABS.length] : null;
        if (next) { tab = next; drawTabs(); drawPanel(); document.getElementById(`tab-${next}`).focus(); }
      },
    }, t)));
  };

  // Each draw fills a box of its own; only the latest one requested is shown (a slow
  // answer for a tab left meanwhile never replaces the tab chosen after it).
  let drawn = 0;
  const drawPanel = async () => {
    const mine = ++drawn;
    const box = h("div");
    const show = () => { if (mine === drawn) put(panel, box); };
    panel.setAttribute("aria-labelledby", `tab-${tab}`);
    try {
      if (tab === "Timeline") await timelinePanel(rid, box);
      else if (tab === "Events") await eventsPanel(rid, box, eventsView, (seq) => { tab = "State"; drawTabs(); drawn++; statePanel(rid, box, seq, view.events); });
      else if (tab === "State") await statePanel(rid, box, view.events, view.events);
      else if (tab === "Trace") await tracePanel(rid, box);
      else if (tab === "Calls") await callsPanel(rid, box);
      else put(box, h("h2", {}, "Statistics"), statsTable(view.stats));
    } catch (e) { put(box, h("p", { class: "field-error" }, e.message)); }
    show();
  };

  const refresh = async () => {
    view = await api(`/api/runs/${rid}`);
    drawHeader();
    if (tab === "Timeline" || tab === "Stats" || (tab === "Events" && eventsView.follow)) await drawPanel();
  };

  main(header, actions, result, suspensions, tablist, panel);
  drawHeader();
  drawTabs();
  await drawPanel();

  // live: every stored event arrives here; the header and the open view follow
  if (ENDED.includes(view.status)) return;
  const live = new EventSource(`/api/runs/${rid}/live?after=${view.events}`);
  const redraw = throttle(serial(() => refresh().catch((e) => notice(e.message, true))), 500);
  live.addEventListener("run_event", redraw);
  live.addEventListener("end", () => { live.close(); redraw(); });
  state.live = live;
}

function fact(name, ...value) { return h("div", {}, h("span", {}, name), h("span", {}, ...value)); }

function statsTable(stats) {
  return h("div", { class: "scroll" }, h("table", {}, h("tbody", {},
    Object.entries(stats).map(([k, v]) => h("tr", {}, h("th", { scope: "row" }, k.replaceAll("_", " ")),
      h("td", { class: "mono" }, typeof v === "object" && v !== null ? json(v) : String(v)))))));
}

// ------------------------------------------------------------------ timeline

async function timelinePanel(rid, panel, offset) {
  const at = offset || 0;
  const t = await api(`/api/runs/${rid}/timeline?offset=${at}&limit=200`);
  const origin = t.origin ? Date.parse(t.origin) : 0;
  const end = Math.max(origin + 1, ...t.steps.map((s) => Date.parse(s.ended_at || s.started_at || s.scheduled_at || t.origin)));
  const body = h("tbody");
  let group = null;
  for (const s of t.steps) {
    if (s.group && s.group !== group) {
      const parts = s.group.split("/");
      const label = parts.length >= 2 ? `${parts.slice(0, -1).join("/")} ▸ ${/^\d+$/.test(parts.at(-1)) ? "element " : "branch "}${parts.at(-1)}` : s.group;
      body.append(h("tr", { class: "group" }, h("td", { colspan: 5 }, label)));
    }
    group = s.group || null;
    const start = Date.parse(s.started_at || s.scheduled_at || t.origin);
    const stop = s.ended_at ? Date.parse(s.ended_at) : end;
    const bar = h("span", { class: s.status === "failed" ? "error" : s.status === "succeeded" ? "ok" : "" });
    bar.style.left = `${(100 * (start - origin)) / (end - origin)}%`;
    bar.style.width = `${Math.max(0.3, (100 * (stop - start)) / (end - origin))}%`;
    const detail = [];
    for (const a of s.attempts) {
      detail.push(`attempt ${a.attempt}: ${ms(a.duration_ms)}${a.error ? ` — ${a.error}` : ""}${a.retry_delay_s ? ` (retry in ${a.retry_delay_s}s)` : ""}`);
    }
    for (const w of s.waits) detail.push(`waited (${w.kind}: ${w.label}) ${w.ended_at ? ms(Date.parse(w.ended_at) - Date.parse(w.started_at)) : "…"}`);
    if (s.detail) detail.push(s.detail);
    if (s.reused) detail.push("output reused from the origin run");
    body.append(h("tr", { "data-step": s.step_id },
      h("td", { class: "mono" }, "\u00a0\u00a0".repeat(s.depth), s.step_id, s.tool ? h("div", { class: "muted" }, `tool ${s.tool}`) : null),
      h("td", {}, badge(s.status)),
      h("td", { class: "num" }, ms(s.duration_ms), h("div", { class: "muted" }, `at +${ms(start - origin)}`)),
      h("td", { class: "bar-cell", "aria-hidden": "true" }, h("div", { class: "bar" }, bar)),
      h("td", { class: "muted" }, detail.map((d) => h("div", {}, d)))));
  }
  const nav = pager(at, 200, t.total, (o) => timelinePanel(rid, panel, o));
  put(panel, h("h2", {}, `Steps (${t.total})`), h("div", { class: "scroll" }, h("table", { id: "timeline" },
    h("thead", {}, h("tr", {}, ["Step", "Status", "Duration", "When", "Attempts, retries, waits"].map((x) => h("th", { scope: "col" }, x)))), body)), nav);
}

function pager(offset, size, total, go) {
  if (total <= size) return null;
  return h("div", { class: "row" },
    h("button", { type: "button", disabled: offset === 0, onclick: () => go(Math.max(0, offset - size)) }, "Previous"),
    h("span", { class: "muted" }, `${offset + 1}–${Math.min(total, offset + size)} of ${total}`),
    h("button", { type: "button", disabled: offset + size >= total, onclick: () => go(offset + size) }, "Next"));
}

// ------------------------------------------------------------------ events

async function eventsPanel(rid, panel, ev, toState) {
  const size = 100;
  const kindQuery = ev.kind ? `&kind=${encodeURIComponent(ev.kind)}` : "";
  const page = await api(`/api/runs/${rid}/events?after=${ev.after}&limit=${size}${kindQuery}`);
  if (ev.follow && !ev.kind && page.total > ev.after + size) {
    ev.after = Math.max(0, page.total - size);  // following: show the newest page
    return eventsPanel(rid, panel, ev, toState);
  }
  const rows = page.events.map((e) => h("tr", { "data-seq": e.seq },
    h("td", { class: "num" }, e.seq), h("td", { class: "mono" }, e.kind), h("td", { class: "mono" }, e.step_id || ""),
    h("td", {}, e.summary),
    h("td", {}, h("details", {}, h("summary", {}, "data"), pre(e.data))),
    h("td", {}, h("button", { type: "button", onclick: () => toState(e.seq), "aria-label": `State after event ${e.seq}` }, "State"))));
  const jump = h("input", { type: "number", min: 0, max: page.total, id: "ev-from", size: 6 });
  const kind = h("input", { id: "ev-kind", value: ev.kind || "", placeholder: "e.g. tool_call_failed", size: 18 });
  kind.addEventListener("change", () => { ev.kind = kind.value.trim(); ev.after = 0; ev.follow = !ev.kind; eventsPanel(rid, panel, ev, toState); });
  put(panel, 
    h("h2", {}, `Events (${page.total})`),
    h("div", { class: "row" },
      h("label", { class: "inline" }, h("input", { type: "checkbox", checked: ev.follow, onchange: (e) => { ev.follow = e.target.checked; eventsPanel(rid, panel, ev, toState); } }), "Follow the newest"),
      h("label", { for: "ev-kind" }, "Only events of kind", kind),
      h("label", { for: "ev-from" }, "From event", jump),
      h("button", { type: "button", onclick: () => { ev.follow = false; ev.after = Math.max(0, Number(jump.value || 1) - 1); eventsPanel(rid, panel, ev, toState); } }, "Go")),
    h("div", { class: "scroll" }, h("table", { id: "events" },
      h("thead", {}, h("tr", {}, ["#", "Event", "Step", "What", "Data", ""].map((x) => h("th", { scope: "col" }, x)))),
      h("tbody", {}, rows))),
    ev.kind  // a filtered list pages by the last event shown (its count is not known)
      ? h("div", { class: "row" },
        h("button", { type: "button", disabled: ev.after === 0, onclick: () => { ev.after = 0; eventsPanel(rid, panel, ev, toState); } }, "First"),
        h("button", { type: "button", disabled: page.next_after === null, onclick: () => { ev.after = page.next_after; eventsPanel(rid, panel, ev, toState); } }, "Next"))
      : pager(ev.after, size, page.total, (o) => { ev.follow = false; ev.after = o; eventsPanel(rid, panel, ev, toState); }));
}

// ------------------------------------------------------------------ state at an event

async function statePanel(rid, panel, at, total) {
  const slider = h("input", { type: "range", min: 0, max: total, value: at, id: "state-at", "aria-valuetext": `after event ${at}` });
  const number = h("input", { type: "number", min: 0, max: total, value: at, "aria-label": "Event number" });
  const out = h("div", { "aria-live": "polite" });
  const show = debounce(async (n) => {
    try {
      const s = await api(`/api/runs/${rid}/state?at=${n}`);
      put(out, h("p", { class: "muted" }, `State just after event ${s.at} of ${s.events}`), pre(s.state));
    } catch (e) { put(out, h("p", { class: "field-error" }, e.message)); }
  }, 150);
  slider.addEventListener("input", () => { number.value = slider.value; slider.setAttribute("aria-valuetext", `after event ${slider.value}`); show(slider.value); });
  number.addEventListener("change", () => { slider.value = number.value; show(number.value); });
  put(panel, h("h2", {}, "State at an event"),
    h("div", { class: "row" }, h("label", { for: "state-at" }, "After event", slider), number), out);
  show(at);
}

// ------------------------------------------------------------------ trace

async function tracePanel(rid, panel, offset) {
  const at = offset || 0;
  const t = await api(`/api/runs/${rid}/trace?offset=${at}&limit=300`);
  const detail = h("div", { "aria-live": "polite" });
  const total = t.total_ms || 1;
  const rows = t.spans.map((s) => {
    const bar = h("span", { class: s.status === "error" ? "error" : s.status === "ok" ? "ok" : "" });
    bar.style.left = `${(100 * s.offset_ms) / total}%`;
    bar.style.width = `${Math.max(0.3, (100 * (s.duration_ms ?? total - s.offset_ms)) / total)}%`;
    const row = h("tr", { "data-span": s.span_id },
      h("td", {}, h("button", { type: "button", class: "mono", onclick: () => {
        panel.querySelectorAll("tr.selected").forEach((r) => r.classList.remove("selected"));
        row.classList.add("selected");
        put(detail, h("h3", {}, s.name), s.status_message ? h("p", {}, s.status_message) : null, pre(s.attributes));
      } }, "\u00a0\u00a0".repeat(s.depth) + s.name)),
      h("td", { class: "num" }, ms(s.duration_ms)),
      h("td", { class: "bar-cell", "aria-hidden": "true" }, h("div", { class: "bar" }, bar)));
    return row;
  });
  put(panel, h("h2", {}, `Trace (${ms(t.total_ms)})`),
    h("p", { class: "muted" }, "Spans rebuilt from the run's events; choose one for its attributes."),
    h("div", { class: "scroll" }, h("table", { id: "trace" },
      h("thead", {}, h("tr", {}, ["Span", "Duration", "Waterfall"].map((x) => h("th", { scope: "col" }, x)))),
      h("tbody", {}, rows))),
    t.next_after || at ? h("div", { class: "row" },
      h("button", { type: "button", disabled: !at, onclick: () => tracePanel(rid, panel, Math.max(0, at - 300)) }, "Previous"),
      h("button", { type: "button", disabled: !t.next_after, onclick: () => tracePanel(rid, panel, Number(t.next_after)) }, "Next")) : null,
    detail);
}

// ------------------------------------------------------------------ calls

async function callsPanel(rid, panel, offset) {
  const at = offset || 0;
  const c = await api(`/api/runs/${rid}/calls?offset=${at}&limit=50`);
  const cards = c.calls.map((x) => h("div", { class: "card" },
    h("div", {}, h("strong", {}, x.kind === "model" ? `model turn ${x.attempt}` : `tool ${x.name} attempt ${x.attempt}`),
      ` · step `, h("span", { class: "mono" }, x.step_id), ` · ${ms(x.duration_ms)}`,
      x.kind === "model" ? ` · ${x.name} · ${x.input_tokens}+${x.output_tokens} tokens · ${money(x.cost_usd)}` : ""),
    h("details", {}, h("summary", {}, x.kind === "model" ? "Messages" : "Input"), pre(x.input)),
    x.error ? h("div", {}, h("span", { class: "field-error" }, "Error"), pre(x.error)) : h("details", { open: true }, h("summary", {}, "Output"), pre(x.output))));
  put(panel, h("h2", {}, `Model turns and tool calls (${c.total})`),
    h("p", { class: "muted" }, "Inputs and outputs as recorded, with secrets redacted."),
    ...(cards.length ? cards : [h("p", { class: "muted" }, "No calls yet.")]),
    pager(at, 50, c.total, (o) => callsPanel(rid, panel, o)));
}

// ------------------------------------------------------------------ acting

async function replayRun(rid, where) {
  notice("Replaying…");
  try {
    const r = await api(`/api/runs/${rid}/replay`, { body: {} });
    notice("");
    put(where, h("div", { class: "card", id: "replay-result" }, r.identical
      ? h("p", {}, `Replay identical: ${r.events} events re-decided, no tool or model called.`)
      : h("div", {}, h("p", { class: "field-error" }, `Diverged at event ${r.seq}: ${r.message}`),
        h("div", { class: "facts" }, h("div", {}, h("span", {}, "recorded"), pre(r.recorded)), h("div", {}, h("span", {}, "decided now"), pre(r.decided))))));
  } catch (e) { notice(`Replay failed: ${e.message}`, true); }
}

async function forkDialog(rid, view) {
  const timeline = await api(`/api/runs/${rid}/timeline?limit=1000`);
  const steps = timeline.steps.map((s) => s.step_id);
  const from = h("select", { id: "fork-from", name: "from_step" }, steps.map((s) => h("option", { value: s }, s)));
  const edited = h("select", { id: "fork-edit" }, h("option", { value: "" }, "(none)"), steps.map((s) => h("option", { value: s }, s)));
  const value = h("textarea", { id: "fork-output", rows: 6, "aria-describedby": "fork-error" });
  const error = h("p", { id: "fork-error", class: "field-error", "aria-live": "polite" });
  const fill = async () => {
    value.value = "";
    if (!edited.value) return;
    const s = await api(`/api/runs/${rid}/state`);
    const step = s.state.steps[edited.value];
    value.value = step && step.output !== undefined ? json(step.output) : "null";
  };
  edited.addEventListener("change", () => fill().catch((e) => { error.textContent = e.message; }));
  const dialog = h("dialog", { "aria-labelledby": "fork-title" });
  const form = h("form", { method: "dialog" },
    h("h2", { id: "fork-title" }, "Fork this run"),
    h("p", { class: "muted" }, "A new run that reuses every recorded result the chosen step does not affect."),
    h("label", { for: "fork-from" }, "Re-run from step", from),
    h("label", { for: "fork-edit" }, "Edit the recorded output of", edited),
    h("label", { for: "fork-output" }, "New output (JSON)", value),
    error,
    h("div", { class: "row" },
      h("button", { type: "submit", class: "primary", value: "fork" }, "Fork and open"),
      h("button", { type: "button", onclick: () => dialog.close() }, "Close")));
  form.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    const body = { from_step: from.value, set_output: {} };
    if (edited.value) {
      try { body.set_output[edited.value] = JSON.parse(value.value); } catch (e) {
        error.textContent = `The new output is not JSON: ${e.message}`; value.focus(); return;
      }
    }
    try {
      const r = await api(`/api/runs/${rid}/fork`, { body });
      dialog.close();
      dialog.remove();
      location.hash = `#/run/${encodeURIComponent(r.run_id)}`;
    } catch (e) { error.textContent = e.message; }
  });
  dialog.append(form);
  document.body.append(dialog);
  dialog.addEventListener("close", () => dialog.remove());
  dialog.showModal();
  from.focus();
}

// A form from the suspension's JSON Schema: one field per property (checkbox, number,
// choice, text, or JSON for nested values); errors shown beside each field.
function resumeForm(rid, s, done) {
  const schema = s.schema || {};
  const props = schema.type === "object" || schema.properties ? schema.properties || {} : null;
  const required = new Set(schema.required || []);
  const fields = {};
  const errors = {};
  const id = (name) => `f-${s.suspension_id}-${name}`.replace(/[^A-Za-z0-9_-]/g, "_");
  const form = h("form", { class: "card waiting", "aria-label": `Answer ${s.label}`, "data-suspension": s.suspension_id, novalidate: true });
  form.append(h("h2", {}, `Waiting for a person: ${s.label}`),
    h("p", { class: "muted" }, "Step ", h("span", { class: "mono" }, s.step_id), s.expires_at ? ` · expires ${when(s.expires_at)}` : ""));
  if (s.payload !== null && s.payload !== undefined) form.append(h("details", { open: true }, h("summary", {}, "What it asks"), pre(s.payload)));
  const addField = (name, prop) => {
    const fid = id(name);
    const type = Array.isArray(prop.type) ? prop.type.find((t) => t !== "null") : prop.type;
    let input;
    if (type === "boolean") input = h("input", { type: "checkbox", id: fid, name, checked: prop.default === true });
    else if (Array.isArray(prop.enum)) input = h("select", { id: fid, name }, h("option", { value: "" }, "(choose)"), prop.enum.map((v, i) => h("option", { value: String(i) }, String(v))));
    else if (type === "integer" || type === "number") input = h("input", { type: "number", id: fid, name, step: type === "integer" ? 1 : "any", value: prop.default ?? "" });
    else if (type === "string") input = h("input", { type: "text", id: fid, name, value: prop.default ?? "" });
    else input = h("textarea", { id: fid, name, rows: 3 }, prop.default !== undefined ? json(prop.default) : "");
    input.setAttribute("aria-describedby", `${fid}-err`);
    if (required.has(name)) input.setAttribute("aria-required", "true");
    const err = h("div", { class: "field-error", id: `${fid}-err` });
    fields[name] = { input, type, prop };
    errors[name] = err;
    const text = `${prop.title || name}${required.has(name) ? " (required)" : ""}`;
    form.append(type === "boolean"
      ? h("div", {}, h("label", { class: "inline", for: fid }, input, text), prop.description ? h("div", { class: "muted" }, prop.description) : null, err)
      : h("div", {}, h("label", { for: fid }, text, input), prop.description ? h("div", { class: "muted" }, prop.description) : null, err));
  };
  if (props) for (const [name, prop] of Object.entries(props)) addField(name, prop || {});
  else addField("$", { type: null, title: "Answer (JSON)" });
  const general = h("div", { class: "field-error", "aria-live": "polite" });
  form.append(general, h("button", { type: "submit", class: "primary" }, "Resume"));

  form.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    Object.values(errors).forEach((e) => { e.textContent = ""; });
    general.textContent = "";
    let data = props ? {} : null;
    let bad = false;
    for (const [name, f] of Object.entries(fields)) {
      const el = f.input;
      let v;
      if (f.type === "boolean") v = el.checked;
      else if (Array.isArray(f.prop.enum)) v = el.value === "" ? undefined : f.prop.enum[Number(el.value)];
      else if (f.type === "integer" || f.type === "number") v = el.value === "" ? undefined : Number(el.value);
      else if (f.type === "string") v = el.value === "" && !required.has(name) ? undefined : el.value;
      else if (el.value.trim() === "") v = undefined;
      else {
        try { v = JSON.parse(el.value); } catch (e) { errors[name].textContent = `not JSON: ${e.message}`; bad = true; continue; }
      }
      if (name === "$") data = v === undefined ? null : v;
      else if (v !== undefined) data[name] = v;
    }
    if (bad) return;
    const r = await api(`/api/runs/${rid}/resume`, { body: { suspension_id: s.suspension_id, data }, allowError: true });
    if (r.status === 200) { notice(`Resumed ${s.label}`); await done(); return; }
    const issues = r.body.issues || [];
    for (const issue of issues) {
      const m = /^\$\.?([^.[]*)/.exec(issue.path || "");
      const name = m && m[1] && errors[m[1]] ? m[1] : "$";
      (errors[name] || general).append(h("div", {}, `${issue.path}: ${issue.message}`));
    }
    const e = r.body.error || {};
    if (!issues.length) general.textContent = `${e.code || r.status}: ${e.message || "refused"}`;
    const first = form.querySelector(".field-error:not(:empty)");
    const input = first && first.id.endsWith("-err") ? document.getElementById(first.id.slice(0, -4)) : null;
    if (input) input.focus();
  });
  return form;
}

// ------------------------------------------------------------------ diff

async function diffPage(query) {
  const a = h("input", { id: "diff-a", name: "a", value: query.get("a") || "", size: 30, required: true });
  const b = h("input", { id: "diff-b", name: "b", value: query.get("b") || "", size: 30, required: true });
  const form = h("form", { class: "filters" }, h("label", { for: "diff-a" }, "Run A", a), h("label", { for: "diff-b" }, "Run B", b),
    h("button", { type: "submit", class: "primary" }, "Compare"));
  form.addEventListener("submit", (ev) => { ev.preventDefault(); location.hash = `#/diff?a=${encodeURIComponent(a.value.trim())}&b=${encodeURIComponent(b.value.trim())}`; });
  const out = h("section", { "aria-live": "polite" });
  main(h("h1", {}, "Diff two runs"), form, out);
  if (!query.get("a") || !query.get("b")) return;
  const d = await api(`/api/diff?a=${encodeURIComponent(query.get("a"))}&b=${encodeURIComponent(query.get("b"))}`);
  if (!d.steps.length) { put(out, h("p", {}, "No step differs.")); return; }
  const rows = [];
  for (const s of d.steps) {
    s.changes.forEach((c, i) => rows.push(h("tr", { class: c.field === "duration_ms" ? "" : "changed", "data-step": s.step_id },
      h("td", { class: "mono" }, i === 0 ? s.step_id : ""), h("td", { class: "mono" }, c.field), h("td", {}, pre(c.a)), h("td", {}, pre(c.b)))));
  }
  put(out, h("div", { class: "scroll" }, h("table", { class: "diff", id: "diff" },
    h("thead", {}, h("tr", {}, h("th", { scope: "col" }, "Step"), h("th", { scope: "col" }, "Field"),
      h("th", { scope: "col" }, "A: ", runLink(d.a)), h("th", { scope: "col" }, "B: ", runLink(d.b)))),
    h("tbody", {}, rows))));
}

// ------------------------------------------------------------------ submit

function submitPage() {
  const text = h("textarea", { id: "plan-text", rows: 18, spellcheck: "false", "aria-describedby": "plan-issues" });
  const file = h("input", { type: "file", id: "plan-file", accept: ".yaml,.yml,.json,text/yaml,application/json" });
  const fmt = h("select", { id: "plan-format" }, h("option", { value: "native" }, "native"), h("option", { value: "plan-execute" }, "plan-execute"));
  const input = h("textarea", { id: "plan-input", rows: 3, placeholder: "{} (optional: replaces the file's input)" });
  const issues = h("div", { id: "plan-issues", "aria-live": "polite" });
  file.addEventListener("change", async () => { if (file.files[0]) text.value = await file.files[0].text(); });
  const payload = () => {
    const body = { text: text.value, format: fmt.value };
    if (input.value.trim()) body.input = JSON.parse(input.value);
    return body;
  };
  const show = (list, ok) => {
    put(issues, ok ? h("p", {}, ok) : h("div", {},
      h("p", { class: "field-error" }, `${list.length} problem(s):`),
      h("ul", { class: "issues" }, list.map((i) => h("li", {}, h("code", {}, i.path), ` ${i.code}: ${i.message}`)))));
  };
  const run = async (validateOnly) => {
    let body;
    try { body = payload(); } catch (e) { show([{ path: "input", code: "invalid_json", message: e.message }]); return; }
    const r = await api(validateOnly ? "/api/plans/validate" : "/api/plans/run", { body, allowError: true });
    if (validateOnly) {
      if (r.status !== 200) show([{ path: "$", code: (r.body.error || {}).code, message: (r.body.error || {}).message }]);
      else if (r.body.ok) show([], `Valid: ${r.body.name || "plan"} with ${r.body.steps} step(s).`);
      else show(r.body.issues);
      return;
    }
    if (r.status === 200 && r.body.ok) { location.hash = `#/run/${encodeURIComponent(r.body.run_id)}`; return; }
    const list = r.body.issues && r.body.issues.length ? r.body.issues : [{ path: (r.body.error || {}).path || "$", code: (r.body.error || {}).code, message: (r.body.error || {}).message }];
    show(list);
  };
  main(h("h1", {}, "Submit a plan"),
    h("div", { class: "row" }, h("label", { for: "plan-file" }, "Upload a file", file), h("label", { for: "plan-format" }, "Plan language", fmt)),
    h("label", { for: "plan-text" }, "Plan or run file (YAML or JSON)", text),
    h("label", { for: "plan-input" }, "Input (JSON)", input),
    h("div", { class: "actions" },
      h("button", { type: "button", id: "validate", onclick: () => run(true) }, "Validate"),
      h("button", { type: "button", id: "run", class: "primary", onclick: () => run(false) }, "Run")),
    issues);
}

// ------------------------------------------------------------------ start

async function start() {
  try {
    const s = await api("/api/session");
    state.csrf = s.csrf_token;
    state.statuses = s.statuses;
  } catch (e) {
    main(h("h1", {}, "The console cannot reach its server"), h("p", {}, e.message));
    return;
  }
  window.addEventListener("hashchange", route);
  await route();
}

start();
