"""What the demo page looks like with messages, a topic, muted kinds and an rpc result, on a laptop and
a phone, with the push functions running (as in the dev stack).

Saves tests/artifacts/demo.png and tests/artifacts/demo-phone.png (git-ignored; for CI to keep as
artifacts) and checks that nothing overflows sideways at phone width.
"""

import uuid

from playwright.sync_api import expect

from demo import Demo


def test_screenshot_of_the_page_with_messages(page, gateway, functions, nats, user, echo_function, artifacts):
    page.set_viewport_size({"width": 1000, "height": 900})
    demo = Demo(page, gateway).open(user, device="laptop")
    topic = "news-" + uuid.uuid4().hex[:6]
    demo.subscribe(topic)
    expect(demo.topic(topic)).to_have_attribute("data-state", "subscribed")

    seqs = [
        nats.publish(f"push.user.{user}", {"text": "Your order has shipped", "order": 1042}, kind="mail"),
        nats.publish(f"push.topic.{topic}", {"headline": "Herald 1.0 released"}, kind="news"),
        nats.publish(f"push.user.{user}", "plain text, not JSON"),
        nats.publish(f"push.user.{user}", {"from": "ana", "text": "lunch?"}, kind="chat"),
    ]
    demo.wait_for_message(seqs[-1])
    assert demo.seqs() == seqs
    expect(demo.call("echo", '{"text": "ping"}')).to_have_attribute("data-ok", "true")
    expect(page.get_by_test_id("mute-status")).to_have_text("Nothing muted.")

    page.screenshot(path=artifacts / "demo.png", full_page=True)

    page.set_viewport_size({"width": 390, "height": 844})
    overflow = page.evaluate("document.documentElement.scrollWidth - document.documentElement.clientWidth")
    assert overflow <= 0, f"the page is {overflow} px wider than a 390 px phone screen"
    page.screenshot(path=artifacts / "demo-phone.png", full_page=True)
