"""Muting kinds from the page, through the real push functions (`herald-functions`: `prefs.get`,
`prefs.set`) and the gateway, which follows the user's entry in KV `herald-prefs` live.

The gateway applies a change a moment after `prefs.set` answers (it watches the bucket). A second
device of the same user (`MuteProbe`), joined to a topic of its own that the page never sees, shows
when a change is in effect: muted kinds are per user, for every socket of the user on the gateway. The
page itself only ever gets the test's messages.
"""

import json
import time
import uuid

from playwright.sync_api import expect

from demo import Demo


class MuteProbe:
    """A second page of the same user (device `probe`) subscribed to a topic of its own. `wait_until`
    publishes a message of `kind`, then one without a kind, to that topic, until the first is
    dropped (`muted=True`) or shown (`muted=False`): the connection delivers in seq order, so once
    the second is shown the first was either shown before it or dropped."""

    def __init__(self, context, gateway, nats, user):
        self.nats = nats
        self.demo = Demo(context.new_page(), gateway).open(user, device="probe")
        self.topic = "probe-" + uuid.uuid4().hex[:8]
        self.demo.subscribe(self.topic)
        expect(self.demo.topic(self.topic)).to_have_attribute("data-state", "subscribed")

    def wait_until(self, kind, muted, timeout=15.0):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            probe = self.nats.publish(f"push.topic.{self.topic}", {"probe": kind}, kind=kind)
            marker = self.nats.publish(f"push.topic.{self.topic}", {"marker": probe})
            self.demo.wait_for_message(marker)
            if (self.demo.message(probe).count() == 0) == muted:
                return
        raise AssertionError(f"the gateway did not {'mute' if muted else 'unmute'} {kind!r} within {timeout} s")


def test_muting_a_kind_on_the_page_stops_it_and_unmuting_lets_it_through_live(page, context, gateway, functions, nats, user):
    demo = Demo(page, gateway).open(user)
    status = page.get_by_test_id("mute-status")
    expect(status).to_have_text("Nothing muted.")  # prefs.get answered by herald-functions
    expect(status).to_have_attribute("data-available", "true")
    probe = MuteProbe(context, gateway, nats, user)
    subject = f"push.user.{user}"

    page.get_by_test_id("mute-input").fill("marketing")
    page.get_by_test_id("mute-save").click()
    expect(status).to_have_text("Saved. Muted: marketing")
    probe.wait_until("marketing", muted=True)

    muted = nats.publish(subject, {"text": "50% off everything"}, kind="marketing")
    normal = nats.publish(subject, {"text": "you've got mail"}, kind="mail")
    demo.wait_for_message(normal)
    expect(demo.message(muted)).to_have_count(0)
    assert demo.seqs() == [normal], "the muted message was shown (it would come before the normal one)"
    result = demo.call("prefs.get")
    expect(result).to_have_attribute("data-ok", "true")
    assert json.loads(result.text_content()) == {"muted": ["marketing"]}

    # Un-muted on the page: marketing arrives again, on the same connection.
    page.get_by_test_id("mute-input").fill("")
    page.get_by_test_id("mute-save").click()
    expect(status).to_have_text("Saved. Nothing muted.")
    probe.wait_until("marketing", muted=False)

    again = nats.publish(subject, {"text": "last chance"}, kind="marketing")
    expect(demo.wait_for_message(again)).to_have_attribute("data-kind", "marketing")
    assert demo.seqs() == [normal, again]
    expect(demo.message(muted)).to_have_count(0)
    demo.expect_state("open")
    assert len(demo.sockets) == 1, "the page reconnected: the change was not live"
