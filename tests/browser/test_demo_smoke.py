"""The demo page connects by itself in dev mode and shows what is published to its user: with the
commands its hints show (`nats pub`, `herald-gateway pub`, as the dev stack's `publisher` NATS user)
and from a backend's NATS client (nats-py)."""

import json

from playwright.sync_api import expect

from demo import Demo


def test_demo_page_shows_published_messages(page, gateway, nats, user):
    demo = Demo(page, gateway).open(user)
    expect(page.get_by_test_id("identity")).to_contain_text(f"user {user} · device d1")
    # nats.conf has no anonymous user: the hints publish as `publisher`, with the dev stack's default
    # password (scripts/dev), and say so.
    expect(page.get_by_test_id("hint-nats")).to_have_text(
        f"nats pub --user publisher --password dev-publisher push.user.{user} '{{\"text\":\"hi\"}}'"
    )
    hint_gateway = page.get_by_test_id("hint-gateway")
    expect(hint_gateway).to_have_text(
        f"HERALD_NATS_USER=publisher HERALD_NATS_PASSWORD=dev-publisher target/release/herald-gateway pub push.user.{user} '{{\"text\":\"hi\"}}'"
    )
    expect(page.get_by_test_id("hint-note")).to_contain_text("dev-publisher is its default password in the dev stack")

    first = gateway.pub(f"push.user.{user}", {"text": "hi"}, kind="mail")
    item = demo.wait_for_message(first)
    expect(item).to_have_attribute("data-kind", "mail")
    expect(item).to_have_attribute("data-to", "user")
    assert json.loads(item.locator("pre").text_content()) == {"text": "hi"}

    second = nats.publish(f"push.user.{user}", "plain text", msg_id="order-7")
    expect(demo.wait_for_message(second)).to_have_attribute("data-kind", "")
    expect(demo.message(second).locator("pre")).to_have_text("plain text")

    # The gateway hint, run as shown (the tests' NATS has its own publisher password).
    third = gateway.run_hint(hint_gateway.text_content())
    assert json.loads(demo.wait_for_message(third).locator("pre").text_content()) == {"text": "hi"}
    assert demo.seqs() == [first, second, third]
    expect(page.get_by_test_id("message-count")).to_have_text("3")


def test_demo_page_requests_nothing_missing(context, gateway, user):
    """Every request the page makes is answered, and it names its icon, so a browser does not ask for a
    /favicon.ico the gateway does not serve (headless Chromium never asks: the declaration is checked)."""
    page = context.new_page()
    failed = []
    page.on("response", lambda response: response.status >= 400 and failed.append(f"{response.status} {response.url}"))
    Demo(page, gateway).open(user)
    expect(page.get_by_test_id("identity")).to_contain_text(f"user {user}")
    expect(page.locator("link[rel=icon]")).to_have_attribute("href", "data:,")
    assert failed == []
