"""A centrifuge-python client (the official Centrifugal SDK) remote-controlled by a test.

Reads one JSON command per line on stdin and prints one JSON event per line on stdout:

  {"op":"connect","url":"ws://…/connection/websocket","token":"…","protobuf":false}
  {"op":"set_token","token":"…"}          the token get_token hands the SDK when it refreshes
  {"op":"subscribe","channel":"news"}
  {"op":"unsubscribe","channel":"news"}
  {"op":"rpc","method":"echo","data":{…}}
  {"op":"presence_stats","channel":"all"}
  {"op":"disconnect"}

Events: connecting, connected, disconnected, error, subscribed, subscribe_error, unsubscribed,
pub (with channel, offset, data, text: the data exactly as received, tags), rpc, presence_stats, reply_error, token_requested.
"""

import asyncio
import json
import sys

from centrifuge import (
    Client,
    ClientEventHandler,
    ReplyError,
    SubscriptionEventHandler,
)


def emit(event, **fields):
    print(json.dumps({"event": event, **fields}), flush=True)


def plain(data):
    """Data as JSON: with Protobuf the SDK hands over bytes (here: JSON text, or plain text)."""
    if isinstance(data, bytes):
        text = data.decode()
        try:
            return json.loads(text)
        except ValueError:
            return text
    return data


def text(data):
    """Data exactly as received: Protobuf's bytes, or JSON's value written without spaces."""
    if isinstance(data, bytes):
        return data.decode(errors="replace")
    return json.dumps(data, separators=(",", ":"))


def publication(channel, pub):
    emit("pub", channel=channel, offset=pub.offset, data=plain(pub.data), text=text(pub.data), tags=pub.tags)


class Events(ClientEventHandler):
    async def on_connecting(self, ctx):
        emit("connecting", code=ctx.code, reason=ctx.reason)

    async def on_connected(self, ctx):
        emit("connected", client=ctx.client)

    async def on_disconnected(self, ctx):
        emit("disconnected", code=ctx.code, reason=ctx.reason)

    async def on_error(self, ctx):
        emit("error", code=ctx.code, error=str(ctx.error))

    async def on_subscribed(self, ctx):
        emit("subscribed", channel=ctx.channel, recovered=ctx.recovered,
             was_recovering=ctx.was_recovering, server=True)

    async def on_publication(self, ctx):
        publication(ctx.channel, ctx.pub)


class SubEvents(SubscriptionEventHandler):
    def __init__(self, channel):
        self.channel = channel

    async def on_subscribed(self, ctx):
        emit("subscribed", channel=ctx.channel, recovered=ctx.recovered,
             was_recovering=ctx.was_recovering, server=False)

    async def on_unsubscribed(self, ctx):
        emit("unsubscribed", channel=self.channel, code=ctx.code, reason=ctx.reason)

    async def on_publication(self, ctx):
        publication(self.channel, ctx.pub)

    async def on_error(self, ctx):
        error = ctx.error
        code = getattr(error, "code", ctx.code)
        emit("subscribe_error", channel=self.channel, code=code, error=str(error))


async def main():
    client = None
    protobuf = False
    next_token = {"token": ""}

    async def get_token():
        emit("token_requested")
        return next_token["token"]

    reader = asyncio.StreamReader()
    loop = asyncio.get_running_loop()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    while line := await reader.readline():
        command = json.loads(line)
        op = command["op"]
        try:
            if op == "connect":
                next_token["token"] = command["token"]
                protobuf = command.get("protobuf", False)
                client = Client(command["url"], events=Events(), token=command["token"],
                                get_token=get_token, proxy=None, max_reconnect_delay=1.0,
                                use_protobuf=protobuf)
                await client.connect()
            elif op == "set_token":
                next_token["token"] = command["token"]
            elif op == "subscribe":
                channel = command["channel"]
                sub = client.new_subscription(channel, events=SubEvents(channel))
                await sub.subscribe()
            elif op == "unsubscribe":
                await client.get_subscription(command["channel"]).unsubscribe()
            elif op == "rpc":
                data = command["data"]
                if protobuf:
                    data = json.dumps(data).encode()
                result = await client.rpc(command["method"], data)
                emit("rpc", method=command["method"], data=plain(result.data))
            elif op == "presence_stats":
                stats = await client.presence_stats(command["channel"])
                emit("presence_stats", num_clients=stats.num_clients, num_users=stats.num_users)
            elif op == "disconnect":
                await client.disconnect()
        except ReplyError as error:
            emit("reply_error", op=op, code=error.code, message=error.message)
    if client is not None:
        await client.disconnect()


asyncio.run(main())
