// The rekey console: a read-only view of the admin API's views
// (rekey_types::v1, docs/views.md), refreshed on every server-sent event.
// No framework, no build step. Text reaches the page only through
// textContent: nothing from the coordinator is ever parsed as HTML.
"use strict";

(function () {
  const main = document.getElementById("main");
  const live = document.getElementById("live");
  let rendering = null; // the view being fetched, to drop stale answers
  let pending = false;

  // el("td", {class: "x"}, "text", child, ...)
  function el(tag, attrs, ...children) {
    const e = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v !== null && v !== undefined && v !== false) e.setAttribute(k, v === true ? "" : String(v));
    }
    for (const c of children.flat(Infinity)) {
      if (c === null || c === undefined) continue;
      e.append(c instanceof Node ? c : document.createTextNode(String(c)));
    }
    return e;
  }

  function time(ms) {
    if (!ms) return "-";
    return new Date(ms).toISOString().replace("T", " ").replace(/\.\d+Z$/, "Z");
  }

  function badge(state) {
    return el("span", { class: "badge s-" + state, "data-state": state }, state.replace(/_/g, " "));
  }

  function link(href, text) {
    return el("a", { href }, text);
  }

  function table(caption, headers, rows, empty) {
    if (rows.length === 0) return el("p", { class: "empty" }, empty);
    return el(
      "div",
      { class: "scroll" },
      el(
        "table",
        {},
        el("caption", { class: "sr-only" }, caption),
        el("thead", {}, el("tr", {}, headers.map((h) => el("th", { scope: "col" }, h)))),
        el("tbody", {}, rows)
      )
    );
  }

  async function get(path) {
    const r = await fetch(path, { credentials: "same-origin", cache: "no-store" });
    if (r.status === 401) {
      window.location.assign("/");
      throw new Error("not logged in");
    }
    if (!r.ok) throw new Error(path + ": " + r.status + " " + (await r.text()));
    return r.json();
  }

  // ---- views ----

  async function fleet() {
    const agents = await get("/api/fleet");
    const connected = agents.filter((a) => a.connected).length;
    const rows = agents.map((a) =>
      el(
        "tr",
        { "data-agent": a.name },
        el("th", { scope: "row" }, a.name),
        el("td", {}, Object.entries(a.labels).map(([k, v]) => el("span", { class: "label" }, k + "=" + v))),
        el(
          "td",
          { class: a.revoked ? "bad" : a.connected ? "good" : "warn", "data-connected": String(a.connected) },
          a.revoked ? "revoked" : a.connected ? "connected" : "disconnected"
        ),
        el("td", {}, a.agent_version || "-"),
        el("td", {}, a.cert_expires),
        el("td", {}, a.secrets.join(", ")),
        el("td", {}, a.last_seen)
      )
    );
    return [
      el("h1", {}, "Fleet"),
      el("p", { class: "summary" }, `${agents.length} agents, ${connected} connected`),
      table("Agents", ["Agent", "Labels", "Session", "Version", "Certificate expires", "Secrets", "Last seen"], rows, "No agent is enrolled yet."),
    ];
  }

  async function secrets() {
    const all = await get("/api/secrets");
    const rows = all.map((s) =>
      el(
        "tr",
        { "data-secret": s.name },
        el("th", { scope: "row" }, s.name, s.description ? el("div", { class: "muted" }, s.description) : null),
        el("td", {}, s.provider),
        el("td", {}, s.current_version || "none yet", s.current_version_adopted ? el("span", { class: "muted" }, " (adopted)") : null),
        el("td", {}, s.active_rotation ? link("#/rotations/" + s.active_rotation, s.active_rotation) : "-"),
        el("td", {}, s.last_rotation ? [link("#/rotations/" + s.last_rotation.id, s.last_rotation.id), " ", badge(s.last_rotation.state)] : "-"),
        el("td", {}, String(s.consumers.length))
      )
    );
    return [
      el("h1", {}, "Secrets"),
      table("Secrets", ["Secret", "Provider", "Current version", "Rotating now", "Last rotation", "Consumers"], rows, "The catalog is empty."),
    ];
  }

  async function rotations() {
    const all = await get("/api/rotations");
    const rows = all.map((r) =>
      el(
        "tr",
        { "data-rotation": r.id },
        el("th", { scope: "row" }, link("#/rotations/" + r.id, r.id)),
        el("td", {}, r.secret),
        el("td", {}, badge(r.state), r.paused ? el("span", { class: "label" }, "paused") : null),
        el("td", {}, `${r.healthy}/${r.hosts}`),
        el("td", {}, `${Math.min(r.wave + 1, r.waves)}/${r.waves}`),
        el("td", {}, time(r.created_ms)),
        el("td", {}, r.waiting_on || "")
      )
    );
    return [
      el("h1", {}, "Rotations"),
      table("Rotations, newest first", ["Rotation", "Secret", "State", "Healthy", "Wave", "Started", "Waiting on"], rows, "No rotation yet."),
    ];
  }

  function hostGrid(r) {
    const canary = r.policy && r.policy.canary > 0;
    return el(
      "div",
      { class: "grid", id: "grid" },
      r.waves.map((hosts, i) =>
        el(
          "section",
          { class: "wave" + (i === r.current_wave ? " current" : ""), "aria-label": `Wave ${i}` },
          el("h3", {}, canary && i === 0 ? "Canary" : "Wave " + (canary ? i : i + 1), i === r.current_wave ? " (current)" : ""),
          el(
            "ul",
            { class: "hosts" },
            hosts.map((name) => {
              const h = r.hosts[name] || { state: "pending" };
              const why = h.error || (h.exclusion && h.exclusion.reason) || "";
              return el(
                "li",
                { class: "host s-" + h.state, "data-host": name, "data-state": h.state, title: why || h.state },
                el("span", { class: "name" }, name),
                el("span", { class: "st" }, h.state.replace(/_/g, " ")),
                why ? el("span", { class: "why" }, why) : null
              );
            })
          )
        )
      )
    );
  }

  async function rotation(id) {
    const r = await get("/api/rotations/" + encodeURIComponent(id));
    const count = (s) => Object.values(r.hosts).filter((h) => h.state === s).length;
    const total = Object.keys(r.hosts).length;
    const facts = [
      ["Secret", r.secret],
      ["Started by", `${r.started_by} at ${time(r.created_ms)}`],
      ["Old version", r.old_version || "none"],
      ["New version", r.new_version || "not created yet"],
      ["Hosts", `${count("healthy")} healthy, ${count("failed") + count("rolled_back")} failed, ${count("excluded")} excluded of ${total}`],
    ];
    if (r.waiting_on && r.waiting_on !== r.halt_reason) facts.push(["Waiting on", r.waiting_on]);
    if (r.phase_until_ms) facts.push(["Phase ends", time(r.phase_until_ms)]);
    return [
      el("p", {}, link("#/rotations", "← Rotations")),
      el("h1", {}, "Rotation ", el("code", {}, r.id), " ", el("span", { id: "rotation-state" }, badge(r.state)), r.paused ? el("span", { class: "label" }, "paused") : null),
      r.halt_reason ? el("p", { class: "alert", id: "halt-reason", role: "alert" }, "Halted: " + r.halt_reason) : null,
      el("dl", { class: "facts" }, facts.map(([k, v]) => [el("dt", {}, k), el("dd", {}, v)])),
      el("h2", {}, "Waves"),
      hostGrid(r),
      r.exits.length
        ? [el("h2", {}, "What an operator can do"), el("ul", { class: "exits" }, r.exits.map((x) => el("li", {}, el("code", {}, x.command), " — ", x.what)))]
        : null,
      el("h2", {}, "Timeline"),
      table(
        "Timeline",
        ["Time", "State", "Note"],
        r.timeline.map((t) => el("tr", {}, el("td", {}, time(t.at_ms)), el("td", {}, badge(t.state)), el("td", {}, t.note))),
        "Nothing happened yet."
      ),
      r.decisions.length
        ? [
            el("h2", {}, "Decisions"),
            table("Decisions", ["Time", "Decision", "By", "Reason"], r.decisions.map((d) => el("tr", {}, el("td", {}, time(d.at_ms)), el("td", {}, d.kind), el("td", {}, d.by), el("td", {}, d.reason))), ""),
          ]
        : null,
    ];
  }

  async function alerts() {
    const all = await get("/api/alerts");
    const rows = all.map((a) =>
      el(
        "tr",
        { class: "sev-" + a.severity },
        el("td", {}, time(a.at_ms)),
        el("td", {}, a.severity),
        el("td", {}, a.kind.replace(/_/g, " ")),
        el("td", {}, a.secret),
        el("td", {}, a.rotation ? link("#/rotations/" + a.rotation, a.rotation) : "-"),
        el("td", {}, a.message),
        el("td", {}, a.delivery)
      )
    );
    return [el("h1", {}, "Alerts"), table("Alerts, newest first", ["Time", "Severity", "Kind", "Secret", "Rotation", "Message", "Webhook"], rows, "No alert.")];
  }

  async function incidents() {
    const all = await get("/api/incidents");
    const rows = all.map((i) =>
      el(
        "tr",
        {},
        el("th", { scope: "row" }, i.id),
        el("td", {}, i.name),
        el("td", {}, badge(i.state)),
        el("td", {}, Object.entries(i.summary).map(([k, n]) => el("span", { class: "label" }, `${k.replace(/_/g, " ")}: ${n}`))),
        el(
          "td",
          {},
          Object.entries(i.secrets).map(([name, s]) =>
            el("div", {}, name + " ", s.rotation ? link("#/rotations/" + s.rotation, s.rotation) : s.error || "", " ", badge(s.state))
          )
        ),
        el("td", {}, i.needs_operator.join("; ")),
        el("td", {}, time(i.opened_ms))
      )
    );
    return [el("h1", {}, "Incidents"), table("Incidents, newest first", ["Incident", "Name", "State", "Summary", "Secrets", "Needs an operator", "Opened"], rows, "No incident.")];
  }

  async function audit() {
    const a = await get("/api/audit");
    const v = a.verification;
    const status = v.ok
      ? el("p", { class: "ok", id: "audit-status", "data-ok": "true" }, `Chain verified: ${v.records} records, head ${v.head.slice(0, 16)}…`)
      : el("p", { class: "alert", id: "audit-status", "data-ok": "false", role: "alert" }, `Chain BROKEN at record ${v.first_broken ? v.first_broken.seq : "?"}: ${v.first_broken ? v.first_broken.problem : ""}`);
    const rows = a.records.map((r) =>
      el("tr", {}, el("td", {}, String(r.seq)), el("td", {}, time(r.at_ms)), el("td", {}, r.actor), el("td", {}, r.action), el("td", { class: "details" }, JSON.stringify(r.details)))
    );
    return [
      el("h1", {}, "Audit log"),
      status,
      el("p", { class: "summary" }, `Newest ${a.records.length} of ${a.total} records`),
      table("Audit records, newest first", ["#", "Time", "Actor", "Action", "Details"], rows, "The chain is empty."),
    ];
  }

  const views = { fleet, secrets, rotations, alerts, incidents, audit };

  function route() {
    const parts = (window.location.hash || "#/rotations").replace(/^#\/?/, "").split("/");
    if (parts[0] === "rotations" && parts[1]) return { name: "rotations", run: () => rotation(decodeURIComponent(parts[1])) };
    const name = views[parts[0]] ? parts[0] : "rotations";
    return { name, run: views[name] };
  }

  async function render(moveFocus) {
    if (rendering) {
      pending = true;
      return;
    }
    const r = route();
    rendering = r;
    for (const a of document.querySelectorAll("nav a")) {
      if (a.dataset.view === r.name) a.setAttribute("aria-current", "page");
      else a.removeAttribute("aria-current");
    }
    try {
      const content = await r.run();
      main.replaceChildren(...[content].flat(Infinity).filter((c) => c !== null && c !== undefined));
      main.dataset.rendered = String(Date.now());
      main.dataset.view = window.location.hash || "#/rotations";
      if (moveFocus) main.focus();
    } catch (e) {
      main.replaceChildren(el("p", { class: "alert", role: "alert" }, "Could not load: " + e.message));
    } finally {
      rendering = null;
      if (pending) {
        pending = false;
        render(false);
      }
    }
  }

  function connect() {
    const es = new EventSource("/api/events");
    es.addEventListener("hello", () => {
      live.dataset.live = "on";
      live.textContent = "live";
      render(false);
    });
    es.addEventListener("change", () => render(false));
    es.addEventListener("expired", () => {
      es.close();
      live.dataset.live = "off";
      live.textContent = "session expired: run rekey console";
    });
    es.onerror = () => {
      live.dataset.live = "off";
      live.textContent = "reconnecting…";
    };
  }

  async function whoami() {
    try {
      const w = await get("/api/whoami");
      document.getElementById("who").textContent = `${w.operator} (${w.role}) until ${time(w.expires_ms)}`;
    } catch (_) {
      /* the view shows the error */
    }
  }

  window.addEventListener("hashchange", () => render(true));
  whoami();
  render(false);
  connect();
})();
