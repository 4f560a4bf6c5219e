// wanserve playground: the form is built from the request's JSON schema; requests go through the same queue
// API as every client (submit, SSE status stream with logs, result, cancel), with the key typed in the header.
"use strict";

const $ = (id) => document.getElementById(id);
const STEP_LINE = /^step (\d+)\/(\d+) · (\w+)-noise expert · ([\d.]+)s\/step · ETA (.+)$/;
const HISTORY_KEY = "wanserve.history";
const KEY_KEY = "wanserve.api-key"; // this tab only (sessionStorage), or this browser if "remember" is ticked
const OLD_KEY_KEY = "wanserve.key"; // where earlier versions kept every key typed, unasked: removed
// A server restart or a proxy in front of it: the request goes on, so the page waits this long for the server.
const OUTAGE_GRACE_MS = 5 * 60 * 1000;
let schema = null;
let app = "fal-ai/wan-22"; // the endpoint requests are submitted to
let queueApp = "fal-ai/wan-22"; // the `owner/app` its status, result and cancel URLs live under
// The server sends a keep-alive every 15 s on the status stream: silence this long is a dead connection (a laptop
// that slept, a proxy that dropped it), which polling then replaces.
const QUIET_MS = 45 * 1000;
let current = null; // {id, abort, key}: the request the page follows (id null while it is being submitted)
let uploads = 0; // LoRA files being uploaded: a request sent now would go without them

// Generate is off while a request is submitted or followed, and while a LoRA file uploads.
function settleButtons() {
  $("submit").disabled = current !== null || uploads > 0;
  $("cancel").disabled = !current?.id;
}

function resolveRef(prop) {
  if (prop.$ref) return schema.$defs[prop.$ref.split("/").pop()];
  const ref = (prop.allOf || []).find((p) => p.$ref);
  return ref ? schema.$defs[ref.$ref.split("/").pop()] : prop;
}

function describe(prop, def) {
  const parts = [prop.description || def.description || ""];
  const range = [def.minimum ?? def.exclusiveMinimum, def.maximum ?? def.exclusiveMaximum];
  if (range[0] !== undefined || range[1] !== undefined) parts.push(`Range ${range[0] ?? "…"}–${range[1] ?? "…"}.`);
  if (prop.default !== undefined && prop.default !== null && typeof prop.default !== "object") {
    const text = String(prop.default);
    parts.push(`Default: ${text.length > 60 ? text.slice(0, 57) + "…" : text}.`);
  }
  return parts.filter(Boolean).join(" ");
}

function control(name, prop) {
  const nullable = (prop.anyOf || []).find((p) => p.type && p.type !== "null");
  const def = nullable || resolveRef(prop);
  let input;
  if (def.enum) {
    input = document.createElement("select");
    for (const value of def.enum) input.add(new Option(value, value, false, value === prop.default));
  } else if (def.type === "boolean") {
    input = document.createElement("input");
    input.type = "checkbox";
    input.checked = Boolean(prop.default);
  } else if (def.type === "integer" || def.type === "number") {
    input = document.createElement("input");
    input.type = "number";
    input.step = def.type === "integer" ? "1" : "any";
    if (def.minimum !== undefined) input.min = def.minimum;
    if (def.maximum !== undefined) input.max = def.maximum;
    if (prop.default !== undefined && prop.default !== null) input.value = prop.default;
    if (nullable) input.placeholder = "random";
  } else {
    input = document.createElement("textarea");
    input.value = prop.default ?? "";
    input.rows = name === "prompt" ? 4 : 3;
  }
  input.id = `f-${name}`;
  input.name = name;
  input.dataset.kind = def.type || "string";
  return { input, def };
}

function buildForm() {
  const holder = $("fields");
  const required = new Set(schema.required || []);
  for (const [name, prop] of Object.entries(schema.properties)) {
    if (name === "loras") continue;
    const { input, def } = control(name, prop);
    const wrap = document.createElement("div");
    wrap.className = "field" + (def.type === "boolean" ? " check" : "");
    const label = document.createElement("label");
    label.htmlFor = input.id;
    const title = name.replace(/_/g, " ").replace(/^./, (c) => c.toUpperCase());
    label.textContent = title + (required.has(name) ? " *" : "");
    const help = document.createElement("p");
    help.className = "help";
    help.id = `help-${name}`;
    help.textContent = describe(prop, def);
    const error = document.createElement("p");
    error.className = "error";
    error.id = `err-${name}`;
    error.setAttribute("role", "alert");
    input.setAttribute("aria-describedby", `help-${name} err-${name}`);
    if (required.has(name)) input.required = true;
    if (def.type === "boolean") wrap.append(input, label, help, error);
    else wrap.append(label, input, help, error);
    holder.append(wrap);
  }
}

let loraCount = 0;
function addLora(values = {}) {
  const loraDef = schema.$defs.LoRAWeight;
  const i = loraCount++;
  const row = document.createElement("div");
  row.className = "lora-row";
  row.setAttribute("role", "group");
  row.dataset.row = String(i);
  const fields = [
    ["path", "Path or URL", "text", values.path ?? ""],
    ["weight_name", "Weight file", "text", values.weight_name ?? ""],
    ["scale", "Scale", "number", values.scale ?? loraDef.properties.scale.default],
    ["transformer", "Expert", "select", values.transformer ?? "both"],
  ];
  for (const [name, text, type, value] of fields) {
    const cell = document.createElement("div");
    const label = document.createElement("label");
    label.htmlFor = `lora-${i}-${name}`;
    label.textContent = text;
    let input;
    if (type === "select") {
      input = document.createElement("select");
      for (const v of loraDef.properties.transformer.enum) input.add(new Option(v, v, false, v === value));
    } else {
      input = document.createElement("input");
      input.type = type;
      if (type === "number") input.step = "any";
      if (name === "weight_name") input.placeholder = "repo with several files";
      input.value = value;
    }
    input.id = `lora-${i}-${name}`;
    input.name = name;
    const error = document.createElement("p");
    error.className = "error";
    error.id = `err-lora-${i}-${name}`;
    error.setAttribute("role", "alert");
    input.setAttribute("aria-describedby", error.id);
    cell.append(label, input);
    if (name === "path") {
      // A file on this computer goes to the server's storage first, as the fal clients upload a File.
      const upload = document.createElement("input");
      upload.type = "file";
      upload.accept = ".safetensors";
      upload.id = `lora-${i}-file`;
      upload.className = "lora-file";
      upload.setAttribute("aria-label", "Upload a .safetensors file");
      upload.onchange = () => uploadLora(upload, input, error);
      cell.append(upload);
    }
    cell.append(error);
    row.append(cell);
  }
  const remove = document.createElement("button");
  remove.type = "button";
  remove.textContent = "Remove";
  remove.className = "remove-lora";
  remove.onclick = () => {
    row.remove();
    numberLoraRows();
    $("add-lora").focus(); // not lost to the page's body
  };
  row.append(remove);
  $("loras").append(row);
  numberLoraRows();
  row.querySelector("input").focus();
}

// Each row (a group of its fields) and its Remove button are named by the row's place now, not by how many rows
// were ever added.
function numberLoraRows() {
  $("loras")
    .querySelectorAll(".lora-row")
    .forEach((row, index) => {
      row.setAttribute("aria-label", `LoRA ${index + 1}`);
      row.querySelector(".remove-lora").setAttribute("aria-label", `Remove LoRA ${index + 1}`);
    });
}

// Uploads the chosen file (the storage API's signed PUT, as the fal clients do) and puts its URL in the path field.
async function uploadLora(upload, path, error) {
  const file = upload.files[0];
  if (!file) return;
  error.textContent = "";
  uploads++;
  settleButtons();
  setStatus(`Uploading ${file.name}…`);
  try {
    const asked = { file_name: file.name, content_type: "application/octet-stream" };
    const { response, data } = await api("POST", "/rest/storage/upload/initiate", asked);
    if (!response.ok) throw new Error(`HTTP ${response.status}: ${data.detail ?? ""}`);
    const headers = { "content-type": asked.content_type };
    // The upload URL starts with the server's public URL; this page may be open under another name for it (a LAN
    // name), where the PUT would be cross-origin and refused: the same route of this page's origin takes it.
    const target = new URL(data.upload_url, location.href);
    const put = await fetch(target.pathname + target.search, { method: "PUT", body: file, headers });
    if (!put.ok) throw new Error(`HTTP ${put.status}`);
    path.value = data.file_url;
    setStatus(`Uploaded ${file.name}.`);
  } catch (e) {
    error.textContent = `The upload failed: ${e.message ?? e}`;
    setStatus("The upload failed.");
  } finally {
    upload.value = "";
    uploads--;
    settleButtons();
  }
}

// A number field whose text the browser cannot read as a number has value "": left out, the server's default
// would apply without a word. Such a field is an error of the page's own instead.
class UnreadableNumber extends Error {
  constructor(input, reason = "Not a number.") {
    super(`${input.id}: ${reason}`);
    this.input = input;
    this.reason = reason;
  }
}

function numberText(input) {
  if (input.validity?.badInput) throw new UnreadableNumber(input);
  return input.value.trim();
}

// An integer as typed: seeds go up to 2^63 - 1, past what a JS number holds exactly (2^53), and a rounded seed names
// another video. Sent as its digits where the browser can (JSON.rawJSON), else refused.
function exactInteger(input, text) {
  const value = Number(text);
  if (Number.isSafeInteger(value) || !/^\d+$/.test(text)) return value;
  if (!JSON.rawJSON) throw new UnreadableNumber(input, "This browser cannot send a number this large exactly.");
  return JSON.rawJSON(BigInt(text).toString()); // BigInt first: JSON has no leading zeros, which a field accepts
}

// The request body, and the LoRA rows it carries (rows without a path are left out: `loras[i]` in an error is the
// i-th of these, not of the page's rows).
function readForm() {
  const body = {};
  for (const input of $("fields").querySelectorAll("input, select, textarea")) {
    const kind = input.dataset.kind;
    const text = input.type === "number" ? numberText(input) : input.value.trim();
    if (input.type === "checkbox") body[input.name] = input.checked;
    else if (input.tagName === "TEXTAREA") {
      // Sent as typed: an emptied negative prompt means none, not the default. An empty required one is left
      // out, and the server's error names it.
      if (text !== "" || !input.required) body[input.name] = input.value;
    } else if (text === "") continue; // not given: the server's default (a random seed...)
    else if (kind === "integer") body[input.name] = exactInteger(input, text);
    else if (kind === "number") body[input.name] = Number(text);
    else body[input.name] = input.value;
  }
  const loraRows = [...$("loras").querySelectorAll(".lora-row")].filter((row) =>
    row.querySelector("[name=path]").value.trim(),
  );
  const loras = loraRows.map((row) => {
    const lora = { path: row.querySelector("[name=path]").value.trim() };
    const weightName = row.querySelector("[name=weight_name]").value.trim();
    if (weightName) lora.weight_name = weightName;
    const scale = numberText(row.querySelector("[name=scale]"));
    if (scale !== "") lora.scale = Number(scale); // an emptied scale: the server's default (1), never 0
    lora.transformer = row.querySelector("[name=transformer]").value;
    return lora;
  });
  if (loras.length) body.loras = loras;
  return { body, loraRows };
}

function headers(extra = {}) {
  // A followed request is read with the key that submitted it: another key typed meanwhile owns other requests.
  const key = (current?.key ?? $("api-key").value).trim();
  return key ? { ...extra, Authorization: `Key ${key}` } : extra;
}

function clearErrors() {
  $("form-error").textContent = "";
  for (const el of document.querySelectorAll(".error")) el.textContent = "";
  for (const el of document.querySelectorAll("[aria-invalid]")) el.removeAttribute("aria-invalid");
}

function showErrors(detail, loraRows = []) {
  if (!Array.isArray(detail)) {
    $("form-error").textContent = typeof detail === "string" ? detail : JSON.stringify(detail);
    return;
  }
  let first = null;
  for (const e of detail) {
    const loc = (e.loc || []).filter((p) => p !== "body");
    let errorId = `err-${loc[0]}`;
    let inputId = `f-${loc[0]}`;
    if (loc[0] === "loras" && loc.length >= 3) {
      const row = loraRows[loc[1]];
      if (row) {
        errorId = `err-lora-${row.dataset.row}-${loc[2]}`;
        inputId = `lora-${row.dataset.row}-${loc[2]}`;
      }
    }
    const target = $(errorId);
    if (target) {
      target.textContent = e.msg;
      $(inputId)?.setAttribute("aria-invalid", "true");
      first = first || $(inputId);
    } else {
      $("form-error").textContent += `${loc.join(".")}: ${e.msg} `;
    }
  }
  first?.focus();
}

function setStatus(text) {
  $("status").textContent = text;
}

function showProgress(step, total) {
  const bar = $("progress");
  bar.hidden = false;
  bar.max = total;
  bar.value = step;
}

// An integer past 2^53 read as its digits (a seed up to 2^63 - 1, the seed's bound in the schema): as a JS number it
// would come back rounded, and a rounded seed names another video.
function exactIntegers(key, value, context) {
  return Number.isInteger(value) && !Number.isSafeInteger(value) && context?.source ? context.source : value;
}

// Whether a failed call is worth making again: the server unreachable (fetch rejects), restarting or behind a
// proxy (502-504, no request id: not the request's own outcome), or this key's read rate limit (429).
function passing(error, response) {
  if (error) return !(error instanceof DOMException && error.name === "AbortError");
  return [429, 502, 503, 504].includes(response.status) && !response.headers.get("x-fal-request-id");
}

// `call` (an api() call) made again through a server outage of up to OUTAGE_GRACE_MS, the status line saying so.
async function throughOutages(call) {
  let since = null;
  for (;;) {
    let result = null;
    let error = null;
    try {
      result = await call();
    } catch (e) {
      error = e;
    }
    if (!passing(error, result?.response)) {
      if (error) throw error;
      return result;
    }
    since ??= Date.now();
    if (Date.now() - since > OUTAGE_GRACE_MS) throw error ?? new Error(`HTTP ${result.response.status}`);
    setStatus(`Server unreachable (${error ? "no answer" : `HTTP ${result.response.status}`}); trying again…`);
    await new Promise((r) => setTimeout(r, 2000));
  }
}

async function api(method, path, body) {
  const response = await fetch(path, {
    method,
    headers: headers(body ? { "content-type": "application/json" } : {}),
    body: body ? JSON.stringify(body) : undefined,
  });
  const text = await response.text();
  let data;
  try {
    data = JSON.parse(text, exactIntegers);
  } catch {
    data = { detail: response.statusText };
  }
  return { response, data };
}

// The status stream (SSE) read with fetch, so that it can carry the Authorization header. It gives up (and the
// caller polls) when nothing, not even a keep-alive, came for QUIET_MS.
async function follow(id, signal) {
  const quiet = new AbortController();
  const stop = () => quiet.abort();
  signal.addEventListener("abort", stop);
  let timer = setTimeout(stop, QUIET_MS);
  try {
    const url = `/${queueApp}/requests/${id}/status/stream?logs=1`;
    const response = await fetch(url, { headers: headers(), signal: quiet.signal });
    if (!response.ok) throw new Error(`status stream: HTTP ${response.status}`);
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) throw new Error("the status stream ended early"); // e.g. a proxy cut it: poll instead
      clearTimeout(timer);
      timer = setTimeout(stop, QUIET_MS);
      buffer += decoder.decode(value, { stream: true });
      let cut;
      while ((cut = buffer.indexOf("\n\n")) >= 0) {
        const chunk = buffer.slice(0, cut);
        buffer = buffer.slice(cut + 2);
        const data = chunk.split("\n").filter((l) => l.startsWith("data:")).map((l) => l.slice(5).trim()).join("\n");
        if (!data) continue;
        const status = JSON.parse(data);
        onStatus(status);
        if (status.status === "COMPLETED") return;
      }
    }
  } finally {
    clearTimeout(timer);
    signal.removeEventListener("abort", stop);
  }
}

function onStatus(status) {
  if (status.status === "IN_QUEUE") setStatus(`In queue · position ${status.queue_position}`);
  for (const entry of status.logs || []) {
    const m = STEP_LINE.exec(entry.message);
    if (m) {
      showProgress(Number(m[1]), Number(m[2]));
      setStatus(`Step ${m[1]}/${m[2]} · ${m[3]}-noise expert · ETA ${m[5]}`);
    } else if (status.status !== "IN_QUEUE") {
      setStatus(entry.message);
    }
  }
}

async function submit(event) {
  event.preventDefault();
  clearErrors();
  let body, loraRows;
  try {
    ({ body, loraRows } = readForm());
  } catch (error) {
    if (error instanceof UnreadableNumber) {
      markUnreadable(error.input, error.reason);
      return;
    }
    $("form-error").textContent = `The form could not be read: ${error}`;
    return;
  }
  const key = $("api-key").value;
  if (/[^\x20-\x7e]/.test(key.trim())) {
    // fetch() would throw on it before sending anything, with a message about ISO-8859-1
    $("form-error").textContent = "The API key holds characters no HTTP header can carry: check what was pasted.";
    $("api-key").focus();
    return;
  }
  keepKey();
  // Fields only the /lora endpoint reads (the base one ignores them): reverse_video, as well as the LoRAs. Its
  // unchecked box is the default there and no field at all for the base endpoint (which would log it as unknown).
  const endpoint = body.loras || body.reverse_video ? `${app}/lora` : app;
  if (endpoint === app) delete body.reverse_video;
  clearResult();
  current = { id: null, abort: null, key };
  settleButtons();
  renderHistory(); // its Check buttons are off meanwhile
  setStatus("Submitting…");
  let response, data;
  try {
    ({ response, data } = await api("POST", `/${endpoint}`, body));
  } catch (error) {
    $("form-error").textContent = String(error);
    setStatus("The server could not be reached.");
    return;
  } finally {
    current = null;
    settleButtons();
    renderHistory();
  }
  if (!response.ok) {
    if (response.status !== 429 && passing(null, response)) {
      // A proxy's answer (or a server restarting): the server behind it may have queued the request before the
      // proxy gave up, and sending it again could make two videos. (A 429 is a refusal.)
      setStatus(`No answer from the server (HTTP ${response.status}): the request may or may not be queued.`);
      $("form-error").textContent = typeof data.detail === "string" ? data.detail : "";
      return;
    }
    showErrors(data.detail ?? data, loraRows);
    setStatus(`Request refused (HTTP ${response.status}).`);
    return;
  }
  const id = data.request_id;
  remember({ id, prompt: body.prompt, at: new Date().toISOString(), status: "IN_QUEUE" });
  await track(id, key, loraRows);
}

// Follows request `id` (read with `key`) to its end and shows its outcome.
async function track(id, key, loraRows = []) {
  if (current) return; // one request followed at a time
  clearResult();
  const abort = new AbortController();
  current = { id, abort, key };
  settleButtons();
  renderHistory(); // its Check buttons are off while a request is followed
  try {
    try {
      await follow(id, abort.signal);
    } catch (error) {
      if (abort.signal.aborted) return;
      await pollUntilDone(id);
    }
    await showResult(id, loraRows);
  } catch (error) {
    $("form-error").textContent = String(error);
    setStatus(`Lost track of request ${id}: ${error}`);
    const unreachable = error instanceof TypeError || /^HTTP 50[234]$/.test(error.message);
    // Not this key's (another key typed, or none after the tab was reopened), or gone: Check can try again.
    const unreadable = /HTTP 40[134]\b/.test(error.message);
    const status = unreachable
      ? "unknown (the server could not be reached)"
      : unreadable
        ? "unknown (not readable with this key, or gone)"
        : "error";
    update(id, { status });
  } finally {
    current = null;
    settleButtons();
    renderHistory();
  }
}

// The previous request's video, seed and progress, gone before the next one starts: a failure shown above them
// would read as theirs.
function clearResult() {
  const video = $("video");
  video.pause();
  video.removeAttribute("src");
  video.load();
  video.hidden = true;
  $("result-meta").hidden = true;
  $("prompt-used").hidden = true;
  const bar = $("progress");
  bar.hidden = true;
  bar.max = 1;
  bar.value = 0;
}

function markUnreadable(input, reason) {
  const target = $(input.id.replace(/^f-/, "err-").replace(/^lora-/, "err-lora-"));
  if (target) target.textContent = reason;
  input.setAttribute("aria-invalid", "true");
  input.focus();
  setStatus("Fix the marked field.");
}

function keepKey() {
  const key = $("api-key").value;
  sessionStorage.setItem(KEY_KEY, key);
  if ($("remember-key").checked) localStorage.setItem(KEY_KEY, key);
  else localStorage.removeItem(KEY_KEY);
}

async function pollUntilDone(id) {
  for (;;) {
    const { response, data } = await throughOutages(() => api("GET", `/${queueApp}/requests/${id}/status?logs=1`));
    if (!response.ok) throw new Error(`status: HTTP ${response.status} ${data.detail ?? ""}`);
    onStatus(data);
    if (data.status === "COMPLETED") return;
    await new Promise((r) => setTimeout(r, 1000));
  }
}

async function showResult(id, loraRows) {
  const { response, data } = await throughOutages(() => api("GET", `/${queueApp}/requests/${id}`));
  if (!response.ok) {
    const cancelled = response.status === 499;
    // A failed request's result is its error body; its type is in the header.
    const type = data.error_type || response.headers.get("x-fal-error-type") || `HTTP ${response.status}`;
    setStatus(cancelled ? "Cancelled." : `Failed: ${type}`);
    if (!cancelled) showErrors(data.detail ?? data, loraRows);
    update(id, { status: cancelled ? "cancelled" : "failed" });
    return;
  }
  setStatus(`Done · seed ${data.seed}`);
  showVideo(data.video.url, data.seed, data.prompt, history().find((h) => h.id === id)?.prompt);
  // No video URL is kept: signed, it opens without a key for days (a shared computer); Show reads it again.
  update(id, { status: "done", seed: data.seed });
}

// The link's `download` attribute does nothing once the link leads to another origin (the server's public URL
// under another host name, or its redirect to S3): the file route is asked to send the video as an attachment.
function attachmentUrl(url) {
  try {
    const link = new URL(url, location.href);
    if (!link.pathname.includes("/files/")) return url;
    link.searchParams.set("download", "1");
    return link.href;
  } catch {
    return url;
  }
}

function showVideo(url, seed, promptUsed, promptAsked) {
  // With prompt expansion on, the server's `prompt` is the one the video was made from.
  const expanded = promptUsed !== undefined && promptAsked !== undefined && promptUsed !== promptAsked;
  $("prompt-used").hidden = !expanded;
  $("prompt-used").textContent = expanded ? `Prompt used: ${promptUsed}` : "";
  const video = $("video");
  video.hidden = false;
  video.onerror = () => setStatus("The video could not be loaded (expired, or its URL is not reachable from here).");
  video.src = url;
  $("download").href = attachmentUrl(url);
  $("seed").textContent = String(seed);
  $("result-meta").hidden = false;
}

async function cancel() {
  if (!current?.id) return;
  const { id } = current;
  $("cancel").disabled = true;
  setStatus("Cancelling…");
  let refusal;
  try {
    const { response, data } = await api("PUT", `/${queueApp}/requests/${id}/cancel`);
    // Cancelled, or it ended first (already completed): either way the status stream reports the end.
    if (response.ok || data.status === "ALREADY_COMPLETED") return;
    refusal = `HTTP ${response.status}${data.detail ? `: ${data.detail}` : data.status ? `: ${data.status}` : ""}`;
  } catch (error) {
    refusal = String(error);
  }
  if (current?.id !== id) return; // it ended meanwhile
  const message = `Cancel failed (${refusal}); the request is still running.`;
  setStatus(message);
  $("form-error").textContent = message; // the status line moves on with the next step
  $("cancel").disabled = false;
}

function history() {
  try {
    return JSON.parse(localStorage.getItem(HISTORY_KEY) || "[]");
  } catch {
    return [];
  }
}

function remember(entry) {
  localStorage.setItem(HISTORY_KEY, JSON.stringify([entry, ...history()].slice(0, 50)));
  renderHistory();
}

function update(id, changes) {
  localStorage.setItem(HISTORY_KEY, JSON.stringify(history().map((h) => (h.id === id ? { ...h, ...changes } : h))));
  renderHistory();
}

function renderHistory() {
  const list = $("history");
  list.replaceChildren();
  for (const h of history()) {
    const item = document.createElement("li");
    const prompt = h.prompt?.slice(0, 60) ?? "";
    item.textContent = `${prompt} · ${h.status}${h.seed !== undefined ? ` · seed ${h.seed}` : ""} `;
    const done = h.status === "done";
    // Not finished when last seen (the page was closed or reloaded meanwhile, or the server was unreachable): the
    // request may have gone on, and Check follows it again.
    if (done || h.status === "IN_QUEUE" || String(h.status).startsWith("unknown")) {
      const button = document.createElement("button");
      button.type = "button";
      button.textContent = done ? "Show" : "Check";
      button.setAttribute("aria-label", `${button.textContent}: ${prompt}`);
      button.disabled = current !== null;
      // Show reads the result again (its URL signed afresh), as Check does once the request has ended.
      button.onclick = () => track(h.id, $("api-key").value);
      item.append(button);
    }
    list.append(item);
  }
  $("clear-history").hidden = !list.children.length;
}

async function main() {
  localStorage.removeItem(OLD_KEY_KEY);
  // Earlier versions kept each video's signed URL in the history (it opens without a key for days): dropped.
  localStorage.setItem(HISTORY_KEY, JSON.stringify(history().map(({ video, ...kept }) => kept)));
  const remembered = localStorage.getItem(KEY_KEY);
  $("api-key").value = sessionStorage.getItem(KEY_KEY) ?? remembered ?? "";
  $("remember-key").checked = remembered !== null;
  $("remember-key").onchange = keepKey;
  const response = await fetch("/playground/schema.json");
  const data = JSON.parse(await response.text(), exactIntegers);
  schema = data.schema;
  app = data.app;
  queueApp = data.queue_app;
  buildForm();
  $("add-lora").onclick = () => addLora();
  $("request-form").addEventListener("submit", submit);
  $("cancel").onclick = cancel;
  $("reuse-seed").onclick = () => {
    $("f-seed").value = $("seed").textContent;
    $("f-seed").focus();
  };
  $("clear-history").onclick = () => {
    localStorage.removeItem(HISTORY_KEY);
    renderHistory();
  };
  renderHistory();
  // A request this browser submitted and did not see end (the page was reloaded or closed): follow it again.
  const unfinished = history().find((h) => h.status === "IN_QUEUE");
  if (unfinished) {
    setStatus(`Following request ${unfinished.id} again…`);
    track(unfinished.id, $("api-key").value);
  }
}

main();
