// kzprobe report: draws the tables from the JSON embedded in the page. No network, no eval,
// no innerHTML with data: every string from the database goes through textContent.
(function () {
  "use strict";
  const R = JSON.parse(document.getElementById("report-data").textContent);
  const M = R.matrix, NETS = R.networks;
  const STATE = { o: "ok", d: "blocked/dns", i: "blocked/ip", p: "blocked/dpi", b: "blocked", w: "down", u: "inconclusive", ".": "no data" };
  const BLOCKED = "dipb";

  function el(tag, attrs, ...kids) {
    const e = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v === null || v === undefined || v === false) continue;
      if (k === "class") e.className = v;
      else if (k === "on") for (const [ev, fn] of Object.entries(v)) e.addEventListener(ev, fn);
      else e.setAttribute(k, v === true ? "" : String(v));
    }
    for (const k of kids.flat()) {
      if (k === null || k === undefined || k === false) continue;
      e.append(k instanceof Node ? k : document.createTextNode(String(k)));
    }
    return e;
  }
  const $ = (id) => document.getElementById(id);
  const day = (d) => (d === null || d === undefined) ? "" : new Date(d * 86400000).toISOString().slice(0, 10);
  const ts = (s) => s ? s.replace("T", " ").replace("Z", " UTC") : "";
  const netName = (i) => NETS[i] ? NETS[i].name + (NETS[i].source !== "live" ? " [" + NETS[i].source + "]" : "") : "?";
  const badge = (text, cls) => el("span", { class: "badge b-" + String(cls || text).replace(/[^a-z]+/gi, "-").toLowerCase() }, text);
  function table(head, rows, opts) {
    const t = el("table", { class: (opts && opts.cls) || "" });
    t.append(el("thead", {}, el("tr", {}, head.map((h) => el("th", { class: h.num ? "num" : "" }, h.label || h)))));
    const tb = el("tbody");
    rows.forEach((r) => tb.append(el("tr", {}, r.map((c, i) => el("td", { class: head[i] && head[i].num ? "num" : "" }, c)))));
    t.append(tb);
    return t;
  }

  // ---- Summary -------------------------------------------------------------------------------
  function summary() {
    const S = R.summary, box = $("summary-body");
    const k = (v, label, cls) => el("div", { class: "kpi " + (cls || "") }, el("div", { class: "v" }, v), el("div", { class: "k" }, label));
    const mech = S.targets_blocked_by_mechanism || {};
    box.append(el("div", { class: "kpis" },
      k(S.targets, "targets measured"), k(S.networks, "vantage networks"), k(S.measurements.toLocaleString("en"), "verdicts in the period"),
      k(S.targets_blocked_anywhere, "targets blocked on ≥ 1 network", "blocked"),
      k(mech.dns || 0, "blocked by DNS (targets)"), k(mech.ip || 0, "blocked by IP (targets)"), k(mech.dpi || 0, "blocked by DPI (targets)"),
      k("+" + S.changes.newly_blocked + " / −" + S.changes.unblocked, "newly blocked / unblocked since " + S.changes.basis)));
    box.append(el("h3", {}, "Vantage points"));
    box.append(table(["network", "ASN", "country", "source", { label: "runs", num: true }, "first run", "last run"],
      NETS.map((n) => [n.name, n.asn || "—", n.country || "—", badge(n.source, "none"), n.runs, ts(n.first), ts(n.last)])));
    if (S.changes.rows.length) {
      box.append(el("h3", {}, "What changed since " + S.changes.basis));
      box.append(table(["target", "network", "before", "now"], S.changes.rows.slice(0, 50).map((c) =>
        [c.target, netName(c.net), STATE[c.before], STATE[c.now]])));
    }
  }

  // ---- Matrix --------------------------------------------------------------------------------
  const sparse = new Map();
  for (const c of M.cells) sparse.set(c[0] * 65536 + c[1], c);
  let order = M.targets.map((_, i) => i), page = 0, sortKey = "target", sortNet = -1, selected = null;
  const PAGE = 100;

  function cellInfo(t, n) {
    const code = M.codes[n][t];
    const s = sparse.get(t * 65536 + n);
    return { code, total: M.totals[n][t], blocked: M.blocked[n][t], vid: s ? s[2] : null,
      detail: s ? M.details[s[3]] : "", rule: s ? M.rules[s[4]] : "", first: s ? s[5] : null, last: s ? s[6] : null };
  }
  function matches(t) {
    const q = $("m-search").value.trim().toLowerCase(), cat = $("m-cat").value, mech = $("m-mech").value, st = $("m-status").value;
    const row = M.targets[t];
    if (q && !row[0].toLowerCase().includes(q)) return false;
    if (cat !== "" && String(row[2]) !== cat) return false;
    if (!mech && !st) return true;
    for (let n = 0; n < NETS.length; n++) {
      const c = M.codes[n][t];
      if (c === ".") continue;
      const mOk = !mech || c === mech;
      let sOk = true;
      if (st === "blocked") sOk = BLOCKED.includes(c);
      else if (st === "ever") sOk = M.blocked[n][t] > 0;
      else if (st) sOk = c === st;
      if (mOk && sOk) return true;
    }
    return false;
  }
  function refilter() {
    order = M.targets.map((_, i) => i).filter(matches);
    const blockedSum = (t) => { let s = 0; for (let n = 0; n < NETS.length; n++) s += M.blocked[n][t]; return s; };
    if (sortKey === "blocked") order.sort((a, b) => blockedSum(b) - blockedSum(a) || a - b);
    else if (sortKey === "category") order.sort((a, b) => (M.categories[M.targets[a][2]] || "~").localeCompare(M.categories[M.targets[b][2]] || "~") || a - b);
    else if (sortKey === "net" && sortNet >= 0) order.sort((a, b) => M.blocked[sortNet][b] - M.blocked[sortNet][a] || (BLOCKED.includes(M.codes[sortNet][b]) - BLOCKED.includes(M.codes[sortNet][a])) || a - b);
    page = 0;
    drawMatrix();
  }
  function drawMatrix() {
    const wrap = $("matrix-table");
    wrap.textContent = "";
    const head = el("tr", {}, el("th", { class: "sortable", on: { click: () => { sortKey = "target"; refilter(); } } }, "target ↕"));
    NETS.forEach((n, i) => head.append(el("th", { class: "net sortable", title: "sort by blocked count on " + n.name,
      on: { click: () => { sortKey = "net"; sortNet = i; refilter(); } } },
      n.name, el("small", {}, " " + [n.asn, n.country, n.source !== "live" ? n.source : ""].filter(Boolean).join(" · ")))));
    const tb = el("tbody");
    for (const t of order.slice(page * PAGE, (page + 1) * PAGE)) {
      const row = M.targets[t];
      const tr = el("tr", {}, el("td", { class: "t", title: row[0] }, row[0], el("span", { class: "cat" }, M.categories[row[2]] || "")));
      for (let n = 0; n < NETS.length; n++) {
        const c = cellInfo(t, n);
        if (c.code === ".") { tr.append(el("td", { class: "c s-none" }, "·")); continue; }
        const text = BLOCKED.includes(c.code) || c.blocked ? c.blocked + "/" + c.total : (c.code === "o" ? "✓ " + c.total : STATE[c.code].slice(0, 5));
        const tip = `${row[0]} @ ${NETS[n].name}: now ${STATE[c.code]}${c.detail ? " (" + c.detail + ")" : ""}; blocked in ${c.blocked} of ${c.total} measurements` + (c.first ? `; first blocked ${day(c.first)}, last ${day(c.last)}` : "");
        const cls = "c s-" + c.code + (c.blocked && !BLOCKED.includes(c.code) ? " was" : "");
        tr.append(el("td", { class: cls, title: tip, "data-t": t, "data-n": n, "data-code": c.code, "data-total": c.total,
          "data-blocked": c.blocked, "data-target": row[0], "data-net": NETS[n].key,
          on: { click: (e) => showEvidence(t, n, e.currentTarget) } }, text));
      }
      tb.append(tr);
    }
    wrap.append(el("table", { class: "matrix" }, el("thead", {}, head), tb));
    const pages = Math.max(1, Math.ceil(order.length / PAGE));
    const pager = $("matrix-pager");
    pager.textContent = "";
    pager.append(el("button", { on: { click: () => { if (page > 0) { page--; drawMatrix(); } } } }, "‹ previous"),
      `page ${page + 1} of ${pages} · ${order.length.toLocaleString("en")} of ${M.targets.length.toLocaleString("en")} targets`,
      el("button", { on: { click: () => { if (page < pages - 1) { page++; drawMatrix(); } } } }, "next ›"));
  }
  function matrixControls() {
    const cat = $("m-cat");
    M.categories.forEach((c, i) => cat.append(el("option", { value: i }, c)));
    for (const id of ["m-search", "m-cat", "m-mech", "m-status"]) $(id).addEventListener("input", refilter);
    $("m-sort").addEventListener("input", () => { sortKey = $("m-sort").value; refilter(); });
  }

  // ---- Evidence ------------------------------------------------------------------------------
  function kv(pairs) {
    const dl = el("dl");
    for (const [k, v] of pairs) if (v !== undefined && v !== null && v !== "" && !(Array.isArray(v) && !v.length)) dl.append(el("dt", {}, k), el("dd", {}, v));
    return dl;
  }
  function stepCard(s) {
    const d = s.data || {};
    const pairs = [];
    const where = s.address ? s.address + (s.port ? ":" + s.port : "") : "";
    if (s.step === "dns") {
      pairs.push(["resolver", (d.resolver || "") + (d.transport ? " (" + d.transport + ")" : "")], ["query", (d.qtype || "") + " " + s.domain],
        ["rcode", d.rcode], ["addresses", (d.addresses || []).join(", ")],
        ["answers", (d.answers || []).map((a) => a.type + " " + a.data).join(", ")]);
      if ((d.responses || []).length > 1) pairs.push(["responses", d.responses.map((r) => (r.rcode || "") + " " + (r.addresses || []).join(" ") + (r.ip_ttl ? " ttl " + r.ip_ttl : "")).join(" | ")]);
    } else if (s.step === "tls") {
      pairs.push(["address", where], ["SNI", d.sni], ["ClientHello", d.hello], ["version", d.version], ["issuer", d.issuer],
        ["certificate", d.cert_valid === true ? "valid" : d.cert_valid === false ? "invalid: " + (d.cert_failure || "") : ""],
        ["chain", (d.certificates || []).map((c) => (c.subject || "?") + " ← " + (c.issuer || "?")).join("  ⟶  ")]);
    } else if (s.step === "http") {
      pairs.push(["address", where], ["URL", d.url], ["Host", d.host], ["request", d.method ? d.method + " " + (d.connect_to || "") : ""],
        ["status", d.status], ["title", d.title],
        ["blockpage", d.blockpage ? el("b", {}, d.blockpage) : ""], ["redirect", d.redirect_to], ["body", d.body_length !== undefined ? d.body_length + " bytes" + (d.truncated ? " (truncated)" : "") : ""]);
      if (d.headers) pairs.push(["headers", Object.entries(d.headers).map(([k, v]) => k + ": " + v).join("; ")]);
      if ((d.speed_samples || []).length) {
        const last = d.speed_samples[d.speed_samples.length - 1];
        const rate = last[0] > 0 ? (last[1] / last[0] / 1024).toFixed(1) + " KiB/s" : "";
        pairs.push(["speed", `${d.speed_samples.length} samples, ${last[1]} bytes in ${last[0]} s (${rate}): ` +
          d.speed_samples.map((p) => p[0] + "s:" + p[1]).join(" ")]);
      }
      if (d.body_head) pairs.push(["body sample", el("pre", {}, d.body_head)]);
    } else {
      pairs.push(["address", where]);
    }
    pairs.push(["failure", s.failure ? el("code", {}, s.failure) : ""], ["frames", (s.packets || []).join(", ")]);
    return el("div", { class: "step" + (s.failure ? " fail" : ""), "data-obs": s.id },
      el("div", { class: "h" }, s.step.toUpperCase() + (s.purpose !== "measure" ? " · " + s.purpose : "") + (s.attempt ? " · retry " + s.attempt : ""),
        " ", el("span", { class: "id" }, "obs #" + s.id + " · " + s.ms + " ms" + (s.source !== "live" ? " · " + s.source : ""))),
      kv(pairs));
  }
  function traceBox(t) {
    return el("div", { class: "trace" },
      el("div", {}, el("b", {}, `Trace (${t.trigger}): `), t.result === "censor_located"
        ? `censor at hop ${t.hop_ttl} (${t.hop_address || "?"}), ${t.placement}, ${t.triggered_by}-triggered — ${t.where}` : t.result),
      t.sentence ? el("div", { class: "note" }, t.sentence) : null,
      t.hops && t.hops.length ? el("div", { class: "note mono" }, t.hops.map((h) => `${h.ttl}: ${h.kind}${h.router ? " " + h.router : ""}${h.responder ? " ← " + h.responder : ""}${h.detail ? " (" + h.detail + ")" : ""}`).join(" · ")) : null);
  }
  function showEvidence(t, n, td, scroll) {
    if (selected) selected.classList.remove("sel");
    selected = td; if (td) td.classList.add("sel");
    const c = cellInfo(t, n), box = $("evidence-body"), row = M.targets[t];
    box.textContent = "";
    const ev = c.vid !== null ? R.evidence[String(c.vid)] : null;
    box.append(el("div", { class: "ev-head" }, el("h3", {}, row[0] + " @ " + netName(n)),
      badge(STATE[c.code], BLOCKED.includes(c.code) ? "blocked" : STATE[c.code]),
      c.detail ? el("code", {}, c.detail) : null,
      el("span", { class: "note" }, `blocked in ${c.blocked} of ${c.total} measurements` + (c.first ? ` · first blocked ${day(c.first)}, last ${day(c.last)}` : ""))));
    if (!ev) {
      box.append(el("p", { class: "note" }, c.vid !== null
        ? `Latest verdict #${c.vid}` + (c.rule ? `, rule ${c.rule}` : "") + ". Its observations are not embedded (the report keeps the evidence of the most telling cells); narrow the report with --network / --list to embed them."
        : "No blocked verdict to show for this cell."));
      if (c.rule) box.append(el("p", {}, "rule ", el("code", { class: "ev-rule" }, c.rule), " · verdict ", el("code", {}, "#" + c.vid)));
      if (scroll !== false) box.scrollIntoView({ block: "start" });
      return;
    }
    box.append(kv([["rule", el("code", { class: "ev-rule" }, ev.rule)], ["confidence", ev.confidence],
      ["verdict", "#" + ev.verdict + " in run " + ev.run], ["observations", el("span", { class: "ev-obs mono" }, (ev.observations || []).join(", "))],
      ["frames", (ev.packets || []).join(", ")]]));
    box.append(el("blockquote", { class: "ev-sentence" }, ev.sentence));
    for (const tr of ev.traces || []) box.append(traceBox(tr));
    if (ev.steps) {
      const probe = ev.steps.filter((s) => s.vantage !== "control"), control = ev.steps.filter((s) => s.vantage === "control");
      box.append(el("div", { class: "steps" },
        el("div", {}, el("h4", {}, `Probe (${probe.length} steps)`), probe.map(stepCard)),
        el("div", {}, el("h4", {}, `Control (${control.length} steps)`), control.length ? control.map(stepCard) : el("p", { class: "empty" }, "no control observation"))));
      if (ev.more_steps) box.append(el("p", { class: "note" }, "More steps are stored; kzprobe verdicts --run " + ev.run + " shows them all."));
    } else {
      box.append(el("p", { class: "note" }, "Observation details are not embedded for this cell (size budget); the ids above are in the database."));
    }
    if (scroll !== false) box.scrollIntoView({ block: "start" });
  }

  // ---- Time, mechanisms, claims, TLS, blockpages, sources --------------------------------------
  function sortable(tbl) {
    tbl.querySelectorAll("th").forEach((th, i) => {
      th.classList.add("sortable");
      th.addEventListener("click", () => {
        const tb = tbl.tBodies[0], rows = Array.from(tb.rows), dir = th.dataset.dir === "asc" ? -1 : 1;
        th.dataset.dir = dir === 1 ? "asc" : "desc";
        rows.sort((a, b) => {
          const x = a.cells[i].textContent, y = b.cells[i].textContent, nx = parseFloat(x), ny = parseFloat(y);
          return dir * (!isNaN(nx) && !isNaN(ny) ? nx - ny : x.localeCompare(y));
        });
        rows.forEach((r) => tb.append(r));
      });
    });
    return tbl;
  }
  function time() {
    const T = R.time, box = $("time-table");
    box.append(el("p", { class: "note" }, `${T.blocks_total} target × network pairs were blocked at least once` + (T.blocks_total > T.blocks.length ? ` (the ${T.blocks.length} most often blocked are listed)` : "") + "."));
    box.append(sortable(table(["target", "network", "first seen blocked", "last seen blocked", { label: "blocked", num: true }, { label: "measured", num: true }, "now", "detail"],
      T.blocks.map((b) => [b.target, netName(b.net), ts(b.first), b.ongoing ? "ongoing (" + ts(b.last) + ")" : ts(b.last) + " (ended)", b.blocked, b.total, b.now, b.detail || ""]))));
  }
  function mechanisms() {
    const X = R.mechanisms;
    $("mech-table").append(table(["network", ...X.details, { label: "total", num: true }],
      X.per_network.filter((p) => Object.keys(p.counts).length).map((p) => [netName(p.net), ...X.details.map((d) => p.counts[d] || ""),
        Object.values(p.counts).reduce((a, b) => a + b, 0)])));
  }
  function claims() {
    const box = $("claims-body");
    const counts = {};
    R.claims.forEach((c) => { counts[c.summary] = (counts[c.summary] || 0) + 1; });
    box.append(el("p", { class: "note" }, Object.entries(counts).map(([k, v]) => `${v} ${k}`).join(" · ")));
    const measured = R.claims.filter((c) => c.summary !== "not measured");
    const rank = { differs: 0, mixed: 1, agrees: 2 };
    measured.sort((a, b) => (rank[a.summary] - rank[b.summary]) || a.domain.localeCompare(b.domain));
    for (const c of measured) {
      const div = el("div", { class: "claim", "data-domain": c.domain },
        el("div", {}, el("b", {}, c.domain), " ", badge(c.summary), " ", el("span", { class: "note" }, c.role === "control" ? "report: accessible / contrast" : "report: blocked")),
        el("blockquote", {}, "“" + c.quote + "”"),
        el("div", { class: "cite" }, `Freedom on the Net 2014: Kazakhstan — ${c.section || "report"}` + (c.footnote ? `, footnote ${c.footnote}` : "") + (c.dates ? ` · dates: ${c.dates}` : "") + (c.mechanism ? ` · mechanism in the report: ` : "")
          , c.mechanism ? el("b", { class: "claim-mech" }, c.mechanism) : null));
      const rows = c.measured.filter((m) => m.status).map((m) => [netName(m.net), m.status ? badge(m.status + (m.mechanism ? "/" + m.mechanism : ""), m.status) : "—",
        m.detail ? el("code", {}, m.detail) : "", m.total ? `${m.blocked}/${m.total}` : "", badge(m.agreement), m.why]);
      div.append(table(["network", "measured", "detail", "blocked/measured", "agreement", "why"], rows, { cls: "claim-table" }));
      const none = c.measured.filter((m) => !m.status).map((m) => netName(m.net));
      if (none.length) div.append(el("div", { class: "note" }, "Not measured on: " + none.join(", ") + "."));
      for (const t of c.traces || []) div.append(el("div", { class: "hopline" }, traceBox(t)));
      box.append(div);
    }
    const rest = R.claims.filter((c) => c.summary === "not measured");
    if (rest.length) {
      box.append(el("h3", {}, `Not measured in this period (${rest.length} claims)`));
      box.append(el("ul", { class: "unmeasured" }, rest.map((c) => el("li", { class: "claim-unmeasured", "data-domain": c.domain },
        el("b", {}, c.domain), ` (${c.section}` + (c.footnote ? `, fn. ${c.footnote}` : "") + (c.dates ? `, ${c.dates}` : "") + "): “" + c.quote + "”"))));
    }
  }
  function circumvention() {
    const C = R.circumvention;
    if (!C) return;
    const cbox = $("circ-claims"), obox = $("circ-outage"), gbox = $("circ-groups");
    cbox.append(el("h3", {}, "The 2014 report's claims about circumvention, beside the measurements"));
    for (const c of C.claims) {
      const div = el("div", { class: "claim circ-claim", "data-key": c.key },
        el("div", {}, el("b", {}, c.what), " ", badge(c.summary)),
        el("blockquote", {}, "“" + c.quote + "”"),
        el("div", { class: "cite" }, `Freedom on the Net 2014: Kazakhstan — ${c.section}` + (c.footnote ? `, footnote ${c.footnote}` : "") + (c.dates ? ` · dates: ${c.dates}` : "")));
      div.append(table(["network", "agreement", "what was measured"], c.measured.map((m) => [netName(m.net), badge(m.agreement), m.why]), { cls: "claim-table" }));
      cbox.append(div);
    }
    if (C.outage.length) {
      obox.append(el("h3", {}, "Messaging endpoints over time (the 13 February 2014 outage: about 1.5 hours)"));
      obox.append(table(["network", { label: "endpoints blocked", num: true }, "failing from", "failing until", { label: "minutes", num: true }, "ended", { label: "endpoints fine", num: true }, "fine from", "fine until"],
        C.outage.map((o) => [netName(o.net), o.blocked_targets, ts(o.blocked_from), ts(o.blocked_until), o.minutes === undefined ? "" : o.minutes,
          o.blocked_targets ? (o.ended ? "yes (measured fine afterwards)" : "no") : "—", o.ok_targets, ts(o.ok_from), ts(o.ok_until)]), { cls: "circ-outage" }));
    }
    if (C.rows_total > C.rows.length) gbox.append(el("p", { class: "note" }, `${C.rows.length} of ${C.rows_total} circumvention targets are shown (the non-web kinds and the built-in lists' entries first, then the most often blocked); narrow the report with --list or --network for the rest.`));
    const titles = { tor: "Tor: OR ports and directories", messaging: "Messaging endpoints", proxies: "Proxies and circumvention sites" };
    for (const g of ["tor", "messaging", "proxies"]) {
      const rows = C.rows.filter((r) => r.group === g);
      gbox.append(el("h3", {}, `${titles[g]} (${rows.length} targets)`));
      if (!rows.length) { gbox.append(el("p", { class: "empty", id: "circ-" + g }, "None measured in this period.")); continue; }
      const sum = C.groups[g] || [];
      gbox.append(el("p", { class: "note" }, sum.map((s) => `${netName(s.net)}: ${s.ok} ok, ${s.blocked} blocked` +
        (Object.keys(s.details).length ? " (" + Object.entries(s.details).map(([d, k]) => d + " " + k).join(", ") + ")" : "") + (s.other ? `, ${s.other} down/inconclusive` : "")).join(" · ")));
      const head = ["kind", "target", ...NETS.map((n, i) => netName(i))];
      const t = el("table", { class: "circ-table", id: "circ-" + g });
      t.append(el("thead", {}, el("tr", {}, head.map((h) => el("th", {}, h)))));
      const tb = el("tbody");
      for (const r of rows) {
        const tr = el("tr", {}, el("td", {}, el("code", {}, r.kind)), el("td", { class: "t", title: r.target }, r.target,
          r.role === "control" ? el("span", { class: "cat" }, " report: still worked") : null));
        for (let n = 0; n < NETS.length; n++) {
          const c = r.cells.find((x) => x.net === n);
          if (!c) { tr.append(el("td", { class: "c s-none" }, "·")); continue; }
          const label = c.status + (c.mechanism ? "/" + c.mechanism : "");
          tr.append(el("td", { class: "cc", "data-target": r.target, "data-net": NETS[n].key, "data-detail": c.detail || "", "data-status": c.status,
            title: (c.sentence || label) + ` (blocked in ${c.blocked} of ${c.total})`, on: { click: (e) => showEvidence(r.t, n, e.currentTarget) } },
            badge(label, c.status), c.detail ? el("div", {}, el("code", {}, c.detail)) : null,
            c.blocked ? el("div", { class: "note" }, `${c.blocked}/${c.total}`) : null,
            c.sentence && C.key_details.includes(c.detail) ? el("div", { class: "note circ-sentence" }, c.sentence) : null));
        }
        tb.append(tr);
      }
      t.append(tb);
      gbox.append(t);
    }
  }
  function tls() {
    const box = $("tls-body");
    if (!R.tls_interception.length) { box.append(el("p", { class: "empty" }, "No interception seen: no target was blocked by an intercepting certificate.")); return; }
    box.append(table(["network", "issuer", "targets", "certificate failure", "chain presented"], R.tls_interception.map((r) =>
      [netName(r.net), el("b", {}, r.issuer), r.targets.join(", "), r.cert_failure ? el("code", {}, r.cert_failure) : "",
        (r.chain || []).map((c) => (c.subject || "?") + " ← " + (c.issuer || "?")).join("  ⟶  ")])));
  }
  function blockpages() {
    const box = $("bp-body");
    if (!R.blockpages.length) { box.append(el("p", { class: "empty" }, "No blockpage fingerprint matched in this period.")); return; }
    box.append(table(["fingerprint", "title", "text sample", "HTTP status", "networks (targets)"], R.blockpages.map((b) =>
      [el("code", {}, b.fingerprint), b.title, el("span", { class: "note" }, b.sample), b.status || "",
        Object.entries(b.networks).map(([n, ts]) => netName(+n) + ": " + ts.join(", ")).join("; ")])));
  }
  function sources() {
    $("sources-table").append(table(["source", { label: "runs", num: true }, "networks", { label: "targets", num: true }, { label: "verdicts", num: true },
      { label: "ok", num: true }, { label: "blocked", num: true }, { label: "down", num: true }, { label: "inconclusive", num: true }, { label: "cells blocked now", num: true }],
      R.sources.map((s) => [s.source, s.runs, s.networks.join(", ") || "—", s.targets, s.measurements, s.by_status.ok || 0, s.by_status.blocked || 0,
        s.by_status.down || 0, s.by_status.inconclusive || 0, s.blocked_now])));
  }

  function crossSource() {
    const box = $("cross-source");
    if (!R.cross_source.length) { box.append(el("p", { class: "empty" }, "No site was measured by more than one source in this period.")); return; }
    box.append(table(["site", "live", "pcap", "ooni"], R.cross_source.map((r) =>
      [el("b", {}, r.domain), ...["live", "pcap", "ooni"].map((s) => (r.sources[s] || ["—"]).join("; "))])));
  }

  summary(); crossSource(); matrixControls(); refilter(); time(); mechanisms(); claims(); circumvention(); tls(); blockpages(); sources();
  const first = document.querySelector("td.c.s-p, td.c.s-d, td.c.s-i, td.c.s-b");
  if (first) showEvidence(+first.dataset.t, +first.dataset.n, first, false);
  document.body.dataset.ready = "1";
})();
