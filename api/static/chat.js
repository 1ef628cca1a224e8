// One thread on screen: its messages, and the answer still being written followed on the
// thread's stream (GET /v1/threads/{id}/stream), which is what a reloaded page, a second
// device or a shared read-only view all read.

import { Answer } from "./answer.js";
import { call, isGone, threadPath } from "./api.js";
import { ACTIVE, Bubble, setConn } from "./view.js";

const POLL_MS = 2000; // a read-only view looks for the next message this often

export class Conversation {
  /**
   * id, token: the thread and a read-only stream token for it. readOnly: a shared view
   * (reads with the token; polls for new messages). onChange(conversation): an answer
   * started or ended. onGone(message): the thread cannot be read any more.
   */
  constructor({ id, token, readOnly = false, onChange = () => {}, onGone = () => {} }) {
    this.id = id;
    this.token = token;
    this.readOnly = readOnly;
    this.onChange = onChange;
    this.onGone = onGone;
    this.thread = null;
    this.bubbles = new Map(); // "role:generation id" -> Bubble
    this.answer = null;
    this.timer = null;
  }

  get busy() {
    return Boolean(this.answer && !this.answer.done);
  }

  /** The start of its first message, as the API titles a thread. */
  get title() {
    if (this.thread && this.thread.title) return this.thread.title;
    const first = this.bubbles.values().next().value;
    return first ? first.text.split(/\s+/).join(" ").trim().slice(0, 80) : "";
  }

  get shareUrl() {
    const url = new URL("/", location.origin);
    url.searchParams.set("view", this.id);
    url.searchParams.set("token", this.token);
    return url.href;
  }

  /** GET the thread (with the token in a shared view, else with the API key). */
  async load() {
    const thread = await call("GET", threadPath(this.id), this.readOnly ? { token: this.token } : {});
    if (thread.stream_token) this.token = thread.stream_token;
    return thread;
  }

  /** Load and draw it; resolves false if it is gone (the page then says why). */
  async open() {
    try {
      this.sync(await this.load());
    } catch (err) {
      if (!isGone(err)) throw err;
      this.onGone(err.message);
      return false;
    }
    if (this.readOnly) this.poll();
    return true;
  }

  bubble(role, genId) {
    const key = `${role}:${genId}`;
    let b = this.bubbles.get(key);
    if (!b) {
      b = new Bubble(role, genId);
      this.bubbles.set(key, b);
    }
    return b;
  }

  /** Draw what is not on screen yet, and follow the answer being written. */
  sync(thread) {
    this.thread = thread;
    for (const m of thread.messages) {
      const known = this.bubbles.has(`${m.role}:${m.generation_id}`);
      const b = this.bubble(m.role, m.generation_id);
      if (m.role === "user") {
        if (!known) b.setText(m.content);
      } else if (!known || (b.active && !ACTIVE.has(m.status) && !this.following(m.generation_id))) {
        fill(b, m);
      }
    }
    const active = thread.messages.find(
      (m) => m.role === "assistant" && m.generation_id === thread.active_generation_id);
    if (active && ACTIVE.has(active.status) && !this.following(active.generation_id)) {
      this.follow(active.generation_id, { snapshot: active.content });
    }
  }

  following(genId) {
    return Boolean(this.answer && this.answer.genId === genId && !this.answer.done);
  }

  /** The user's message was accepted (`gen`: the API's answer): draw it, follow its answer. */
  sent(content, gen, sentAt) {
    this.bubble("user", gen.id).setText(content);
    const b = this.bubble("assistant", gen.id);
    b.setModel(gen.model);
    this.follow(gen.id, { sentAt });
  }

  follow(genId, { snapshot = "", sentAt = null } = {}) {
    const url = `${threadPath(this.id)}/stream?token=${encodeURIComponent(this.token)}`;
    const answer = new Answer({
      genId,
      bubble: this.bubble("assistant", genId),
      url,
      snapshot,
      sentAt,
      onEnd: () => this.ended(),
      onClosed: () => this.recover(answer),
    });
    this.answer = answer;
    this.onChange(this);
  }

  ended() {
    this.onChange(this);
    if (this.readOnly) this.poll(0); // the next message may be there already
  }

  /**
   * The thread's stream closed with no terminal event: a 204 (the answer ended and left
   * the thread) or an HTTP error. The thread says which; true = reopen after the last id.
   */
  async recover(answer) {
    let thread;
    try {
      thread = await this.load();
    } catch (err) {
      if (!isGone(err)) throw err;
      answer.fail(err.message);
      this.onGone(err.message);
      return false;
    }
    const m = thread.messages.find((x) => x.role === "assistant" && x.generation_id === answer.genId);
    if (m && ACTIVE.has(m.status) && thread.active_generation_id === answer.genId) return true;
    if (m) answer.endWith(m);
    else answer.fail("this answer is no longer in the thread");
    this.sync(thread);
    return false;
  }

  /** A shared view: look for new messages while no answer is being written. */
  poll(delay = POLL_MS) {
    clearTimeout(this.timer);
    this.timer = setTimeout(async () => {
      if (!this.busy) {
        try {
          this.sync(await this.load());
        } catch (err) {
          if (isGone(err)) {
            setConn("ended");
            this.onGone(err.message);
            return;
          }
        }
      }
      this.poll();
    }, delay);
  }
}

function fill(b, m) {
  b.setModel(m.model);
  b.setText(m.content, true);
  b.setStatus(m.status, m.finish_reason && m.finish_reason !== "stop"
    ? `${m.status} (${m.finish_reason})` : m.status);
  b.setUsage(m.usage);
  b.setError(m.error ? `${m.error.code}: ${m.error.message}` : "");
}
