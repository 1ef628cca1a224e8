// The tokenrelay page: start a generation and watch it stream, or (with ?view=ID&token=T)
// follow someone else's, read-only. Model output is only ever inserted as text nodes.
//
// The stream is read with EventSource, so when the connection drops the browser
// reconnects by itself and sends Last-Event-ID; the server replays what was missed.
// Only if the browser gives up (an HTTP error) do we reopen it ourselves with ?after=.

const $ = (id) => document.getElementById(id);
const KEY_STORE = "tokenrelay.apiKey";
const RUN_STORE = "tokenrelay.current";

let run = null; // the generation on screen

// ---- connection indicator -------------------------------------------------

const CONN_TEXT = {
  idle: "not connected",
  connecting: "connecting…",
  live: "live",
  reconnecting: "reconnecting…",
  resumed: "resumed",
  ended: "stream ended",
};

function setConn(state) {
  const el = $("conn");
  el.dataset.state = state;
  el.dataset.drops = String(run ? run.drops : 0);
  el.dataset.reopens = String(run ? run.reopens : 0); // times we, not the browser, reopened
  let text = CONN_TEXT[state];
  if (run && run.drops > 0 && (state === "resumed" || state === "ended")) {
    const drops = `${run.drops} drop${run.drops > 1 ? "s" : ""}`;
    text = state === "resumed" ? `resumed after ${drops}` : `${text} · resumed after ${drops}`;
  }
  el.textContent = text;
}

// ---- event ids: "ms-seq", compared numerically ------------------------------

function parseId(id) {
  const [ms, seq] = id.split("-").map(Number);
  return { ms, seq };
}

function after(a, b) {
  const x = parseId(a);
  const y = parseId(b);
  return x.ms !== y.ms ? x.ms > y.ms : x.seq > y.seq;
}

// ---- rendering ---------------------------------------------------------------

function show(id, visible) {
  $(id).hidden = !visible;
}

function setStatus(status) {
  const el = $("status");
  el.textContent = status;
  el.dataset.status = status;
  const active = status === "queued" || status === "running";
  $("cancel").disabled = !active;
  show("cancel", run.owner && active);
}

function clearText() {
  $("output").replaceChildren();
  $("reasoning").replaceChildren();
  $("tool-calls").replaceChildren();
  show("reasoning-box", false);
  show("tool-calls", false);
  run.tokens = 0;
  $("tokens").textContent = "0";
}

function appendText(el, text) {
  el.append(document.createTextNode(text));
}

function formatMs(ms) {
  return ms < 1000 ? `${Math.round(ms)} ms` : `${(ms / 1000).toFixed(2)} s`;
}

function shareUrl(gen) {
  const url = new URL("/", location.origin);
  url.searchParams.set("view", gen.id);
  url.searchParams.set("token", gen.token);
  return url.href;
}

// ---- one generation on screen ------------------------------------------------

function attach(gen, { owner, sentAt = null }) {
  if (run && run.es) run.es.close();
  $("send").disabled = owner; // one generation at a time: Send comes back at its end
  run = {
    ...gen,
    owner,
    sentAt, // performance.now() when this page sent the prompt; null for viewers
    es: null,
    lastId: null,
    firstId: null,
    connected: false,
    done: false,
    drops: 0,
    reopens: 0,
    dupes: 0,
    tokens: 0,
    gotFirstToken: false,
    retryDelay: 500,
  };
  show("run", true);
  show("run-error", false);
  clearText();
  $("output").dataset.dupes = "0";
  $("ttft").textContent = "–";
  $("run-model").textContent = gen.model || "–";
  $("gen-id").textContent = gen.id;
  setStatus("queued");
  const link = $("share-link");
  link.href = shareUrl(gen);
  link.textContent = link.href;
  open(run, false);
}

function open(r, manual) {
  let url = `/v1/generations/${encodeURIComponent(r.id)}/events?token=${encodeURIComponent(r.token)}`;
  if (manual && r.lastId) url += `&after=${encodeURIComponent(r.lastId)}`;
  const es = new EventSource(url);
  r.es = es;
  setConn(r.drops ? "reconnecting" : "connecting");

  es.onopen = () => {
    if (r !== run) return;
    r.connected = true;
    r.retryDelay = 500;
    setConn(r.drops ? "resumed" : "live");
  };
  es.onerror = (e) => {
    // The server's own `error` event (the generation failed) reaches onerror too, as a
    // MessageEvent; it is handled below as the terminal event, not as a lost connection.
    if (e instanceof MessageEvent) return;
    if (r !== run || r.done) return;
    if (r.connected) r.drops += 1;
    r.connected = false;
    setConn("reconnecting");
    if (es.readyState === EventSource.CLOSED) recover(r);
  };
  for (const type of ["status", "delta", "done", "cancelled", "error"]) {
    es.addEventListener(type, (e) => {
      if (r === run && e instanceof MessageEvent) onEvent(r, type, e);
    });
  }
}

// The browser gave up on the stream (it does on HTTP errors, e.g. a 503 while an
// instance restarts): ask the status why, then reopen after the last id we have.
async function recover(r) {
  try {
    const res = await fetch(`/v1/generations/${encodeURIComponent(r.id)}?token=${encodeURIComponent(r.token)}`);
    if (res.status === 401 || res.status === 404 || res.status === 410) {
      finish(r, "unavailable"); // expired token, unknown id, or retention over
      showRunError(await errorMessage(res));
      return;
    }
  } catch {
    // unreachable: try again below
  }
  const delay = r.retryDelay;
  r.retryDelay = Math.min(r.retryDelay * 2, 10000);
  setTimeout(() => {
    if (r !== run || r.done) return;
    r.reopens += 1;
    open(r, true);
  }, delay);
}

function onEvent(r, type, e) {
  const id = e.lastEventId;
  if (id && r.lastId && !after(id, r.lastId)) {
    // Never expected (Last-Event-ID makes the server skip it); counted so a test can tell.
    r.dupes += 1;
    $("output").dataset.dupes = String(r.dupes);
    return;
  }
  if (id) {
    r.lastId = id;
    if (!r.firstId) r.firstId = id;
  }
  const data = e.data ? JSON.parse(e.data) : {};
  switch (type) {
    case "status":
      if (data.status === "restarted") {
        // The worker was lost and the job restarted: the text starts over too.
        clearText();
        setStatus("running");
        $("status").textContent = "running (restarted)";
      } else {
        setStatus(data.status);
      }
      break;
    case "delta":
      onDelta(r, id, data);
      break;
    case "done":
      finish(r, "completed");
      showUsage(data.usage);
      if (data.finish_reason && data.finish_reason !== "stop") {
        $("status").textContent = `completed (${data.finish_reason})`;
      }
      break;
    case "cancelled":
      finish(r, "cancelled");
      break;
    case "error":
      finish(r, "failed");
      showRunError(`${data.code}: ${data.message}`);
      break;
  }
}

function onDelta(r, id, data) {
  if ($("status").dataset.status === "queued") setStatus("running");
  if (typeof data.content === "string" && data.content) {
    appendText($("output"), data.content);
    r.tokens += 1;
    $("tokens").textContent = String(r.tokens);
    if (!r.gotFirstToken) {
      r.gotFirstToken = true;
      showTtft(r, id);
    }
  }
  if (typeof data.reasoning === "string" && data.reasoning) {
    show("reasoning-box", true);
    appendText($("reasoning"), data.reasoning);
  }
  if (data.tool_calls) {
    show("tool-calls", true);
    appendText($("tool-calls"), JSON.stringify(data.tool_calls) + "\n");
  }
}

function showTtft(r, id) {
  if (r.sentAt !== null) {
    $("ttft").textContent = formatMs(performance.now() - r.sentAt);
  } else if (r.firstId && id) {
    // A viewer did not send the prompt: use the stream's own clock (ids are append times).
    $("ttft").textContent = formatMs(parseId(id).ms - parseId(r.firstId).ms);
  }
}

function showUsage(usage) {
  if (!usage) return;
  const p = usage.prompt_tokens ?? "?";
  const c = usage.completion_tokens ?? "?";
  const t = usage.total_tokens ?? "?";
  $("tokens").textContent = `${c} (prompt ${p}, total ${t})`;
}

function finish(r, status) {
  r.done = true;
  r.es.close();
  setStatus(status);
  setConn("ended");
  $("send").disabled = false;
}

// Take the generation off the screen (a new one could not be created): its card would
// otherwise sit under the error as if it were the answer to the new prompt.
function detach() {
  if (run && run.es) run.es.close();
  run = null;
  sessionStorage.removeItem(RUN_STORE);
  show("run", false);
  setConn("idle");
  $("send").disabled = false;
}

function showRunError(message) {
  $("run-error").textContent = message;
  show("run-error", true);
}

// ---- requests ------------------------------------------------------------------

function authHeaders() {
  const key = sessionStorage.getItem(KEY_STORE);
  return key ? { Authorization: `Bearer ${key}` } : {};
}

async function errorMessage(res) {
  try {
    const body = await res.json();
    if (body && body.error) return `${body.error.code}: ${body.error.message}`;
  } catch {
    // not JSON: fall through
  }
  return `HTTP ${res.status}`;
}

function showFormError(message) {
  $("form-error").textContent = message;
  show("form-error", Boolean(message));
}

async function submit(event) {
  event.preventDefault();
  if (run && run.owner && !run.done) return; // Send is disabled meanwhile; Enter is not
  showFormError("");
  const model = $("model").value.trim();
  const body = { messages: [{ role: "user", content: $("prompt").value }] };
  if (model) body.model = model; // empty: the server's default model
  const maxTokens = $("max-tokens").value;
  if (maxTokens) body.max_tokens = Number(maxTokens);
  $("send").disabled = true;
  const sentAt = performance.now();
  try {
    const res = await fetch("/v1/generations", {
      method: "POST",
      headers: { "Content-Type": "application/json", ...authHeaders() },
      body: JSON.stringify(body),
    });
    if (!res.ok) {
      if (res.status === 401) $("auth").open = true;
      detach();
      showFormError(await errorMessage(res));
      return;
    }
    const created = await res.json();
    const gen = { id: created.id, token: created.stream_token, model: created.model };
    sessionStorage.setItem(RUN_STORE, JSON.stringify(gen));
    attach(gen, { owner: true, sentAt }); // keeps Send disabled until the terminal event
  } catch (err) {
    detach();
    showFormError(`cannot reach the server: ${err.message}`);
  }
}

// The models the server lists (GET /v1/models) as suggestions for the model field, whose
// value the server filled with its default model. Without the list (no key yet, or an
// error) the suggestions built into the page stay.
async function loadModels() {
  try {
    const res = await fetch("/v1/models", { headers: authHeaders() });
    if (!res.ok) return;
    const body = await res.json();
    const ids = (body.data || []).map((m) => m.id).filter((id) => typeof id === "string");
    if (!ids.length) return;
    const options = ids.map((id) => {
      const option = document.createElement("option");
      option.value = id;
      return option;
    });
    $("models").replaceChildren(...options);
    $("models").dataset.source = "server";
  } catch {
    // unreachable: keep the built-in suggestions
  }
}

async function cancel() {
  if (!run || run.done) return;
  $("cancel").disabled = true;
  const res = await fetch(`/v1/generations/${encodeURIComponent(run.id)}/cancel`, {
    method: "POST",
    headers: authHeaders(),
  });
  // 409: it ended on its own meanwhile; the stream tells how.
  if (!res.ok && res.status !== 409) {
    showRunError(await errorMessage(res));
    $("cancel").disabled = false;
  }
}

async function copyLink() {
  const href = $("share-link").href;
  try {
    await navigator.clipboard.writeText(href);
    $("copy").textContent = "Copied";
  } catch {
    window.prompt("Copy this link", href);
  }
}

// ---- start -----------------------------------------------------------------------

function start() {
  const params = new URLSearchParams(location.search);
  $("copy").addEventListener("click", copyLink);
  if (params.has("view")) {
    show("viewer-note", true);
    document.title = "tokenrelay · live view";
    attach({ id: params.get("view"), token: params.get("token") || "", model: "" }, { owner: false });
    fetch(`/v1/generations/${encodeURIComponent(run.id)}?token=${encodeURIComponent(run.token)}`)
      .then((res) => (res.ok ? res.json() : null))
      .then((s) => { if (s) $("run-model").textContent = s.model; })
      .catch(() => {});
    return;
  }
  show("composer", true);
  $("composer").addEventListener("submit", submit);
  $("cancel").addEventListener("click", cancel);
  const key = $("api-key");
  key.value = sessionStorage.getItem(KEY_STORE) || "";
  key.addEventListener("change", () => {
    sessionStorage.setItem(KEY_STORE, key.value.trim());
    loadModels();
  });
  loadModels();
  // A reload brings back the generation this tab was showing (replayed from the start).
  const saved = sessionStorage.getItem(RUN_STORE);
  if (saved) attach(JSON.parse(saved), { owner: true });
}

start();
