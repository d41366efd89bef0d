"""A python-socketio AsyncClient (PyPI python-socketio) remote-controlled by a test.

Reads one JSON command per line on stdin and prints one JSON event per line on stdout:

  {"op":"connect","url":"http://…","token":"…","transports":["websocket"]}
  {"op":"emit","event":"sub","args":["news"]}        with an ack: {"op":"call",…} prints "ack"
  {"op":"transport"}                                 prints the transport in use
  {"op":"disconnect"}

Events: connected, connect_error, disconnected, event (name, args), ack (event, answer), error.
"""

import asyncio
import json
import sys

import socketio


def emit(event, **fields):
    print(json.dumps({"event": event, **fields}), flush=True)


async def main():
    sio = None

    def client(reconnection):
        """A client with the handlers that report its events."""
        sio = socketio.AsyncClient(reconnection=reconnection, reconnection_delay=0.2, reconnection_delay_max=1)

        @sio.event
        async def connect():
            emit("connected", sid=sio.sid, transport=sio.transport())

        @sio.event
        async def connect_error(data):
            emit("connect_error", data=data)

        @sio.event
        async def disconnect(reason=None):
            emit("disconnected", reason=str(reason))

        @sio.on("*")
        async def any_event(name, *args):
            emit("event", name=name, args=list(args))

        return sio

    reader = asyncio.StreamReader()
    loop = asyncio.get_running_loop()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    while line := await reader.readline():
        command = json.loads(line)
        op = command["op"]
        try:
            if op == "connect":
                sio = client(command.get("reconnection", False))
                await sio.connect(command["url"], auth={"token": command["token"]},
                                  transports=command.get("transports"), wait_timeout=10)
            elif op == "emit":
                await sio.emit(command["event"], tuple(command["args"]))
            elif op == "call":
                answer = await sio.call(command["event"], tuple(command["args"]), timeout=10)
                emit("ack", name=command["event"], answer=answer)
            elif op == "transport":
                emit("transport", name=sio.transport())
            elif op == "disconnect":
                await sio.disconnect()
        except Exception as error:  # reported to the test, which decides
            emit("error", op=op, type=type(error).__name__, message=str(error))
    if sio is not None:
        await sio.disconnect()


asyncio.run(main())
