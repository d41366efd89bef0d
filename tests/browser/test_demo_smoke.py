"""The demo page connects by itself in dev mode and shows what is published to its user."""

import json

from playwright.sync_api import expect

from demo import Demo


def test_demo_page_shows_a_published_message(page, gateway, user):
    demo = Demo(page, gateway).open(user)
    expect(page.get_by_test_id("identity")).to_contain_text(f"user {user} · device d1")
    expect(page.get_by_test_id("hint-nats")).to_have_text(f"nats pub push.user.{user} '{{\"text\":\"hi\"}}'")

    seq = gateway.publish(f"push.user.{user}", {"text": "hi"}, kind="mail")

    item = demo.wait_for_message(seq)
    expect(item).to_have_attribute("data-kind", "mail")
    expect(item).to_have_attribute("data-to", "user")
    assert json.loads(item.locator("pre").text_content()) == {"text": "hi"}
    assert demo.seqs() == [seq]
    expect(page.get_by_test_id("message-count")).to_have_text("1")
