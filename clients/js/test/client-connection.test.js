// Connecting, reconnecting with backoff, the close-code policy, token renewal, liveness.
import { test } from "node:test";
import assert from "node:assert/strict";
import { Herald } from "../herald.js";
import { FakeWebSocket, connected, settle, setup } from "../test-support/helpers.js";
import { FakePage, fakeToken } from "../test-support/fakes.js";

test("connects with the token and device; state connecting then open on welcome", async () => {
  const { client, states, of } = setup({ device: "phone" });
  const socket = await connected(client);
  assert.equal(socket.url.origin + socket.url.pathname, "ws://gateway.test/ws");
  assert.equal(socket.param("token"), "token-1");
  assert.equal(socket.param("device"), "phone");
  assert.equal(socket.param("since"), null, "nothing handled yet: the gateway's cursor decides");
  assert.deepEqual(states(), ["connecting"]);
  socket.open();
  assert.equal(client.state, "connecting", "open means welcome received");
  socket.welcome({ user: "42", heartbeat: 25 });
  assert.deepEqual(states(), ["connecting", "open"]);
  assert.equal(client.session.user, "42");
  assert.equal(of("welcome").length, 1);
});

test("options left undefined take their defaults", async () => {
  const { client } = setup({ url: undefined, rpcTimeout: undefined, pingTimeout: undefined, device: undefined });
  globalThis.location = /** @type {any} */ ({ href: "https://app.example/page" });
  try {
    const socket = await connected(client);
    assert.equal(socket.url.href, "wss://app.example/ws?token=token-1");
  } finally {
    delete globalThis.location;
  }
});

test("requires a token or a token function", () => {
  assert.throws(() => new Herald({}), TypeError);
  assert.throws(() => new Herald(/** @type {any} */ ({ token: 5 })), TypeError);
});

test("reconnects with growing backoff, resuming with since = last handled seq", async () => {
  const { client, clock, of } = setup({ backoff: { base: 100, max: 1000, jitter: 0 } });
  const first = await connected(client);
  first.welcome();
  first.msg(5);
  first.msg(6);
  first.serverClose(1011, "internal");
  assert.equal(client.state, "reconnecting");
  assert.deepEqual(of("state").at(-1), { state: "reconnecting", code: 1011, reason: "internal", delay: 100, attempt: 1 });
  await clock.advance(99);
  assert.equal(FakeWebSocket.all.length, 1, "not before the delay");
  await clock.advance(1);
  assert.equal(FakeWebSocket.all.length, 2);
  assert.equal(FakeWebSocket.last.param("since"), "6");
  FakeWebSocket.last.serverClose(1006); // refused before open
  assert.equal(of("state").at(-1).delay, 200);
  await clock.advance(200);
  FakeWebSocket.last.serverClose(1006);
  assert.equal(of("state").at(-1).delay, 400);
});

test("backoff starts over after a connection opened", async () => {
  const { client, clock, of } = setup({ backoff: { base: 100, max: 1000, jitter: 0 } });
  (await connected(client)).serverClose(1006);
  await clock.advance(100);
  FakeWebSocket.last.serverClose(1006);
  await clock.advance(200);
  assert.equal(of("state").at(-1).delay, 200);
  FakeWebSocket.last.welcome();
  FakeWebSocket.last.serverClose(1001, "no heartbeat");
  assert.equal(of("state").at(-1).delay, 100);
});

test("backoff delays are jittered within bounds", async () => {
  // random 0.5 with jitter 0.5: each delay is 3/4 of its ceiling (1000, 2000, 4000, then the 8000 cap)
  const { client, clock, of } = setup({ backoff: { base: 1000, max: 8000, jitter: 0.5 }, random: () => 0.5 });
  (await connected(client)).serverClose(1006);
  for (let i = 0; i < 6; i++) {
    await clock.advance(10_000);
    FakeWebSocket.last.serverClose(1006);
  }
  const delays = of("state").filter((s) => s.state === "reconnecting").map((s) => s.delay);
  assert.deepEqual(delays, [750, 1500, 3000, 6000, 6000, 6000, 6000]);
});

for (const code of [1012, 4008]) {
  test(`close ${code} reconnects at once with since`, async () => {
    const { client, clock } = setup({ backoff: { base: 5000 } });
    const first = await connected(client);
    first.welcome();
    first.msg(41);
    first.serverClose(code, "going");
    assert.equal(client.state, "reconnecting");
    await clock.advance(0);
    assert.equal(FakeWebSocket.all.length, 2);
    assert.equal(FakeWebSocket.last.param("since"), "41");
  });
}

test("the page going online cuts a pending backoff delay short; the backoff goes on growing", async () => {
  const page = new FakePage();
  const { client, clock, of } = setup({ page, backoff: { base: 100, max: 1000, jitter: 0 } });
  const first = await connected(client);
  first.welcome();
  first.serverClose(1011, "internal");
  await clock.advance(100);
  FakeWebSocket.last.serverClose(1006);
  assert.equal(of("state").at(-1).delay, 200);
  const before = FakeWebSocket.all.length;
  page.dispatchEvent(new Event("online"));
  await settle();
  assert.equal(FakeWebSocket.all.length, before + 1, "tried at once, not after 200 ms");
  FakeWebSocket.last.serverClose(1006);
  assert.equal(of("state").at(-1).delay, 400);
  await clock.advance(400);
  assert.equal(FakeWebSocket.all.length, before + 2, "the old timer does not fire a second attempt");
  FakeWebSocket.last.welcome();
  page.dispatchEvent(new Event("online"));
  await settle();
  assert.equal(FakeWebSocket.all.length, before + 2, "an open connection is left alone");
});

test("with a token function, the connection's token is renewed before it expires, without a reconnect", async () => {
  let calls = 0;
  const tokens = [fakeToken({ sub: "u1", exp: 120 }), fakeToken({ sub: "u1", exp: 600 })];
  const { client, clock } = setup({ token: () => tokens[Math.min(calls++, 1)] });
  const socket = await connected(client);
  socket.welcome({ user: "u1", heartbeat: 0 }); // no pings: the clock jumps minutes
  await clock.advance(59_999);
  assert.deepEqual(socket.sentOf("refresh"), [], "halfway through a short life, not before");
  await clock.advance(1);
  assert.deepEqual(socket.sentOf("refresh"), [{ type: "refresh", token: tokens[1] }]);
  // The gateway's clock says how long is left (this one may be off): 90 s before that.
  socket.receive({ type: "refreshed", exp: 600, ttl: 540 });
  await clock.advance(449_999);
  assert.equal(socket.sentOf("refresh").length, 1);
  await clock.advance(1);
  assert.equal(socket.sentOf("refresh").length, 1, "the same token again is not sent");
  assert.equal(FakeWebSocket.all.length, 1, "one connection throughout");
});

test("a refresh is never due at once, nor later than a timer can wait", async () => {
  let calls = 0;
  const past = fakeToken({ sub: "u1", exp: 1 });
  const { client, clock } = setup({ token: () => (++calls === 1 ? past : fakeToken({ sub: "u1", exp: calls })) });
  const socket = await connected(client);
  socket.welcome({ user: "u1", heartbeat: 0 });
  await clock.advance(4_999);
  assert.equal(calls, 1, "a clock far ahead: no refresh loop, 5 s at least");
  await clock.advance(1);
  assert.equal(socket.sentOf("refresh").length, 1);
  socket.receive({ type: "refreshed", exp: 4_000_000_000, ttl: 40 * 24 * 3600 });
  await clock.advance(60_000);
  assert.equal(socket.sentOf("refresh").length, 1, "a 40-day token is not refreshed at once");
  assert.deepEqual(clock.pending, [2 ** 31 - 1 - 60_000]);
});

test("a fixed token is never refreshed, and a dropped connection drops its pending refresh", async () => {
  const fixed = setup({ token: fakeToken({ sub: "u1", exp: 120 }) });
  const socket = await connected(fixed.client);
  socket.welcome({ user: "u1", heartbeat: 0 });
  await fixed.clock.advance(120_000);
  assert.deepEqual(socket.sentOf("refresh"), []);
  let calls = 0;
  const renewed = setup({
    token: () => fakeToken({ sub: "u1", exp: 120, n: ++calls }),
    backoff: { base: 100_000, max: 100_000, jitter: 0 },
  });
  const first = await connected(renewed.client);
  first.welcome({ user: "u1", heartbeat: 0 });
  first.serverClose(1011);
  await renewed.clock.advance(95_000);
  assert.equal(calls, 1, "the refresh went with its connection: no token asked for it");
});

/** The delays of the `reconnecting` states so far. */
function delays(of) {
  return of("state").filter((s) => s.state === "reconnecting").map((s) => s.delay);
}

test("close 4008 repeated within repeatWindow backs off (exponential, jittered, bounded); welcome does not reset it", async () => {
  // random 0.5 with jitter 0.5: each delay is 3/4 of its ceiling (100, 200, 400, then the 400 cap)
  const { client, clock, of } = setup({ backoff: { base: 100, max: 400, jitter: 0.5 }, repeatWindow: 10_000 });
  (await connected(client)).welcome();
  for (let i = 0; i < 6; i++) {
    await clock.advance(2000); // every connection lives 2 s, then its queue overflows again
    FakeWebSocket.last.serverClose(4008, "slow consumer");
    await clock.advance(1000); // longer than any delay: the next socket is there
    FakeWebSocket.last.welcome();
  }
  assert.deepEqual(delays(of), [0, 75, 150, 300, 300, 300], "at once the first time only");
  assert.equal(FakeWebSocket.all.length, 7);
  assert.deepEqual(of("state").at(-2), { state: "reconnecting", code: 4008, reason: "slow consumer", delay: 300, attempt: 5 });
});

test("a slow client closed with 4008 right after every welcome opens a bounded number of sockets", async () => {
  const { client, clock } = setup({ backoff: { base: 500, max: 30_000 } });
  (await connected(client)).welcome();
  for (let elapsed = 0; elapsed < 600_000; elapsed += 50) {
    const socket = FakeWebSocket.last;
    if (socket.readyState === FakeWebSocket.CONNECTING) {
      socket.welcome();
      socket.serverClose(4008, "slow consumer");
    }
    await clock.advance(50);
  }
  // 10 minutes: at once, then 375 ms doubling to the 22.5 s cap (jitter at 0.5): about 30 sockets.
  assert.ok(FakeWebSocket.all.length < 40, `${FakeWebSocket.all.length} sockets in 10 minutes`);
});

test("close 4008 after a connection that lasted repeatWindow reconnects at once again, and the backoff starts over", async () => {
  const { client, clock, of } = setup({ backoff: { base: 100, jitter: 0 }, repeatWindow: 10_000 });
  (await connected(client)).welcome();
  FakeWebSocket.last.serverClose(4008);
  await clock.advance(0);
  FakeWebSocket.last.welcome();
  FakeWebSocket.last.serverClose(4008);
  await clock.advance(100);
  FakeWebSocket.last.welcome();
  FakeWebSocket.last.serverClose(4008);
  await clock.advance(200);
  FakeWebSocket.last.welcome();
  await clock.advance(10_000); // this one was fine for a while
  FakeWebSocket.last.serverClose(4008);
  await clock.advance(0);
  FakeWebSocket.last.welcome();
  FakeWebSocket.last.serverClose(4008);
  assert.deepEqual(delays(of), [0, 100, 200, 0, 100]);
});

test("only immediate closes in a row count as a repeat: a 4008 after another close reconnects at once", async () => {
  const { client, clock, of } = setup({ backoff: { base: 100, jitter: 0 } });
  (await connected(client)).welcome();
  FakeWebSocket.last.serverClose(4008);
  await clock.advance(0);
  FakeWebSocket.last.welcome();
  FakeWebSocket.last.serverClose(1011);
  await clock.advance(100);
  FakeWebSocket.last.welcome();
  FakeWebSocket.last.serverClose(4008);
  assert.deepEqual(delays(of), [0, 100, 0]);
});

test("repeated quick 1012 and 4001 closes back off too, and 4001 still renews the token each time", async () => {
  let calls = 0;
  const { client, clock, of } = setup({ token: async () => `token-${++calls}`, backoff: { base: 100, jitter: 0 } });
  (await connected(client)).welcome();
  FakeWebSocket.last.serverClose(1012, "restarting");
  await clock.advance(0);
  FakeWebSocket.last.welcome();
  FakeWebSocket.last.serverClose(4001, "token expired");
  await clock.advance(100);
  FakeWebSocket.last.welcome();
  FakeWebSocket.last.serverClose(4001, "token expired");
  await clock.advance(200);
  assert.deepEqual(delays(of), [0, 100, 200]);
  assert.deepEqual(FakeWebSocket.all.map((s) => s.param("token")), ["token-1", "token-1", "token-2", "token-3"]);
});

test("a refused socket renews the token only after a backoff delay; refused again, it reports connect_refused and keeps backing off (bounded)", async () => {
  let calls = 0;
  const { client, clock, of } = setup({ token: () => `token-${++calls}`, backoff: { base: 100, max: 800, jitter: 0 } });
  (await connected(client)).serverClose(1006); // e.g. HTTP 401: the browser only sees a close
  assert.deepEqual(of("error"), [], "once may be a gateway restarting");
  await clock.advance(99);
  assert.equal(calls, 1, "no renewal before the delay");
  assert.equal(FakeWebSocket.all.length, 1);
  await clock.advance(1);
  assert.equal(calls, 2);
  assert.equal(FakeWebSocket.last.param("token"), "token-2");
  for (let i = 0; i < 5; i++) {
    FakeWebSocket.last.serverClose(1006);
    await clock.advance(of("state").at(-1).delay);
  }
  assert.deepEqual(delays(of), [100, 200, 400, 800, 800, 800]);
  assert.equal(calls, 7, "one renewal per attempt, each after its delay");
  assert.equal(FakeWebSocket.all.length, 7);
  const errors = of("error");
  assert.deepEqual(errors.map((e) => e.code), ["connect_refused", "connect_refused", "connect_refused", "connect_refused", "connect_refused"]);
  assert.match(errors[0].message, /refused 2 times in a row, also with a renewed token.*401.*403.*503.*retrying in 200 ms/);

  // Once a connection opens, the count and the backoff start over.
  FakeWebSocket.last.welcome();
  FakeWebSocket.last.serverClose(1011);
  await clock.advance(100);
  FakeWebSocket.last.serverClose(1006);
  assert.equal(of("error").length, 5, "a first refusal again");
  assert.deepEqual(delays(of).slice(-2), [100, 200]);
});

test("a fixed token refused twice is reported too, and retried with backoff", async () => {
  const { client, clock, of } = setup({ token: "fixed", backoff: { base: 100, jitter: 0 } });
  (await connected(client)).serverClose(1006);
  await clock.advance(100);
  FakeWebSocket.last.serverClose(1006);
  assert.match(of("error")[0].message, /also with the fixed token/);
  await clock.advance(200);
  assert.equal(FakeWebSocket.all.length, 3);
  assert.equal(FakeWebSocket.last.param("token"), "fixed");
});

test("a socket that opened and closed before welcome is no refusal", async () => {
  const { client, clock, of } = setup({ backoff: { base: 100, jitter: 0 } });
  (await connected(client)).serverClose(1006);
  await clock.advance(100);
  FakeWebSocket.last.open();
  FakeWebSocket.last.serverClose(1013, "NATS unavailable");
  await clock.advance(200);
  FakeWebSocket.last.serverClose(1006);
  assert.deepEqual(of("error"), []);
  assert.deepEqual(delays(of), [100, 200, 400]);
});

for (const [code, reason] of [[4009, "replaced"], [4003, "kicked"]]) {
  test(`close ${code} stops and reports it`, async () => {
    const { client, clock, of } = setup();
    const socket = await connected(client);
    socket.welcome();
    socket.serverClose(code, reason);
    assert.equal(client.state, "closed");
    assert.deepEqual(of("state").at(-1), { state: "closed", code, reason });
    await clock.advance(600_000);
    assert.equal(FakeWebSocket.all.length, 1, "no reconnect");
  });
}

test("close 4009 without a reason gets one", async () => {
  const { client, of } = setup();
  const socket = await connected(client);
  socket.welcome();
  socket.serverClose(4009, "");
  assert.match(of("state").at(-1).reason, /replaced/);
});

test("close 4001 calls the token function again and reconnects at once with since", async () => {
  let calls = 0;
  const { client, clock } = setup({ token: async () => `token-${++calls}` });
  const first = await connected(client);
  assert.equal(first.param("token"), "token-1");
  first.welcome();
  first.msg(3);
  first.serverClose(4001, "token expired");
  await clock.advance(0);
  assert.equal(FakeWebSocket.all.length, 2);
  assert.equal(FakeWebSocket.last.param("token"), "token-2");
  assert.equal(FakeWebSocket.last.param("since"), "3");
});

test("a plain close keeps the token; closed before open renews it", async () => {
  let calls = 0;
  const { client, clock } = setup({ token: () => `token-${++calls}`, backoff: { base: 10, jitter: 0 } });
  const first = await connected(client);
  first.welcome();
  first.serverClose(1011);
  await clock.advance(10);
  assert.equal(FakeWebSocket.last.param("token"), "token-1", "the token was fine");
  FakeWebSocket.last.serverClose(1006); // the upgrade was refused: maybe a 401
  await clock.advance(20);
  assert.equal(FakeWebSocket.last.param("token"), "token-2");
});

test("an expired token is renewed before connecting", async () => {
  let calls = 0;
  const tokens = [fakeToken({ sub: "42", exp: 1 }), fakeToken({ sub: "42", exp: 4e9 })];
  const { client, clock } = setup({ token: () => tokens[calls++], backoff: { base: 10, jitter: 0 } });
  const first = await connected(client);
  first.welcome();
  first.serverClose(1011);
  await clock.advance(10);
  assert.equal(calls, 2);
  assert.equal(FakeWebSocket.last.param("token"), tokens[1]);
});

test("close 4001 with a fixed token stops: it cannot be renewed", async () => {
  const { client, of } = setup({ token: "fixed" });
  const socket = await connected(client);
  socket.welcome();
  socket.serverClose(4001, "token expired");
  assert.equal(client.state, "closed");
  assert.equal(of("state").at(-1).code, 4001);
});

test("a failing token function is reported and retried with backoff", async () => {
  let calls = 0;
  const { client, clock, of } = setup({
    token: async () => {
      if (++calls === 1) throw new Error("auth server down");
      return "good";
    },
    backoff: { base: 100, jitter: 0 },
  });
  client.connect();
  await settle();
  assert.deepEqual(of("error"), [{ code: "token_failed", message: "auth server down" }]);
  assert.equal(FakeWebSocket.all.length, 0);
  await clock.advance(100);
  assert.equal(FakeWebSocket.last.param("token"), "good");
});

test("close() closes the socket with 1000, stops, and does not reconnect", async () => {
  const { client, clock, of } = setup();
  const socket = await connected(client);
  socket.welcome();
  client.close();
  assert.deepEqual(socket.closedByClient, { code: 1000, reason: "client closed" });
  assert.equal(client.state, "closed");
  assert.equal(of("state").at(-1).code, 1000);
  await clock.advance(600_000);
  assert.equal(FakeWebSocket.all.length, 1);
});

test("close() while waiting to reconnect cancels the attempt; connect() starts again", async () => {
  const { client, clock } = setup({ backoff: { base: 100, jitter: 0 } });
  (await connected(client)).serverClose(1006);
  client.close();
  await clock.advance(1000);
  assert.equal(FakeWebSocket.all.length, 1);
  client.connect();
  await settle();
  assert.equal(FakeWebSocket.all.length, 2);
  assert.equal(client.state, "connecting");
});

test("liveness: idle for a heartbeat sends a ping; no answer reconnects", async () => {
  const { client, clock, of } = setup({ pingTimeout: 5000, backoff: { base: 100, jitter: 0 } });
  const socket = await connected(client);
  socket.welcome({ heartbeat: 20 });
  await clock.advance(19_999);
  assert.deepEqual(socket.sentOf("ping"), []);
  await clock.advance(1);
  assert.deepEqual(socket.sentOf("ping"), [{ type: "ping" }]);
  await clock.advance(5000);
  assert.equal(socket.closedByClient.code, 4000);
  assert.equal(of("state").at(-1).state, "reconnecting");
  await clock.advance(100);
  assert.equal(FakeWebSocket.all.length, 2);
});

test("a socket with no welcome within connectTimeout is given up and tried again", async () => {
  const { client, clock, of } = setup({ connectTimeout: 8000, backoff: { base: 100, jitter: 0 } });
  const socket = await connected(client);
  // The handshake hangs (a gateway that accepted the TCP connection and answers nothing).
  await clock.advance(7999);
  assert.equal(socket.closedByClient, null);
  await clock.advance(1);
  assert.deepEqual([socket.closedByClient.code, socket.closedByClient.reason], [4000, "no welcome in time"]);
  assert.deepEqual([of("state").at(-1).state, of("state").at(-1).code], ["reconnecting", 4000]);
  await clock.advance(100);
  assert.equal(FakeWebSocket.all.length, 2);
  // A welcomed socket is not timed out.
  FakeWebSocket.last.welcome({ heartbeat: 0 });
  await clock.advance(60_000);
  assert.equal(FakeWebSocket.last.closedByClient, null);
  assert.equal(client.state, "open");
});

test("liveness: a pong keeps the connection", async () => {
  const { client, clock } = setup({ pingTimeout: 5000 });
  const socket = await connected(client);
  socket.welcome({ heartbeat: 20 });
  await clock.advance(20_000);
  socket.receive({ type: "pong" });
  await clock.advance(19_000);
  assert.equal(socket.closedByClient, null);
  assert.equal(client.state, "open");
  assert.equal(socket.sentOf("ping").length, 1);
});

test("liveness: messages count as traffic", async () => {
  const { client, clock } = setup();
  const socket = await connected(client);
  socket.welcome({ heartbeat: 20 });
  for (let seq = 1; seq <= 10; seq++) {
    await clock.advance(15_000);
    socket.msg(seq);
  }
  assert.deepEqual(socket.sentOf("ping"), []);
});
