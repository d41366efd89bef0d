// subscribe / unsubscribe, and topics rejoined after a reconnect.
import { test } from "node:test";
import assert from "node:assert/strict";
import { topicAllowed } from "../herald.js";
import { fakeToken } from "../test-support/fakes.js";
import { FakeWebSocket, connected, setup } from "../test-support/helpers.js";

test("topics given to the constructor are joined after the welcome, from its seq", async () => {
  const { client } = setup({ topics: ["news", "room-1"] });
  const socket = await connected(client);
  // Not in the URL, where one the token does not allow would refuse the whole connection (403).
  assert.equal(socket.param("topics"), null);
  socket.welcome({ seq: 40 });
  assert.deepEqual(socket.sentOf("sub"), [
    { type: "sub", topic: "news", since: 40 },
    { type: "sub", topic: "room-1", since: 40 },
  ]);
  assert.deepEqual(client.topics, ["news", "room-1"]);
});

test("a forbidden constructor topic is an error naming it, and the connection stays", async () => {
  const { client, of } = setup({ topics: ["secret"] });
  const socket = await connected(client);
  socket.welcome();
  socket.receive({ type: "error", code: "forbidden", message: "the token does not allow topic secret", topic: "secret" });
  assert.equal(client.state, "open");
  assert.deepEqual(of("error").map((error) => [error.code, error.topic]), [["forbidden", "secret"]]);
  assert.deepEqual(client.topics, []);
});

test("subscribe sends sub; subscribed and unsubscribed become events", async () => {
  const { client, of } = setup();
  const socket = await connected(client);
  socket.welcome();
  client.subscribe("news");
  assert.deepEqual(socket.sentOf("sub"), [{ type: "sub", topic: "news" }]);
  socket.receive({ type: "subscribed", topic: "news" });
  client.unsubscribe("news");
  assert.deepEqual(socket.sentOf("unsub"), [{ type: "unsub", topic: "news" }]);
  socket.receive({ type: "unsubscribed", topic: "news" });
  assert.deepEqual(of("subscribed"), [{ topic: "news" }]);
  assert.deepEqual(of("unsubscribed"), [{ topic: "news" }]);
  assert.deepEqual(client.topics, []);
});

test("subscribe before connect is sent after welcome", async () => {
  const { client } = setup();
  client.subscribe("news");
  const socket = await connected(client);
  assert.equal(socket.param("topics"), null);
  socket.welcome({ seq: 7 });
  assert.deepEqual(socket.sentOf("sub"), [{ type: "sub", topic: "news", since: 7 }]);
});

test("confirmed topics are rejoined through the URL after a reconnect, resumed by since", async () => {
  const { client, clock } = setup({ backoff: { base: 10, jitter: 0 } });
  const first = await connected(client);
  first.welcome();
  client.subscribe("news");
  client.subscribe("sport");
  first.receive({ type: "subscribed", topic: "news" });
  first.receive({ type: "subscribed", topic: "sport" });
  first.msg(8, { to: "topic:news" });
  first.serverClose(1012);
  await clock.advance(0);
  const second = FakeWebSocket.last;
  assert.equal(second.param("topics"), "news,sport");
  assert.equal(second.param("since"), "8");
  second.welcome();
  assert.deepEqual(second.sentOf("sub"), [], "already joined through the URL");
});

test("an unconfirmed topic is subscribed again with a sub frame and since", async () => {
  const { client, clock } = setup({ backoff: { base: 10, jitter: 0 } });
  const first = await connected(client);
  first.welcome();
  first.msg(5);
  client.subscribe("news"); // no answer before the drop
  first.serverClose(1011);
  await clock.advance(10);
  const second = FakeWebSocket.last;
  assert.equal(second.param("topics"), null, "a topic that may be forbidden never goes in the URL");
  second.welcome();
  assert.deepEqual(second.sentOf("sub"), [{ type: "sub", topic: "news", since: 5 }]);
});

test("a topic replay cut by a disconnect is asked again from its own since", async () => {
  const { client, clock, of } = setup({ backoff: { base: 10, jitter: 0 } });
  const first = await connected(client);
  first.welcome();
  first.msg(100);
  client.subscribe("news", { since: 10 });
  first.receive({ type: "subscribed", topic: "news" });
  first.msg(11, { to: "topic:news" });
  first.serverClose(1011);
  await clock.advance(10);
  const second = FakeWebSocket.last;
  assert.equal(second.param("topics"), null);
  second.welcome();
  assert.deepEqual(second.sentOf("sub"), [{ type: "sub", topic: "news", since: 10 }]);
  second.msg(11, { to: "topic:news" }); // seen already
  second.msg(12, { to: "topic:news" });
  second.receive({ type: "replayed", from: 11, to: 12, count: 2, complete: true, topic: "news" });
  assert.deepEqual(of("message").map((m) => m.seq), [100, 11, 12]);
  second.serverClose(1012);
  await clock.advance(0);
  assert.equal(FakeWebSocket.last.param("topics"), "news", "replay done: back in the URL");
});

test("unsubscribed topics are not rejoined", async () => {
  const { client, clock } = setup({ topics: ["news"] });
  const first = await connected(client);
  first.welcome();
  client.unsubscribe("news");
  first.serverClose(1012);
  await clock.advance(0);
  assert.equal(FakeWebSocket.last.param("topics"), null);
});

test("a refused sub is reported with its topic and given up", async () => {
  const { client, clock, of } = setup();
  const socket = await connected(client);
  socket.welcome();
  client.subscribe("secret");
  socket.receive({ type: "error", code: "forbidden", message: "topic not allowed", topic: "secret" });
  assert.deepEqual(of("error"), [{ code: "forbidden", message: "topic not allowed", topic: "secret" }]);
  assert.deepEqual(client.topics, []);
  socket.serverClose(1012);
  await clock.advance(0);
  FakeWebSocket.last.welcome();
  assert.deepEqual(FakeWebSocket.last.sentOf("sub"), []);
});

test("disconnect() then connect() keeps the topics and rejoins them from the last seq", async () => {
  const { client } = setup();
  const first = await connected(client);
  first.welcome();
  client.subscribe("news");
  client.subscribe("sport");
  first.receive({ type: "subscribed", topic: "news" });
  first.msg(7, { to: "topic:news" });
  client.disconnect();
  assert.deepEqual(first.closedByClient, { code: 1000, reason: "client closed" });
  assert.deepEqual(client.topics, ["news", "sport"]);
  const second = await connected(client);
  assert.notEqual(second, first);
  assert.equal(second.param("since"), "7");
  assert.equal(second.param("topics"), "news");
  second.welcome();
  assert.deepEqual(second.sentOf("sub"), [{ type: "sub", topic: "sport", since: 7 }]);
  assert.deepEqual(client.topics, ["news", "sport"]);
});

test("close() then connect() rejoins the topics too, on every later reconnect", async () => {
  const { client, clock } = setup({ backoff: { base: 10, jitter: 0 } });
  const first = await connected(client);
  first.welcome();
  client.subscribe("news");
  first.receive({ type: "subscribed", topic: "news" });
  first.msg(3, { to: "topic:news" });
  client.close();
  const second = await connected(client);
  second.welcome();
  assert.equal(second.param("topics"), "news");
  assert.equal(second.param("since"), "3");
  second.msg(9);
  second.serverClose(1012);
  await clock.advance(10);
  const third = FakeWebSocket.last;
  assert.notEqual(third, second);
  assert.equal(third.param("topics"), "news");
  assert.equal(third.param("since"), "9");
});

test("an error naming no topic (a refused refresh) leaves a sub waiting for its answer alone", async () => {
  const { client, of } = setup();
  const socket = await connected(client);
  socket.welcome();
  client.subscribe("sport");
  socket.receive({ type: "error", code: "forbidden", message: "the token does not allow topic news" });
  assert.deepEqual(of("error"), [{ code: "forbidden", message: "the token does not allow topic news" }]);
  socket.receive({ type: "subscribed", topic: "sport" });
  assert.deepEqual(client.topics, ["sport"]);
});

test("a joined topic the renewed token no longer allows goes as a sub frame, refused alone; the others stay in the URL", async () => {
  const tokens = [fakeToken({ sub: "u1", topics: ["news", "room-*"] }), fakeToken({ sub: "u1", topics: ["room-*"] })];
  let calls = 0;
  const { client, clock, of } = setup({ token: () => tokens[Math.min(calls++, 1)] });
  const first = await connected(client);
  first.welcome();
  for (const topic of ["news", "room-1"]) {
    client.subscribe(topic);
    first.receive({ type: "subscribed", topic });
  }
  first.msg(7, { to: "topic:news" });
  first.serverClose(4001); // the token expired: the renewed one no longer allows news
  await clock.advance(0);
  const second = FakeWebSocket.last;
  assert.equal(second.param("topics"), "room-1");
  second.welcome({ seq: 9 });
  assert.deepEqual(second.sentOf("sub"), [{ type: "sub", topic: "news", since: 7 }]);
  second.receive({ type: "error", code: "forbidden", message: "the token does not allow topic news", topic: "news" });
  assert.deepEqual(client.topics, ["room-1"]);
  assert.deepEqual(of("error").at(-1), { code: "forbidden", message: "the token does not allow topic news", topic: "news" });
});

test("topicAllowed reads a topics claim as the gateway does", () => {
  assert.equal(topicAllowed(["news", "room-*"], "news"), true);
  assert.equal(topicAllowed(["news", "room-*"], "room-7"), true);
  assert.equal(topicAllowed(["news", "room-*"], "newsroom"), false);
  assert.equal(topicAllowed(["*"], "anything"), true);
  assert.equal(topicAllowed([], "news"), false);
});

test("a sub that failed as unavailable (the gateway stopping) is kept and joined by the next connection", async () => {
  const { client, clock, of } = setup();
  const first = await connected(client);
  first.welcome();
  first.msg(3);
  client.subscribe("news");
  first.receive({ type: "error", code: "unavailable", message: "the gateway is stopping", topic: "news" });
  assert.deepEqual(of("error").at(-1), { code: "unavailable", message: "the gateway is stopping", topic: "news" });
  assert.deepEqual(client.topics, ["news"]);
  first.serverClose(1012);
  await clock.advance(0);
  const second = FakeWebSocket.last;
  assert.equal(second.param("topics"), null, "never confirmed: not in the URL");
  second.welcome();
  assert.deepEqual(second.sentOf("sub"), [{ type: "sub", topic: "news", since: 3 }]);
});
