"""STOMP over SockJS in Chromium, as a page written for Spring's `withSockJS()` endpoint connects:
sockjs-client itself (Debian's node-sockjs-client, the library such pages load) on a test page at
the gateway's origin, STOMP frames written by the page. Messages arrive over SockJS's WebSocket
transport, and over each fallback of a page whose WebSocket cannot get through (XHR streaming,
EventSource, XHR polling); the gateway is restarted while the page is open and the page reconnects
with `herald-since`, as such pages reconnect: what was published meanwhile arrives once, in order.
"""

import json
import os
import pathlib

import pytest
from playwright.sync_api import expect

SOCKJS = pathlib.Path(os.environ.get("HERALD_SOCKJS_CLIENT", "/usr/share/nodejs/sockjs-client/dist/sockjs.min.js"))

SCRIPT = """
  const list = document.createElement("ol");
  list.id = "events";
  document.body.append(list);
  window.events = [];
  let last = null;
  function log(type, fields) {
    window.events.push({type, ...fields});
    const item = document.createElement("li");
    item.dataset.type = type;
    if (fields.seq) item.dataset.seq = fields.seq;
    item.textContent = `${type} ${JSON.stringify(fields)}`;
    document.getElementById("events").append(item);
  }
  function frame(command, headers, body = "") {
    return command + "\\n" + Object.entries(headers).map(([k, v]) => `${k}:${v}`).join("\\n") + "\\n\\n" + body + "\\0";
  }
  function parse(text) {
    const [head, ...rest] = text.split("\\n\\n");
    const [command, ...lines] = head.split("\\n");
    const headers = Object.fromEntries(lines.map((line) => [line.slice(0, line.indexOf(":")), line.slice(line.indexOf(":") + 1)]));
    return {command, headers, body: rest.join("\\n\\n").replace(/\\0$/, "")};
  }
  function connect() {
    const sock = new SockJS("/stomp?token=%(token)s", null, {transports: ["%(transport)s"]});
    sock.onopen = () => {
      const headers = {"accept-version": "1.1,1.0", "heart-beat": "0,0"};
      if (last !== null) headers["herald-since"] = last;
      sock.send(frame("CONNECT", headers));
    };
    sock.onmessage = (event) => {
      if (event.data.trim() === "") return;
      const stomp = parse(event.data);
      if (stomp.command === "CONNECTED") {
        log("connected", {transport: sock.transport});
        sock.send(frame("SUBSCRIBE", {id: "sub-0", destination: "/user/queue/inbox"}));
        sock.send(frame("SUBSCRIBE", {id: "sub-1", destination: "/topic/all", receipt: "ready"}));
      } else if (stomp.command === "RECEIPT") {
        log("ready", {});
      } else if (stomp.command === "MESSAGE") {
        last = stomp.headers["message-id"];
        log("message", {seq: last, destination: stomp.headers.destination, body: stomp.body});
      } else {
        log(stomp.command.toLowerCase(), {headers: stomp.headers, body: stomp.body});
      }
    };
    sock.onclose = (event) => {
      log("close", {code: event.code});
      setTimeout(connect, 200);
    };
  }
  connect();
"""


@pytest.fixture(params=["websocket", "xhr-streaming", "eventsource", "xhr-polling"])
def transport(request):
    return request.param


@pytest.fixture
def sockjs_page(page, gateway, user, transport):
    if not SOCKJS.is_file():
        pytest.skip(f"no sockjs-client at {SOCKJS} (scripts/test-browser installs node-sockjs-client)")
    token = gateway.token(user, 600)
    # A page of the gateway's own origin (Chromium lets a page reach 127.0.0.1 only from there),
    # with the library and the page's script added.
    page.goto(f"{gateway.url}/healthz")
    page.add_script_tag(path=str(SOCKJS))
    page.add_script_tag(content=SCRIPT % {"token": token, "transport": transport})
    expect(page.locator("li[data-type=ready]")).to_have_count(1)
    return page


def messages(page):
    return [(int(e["seq"]), e["destination"], e["body"]) for e in page.evaluate("window.events") if e["type"] == "message"]


def test_sockjs_client_receives_messages_and_a_gateway_restart_loses_nothing(sockjs_page, gateway, nats, user, transport):
    page = sockjs_page
    connected = [e for e in page.evaluate("window.events") if e["type"] == "connected"]
    assert connected == [{"type": "connected", "transport": transport}]
    first = nats.publish(f"push.user.{user}", {"n": 1})
    everyone = nats.publish("push.all", {"n": 2})
    expect(page.locator(f"li[data-type=message][data-seq='{everyone}']")).to_have_count(1)

    assert gateway.stop() == 0, "the gateway did not stop cleanly on SIGTERM"
    expect(page.locator("li[data-type=close]").first).to_be_attached()
    while_down = [nats.publish(f"push.user.{user}", {"n": 3}), nats.publish("push.all", {"n": 4})]
    gateway.start()

    expect(page.locator("li[data-type=ready]")).to_have_count(2)
    last = nats.publish(f"push.user.{user}", {"n": 5})
    expect(page.locator(f"li[data-type=message][data-seq='{last}']")).to_have_count(1)
    inbox, all_ = "/user/queue/inbox", "/topic/all"
    assert messages(page) == [
        (first, inbox, '{"n": 1}'),
        (everyone, all_, '{"n": 2}'),
        (while_down[0], inbox, '{"n": 3}'),
        (while_down[1], all_, '{"n": 4}'),
        (last, inbox, '{"n": 5}'),
    ]
    assert [e["code"] for e in page.evaluate("window.events") if e["type"] == "close"][0] == 1012


def test_a_long_session_goes_on_across_responses_and_polls(sockjs_page, nats, user, transport):
    """About 320 KiB of messages: sockjs-client opens the next XHR stream or event stream when the
    gateway ends one after 128 KiB (and polls again after each poll), and the page gets each message
    once, in order, on the same session (a failure without the cut: one stream carried it all)."""
    page = sockjs_page
    requests = []
    page.on("request", lambda request: requests.append(request.url))
    published = []
    for n in range(40):
        body = {"n": n, "pad": "x" * 8000}
        published.append((nats.publish(f"push.user.{user}", body), "/user/queue/inbox", json.dumps(body)))
    expect(page.locator("li[data-type=message]")).to_have_count(40)
    assert messages(page) == published
    assert [e for e in page.evaluate("window.events") if e["type"] == "close"] == []
    transports = ("xhr_streaming", "eventsource", "xhr")
    receiving = [url for url in requests if url.split("?")[0].rsplit("/", 1)[-1] in transports]
    if transport == "websocket":
        assert receiving == []
    else:
        # Streams: the first one ended after 128 KiB, and the next; polls: many.
        assert len(receiving) >= 2, receiving
