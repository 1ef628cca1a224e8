// One event stream (an answer being written), read with EventSource.
//
// When the connection drops the browser reconnects by itself and sends Last-Event-ID, so
// the server replays exactly what was missed. Only when the browser gives up (an HTTP
// error, or a 204: nothing to stream any more) does `onClosed` decide, usually after
// asking the API how things stand, whether we reopen it ourselves with ?after=.

const TYPES = ["status", "delta", "done", "cancelled", "error"];
export const TERMINAL = new Set(["done", "cancelled", "error"]);

/** A Redis Stream id "ms-seq" as numbers. */
export function parseId(id) {
  const [ms, seq] = id.split("-").map(Number);
  return { ms, seq };
}

/** Whether event id `a` comes after `b`. */
export function isAfter(a, b) {
  const x = parseId(a);
  const y = parseId(b);
  return x.ms !== y.ms ? x.ms > y.ms : x.seq > y.seq;
}

export class Follower {
  /**
   * url: the stream (its query may hold ?token=); after: the id to resume after, or null.
   * onEvent(type, data, id): each event, once, in order. onConn(state): connection state.
   * onClosed(): the browser gave up; resolves true to reopen after the last id, false to stop.
   */
  constructor(url, { after = null, onEvent, onConn, onClosed }) {
    this.url = url;
    this.lastId = after;
    this.onEvent = onEvent;
    this.onConn = onConn;
    this.onClosed = onClosed;
    this.es = null;
    this.connected = false;
    this.done = false;
    this.drops = 0; // connections lost after they were open
    this.reopens = 0; // times we, not the browser, reopened the stream
    this.dupes = 0; // events at or before one already seen (never expected)
    this.retryDelay = 500;
    this.open();
  }

  open() {
    let url = this.url;
    if (this.lastId) url += `${url.includes("?") ? "&" : "?"}after=${encodeURIComponent(this.lastId)}`;
    const es = new EventSource(url);
    this.es = es;
    this.onConn(this.drops ? "reconnecting" : "connecting");
    es.onopen = () => {
      if (this.done || es !== this.es) return;
      this.connected = true;
      this.retryDelay = 500;
      this.onConn(this.drops ? "resumed" : "live");
    };
    es.onerror = (e) => {
      // The server's own `error` event (the generation failed) reaches onerror too, as a
      // MessageEvent: it is the terminal event, handled below, not a lost connection.
      if (e instanceof MessageEvent || this.done || es !== this.es) return;
      if (this.connected) this.drops += 1;
      this.connected = false;
      this.onConn("reconnecting");
      if (es.readyState === EventSource.CLOSED) this.closed();
    };
    for (const type of TYPES) {
      es.addEventListener(type, (e) => {
        if (es === this.es && !this.done && e instanceof MessageEvent) this.event(type, e);
      });
    }
  }

  event(type, e) {
    const id = e.lastEventId;
    if (id && this.lastId && !isAfter(id, this.lastId)) {
      this.dupes += 1; // Last-Event-ID makes the server skip these; counted so a test can tell
      return;
    }
    if (id) this.lastId = id;
    const data = e.data ? JSON.parse(e.data) : {};
    if (TERMINAL.has(type)) this.stop(); // before the server's close can look like a drop
    this.onEvent(type, data, id);
  }

  /**
   * Drop this connection and let `onClosed` decide, as if the browser had given up;
   * `lastId`: the last event that was really this stream's (a reopen resumes after it).
   */
  interrupt(lastId) {
    this.lastId = lastId;
    if (this.es) this.es.close();
    this.connected = false;
    this.closed();
  }

  async closed() {
    let reopen;
    try {
      reopen = await this.onClosed();
    } catch {
      reopen = true; // the API is unreachable too: keep trying
    }
    if (!reopen || this.done) return;
    const delay = this.retryDelay;
    this.retryDelay = Math.min(this.retryDelay * 2, 10000);
    setTimeout(() => {
      if (this.done) return;
      this.reopens += 1;
      this.open();
    }, delay);
  }

  stop() {
    this.done = true;
    if (this.es) this.es.close();
  }
}
