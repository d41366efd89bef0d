// Test doubles: a virtual clock with timers, a scriptable WebSocket, an in-memory Storage.

/** Lets pending promise callbacks (async token functions, awaits in the client) run. */
export function settle() {
  return new Promise((resolve) => setImmediate(resolve));
}

/** Timers on a virtual clock that only moves when the test calls `advance`. */
export class FakeClock {
  now = 0;
  #next = 1;
  /** @type {Map<number, {due: number, callback: () => void}>} */
  #timers = new Map();

  /** The object to pass as the client's `timers` option. */
  get timers() {
    return {
      setTimeout: (callback, ms) => this.setTimeout(callback, ms),
      clearTimeout: (id) => this.#timers.delete(id),
      now: () => this.now,
    };
  }

  setTimeout(callback, ms) {
    const id = this.#next++;
    this.#timers.set(id, { due: this.now + Math.max(0, ms), callback });
    return id;
  }

  /** Delays of the timers still pending, from now. */
  get pending() {
    return [...this.#timers.values()].map((t) => t.due - this.now).sort((a, b) => a - b);
  }

  /** Moves the clock forward, firing due timers in order (and the promises they start). */
  async advance(ms) {
    const target = this.now + ms;
    await settle();
    for (;;) {
      const due = [...this.#timers.entries()].filter(([, t]) => t.due <= target).sort((a, b) => a[1].due - b[1].due);
      if (due.length === 0) break;
      const [id, timer] = due[0];
      this.#timers.delete(id);
      this.now = timer.due;
      timer.callback();
      await settle();
    }
    this.now = target;
  }
}

/** A WebSocket the test drives from the server side. Every instance is kept in `FakeWebSocket.all`. */
export class FakeWebSocket {
  static CONNECTING = 0;
  static OPEN = 1;
  static CLOSING = 2;
  static CLOSED = 3;
  /** @type {FakeWebSocket[]} */
  static all = [];

  static reset() {
    FakeWebSocket.all = [];
  }

  /** The newest socket. */
  static get last() {
    return FakeWebSocket.all.at(-1);
  }

  readyState = FakeWebSocket.CONNECTING;
  /** Frames the client sent, parsed. */
  sent = [];
  /** The client's close(code, reason), if it called it. */
  closedByClient = null;
  onopen = null;
  onmessage = null;
  onclose = null;
  onerror = null;

  constructor(url) {
    this.url = new URL(url);
    FakeWebSocket.all.push(this);
  }

  /** A query parameter of the URL the client connected to (null when absent). */
  param(name) {
    return this.url.searchParams.get(name);
  }

  send(text) {
    if (this.readyState !== FakeWebSocket.OPEN) throw new Error("send on a socket that is not open");
    this.sent.push(JSON.parse(text));
  }

  close(code, reason) {
    this.closedByClient = { code, reason };
    this.readyState = FakeWebSocket.CLOSED;
  }

  /** Sent frames of one type. */
  sentOf(type) {
    return this.sent.filter((frame) => frame.type === type);
  }

  // --- the server side ---

  open() {
    this.readyState = FakeWebSocket.OPEN;
    this.onopen?.({});
  }

  /** Opens the socket and sends `welcome`; its `seq`, the stream's end, is at least the URL's `since`, as a gateway's. */
  welcome(fields = {}) {
    this.open();
    const seq = Number(this.param("since") ?? 0);
    this.receive({ type: "welcome", conn: "c1", user: "42", device: "default", node: "n1", seq, heartbeat: 25, ...fields });
  }

  receive(frame) {
    this.onmessage?.({ data: typeof frame === "string" ? frame : JSON.stringify(frame) });
  }

  /** A message frame with defaults. */
  msg(seq, fields = {}) {
    // As the gateway sends it: `id` and `kind` only when not empty.
    this.receive({ type: "msg", seq, to: "user", ts: "2024-01-01T00:00:00Z", data: { n: seq }, ...fields });
  }

  /** The server (or the network) closes the socket. */
  serverClose(code, reason = "") {
    this.readyState = FakeWebSocket.CLOSED;
    this.onerror?.({});
    this.onclose?.({ code, reason });
  }
}

/** localStorage in memory. */
export class MemoryStorage {
  map = new Map();
  getItem(key) {
    return this.map.has(key) ? this.map.get(key) : null;
  }
  setItem(key, value) {
    this.map.set(key, String(value));
  }
}

/** An unsigned JWT-shaped token with the given claims (the client only reads it). */
export function fakeToken(claims) {
  const part = (value) => Buffer.from(JSON.stringify(value)).toString("base64url");
  return `${part({ alg: "none" })}.${part(claims)}.sig`;
}

/**
 * The browser's window as the client sees it: `pagehide` on the page, `visibilitychange` on its
 * document. `listeners` counts the client's listeners on both.
 */
export class FakePage extends EventTarget {
  listeners = 0;
  document = new FakeDocument(this);

  addEventListener(type, listener) {
    this.listeners += 1;
    super.addEventListener(type, listener);
  }

  removeEventListener(type, listener) {
    this.listeners -= 1;
    super.removeEventListener(type, listener);
  }

  /** The user navigates away (or reloads). */
  pagehide() {
    this.dispatchEvent(new Event("pagehide"));
  }

  /** The tab is hidden (`hidden`) or shown again (`visible`). */
  visibility(state) {
    this.document.visibilityState = state;
    this.document.dispatchEvent(new Event("visibilitychange"));
  }
}

class FakeDocument extends EventTarget {
  visibilityState = "visible";

  constructor(page) {
    super();
    this.page = page;
  }

  addEventListener(type, listener) {
    this.page.listeners += 1;
    super.addEventListener(type, listener);
  }

  removeEventListener(type, listener) {
    this.page.listeners -= 1;
    super.removeEventListener(type, listener);
  }
}
