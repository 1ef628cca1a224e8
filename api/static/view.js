// What the page draws: message bubbles, the thread list, the connection indicator.
// User and model text only ever reaches the page as Text nodes (or through markdown.js,
// which builds elements itself); nothing here parses HTML.

import { renderMarkdown } from "./markdown.js";

export const $ = (id) => document.getElementById(id);

export function show(id, visible) {
  $(id).hidden = !visible;
}

function el(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

export function formatMs(ms) {
  return ms < 1000 ? `${Math.round(ms)} ms` : `${(ms / 1000).toFixed(2)} s`;
}

// ---- connection indicator -------------------------------------------------------------

const CONN_TEXT = {
  idle: "not connected",
  connecting: "connecting…",
  live: "live",
  reconnecting: "reconnecting…",
  resumed: "resumed",
  ended: "stream ended",
};

/** Show the state of the stream followed now; `f` (a Follower) gives its counters. */
export function setConn(state, f = null) {
  const node = $("conn");
  const drops = f ? f.drops : 0;
  node.dataset.state = state;
  node.dataset.drops = String(drops);
  node.dataset.reopens = String(f ? f.reopens : 0);
  let text = CONN_TEXT[state];
  if (drops > 0 && (state === "resumed" || state === "ended")) {
    const n = `${drops} drop${drops > 1 ? "s" : ""}`;
    text = state === "resumed" ? `resumed after ${n}` : `${text} · resumed after ${n}`;
  }
  node.textContent = text;
}

// ---- message bubbles ----------------------------------------------------------------------

// Change the messages; if the reader was at the end (or `always`), keep the end in view.
function keepAtEnd(change, always = false) {
  const box = $("messages");
  const atEnd = box.scrollHeight - box.scrollTop - box.clientHeight < 48;
  change();
  if (always || atEnd) box.scrollTop = box.scrollHeight;
}

export const ACTIVE = new Set(["queued", "running"]);

/** One message on screen. An assistant's text is Markdown, redrawn at most once a frame. */
export class Bubble {
  constructor(role, genId) {
    this.role = role;
    this.text = "";
    this.pending = false;
    this.tokens = 0;
    const node = el("article", "msg");
    node.dataset.role = role;
    if (genId) node.dataset.gen = genId;
    node.dataset.dupes = "0";
    this.node = node;
    this.body = el("div", role === "assistant" ? "body md" : "body");
    if (role === "assistant") {
      this.reasoning = el("details", "reasoning");
      this.reasoning.append(el("summary", "", "reasoning"), el("pre"));
      this.reasoning.hidden = true;
      this.tools = el("pre", "tool-calls");
      this.tools.hidden = true;
      this.error = el("p", "error");
      this.error.hidden = true;
      this.meta = el("footer", "meta");
      this.parts = {};
      for (const name of ["status", "model", "tokens", "ttft"]) {
        this.parts[name] = el("span", name);
        this.meta.append(this.parts[name]);
      }
      node.append(this.reasoning, this.body, this.tools, this.error, this.meta);
    } else {
      node.append(this.body);
    }
    keepAtEnd(() => $("messages").append(node), true);
  }

  /** Replace the text; a user's is shown as typed, an assistant's as Markdown. */
  setText(text, now = false) {
    this.text = text;
    if (this.role !== "assistant") {
      this.body.textContent = text;
    } else if (now) {
      this.draw();
    } else if (!this.pending) {
      this.pending = true;
      requestAnimationFrame(() => this.draw());
    }
  }

  draw() {
    this.pending = false;
    keepAtEnd(() => this.body.replaceChildren(renderMarkdown(this.text)));
    this.node.dataset.text = this.text; // what was drawn, for tests and copy tools
  }

  appendReasoning(text) {
    this.reasoning.hidden = false;
    this.reasoning.lastChild.append(document.createTextNode(text));
  }

  appendToolCalls(calls) {
    this.tools.hidden = false;
    this.tools.append(document.createTextNode(`${JSON.stringify(calls)}\n`));
  }

  clear() {
    this.setText("", true);
    this.reasoning.lastChild.replaceChildren();
    this.reasoning.hidden = true;
    this.tools.replaceChildren();
    this.tools.hidden = true;
    this.setTokens(0);
  }

  setStatus(status, label = status) {
    this.node.dataset.status = status;
    this.parts.status.textContent = label;
    if (!ACTIVE.has(status)) this.draw(); // the final text is on screen when the status says so
  }

  get active() {
    return ACTIVE.has(this.node.dataset.status);
  }

  setModel(model) {
    this.parts.model.textContent = model || "";
  }

  setTokens(n) {
    this.tokens = n;
    this.parts.tokens.textContent = n ? `${n} tokens` : "";
  }

  setUsage(usage) {
    if (!usage) return;
    const p = usage.prompt_tokens ?? "?";
    const c = usage.completion_tokens ?? "?";
    this.parts.tokens.textContent = `${c} tokens (prompt ${p})`;
  }

  setTtft(ms) {
    this.parts.ttft.textContent = `first token ${formatMs(ms)}`;
    this.parts.ttft.title = "from sending the prompt (or, in a shared view, from queueing)";
  }

  setError(message) {
    this.error.textContent = message;
    this.error.hidden = !message;
  }

  setDupes(n) {
    this.node.dataset.dupes = String(n);
  }
}

// ---- the thread list ------------------------------------------------------------------------

function ago(seconds) {
  const s = Math.max(0, Date.now() / 1000 - seconds);
  if (s < 60) return "just now";
  if (s < 3600) return `${Math.floor(s / 60)} min ago`;
  if (s < 86400) return `${Math.floor(s / 3600)} h ago`;
  return new Date(seconds * 1000).toLocaleDateString();
}

/** The user's threads, newest activity first, as links (`/?thread=ID`). */
export function renderThreads(threads, currentId) {
  const items = threads.map((t) => {
    const li = el("li");
    const a = el("a", "thread");
    a.href = `/?thread=${encodeURIComponent(t.id)}`;
    a.dataset.id = t.id;
    if (t.id === currentId) a.setAttribute("aria-current", "page");
    if (t.active_generation_id) a.dataset.active = "true";
    a.append(el("span", "title", t.title || "(empty)"), el("span", "when", ago(t.updated_at)));
    li.append(a);
    return li;
  });
  $("thread-list").replaceChildren(...items);
  show("no-threads", items.length === 0);
}
