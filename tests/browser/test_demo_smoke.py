"""The demo page connects by itself in dev mode and shows what is published to its user."""

from playwright.sync_api import expect


def test_demo_page_shows_a_published_message(page, gateway, user):
    page.goto(f"{gateway.url}/?user={user}&device=d1")
    expect(page.get_by_test_id("state")).to_have_attribute("data-state", "open", timeout=15_000)
    expect(page.get_by_test_id("hint-nats")).to_have_text(f"nats pub push.user.{user} '{{\"text\":\"hi\"}}'")

    seq = gateway.publish(f"push.user.{user}", {"text": "hi"}, kind="mail")

    item = page.locator(f"[data-testid=message][data-seq='{seq}']")
    expect(item).to_have_attribute("data-kind", "mail", timeout=10_000)
    expect(item).to_contain_text('"text": "hi"')
