// Builds a client wired to the fakes and records its events.
import { Herald } from "../herald.js";
import { FakeClock, FakeWebSocket, settle } from "./fakes.js";

const EVENTS = ["message", "replayed", "state", "error", "welcome", "subscribed", "unsubscribed", "read", "inbox"];

/**
 * @param {object} [options]  Herald options overriding the test defaults
 */
export function setup(options = {}) {
  FakeWebSocket.reset();
  const clock = new FakeClock();
  const client = new Herald({
    url: "ws://gateway.test/ws",
    token: "token-1",
    WebSocket: FakeWebSocket,
    timers: clock.timers,
    random: () => 0.5,
    ...options,
  });
  /** @type {[string, any][]} */
  const events = [];
  for (const type of EVENTS) client.on(type, (detail) => events.push([type, detail]));
  return {
    client,
    clock,
    events,
    /** Details of the events of one type. */
    of: (type) => events.filter(([t]) => t === type).map(([, detail]) => detail),
    /** The states the client went through. */
    states: () => events.filter(([t]) => t === "state").map(([, d]) => d.state),
  };
}

/** connect() and wait for the first socket; returns it. */
export async function connected(client) {
  client.connect();
  await settle();
  return FakeWebSocket.last;
}

export { FakeWebSocket, settle };
