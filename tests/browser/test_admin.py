"""The admin page (`/admin` on the gateway's API listener) against a running stack: the gateway, the real
push functions, NATS. Each panel shows real data; a re-drive delivers a dead-lettered push; a disconnect
closes the user's sockets with 4003."""

import json
import time
import urllib.request
import uuid

from playwright.sync_api import expect

from demo import Demo


def api(gateway, path):
    """What the page reads, read by the test itself (the same endpoint, the same key)."""
    request = urllib.request.Request(gateway.api_url + path, headers={"Authorization": f"Bearer {gateway.api_key}"})
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())


class Admin:
    def __init__(self, page, gateway):
        self.page, self.gateway = page, gateway
        # Purge asks for confirmation.
        page.on("dialog", lambda dialog: dialog.accept())

    def open(self):
        self.page.goto(self.gateway.api_url + "/admin")
        self.page.get_by_test_id("key").fill(self.gateway.api_key)
        self.page.get_by_test_id("key-save").click()
        expect(self.page.locator("body")).to_have_attribute("data-loaded", "true")
        return self

    def refresh(self):
        self.page.evaluate("document.body.dataset.loaded = ''")
        self.page.get_by_test_id("refresh").click()
        expect(self.page.locator("body")).to_have_attribute("data-loaded", "true")

    def t(self, testid):
        return self.page.get_by_test_id(testid)

    def look_up(self, user):
        self.t("user-id").fill(user)
        self.t("user-lookup").click()
        expect(self.t("user-details")).to_be_visible()


def seed_dead_letter(nats, subject, data, error="downstream unavailable"):
    """A dead letter of `notify` exactly as the functions write one (docs/functions.md) after giving up on
    an event: an event whose pushes could not be stored (say the stream was unavailable for longer than its
    retries). Returns its sequence in HERALD_DLQ."""
    letter = {
        "function": "notify", "subject": subject, "stream": "HERALD_EVENTS", "seq": 1, "attempts": 5,
        "error": error, "data": data, "ts": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    ack = nats.run(nats.js.publish("herald.dlq.notify", json.dumps(letter).encode(),
                                   headers={"Nats-Msg-Id": "seeded-" + uuid.uuid4().hex}))
    return ack.seq


def test_each_panel_shows_the_running_stack(page, context, gateway, functions, nats, user, artifacts):
    demo = Demo(page, gateway).open(user)
    seq = nats.publish(f"push.user.{user}", {"text": "hi"})
    demo.wait_for_message(seq)
    expect(page.get_by_test_id("mute-status")).to_contain_text("Nothing muted")  # prefs.get answered
    letter = seed_dead_letter(nats, f"events.notify.{user}", {"to": {"users": [user]}, "data": {"n": 1}})

    admin = Admin(context.new_page(), gateway).open()
    gateways = api(gateway, "/v1/gateways")["gateways"]
    assert len(gateways) == 1
    node = gateways[0]["node"]
    row = admin.page.locator(f"[data-testid=gateway][data-node='{node}']")
    expect(row).to_contain_text(user)
    expect(row.locator("td").nth(1)).to_have_text("1")
    expect(admin.t("gateways-total")).to_have_text("1 gateway(s), 1 connection(s), 1 user(s)")

    stream = api(gateway, "/v1/stream")
    assert stream["last_seq"] == seq
    expect(admin.t("stream-last-seq")).to_have_text(str(seq))
    expect(admin.t("stream-messages")).to_have_text(str(stream["messages"]))
    expect(admin.t("stream-first-seq")).to_have_text(str(stream["first_seq"]))
    expect(admin.t("stream-per-subject")).to_have_text("1000")

    prefs_get = admin.page.locator("[data-testid=function][data-subject='herald.fn.prefs.get']")
    expect(prefs_get).to_have_count(1)
    requests = next(e["requests"] for s in api(gateway, "/v1/functions")["services"] for e in s["endpoints"]
                    if e["subject"] == "herald.fn.prefs.get")
    assert requests >= 1
    expect(prefs_get).to_have_attribute("data-requests", str(requests))
    expect(prefs_get).to_contain_text("herald-functions")
    expect(admin.page.locator("[data-testid=function-listed][data-function='notify']")).to_have_attribute("data-trigger", "durable")
    expect(admin.page.locator("[data-testid=function-listed][data-function='prefs.get']")).to_have_attribute("data-trigger", "rpc")

    notify = admin.page.locator("[data-testid=dead-letter-function-row][data-function='notify']")
    expect(notify).to_have_attribute("data-count", "1")
    notify.get_by_test_id("dead-letter-show").click()
    expect(admin.page.locator(f"[data-testid=dead-letter][data-seq='{letter}']")).to_contain_text(f"events.notify.{user}")

    admin.look_up(user)
    expect(admin.t("user-online")).to_have_text("yes")
    expect(admin.t("user-socket-count")).to_have_text("1")
    expect(admin.page.get_by_test_id("user-socket")).to_contain_text("d1")
    expect(admin.t("user-last")).to_have_text(str(seq))
    expect(admin.t("user-muted")).to_have_text("none")

    # The publish form reaches the user's page.
    admin.t("publish-target").fill(user)
    admin.t("publish-kind").fill("note")
    admin.t("publish-data").fill('{"from":"admin"}')
    admin.t("publish-send").click()
    expect(admin.t("publish-status")).to_contain_text("stored as seq")
    published = int(admin.t("publish-status").get_attribute("data-seq"))
    expect(demo.wait_for_message(published)).to_have_attribute("data-kind", "note")

    admin.page.screenshot(path=artifacts / "admin.png", full_page=True)

    # Clean up the seeded letter for the other tests.
    notify.get_by_test_id("dead-letter-purge").click()
    expect(admin.t("dead-letter-status")).to_have_text("purged 1 letter(s) of notify")
    expect(notify).to_have_count(0)


def test_redrive_delivers_a_dead_lettered_push(page, context, gateway, functions, nats, user):
    demo = Demo(page, gateway).open(user)
    letter = seed_dead_letter(nats, f"events.notify.{user}",
                              {"to": {"users": [user]}, "kind": "mail", "data": {"text": "at last"}})
    admin = Admin(context.new_page(), gateway).open()
    notify = admin.page.locator("[data-testid=dead-letter-function-row][data-function='notify']")
    expect(notify).to_have_attribute("data-count", "1")
    notify.get_by_test_id("dead-letter-show").click()
    row = admin.page.locator(f"[data-testid=dead-letter][data-seq='{letter}']")
    row.get_by_test_id("dead-letter-redrive").click()
    expect(admin.t("dead-letter-status")).to_contain_text(f"re-driven: letter {letter} published again to events.notify.{user}")
    # The real notify function handled the event again: the push reaches the user's page.
    item = demo.page.locator("[data-testid=message][data-kind='mail']")
    expect(item).to_have_count(1)
    assert json.loads(item.locator("pre").text_content()) == {"text": "at last"}
    expect(notify).to_have_count(0)
    expect(row).to_have_count(0)
    assert api(gateway, "/v1/dead-letters")["total"] == 0


def test_disconnect_closes_the_users_sockets_with_4003(page, context, gateway, user):
    phone = Demo(page, gateway).open(user, device="phone")
    laptop = Demo(context.new_page(), gateway).open(user, device="laptop")
    admin = Admin(context.new_page(), gateway).open()
    admin.look_up(user)
    expect(admin.page.get_by_test_id("user-socket")).to_have_count(2)
    admin.t("user-disconnect").click()
    expect(admin.t("user-status")).to_have_text("disconnected 2 socket(s) on 1 gateway(s)")
    phone.expect_state("closed", 4003)
    laptop.expect_state("closed", 4003)
    expect(admin.t("user-online")).to_have_text("no")
    expect(admin.page.get_by_test_id("user-socket")).to_have_count(0)


def test_a_wrong_key_says_so(context, gateway):
    admin = Admin(context.new_page(), gateway)
    admin.page.goto(gateway.api_url + "/admin")
    admin.t("key").fill("wrong-key")
    admin.t("key-save").click()
    expect(admin.t("key-status")).to_contain_text("401 unauthorized: missing or unknown API key")
    expect(admin.t("key-status")).to_have_attribute("data-ok", "false")
