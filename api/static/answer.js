// An answer being written: its event stream drawn into an assistant bubble.
//
// Per answer, this tab keeps the text it has shown and the id of the last event it got
// (sessionStorage survives a reload), so a reloaded page resumes with ?after= exactly
// where it stopped: no gap, no repeated word. A tab with nothing saved (a new tab, a
// second device) reads the answer from its first event.

import { Follower, parseId } from "./stream.js";
import { setConn } from "./view.js";

const SAVE_PREFIX = "tokenrelay.answer.";

function loadSaved(genId) {
  try {
    const saved = JSON.parse(sessionStorage.getItem(SAVE_PREFIX + genId) || "null");
    return saved && typeof saved.text === "string" && typeof saved.after === "string" ? saved : null;
  } catch {
    return null;
  }
}

export class Answer {
  /**
   * genId: the generation; bubble: its assistant Bubble; url: its event stream;
   * snapshot: its text so far as the API last showed it (drawn until the stream catches up);
   * sentAt: performance.now() when this page sent the prompt (null if it did not);
   * onEnd(answer): once, at its end; onClosed(): see Follower.
   */
  constructor({ genId, bubble, url, snapshot = "", sentAt = null, onEnd, onClosed }) {
    const saved = loadSaved(genId);
    this.genId = genId;
    this.bubble = bubble;
    this.sentAt = sentAt;
    this.onEnd = onEnd;
    this.done = false;
    this.text = saved ? saved.text : "";
    this.floor = saved ? "" : snapshot;
    this.queuedId = null; // id of the `queued` event, when this page saw it: the stream's clock
    this.gotToken = false;
    this.savedId = saved ? saved.after : null; // the last event this answer took
    this.lastStatus = null; // the last status event seen
    this.saveTimer = null;
    addEventListener("pagehide", this.flush);
    bubble.setStatus(bubble.node.dataset.status || "queued");
    bubble.setText(this.shown(), true);
    this.follower = new Follower(url, {
      after: saved ? saved.after : null,
      onEvent: (type, data, id) => this.event(type, data, id),
      onConn: (state) => setConn(state, this.follower),
      onClosed,
    });
  }

  shown() {
    return this.text.length >= this.floor.length ? this.text : this.floor;
  }

  // Text and id always match (both change together, per event), so saving a little late
  // only means a reload resumes a little earlier: no gap, no repeat. At most every 250 ms,
  // and when the page goes away, because a replay brings thousands of events at once.
  save(id) {
    if (!id) return;
    this.savedId = id;
    if (!this.saveTimer) this.saveTimer = setTimeout(this.flush, 250);
  }

  flush = () => {
    clearTimeout(this.saveTimer);
    this.saveTimer = null;
    if (this.done || !this.savedId) return;
    sessionStorage.setItem(SAVE_PREFIX + this.genId, JSON.stringify({ after: this.savedId, text: this.text }));
  };

  event(type, data, id) {
    const b = this.bubble;
    switch (type) {
      case "status":
        if (data.status === "running" && this.moved()) return;
        if (data.status === "queued") this.queuedId = id;
        if (data.status === "restarted") {
          // The worker was lost and the job restarted: the text starts over too.
          this.text = "";
          this.floor = "";
          b.clear();
          b.setStatus("running", "running (restarted)");
        } else {
          b.setStatus(data.status);
        }
        break;
      case "delta":
        this.delta(data, id);
        break;
      case "done":
        this.end("completed", data.finish_reason && data.finish_reason !== "stop"
          ? `completed (${data.finish_reason})` : "completed");
        b.setUsage(data.usage);
        break;
      case "cancelled":
        this.end("cancelled");
        break;
      case "error":
        this.end("failed");
        b.setError(`${data.code}: ${data.message}`);
        break;
    }
    b.setDupes(this.follower ? this.follower.dupes : 0);
    this.lastStatus = type === "status" ? data.status : this.lastStatus;
    if (!this.done) this.save(id);
  }

  // A thread's stream follows whichever answer is active. One that is `running` again,
  // not right after `restarted`, is the thread's next answer: this one ended while the
  // connection was down (another client had enqueued a message). `onClosed` then takes
  // this one's end from the thread, and the next answer gets its own bubble.
  moved() {
    const begun = this.text !== "" || this.lastStatus === "running";
    if (!begun || this.lastStatus === "restarted") return false;
    this.follower.interrupt(this.savedId);
    return true;
  }

  delta(data, id) {
    const b = this.bubble;
    if (b.node.dataset.status === "queued") b.setStatus("running");
    if (typeof data.content === "string" && data.content) {
      this.text += data.content;
      b.setTokens(b.tokens + 1);
      b.setText(this.shown());
      if (!this.gotToken) {
        this.gotToken = true;
        if (this.sentAt !== null) b.setTtft(performance.now() - this.sentAt);
        else if (this.queuedId && id) b.setTtft(parseId(id).ms - parseId(this.queuedId).ms);
      }
    }
    if (typeof data.reasoning === "string" && data.reasoning) b.appendReasoning(data.reasoning);
    if (data.tool_calls) b.appendToolCalls(data.tool_calls);
  }

  end(status, label = status) {
    if (this.done) return;
    this.done = true;
    this.follower.stop();
    clearTimeout(this.saveTimer);
    removeEventListener("pagehide", this.flush);
    sessionStorage.removeItem(SAVE_PREFIX + this.genId);
    this.floor = "";
    this.bubble.setText(this.shown(), true);
    this.bubble.setStatus(status, label);
    setConn("ended", this.follower);
    this.onEnd(this);
  }

  /** It ended while no stream was open: take its end from the API (`m`: message or status). */
  endWith(m) {
    this.text = m.content || "";
    this.end(m.status);
    this.bubble.setUsage(m.usage);
    if (m.error) this.bubble.setError(`${m.error.code}: ${m.error.message}`);
  }

  /** It cannot be read any more (unknown, expired token, retention over). */
  fail(message) {
    this.end("unavailable");
    this.bubble.setError(message);
  }
}
