"""A page of another origin than the gateway's, as an app served from its own domain: Chromium
enforces CORS, so its EventSource on `/sse`, its Socket.IO polling requests (with credentials, and
with a header that needs a preflight) and its import of `/herald.js` work only if the gateway's
answers allow that origin. The page comes from a server of its own on another port (another origin,
on loopback as the gateway: Chromium keeps pages of unknown address, as Playwright's routed ones, off
loopback whatever the answers say).
"""

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from playwright.sync_api import expect

PAGE = """<!doctype html>
<meta charset="utf-8">
<title>another origin</title>
<ol id="results"></ol>
<script type="module">
  const gateway = "%(gateway)s";
  function note(name, value) {
    const item = document.createElement("li");
    item.dataset.name = name;
    item.textContent = String(value);
    document.getElementById("results").append(item);
  }
  const source = new EventSource(`${gateway}/sse?token=%(token)s&device=elsewhere`);
  source.addEventListener("welcome", () => note("sse", "welcome"));
  source.addEventListener("message", (event) => note("sse", event.lastEventId));
  source.onerror = () => note("sse-error", source.readyState);

  const polling = `${gateway}/socket.io/?EIO=4&transport=polling`;
  try {
    // A header of the app's own (socket.io's `extraHeaders`) makes Chromium ask first (OPTIONS).
    const open = await fetch(polling, {credentials: "include", headers: {"X-App": "1"}});
    const sid = JSON.parse((await open.text()).slice(1)).sid;
    const session = `${polling}&sid=${sid}`;
    const connect = `40${JSON.stringify({token: "%(token)s"})}`;
    const sent = await fetch(session, {method: "POST", credentials: "include", body: connect});
    note("polling-post", await sent.text());
    note("polling-connect", (await (await fetch(session, {credentials: "include"})).text()).slice(0, 3));
  } catch (error) {
    note("polling-error", error);
  }

  try {
    const module = await import(`${gateway}/herald.js`);
    note("module", typeof module.buildUrl);
  } catch (error) {
    note("module-error", error);
  }
</script>
"""


def serve_page(body):
    """An HTTP server on a free loopback port answering every GET with `body`; returns it."""

    class Page(BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.send_header("Content-Type", "text/html; charset=utf-8")
            self.end_headers()
            self.wfile.write(body.encode())

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Page)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def test_a_page_of_another_origin_reads_sse_socketio_polling_and_imports_herald_js(page, gateway, nats, user):
    token = gateway.token(user, 600)
    server = serve_page(PAGE % {"gateway": gateway.url, "token": token})
    try:
        page.goto(f"http://127.0.0.1:{server.server_address[1]}/app")
        check_page(page, nats, user)
    finally:
        server.shutdown()


def check_page(page, nats, user):
    expect(page.locator("li[data-name=sse]")).to_have_text(["welcome"])
    sent = nats.publish(f"push.user.{user}", {"n": 1})
    expect(page.locator("li[data-name=sse]")).to_have_text(["welcome", str(sent)])
    expect(page.locator("li[data-name=polling-post]")).to_have_text("ok")
    expect(page.locator("li[data-name=polling-connect]")).to_have_text("40{")
    expect(page.locator("li[data-name=module]")).to_have_text("function")
    assert page.locator("li[data-name$=-error]").all_text_contents() == []
