// The pure parts: URL building, close-code policy, token claims, backoff, dedupe, ack batching, liveness.
import { test } from "node:test";
import assert from "node:assert/strict";
import { AckBatcher, Backoff, Liveness, SeqFilter, buildUrl, closePolicy, storageKey, tokenClaims } from "../herald.js";
import { FakeClock, fakeToken } from "../test-support/fakes.js";

test("buildUrl sets token, since, device and topics, and maps http(s) to ws(s)", () => {
  const url = new URL(buildUrl("https://example.com/ws", { token: "a.b.c", since: 12, device: "phone", topics: ["news", "a+b"] }));
  assert.equal(url.protocol, "wss:");
  assert.equal(url.searchParams.get("token"), "a.b.c");
  assert.equal(url.searchParams.get("since"), "12");
  assert.equal(url.searchParams.get("device"), "phone");
  assert.equal(url.searchParams.get("topics"), "news,a+b");
  assert.match(url.search, /a%2Bb/, "a + in a topic is escaped, not sent as a space");
});

test("buildUrl resolves a path against the page and leaves out what is unknown", () => {
  assert.equal(buildUrl("/ws", { token: "t", since: null, topics: [] }, "http://localhost:8080/index.html"), "ws://localhost:8080/ws?token=t");
  assert.equal(buildUrl("ws://h/ws", { token: "t", since: 0 }), "ws://h/ws?token=t&since=0");
});

test("closePolicy: 4009 and 4003 stop", () => {
  assert.equal(closePolicy(4009, true).reconnect, false);
  assert.equal(closePolicy(4003, true).reconnect, false);
});

test("closePolicy: 1012 and 4008 reconnect at once, 4001 at once with a new token", () => {
  assert.deepEqual(closePolicy(1012, true), { reconnect: true, immediate: true, renewToken: false });
  assert.deepEqual(closePolicy(4008, true), { reconnect: true, immediate: true, renewToken: false });
  assert.deepEqual(closePolicy(4001, true), { reconnect: true, immediate: true, renewToken: true });
});

test("closePolicy: 1001, 1011, 1013, 4029, 1006 and unknown codes back off", () => {
  for (const code of [1000, 1001, 1006, 1008, 1011, 1013, 4029, 4321]) {
    assert.deepEqual(closePolicy(code, true), { reconnect: true, immediate: false, renewToken: false }, `code ${code}`);
  }
});

test("closePolicy: closed before open may be a refused token: renew and back off", () => {
  assert.deepEqual(closePolicy(1006, false), { reconnect: true, immediate: false, renewToken: true });
});

test("tokenClaims reads a JWT payload and returns null for anything else", () => {
  assert.deepEqual(tokenClaims(fakeToken({ sub: "a@b", exp: 5 })), { sub: "a@b", exp: 5 });
  assert.equal(tokenClaims("not a jwt"), null);
  assert.equal(tokenClaims(""), null);
});

test("storageKey includes user and device", () => {
  assert.equal(storageKey("42", "phone"), "herald:42:phone:seq");
});

test("Backoff grows by factor, is capped at max, and jitter stays in [d(1-j), d]", () => {
  const top = new Backoff({ base: 100, max: 1000, factor: 2, jitter: 0.5 }, () => 0);
  assert.deepEqual([1, 2, 3, 4, 5, 6].map(() => top.next()), [100, 200, 400, 800, 1000, 1000]);
  const bottom = new Backoff({ base: 100, max: 1000, factor: 2, jitter: 0.5 }, () => 0.999999);
  assert.deepEqual([1, 2, 3, 4, 5].map(() => bottom.next()), [50, 100, 200, 400, 500]);
  const random = new Backoff({ base: 100, max: 1000, jitter: 0.3 });
  for (let i = 0; i < 200; i++) {
    const ceiling = Math.min(1000, 100 * 2 ** Math.min(i, 20));
    const delay = random.next();
    assert.ok(delay >= ceiling * 0.7 - 1 && delay <= ceiling, `attempt ${i}: ${delay} outside [${ceiling * 0.7}, ${ceiling}]`);
  }
});

test("Backoff.reset starts over from base", () => {
  const backoff = new Backoff({ base: 100, max: 1000, jitter: 0 });
  backoff.next();
  backoff.next();
  backoff.reset();
  assert.equal(backoff.next(), 100);
  assert.equal(backoff.attempt, 1);
});

test("Backoff refuses bad settings", () => {
  assert.throws(() => new Backoff({ base: 0 }), RangeError);
  assert.throws(() => new Backoff({ base: 100, max: 50 }), RangeError);
  assert.throws(() => new Backoff({ jitter: 2 }), RangeError);
});

test("SeqFilter drops seq at or below the last, keeps the last", () => {
  const filter = new SeqFilter();
  const seen = [3, 4, 4, 2, 5, 5, 7].filter((seq) => filter.accept({ seq, to: "user" }));
  assert.deepEqual(seen, [3, 4, 5, 7]);
  assert.equal(filter.last, 7);
});

test("SeqFilter starts from a resume point", () => {
  const filter = new SeqFilter({ last: 10 });
  assert.equal(filter.accept({ seq: 10, to: "user" }), false);
  assert.equal(filter.accept({ seq: 11, to: "user" }), true);
});

test("SeqFilter accepts older messages of a topic replay block once, and only for that topic", () => {
  const filter = new SeqFilter();
  for (const seq of [10, 20, 30]) filter.accept({ seq, to: "user" });
  filter.openBlock("news");
  assert.equal(filter.accept({ seq: 12, to: "topic:news" }), true);
  assert.equal(filter.accept({ seq: 12, to: "topic:news" }), false, "twice in the block");
  assert.equal(filter.accept({ seq: 20, to: "topic:news" }), false, "already seen");
  assert.equal(filter.accept({ seq: 15, to: "topic:sport" }), false, "not in a block");
  assert.equal(filter.accept({ seq: 16, to: "user" }), false, "not a topic message");
  assert.equal(filter.last, 30, "older messages do not move the resume point");
  filter.closeBlock("news");
  assert.equal(filter.accept({ seq: 13, to: "topic:news" }), false, "after the block ended");
});

test("SeqFilter remembers a bounded number of seqs", () => {
  const filter = new SeqFilter({ remember: 3 });
  for (const seq of [1, 2, 3, 4, 5]) filter.accept({ seq, to: "user" });
  assert.deepEqual([...filter.recent], [3, 4, 5]);
  filter.openBlock("t");
  assert.equal(filter.accept({ seq: 1, to: "topic:t" }), true, "forgotten, so accepted again");
});

function batcher(options = {}) {
  const clock = new FakeClock();
  const acks = [];
  let online = true;
  const batch = new AckBatcher({ timers: clock.timers, delay: 1000, max: 3, send: (seq) => online && acks.push(seq) > 0, ...options });
  return { clock, acks, batch, setOnline: (value) => (online = value) };
}

test("AckBatcher sends the highest handled seq after the delay, once", async () => {
  const { clock, acks, batch } = batcher();
  batch.handled(5);
  batch.handled(6);
  await clock.advance(999);
  assert.deepEqual(acks, []);
  await clock.advance(1);
  assert.deepEqual(acks, [6]);
  await clock.advance(5000);
  assert.deepEqual(acks, [6], "nothing new, nothing sent");
});

test("AckBatcher sends at once after max messages", () => {
  const { acks, batch } = batcher();
  batch.handled(1);
  batch.handled(2);
  assert.deepEqual(acks, []);
  batch.handled(3);
  assert.deepEqual(acks, [3]);
});

test("AckBatcher never acks lower than before (older topic replay messages)", () => {
  const { acks, batch } = batcher({ max: 1 });
  batch.handled(10);
  batch.handled(4);
  assert.deepEqual(acks, [10]);
});

test("AckBatcher keeps an ack it could not send for the next flush", () => {
  const { acks, batch, setOnline } = batcher({ max: 1 });
  setOnline(false);
  batch.handled(7);
  assert.deepEqual(acks, []);
  setOnline(true);
  batch.flush();
  assert.deepEqual(acks, [7]);
});

function liveness(timeout = 10_000) {
  const clock = new FakeClock();
  const calls = [];
  const live = new Liveness({ timers: clock.timers, timeout, ping: () => calls.push(`ping@${clock.now}`), dead: () => calls.push(`dead@${clock.now}`) });
  return { clock, calls, live };
}

test("Liveness pings after one heartbeat of silence and declares the connection dead after the timeout", async () => {
  const { clock, calls, live } = liveness();
  live.start(25_000);
  await clock.advance(25_000);
  assert.deepEqual(calls, ["ping@25000"]);
  await clock.advance(10_000);
  assert.deepEqual(calls, ["ping@25000", "dead@35000"]);
});

test("Liveness: traffic after the ping keeps the connection alive", async () => {
  const { clock, calls, live } = liveness();
  live.start(25_000);
  await clock.advance(25_000);
  await clock.advance(3_000);
  live.heard(); // the pong
  await clock.advance(20_000);
  assert.deepEqual(calls, ["ping@25000"]);
  await clock.advance(5_000); // 25 s after the pong
  assert.deepEqual(calls, ["ping@25000", "ping@53000"]);
});

test("Liveness: steady traffic means no pings", async () => {
  const { clock, calls, live } = liveness();
  live.start(25_000);
  for (let i = 0; i < 10; i++) {
    await clock.advance(10_000);
    live.heard();
  }
  assert.deepEqual(calls, []);
  live.stop();
  await clock.advance(100_000);
  assert.deepEqual(calls, [], "stopped");
});

test("Liveness with heartbeat 0 is off", async () => {
  const { clock, calls, live } = liveness();
  live.start(0);
  await clock.advance(1_000_000);
  assert.deepEqual(calls, []);
});
