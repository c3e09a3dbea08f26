// comfy-accel's face in the ComfyUI frontend: settings, the "Accel" sidebar panel, toasts and node badges.
//
// - Settings (dialog category "Accel"): default backend, fallback policy, cache and memory budgets. The Python
//   side owns them (accelerators/settings.py validates, and the WebUI shares the same file): every change is
//   POSTed to /accel/settings, a refused value is shown in a toast and put back, and on load the dialog is
//   synced from the server. Their choices, bounds and defaults come from /accel/status ("options", built by
//   accelerators/options.py): this file lists no option value of its own.
// - Sidebar tab "Accel": every accelerator with availability and reason (/accel/status), the artifact cache
//   (/accel/cache: size, model, profile, last used) with delete and clear, and the recent notices.
// - Toasts: accel.progress (compiles, engine builds: one toast while running, one when done) and accel.notice
//   (fallbacks: the one-line reason), both pushed from Python with send_sync.
// - Badges: pack nodes show what actually ran (accel.applied after sampling), a running compile, or the
//   fallback reason that made them run eager.
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";

const EXT = "comfy_accel.ui";
const PACK_NODES = new Set(["AccelCFGCutoff", "AccelAccelerateModel", "AccelBuildTensorRTEngine",
  "AccelLoadTensorRTEngine", "AccelDeepCache", "AccelStepCache", "AccelTinyVAE"]);

// frontend setting id -> field of accelerators/settings.py
const SETTING_FIELDS = {
  "Accel.DefaultBackend": "default_backend",
  "Accel.FallbackPolicy": "fallback_policy",
  "Accel.CacheBudgetGB": "cache_budget_gb",
  "Accel.MemoryBudgetGB": "memory_budget_gb",
  "Accel.Precompile": "precompile",
  "Accel.ChannelsLast": "channels_last",
  "Accel.Preimport": "preimport",
};

const state = {
  syncing: false,          // true while the dialog is being set from the server (no POST back)
  serverSettings: null,
  nodeStatus: new Map(),   // node id -> {text, level, detail}
  progressToasts: new Map(),
  panel: null,             // the sidebar tab's root element while it is open
  notices: [],
};
// Tests and curious users can read what the extension saw.
window.comfyAccel = state;

function toast(severity, summary, detail, life = 6000) {
  const message = { severity, summary, detail, life };
  app.extensionManager?.toast?.add(message);
  return message;
}

function removeToast(message) {
  try { app.extensionManager?.toast?.remove(message); } catch (e) { /* older frontends: it expires */ }
}

async function fetchJson(path, options = {}) {
  const response = await api.fetchApi(path, options);
  let body = null;
  try { body = await response.json(); } catch (e) { body = null; }
  if (!response.ok) {
    const message = body?.error?.message ?? body?.error ?? `${response.status} ${response.statusText}`;
    throw new Error(typeof message === "string" ? message : JSON.stringify(message));
  }
  return body;
}

// ---------------------------------------------------------------- settings

async function pushSetting(id, value, oldValue) {
  const field = SETTING_FIELDS[id];
  if (state.syncing || oldValue === undefined || !field) return;  // registration and server syncs
  try {
    state.serverSettings = await fetchJson("/accel/settings", {
      method: "POST", headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ [field]: value }),
    });
    refreshPanel();
  } catch (error) {
    toast("error", "comfy-accel: setting refused", error.message, 10000);
    const previous = state.serverSettings?.[field] ?? oldValue;
    setLocal(id, previous);
  }
}

async function setLocal(id, value) {
  state.syncing = true;
  try { await app.extensionManager.setting.set(id, value); } finally { state.syncing = false; }
}

async function syncSettingsFromServer() {
  try {
    state.serverSettings = await fetchJson("/accel/settings");
  } catch (error) {
    console.warn("[comfy-accel] could not read /accel/settings:", error);
    return;
  }
  for (const [id, field] of Object.entries(SETTING_FIELDS)) {
    const value = state.serverSettings[field];
    if (value !== undefined && app.extensionManager.setting.get(id) !== value) await setLocal(id, value);
  }
}

// The settings' choices, bounds and defaults: GET /accel/status → options.settings (one request while the
// extension loads; without it, no Accel settings are registered rather than guessed ones).
async function loadSettingOptions() {
  try {
    return (await fetchJson("/accel/status")).options?.settings ?? null;
  } catch (error) {
    console.warn("[comfy-accel] could not read /accel/status; the Accel settings are not shown:", error);
    return null;
  }
}

// each setting's choices or bounds are spec[SETTING_FIELDS[id]]
function setting(spec, id, name, category, tooltip) {
  const field = spec[SETTING_FIELDS[id]];
  const common = { id, name, category, tooltip, defaultValue: field.default, onChange: (v, old) => pushSetting(id, v, old) };
  if (field.choices) return { ...common, type: "combo", options: field.choices };
  if (typeof field.default === "boolean") return { ...common, type: "boolean" };
  return { ...common, type: "number", attrs: { min: field.min, max: field.max, step: 0.5 } };
}

function buildSettings(spec) {
  if (!spec) return [];
  return [
    setting(spec, "Accel.DefaultBackend", "Default backend", ["Accel", "Backend", "Default backend"],
      "Backend that Accelerate Model (and the WebUI panel) use when their backend is 'default'. 'auto' is the " +
      "fastest here: eager on a CPU."),
    setting(spec, "Accel.FallbackPolicy", "When a backend cannot serve a run", ["Accel", "Backend", "Fallback policy"],
      "eager: a missing library or unsupported shape runs unaccelerated with a notice; error: the prompt fails."),
    setting(spec, "Accel.CacheBudgetGB", "Artifact cache budget (GB on disk)", ["Accel", "Cache", "Disk budget"],
      "Compiled graphs and engines beyond this size are evicted, least recently used first."),
    setting(spec, "Accel.MemoryBudgetGB", "Live compiled objects (GB in memory)", ["Accel", "Cache", "Memory budget"],
      "Loaded engines and compiled modules kept in memory between runs."),
    setting(spec, "Accel.Precompile", "Precompile the UNet for a fast restart", ["Accel", "Compile", "Precompile"],
      "torch.compile + CUDA graphs stores the whole compiled UNet, so a restarted server loads it without " +
      "tracing (needs a torch with dynamo precompile). COMFY_ACCEL_PRECOMPILE=0/1 overrides it."),
    setting(spec, "Accel.ChannelsLast", "Convolution weights channels-last on the GPU", ["Accel", "Compile", "Channels-last"],
      "The layout the GPU's convolutions use (same values, faster compiled calls). Off keeps ComfyUI's " +
      "layout. COMFY_ACCEL_CHANNELS_LAST=0/1 overrides it."),
    setting(spec, "Accel.Preimport", "Import the compiler at startup", ["Accel", "Compile", "Preimport"],
      "On a CUDA machine the compiler's modules load in the background while ComfyUI starts, so the " +
      "first warm sample does not wait for them (takes effect at the next start). COMFY_ACCEL_PREIMPORT=0/1 " +
      "overrides it."),
  ];
}

const SETTINGS = buildSettings(await loadSettingOptions());

// ---------------------------------------------------------------- the panel

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (key === "class") node.className = value;
    else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else if (value !== undefined && value !== null) node.setAttribute(key, value);
  }
  for (const child of children.flat()) {
    if (child === null || child === undefined) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

function formatBytes(bytes) {
  if (!Number.isFinite(bytes)) return "?";
  const units = ["B", "KB", "MB", "GB", "TB"];
  let i = 0;
  while (bytes >= 1000 && i < units.length - 1) { bytes /= 1000; i++; }
  return `${bytes.toFixed(i ? 1 : 0)} ${units[i]}`;
}

function formatTime(value) {
  if (value === undefined || value === null || value === "") return "—";
  const date = typeof value === "number" ? new Date(value < 1e12 ? value * 1000 : value) : new Date(value);
  return Number.isNaN(date.getTime()) ? String(value) : date.toLocaleString();
}

function describeProfile(profile) {
  if (!profile || typeof profile !== "object") return profile ? String(profile) : "—";
  return Object.entries(profile).map(([k, v]) => `${k} ${Array.isArray(v) ? [...new Set(v)].join("–") : v}`)
    .join(", ");
}

// One cache entry as the panel shows it, whatever extra fields the store adds.
function entryView(entry) {
  const key = entry.key ?? {};
  const fields = key.fields ?? key;
  const model = entry.model ?? fields.model_config?.family ?? fields.model ?? fields.model_config
    ?? (entry.weights ?? fields.weights ? `weights ${String(entry.weights ?? fields.weights).slice(0, 12)}` : "—");
  return {
    id: entry.id ?? entry.artifact_id ?? entry.key_hash,
    accelerator: entry.accelerator ?? fields.accelerator ?? "?",
    model: typeof model === "object" ? JSON.stringify(model) : String(model),
    profile: describeProfile(entry.profile ?? fields.profile),
    size: entry.size_bytes ?? entry.size ?? entry.bytes,
    lastUsed: entry.last_used ?? entry.last_used_at ?? entry.accessed ?? entry.atime,
  };
}

function entriesOf(listing) {
  if (Array.isArray(listing)) return listing;
  return listing?.entries ?? listing?.artifacts ?? listing?.items ?? [];
}

async function deleteEntry(id) {
  try {
    await fetchJson(`/accel/cache/${encodeURIComponent(id)}`, { method: "DELETE" });
    toast("success", "comfy-accel", `Removed cache entry ${id}`, 4000);
  } catch (error) {
    toast("error", "comfy-accel: could not remove the entry", error.message, 10000);
  }
  refreshPanel();
}

async function clearCache() {
  const question = "Remove every compiled graph and engine of the comfy-accel cache? They are rebuilt on the next run.";
  const dialog = app.extensionManager?.dialog;
  const confirmed = dialog?.confirm
    ? await dialog.confirm({ title: "Clear the accelerator cache", message: question, type: "delete" })
    : window.confirm(question);
  if (!confirmed) return;
  try {
    const answer = await fetchJson("/accel/cache/clear", { method: "POST" });
    const count = answer?.removed ?? answer?.count;
    toast("success", "comfy-accel", count !== undefined ? `Cache cleared (${count} entries)` : "Cache cleared", 4000);
  } catch (error) {
    toast("error", "comfy-accel: could not clear the cache", error.message, 10000);
  }
  refreshPanel();
}

function statusTable(rows) {
  return el("table", { class: "accel-table", "data-testid": "accel-status" },
    el("thead", {}, el("tr", {}, el("th", {}, "Accelerator"), el("th", {}, "Kind"), el("th", {}, "Here"))),
    el("tbody", {}, rows.map((row) => el("tr", { "data-accelerator": row.name, class: row.available ? "ok" : "off" },
      el("td", { title: row.description ?? "" }, el("b", {}, row.title ?? row.name), el("div", { class: "accel-dim" }, row.name)),
      el("td", {}, row.kind + (row.lossless === false ? " · lossy" : "")),
      el("td", {}, el("span", { class: row.available ? "accel-ok" : "accel-off" }, row.available ? "✓ " : "✗ "),
        el("span", { class: "accel-reason" }, row.reason ?? ""))))));
}

function cacheTable(listing) {
  const entries = entriesOf(listing).map(entryView);
  if (!entries.length) return el("p", { class: "accel-dim", "data-testid": "accel-cache-empty" }, "No cached artifacts yet.");
  return el("table", { class: "accel-table", "data-testid": "accel-cache" },
    el("thead", {}, el("tr", {}, el("th", {}, "Artifact"), el("th", {}, "Model / profile"), el("th", {}, "Size"),
      el("th", {}, "Last used"), el("th", {}, ""))),
    el("tbody", {}, entries.map((e) => el("tr", { "data-entry-id": e.id },
      el("td", {}, el("b", {}, e.accelerator), el("div", { class: "accel-dim accel-id" }, e.id)),
      el("td", {}, e.model, el("div", { class: "accel-dim" }, e.profile)),
      el("td", {}, formatBytes(e.size)),
      el("td", {}, formatTime(e.lastUsed)),
      el("td", {}, el("button", { class: "accel-button accel-delete", title: `Delete ${e.id}`,
        onclick: () => deleteEntry(e.id) }, "Delete"))))));
}

async function renderPanel(root) {
  let status, listing, stats, notices;
  const errors = [];
  const grab = async (path) => { try { return await fetchJson(path); } catch (e) { errors.push(`${path}: ${e.message}`); return null; } };
  [status, listing, stats, notices] = await Promise.all([grab("/accel/status"), grab("/accel/cache"),
    grab("/accel/cache/stats"), grab("/accel/notices")]);
  if (state.panel !== root) return;  // closed meanwhile
  const total = stats?.total_bytes ?? stats?.size_bytes ?? listing?.total_bytes;
  const budget = stats?.budget_bytes ?? listing?.budget_bytes;
  root.replaceChildren(
    el("div", { class: "accel-head" }, el("h3", {}, "⚡ comfy-accel"),
      el("button", { class: "accel-button", onclick: () => refreshPanel(), title: "Reload" }, "Refresh")),
    errors.length ? el("div", { class: "accel-error" }, errors.join("\n")) : null,
    el("h4", {}, "Accelerators"),
    status ? statusTable(status.accelerators ?? []) : null,
    el("div", { class: "accel-head" }, el("h4", {}, "Cache"),
      el("span", { class: "accel-dim", "data-testid": "accel-cache-total" },
        total !== undefined ? `${formatBytes(total)}${budget ? ` of ${formatBytes(budget)}` : ""}` : ""),
      el("button", { class: "accel-button accel-clear", onclick: clearCache }, "Clear")),
    listing ? cacheTable(listing) : el("p", { class: "accel-dim" }, "The artifact cache could not be read (see above)."),
    el("h4", {}, "Recent notices"),
    el("ul", { class: "accel-notices", "data-testid": "accel-notices" },
      (notices?.notices ?? []).slice(-15).reverse().map((n) =>
        el("li", { class: `accel-${n.level ?? "info"}` }, el("b", {}, n.accelerator), ": ", n.message))),
  );
}

function refreshPanel() {
  if (state.panel) renderPanel(state.panel).catch((e) => console.error("[comfy-accel] panel:", e));
}

const STYLE = `
.accel-panel { padding: 8px 12px; font-size: 13px; overflow: auto; height: 100%; box-sizing: border-box; }
.accel-panel h3 { margin: 4px 0; } .accel-panel h4 { margin: 14px 0 4px; }
.accel-head { display: flex; align-items: center; gap: 8px; } .accel-head > :first-child { flex: 1; }
.accel-table { width: 100%; border-collapse: collapse; } .accel-table td, .accel-table th { text-align: left;
  vertical-align: top; padding: 3px 4px; border-bottom: 1px solid var(--border-color, #444); }
.accel-dim { opacity: .65; font-size: 11px; } .accel-id { font-family: monospace; word-break: break-all; }
.accel-ok { color: #4caf50; } .accel-off { color: #e57373; } .accel-reason { opacity: .85; }
.accel-button { cursor: pointer; padding: 2px 8px; border-radius: 4px; border: 1px solid var(--border-color, #666);
  background: var(--comfy-input-bg, #222); color: var(--input-text, #ddd); }
.accel-error { color: #e57373; white-space: pre-wrap; }
.accel-notices { padding-left: 16px; } .accel-warning b { color: #ffb74d; } .accel-error b { color: #e57373; }
`;

// ---------------------------------------------------------------- badges and events

function graphNode(id) {
  if (id === undefined || id === null) return null;
  return app.graph?.getNodeById?.(Number.isNaN(+id) ? id : +id) ?? null;
}

function setNodeStatus(id, status) {
  if (id === undefined || id === null) return;
  state.nodeStatus.set(String(id), status);
  app.graph?.setDirtyCanvas?.(true, true);
}

function badgeFor(node) {
  return () => {
    const status = state.nodeStatus.get(String(node.id));
    if (!status || !window.LGraphBadge) return new (window.LGraphBadge ?? Object)({ text: "" });
    const colors = { ok: "#1b5e20", busy: "#0d47a1", warn: "#8a5300", error: "#8b1a1a" };
    return new window.LGraphBadge({ text: status.text, fgColor: "white", bgColor: colors[status.level] ?? "#333" });
  };
}

function shortReason(message, max = 48) {
  return message.length > max ? `${message.slice(0, max - 1)}…` : message;
}

function onNotice(event) {
  const notice = event.detail ?? {};
  state.notices.push(notice);
  const severity = notice.level === "error" ? "error" : notice.level === "warning" ? "warn" : "info";
  toast(severity, `comfy-accel · ${notice.accelerator}`, notice.message, severity === "info" ? 4000 : 10000);
  if (notice.node !== undefined && notice.node !== null && notice.level !== "info") {
    setNodeStatus(notice.node, { text: `↩ eager: ${shortReason(notice.message)}`, level: "warn", detail: notice.message });
  } else if (notice.node !== undefined && notice.node !== null && notice.summary) {
    // what a run did (Step Cache: "skipped N of M steps (...)"), sent after the run's accel.applied
    setNodeStatus(notice.node, { text: `✓ ${shortReason(notice.message)}`, level: "ok", detail: notice.message });
  }
  refreshPanel();
}

function onProgress(event) {
  const p = event.detail ?? {};
  const key = `${p.task}|${p.node ?? ""}|${p.accelerator ?? ""}`;
  const what = [p.accelerator, p.task].filter(Boolean).join(" ");
  const open = state.progressToasts.get(key);
  if (p.done) {
    if (open) removeToast(open);
    state.progressToasts.delete(key);
    toast("success", `comfy-accel · ${what} done`, p.message || "ready", 5000);
    if (p.node !== undefined && p.node !== null) setNodeStatus(p.node, { text: `✓ ${p.accelerator || p.task}`, level: "ok" });
    refreshPanel();
    return;
  }
  const share = p.total ? ` (${Math.round((100 * p.value) / p.total)}%)` : "";
  if (!open) {
    // sticky while it runs: compiles and engine builds take from seconds to minutes
    state.progressToasts.set(key, toast("info", `comfy-accel · ${what}…`, (p.message || "working") + share, 0));
  }
  if (p.node !== undefined && p.node !== null) setNodeStatus(p.node, { text: `⏳ ${what}${share}`, level: "busy" });
}

function onApplied(event) {
  const effect = event.detail?.in_effect ?? {};
  for (const [key, info] of Object.entries(effect)) {
    if (!info?.node) continue;
    const fallback = info.fallback;
    setNodeStatus(info.node, fallback
      ? { text: `↩ eager: ${shortReason(fallback)}`, level: "warn", detail: fallback }
      : { text: `✓ ${info.used ?? key}`, level: "ok" });
  }
}

function onExecutionError(event) {
  const detail = event.detail ?? {};
  const node = graphNode(detail.node_id);
  if (node && PACK_NODES.has(node.type)) {
    setNodeStatus(detail.node_id, { text: `✗ ${shortReason(detail.exception_message ?? "error")}`, level: "error" });
  }
}

app.registerExtension({
  name: EXT,
  settings: SETTINGS,

  async setup() {
    document.head.append(el("style", { id: "comfy-accel-style" }, STYLE));
    api.addEventListener("accel.notice", onNotice);
    api.addEventListener("accel.progress", onProgress);
    api.addEventListener("accel.applied", onApplied);
    api.addEventListener("execution_error", onExecutionError);
    api.addEventListener("execution_success", () => refreshPanel());
    app.extensionManager.registerSidebarTab({
      id: "comfy-accel", icon: "pi pi-bolt", title: "Accel", tooltip: "comfy-accel: accelerators and cache",
      type: "custom",
      render(element) {
        const root = el("div", { class: "accel-panel", "data-testid": "accel-panel" }, "Loading…");
        element.replaceChildren(root);
        state.panel = root;
        refreshPanel();
      },
      destroy() { state.panel = null; },
    });
    await syncSettingsFromServer();
  },

  nodeCreated(node) {
    if (!PACK_NODES.has(node.comfyClass ?? node.type)) return;
    node.badges = node.badges ?? [];
    node.badges.push(badgeFor(node));
  },
});
