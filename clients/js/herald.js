// @ts-check
/**
 * Herald browser client: one ES module, no dependencies, no build step.
 *
 * ```js
 * import { Herald } from "/herald.js";
 * const herald = new Herald({ token: () => fetchToken() });
 * herald.on("message", (msg) => console.log(msg.seq, msg.kind, msg.data));
 * herald.on("state", ({ state, code, reason }) => console.log(state, code, reason));
 * herald.connect();
 * ```
 *
 * The module is laid out from the small pure parts to the client that ties them together:
 * errors and frame types, URL building and the close-code policy (pure functions), then
 * `Backoff`, `SeqFilter` (dedupe), `AckBatcher` and `Liveness` (small classes with injected timers),
 * then `Herald`. Everything that touches the outside world (WebSocket, timers, clock, storage,
 * randomness) is injected through the constructor options, so the logic runs under Node's test runner.
 * The wire contract is docs/protocol.md.
 *
 * @module herald
 */

// ---------------------------------------------------------------------------------------------
// Types and errors
// ---------------------------------------------------------------------------------------------

/**
 * A message delivered to this connection.
 * @typedef {object} MsgFrame
 * @property {"msg"} type
 * @property {number} seq     stream sequence: the resume point and the dedupe key
 * @property {string} to      `"user"`, `"all"` or `"topic:<topic>"`
 * @property {string} id      the publisher's `Nats-Msg-Id`, or `""` (the gateway leaves it out when empty)
 * @property {string} kind    the publisher's `Herald-Type`, or `""` (the gateway leaves it out when empty)
 * @property {string} ts      RFC 3339 time the stream stored it
 * @property {any} data       the payload: JSON, a string, or `{"$base64": "..."}`
 */

/**
 * Ends a replay: the connection's resume (no `topic`) or a `subscribe(topic, {since})` (with `topic`).
 * @typedef {object} ReplayedFrame
 * @property {"replayed"} type
 * @property {number} from
 * @property {number} to
 * @property {number} count
 * @property {boolean} complete  false: messages may have been dropped by retention; reload app state
 * @property {string} [topic]
 */

/**
 * The first frame of every connection.
 * @typedef {object} WelcomeFrame
 * @property {"welcome"} type
 * @property {string} conn
 * @property {string} user
 * @property {string} device
 * @property {string} node
 * @property {number} seq        the stream's last sequence when the connection went live
 * @property {number} heartbeat  seconds
 * @property {number} [read]     the user's read position (highest personal seq read on any device)
 * @property {number} [unread]   the user's unread personal messages up to `seq`
 * @property {string} [epoch]    names the stream among the streams of its name over time (one made again
 *                               starts its seqs over): given back with `since`
 */

/**
 * The user's inbox as the client knows it (`inbox` getter and event).
 * @typedef {object} InboxState
 * @property {number} read    the highest personal seq read on any device
 * @property {number} unread  personal messages above it (muted kinds left out)
 */

/**
 * `state` event detail.
 * @typedef {object} StateDetail
 * @property {"connecting"|"open"|"reconnecting"|"closed"} state
 * @property {number} [code]     the close code that led here
 * @property {string} [reason]   why (close reason, or the client's own explanation)
 * @property {number} [delay]    `reconnecting`: milliseconds until the next attempt
 * @property {number} [attempt]  `reconnecting`: attempts since the last successful connection
 */

/** Error of an rpc, a token function, or the connection; `code` is machine-readable. */
export class HeraldError extends Error {
  /**
   * @param {string} code     e.g. `no_function`, `timeout`, `function_error`, `disconnected`, `closed`
   * @param {string} message
   */
  constructor(code, message) {
    super(message);
    this.name = "HeraldError";
    /** @type {string} */
    this.code = code;
  }
}

/** Close codes of the contract (docs/protocol.md, "Close codes"). */
export const CloseCode = Object.freeze({
  NORMAL: 1000,
  GOING_AWAY: 1001,
  PROTOCOL_ERROR: 1002,
  ABNORMAL: 1006,
  INVALID_DATA: 1007,
  POLICY: 1008,
  TOO_BIG: 1009,
  INTERNAL: 1011,
  RESTART: 1012,
  TRY_AGAIN: 1013,
  TOKEN_EXPIRED: 4001,
  KICKED: 4003,
  SLOW_CONSUMER: 4008,
  REPLACED: 4009,
  RATE_LIMITED: 4029,
  /** Used by this client when it drops a connection that stopped answering pings, or never welcomed it. */
  DEAD: 4000,
});

// ---------------------------------------------------------------------------------------------
// Pure functions
// ---------------------------------------------------------------------------------------------

/**
 * The WebSocket URL of one connection attempt.
 * @param {string} base  `ws(s)://…/ws`, `http(s)://…/ws`, or a path resolved against `origin`
 * @param {{token?: string, since?: number|null, epoch?: string|null, device?: string, topics?: string[]}} params
 * @param {string} [origin]  defaults to `location.href` in a browser
 * @returns {string}
 */
export function buildUrl(base, params, origin = globalThis.location?.href) {
  const url = new URL(base, origin);
  if (url.protocol === "http:") url.protocol = "ws:";
  if (url.protocol === "https:") url.protocol = "wss:";
  const query = url.searchParams;
  if (params.token) query.set("token", params.token);
  if (params.since != null) query.set("since", String(params.since));
  if (params.since != null && params.epoch) query.set("epoch", params.epoch);
  if (params.device) query.set("device", params.device);
  if (params.topics && params.topics.length > 0) query.set("topics", params.topics.join(","));
  return url.toString();
}

/**
 * What to do after a close.
 * @typedef {{reconnect: false, reason: string}
 *   | {reconnect: true, immediate: boolean, renewToken: boolean}} CloseDecision
 */

/**
 * The close-code policy for one close, on its own. A socket that closed before it opened is treated
 * as a possible auth failure (browsers cannot see the HTTP status of a refused upgrade: 401, 403,
 * 503...): renew the token, back off. `immediate` is what a single close asks for; the client backs
 * off anyway when immediate closes repeat quickly (see `repeatWindow`).
 * @param {number} code
 * @param {boolean} opened  whether the socket opened before it closed
 * @returns {CloseDecision}
 */
export function closePolicy(code, opened) {
  if (!opened) return { reconnect: true, immediate: false, renewToken: true };
  switch (code) {
    case CloseCode.REPLACED:
      return { reconnect: false, reason: "replaced by a newer session of this user" };
    case CloseCode.KICKED:
      return { reconnect: false, reason: "disconnected by an operator" };
    case CloseCode.RESTART:
    case CloseCode.SLOW_CONSUMER:
      return { reconnect: true, immediate: true, renewToken: false };
    case CloseCode.TOKEN_EXPIRED:
      return { reconnect: true, immediate: true, renewToken: true };
    default:
      return { reconnect: true, immediate: false, renewToken: false };
  }
}

/**
 * The claims of a JWT, read without verifying it (the gateway verifies); null if unreadable.
 * Used for the user id (storage key) and the expiry (renew before connecting).
 * @param {string} token
 * @returns {{sub?: string, exp?: number, [claim: string]: unknown} | null}
 */
export function tokenClaims(token) {
  try {
    const payload = token.split(".")[1].replace(/-/g, "+").replace(/_/g, "/");
    const claims = JSON.parse(atob(payload));
    return claims && typeof claims === "object" ? claims : null;
  } catch {
    return null;
  }
}

/**
 * Whether a token's `topics` claim allows `topic`, as the gateway checks it: an entry ending in `*`
 * allows every topic it starts, any other that topic alone.
 * @param {unknown[]} claim
 * @param {string} topic
 */
export function topicAllowed(claim, topic) {
  return claim.some((entry) =>
    typeof entry === "string" && (entry.endsWith("*") ? topic.startsWith(entry.slice(0, -1)) : entry === topic),
  );
}

/**
 * The storage key of the last handled seq of one user on one device.
 * @param {string} user
 * @param {string} device
 */
export function storageKey(user, device) {
  return `herald:${user}:${device}:seq`;
}

/**
 * The storage key of the epoch of the stream that seq belongs to (the `welcome`'s `epoch`).
 * @param {string} user
 * @param {string} device
 */
export function epochKey(user, device) {
  return `herald:${user}:${device}:epoch`;
}

// ---------------------------------------------------------------------------------------------
// Small parts with state
// ---------------------------------------------------------------------------------------------

/**
 * @typedef {object} BackoffOptions
 * @property {number} [base=500]    first delay in ms
 * @property {number} [max=30000]   cap in ms
 * @property {number} [factor=2]    growth per attempt
 * @property {number} [jitter=0.5]  0..1: each delay is drawn from [d·(1−jitter), d]
 */

/** Exponential backoff with jitter, bounded by `max`; `reset()` after a successful connection. */
export class Backoff {
  /**
   * @param {BackoffOptions} [options]
   * @param {() => number} [random]  returns [0, 1); injected by tests
   */
  constructor({ base = 500, max = 30000, factor = 2, jitter = 0.5 } = {}, random = Math.random) {
    if (!(base > 0 && max >= base && factor >= 1 && jitter >= 0 && jitter <= 1)) {
      throw new RangeError("Backoff: need 0 < base <= max, factor >= 1, 0 <= jitter <= 1");
    }
    Object.assign(this, { base, max, factor, jitter });
    this.random = random;
    /** Attempts since the last reset. */
    this.attempt = 0;
  }

  /** The delay before the next attempt, in ms. */
  next() {
    const ceiling = Math.min(this.max, this.base * this.factor ** this.attempt);
    this.attempt += 1;
    return Math.round(ceiling * (1 - this.jitter * this.random()));
  }

  reset() {
    this.attempt = 0;
  }
}

/**
 * Drops duplicate messages by `seq`. The connection delivers in increasing `seq`, so anything at
 * or below the last accepted seq is a duplicate, except inside a topic replay block (opened by
 * `sub` with `since`, closed by `replayed` with that `topic`), whose messages may be older: those
 * are checked against a bounded set of recently accepted seqs instead.
 */
export class SeqFilter {
  /** @param {{last?: number|null, remember?: number}} [options] */
  constructor({ last = null, remember = 1000 } = {}) {
    /** The highest accepted seq (the resume point), or null before the first. @type {number|null} */
    this.last = last;
    this.remember = remember;
    /** @type {Set<number>} recently accepted seqs, oldest first */
    this.recent = new Set();
    /** @type {Set<string>} topics with an open replay block */
    this.blocks = new Set();
  }

  /**
   * @param {{seq: number, to: string}} msg
   * @returns {boolean} true when the message is new and must be handled
   */
  accept(msg) {
    if (this.last === null || msg.seq > this.last) {
      this.last = msg.seq;
      this.#remember(msg.seq);
      return true;
    }
    if (!this.#inBlock(msg.to) || this.recent.has(msg.seq)) return false;
    this.#remember(msg.seq);
    return true;
  }

  /**
   * Starts over at `last`: the stream was made again and its sequence started over, so seqs at
   * or below the old resume point are new messages.
   * @param {number} last
   */
  restart(last) {
    this.last = last;
    this.recent.clear();
  }

  /** @param {string} topic */
  openBlock(topic) {
    this.blocks.add(topic);
  }

  /** @param {string} topic */
  closeBlock(topic) {
    this.blocks.delete(topic);
  }

  /** @param {string} to */
  #inBlock(to) {
    return to.startsWith("topic:") && this.blocks.has(to.slice("topic:".length));
  }

  /** @param {number} seq */
  #remember(seq) {
    this.recent.add(seq);
    if (this.recent.size > this.remember) {
      this.recent.delete(/** @type {number} */ (this.recent.values().next().value));
    }
  }
}

/**
 * @typedef {object} Timers
 * @property {(callback: () => void, ms: number) => any} setTimeout
 * @property {(handle: any) => void} clearTimeout
 * @property {() => number} now  milliseconds
 */

/** The soonest a token refresh is scheduled (a clock far off, a token about to expire). */
const MIN_REFRESH_DELAY = 5000;
/** The longest delay `setTimeout` keeps (a longer one fires at once). */
const MAX_TIMER_DELAY = 2 ** 31 - 1;

/** @returns {Timers} the global timers and clock */
function globalTimers() {
  return {
    setTimeout: (callback, ms) => globalThis.setTimeout(callback, ms),
    clearTimeout: (handle) => globalThis.clearTimeout(handle),
    now: () => Date.now(),
  };
}

/** @returns {PageLike|null} the window when running in a browser (it has a `document`), else null */
function browserPage() {
  const page = /** @type {any} */ (globalThis);
  return page.document && typeof page.addEventListener === "function" ? page : null;
}

/**
 * Acks handled messages in batches: one `ack` with the highest handled seq at most every
 * `delay` ms, or at once after `max` handled messages.
 */
export class AckBatcher {
  /**
   * @param {object} options
   * @param {(seq: number) => boolean} options.send  sends an ack; false when it could not
   * @param {Timers} options.timers
   * @param {number} [options.delay=1000]
   * @param {number} [options.max=100]
   */
  constructor({ send, timers, delay = 1000, max = 100 }) {
    Object.assign(this, { send, timers, delay, max });
    /** The highest handled seq. */
    this.highest = 0;
    /** The highest seq sent in an ack. */
    this.acked = 0;
    /** Handled messages since the last flush. */
    this.count = 0;
    /** @type {any} */
    this.timer = null;
  }

  /** @param {number} seq  a message was handled */
  handled(seq) {
    this.highest = Math.max(this.highest, seq);
    this.count += 1;
    if (this.count >= this.max) this.flush();
    else if (this.timer === null) this.timer = this.timers.setTimeout(() => this.flush(), this.delay);
  }

  /** Sends the pending ack now, if any; one that cannot be sent stays pending for the next flush. */
  flush() {
    this.cancel();
    this.count = 0;
    if (this.highest > this.acked && this.send(this.highest)) this.acked = this.highest;
  }

  /** Forgets what was handled and acked: the stream's sequence started over. */
  restart() {
    this.cancel();
    Object.assign(this, { highest: 0, acked: 0, count: 0 });
  }

  /** Stops the timer; what is pending stays pending. */
  cancel() {
    if (this.timer !== null) this.timers.clearTimeout(this.timer);
    this.timer = null;
  }
}

/**
 * Detects a dead connection. Browsers cannot see the gateway's WebSocket pings, so after one
 * heartbeat of silence this sends a `ping` frame, and declares the connection dead if nothing at
 * all arrives within `timeout`.
 */
export class Liveness {
  /**
   * @param {object} options
   * @param {Timers} options.timers
   * @param {() => void} options.ping   sends `{"type":"ping"}`
   * @param {() => void} options.dead   called once when the connection is considered dead
   * @param {number} [options.timeout=10000]  ms to wait for any frame after a ping
   */
  constructor({ timers, ping, dead, timeout = 10000 }) {
    Object.assign(this, { timers, ping, dead, timeout });
    this.interval = 0;
    this.lastHeard = 0;
    this.waiting = false;
    /** @type {any} */
    this.timer = null;
  }

  /** @param {number} interval  ms of silence before a ping (the heartbeat); 0 disables */
  start(interval) {
    this.stop();
    this.interval = interval;
    if (interval > 0) {
      this.heard();
      this.#arm(interval);
    }
  }

  /** Any frame arrived. */
  heard() {
    this.lastHeard = this.timers.now();
    this.waiting = false;
  }

  stop() {
    if (this.timer !== null) this.timers.clearTimeout(this.timer);
    this.timer = null;
    this.waiting = false;
  }

  /** @param {number} ms */
  #arm(ms) {
    this.timer = this.timers.setTimeout(() => this.#check(), ms);
  }

  #check() {
    this.timer = null;
    if (this.waiting) {
      this.waiting = false;
      this.dead();
      return;
    }
    const silent = this.timers.now() - this.lastHeard;
    if (silent < this.interval) {
      this.#arm(this.interval - silent);
      return;
    }
    this.waiting = true;
    this.ping();
    this.#arm(this.timeout);
  }
}

// ---------------------------------------------------------------------------------------------
// The client
// ---------------------------------------------------------------------------------------------

/**
 * A token, or a function returning one (sync or async). The function is called for the first
 * connection and again whenever the token may be bad or expired: after close 4001, after a socket
 * that closed before it opened (a refused upgrade looks like that in a browser), and when the
 * token's `exp` has passed.
 * @typedef {string | (() => string | Promise<string>)} TokenSource
 */

/**
 * @typedef {object} HeraldOptions
 * @property {TokenSource} token
 * @property {string} [url="/ws"]          the gateway's WebSocket endpoint; a path is resolved against the page
 * @property {string} [device]             this device's stable id (the gateway's default: `default`)
 * @property {string} [user]               the user id for the storage key (default: the token's `sub`)
 * @property {string[]} [topics]           topics to join with the first connection (`topics` parameter)
 * @property {number} [since]              resume point for the first connection (default: storage, else the gateway's cursor)
 * @property {Pick<Storage, "getItem"|"setItem">|null} [storage]  e.g. `localStorage`: keeps the last seq across page loads
 * @property {BackoffOptions} [backoff]
 * @property {number} [repeatWindow=30000]  ms: a close asking for an immediate reconnect (1012, 4001,
 *   4008) that ends a connection younger than this, which itself followed such a close, is retried
 *   with backoff instead (a persistently slow client must not loop)
 * @property {{delay?: number, max?: number}} [ack]  ack at most every `delay` ms (1000) or `max` messages (100)
 * @property {number} [pingTimeout=10000]  ms to wait for any frame after a liveness ping
 * @property {number} [connectTimeout=20000]  ms from opening a socket to its `welcome` before it is
 *   given up and tried again (a gateway that accepts the TCP connection but never answers)
 * @property {number} [rpcTimeout=10000]   default rpc timeout in ms
 * @property {number} [dedupeWindow=1000]  how many recent seqs are remembered for topic replay blocks
 * @property {new (url: string) => WebSocketLike} [WebSocket]  default: the global WebSocket
 * @property {Timers} [timers]             default: the global timers and `Date.now`
 * @property {() => number} [random]       default: `Math.random` (backoff jitter)
 * @property {PageLike|null} [page]        where to hear `pagehide` and `visibilitychange` (the resume
 *   point is written to `storage` then) and `online` (a reconnect waiting out its delay starts at
 *   once); default: the window in a browser, none elsewhere
 */

/**
 * What the client needs of the page (the browser's `window`).
 * @typedef {object} PageLike
 * @property {(type: string, listener: (event: Event) => void) => void} addEventListener
 * @property {(type: string, listener: (event: Event) => void) => void} removeEventListener
 * @property {{visibilityState?: string, addEventListener: PageLike["addEventListener"],
 *   removeEventListener: PageLike["removeEventListener"]}} [document]  `visibilitychange` is heard here
 */

/**
 * What the client needs of a WebSocket.
 * @typedef {object} WebSocketLike
 * @property {number} readyState
 * @property {(data: string) => void} send
 * @property {(code?: number, reason?: string) => void} close
 * @property {((event: any) => void) | null} onopen
 * @property {((event: {data: any}) => void) | null} onmessage
 * @property {((event: {code: number, reason: string}) => void) | null} onclose
 * @property {((event: any) => void) | null} onerror
 */

/**
 * @typedef {object} Call  an rpc waiting for its result
 * @property {object} frame
 * @property {(data: any) => void} resolve
 * @property {(error: HeraldError) => void} reject
 * @property {boolean} sent
 * @property {any} timer
 */

const OPEN = 1;

/** An event whose `detail` carries the frame or the state (like `CustomEvent`). */
export class HeraldEvent extends Event {
  /**
   * @param {string} type
   * @param {any} detail
   */
  constructor(type, detail) {
    super(type);
    this.detail = detail;
  }
}

/**
 * A connection to a Herald gateway that survives disconnects: it reconnects with backoff,
 * resumes from the last handled `seq`, drops duplicates, acks in batches, rejoins its topics.
 *
 * Events (each a {@link HeraldEvent}; `on()` passes the detail directly):
 * - `message`: a {@link MsgFrame}, once per `seq`. It counts as handled (acked, resume point) when
 *   the listeners return.
 * - `replayed`: a {@link ReplayedFrame}; `complete: false` means reload state from your backend.
 * - `state`: a {@link StateDetail}: `connecting`, `open`, `reconnecting`, `closed`.
 * - `error`: `{code, message, topic?}` from an `error` frame, or client-side trouble (`token_failed`,
 *   `bad_frame`, `connect_failed`, `connect_refused`). `topic` is the best guess of the `subscribe` it answers.
 * - `welcome`: the {@link WelcomeFrame} of each connection.
 * - `subscribed`, `unsubscribed`: `{topic}`.
 */
export class Herald extends EventTarget {
  /** @type {Required<Pick<HeraldOptions, "url"|"pingTimeout"|"connectTimeout"|"rpcTimeout"|"repeatWindow">> & HeraldOptions} */
  #options;
  /** @type {Timers} */
  #timers;
  #backoff;
  /** Backoff of immediate closes (1012, 4001, 4008) that repeat quickly; not reset by `welcome`. */
  #repeatBackoff;
  #filter;
  /** The `epoch` of the stream the resume point belongs to, if known. @type {string|null} */
  #epoch = null;
  /** The epoch the current connection was asked to resume in (sent with `since`). @type {string|null} */
  #epochSent = null;
  #acks;
  #liveness;

  /** @type {StateDetail["state"]} */
  #state = "closed";
  /** True after `close()` or a close that must not be retried. */
  #stopped = true;
  /** @type {WebSocketLike|null} */
  #socket = null;
  /** Whether the current socket fired `open` (a close before that may be an auth refusal). */
  #opened = false;
  /** @type {WelcomeFrame|null} */
  #session = null;
  /** User and device of the last welcome: the storage key, also while disconnected. */
  #identity = { user: /** @type {string|undefined} */ (undefined), device: /** @type {string|undefined} */ (undefined) };
  /** @type {any} */
  #retryTimer = null;
  /** `timers.now()` when the current connection's `welcome` arrived, or null. @type {number|null} */
  #welcomedAt = null;
  /** Gives up a socket that brought no `welcome` within `connectTimeout`. */
  #connectTimer = null;
  /** Renews the connection's token before it expires (`refresh`), when a token function gives one. */
  #refreshTimer = null;
  /** Whether the last connection that opened ended with a close asking for an immediate reconnect. */
  #lastCloseImmediate = false;
  /** Sockets in a row that closed before they opened (refused upgrades, unreachable gateway). */
  #refused = 0;
  /** The delay of the scheduled attempt, ms. */
  #retryDelay = 0;
  /** @type {PageLike|null} */
  #page;

  /** @type {string|null} the token of the last attempt */
  #token = null;
  #renewToken = true;

  /**
   * Topics this client wants: `confirmed` once the gateway said `subscribed` (or they were in
   * the URL), `since` while their replay block has not ended.
   * @type {Map<string, {confirmed: boolean, since?: number}>}
   */
  #topics = new Map();
  /** Topics in the URL of the current connection (the gateway joined them at connect). */
  #urlTopics = new Set();
  /** `sub` frames sent on this connection and not answered yet, oldest first. @type {string[]} */
  #awaitingSub = [];

  /** @type {Map<string, Call>} */
  #calls = new Map();
  #nextCall = 0;

  /** @type {InboxState} */
  #inbox = { read: 0, unread: 0 };
  /** The highest personal seq handled. */
  #lastPersonal = 0;
  /** A read position to send once connected (`markRead` while offline). */
  #pendingRead = 0;

  /** @param {HeraldOptions} options */
  constructor(options) {
    super();
    if (!options || (typeof options.token !== "string" && typeof options.token !== "function")) {
      throw new TypeError("Herald: options.token must be a token or a function returning one");
    }
    this.#options = {
      ...options,
      url: options.url ?? "/ws",
      pingTimeout: options.pingTimeout ?? 10000,
      connectTimeout: options.connectTimeout ?? 20000,
      rpcTimeout: options.rpcTimeout ?? 10000,
      repeatWindow: options.repeatWindow ?? 30000,
    };
    this.#timers = options.timers ?? globalTimers();
    this.#backoff = new Backoff(options.backoff, options.random);
    this.#repeatBackoff = new Backoff(options.backoff, options.random);
    this.#page = options.page !== undefined ? options.page : browserPage();
    this.#filter = new SeqFilter({ last: options.since ?? null, remember: options.dedupeWindow });
    this.#acks = new AckBatcher({ ...options.ack, timers: this.#timers, send: (seq) => this.#sendAck(seq) });
    this.#liveness = new Liveness({
      timers: this.#timers,
      timeout: this.#options.pingTimeout,
      ping: () => this.#send({ type: "ping" }),
      dead: () => this.#dropDeadSocket(),
    });
    // Joined with `sub` frames after the first `welcome`, not in its URL: a topic the token does not
    // allow then gets an `error` naming it instead of refusing every connection.
    for (const topic of options.topics ?? []) this.#topics.set(topic, { confirmed: false });
  }

  /** `connecting`, `open`, `reconnecting` or `closed`. */
  get state() {
    return this.#state;
  }

  /** The highest handled seq (what the next connection resumes from), or null. */
  get lastSeq() {
    return this.#filter.last;
  }

  /** The `welcome` of the current connection, or null while not open. */
  get session() {
    return this.#state === "open" ? this.#session : null;
  }

  /** The user's read position and unread count, as of the last `welcome`, `read` or personal message. */
  get inbox() {
    return { ...this.#inbox };
  }

  /**
   * Marks the user's personal messages up to `seq` (default: the last one handled) read, on every
   * device: the gateway moves the read position (never back) and tells the user's other sockets.
   * @param {number} [seq]
   */
  markRead(seq = this.#lastPersonal) {
    if (!(seq > this.#inbox.read)) return;
    this.#pendingRead = Math.max(this.#pendingRead, seq);
    if (this.#send({ type: "read", seq })) this.#pendingRead = 0;
  }

  /** The topics this client is subscribed to (or subscribing to). */
  get topics() {
    return [...this.#topics.keys()];
  }

  /**
   * Starts connecting (and keeps reconnecting until `close()` or a final close code).
   * @returns {this}
   */
  connect() {
    if (!this.#stopped) return this;
    this.#stopped = false;
    this.#backoff.reset();
    this.#repeatBackoff.reset();
    this.#lastCloseImmediate = false;
    this.#refused = 0;
    this.#listenToPage(true);
    this.#setState({ state: "connecting" });
    this.#attempt();
    return this;
  }

  /**
   * Closes the connection: sends the pending ack, closes the socket, rejects pending rpcs, and
   * stops reconnecting. The topics and the resume point stay: a later `connect()` rejoins them.
   */
  disconnect() {
    this.close();
  }

  /** Same as `disconnect()`: closes until the next `connect()`, keeping topics and resume point. */
  close() {
    if (this.#stopped) return;
    const socket = this.#socket;
    this.#acks.flush();
    this.#rejectCalls("closed", "closed by the client");
    this.#dropConnection();
    socket?.close(CloseCode.NORMAL, "client closed");
    this.#stop(CloseCode.NORMAL, "closed by the client");
  }

  /**
   * Joins a topic, now and after every reconnect. With `since`, the gateway first replays the
   * topic's stored messages after that seq (they may be older than ones already received; they
   * are delivered anyway, once each), ending with a `replayed` event carrying `topic`.
   * @param {string} topic
   * @param {{since?: number}} [options]
   */
  subscribe(topic, { since } = {}) {
    this.#topics.set(topic, { confirmed: false, since });
    if (this.#state === "open") this.#sendSub(topic, since);
  }

  /**
   * Leaves a topic.
   * @param {string} topic
   */
  unsubscribe(topic) {
    if (!this.#topics.delete(topic)) return;
    this.#filter.closeBlock(topic);
    this.#awaitingSub = this.#awaitingSub.filter((t) => t !== topic);
    if (this.#state === "open") this.#send({ type: "unsub", topic });
  }

  /**
   * Calls the push function `fn` (NATS `herald.fn.<fn>`). A call made while not connected waits
   * for the connection (its timeout runs meanwhile).
   * @param {string} fn       e.g. `prefs.get`
   * @param {any} [data]      JSON body for the function
   * @param {{timeout?: number}} [options]  ms; default `rpcTimeout`
   * @returns {Promise<any>}  the function's reply; rejects with a {@link HeraldError}: the
   *   gateway's code (`no_function`, `timeout`, `function_error`, `bad_request`, `rate_limited`),
   *   `timeout` (no result in time), `disconnected` (sent, then the connection dropped: it may
   *   or may not have run), or `closed`.
   */
  rpc(fn, data = null, { timeout = this.#options.rpcTimeout } = {}) {
    if (this.#stopped) return Promise.reject(new HeraldError("closed", "the client is closed"));
    return new Promise((resolve, reject) => {
      const id = `c${++this.#nextCall}`;
      /** @type {Call} */
      const call = { frame: { type: "rpc", id, fn, data }, resolve, reject, sent: false, timer: null };
      call.timer = this.#timers.setTimeout(
        () => this.#settle(id, new HeraldError("timeout", `rpc ${fn}: no result within ${timeout} ms`)),
        timeout,
      );
      this.#calls.set(id, call);
      if (this.#state === "open") this.#sendCall(call);
    });
  }

  /**
   * Listens to an event and passes its detail; returns a function that removes the listener.
   * @param {"message"|"replayed"|"state"|"error"|"welcome"|"subscribed"|"unsubscribed"|"read"|"inbox"} type
   * @param {(detail: any) => void} listener
   * @returns {() => void}
   */
  on(type, listener) {
    /** @param {Event} event */
    const handler = (event) => listener(/** @type {HeraldEvent} */ (event).detail);
    this.addEventListener(type, handler);
    return () => this.removeEventListener(type, handler);
  }

  // --- connecting ---------------------------------------------------------------------------

  async #attempt() {
    this.#retryTimer = null;
    let token;
    try {
      token = await this.#currentToken();
    } catch (error) {
      if (this.#stopped) return;
      this.#emit("error", { code: "token_failed", message: String(/** @type {any} */ (error)?.message ?? error) });
      this.#retry(this.#backoff);
      return;
    }
    if (this.#stopped || this.#socket !== null || this.#retryTimer !== null) return;
    this.#open(token);
  }

  /** @param {string} token */
  #open(token) {
    const claims = tokenClaims(token);
    if (this.#filter.last === null) this.#loadSeq(this.#options.user ?? claims?.sub);
    this.#urlTopics = this.#topicsForUrl(claims);
    this.#epochSent = this.#filter.last !== null ? this.#epoch : null;
    const url = buildUrl(this.#options.url, {
      token,
      since: this.#filter.last,
      epoch: this.#epochSent,
      device: this.#options.device,
      topics: [...this.#urlTopics],
    });
    const WebSocketClass = this.#options.WebSocket ?? globalThis.WebSocket;
    let socket;
    try {
      socket = new WebSocketClass(url);
    } catch (error) {
      this.#emit("error", { code: "connect_failed", message: String(/** @type {any} */ (error)?.message ?? error) });
      this.#retry(this.#backoff);
      return;
    }
    this.#socket = socket;
    this.#opened = false;
    this.#connectTimer = this.#timers.setTimeout(() => {
      this.#connectTimer = null;
      if (socket === this.#socket && this.#session === null) this.#dropDeadSocket("no welcome in time");
    }, this.#options.connectTimeout);
    socket.onopen = () => {
      if (socket === this.#socket) this.#opened = true;
    };
    socket.onmessage = (event) => {
      if (socket === this.#socket) this.#receive(event.data);
    };
    socket.onclose = (event) => {
      if (socket === this.#socket) this.#closed(event.code, event.reason);
    };
    socket.onerror = () => {}; // a close event follows
  }

  /**
   * Topics the gateway accepted before, whose replay (if any) is over, and that the token still
   * allows (its `topics` claim, when it can be read): they join with the connection, covered by its
   * `since`. The others go as `sub` frames after `welcome`, so a forbidden one gets an `error` frame
   * instead of refusing the whole connection (HTTP 403) for as long as the client keeps it.
   * @param {{topics?: unknown} | null} claims  the token's
   */
  #topicsForUrl(claims) {
    const allowed = claims === null ? null : Array.isArray(claims.topics) ? claims.topics : [];
    const topics = new Set();
    for (const [topic, wanted] of this.#topics) {
      if (wanted.confirmed && wanted.since === undefined && (allowed === null || topicAllowed(allowed, topic))) {
        topics.add(topic);
      }
    }
    return topics;
  }

  /** @returns {Promise<string>} */
  async #currentToken() {
    const source = this.#options.token;
    if (typeof source === "string") return (this.#token = source);
    if (this.#token === null || this.#renewToken || this.#expired(this.#token)) {
      const token = await source();
      if (typeof token !== "string" || token === "") throw new Error("the token function returned no token");
      this.#token = token;
      this.#renewToken = false;
    }
    return this.#token;
  }

  /** @param {string} token */
  #expired(token) {
    const exp = tokenClaims(token)?.exp;
    return typeof exp === "number" && exp * 1000 <= Date.now();
  }

  /**
   * @param {number} code
   * @param {string} reason
   */
  #closed(code, reason) {
    const opened = this.#opened;
    const lifetime = this.#welcomedAt === null ? 0 : this.#timers.now() - this.#welcomedAt;
    this.#dropConnection();
    const decision = closePolicy(code, opened);
    if (!decision.reconnect) {
      this.#stop(code, reason || decision.reason);
      return;
    }
    if (decision.renewToken) {
      if (opened && typeof this.#options.token === "string") {
        this.#stop(code, "the token expired and there is no token function to renew it");
        return;
      }
      this.#renewToken = true;
    }
    if (!opened) {
      this.#refusedAgain(code, reason);
      return;
    }
    this.#refused = 0;
    if (!decision.immediate) {
      this.#lastCloseImmediate = false;
      this.#retry(this.#backoff, code, reason);
      return;
    }
    // At once, unless the connection before this one ended the same way and this one did not last:
    // then the cause is persistent (a client too slow for its stream, a token that keeps expiring)
    // and reconnecting at once would loop. `welcome` does not reset this backoff.
    const repeated = this.#lastCloseImmediate && lifetime < this.#options.repeatWindow;
    this.#lastCloseImmediate = true;
    if (!repeated) this.#repeatBackoff.reset();
    this.#retry(repeated ? this.#repeatBackoff : null, code, reason);
  }

  /**
   * A socket closed before it opened. A browser cannot tell why (the gateway down, or the upgrade
   * refused: 401 bad token, 403 topic outside the claim, 503 unavailable, ...), so the next
   * attempt renews the token, always after a backoff delay. A refusal that survives a renewal is
   * reported as an `error` (`connect_refused`) and the client keeps backing off (bounded by `max`).
   * @param {number} code
   * @param {string} reason
   */
  #refusedAgain(code, reason) {
    this.#refused += 1;
    this.#retry(this.#backoff, code, reason);
    if (this.#refused < 2) return;
    const renewal = typeof this.#options.token === "string" ? "the fixed token" : "a renewed token";
    this.#emit("error", {
      code: "connect_refused",
      message:
        `the connection was refused ${this.#refused} times in a row, also with ${renewal} ` +
        `(the gateway is unreachable, or it refused the token (401), a topic (403) or is unavailable (503)); ` +
        `retrying in ${this.#retryDelay} ms`,
    });
  }

  /** @param {string} [reason] */
  #dropDeadSocket(reason = "no answer to ping") {
    const socket = this.#socket;
    this.#dropConnection();
    socket?.close(CloseCode.DEAD, reason);
    this.#lastCloseImmediate = false;
    this.#retry(this.#backoff, CloseCode.DEAD, reason);
  }

  /**
   * Schedules the next attempt.
   * @param {Backoff|null} backoff  where the delay comes from; null: at once
   * @param {number} [code]
   * @param {string} [reason]
   */
  #retry(backoff, code, reason) {
    const delay = backoff ? backoff.next() : 0;
    this.#retryDelay = delay;
    this.#setState({ state: "reconnecting", code, reason, delay, attempt: (backoff ?? this.#backoff).attempt });
    this.#retryTimer = this.#timers.setTimeout(() => this.#attempt(), delay);
  }

  /**
   * Forgets the current socket and everything tied to it. The pending ack is saved (storage)
   * and sent on the next connection; rpcs not sent yet wait for it too.
   */
  #dropConnection() {
    const socket = this.#socket;
    if (socket) socket.onopen = socket.onmessage = socket.onclose = socket.onerror = null;
    this.#socket = null;
    if (this.#connectTimer !== null) this.#timers.clearTimeout(this.#connectTimer);
    this.#connectTimer = null;
    if (this.#refreshTimer !== null) this.#timers.clearTimeout(this.#refreshTimer);
    this.#refreshTimer = null;
    this.#session = null;
    this.#welcomedAt = null;
    this.#liveness.stop();
    this.#acks.flush(); // the socket is gone: this only saves the seq, the ack waits
    this.#awaitingSub = [];
    this.#filter.blocks.clear();
    for (const [id, call] of this.#calls) {
      if (call.sent) this.#settle(id, new HeraldError("disconnected", "the connection dropped before the result"));
    }
  }

  /**
   * @param {number} code
   * @param {string} reason
   */
  #stop(code, reason) {
    this.#stopped = true;
    this.#listenToPage(false);
    if (this.#retryTimer !== null) this.#timers.clearTimeout(this.#retryTimer);
    this.#retryTimer = null;
    this.#rejectCalls("closed", reason);
    this.#setState({ state: "closed", code, reason });
  }

  // --- receiving ----------------------------------------------------------------------------

  /** @param {unknown} text */
  #receive(text) {
    this.#liveness.heard();
    let frame;
    try {
      frame = JSON.parse(String(text));
    } catch {
      this.#emit("error", { code: "bad_frame", message: "a frame that is not JSON" });
      return;
    }
    switch (frame?.type) {
      case "welcome":
        return this.#welcome(frame);
      case "msg":
        return this.#message(frame);
      case "replayed":
        return this.#replayed(frame);
      case "subscribed":
        return this.#subscribed(frame.topic);
      case "unsubscribed":
        return this.#emit("unsubscribed", { topic: frame.topic });
      case "rpc_result":
        return this.#rpcResult(frame);
      case "read":
        this.#emit("read", frame);
        return this.#setInbox(frame.seq, frame.unread);
      case "refreshed":
        return this.#scheduleRefresh(typeof frame.ttl === "number" ? frame.ttl * 1000 : undefined);
      case "error":
        return this.#serverError(frame);
      default:
        return; // pong, and frame types newer than this client
    }
  }

  /**
   * Forgets every position of the old stream: the resume point, the pending ack, a pending read
   * and the topics' `since` (each would name other messages of the new one).
   * @param {number} seq  the new stream's end
   */
  #restartPositions(seq) {
    this.#filter.restart(seq);
    this.#acks.restart();
    this.#saveSeq(seq);
    this.#pendingRead = 0;
    this.#lastPersonal = 0;
    for (const wanted of this.#topics.values()) delete wanted.since;
  }

  /** @param {WelcomeFrame} frame */
  #welcome(frame) {
    this.#session = frame;
    this.#identity = { user: frame.user, device: frame.device };
    this.#welcomedAt = this.#timers.now();
    if (this.#connectTimer !== null) this.#timers.clearTimeout(this.#connectTimer);
    this.#connectTimer = null;
    this.#refused = 0;
    this.#backoff.reset();
    this.#liveness.start((frame.heartbeat ?? 0) * 1000);
    const otherEpoch = Boolean(this.#epochSent && frame.epoch && frame.epoch !== this.#epochSent);
    if (this.#filter.last !== null && (frame.seq < this.#filter.last || otherEpoch)) {
      // The resume point is of a stream since made again, whose sequence started over: the
      // gateway resumed from its end (its `replayed` says `complete:false`), and so does the
      // client, however low the new seqs.
      this.#restartPositions(frame.seq);
    }
    this.#epoch = frame.epoch ?? null;
    this.#saveEpoch();
    for (const [topic, wanted] of this.#topics) {
      // From the welcome at the latest: nothing of the topic is missed between the two.
      if (!this.#urlTopics.has(topic)) this.#sendSub(topic, wanted.since ?? this.#filter.last ?? frame.seq);
    }
    this.#setState({ state: "open" });
    this.#emit("welcome", frame);
    this.#setInbox(frame.read ?? 0, frame.unread ?? 0);
    if (this.#pendingRead > this.#inbox.read) this.markRead(this.#pendingRead);
    for (const call of this.#calls.values()) if (!call.sent) this.#sendCall(call);
    this.#acks.flush();
    const exp = tokenClaims(this.#token ?? "")?.exp;
    if (typeof exp === "number") this.#scheduleRefresh(exp * 1000 - this.#timers.now());
  }

  /**
   * With a token function, hands the connection a new token before the one it has expires, `left`
   * ms from now (from the token's `exp` by this clock at first, then from the gateway's `ttl`):
   * 90 s before (a hidden tab's timers may run a minute late), or halfway for a shorter life, never
   * sooner than 5 s from now. The gateway answers `refreshed`, and the connection goes on without
   * a reconnect or a replay. A refusal (an `error`), or a token function that gives the same token
   * again, changes nothing: the connection ends with 4001 and the client reconnects with a renewed
   * token, as without refresh.
   * @param {number} [left]
   */
  #scheduleRefresh(left) {
    if (this.#refreshTimer !== null) this.#timers.clearTimeout(this.#refreshTimer);
    this.#refreshTimer = null;
    if (typeof this.#options.token !== "function" || typeof left !== "number" || !Number.isFinite(left)) return;
    const delay = Math.min(Math.max(MIN_REFRESH_DELAY, left - Math.min(90000, left / 2)), MAX_TIMER_DELAY);
    const session = this.#session;
    this.#refreshTimer = this.#timers.setTimeout(async () => {
      this.#refreshTimer = null;
      const before = this.#token;
      this.#renewToken = true;
      let token;
      try {
        token = await this.#currentToken();
      } catch (error) {
        this.#emit("error", { code: "token_failed", message: String(/** @type {any} */ (error)?.message ?? error) });
        return;
      }
      if (token !== before && this.#session === session && session !== null) this.#send({ type: "refresh", token });
    }, delay);
  }

  /** @param {MsgFrame} frame */
  #message(frame) {
    if (typeof frame.seq !== "number" || !this.#filter.accept(frame)) return;
    frame.id ??= "";
    frame.kind ??= "";
    this.#emit("message", frame);
    if (frame.to === "user") this.#personal(frame.seq);
    this.#acks.handled(frame.seq);
  }

  /**
   * A personal message: counted as unread when it came after the `welcome` (the welcome's count
   * covers those before) and is above the read position.
   * @param {number} seq
   */
  #personal(seq) {
    this.#lastPersonal = Math.max(this.#lastPersonal, seq);
    if (seq > (this.#session?.seq ?? Infinity) && seq > this.#inbox.read) {
      this.#setInbox(this.#inbox.read, this.#inbox.unread + 1);
    }
  }

  /**
   * @param {number} read
   * @param {number} unread
   */
  #setInbox(read, unread) {
    this.#inbox = { read, unread };
    this.#emit("inbox", this.inbox);
  }

  /** @param {ReplayedFrame} frame */
  #replayed(frame) {
    if (frame.topic !== undefined) {
      this.#filter.closeBlock(frame.topic);
      const wanted = this.#topics.get(frame.topic);
      if (wanted) delete wanted.since;
    }
    this.#emit("replayed", frame);
  }

  /** @param {string} topic */
  #subscribed(topic) {
    this.#awaitingSub = this.#awaitingSub.filter((t) => t !== topic);
    const wanted = this.#topics.get(topic);
    if (wanted) wanted.confirmed = true;
    this.#emit("subscribed", { topic });
  }

  /** @param {{id: string, ok: boolean, data?: any, error?: {code?: string, message?: string}}} frame */
  #rpcResult(frame) {
    const call = this.#take(frame.id);
    if (!call) return; // timed out already
    if (frame.ok) {
      call.resolve(frame.data);
      return;
    }
    const { code = "rpc_failed", message = "the rpc failed" } = frame.error ?? {};
    call.reject(new HeraldError(code, message));
  }

  /**
   * An `error` frame. A refused `sub` (forbidden, bad_request) names its topic, which is given up;
   * one that failed otherwise (unavailable: the gateway is stopping) stays, to be joined again by
   * the next connection. An error naming no topic (a refused `refresh`, say, answered while a `sub`
   * waits its turn) concerns none.
   * @param {{code: string, message: string, topic?: string}} frame
   */
  #serverError({ code, message, topic }) {
    /** @type {{code: string, message: string, topic?: string}} */
    const detail = { code, message };
    if (typeof topic === "string" && this.#awaitingSub.includes(topic)) {
      this.#awaitingSub = this.#awaitingSub.filter((t) => t !== topic);
      if (code === "forbidden" || code === "bad_request") {
        this.#topics.delete(topic);
        this.#filter.closeBlock(topic);
      }
      detail.topic = topic;
    }
    this.#emit("error", detail);
  }

  // --- sending ------------------------------------------------------------------------------

  /**
   * @param {object} frame
   * @returns {boolean} whether it was sent
   */
  #send(frame) {
    const socket = this.#socket;
    if (!socket || socket.readyState !== OPEN) return false;
    socket.send(JSON.stringify(frame));
    return true;
  }

  /**
   * @param {string} topic
   * @param {number} [since]
   */
  #sendSub(topic, since) {
    if (!this.#send(since === undefined ? { type: "sub", topic } : { type: "sub", topic, since })) return;
    this.#awaitingSub.push(topic);
    if (since === undefined) return;
    // Until the topic's `replayed`, a reconnect asks for the same replay again.
    const wanted = this.#topics.get(topic);
    if (wanted) wanted.since = since;
    this.#filter.openBlock(topic);
  }

  /** @param {Call} call */
  #sendCall(call) {
    call.sent = this.#send(call.frame);
  }

  /** @param {number} seq */
  #sendAck(seq) {
    this.#saveSeq(seq);
    return this.#send({ type: "ack", seq });
  }

  /**
   * Removes a call from the pending ones and stops its timer.
   * @param {string} id
   */
  #take(id) {
    const call = this.#calls.get(id);
    if (call) {
      this.#timers.clearTimeout(call.timer);
      this.#calls.delete(id);
    }
    return call;
  }

  /**
   * Rejects every pending rpc.
   * @param {string} code
   * @param {string} message
   */
  #rejectCalls(code, message) {
    for (const id of [...this.#calls.keys()]) this.#settle(id, new HeraldError(code, message));
  }

  /**
   * Rejects a pending rpc.
   * @param {string} id
   * @param {HeraldError} error
   */
  #settle(id, error) {
    this.#take(id)?.reject(error);
  }

  // --- storage, state, events ---------------------------------------------------------------

  /**
   * The page is going away (`pagehide`) or was hidden (`visibilitychange`, hidden; a hidden page
   * may be killed without a `pagehide`): send the pending ack and write the resume point to
   * `storage` now rather than when the ack timer fires, so a reload does not show those messages
   * again.
   * @param {Event} event
   */
  #pageHidden = (event) => {
    if (event.type === "visibilitychange" && this.#page?.document?.visibilityState !== "hidden") return;
    this.#acks.flush(); // writes the seq to storage even when the ack cannot be sent
  };

  /**
   * The browser is back online (`online`): a reconnect waiting out its backoff delay is tried
   * now, as the network that failed the last attempts is likely back. The backoff is not reset:
   * if this attempt fails too, the next delay goes on growing.
   */
  #pageOnline = () => {
    if (this.#stopped || this.#retryTimer === null) return;
    this.#timers.clearTimeout(this.#retryTimer);
    this.#attempt();
  };

  /** @param {boolean} on  listen (from `connect()`) or stop listening (when stopped) */
  #listenToPage(on) {
    const page = this.#page;
    if (!page) return;
    const document = page.document ?? page;
    if (on) {
      page.addEventListener("pagehide", this.#pageHidden);
      page.addEventListener("online", this.#pageOnline);
      document.addEventListener("visibilitychange", this.#pageHidden);
    } else {
      page.removeEventListener("pagehide", this.#pageHidden);
      page.removeEventListener("online", this.#pageOnline);
      document.removeEventListener("visibilitychange", this.#pageHidden);
    }
  }

  /** @param {string|undefined} user */
  #loadSeq(user) {
    const storage = this.#options.storage;
    if (!storage || !user) return;
    const device = this.#options.device ?? "default";
    const stored = Number(storage.getItem(storageKey(user, device)));
    if (!Number.isSafeInteger(stored) || stored <= 0) return;
    this.#filter.last = stored;
    const epoch = storage.getItem(epochKey(user, device));
    this.#epoch = epoch && /^[0-9a-f]{1,16}$/.test(epoch) ? epoch : null;
  }

  /** @param {number} seq */
  #saveSeq(seq) {
    this.#store(storageKey, String(seq));
  }

  /** Empty when the gateway named none (an older one): a stale epoch must not go with a newer seq. */
  #saveEpoch() {
    this.#store(epochKey, this.#epoch ?? "");
  }

  /**
   * @param {(user: string, device: string) => string} key
   * @param {string} value
   */
  #store(key, value) {
    const storage = this.#options.storage;
    const user = this.#identity.user ?? this.#options.user ?? tokenClaims(this.#token ?? "")?.sub;
    if (!storage || !user) return;
    try {
      storage.setItem(key(user, this.#identity.device ?? this.#options.device ?? "default"), value);
    } catch {
      // storage full or denied: what is in memory still works
    }
  }

  /** @param {StateDetail} detail */
  #setState(detail) {
    this.#state = detail.state;
    for (const key of /** @type {(keyof StateDetail)[]} */ (Object.keys(detail))) {
      if (detail[key] === undefined) delete detail[key];
    }
    this.#emit("state", detail);
  }

  /**
   * @param {string} type
   * @param {any} detail
   */
  #emit(type, detail) {
    this.dispatchEvent(new HeraldEvent(type, detail));
  }
}
