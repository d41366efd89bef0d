"""The demo page connects by itself in dev mode and shows what is published to its user: with the
command its hint shows (`herald-gateway pub`) and from a backend's NATS client (nats-py)."""

import json

from playwright.sync_api import expect

from demo import Demo


def test_demo_page_shows_published_messages(page, gateway, nats, user):
    demo = Demo(page, gateway).open(user)
    expect(page.get_by_test_id("identity")).to_contain_text(f"user {user} · device d1")
    expect(page.get_by_test_id("hint-gateway")).to_have_text(f"herald-gateway pub push.user.{user} '{{\"text\":\"hi\"}}'")

    first = gateway.pub(f"push.user.{user}", {"text": "hi"}, kind="mail")
    item = demo.wait_for_message(first)
    expect(item).to_have_attribute("data-kind", "mail")
    expect(item).to_have_attribute("data-to", "user")
    assert json.loads(item.locator("pre").text_content()) == {"text": "hi"}

    second = nats.publish(f"push.user.{user}", "plain text", msg_id="order-7")
    expect(demo.wait_for_message(second)).to_have_attribute("data-kind", "")
    expect(demo.message(second).locator("pre")).to_have_text("plain text")
    assert demo.seqs() == [first, second]
    expect(page.get_by_test_id("message-count")).to_have_text("2")
