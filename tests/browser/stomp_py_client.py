"""A STOMP 1.2 client on stomp.py's WebSocket transport, driven by tests/tests/stomp.rs.

Usage: stomp_py_client.py HOST PORT TOKEN. Prints one JSON object per line: `ready` once its
subscriptions are confirmed, each MESSAGE, the reply of SEND /app/echo, then `done`.
"""
import json
import sys
import threading

import stomp


def say(**event):
    print(json.dumps(event), flush=True)


class Listener(stomp.ConnectionListener):
    def __init__(self):
        self.receipts = set()
        self.messages = []
        self.changed = threading.Condition()

    def on_receipt(self, frame):
        with self.changed:
            self.receipts.add(frame.headers["receipt-id"])
            self.changed.notify_all()

    def on_message(self, frame):
        with self.changed:
            self.messages.append(frame)
            self.changed.notify_all()

    def on_error(self, frame):
        say(event="error", headers=frame.headers, body=frame.body)

    def wait(self, what, condition):
        with self.changed:
            if not self.changed.wait_for(condition, timeout=15):
                say(event="timeout", waiting_for=what)
                sys.exit(1)


def main():
    host, port, token = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    conn = stomp.WSStompConnection([(host, port)], ws_path="/stomp", heartbeats=(1000, 1000),
                                   header={"Sec-WebSocket-Protocol": "v12.stomp"})
    listener = Listener()
    conn.set_listener("", listener)
    conn.connect(passcode=token, wait=True, headers={"herald-device": "python"})
    conn.subscribe("/user/queue/inbox", id="inbox", ack="client-individual", headers={"receipt": "inbox"})
    conn.subscribe("/topic/news", id="news", ack="auto", headers={"receipt": "news"})
    listener.wait("receipts", lambda: {"inbox", "news"} <= listener.receipts)
    say(event="ready")

    listener.wait("two messages", lambda: len(listener.messages) >= 2)
    for frame in listener.messages[:2]:
        say(event="message", headers=frame.headers, body=frame.body)
        if frame.headers["subscription"] == "inbox":
            conn.ack(frame.headers["ack"])

    conn.send("/app/echo", json.dumps({"from": "stomp.py"}), content_type="application/json",
              headers={"reply-to": "/user/queue/inbox", "correlation-id": "py-1"})
    listener.wait("the reply", lambda: len(listener.messages) >= 3)
    reply = listener.messages[2]
    say(event="reply", headers=reply.headers, body=reply.body)
    conn.disconnect(receipt="bye")
    say(event="done")


main()
