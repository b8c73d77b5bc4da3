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
    const cards = new Map();
    const elems = new Map();
    let view = initial;
    const params = new URLSearchParams(location.search);
    const filt = { label: params.get("label") || "", layer: params.get("layer") || "",
                   status: params.get("status") || "" };
    const sel = { label: $("#f-label"), layer: $("#f-layer"), status: $("#f-status") };

    function fillSelect(select, values, current) {
      const want = ["", ...values];
      const have = [...select.options].map((o) => o.value);
      if (JSON.stringify(want) !== JSON.stringify(have)) {
        select.replaceChildren(...want.map((v) => h("option", { value: v, text: v || "any" })));
      }
      select.value = current;
    }
    function filters(f) {
      const labels = [];
      for (const [k, vs] of Object.entries(f.labels || {})) for (const v of vs) labels.push(`${k}=${v}`);
      fillSelect(sel.label, labels, filt.label);
      fillSelect(sel.layer, f.layers || [], filt.layer);
      fillSelect(sel.status, STATUSES, filt.status);
    }
    for (const [k, s] of Object.entries(sel)) {
      s.addEventListener("change", () => { filt[k] = s.value; applyFilter(); });
    }
    function matches(c) {
      if (filt.status && c.status !== filt.status) return false;
      if (filt.layer && !c.layers.includes(filt.layer)) return false;
      if (filt.label) {
        const i = filt.label.indexOf("=");
        if (c.labels[filt.label.slice(0, i)] !== filt.label.slice(i + 1)) return false;
      }
      return true;
    }
    function applyFilter() {
      const q = new URLSearchParams(Object.entries(filt).filter(([, v]) => v));
      history.replaceState(null, "", q.toString() ? `?${q}` : location.pathname);
      let shown = 0;
      for (const [n, el] of elems) { const ok = matches(cards.get(n)); el.hidden = !ok; shown += ok; }
      $("#shown").textContent = `${shown} of ${cards.size}`;
      for (const t of document.querySelectorAll(".tile[data-status]")) {
        t.classList.toggle("active", t.dataset.status === filt.status);
      }
    }

    function card(c) {
      const apps = c.apps;
      return h("a", { class: `card s-${c.status}`, href: `/nodes/${encodeURIComponent(c.node)}`,
                      "data-node": c.node, "data-status": c.status },
        h("div", { class: "name" }, h("span", { text: c.node }), badge(c.status)),
        h("div", { class: "meta" }, "rev ", h("span", { class: "mono", text: short(c.revision) }),
          c.desired_revision && c.desired_revision !== c.revision ? ` → ${short(c.desired_revision)}` : "",
          ` · ${apps.running}/${apps.total} apps running`, apps.failed ? ` · ${apps.failed} failed` : ""),
        h("div", { class: "meta" }, "reconciled ", ageEl(c.last_reconcile_at),
          c.last_reconcile_ms != null ? ` in ${Math.round(c.last_reconcile_ms)} ms` : ""),
        c.status === "unreachable" ? h("div", { class: "msg" }, "no heartbeat since ", ageEl(c.updated_at))
          : c.status !== "synced" && c.message ? h("div", { class: "msg", title: c.message, text: c.message }) : null,
        h("div", { class: "chips" },
          Object.entries(c.labels).map(([k, v]) => h("span", { class: "chip", text: `${k}=${v}` }))),
      );
    }
    function putCards(list, removed) {
      let reorder = false;
      for (const c of list) {
        const el = card(c);
        const old = elems.get(c.node);
        if (old) old.replaceWith(el); else reorder = true;
        cards.set(c.node, c);
        elems.set(c.node, el);
      }
      for (const n of removed) { elems.get(n)?.remove(); elems.delete(n); cards.delete(n); }
      if (reorder) {
        const grid = $("#cards");
        grid.replaceChildren(...[...elems.keys()].sort().map((n) => elems.get(n)));
      }
      if (!cards.size) $("#cards").replaceChildren(h("div", { class: "empty", text: "no node has reported yet" }));
    }
    function counters(cn) {
      const tiles = [h("div", { class: "tile", "data-status": "", onclick: () => { filt.status = ""; applyFilter(); sel.status.value = ""; } },
        h("div", { class: "n", id: "count-nodes", text: cn.nodes }), h("div", { class: "l", text: "nodes" }))];
      for (const s of STATUSES) {
        tiles.push(h("div", { class: `tile ${s}`, "data-status": s, id: `count-${s}`,
                              onclick: () => { filt.status = filt.status === s ? "" : s; sel.status.value = filt.status; applyFilter(); } },
          h("div", { class: "n", text: cn[s] }), h("div", { class: "l", text: s })));
      }
      tiles.push(h("div", { class: "tile apps", id: "count-apps" },
        h("div", { class: "n" }, `${cn.apps_running}`, h("span", { class: "muted small", text: ` / ${cn.apps}` })),
        h("div", { class: "l", text: "apps running" })));
      tiles.push(h("div", { class: "tile apps failed", id: "count-apps-failed" },
        h("div", { class: "n", text: cn.apps_failed }), h("div", { class: "l", text: "apps failed" })));
      $("#counters").replaceChildren(...tiles);
    }
    function rollouts(list) {
      $("#rollouts").replaceChildren(...(list.length ? list.map((r) => h("div", { class: "rollout" },
        revLink(r.revision), progressBar({ synced: r.synced, failed: r.failed }, r.targeted),
        h("span", { class: "muted", text: `${r.synced}/${r.targeted} synced${r.failed ? `, ${r.failed} failing` : ""}` }),
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
      el.hidden = !down;
      if (down) el.textContent = `NATS ${feed.state}: showing the last known state. ${feed.error || ""}`;
    }
    function render(v, full) {
      syncClock(v.now);
      feedBanner(v.feed);
      counters(v.counters);
      filters(v.filters);
      rollouts(v.rollouts);
      activeRollouts(v.active_rollouts);
      plot($("#plot"), v.series || []);
      if (full) { cards.clear(); elems.clear(); $("#cards").replaceChildren(); putCards(v.nodes, []); }
      applyFilter();
    }
    render(view, true);
    stream(new URLSearchParams(), (msg) => {
      if (msg.full) { view = msg.full; render(view, true); return; }
      const d = msg.delta;
      putCards(d.upsert, d.remove);
      view = { ...view, ...d, nodes: [] };
      render(view, false);
    });
    const btn = $("#fleet-reconcile");
    if (btn) btn.addEventListener("click", async () => {
      const match = {};
      if (filt.label) { const i = filt.label.indexOf("="); match[filt.label.slice(0, i)] = filt.label.slice(i + 1); }
      const names = [...cards.values()].filter(matches).map((c) => c.node);
      const body = Object.keys(match).length ? { selector: { match } } : {};
      if (filt.status || filt.layer) {
        // status/layer are console-side views: ask each shown node directly
        let ok = 0;
        for (const n of names) if (await act(`/api/nodes/${encodeURIComponent(n)}/reconcile`)) ok++;
        if (ok) flash(`reconcile started on ${ok} node(s)`, "ok");
        return;
      }
      const res = await act("/api/fleet/reconcile", body);
      if (res) flash(`reconcile started on ${res.count} node(s): ${res.replies.map((r) => r.node).join(", ")}`, "ok");
    });
  }

  function progressBar(counts, total) {
    const bar = h("div", { class: "progress", title: Object.entries(counts).map(([k, v]) => `${k}: ${v}`).join(", ") });
    for (const [k, v] of Object.entries(counts)) {
      if (!v || !total) continue;
      const seg = h("span", { class: `s-${k}` });
      seg.style.width = `${(100 * v) / total}%`;
      bar.append(seg);
    }
    return bar;
  }

  // A small inline SVG: bars = mean reconcile duration, line = convergence time, per revision.
  function plot(el, series) {
    const NS = "http://www.w3.org/2000/svg";
    const s = (tag, attrs, ...kids) => {
      const e = document.createElementNS(NS, tag);
      for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, v);
      for (const kid of kids) e.append(kid);
      return e;
    };
    if (!series.length) { el.replaceChildren(h("div", { class: "empty", text: "no reconcile finished in the last hours" })); return; }
    const W = 600, H = 180, L = 44, R = 44, T = 10, B = 26;
    const pts = series.slice(-30);
    // 15% headroom so the highest bar and dot do not touch the top edge
    const maxMs = 1.15 * Math.max(1, ...pts.map((p) => p.mean_ms || 0));
    const maxConv = 1.15 * Math.max(1, ...pts.map((p) => p.convergence_s || 0));
    const step = (W - L - R) / pts.length;
    const svg = s("svg", { viewBox: `0 0 ${W} ${H}`, role: "img", "aria-label": "reconcile duration and convergence per revision" });
    svg.append(s("line", { class: "axis", x1: L, y1: H - B, x2: W - R, y2: H - B }));
    svg.append(s("text", { x: 2, y: T + 8 }, `${Math.round(maxMs)} ms`));
    svg.append(s("text", { x: 2, y: H - B }, "0"));
    svg.append(s("text", { x: W - R + 4, y: T + 8 }, `${maxConv.toFixed(1)} s`));
    let path = "";
    pts.forEach((p, i) => {
      const x = L + i * step;
      const bh = ((p.mean_ms || 0) / maxMs) * (H - T - B);
      const bar = s("rect", { class: "bar", x: x + step * 0.15, y: H - B - bh, width: step * 0.7, height: bh });
      bar.append(s("title", {}, `${short(p.revision)}: mean ${p.mean_ms ?? "—"} ms, max ${p.max_ms ?? "—"} ms, ${p.reconciles} reconciles, convergence ${p.convergence_s ?? "—"} s`));
      svg.append(bar);
      if (p.convergence_s != null) {
        const y = H - B - (p.convergence_s / maxConv) * (H - T - B);
        const cx = x + step / 2;
        path += `${path ? "L" : "M"}${cx},${y}`;
        svg.append(s("circle", { class: "dot", cx, cy: y, r: 3 }));
      }
      if (pts.length <= 12 || i % Math.ceil(pts.length / 12) === 0) {
        svg.append(s("text", { x: x + step / 2, y: H - 8, "text-anchor": "middle" }, short(p.revision).slice(0, 7)));
      }
    });
    if (path) svg.prepend(s("path", { class: "line", d: path }));
    el.replaceChildren(svg, h("div", { class: "legend small" },
      h("span", { class: "s-progressing", text: "mean reconcile duration (left axis)" }),
      h("span", { class: "s-failed", text: "convergence time (right axis)" })));
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
            ? h("button", { type: "button", class: "ghost small-btn", "data-app-action": "resume", "data-app": a.name, text: "Resume" })
            : h("button", { type: "button", class: "ghost small-btn", "data-app-action": "suspend", "data-app": a.name, text: "Suspend" }))
          : null,
      ));
      $("#apps-table tbody").replaceChildren(...(rows.length ? rows : [h("tr", {}, h("td", { class: "empty", text: "no apps" }))]));
      eventRows($("#events-table tbody"), v.events, false);
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
      $("#app-nodes tbody").replaceChildren(...v.nodes.map((r) => h("tr", {},
        h("td", {}, nodeLink(r.node)), h("td", {}, badge(r.node_status)),
        h("td", {}, r.version, r.failed_version ? h("span", { class: "t-bad", text: ` (${r.failed_version} rolled back)` }) : ""),
        h("td", { class: r.phase === "failed" ? "t-bad" : "" }, r.phase),
        h("td", { class: r.health === "healthy" ? "t-good" : r.health === "unhealthy" ? "t-bad" : "muted" }, r.health),
        h("td", {}, r.restarts), h("td", {}, r.message || ""))));
      eventRows($("#events-table tbody"), v.events, true);
    }
    render(initial);
    stream({ name: pageName }, (msg) => render(msg.full));
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
  ({ overview, node: nodePage, app: appPage, rollout: rolloutPage, events: eventsPage })[kind](initial);
})();
