"""Server-Sent Events in Chromium with the browser's own EventSource, no library: a test page served
at the gateway's origin (intercepted by Playwright) opens `/sse`, and its events are checked.
"""

from playwright.sync_api import expect

PAGE = """<!doctype html>
<meta charset="utf-8">
<title>SSE test page</title>
<ol id="events"></ol>
<script>
  window.events = [];
  const source = new EventSource("/sse?token=%(token)s&device=page");
  function log(type, event) {
    window.events.push({type, id: event.lastEventId, data: event.data});
    const item = document.createElement("li");
    item.dataset.type = type;
    item.dataset.id = event.lastEventId;
    item.textContent = `${type} ${event.lastEventId} ${event.data}`;
    document.getElementById("events").append(item);
  }
  for (const type of ["welcome", "message", "replayed", "close"]) {
    source.addEventListener(type, (event) => log(type, event));
  }
</script>
"""


def open_page(page, gateway, user):
    token = gateway.token(user, 600)
    url = f"{gateway.url}/sse-test-page"
    page.route(url, lambda route: route.fulfill(content_type="text/html", body=PAGE % {"token": token}))
    page.goto(url)
    expect(page.locator("li[data-type=welcome]")).to_have_count(1)


def message_ids(page):
    return [int(event["id"]) for event in page.evaluate("window.events") if event["type"] == "message"]


def test_events_arrive_and_a_gateway_restart_loses_nothing_and_repeats_nothing(page, gateway, nats, user):
    open_page(page, gateway, user)
    first = nats.publish(f"push.user.{user}", {"n": 1})
    expect(page.locator(f"li[data-type=message][data-id='{first}']")).to_have_text(f'message {first} {{"n": 1}}')

    assert gateway.stop() == 0, "the gateway did not stop cleanly on SIGTERM"
    # The stream ended with a close event saying the gateway restarts; the browser reconnects by itself.
    expect(page.locator("li[data-type=close]")).to_have_count(1)
    while_down = [nats.publish(f"push.user.{user}", {"n": 2}), nats.publish("push.all", {"n": 3})]
    gateway.start()

    # The browser's reconnect carries Last-Event-ID: the replay brings exactly what it missed.
    expect(page.locator("li[data-type=replayed]")).to_have_count(1)
    last = nats.publish(f"push.user.{user}", {"n": 4})
    expect(page.locator(f"li[data-type=message][data-id='{last}']")).to_have_count(1)
    assert message_ids(page) == [first, *while_down, last]
    replayed = [e for e in page.evaluate("window.events") if e["type"] == "replayed"][0]
    assert '"count":2' in replayed["data"] and f'"from":{first + 1}' in replayed["data"]
