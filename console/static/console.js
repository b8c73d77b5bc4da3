// gitops-mesh console: renders the page's view from JSON and keeps it live over SSE.
// No framework, no build step. Data is only ever inserted with textContent (no innerHTML).
"use strict";
(() => {
  const body = document.body;
  const kind = body.dataset.kind;
  const pageName = body.dataset.name;
  const actionsOn = body.dataset.actions === "on";
  const traceUrl = body.dataset.traceUrl || ""; // --trace-url template with {trace_id}
  const csrf = document.querySelector('meta[name="csrf"]').content;
  const TOKEN_KEY = "gitops-mesh-token";
  const STATUSES = ["synced", "progressing", "degraded", "failed", "suspended", "unreachable"];
  let skewMs = 0; // server clock minus browser clock, so ages are right on skewed machines

  // ---- tiny DOM helpers ---------------------------------------------------------------
  function h(tag, attrs, ...kids) {
    const el = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v === null || v === undefined || v === false) continue;
      if (k === "class") el.className = v;
      else if (k === "text") el.textContent = v;
      else if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
      else el.setAttribute(k, v === true ? "" : String(v));
    }
    for (const kid of kids.flat()) {
      if (kid === null || kid === undefined || kid === false) continue;
      el.append(kid instanceof Node ? kid : document.createTextNode(String(kid)));
    }
    return el;
  }
  const $ = (sel) => document.querySelector(sel);
  const short = (rev) => (rev ? rev.slice(0, 10) : "—");
  const badge = (s) => h("span", { class: `badge s-${s}`, text: s });
  const nodeLink = (n) => h("a", { href: `/nodes/${encodeURIComponent(n)}`, text: n });
  const appLink = (a) => (a ? h("a", { href: `/apps/${encodeURIComponent(a)}`, text: a }) : "");
  const revLink = (r) => (r ? h("a", { class: "mono", href: `/rollouts/${encodeURIComponent(r)}`, text: short(r) }) : "—");

  function syncClock(nowIso) {
    const t = Date.parse(nowIso || "");
    if (!Number.isNaN(t)) skewMs = t - Date.now();
  }
  function ago(iso) {
    const t = Date.parse(iso || "");
    if (Number.isNaN(t)) return "never";
    return human((Date.now() + skewMs - t) / 1000) + " ago";
  }
  function human(s) {
    if (s < 0) s = 0;
    if (s < 60) return `${Math.round(s)}s`;
    if (s < 3600) return `${Math.floor(s / 60)}m ${Math.round(s % 60)}s`;
    if (s < 86400) return `${Math.floor(s / 3600)}h ${Math.floor((s % 3600) / 60)}m`;
    return `${Math.floor(s / 86400)}d ${Math.floor((s % 86400) / 3600)}h`;
  }
  function bytes(n) {
    if (n === null || n === undefined) return "—";
    const units = ["B", "KiB", "MiB", "GiB"];
    let i = 0;
    while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
    return `${n.toFixed(i ? 1 : 0)} ${units[i]}`;
  }
  // an SVG element (text children become text nodes, never markup)
  function svgEl(tag, attrs, ...kids) {
    const e = document.createElementNS("http://www.w3.org/2000/svg", tag);
    for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, v);
    for (const kid of kids) e.append(kid);
    return e;
  }
  const ageEl = (iso) => h("span", { "data-age": iso || "", text: ago(iso) });
  setInterval(() => {
    for (const el of document.querySelectorAll("[data-age]")) el.textContent = ago(el.dataset.age);
  }, 1000);

  // ---- flash messages + actions -------------------------------------------------------------
  let flashTimer = null;
  function flash(text, cls) {
    const el = $("#flash");
    el.textContent = text;
    el.className = `flash ${cls || ""}`;
    el.hidden = false;
    clearTimeout(flashTimer);
    flashTimer = setTimeout(() => { el.hidden = true; }, 6000);
  }

  async function act(url, payload) {
    const headers = { "Content-Type": "application/json", "X-CSRF-Token": csrf };
    const token = sessionStorage.getItem(TOKEN_KEY);
    if (token) headers.Authorization = `Bearer ${token}`;
    let res, data;
    try {
      res = await fetch(url, { method: "POST", headers, body: JSON.stringify(payload || {}),
                               credentials: "same-origin" });
      data = await res.json().catch(() => ({}));
    } catch (err) {
      flash(`request failed: ${err}`, "error");
      return null;
    }
    if (!res.ok) {
      const hint = res.status === 401 ? " (set it with “Action token”)" : "";
      flash(`refused (${res.status}): ${data.error || res.statusText}${hint}`, "error");
      return null;
    }
    return data;
  }

  if (actionsOn) {
    const form = $("#token-form");
    $("#token-btn").addEventListener("click", () => {
      form.hidden = !form.hidden;
      if (!form.hidden) $("#token-input").focus();
    });
    form.addEventListener("submit", (e) => {
      e.preventDefault();
      const v = $("#token-input").value.trim();
      if (v) sessionStorage.setItem(TOKEN_KEY, v);
      $("#token-input").value = "";
      form.hidden = true;
      flash(v ? "token saved for this tab" : "no token entered", v ? "ok" : "error");
      tokenLabel();
    });
    $("#token-clear").addEventListener("click", () => {
      sessionStorage.removeItem(TOKEN_KEY);
      form.hidden = true;
      flash("token forgotten");
      tokenLabel();
    });
    const tokenLabel = () => {
      $("#token-btn").textContent = sessionStorage.getItem(TOKEN_KEY) ? "Token ✓" : "Action token";
    };
    tokenLabel();
  }

  // ---- live stream --------------------------------------------------------------------------
  let source = null;
  function stream(params, onData) {
    if (source) source.close();
    const live = $("#live");
    source = new EventSource(`/api/stream/${kind}?${new URLSearchParams(params)}`);
    source.onopen = () => { live.textContent = "live"; live.className = "live on"; };
    source.onerror = () => { live.textContent = "reconnecting…"; live.className = "live off"; };
    source.onmessage = (e) => onData(JSON.parse(e.data));
  }

  function eventRows(tbody, events, withNode) {
    tbody.replaceChildren(...(events.length ? events.map((e) => h("tr", {},
      h("td", { class: "mono", title: e.time }, ageEl(e.time)),
      withNode ? h("td", {}, nodeLink(e.node)) : null,
      h("td", { class: /failed|rolled-back/.test(e.type) || e.outcome === "failure" ? "t-bad" : "" }, e.type),
      h("td", {}, appLink(e.app)),
      h("td", {}, e.version ? (e.from_version ? `${e.from_version} → ${e.version}` : e.version) : ""),
      h("td", {}, revLink(e.revision)),
      h("td", {}, e.message || (e.duration_ms != null ? `${Math.round(e.duration_ms)} ms` : "")),
      h("td", { class: "trace" }, traceCell(e.trace_id)),
    )) : [h("tr", {}, h("td", { class: "empty", text: "no events" }))]));
  }
  // A trace id: its first 8 hex digits, the full id in the tooltip (and on click, copied);
  // a link to the tracing UI when the console runs with --trace-url.
  function traceCell(id) {
    if (!id) return "";
    const attrs = { class: "mono trace-id", title: `trace ${id}`, "data-trace": id, text: id.slice(0, 8) };
    if (traceUrl) {
      return h("a", { ...attrs, href: traceUrl.replace("{trace_id}", encodeURIComponent(id)),
                      target: "_blank", rel: "noopener noreferrer" });
    }
    return h("span", { ...attrs, onclick: () => navigator.clipboard?.writeText(id).then(
      () => flash(`trace id ${id} copied`, "ok"), () => {}) });
  }

  // ---- overview ------------------------------------------------------------------------------
  function overview(initial) {
    const cards = new Map(); // node -> its card (data); only the shown page is in the DOM
    let view = initial;
    const params = new URLSearchParams(location.search);
    const filt = { label: params.get("label") || "", layer: params.get("layer") || "",
                   status: params.get("status") || "", q: params.get("q") || "",
                   group: params.get("group") || "", sort: params.get("sort") || "unhealthy" };
    let page = Math.max(0, (parseInt(params.get("page") || "1", 10) || 1) - 1);
    let perPage = 100;
    const sel = { label: $("#f-label"), layer: $("#f-layer"), status: $("#f-status"),
                  group: $("#f-group"), sort: $("#f-sort") };
    const search = $("#f-search");
    search.value = filt.q;
    sel.sort.value = filt.sort;
    // unhealthy first: the states an operator must look at before the others
    const SEVERITY = { failed: 0, unreachable: 1, degraded: 2, progressing: 3, suspended: 4, synced: 5 };

    function fillSelect(select, values, current, none) {
      const want = ["", ...values];
      const have = [...select.options].map((o) => o.value);
      if (JSON.stringify(want) !== JSON.stringify(have)) {
        select.replaceChildren(...want.map((v) => h("option", { value: v, text: v || none || "any" })));
      }
      select.value = current;
    }
    function filters(f) {
      const labels = [];
      for (const [k, vs] of Object.entries(f.labels || {})) for (const v of vs) labels.push(`${k}=${v}`);
      fillSelect(sel.label, labels, filt.label);
      fillSelect(sel.layer, f.layers || [], filt.layer);
      fillSelect(sel.status, STATUSES, filt.status);
      fillSelect(sel.group, Object.keys(f.labels || {}), filt.group, "none");
    }
    for (const [k, s] of Object.entries(sel)) {
      s.addEventListener("change", () => { filt[k] = s.value; page = 0; applyFilter(); });
    }
    search.addEventListener("input", () => { filt.q = search.value.trim(); page = 0; applyFilter(); });
    $("#page-prev").addEventListener("click", () => { page = Math.max(0, page - 1); applyFilter(); });
    $("#page-next").addEventListener("click", () => { page += 1; applyFilter(); });
    $("#page-size").addEventListener("change", (e) => { perPage = parseInt(e.target.value, 10); page = 0; applyFilter(); });
    function matches(c) {
      if (filt.status && c.status !== filt.status) return false;
      if (filt.layer && !c.layers.includes(filt.layer)) return false;
      if (filt.label) {
        const i = filt.label.indexOf("=");
        if (c.labels[filt.label.slice(0, i)] !== filt.label.slice(i + 1)) return false;
      }
      if (filt.q && !c.node.toLowerCase().includes(filt.q.toLowerCase())) return false;
      return true;
    }
    const groupOf = (c) => (filt.group ? (c.labels[filt.group] ?? "") : "");
    function shownList() {
      const list = [...cards.values()].filter(matches);
      const bySeverity = filt.sort === "unhealthy";
      list.sort((a, b) => {
        const ga = groupOf(a), gb = groupOf(b);
        if (ga !== gb) return ga === "" ? 1 : gb === "" ? -1 : ga < gb ? -1 : 1;
        if (bySeverity) {
          const d = (SEVERITY[a.status] ?? 9) - (SEVERITY[b.status] ?? 9);
          if (d) return d;
        }
        return a.node < b.node ? -1 : a.node > b.node ? 1 : 0;
      });
      return list;
    }
    let renderQueued = false;
    function applyFilter() {
      const q = new URLSearchParams(Object.entries(filt).filter(([k, v]) => v && !(k === "sort" && v === "unhealthy")));
      if (page) q.set("page", String(page + 1));
      history.replaceState(null, "", q.toString() ? `?${q}` : location.pathname);
      renderPage();
      for (const t of document.querySelectorAll(".tile[data-status]")) {
        t.classList.toggle("active", t.dataset.status === filt.status);
      }
    }
    function renderSoon() {
      if (renderQueued) return;
      renderQueued = true;
      requestAnimationFrame(() => { renderQueued = false; renderPage(); });
    }
    function renderPage() {
      const list = shownList();
      const pages = Math.max(1, Math.ceil(list.length / perPage));
      if (page >= pages) page = pages - 1;
      const start = page * perPage, slice = list.slice(start, start + perPage);
      const groups = new Map();
      if (filt.group) {
        for (const c of list) {
          const g = groups.get(groupOf(c)) || { n: 0, bad: 0 };
          g.n++; if ((SEVERITY[c.status] ?? 9) <= 2) g.bad++;
          groups.set(groupOf(c), g);
        }
      }
      // every group with its size, also those on other pages; a click filters to it
      $("#groups").replaceChildren(...[...groups.entries()].sort(([a], [b]) => (a < b ? -1 : 1)).map(([g, n]) =>
        h("button", { type: "button", class: "ghost small-btn group-chip", "data-group": g,
                      onclick: () => { filt.label = g ? `${filt.group}=${g}` : ""; sel.label.value = filt.label; page = 0; applyFilter(); } },
          `${g ? `${filt.group}=${g}` : `no ${filt.group}`}: ${n.n}`, n.bad ? h("span", { class: "t-bad", text: ` (${n.bad} unhealthy)` }) : "")));
      const kids = [];
      let last = null;
      for (const c of slice) {
        if (filt.group && groupOf(c) !== last) {
          last = groupOf(c);
          const g = groups.get(last);
          kids.push(h("div", { class: "group-head", "data-group": last },
            h("span", { text: last ? `${filt.group}=${last}` : `no ${filt.group}` }),
            h("span", { class: "muted small", text: `${g.n} node(s)${g.bad ? `, ${g.bad} unhealthy` : ""}` })));
        }
        kids.push(card(c));
      }
      if (!cards.size) kids.push(h("div", { class: "empty", text: "no node has reported yet" }));
      else if (!list.length) kids.push(h("div", { class: "empty", text: "no node matches" }));
      $("#cards").replaceChildren(...kids);
      $("#shown").textContent = `${list.length} of ${cards.size}`;
      $("#page-info").textContent = list.length
        ? `${start + 1}–${Math.min(start + perPage, list.length)} of ${list.length} · page ${page + 1} of ${pages}` : "";
      $("#page-prev").disabled = page === 0;
      $("#page-next").disabled = page >= pages - 1;
    }

    function card(c) {
      const apps = c.apps;
      const href = `/nodes/${encodeURIComponent(c.node)}`;
      const msg = c.status === "unreachable" ? null : c.status !== "synced" && c.message ? c.message : null;
      const msgEl = msg ? h("div", { class: "msg", title: msg, text: msg }) : null;
      return h("div", { class: `card s-${c.status}`, "data-node": c.node, "data-status": c.status,
                        onclick: (e) => { if (!e.target.closest("a,button")) location.href = href; } },
        h("div", { class: "name" }, h("a", { href, text: c.node }), badge(c.status)),
        h("div", { class: "meta" }, "rev ", h("span", { class: "mono", text: short(c.revision) }),
          c.desired_revision && c.desired_revision !== c.revision ? ` → ${short(c.desired_revision)}` : "",
          ` · ${apps.running}/${apps.total} apps running`, apps.failed ? ` · ${apps.failed} failed` : "",
          apps.rolled_back ? ` · ${apps.rolled_back} rolled back` : ""),
        h("div", { class: "meta" }, "reconciled ", ageEl(c.last_reconcile_at),
          c.last_reconcile_ms != null ? ` in ${Math.round(c.last_reconcile_ms)} ms` : ""),
        c.status === "unreachable" ? h("div", { class: "msg" }, "no heartbeat since ", ageEl(c.updated_at)) : msgEl,
        // a long message is cut to one line: the whole of it on hover (title) or on "more"
        msg && msg.length > 34 ? h("button", { type: "button", class: "msg-toggle", text: "more",
          onclick: (e) => { const open = msgEl.classList.toggle("open"); e.target.textContent = open ? "less" : "more"; } }) : null,
        h("div", { class: "chips" },
          Object.entries(c.labels).map(([k, v]) => h("span", { class: "chip", text: `${k}=${v}` }))),
      );
    }
    function putCards(list, removed) {
      for (const c of list) cards.set(c.node, c);
      for (const n of removed) cards.delete(n);
    }
    function counters(cn) {
      const tiles = [h("div", { class: "tile", "data-status": "", onclick: () => { filt.status = ""; applyFilter(); sel.status.value = ""; } },
        h("div", { class: "n", id: "count-nodes", text: cn.nodes }), h("div", { class: "l", text: "nodes" }))];
      for (const s of STATUSES) {
        tiles.push(h("div", { class: `tile ${s}`, "data-status": s, id: `count-${s}`,
                              onclick: () => { filt.status = filt.status === s ? "" : s; sel.status.value = filt.status; page = 0; applyFilter(); } },
          h("div", { class: "n", text: cn[s] }), h("div", { class: "l", text: s })));
      }
      tiles.push(h("div", { class: "tile apps", id: "count-apps" },
        h("div", { class: "n" }, `${cn.apps_running}`, h("span", { class: "muted small", text: ` / ${cn.apps}` })),
        h("div", { class: "l", text: "apps running" })));
      tiles.push(h("div", { class: "tile apps failed", id: "count-apps-failed" },
        h("div", { class: "n", text: cn.apps_failed }), h("div", { class: "l", text: "apps failed" })));
      tiles.push(h("div", { class: "tile apps degraded", id: "count-apps-rolled-back",
                            title: "an upgrade failed and was rolled back: the app runs its previous version" },
        h("div", { class: "n", text: cn.apps_rolled_back ?? 0 }), h("div", { class: "l", text: "apps rolled back" })));
      $("#counters").replaceChildren(...tiles);
    }
    function rollouts(list) {
      $("#rollouts").replaceChildren(...(list.length ? list.map((r) => h("div", { class: "rollout", "data-revision": r.revision },
        revLink(r.revision), progressBar({ synced: r.synced, degraded: r.degraded || 0, failed: r.failed, pending: r.pending || 0 }, r.targeted),
        h("span", { class: "muted rollout-text", text: `${r.synced}/${r.targeted} synced` +
          `${r.degraded ? `, ${r.degraded} degraded` : ""}${r.failed ? `, ${r.failed} failed` : ""}${r.pending ? `, ${r.pending} pending` : ""}` }),
        r.commit ? h("div", { class: "commit" }, h("a", { href: `/history?revision=${encodeURIComponent(r.revision)}`, text: r.commit.subject }),
          ` — ${r.commit.author}${r.commit.apps.length ? ` · ${r.commit.apps.join(", ")}` : ""}`) : null,
      )) : [h("div", { class: "empty", text: "no rollout seen yet" })]));
    }
    function activeRollouts(list) {
      // coordinated rollouts (rollout.yaml) in progress: their waves, as on the rollout page
      $("#active-rollouts").replaceChildren(...(list || []).map((r) => h("div", { class: "rollout active-rollout", "data-revision": r.revision },
        revLink(r.revision), badge(r.state),
        h("span", { class: "waves" }, ...r.waves.map((w) => h("span", { class: `wave w-${w.phase}`, title: `${w.name}: ${w.phase}` },
          `${w.name} ${w.synced}/${w.nodes}`, w.bake_left_s != null ? ` · bake ${Math.ceil(w.bake_left_s)}s` : "",
          w.failed ? h("span", { class: "t-bad", text: ` · ${w.failed} failed` }) : ""))),
        r.reason ? h("span", { class: "muted", text: r.reason }) : "")));
    }
    function feedBanner(feed) {
      const el = $("#feed-banner");
      const down = feed && feed.state !== "live";
      const mismatch = feed && feed.mismatch;
      el.hidden = !down && !mismatch;
      if (down) el.textContent = `NATS ${feed.state}: showing the last known state. ${feed.error || ""}`;
      else if (mismatch) el.textContent = `${mismatch} — run gitops-mesh nats-init (docs/nats.md)`;
    }
    function render(v, full) {
      syncClock(v.now);
      feedBanner(v.feed);
      counters(v.counters);
      filters(v.filters);
      rollouts(v.rollouts);
      activeRollouts(v.active_rollouts);
      plot($("#plot"), v.series || [], v.now);
      if (full) { cards.clear(); putCards(v.nodes, []); applyFilter(); } else renderSoon();
    }
    render(view, true);
    stream(new URLSearchParams(), (msg) => {
      if (msg.full) { view = msg.full; render(view, true); return; }
      const d = msg.delta;
      putCards(d.upsert, d.remove);
      view = { ...view, ...d, nodes: [] };
      render(view, false);
    });
    const shownNames = () => shownList().map((c) => c.node);
    const btn = $("#fleet-reconcile");
    if (btn) btn.addEventListener("click", async () => {
      const match = {};
      if (filt.label) { const i = filt.label.indexOf("="); match[filt.label.slice(0, i)] = filt.label.slice(i + 1); }
      const names = shownNames();
      const body = Object.keys(match).length ? { selector: { match } } : {};
      if (filt.status || filt.layer || filt.q) {
        // status/layer/search are console-side views: ask each shown node directly
        let ok = 0;
        for (const n of names) if (await act(`/api/nodes/${encodeURIComponent(n)}/reconcile`)) ok++;
        if (ok) flash(`reconcile started on ${ok} node(s)`, "ok");
        return;
      }
      const res = await act("/api/fleet/reconcile", body);
      if (res) flash(`reconcile started on ${res.count} node(s): ${res.replies.map((r) => r.node).join(", ")}`, "ok");
    });
    const healthBtn = $("#fleet-health");
    if (healthBtn) healthBtn.addEventListener("click", async () => {
      const names = shownNames();
      if (!names.length) { flash("no node is shown", "error"); return; }
      healthBtn.disabled = true;
      const res = await act("/api/fleet/health", { nodes: names });
      healthBtn.disabled = false;
      if (!res) return;
      const bad = res.results.filter((r) => !r.ok);
      const box = $("#health-results");
      box.hidden = false;
      box.replaceChildren(
        h("strong", { id: "health-summary", text: `${res.healthy} of ${res.count} node(s) healthy` }),
        bad.length ? h("ul", {}, bad.map((r) => h("li", { "data-node": r.node }, nodeLink(r.node), ": ",
          r.error ? `${r.error}` : `unhealthy: ${r.unhealthy.join(", ")}`))) : null);
      flash(`health checked on ${res.count} node(s): ${res.unhealthy} not healthy`, res.unhealthy ? "error" : "ok");
    });
  }

  function progressBar(counts, total) {
    const bar = h("div", { class: "progress", title: Object.entries(counts).map(([k, v]) => `${k}: ${v}`).join(", ") });
    for (const [k, v] of Object.entries(counts)) {
      if (!v || !total) continue;
      const seg = h("span", { class: `s-${k}`, "data-bucket": k });
      seg.style.width = `${(100 * v) / total}%`;
      bar.append(seg);
    }
    return bar;
  }

  // A small inline SVG over time (x = when the revision was first seen): bars = mean
  // reconcile duration, dots + line = convergence time; a revision that has not converged
  // is an open dot at the top (its time is not known yet, so it cannot grow without bound).
  function plot(el, series, nowIso) {
    const s = svgEl;
    if (!series.length) { el.replaceChildren(h("div", { class: "empty", text: "no reconcile finished in the last hours" })); return; }
    const W = 600, H = 180, L = 44, R = 44, T = 10, B = 26;
    const pts = series.slice(-30);
    const times = pts.map((p) => Date.parse(p.first_seen));
    const t0 = Math.min(...times);
    const t1 = Math.max(Date.parse(nowIso || "") || 0, ...times, t0 + 60_000);
    const xOf = (t) => L + ((t - t0) / (t1 - t0)) * (W - L - R - 12) + 6;
    const bw = Math.max(3, Math.min(18, ((W - L - R) / pts.length) * 0.6));
    // 15% headroom so the highest bar and dot do not touch the top edge
    const maxMs = 1.15 * Math.max(1, ...pts.map((p) => p.mean_ms || 0));
    const maxConv = 1.15 * Math.max(1, ...pts.map((p) => p.convergence_s || 0));
    const svg = s("svg", { viewBox: `0 0 ${W} ${H}`, role: "img", "aria-label": "reconcile duration and convergence per revision over time" });
    svg.append(s("line", { class: "axis", x1: L, y1: H - B, x2: W - R, y2: H - B }));
    svg.append(s("text", { x: 2, y: T + 8 }, `${Math.round(maxMs)} ms`));
    svg.append(s("text", { x: 2, y: H - B }, "0"));
    svg.append(s("text", { x: W - R + 4, y: T + 8 }, `${maxConv.toFixed(1)} s`));
    const span = t1 - t0;
    const two = (n) => String(n).padStart(2, "0");
    const fmt = (t) => { const d = new Date(t); return span > 86_400_000 ? `${d.getMonth() + 1}/${d.getDate()} ${two(d.getHours())}h`
      : span < 600_000 ? `${two(d.getHours())}:${two(d.getMinutes())}:${two(d.getSeconds())}`
      : `${two(d.getHours())}:${two(d.getMinutes())}`; };
    for (let i = 0; i <= 4; i++) {
      const t = t0 + (span * i) / 4;
      svg.append(s("line", { class: "axis", x1: xOf(t), y1: H - B, x2: xOf(t), y2: H - B + 4 }));
      svg.append(s("text", { class: "tick", x: xOf(t), y: H - 8, "text-anchor": "middle" }, fmt(t)));
    }
    let path = "";
    pts.forEach((p, i) => {
      const cx = xOf(times[i]);
      const bh = ((p.mean_ms || 0) / maxMs) * (H - T - B);
      const bar = s("rect", { class: "bar", x: cx - bw / 2, y: H - B - bh, width: bw, height: bh });
      const conv = p.converged ? `converged in ${p.convergence_s} s` : `not converged (${p.nodes_synced} of ${p.nodes_seen} node(s) synced)`;
      bar.append(s("title", {}, `${short(p.revision)} first seen ${new Date(times[i]).toLocaleString()}: mean ${p.mean_ms ?? "—"} ms, max ${p.max_ms ?? "—"} ms, ${p.reconciles} reconciles, ${conv}`));
      svg.append(bar);
      if (p.convergence_s != null) {
        const y = H - B - (p.convergence_s / maxConv) * (H - T - B);
        path += `${path ? "L" : "M"}${cx},${y}`;
        svg.append(s("circle", { class: "dot", cx, cy: y, r: 3 }, s("title", {}, `${short(p.revision)}: ${conv}`)));
      } else {
        svg.append(s("circle", { class: "open-dot", cx, cy: T + 4, r: 3.5 }, s("title", {}, `${short(p.revision)}: ${conv}`)));
      }
    });
    if (path) svg.prepend(s("path", { class: "line", d: path }));
    el.replaceChildren(svg, h("div", { class: "legend small" },
      h("span", { class: "s-progressing", text: "mean reconcile duration (left axis)" }),
      h("span", { class: "s-failed", text: "convergence time (right axis; open dot: not converged)" })));
  }

  // ---- node page ----------------------------------------------------------------------------
  function nodePage(initial) {
    function render(v) {
      if (!v) {
        $("#node-status").replaceWith(Object.assign(badge("unknown"), { id: "node-status" }));
        $("#node-facts").replaceChildren(h("div", { class: "empty", text: "this node has not reported (yet)" }));
        return;
      }
      syncClock(v.now);
      const st = v.status, c = v.card;
      const b = badge(c.status); b.id = "node-status"; $("#node-status").replaceWith(b);
      const fact = (k, ...val) => h("div", {}, h("dt", { text: k }), h("dd", {}, ...val));
      $("#node-facts").replaceChildren(...[
        fact("message", st.message || "—"),
        fact("revision", revLink(st.revision)),
        fact("desired", revLink(st.desired_revision)),
        fact("labels", Object.entries(st.labels).map(([k, x]) => `${k}=${x}`).join(", ") || "—"),
        fact("heartbeat", ageEl(st.updated_at)),
        fact("last reconcile", ageEl(st.last_reconcile_at),
             st.last_reconcile_ms != null ? ` (${Math.round(st.last_reconcile_ms)} ms)` : ""),
        fact("agent", st.agent_version || "—"),
        fact("outbox", `${st.outbox_backlog} queued, ${st.outbox_dropped} dropped`),
        st.source_error ? fact("source error", st.source_error) : null,
        st.spec_errors.length ? fact("spec errors", st.spec_errors.join("; ")) : null,
      ].filter(Boolean));
      const rows = st.apps.map((a) => h("tr", { "data-app": a.name },
        h("td", {}, appLink(a.name), a.layer ? h("span", { class: "chip", text: a.layer }) : ""),
        h("td", {}, a.version, a.failed_version ? h("span", { class: "t-bad", text: ` (${a.failed_version} rolled back)` }) : ""),
        h("td", { class: a.phase === "failed" || a.phase === "blocked" ? "t-bad" : "" }, a.suspended ? `${a.phase} (suspended)` : a.phase),
        h("td", { class: a.health === "healthy" ? "t-good" : a.health === "unhealthy" ? "t-bad" : "muted" }, a.health),
        h("td", {}, a.restarts),
        h("td", {}, a.uptime_s != null ? human(a.uptime_s) : "—"),
        h("td", {}, a.cpu_percent != null ? `${a.cpu_percent.toFixed(1)}%` : "—"),
        h("td", {}, bytes(a.rss_bytes)),
        h("td", {}, a.message || ""),
        actionsOn ? h("td", { class: "row-actions" },
          h("button", { type: "button", class: "ghost small-btn", "data-app-action": "health", "data-app": a.name, text: "Check" }),
          a.suspended
            ? h("button", { type: "button", class: "small-btn primary-now", "data-app-action": "resume", "data-app": a.name, text: "Resume" })
            : h("button", { type: "button", class: "ghost small-btn", "data-app-action": "suspend", "data-app": a.name, text: "Suspend" }))
          : null,
      ));
      $("#apps-table tbody").replaceChildren(...(rows.length ? rows : [h("tr", {}, h("td", { class: "empty", text: "no apps" }))]));
      eventRows($("#events-table tbody"), v.events, false);
      suspendButtons(c.status === "suspended");
      depGraph($("#dep-graph"), v.graph);
    }
    // While the node is suspended, "Suspend" shows the state (pressed, disabled) and
    // "Resume" is the one action left; otherwise the reverse.
    function suspendButtons(suspended) {
      const sus = $('button[data-action="suspend"]'), res = $('button[data-action="resume"]');
      if (!sus || !res) return;
      sus.textContent = suspended ? "Suspended" : "Suspend";
      sus.disabled = suspended;
      sus.setAttribute("aria-pressed", suspended ? "true" : "false");
      sus.classList.toggle("active-state", suspended);
      sus.classList.toggle("ghost", !suspended);
      res.disabled = !suspended;
      res.classList.toggle("ghost", !suspended);
      res.classList.toggle("primary-now", suspended);
    }
    render(initial);
    stream({ name: pageName }, (msg) => render(msg.full));
    // per-app buttons are re-rendered with every push: one delegated listener
    $("#apps-table").addEventListener("click", async (e) => {
      const btn = e.target.closest("[data-app-action]");
      if (!btn) return;
      const action = btn.dataset.appAction, app = btn.dataset.app;
      btn.disabled = true;
      const res = await act(`/api/nodes/${encodeURIComponent(pageName)}/${action}`, { app });
      btn.disabled = false;
      if (res) {
        const { node, action: _a, ...rest } = res;
        flash(`${action} ${app}: ${JSON.stringify(rest)}`, "ok");
      }
    });
    for (const btn of document.querySelectorAll("[data-action]")) {
      btn.addEventListener("click", async () => {
        const action = btn.dataset.action;
        btn.disabled = true;
        const res = await act(`/api/nodes/${encodeURIComponent(pageName)}/${action}`);
        btn.disabled = false;
        if (res) flash(`${action}: ${res.run_id ? `run ${res.run_id}` : JSON.stringify(res)}`, "ok");
      });
    }
    const forget = $("#forget-node");
    if (forget) forget.addEventListener("click", async () => {
      if (!confirm(`Forget ${pageName}? Its status is deleted from the fleet; a node that is still alive reappears with its next heartbeat.`)) return;
      const res = await act(`/api/nodes/${encodeURIComponent(pageName)}/forget`);
      if (res) flash(`${pageName} forgotten`, "ok");
    });
  }

  // The node's apps as boxes in columns by dependency generation (laid out by the server),
  // each coloured by its phase; an arrow runs from a dependency to the app that needs it.
  function depGraph(el, g) {
    if (!el) return;
    if (!g || !g.boxes.length) { el.replaceChildren(h("div", { class: "empty", text: "no apps" })); return; }
    const s = svgEl;
    const svg = s("svg", { viewBox: `0 0 ${g.width} ${g.height}`, width: g.width, height: g.height, role: "img",
                           "aria-label": "dependency graph of the node's apps" },
      s("defs", {}, s("marker", { id: "arrow", viewBox: "0 0 10 10", refX: 9, refY: 5, markerWidth: 7, markerHeight: 7, orient: "auto" },
        s("path", { d: "M0,0 L10,5 L0,10 z", style: "fill:#9aa6b8;stroke:none" }))));
    for (const e of g.edges) {
      const mx = (e.x1 + e.x2) / 2;
      svg.append(s("path", { "data-edge": `${e.from}->${e.to}`, d: `M${e.x1},${e.y1} C${mx},${e.y1} ${mx},${e.y2} ${e.x2},${e.y2}` }));
    }
    for (const b of g.boxes) {
      const phase = b.suspended ? "suspended" : b.phase;
      const link = s("a", { href: `/apps/${encodeURIComponent(b.app)}` },
        s("rect", { class: "fillc", x: b.x, y: b.y, width: g.box.w, height: g.box.h, rx: 6 }),
        s("rect", { x: b.x, y: b.y, width: g.box.w, height: g.box.h, rx: 6, style: "fill:none" }),
        s("text", { x: b.x + 8, y: b.y + 15 }, b.app),
        s("text", { class: "sub", x: b.x + 8, y: b.y + 29 }, `${b.version} · ${phase} · ${b.health}`),
        s("title", {}, `${b.app} ${b.version}: ${phase}, ${b.health} (generation ${b.generation})`));
      svg.append(s("g", { class: `phase-${phase}`, "data-app": b.app, "data-phase": phase }, link));
    }
    const missing = g.missing.length ? h("div", { class: "err small" },
      "missing dependencies: ", g.missing.map((m) => `${m.app} → ${m.depends_on}`).join(", ")) : null;
    el.replaceChildren(svg, missing || "");
  }

  // A GET that carries the tab's token (app logs need a viewer token when tokens are set).
  async function getJson(url) {
    const headers = {};
    const token = sessionStorage.getItem(TOKEN_KEY);
    if (token) headers.Authorization = `Bearer ${token}`;
    try {
      const res = await fetch(url, { headers, credentials: "same-origin" });
      const data = await res.json().catch(() => ({}));
      return { ok: res.ok, status: res.status, data };
    } catch (err) {
      return { ok: false, status: 0, data: { error: String(err) } };
    }
  }

  // ---- app page ------------------------------------------------------------------------------
  function appPage(initial) {
    function render(v) {
      if (!v) { $("#app-summary").replaceChildren(h("div", { class: "empty", text: "no node runs this app" })); return; }
      syncClock(v.now);
      $("#app-summary").replaceChildren(
        h("div", {}, h("h2", { text: "versions" }), Object.entries(v.versions).map(([k, n]) => h("div", { text: `${k}: ${n} node(s)` }))),
        h("div", {}, h("h2", { text: "phases" }), Object.entries(v.phases).map(([k, n]) => h("div", { text: `${k}: ${n}` }))),
      );
      // a fleet of thousands: the rows of at most APP_ROWS nodes, the ones with trouble first
      const APP_ROWS = 200;
      const trouble = (r) => (r.phase !== "running" || r.health === "unhealthy" || r.failed_version ? 0 : 1);
      const rows = v.nodes.length > APP_ROWS ? [...v.nodes].sort((a, b) => trouble(a) - trouble(b)).slice(0, APP_ROWS) : v.nodes;
      $("#app-nodes-more").textContent = v.nodes.length > APP_ROWS ? `${APP_ROWS} of ${v.nodes.length} nodes shown (those with trouble first)` : "";
      $("#app-nodes tbody").replaceChildren(...rows.map((r) => h("tr", {},
        h("td", {}, nodeLink(r.node)), h("td", {}, badge(r.node_status)),
        h("td", {}, r.version, r.failed_version ? h("span", { class: "t-bad", text: ` (${r.failed_version} rolled back)` }) : ""),
        h("td", { class: r.phase === "failed" ? "t-bad" : "" }, r.phase),
        h("td", { class: r.health === "healthy" ? "t-good" : r.health === "unhealthy" ? "t-bad" : "muted" }, r.health),
        h("td", {}, r.restarts), h("td", {}, r.message || ""))));
      eventRows($("#events-table tbody"), v.events, true);
      nodeChoices(v.nodes.map((r) => r.node));
    }
    const pick = $("#app-node");
    const wanted = new URLSearchParams(location.search).get("node") || "";
    function nodeChoices(names) {
      const have = [...pick.options].map((o) => o.value);
      if (JSON.stringify(have) === JSON.stringify(names)) return;
      const current = pick.value || wanted;
      pick.replaceChildren(...names.map((n) => h("option", { value: n, text: n })));
      if (names.includes(current)) pick.value = current;
    }
    const api = (what, extra) => `/api/apps/${encodeURIComponent(pageName)}/${what}?${new URLSearchParams({ node: pick.value, ...(extra || {}) })}`;
    const show = (x) => (x === null || x === undefined ? "—" : typeof x === "string" ? x : JSON.stringify(x));
    async function loadSpec() {
      if (!pick.value) { $("#app-spec").textContent = "no node runs this app"; return; }
      $("#app-spec").textContent = "loading…";
      const res = await getJson(api("spec"));
      if (!res.ok) { $("#app-spec").textContent = `cannot read the spec from ${pick.value} (${res.status}): ${res.data.error || ""}`; return; }
      const d = res.data;
      $("#app-spec").textContent = d.running ? JSON.stringify(d.running, null, 2) : "(not running on this node)";
      $("#app-diff tbody").replaceChildren(...(d.diff.length ? d.diff.map((x) => h("tr", { "data-path": x.path },
        h("td", { class: "mono", text: x.path }), h("td", { class: "mono", text: show(x.desired) }),
        h("td", { class: "mono", text: show(x.running) }))) :
        [h("tr", {}, h("td", { class: "empty", colspan: 3, text: "the node runs what its checkout wants" }))]));
    }
    let cursor = null, followTimer = null, logLines = [];
    async function loadLog(more) {
      if (!pick.value) return;
      const extra = { lines: $("#log-lines").value };
      if (more && cursor) extra.cursor = cursor;
      const res = await getJson(api("logs", extra));
      if (!res.ok) {
        $("#log-info").textContent = `cannot read the log (${res.status}): ${res.data.error || ""}${res.status === 401 ? " (set a token with “Action token”)" : ""}`;
        return;
      }
      const d = res.data;
      cursor = d.cursor;
      logLines = more ? [...logLines, ...d.lines].slice(-2000) : d.lines; // bounded in the page too
      $("#app-log").textContent = logLines.join("\n");
      $("#log-info").textContent = `${logLines.length} line(s) from ${d.node}${d.truncated ? " (older lines left out)" : ""}`;
      if (d.more) loadLog(true);
    }
    pick.addEventListener("change", () => { cursor = null; loadSpec(); loadLog(false); });
    $("#spec-load").addEventListener("click", loadSpec);
    $("#log-load").addEventListener("click", () => { cursor = null; loadLog(false); });
    $("#log-follow").addEventListener("change", (e) => {
      clearInterval(followTimer);
      if (e.target.checked) followTimer = setInterval(() => loadLog(true), 2000);
    });
    render(initial);
    stream({ name: pageName }, (msg) => render(msg.full));
    loadSpec();
    loadLog(false);
  }

  // ---- apps page ------------------------------------------------------------------------------
  function appsPage(initial) {
    const form = $("#app-filters");
    const counts = (o) => Object.entries(o).map(([k, n]) => `${k}: ${n}`).join(", ");
    function render(v) {
      syncClock(v.now);
      const layer = form.elements.layer;
      const want = ["", ...v.filters.layers];
      if (JSON.stringify([...layer.options].map((o) => o.value)) !== JSON.stringify(want)) {
        const cur = layer.value || new URLSearchParams(location.search).get("layer") || "";
        layer.replaceChildren(...want.map((x) => h("option", { value: x, text: x || "any" })));
        layer.value = cur;
      }
      $("#apps-shown").textContent = `${v.apps.length} app(s)`;
      $("#apps-table tbody").replaceChildren(...(v.apps.length ? v.apps.map((a) => h("tr", { "data-app": a.app },
        h("td", {}, appLink(a.app)), h("td", {}, a.layer || "—"),
        h("td", {}, `${a.nodes}`, a.failed ? h("span", { class: "t-bad", text: ` (${a.failed} failed)` }) : "",
          a.rolled_back ? h("span", { class: "muted", text: ` (${a.rolled_back} rolled back)` }) : ""),
        h("td", { class: "versions" }, Object.entries(a.version_counts).map(([ver, n]) => h("span", { class: "chip", text: `${ver} × ${n}` }))),
        h("td", { class: "phases" }, counts(a.phases)),
        h("td", { class: a.unhealthy ? "t-bad" : "" }, counts(a.health)),
        h("td", {}, a.depends_on.join(", ") || "—"))) :
        [h("tr", {}, h("td", { class: "empty", colspan: 7, text: "no app matches" }))]));
    }
    const params = () => {
      const p = new URLSearchParams();
      for (const k of ["name", "layer", "label"]) { const x = form.elements[k].value.trim(); if (x) p.set(k, x); }
      return p;
    };
    render(initial);
    stream(params(), (msg) => { if (msg.full) render(msg.full); });
    form.addEventListener("submit", (e) => {
      e.preventDefault();
      const p = params();
      history.replaceState(null, "", p.toString() ? `?${p}` : location.pathname);
      stream(p, (msg) => { if (msg.full) render(msg.full); });
    });
  }

  // ---- history page -----------------------------------------------------------------------------
  function historyPage(initial) {
    let scrolled = false;
    function render(v) {
      $("#history-repo").textContent = v.enabled ? `${v.repo}${v.branch ? ` (${v.branch})` : ""}${v.refreshed_at ? `, read ${ago(v.refreshed_at)}` : ""}` : "";
      const err = $("#history-error");
      err.hidden = v.enabled && !v.error;
      err.textContent = !v.enabled ? "No spec repository: start the console with --repo URL [--branch B] to see commits." : v.error || "";
      $("#history-table tbody").replaceChildren(...(v.commits.length ? v.commits.map((c) => h("tr", {
          "data-revision": c.revision, class: c.revision === v.selected ? "selected" : "" },
        h("td", {}, revLink(c.revision)), h("td", { class: "subject", text: c.subject }),
        h("td", { text: c.author }), h("td", { title: c.time }, ageEl(c.time)),
        h("td", { class: "apps" }, c.apps.length ? c.apps.map(appLink).flatMap((a, i) => (i ? [", ", a] : [a])) : h("span", { class: "muted", text: c.files.length ? `${c.files.length} other file(s)` : "—" })),
        h("td", {}, c.nodes ? `${c.nodes}` : ""))) :
        [h("tr", {}, h("td", { class: "empty", colspan: 6, text: "no commits read (yet)" }))]));
      const sel = document.querySelector("#history-table tr.selected");
      if (sel && !scrolled) { sel.scrollIntoView({ block: "center" }); scrolled = true; }
    }
    render(initial);
    const p = new URLSearchParams();
    if (pageName) p.set("revision", pageName);
    stream(p, (msg) => render(msg.full));
  }

  // ---- rollout page -------------------------------------------------------------------------
  function rolloutPage(initial) {
    const ORDER = ["synced", "progressing", "pending", "degraded", "failed", "suspended", "unreachable"];
    function render(v) {
      const superseded = $("#rollout-superseded");
      const moved = v ? v.from_events.length : 0;
      superseded.hidden = !(v && (v.superseded_by || moved));
      if (!v) { $("#progress").replaceChildren(h("div", { class: "empty", text: "no node knows this revision yet" })); return; }
      superseded.replaceChildren(
        ...(v.superseded_by ? ["Superseded by ", revLink(v.superseded_by), ". "] : []),
        moved ? `${moved} node(s) have moved on to another revision; they are counted by how their reconcile at this one went.` : "");
      syncClock(v.now);
      $("#rev").textContent = v.revision;
      const counts = {};
      for (const k of ORDER) counts[k] = v.counts[k];
      const bar = progressBar(counts, v.targeted); bar.id = "progress"; bar.classList.add("big");
      $("#progress").replaceWith(bar);
      $("#rollout-counts").replaceChildren(
        h("strong", { id: "rollout-summary", text: `${v.counts.synced} of ${v.targeted} nodes synced (${Math.round(v.progress * 100)}%)` }),
        ...ORDER.filter((k) => v.counts[k]).map((k) => h("span", { class: `s-${k}`, text: `${k} ${v.counts[k]}` })));
      $("#rollout-times").textContent = v.first_seen
        ? `first seen ${new Date(v.first_seen).toLocaleString()}` + (v.counts.synced && v.last_success ? `, last node synced ${new Date(v.last_success).toLocaleString()}` : "")
        : "";
      $("#failing tbody").replaceChildren(...(v.failing.length ? v.failing.map((f) => h("tr", {},
        h("td", {}, nodeLink(f.node)), h("td", {}, badge(f.status)), h("td", { class: "err" }, f.error))) :
        [h("tr", {}, h("td", { class: "empty", text: "none" }))]));
      $("#buckets").replaceChildren(...ORDER.filter((k) => v.nodes[k].length).map((k) => h("div", {},
        h("h3", {}, badge(k), ` ${v.nodes[k].length}`),
        h("ul", {}, v.nodes[k].slice(0, 200).map((n) => h("li", {}, nodeLink(n)))),
        v.nodes[k].length > 200 ? h("div", { class: "muted", text: `… ${v.nodes[k].length - 200} more` }) : null)));
    }
    function coordination(c) {
      const panel = $("#coordination");
      panel.hidden = !c;
      if (!c) return;
      const st = badge(c.state); st.id = "rollout-state"; $("#rollout-state").replaceWith(st);
      $("#rollout-reason").textContent = c.reason
        ? c.reason
        : c.state === "progressing" ? `wave ${c.wave} open` + (c.bake_left_s != null ? `, baking: ${Math.ceil(c.bake_left_s)}s left` : "") : "";
      $("#waves tbody").replaceChildren(...c.waves.map((w) => h("tr", { "data-wave": w.name },
        h("td", {}, w.name), h("td", {}, badge(w.phase)),
        h("td", {}, progressBar({ synced: w.synced, progressing: w.applying, failed: w.failed, unreachable: w.offline }, w.nodes)),
        h("td", { class: "wave-synced", text: `${w.synced}/${w.nodes}` }),
        h("td", {}, w.applying), h("td", { class: w.failed ? "t-bad" : "" }, w.failed), h("td", {}, w.offline),
        h("td", {}, `${w.max_unavailable}`),
        h("td", { class: "bake" }, w.bake_left_s != null ? `${Math.ceil(w.bake_left_s)}s left` : w.baked_at ? "baked" : "—"))));
      for (const btn of document.querySelectorAll("[data-rollout-action]")) {
        btn.hidden = !c.actions.includes(btn.dataset.rolloutAction);
      }
      const reason = $("#abort-reason");
      if (reason) reason.hidden = !c.actions.includes("abort");
    }
    function renderAll(v) { render(v); coordination(v ? v.coordination : null); }
    renderAll(initial);
    stream({ name: pageName }, (msg) => renderAll(msg.full));
    for (const btn of document.querySelectorAll("[data-rollout-action]")) {
      btn.addEventListener("click", async () => {
        const action = btn.dataset.rolloutAction;
        const body = action === "abort" ? { reason: ($("#abort-reason").value || "").trim() } : {};
        btn.disabled = true;
        const res = await act(`/api/rollouts/${encodeURIComponent(pageName)}/${action}`, body);
        btn.disabled = false;
        if (res) flash(`${action}: rollout ${res.state}` + (res.events.length ? ` (${res.events.map((e) => e.message).join("; ")})` : ""), "ok");
      });
    }
  }

  // ---- event log ------------------------------------------------------------------------------
  function eventsPage(initial) {
    const form = $("#event-filters");
    const render = (v) => { syncClock(v.now); eventRows($("#events-table tbody"), v.events, true); };
    const params = () => {
      const p = new URLSearchParams();
      for (const k of ["node", "app", "type"]) { const x = form.elements[k].value.trim(); if (x) p.set(k, x); }
      return p;
    };
    render(initial);
    stream(params(), (msg) => render(msg.full));
    form.addEventListener("submit", (e) => {
      e.preventDefault();
      const p = params();
      history.replaceState(null, "", p.toString() ? `?${p}` : location.pathname);
      stream(p, (msg) => render(msg.full));
    });
  }

  const initial = JSON.parse($("#initial-data").textContent);
  ({ overview, node: nodePage, app: appPage, rollout: rolloutPage, events: eventsPage,
   apps: appsPage, history: historyPage })[kind](initial);
})();
