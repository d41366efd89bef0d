// The personal inbox: read position and unread count from the welcome, live personal messages,
// `read` frames from other devices, and markRead.
import { test } from "node:test";
import assert from "node:assert/strict";
import { FakeWebSocket, connected, setup } from "../test-support/helpers.js";

test("the welcome's read position and unread count are the inbox, and live personal messages add to it", async () => {
  const { client, of } = setup();
  const socket = await connected(client);
  socket.welcome({ seq: 10, read: 4, unread: 2 });
  assert.deepEqual(client.inbox, { read: 4, unread: 2 });
  socket.msg(7); // replayed unread: already counted by the welcome
  socket.msg(9);
  socket.msg(11, { to: "all" }); // not personal
  socket.msg(12);
  assert.deepEqual(client.inbox, { read: 4, unread: 3 });
  assert.deepEqual(of("inbox").at(-1), { read: 4, unread: 3 });
});

test("a read frame from another device sets the inbox", async () => {
  const { client, of } = setup();
  const socket = await connected(client);
  socket.welcome({ seq: 10, read: 0, unread: 5 });
  socket.receive({ type: "read", seq: 8, unread: 2 });
  assert.deepEqual(client.inbox, { read: 8, unread: 2 });
  assert.deepEqual(of("read"), [{ type: "read", seq: 8, unread: 2 }]);
});

test("markRead sends the last personal seq, and one asked while offline goes out after the welcome", async () => {
  const { client, clock } = setup({ backoff: { base: 10, jitter: 0 } });
  const socket = await connected(client);
  socket.welcome({ seq: 3, read: 0, unread: 3 });
  socket.msg(1);
  socket.msg(2);
  socket.msg(5, { to: "all" });
  client.markRead();
  assert.deepEqual(socket.sentOf("read"), [{ type: "read", seq: 2 }]);
  socket.serverClose(1012);
  client.markRead(3);
  await clock.advance(10);
  const again = FakeWebSocket.last;
  again.welcome({ seq: 5, read: 2, unread: 1 });
  assert.deepEqual(again.sentOf("read"), [{ type: "read", seq: 3 }]);
  // Nothing to send when already read that far.
  client.markRead(1);
  assert.equal(again.sentOf("read").length, 1);
});
