// Dedupe, topic replay blocks, ack batching, resume points kept in storage.
import { test } from "node:test";
import assert from "node:assert/strict";
import { FakeWebSocket, connected, setup } from "../test-support/helpers.js";
import { FakePage, MemoryStorage, fakeToken } from "../test-support/fakes.js";

test("messages are delivered once each; duplicates by seq are dropped", async () => {
  const { client, clock, of } = setup({ backoff: { base: 10, jitter: 0 } });
  const first = await connected(client);
  first.welcome();
  first.msg(1);
  first.msg(2);
  first.msg(2);
  first.serverClose(1011);
  await clock.advance(10);
  const second = FakeWebSocket.last;
  second.welcome();
  second.msg(1); // a gateway replaying too much
  second.msg(2);
  second.msg(3);
  assert.deepEqual(of("message").map((m) => m.seq), [1, 2, 3]);
  assert.equal(client.lastSeq, 3);
});

test("a stream made again starts the seqs over: its messages are delivered however low their seq", async () => {
  const storage = new MemoryStorage();
  const { client, clock, of } = setup({ backoff: { base: 10, jitter: 0 }, storage });
  const first = await connected(client);
  first.welcome();
  first.msg(42);
  first.msg(43);
  client.subscribe("news", { since: 40 });
  first.serverClose(4008); // the stream was deleted
  client.markRead(43); // while offline
  await clock.advance(10);
  const second = FakeWebSocket.last;
  assert.equal(second.param("since"), "43");
  // The new stream ends before the resume point.
  second.welcome({ seq: 0 });
  assert.deepEqual(second.sentOf("sub"), [{ type: "sub", topic: "news", since: 0 }], "not the old stream's 40");
  second.receive({ type: "replayed", from: 1, to: 0, count: 0, complete: false });
  second.msg(1);
  second.msg(2);
  second.msg(2);
  assert.deepEqual(of("message").map((m) => m.seq), [42, 43, 1, 2]);
  assert.deepEqual(second.sentOf("read"), [], "a read asked before, of the old stream, is not sent");
  assert.equal(client.lastSeq, 2);
  await clock.advance(1000);
  assert.deepEqual(second.sentOf("ack"), [{ type: "ack", seq: 2 }]);
  assert.equal(storage.getItem("herald:42:default:seq"), "2");
});

test("the welcome's epoch is kept (storage too) and goes back with since", async () => {
  const storage = new MemoryStorage();
  const { client, clock, of } = setup({ backoff: { base: 10, jitter: 0 }, storage });
  const first = await connected(client);
  assert.equal(first.param("epoch"), null, "nothing to resume yet");
  first.welcome({ epoch: "a1" });
  first.msg(5);
  first.serverClose(4008);
  await clock.advance(10);
  const second = FakeWebSocket.last;
  assert.deepEqual([second.param("since"), second.param("epoch")], ["5", "a1"]);
  assert.equal(storage.getItem("herald:42:default:epoch"), "a1");
  // The stream was made again and has passed 5 already: the gateway resumes from its end (9), and
  // so does the client, before any new message.
  second.welcome({ seq: 9, epoch: "b2" });
  second.receive({ type: "replayed", from: 10, to: 9, count: 0, complete: false });
  assert.equal(client.lastSeq, 9);
  second.serverClose(1012);
  await clock.advance(10);
  const third = FakeWebSocket.last;
  assert.deepEqual([third.param("since"), third.param("epoch")], ["9", "b2"]);
  assert.deepEqual([storage.getItem("herald:42:default:seq"), storage.getItem("herald:42:default:epoch")], ["9", "b2"]);
  third.welcome({ seq: 9, epoch: "b2" });
  third.msg(10);
  assert.deepEqual(of("message").map((m) => m.seq), [5, 10]);
});

test("an epoch in storage that is not one a gateway gives is not sent", async () => {
  const storage = new MemoryStorage();
  storage.setItem("herald:42:default:seq", "7");
  storage.setItem("herald:42:default:epoch", "not hex!");
  const { client } = setup({ storage, user: "42" });
  const socket = await connected(client);
  assert.deepEqual([socket.param("since"), socket.param("epoch")], ["7", null]);
});

test("the message event carries the whole frame, an absent id or kind as empty", async () => {
  const { client, of } = setup();
  const socket = await connected(client);
  socket.welcome();
  socket.msg(9, { kind: "mail", to: "all", data: { text: "hi" } });
  socket.msg(10, { id: "order-7" });
  assert.deepEqual(of("message")[0], { type: "msg", seq: 9, to: "all", id: "", kind: "mail", ts: "2024-01-01T00:00:00Z", data: { text: "hi" } });
  assert.deepEqual([of("message")[1].id, of("message")[1].kind], ["order-7", ""]);
});

test("a topic replay block delivers older messages, once, until its replayed frame", async () => {
  const { client, of } = setup();
  const socket = await connected(client);
  socket.welcome();
  socket.msg(50);
  client.subscribe("news", { since: 10 });
  assert.deepEqual(socket.sentOf("sub"), [{ type: "sub", topic: "news", since: 10 }]);
  socket.receive({ type: "subscribed", topic: "news" });
  socket.msg(12, { to: "topic:news" });
  socket.msg(12, { to: "topic:news" });
  socket.msg(30, { to: "topic:news" });
  socket.msg(51); // live, interleaved
  socket.receive({ type: "replayed", from: 11, to: 30, count: 2, complete: true, topic: "news" });
  socket.msg(31, { to: "topic:news" }); // after the block: a duplicate again
  assert.deepEqual(of("message").map((m) => m.seq), [50, 12, 30, 51]);
  assert.deepEqual(of("replayed"), [{ type: "replayed", from: 11, to: 30, count: 2, complete: true, topic: "news" }]);
  assert.equal(client.lastSeq, 51, "older messages do not move the resume point");
});

test("the connection's replayed frame is passed on with complete", async () => {
  const { client, of } = setup({ since: 5 });
  const socket = await connected(client);
  assert.equal(socket.param("since"), "5");
  socket.welcome();
  socket.msg(6);
  socket.receive({ type: "replayed", from: 6, to: 6, count: 1, complete: false });
  assert.equal(of("replayed")[0].complete, false);
});

test("acks go in batches: the highest seq after the delay or after max messages", async () => {
  const { client, clock } = setup({ ack: { delay: 500, max: 3 } });
  const socket = await connected(client);
  socket.welcome();
  socket.msg(1);
  socket.msg(2);
  assert.deepEqual(socket.sentOf("ack"), []);
  await clock.advance(500);
  assert.deepEqual(socket.sentOf("ack"), [{ type: "ack", seq: 2 }]);
  socket.msg(3);
  socket.msg(4);
  socket.msg(5);
  assert.deepEqual(socket.sentOf("ack"), [{ type: "ack", seq: 2 }, { type: "ack", seq: 5 }]);
  await clock.advance(10_000);
  assert.equal(socket.sentOf("ack").length, 2, "nothing left to ack");
});

test("duplicates are not acked again", async () => {
  const { client, clock } = setup({ ack: { delay: 100, max: 100 } });
  const socket = await connected(client);
  socket.welcome();
  socket.msg(1);
  await clock.advance(100);
  socket.msg(1);
  await clock.advance(100);
  assert.deepEqual(socket.sentOf("ack"), [{ type: "ack", seq: 1 }]);
});

test("an ack pending at a disconnect is sent on the next connection", async () => {
  const { client, clock } = setup({ ack: { delay: 1000 }, backoff: { base: 10, jitter: 0 } });
  const first = await connected(client);
  first.welcome();
  first.msg(7);
  first.serverClose(1011);
  await clock.advance(10);
  FakeWebSocket.last.welcome();
  assert.deepEqual(FakeWebSocket.last.sentOf("ack"), [{ type: "ack", seq: 7 }]);
});

test("close() sends the pending ack first", async () => {
  const { client } = setup();
  const socket = await connected(client);
  socket.welcome();
  socket.msg(3);
  client.close();
  assert.deepEqual(socket.sentOf("ack"), [{ type: "ack", seq: 3 }]);
});

test("with storage, the last seq survives a new client (per user and device)", async () => {
  const storage = new MemoryStorage();
  const token = fakeToken({ sub: "42", exp: 4e9 });
  const first = setup({ storage, token, device: "phone" });
  const socket = await connected(first.client);
  socket.welcome({ user: "42", device: "phone" });
  socket.msg(17);
  first.client.close();
  assert.equal(storage.getItem("herald:42:phone:seq"), "17");

  const again = setup({ storage, token, device: "phone" });
  assert.equal((await connected(again.client)).param("since"), "17");
  const otherDevice = setup({ storage, token, device: "laptop" });
  assert.equal((await connected(otherDevice.client)).param("since"), null);
  const otherUser = setup({ storage, token: fakeToken({ sub: "43" }), device: "phone" });
  assert.equal((await connected(otherUser.client)).param("since"), null);
});

test("storage is written when acks are flushed, also while disconnected", async () => {
  const storage = new MemoryStorage();
  const { client, clock } = setup({ storage, ack: { delay: 100 } });
  const socket = await connected(client);
  socket.welcome({ user: "u1" });
  socket.msg(4);
  await clock.advance(100);
  assert.equal(storage.getItem("herald:u1:default:seq"), "4");
  socket.msg(5);
  socket.serverClose(1006);
  assert.equal(storage.getItem("herald:u1:default:seq"), "5");
});

test("pagehide writes the resume point to storage (and sends the ack) before the ack timer", async () => {
  const storage = new MemoryStorage();
  const page = new FakePage();
  const { client, clock } = setup({ storage, page, ack: { delay: 1000 } });
  const socket = await connected(client);
  socket.welcome({ user: "u1" });
  socket.msg(7);
  socket.msg(8);
  await clock.advance(500);
  assert.equal(storage.getItem("herald:u1:default:seq"), null, "not yet: the ack waits for its timer");
  page.pagehide();
  assert.equal(storage.getItem("herald:u1:default:seq"), "8");
  assert.deepEqual(socket.sentOf("ack"), [{ type: "ack", seq: 8 }]);
  const reloaded = setup({ storage, user: "u1" });
  assert.equal((await connected(reloaded.client)).param("since"), "8", "a reload resumes after what was shown");
});

test("visibilitychange to hidden writes the resume point; to visible it does not", async () => {
  const storage = new MemoryStorage();
  const page = new FakePage();
  const { client } = setup({ storage, page, ack: { delay: 1000 } });
  const socket = await connected(client);
  socket.welcome({ user: "u1" });
  socket.msg(3);
  page.visibility("visible");
  assert.equal(storage.getItem("herald:u1:default:seq"), null);
  page.visibility("hidden");
  assert.equal(storage.getItem("herald:u1:default:seq"), "3");
});

test("the page is heard while the client runs, also while disconnected; not after it stopped", async () => {
  const storage = new MemoryStorage();
  const page = new FakePage();
  const { client } = setup({ storage, page, ack: { delay: 1000 } });
  assert.equal(page.listeners, 0, "nothing before connect()");
  const socket = await connected(client);
  assert.equal(page.listeners, 3, "pagehide, online and visibilitychange");
  socket.welcome({ user: "u1" });
  socket.msg(4);
  socket.serverClose(1011);
  page.pagehide();
  assert.equal(storage.getItem("herald:u1:default:seq"), "4");
  client.close();
  assert.equal(page.listeners, 0, "a closed client is not kept alive by the page");
  await connected(client);
  assert.equal(page.listeners, 3);
  FakeWebSocket.last.welcome();
  FakeWebSocket.last.serverClose(4009);
  assert.equal(page.listeners, 0, "a final close stops listening too");
});

test("in a browser the window is the page by default", async () => {
  const window = new FakePage();
  Object.assign(globalThis, {
    document: window.document,
    addEventListener: window.addEventListener.bind(window),
    removeEventListener: window.removeEventListener.bind(window),
  });
  try {
    const storage = new MemoryStorage();
    const { client } = setup({ storage, ack: { delay: 1000 } });
    const socket = await connected(client);
    socket.welcome({ user: "u1" });
    socket.msg(5);
    window.visibility("hidden");
    assert.equal(storage.getItem("herald:u1:default:seq"), "5");
    client.close();
    assert.equal(window.listeners, 0);
  } finally {
    delete globalThis.document;
    delete globalThis.addEventListener;
    delete globalThis.removeEventListener;
  }
});

test("an explicit since wins over storage", async () => {
  const storage = new MemoryStorage();
  storage.setItem("herald:u1:default:seq", "99");
  const { client } = setup({ storage, user: "u1", since: 3 });
  assert.equal((await connected(client)).param("since"), "3");
});

test("a frame that is not JSON is reported, and unknown frame types are ignored", async () => {
  const { client, of } = setup();
  const socket = await connected(client);
  socket.welcome();
  socket.receive("not json");
  socket.receive({ type: "from_the_future" });
  assert.deepEqual(of("error").map((e) => e.code), ["bad_frame"]);
  assert.equal(client.state, "open");
});

test("error frames become error events", async () => {
  const { client, of } = setup();
  const socket = await connected(client);
  socket.welcome();
  socket.receive({ type: "error", code: "unknown_type", message: "not supported" });
  assert.deepEqual(of("error"), [{ code: "unknown_type", message: "not supported" }]);
});
