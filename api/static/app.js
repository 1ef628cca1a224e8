// The tokenrelay page. Three ways in:
//   /                     a chat: your threads, a new conversation
//   /?thread=ID           a chat on that thread (a reload restores it, answer in flight included)
//   /?view=ID&token=T     a read-only live view of a shared thread (thr_…) or answer (gen_…)

import { Answer } from "./answer.js";
import { ApiError, call, generationPath, isGone, setApiKey, apiKey, threadPath } from "./api.js";
import { Conversation } from "./chat.js";
import { $, ACTIVE, Bubble, renderThreads, setConn, show } from "./view.js";

let conv = null; // the thread on screen
let sending = false; // a send is on its way (Send stays disabled until its answer ends)

function showError(id, message) {
  $(id).textContent = message;
  show(id, Boolean(message));
}

function describe(err) {
  return err instanceof ApiError ? err.message : `cannot reach the server: ${err.message}`;
}

// Send is disabled while a message is on its way or an answer is being written, so a
// second click (or Enter) cannot start a second generation; Stop shows meanwhile.
function updateControls() {
  const busy = Boolean(conv && conv.busy);
  $("send").disabled = sending || busy;
  show("stop", busy && !conv.readOnly);
  if (!busy) $("stop").disabled = false;
  show("empty", $("messages").childElementCount === 0 && !(conv && conv.readOnly));
  $("thread-title").textContent = conv ? conv.title : "";
  if (conv) {
    const link = $("share-link");
    link.href = conv.shareUrl;
    link.textContent = link.href;
    show("share", !conv.readOnly);
  }
}

function conversation(id, token, readOnly = false) {
  return new Conversation({
    id,
    token,
    readOnly,
    onChange: (c) => {
      updateControls();
      if (!c.busy && !readOnly) refreshThreads();
    },
    onGone: (message) => {
      showError("page-error", message);
      setConn("ended");
    },
  });
}

async function refreshThreads() {
  try {
    const page = await call("GET", "/v1/threads?limit=50");
    renderThreads(page.data, conv && conv.id);
  } catch (err) {
    if (err instanceof ApiError && err.status === 401) $("auth").open = true;
  }
}

// The models the server lists (GET /v1/models) as suggestions for the model field, whose
// value the server filled with its default model. Without the list (no key yet, or an
// error) the suggestions built into the page stay.
async function loadModels() {
  try {
    const body = await call("GET", "/v1/models");
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
    // no key yet, or unreachable: keep the built-in suggestions
  }
}

async function send(event) {
  event.preventDefault();
  if (sending || (conv && conv.busy)) return; // Send is disabled meanwhile; Enter is not
  const content = $("prompt").value;
  if (!content.trim()) return;
  sending = true;
  updateControls();
  showError("form-error", "");
  showError("page-error", "");
  const model = $("model").value.trim(); // empty: the thread's model, else the server's default
  const body = { content };
  if (model) body.model = model;
  if ($("max-tokens").value) body.max_tokens = Number($("max-tokens").value);
  let fresh = null; // a thread made for this message
  try {
    let target = conv;
    if (!target) {
      const created = await call("POST", "/v1/threads", { body: model ? { model } : {} });
      fresh = created.id;
      target = conversation(created.id, created.stream_token);
    }
    const sentAt = performance.now();
    const gen = await call("POST", `${threadPath(target.id)}/messages`, { body });
    if (fresh) {
      conv = target;
      history.replaceState(null, "", `/?thread=${encodeURIComponent(fresh)}`);
    }
    $("prompt").value = "";
    conv.sent(content, gen, sentAt);
  } catch (err) {
    // Nothing of a refused message stays on screen; a thread made for it is deleted again.
    if (fresh) call("DELETE", threadPath(fresh)).catch(() => {});
    if (err instanceof ApiError && err.status === 401) $("auth").open = true;
    showError("form-error", describe(err));
  } finally {
    sending = false;
    updateControls();
    refreshThreads();
  }
}

async function stop() {
  if (!conv || !conv.busy) return;
  $("stop").disabled = true;
  try {
    await call("POST", `${generationPath(conv.answer.genId)}/cancel`);
  } catch (err) {
    if (err instanceof ApiError && err.status === 409) return; // it ended meanwhile; the stream says how
    showError("form-error", describe(err));
    $("stop").disabled = false;
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

// ---- the three ways in --------------------------------------------------------------------

async function startChat(threadId) {
  show("sidebar", true);
  show("composer", true);
  $("composer").addEventListener("submit", send);
  $("prompt").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey && !e.isComposing) {
      e.preventDefault();
      $("composer").requestSubmit();
    }
  });
  $("stop").addEventListener("click", stop);
  const key = $("api-key");
  key.value = apiKey();
  const useKey = () => {
    setApiKey(key.value);
    location.reload(); // everything on the page depends on who is asking
  };
  key.addEventListener("change", useKey);
  $("key-form").addEventListener("submit", (e) => {
    e.preventDefault();
    useKey();
  });
  loadModels();
  refreshThreads();
  if (threadId) {
    const c = conversation(threadId, "");
    try {
      if (await c.open()) {
        conv = c;
        const last = c.thread.messages.findLast((m) => m.model); // the model it was using
        $("model").value = last ? last.model : c.thread.model;
        document.title = `${c.thread.title || "chat"} · tokenrelay`;
      } else if (!apiKey()) {
        $("auth").open = true;
      }
    } catch (err) {
      showError("page-error", describe(err));
    }
  }
  updateControls();
  $("prompt").focus();
}

async function startThreadView(id, token) {
  document.title = "tokenrelay · live view";
  conv = conversation(id, token, true);
  try {
    await conv.open();
  } catch (err) {
    showError("page-error", describe(err));
  }
  updateControls();
}

function startAnswerView(id, token) {
  document.title = "tokenrelay · live view";
  $("viewer-note").textContent = "Read-only live view of a shared answer.";
  const path = generationPath(id);
  const bubble = new Bubble("assistant", id);
  const answer = new Answer({
    genId: id,
    bubble,
    url: `${path}/events?token=${encodeURIComponent(token)}`,
    onEnd: () => {},
    // The browser gave up on the stream: the status says whether to reopen it.
    onClosed: async () => {
      let status;
      try {
        status = await call("GET", path, { token });
      } catch (err) {
        if (!isGone(err)) throw err;
        answer.fail(err.message);
        showError("page-error", err.message);
        return false;
      }
      if (ACTIVE.has(status.status)) return true;
      answer.endWith(status);
      return false;
    },
  });
  call("GET", path, { token }).then((s) => bubble.setModel(s.model), () => {});
}

function start() {
  const params = new URLSearchParams(location.search);
  $("copy").addEventListener("click", copyLink);
  const view = params.get("view");
  if (view) {
    show("viewer-note", true);
    const token = params.get("token") || "";
    if (view.startsWith("thr_")) startThreadView(view, token);
    else startAnswerView(view, token);
    return;
  }
  startChat(params.get("thread"));
}

start();
