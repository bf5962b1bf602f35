// The llmlb console: one page, no dependencies. It calls the /v0 management API with the signed-in
// key in an Authorization header; the key lives in sessionStorage only (never a URL or a cookie).
const KEY = "llmlb.key";
const POLL_MS = 2000;
const PAGE = 50;
const $ = (id) => document.getElementById(id);
const state = { me: null, page: "", paging: { nodes: 0, models: 0, events: 0 }, seen: new Map(), busy: false, nodes: [] };

class ApiError extends Error {
  constructor(status, message, code) { super(message); this.status = status; this.code = code; }
}

async function api(method, path, body, key = sessionStorage.getItem(KEY)) {
  const headers = { Authorization: `Bearer ${key}` };
  if (body !== undefined) headers["Content-Type"] = "application/json";
  const r = await fetch(path, { method, headers, cache: "no-store", body: body === undefined ? undefined : JSON.stringify(body) });
  const text = await r.text();
  let data = null;
  try { data = text ? JSON.parse(text) : null; } catch { data = null; }
  if (!r.ok) throw new ApiError(r.status, data?.error?.message || `${r.status} ${r.statusText}`, data?.error?.code);
  return data;
}

// Builds an element; text is always set as text, never parsed as HTML.
function h(tag, attrs = {}, ...kids) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v === undefined || v === null || v === false) continue;
    if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
    else if (k === "text") el.textContent = v;
    else el.setAttribute(k, v === true ? "" : v);
  }
  for (const kid of kids.flat()) if (kid !== null && kid !== undefined) el.append(kid instanceof Node ? kid : String(kid));
  return el;
}

function show(message, info = false) {
  const box = $("alert");
  box.textContent = message;
  box.className = info ? "alert info" : "alert";
  box.hidden = !message;
}

const isAdmin = () => state.me?.scopes.includes("admin");
const bytes = (n) => n >= 1e9 ? `${(n / 1e9).toFixed(2)} GB` : n >= 1e6 ? `${(n / 1e6).toFixed(1)} MB` : n >= 1e3 ? `${(n / 1e3).toFixed(1)} KB` : `${n} B`;
const when = (iso) => iso ? new Date(iso).toLocaleString() : "never";
const stateCell = (s) => h("span", { class: `state-${s}`, text: s });
const seconds = (v) => (v === null || v === undefined) ? "–" : `${v.toFixed(1)} s`;
// A model id in a URL path: each segment encoded, its slashes kept (the routes take the id as a path).
const modelPath = (id) => id.split("/").map(encodeURIComponent).join("/");

// Opens the shared dialog with ``body`` and OK/Cancel; resolves true on OK.
function ask(body, focus) {
  const dialog = $("dialog");
  $("dialog-body").replaceChildren(body);
  $("dialog-cancel").hidden = false;
  dialog.returnValue = "";
  dialog.showModal();
  focus?.focus();
  return new Promise((resolve) => dialog.addEventListener("close", () => resolve(dialog.returnValue === "ok"), { once: true }));
}

// Asks before anything that cannot be undone; resolves true on OK.
function confirmAction(message) {
  return ask(h("p", { text: message }), $("dialog-cancel"));
}

function showInfo(title, body) {
  $("dialog-body").replaceChildren(h("h2", { text: title }), body);
  $("dialog-cancel").hidden = true;
  $("dialog").showModal();
}

// Runs an action; its message (or none) replaces any earlier one, and an API refusal shows as the API gave it.
async function act(what, fn) {
  try {
    const message = await fn();
    show(typeof message === "string" ? message : "", true);
  } catch (e) { show(`${what}: ${e.message}`); }
  await refresh();
}

// --- charts: a tiny SVG line chart, no library ---------------------------------------------------
function chart(title, series, unit, labels = []) {
  const w = 300, hgt = 90;
  const all = series.flat().filter((v) => v !== null);
  const max = Math.max(1e-9, ...all);
  const svg = document.createElementNS("http://www.w3.org/2000/svg", "svg");
  svg.setAttribute("viewBox", `0 0 ${w} ${hgt}`);
  svg.setAttribute("preserveAspectRatio", "none");
  svg.setAttribute("role", "img");
  svg.setAttribute("aria-label", title);
  series.forEach((values, i) => {
    const n = Math.max(1, values.length - 1);
    const pts = values.map((v, x) => `${(x / n) * w},${hgt - ((v ?? 0) / max) * (hgt - 4) - 2}`).join(" ");
    const line = document.createElementNS("http://www.w3.org/2000/svg", "polyline");
    line.setAttribute("points", pts);
    line.setAttribute("class", `l${i}`);
    svg.append(line);
  });
  const last = series.map((values) => values.at(-1) ?? 0);
  const legend = labels.length ? labels.map((l, i) => `${l} ${fmt(last[i])}`).join(" · ") : fmt(last[0]);
  return h("figure", { "data-chart": title }, h("figcaption", {}, h("span", { text: title }), h("span", { text: `${legend} ${unit} (max ${fmt(max)})` })), svg);
}
const fmt = (v) => (v === null || v === undefined) ? "–" : Math.abs(v) >= 100 ? v.toFixed(0) : v.toFixed(2);

// --- pages ---------------------------------------------------------------------------------------
async function overview() {
  const choice = $("series").value;
  const [nodes, models, history] = await Promise.all([
    api("GET", "/v0/nodes"), api("GET", "/v0/models"),
    api("GET", `/v0/history?since=${Math.floor(Date.now() / 1000) - 3600}${choice ? "&" + choice : ""}`),
  ]);
  const count = (s) => nodes.data.filter((n) => n.state === s).length;
  const tiles = [["online", count("online")], ["draining", count("draining")], ["offline", count("offline")],
    ["models ready", `${models.data.filter((m) => m.ready).length} / ${models.data.length}`]];
  $("tiles").replaceChildren(...tiles.map(([label, v]) => h("div", { class: "tile", "data-tile": label }, h("b", { text: v }), label)));
  const select = $("series");
  const options = ["", ...history.models.map((m) => `model=${encodeURIComponent(m)}`), ...history.nodes.map((n) => `node=${encodeURIComponent(n)}`)];
  if (select.options.length !== options.length) {
    select.replaceChildren(...options.map((v) => h("option", { value: v, text: v ? decodeURIComponent(v).replace("=", ": ") : "the whole fleet" })));
    select.value = choice;
  }
  $("replica").textContent = `history kept by replica ${history.replica}`;
  // One point per bucket over the last hour; a bucket without requests is zero.
  const step = history.bucket_s, end = Math.floor(Date.now() / 1000 / step) * step;
  const byT = new Map(history.series.points.map((p) => [p.t, p]));
  const pts = [];
  for (let t = end - 3600 + step; t <= end; t += step) pts.push(byT.get(t) || { t });
  const col = (k) => pts.map((p) => p[k] ?? (k.endsWith("_ms") ? null : 0));
  $("total-requests").textContent = history.series.points.reduce((a, p) => a + p.requests, 0);
  $("charts").replaceChildren(
    chart("Requests/s", [col("requests_per_s")], "req/s"),
    chart("Errors/s", [col("errors_per_s")], "err/s"),
    chart("Latency", [col("latency_p50_ms"), col("latency_p99_ms")], "ms", ["p50", "p99"]),
    chart("Time to first token p50", [col("ttft_p50_ms")], "ms"),
    chart("Tokens/s", [col("tokens_per_s")], "tok/s"),
    chart("Queue depth", [col("queue_depth")], "waiting"),
  );
}

function pager(id, total, which) {
  const pages = Math.max(1, Math.ceil(total / PAGE));
  state.paging[which] = Math.min(state.paging[which], pages - 1);
  const at = state.paging[which];
  const go = (d) => () => { state.paging[which] = at + d; refresh(); };
  $(id).replaceChildren(
    h("button", { type: "button", disabled: at === 0, onclick: go(-1) }, "Previous"),
    h("span", { text: `page ${at + 1} of ${pages} (${total})` }),
    h("button", { type: "button", disabled: at >= pages - 1, onclick: go(1) }, "Next"));
  return (rows) => rows.slice(at * PAGE, (at + 1) * PAGE);
}

async function nodesPage() {
  const nodes = (await api("GET", "/v0/nodes")).data;
  const page = pager("nodes-pager", nodes.length, "nodes");
  $("nodes").replaceChildren(...page(nodes).map((n) => h("tr", { "data-node": n.id },
    h("td", {}, h("b", { text: n.id }), h("div", { class: "hint", text: n.address })),
    h("td", {}, stateCell(n.state)),
    h("td", { text: n.backends.join(", ") || "cpu" }),
    h("td", {}, n.gpus.length ? h("ul", { class: "plain" }, n.gpus.map((g) => h("li", { text: `${g.name}: ${g.memory_free_mb} / ${g.memory_total_mb} MB free` }))) : "none"),
    h("td", { text: n.load ? `${n.load.memory_used_mb} / ${n.load.memory_total_mb} MB` : "–" }),
    h("td", { text: n.load ? `${n.load.active_requests} active, ${n.load.queued_requests} queued, CPU ${n.load.cpu_percent.toFixed(0)} %` : "–" }),
    h("td", {}, h("ul", { class: "plain" }, n.models.map((m) => h("li", {}, `${m.model_id} `, stateCell(m.state))))),
    h("td", {},
      n.state === "draining"
        ? h("button", { type: "button", "aria-label": `Undrain ${n.id}`,
          onclick: () => act("Undrain", () => api("POST", `/v0/nodes/${encodeURIComponent(n.id)}/undrain`)) }, "Undrain")
        : h("button", { type: "button", disabled: n.state !== "online", "aria-label": `Drain ${n.id}`,
          onclick: async () => { if (await confirmAction(`Drain node ${n.id}? It finishes its work and takes no more.`)) act("Drain", () => api("POST", `/v0/nodes/${encodeURIComponent(n.id)}/drain`)); } }, "Drain"), " ",
      h("button", { type: "button", class: "danger", "aria-label": `Remove ${n.id}`,
        onclick: async () => { if (await confirmAction(`Remove node ${n.id} from the fleet?`)) act("Remove", () => api("DELETE", `/v0/nodes/${encodeURIComponent(n.id)}`)); } }, "Remove")))));
}

// Download progress per (model, node), with a rate and ETA averaged since the console first saw
// this download: nodes report bytes every few seconds, so two polls in a row often see the same
// count, and a rate from the last poll alone would come and go.
// ``modelTotal``: the manifest's size, for nodes that report no byte counts once a model is present.
function progressCell(s, modelTotal = 0) {
  const key = `${s.model_id}@${s.node_id}`, now = Date.now();
  let before = state.seen.get(key);
  if (s.state !== "downloading" || !before || s.downloaded_bytes < before.bytes) {
    before = undefined;  // a new download (or none): start measuring from here
    state.seen.set(key, { at: now, bytes: s.downloaded_bytes });
  }
  const total = s.total_bytes || modelTotal;
  // Nodes report bytes only while downloading; a model present, loading or ready has all of them.
  const partial = s.state === "downloading" || s.state === "failed";
  const done = !partial && total > 0 ? total : s.downloaded_bytes;
  const pct = total > 0 ? Math.floor((100 * done) / total) : partial ? 0 : 100;
  let detail = `${pct} %`;
  if (total > 0) detail += ` · ${bytes(done)} of ${bytes(total)}`;
  if (s.state === "downloading" && before && now > before.at) {
    const rate = ((s.downloaded_bytes - before.bytes) * 1000) / (now - before.at);
    if (rate > 0) detail += ` · ${bytes(rate)}/s · ETA ${Math.ceil((total - s.downloaded_bytes) / rate)} s`;
  }
  return h("li", { "data-progress": key },
    `${s.node_id} `, stateCell(s.state), " ", s.pinned ? h("span", { class: "hint", "data-pinned": "", text: "pinned " }) : null,
    s.slots ? h("span", { class: "hint", "data-slots": "", text: `${s.slots} slots ` }) : null,
    h("progress", { max: 100, value: pct, "aria-label": `${s.model_id} on ${s.node_id}` }), " ",
    h("span", { class: "hint", text: detail }), s.error ? h("div", { class: "state-failed", text: s.error }) : null);
}

async function pullDialog(model) {
  const online = state.nodes.filter((n) => n.state === "online");
  const boxes = online.map((n) => h("label", {}, h("input", { type: "checkbox", value: n.id, checked: true }), ` ${n.id}`));
  if (!await ask(h("div", {}, h("p", { text: `Pull ${model.id} to:` }), h("ul", { class: "plain" }, boxes.map((b) => h("li", {}, b)))))) return;
  const chosen = boxes.map((b) => b.querySelector("input")).filter((i) => i.checked).map((i) => i.value);
  await act("Pull", () => api("POST", `/v0/models/${encodeURIComponent(model.id)}/pull`, { node_ids: chosen }));
}

async function manifestDialog(model) {
  try {
    const m = await api("GET", `/v0/models/registry/${model.id}/manifest.json`);
    showInfo(`Manifest of ${m.model_id}`, h("div", {},
      h("p", { text: `${m.repo} at ${m.revision}` }),
      h("table", {}, h("thead", {}, h("tr", {}, ["File", "Format", "Size", "sha256"].map((t) => h("th", { text: t })))),
        h("tbody", {}, m.files.map((f) => h("tr", {}, h("td", { text: f.filename }), h("td", { text: f.format }), h("td", { text: bytes(f.size_bytes) }), h("td", {}, h("code", { text: f.sha256 || "–" }))))))));
  } catch (e) { show(`Manifest: ${e.message}`); }
}

// --- deployments -----------------------------------------------------------------------------------
// "2 / 2 ready" for a fixed count; "min 0–max 2, 1 wanted, 1 ready" for an autoscaled one.
function deploymentSummary(d) {
  if (d.copies !== null) return `${d.ready_copies} / ${d.desired_copies} ready`;
  return `min ${d.min_copies}–max ${d.max_copies}, ${d.desired_copies} wanted, ${d.ready_copies} ready`;
}

function deploymentCell(m, d, admin) {
  const label = (what) => `${what} ${m.id}`;
  const controls = [
    admin ? h("button", { type: "button", "aria-label": label(d ? "Change deployment of" : "Deploy"), onclick: () => deployDialog(m, d) }, d ? "Change" : "Deploy") : null,
    d ? h("button", { type: "button", "aria-label": label("Placement of"), onclick: () => placementDialog(m) }, "Placement") : null,
    admin && d ? h("button", { type: "button", class: "danger", "aria-label": label("Undeploy"),
      onclick: async () => { if (await confirmAction(`Undeploy ${m.id}? Its copies unload; their files stay.`)) act("Undeploy", () => api("DELETE", `/v0/models/${modelPath(m.id)}/deployment`).then(() => `Undeployed ${m.id}.`)); } }, "Undeploy") : null,
  ].filter(Boolean);
  if (!d) return h("td", { "data-deployment": "" }, h("div", { class: "hint", text: "not deployed" }), ...controls);
  const where = Object.entries(d.selector).map(([k, v]) => `${k}=${v}`).join(", ");
  const detail = [where && `on ${where}`, d.memory_mb && `${d.memory_mb} MB a copy`].filter(Boolean).join(" · ");
  return h("td", { "data-deployment": m.id },
    h("b", { "data-summary": "", text: deploymentSummary(d) }),
    detail ? h("div", { class: "hint", text: detail }) : null,
    h("ul", { class: "plain" }, d.nodes.map((c) => h("li", { "data-copy": `${m.id}@${c.node_id}` }, `${c.node_id} `, stateCell(c.state), c.state === "ready" && !c.ready ? h("span", { class: "hint", text: " (node not in rotation)" }) : null))),
    h("div", {}, controls.flatMap((c) => [c, " "])));
}

// "key=value" lines to a selector; blank lines are skipped.
function parseSelector(text) {
  const selector = {};
  for (const line of text.split("\n").map((l) => l.trim()).filter(Boolean)) {
    const at = line.indexOf("=");
    if (at < 1) throw new Error(`selector line "${line}" is not key=value`);
    selector[line.slice(0, at).trim()] = line.slice(at + 1).trim();
  }
  return selector;
}

function whole(input, what) {
  const text = input.value.trim();
  if (!text) return null;
  const n = Number(text);
  if (!Number.isInteger(n) || n < 0) throw new Error(`${what} must be a whole number`);
  return n;
}

// Fixed copies, or min..max scaled on demand; a label selector; the memory a copy takes.
async function deployDialog(model, d) {
  const autoscaled = d ? d.copies === null : false;
  const input = (attrs) => h("input", { type: "number", min: 0, step: 1, ...attrs });
  const fixed = h("input", { type: "radio", name: "deploy-mode", value: "fixed", checked: !autoscaled });
  const scaled = h("input", { type: "radio", name: "deploy-mode", value: "scaled", checked: autoscaled });
  const copies = input({ value: d?.copies ?? 1 });
  const min = input({ value: d?.min_copies ?? 0 });
  const max = input({ value: d?.max_copies ?? "" });
  const selector = h("textarea", { rows: 3, placeholder: "zone=a" });
  selector.value = d ? Object.entries(d.selector).map(([k, v]) => `${k}=${v}`).join("\n") : "";
  const memory = input({ placeholder: "the estimate", value: d?.memory_mb ?? "" });
  const body = h("div", { class: "form" },
    h("h2", { text: `Deploy ${model.id}` }),
    h("fieldset", {}, h("legend", { text: "How many" }),
      h("label", {}, fixed, " A fixed number"), h("label", {}, "Copies ", copies),
      h("label", {}, scaled, " Scaled on demand"), h("label", {}, "Min copies ", min), h("label", {}, "Max copies ", max)),
    h("label", {}, "Node labels (one key=value a line)", selector),
    h("label", {}, "Memory a copy takes (MB) ", memory));
  if (!await ask(body, autoscaled ? min : copies)) return;
  await act("Deploy", async () => {
    const want = { selector: parseSelector(selector.value), memory_mb: whole(memory, "Memory") };
    if (scaled.checked) {
      const most = whole(max, "Max copies");
      if (most === null) throw new Error("a deployment scaled on demand needs its max copies");
      Object.assign(want, { min_copies: whole(min, "Min copies") ?? 0, max_copies: most });
    }
    else want.copies = whole(copies, "Copies");
    const done = await api("PUT", `/v0/models/${modelPath(model.id)}/deployment`, want);
    return `Deployed ${done.model_id}: ${deploymentSummary(done)}.`;
  });
}

// Each node with the rule that excluded it, or its rank and estimate; then the recent decisions.
async function placementDialog(model) {
  try {
    const p = await api("GET", `/v0/models/${modelPath(model.id)}/placement`);
    showInfo(`Placement of ${p.model_id}`, h("div", { "data-placement": p.model_id },
      h("p", { text: `${p.active} of ${p.target} copies placed. Where the next copy would go:` }),
      h("table", {}, h("thead", {}, h("tr", {}, ["Node", "Verdict", "Why"].map((t) => h("th", { text: t })))),
        h("tbody", {}, p.nodes.map((n) => h("tr", { "data-verdict": n.node_id },
          h("td", { text: n.node_id }),
          h("td", {}, n.excluded ? h("span", { class: "state-failed", text: `excluded by ${n.rule}` }) : h("span", { class: "state-ready", text: `#${n.rank}` })),
          h("td", { text: n.excluded ? n.reason : n.text }))))),
      p.nodes.length ? null : h("p", { class: "hint", text: "No node to weigh (the model is not in the catalogue)." }),
      h("h3", { text: "Recent decisions" }),
      h("ul", {}, p.decisions.slice().reverse().map((d) => h("li", { text: d.text })))));
  } catch (e) { show(`Placement: ${e.message}`); }
}

async function eventsPage() {
  const events = await api("GET", "/v0/events");
  $("acting").textContent = events.acting ? "This replica schedules: its decisions, newest first." : "This replica does not schedule now: the acting replica's console lists its decisions.";
  const filter = $("event-filter").value.trim().toLowerCase();
  const rows = events.data.slice().reverse().filter((e) => !filter || [e.action, e.model_id, e.node_id, e.reason, e.outcome].some((t) => t.toLowerCase().includes(filter)));
  const page = pager("events-pager", rows.length, "events");
  $("events").replaceChildren(...page(rows).map((e) => h("tr", { "data-event": e.action },
    h("td", { text: when(e.at) }), h("td", { text: e.action }), h("td", { text: e.model_id || "–" }), h("td", { text: e.node_id || "–" }),
    h("td", { text: e.reason }), h("td", { text: seconds(e.estimate_s) }), h("td", { text: seconds(e.actual_s) }),
    h("td", {}, e.outcome ? stateCell(e.outcome) : "–"))));
}

async function modelsPage() {
  const [models, nodes, deployed] = await Promise.all([api("GET", "/v0/models"), isAdmin() ? api("GET", "/v0/nodes") : { data: [] }, api("GET", "/v0/deployments")]);
  state.nodes = nodes.data;
  const deployments = new Map(deployed.data.map((d) => [d.model_id, d]));
  const perNode = new Map();
  for (const n of nodes.data) for (const m of n.models) (perNode.get(m.model_id) || perNode.set(m.model_id, []).get(m.model_id)).push(m);
  const filter = $("model-filter").value.trim().toLowerCase();
  const shown = models.data.filter((m) => !filter || m.id.includes(filter));
  const page = pager("models-pager", shown.length, "models");
  const admin = isAdmin();
  $("models").replaceChildren(...page(shown).map((m) => h("tr", { "data-model": m.id },
    h("td", {}, h("b", { text: m.id }), h("div", { class: "hint", text: `${m.repo_id} · ${m.capabilities.join(", ")}` })),
    h("td", {}, stateCell(m.ready ? "ready" : "not ready")),
    h("td", { text: bytes(m.total_bytes) }),
    h("td", {}, h("ul", { class: "plain" }, (perNode.get(m.id) || m.nodes.map((n) => ({ ...n, model_id: m.id, downloaded_bytes: 0, total_bytes: 0 }))).map((s) => progressCell(s, m.total_bytes)))),
    deploymentCell(m, deployments.get(m.id), admin),
    h("td", {},
      h("button", { type: "button", "aria-label": `Manifest of ${m.id}`, onclick: () => manifestDialog(m) }, "Manifest"), " ",
      admin ? h("button", { type: "button", "aria-label": `Pull ${m.id}`, onclick: () => pullDialog(m) }, "Pull") : null, " ",
      admin ? h("button", { type: "button", class: "danger", "aria-label": `Delete ${m.id}`,
        onclick: async () => { if (await confirmAction(`Delete model ${m.id}? Every node deletes its copy.`)) act("Delete", () => api("DELETE", `/v1/models/${m.id}`)); } }, "Delete") : null))));
}

function usageTotals(rows, by) {
  const totals = new Map();
  for (const r of rows) {
    const k = by(r);
    const t = totals.get(k) || { requests: 0, errors: 0, prompt_tokens: 0, completion_tokens: 0 };
    for (const f of Object.keys(t)) t[f] += r[f];
    totals.set(k, t);
  }
  return totals;
}

// A key's limits in one short line ("rpm 60 · tpm 10000 · models a, b"), or nothing without any.
function limitsText(l) {
  if (!l) return "";
  const parts = ["rpm", "tpm", "max_parallel", "daily_tokens", "monthly_tokens"].filter((n) => l[n]).map((n) => `${n.replace("_", "-")} ${l[n]}`);
  if (l.models.length) parts.push(`models ${l.models.join(", ")}`);
  return parts.join(" · ");
}

async function keysPage() {
  const [keys, usage] = await Promise.all([api("GET", "/v0/keys"), api("GET", "/v0/usage")]);
  const totals = usageTotals(usage.data, (r) => r.key_id);
  $("keys").replaceChildren(...keys.data.map((k) => {
    const t = totals.get(k.id) || { requests: 0, prompt_tokens: 0, completion_tokens: 0 };
    return h("tr", { "data-key": k.id },
      h("td", {}, h("code", { text: k.prefix }), h("div", { class: "hint", text: k.id })),
      h("td", {}, k.name, limitsText(k.limits) ? h("div", { class: "hint", "data-limits": "", text: limitsText(k.limits) }) : null),
      h("td", { text: k.scopes.join(", ") }),
      h("td", { "data-requests": "", text: t.requests }), h("td", { text: t.prompt_tokens }), h("td", { text: t.completion_tokens }),
      h("td", { text: when(k.last_used_at) }),
      h("td", {}, stateCell(k.revoked_at ? "revoked" : "live")),
      h("td", {}, k.revoked_at || k.id === state.me.id ? null : h("button", { type: "button", class: "danger", "aria-label": `Revoke ${k.name || k.id}`,
        onclick: async () => { if (await confirmAction(`Revoke key ${k.name || k.id}? Callers using it are refused at once.`)) act("Revoke", () => api("DELETE", `/v0/keys/${encodeURIComponent(k.id)}`)); } }, "Revoke")));
  }));
}

async function usagePage() {
  const usage = await api("GET", "/v0/usage");
  const totals = usageTotals(usage.data, (r) => `${r.key_id}\u0000${r.model}`);
  $("usage").replaceChildren(...[...totals].map(([k, t]) => {
    const [key, model] = k.split("\u0000");
    return h("tr", {}, h("td", { text: key || "(no key)" }), h("td", { text: model }), h("td", { text: t.requests }), h("td", { text: t.errors }),
      h("td", { text: t.prompt_tokens }), h("td", { text: t.completion_tokens }));
  }));
  // Requests and tokens per minute over the last hour, all keys and models shown here together.
  const end = Math.floor(Date.now() / 60000) * 60000, per = usageTotals(usage.data, (r) => Date.parse(r.minute));
  const mins = [];
  for (let t = end - 59 * 60000; t <= end; t += 60000) mins.push(per.get(t) || { requests: 0, prompt_tokens: 0, completion_tokens: 0 });
  $("usage-chart").replaceChildren(
    chart("Requests per minute", [mins.map((m) => m.requests)], "req/min"),
    chart("Tokens per minute", [mins.map((m) => m.prompt_tokens), mins.map((m) => m.completion_tokens)], "tok/min", ["prompt", "completion"]));
}

const PAGES = { overview, nodes: nodesPage, models: modelsPage, events: eventsPage, keys: keysPage, usage: usagePage };

async function refresh() {
  if (!state.me || state.busy) return;
  state.busy = true;
  try {
    await PAGES[state.page]();
  } catch (e) {
    if (e.status === 401) { signOut(`Signed out: ${e.message}`); return; }
    show(e.message);
  } finally { state.busy = false; }
}

function route() {
  if (!state.me) return;
  let page = location.hash.slice(1);
  const allowed = isAdmin() ? Object.keys(PAGES) : ["models", "events", "usage"];
  if (!allowed.includes(page)) page = allowed[0];
  state.page = page;
  for (const p of Object.keys(PAGES)) $(`${p}-page`).hidden = p !== page;
  for (const a of document.querySelectorAll("#nav a")) {
    a.hidden = !allowed.includes(a.dataset.page);
    if (a.dataset.page === page) a.setAttribute("aria-current", "page"); else a.removeAttribute("aria-current");
  }
  for (const el of document.querySelectorAll("form[data-admin]")) el.hidden = !isAdmin();
  refresh();
}

async function signIn(key) {
  try {
    state.me = await api("GET", "/v0/me", undefined, key);
  } catch (e) {
    show(e.status === 401 || e.status === 403 ? `Sign-in refused: ${e.message}` : e.message);
    return;
  }
  sessionStorage.setItem(KEY, key);
  $("api-key").value = "";
  show("");
  $("sign-in-page").hidden = true;
  $("nav").hidden = false;
  $("sign-out").hidden = false;
  $("who").textContent = `${state.me.name || state.me.id || "auth off"} (${state.me.scopes.join(", ")}) · replica ${state.me.replica}`;
  route();
}

function signOut(message = "") {
  sessionStorage.removeItem(KEY);
  state.me = null;
  state.seen.clear();
  for (const p of Object.keys(PAGES)) $(`${p}-page`).hidden = true;
  $("sign-in-page").hidden = false;
  $("nav").hidden = true;
  $("sign-out").hidden = true;
  $("who").textContent = "";
  $("new-key").hidden = true;
  show(message, Boolean(message) && !message.startsWith("Signed out:"));
  $("api-key").focus();
}

$("sign-in").addEventListener("submit", (e) => { e.preventDefault(); signIn($("api-key").value.trim()); });
$("sign-out").addEventListener("click", () => signOut("Signed out."));
$("series-form").addEventListener("submit", (e) => e.preventDefault());
$("series").addEventListener("change", refresh);
$("model-filter").addEventListener("input", refresh);
$("event-filter").addEventListener("input", refresh);
window.addEventListener("hashchange", route);

$("register").addEventListener("submit", (e) => {
  e.preventDefault();
  const body = { repo_id: $("reg-repo").value.trim(), filename: $("reg-file").value.trim(), revision: $("reg-revision").value.trim(), model_id: $("reg-id").value.trim() };
  act("Register", async () => {
    const m = await api("POST", "/v0/models", body);
    $("register").reset();
    return `Registered ${m.id}.`;
  });
});

$("create-key").addEventListener("submit", (e) => {
  e.preventDefault();
  act("Create key", async () => {
    const k = await api("POST", "/v0/keys", { name: $("key-name").value.trim(), scopes: [$("key-scope").value] });
    $("new-secret").textContent = k.secret;
    $("new-key").hidden = false;
    $("create-key").reset();
  });
});
$("copy-secret").addEventListener("click", async () => {
  try { await navigator.clipboard.writeText($("new-secret").textContent); show("Copied.", true); }
  catch { getSelection().selectAllChildren($("new-secret")); show("Select the key and copy it (Ctrl+C).", true); }
});

setInterval(() => { if (!document.hidden) refresh(); }, POLL_MS);
const saved = sessionStorage.getItem(KEY);
if (saved) signIn(saved); else signOut();
