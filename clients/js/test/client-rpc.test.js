// rpc: results, errors, timeouts, disconnects.
import { test } from "node:test";
import assert from "node:assert/strict";
import { HeraldError } from "../herald.js";
import { FakeWebSocket, connected, setup } from "../test-support/helpers.js";

async function open(options) {
  const context = setup(options);
  const socket = await connected(context.client);
  socket.welcome();
  return { ...context, socket };
}

test("rpc sends a frame and resolves with the result's data", async () => {
  const { client, socket } = await open();
  const result = client.rpc("prefs.get");
  assert.deepEqual(socket.sentOf("rpc"), [{ type: "rpc", id: "c1", fn: "prefs.get", data: null }]);
  socket.receive({ type: "rpc_result", id: "c1", ok: true, data: { muted: ["marketing"] } });
  assert.deepEqual(await result, { muted: ["marketing"] });
});

test("rpc ids are unique and results are matched by id", async () => {
  const { client, socket } = await open();
  const a = client.rpc("f", 1);
  const b = client.rpc("f", 2);
  const [first, second] = socket.sentOf("rpc");
  assert.notEqual(first.id, second.id);
  socket.receive({ type: "rpc_result", id: second.id, ok: true, data: "b" });
  socket.receive({ type: "rpc_result", id: first.id, ok: true, data: "a" });
  assert.deepEqual(await Promise.all([a, b]), ["a", "b"]);
});

test("rpc rejects with the gateway's code and message on ok:false", async () => {
  const { client, socket } = await open();
  const result = client.rpc("prefs.set", { muted: [] });
  socket.receive({ type: "rpc_result", id: "c1", ok: false, error: { code: "no_function", message: "nobody answers prefs.set" } });
  await assert.rejects(result, (error) => {
    assert.ok(error instanceof HeraldError);
    assert.ok(error instanceof Error);
    assert.equal(error.code, "no_function");
    assert.equal(error.message, "nobody answers prefs.set");
    return true;
  });
});

test("rpc rejects with code timeout when no result comes in time", async () => {
  const { client, clock, socket } = await open();
  let settled = false;
  const rejected = assert.rejects(client.rpc("slow", {}, { timeout: 2000 }).finally(() => (settled = true)), { code: "timeout" });
  await clock.advance(1999);
  assert.equal(settled, false);
  await clock.advance(1);
  await rejected;
  socket.receive({ type: "rpc_result", id: "c1", ok: true, data: 1 }); // late: ignored
});

test("the default rpc timeout is configurable", async () => {
  const { client, clock } = await open({ rpcTimeout: 300 });
  const rejected = assert.rejects(client.rpc("slow"), { code: "timeout" });
  await clock.advance(300);
  await rejected;
});

test("pending rpcs reject with code disconnected when the connection drops", async () => {
  const { client, socket } = await open();
  const result = client.rpc("f");
  socket.serverClose(1011);
  await assert.rejects(result, { code: "disconnected" });
});

test("an rpc made while reconnecting is sent once the connection is open", async () => {
  const { client, clock, socket } = await open({ backoff: { base: 100, jitter: 0 } });
  socket.serverClose(1011);
  const result = client.rpc("f", { x: 1 });
  await clock.advance(100);
  const next = FakeWebSocket.last;
  assert.deepEqual(next.sentOf("rpc"), []);
  next.welcome();
  assert.deepEqual(next.sentOf("rpc"), [{ type: "rpc", id: "c1", fn: "f", data: { x: 1 } }]);
  next.receive({ type: "rpc_result", id: "c1", ok: true, data: "done" });
  assert.equal(await result, "done");
});

test("close() rejects pending rpcs with code closed; rpc after close rejects at once", async () => {
  const { client } = await open();
  const result = client.rpc("f");
  client.close();
  await assert.rejects(result, { code: "closed" });
  await assert.rejects(client.rpc("f"), { code: "closed" });
});

test("a final close code rejects pending rpcs with code closed", async () => {
  const { client, socket } = await open();
  socket.serverClose(1011); // sent ones: disconnected
  const queued = client.rpc("f"); // not sent yet
  client.close();
  await assert.rejects(queued, { code: "closed" });
});
