"""The demo page as the tests see it: its stable hooks (`data-testid`, `data-*`), one method each.

Waits are Playwright's (`expect`, bounded by the timeout set in conftest.py); nothing sleeps.
"""

from urllib.parse import parse_qs, urlparse

from playwright.sync_api import Page, expect


class Demo:
    def __init__(self, page: Page, gateway):
        self.page = page
        self.gateway = gateway
        # Every WebSocket the page opens, in order: their URLs show the `since` and token of each attempt.
        self.sockets = []
        page.on("websocket", lambda socket: self.sockets.append(socket))

    # --- connection ------------------------------------------------------------------------

    def open(self, user, device="d1", wait=True):
        """Opens the page for `user` on `device`; it fetches a dev token and connects by itself."""
        self.page.goto(f"{self.gateway.url}/?user={user}&device={device}")
        if wait:
            self.expect_state("open")
        return self

    @property
    def state(self):
        return self.page.get_by_test_id("state")

    def expect_state(self, state, code=None):
        expect(self.state).to_have_attribute("data-state", state)
        if code is not None:
            expect(self.state).to_have_attribute("data-code", str(code))

    def socket_params(self, index=-1):
        """The query parameters of one of the page's WebSocket URLs (default: the last)."""
        return {key: values[0] for key, values in parse_qs(urlparse(self.sockets[index].url).query).items()}

    # --- messages --------------------------------------------------------------------------

    def message(self, seq):
        return self.page.locator(f"[data-testid=message][data-seq='{seq}']")

    def wait_for_message(self, seq):
        expect(self.message(seq)).to_have_count(1)
        return self.message(seq)

    def seqs(self):
        """The seqs of the messages shown, in the order they arrived (the page shows newest first)."""
        return self.page.get_by_test_id("message").evaluate_all("items => items.map((item) => Number(item.dataset.seq)).reverse()")

    # --- the inbox -------------------------------------------------------------------------

    @property
    def unread(self):
        return self.page.get_by_test_id("unread")

    def mark_all_read(self):
        self.page.get_by_test_id("mark-read").click()

    # --- the event log ---------------------------------------------------------------------

    def log_entries(self, event, **attributes):
        """Lines of the event log for one kind of event (`state`, `replayed`, `error`, `subscribed`,
        `unsubscribed`) with the given `data-*` values, e.g. `log_entries("state", code=1012)`."""
        selector = f"[data-testid=log] li[data-event='{event}']"
        for key, value in attributes.items():
            selector += f"[data-{key}='{value}']"
        return self.page.locator(selector)

    # --- topics and rpc --------------------------------------------------------------------

    def subscribe(self, topic, since=None):
        self.page.get_by_test_id("topic-input").fill(topic)
        self.page.get_by_test_id("topic-since").fill("" if since is None else str(since))
        self.page.get_by_test_id("topic-subscribe").click()

    def topic(self, topic):
        return self.page.locator(f"[data-testid=topic][data-topic='{topic}']")

    def call(self, fn, data="{}"):
        """Calls a push function from the page's rpc form; returns the result element."""
        self.page.get_by_test_id("rpc-fn").fill(fn)
        self.page.get_by_test_id("rpc-data").fill(data)
        self.page.get_by_test_id("rpc-call").click()
        return self.page.get_by_test_id("rpc-result")
