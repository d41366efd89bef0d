"""Topics and push functions from the page: subscribe (with a replay), unsubscribe, rpc round trips."""

import json
import uuid
from urllib.parse import urlparse

from playwright.sync_api import expect

from demo import Demo


def test_topic_subscribe_with_since_then_live_then_unsubscribe(page, gateway, nats, user):
    demo = Demo(page, gateway).open(user)
    topic = "news-" + uuid.uuid4().hex[:8]
    stored = nats.publish(f"push.topic.{topic}", {"headline": "before the subscription"})

    demo.subscribe(topic, since=stored - 1)
    expect(demo.topic(topic)).to_have_attribute("data-state", "subscribed")
    expect(demo.log_entries("replayed", topic=topic, count=1)).to_have_count(1)
    live = nats.publish(f"push.topic.{topic}", {"headline": "live"}, kind="news")
    expect(demo.wait_for_message(live)).to_have_attribute("data-to", f"topic:{topic}")
    expect(demo.message(stored)).to_have_attribute("data-to", f"topic:{topic}")
    assert demo.seqs() == [stored, live]

    demo.topic(topic).get_by_test_id("topic-unsubscribe").click()
    expect(demo.log_entries("unsubscribed", topic=topic)).to_have_count(1)
    expect(demo.topic(topic)).to_have_count(0)
    nats.publish(f"push.topic.{topic}", {"headline": "after leaving"})
    last = nats.publish(f"push.user.{user}", {"text": "still connected"})
    demo.wait_for_message(last)
    assert demo.seqs() == [stored, live, last], "a topic message arrived after unsub"


def test_a_topic_outside_the_token_claim_is_refused_and_the_connection_stays(page, gateway, nats, user):
    # The page's token function gets tokens allowed only `news-*` (signed by the test).
    page.route(
        lambda url: urlparse(url).path == "/dev/token",
        lambda route: route.fulfill(json={"user": user, "token": gateway.token(user, 3600, topics=["news-*"])}),
    )
    demo = Demo(page, gateway).open(user)

    demo.subscribe("secret")
    expect(demo.log_entries("error", code="forbidden", topic="secret")).to_have_count(1)
    expect(demo.topic("secret")).to_have_count(0)
    allowed = "news-" + uuid.uuid4().hex[:8]
    demo.subscribe(allowed)
    expect(demo.topic(allowed)).to_have_attribute("data-state", "subscribed")
    nats.publish("push.topic.secret", {"text": "not for this user"})
    seq = nats.publish(f"push.topic.{allowed}", {"text": "allowed"})
    demo.wait_for_message(seq)
    assert demo.seqs() == [seq]
    demo.expect_state("open")
    assert len(demo.sockets) == 1, "the refusal cost the connection"


def test_rpc_round_trip_through_a_push_function(page, gateway, nats, user, echo_function):
    demo = Demo(page, gateway).open(user)

    result = demo.call("echo", '{"text": "ping", "n": 1}')
    expect(result).to_have_attribute("data-ok", "true")
    assert json.loads(result.text_content()) == {"echo": {"text": "ping", "n": 1}, "user": user}
    # The function saw who called, from the connection (never from the frame).
    [call] = echo_function.calls
    assert call["headers"]["Herald-User"] == user
    assert call["headers"]["Herald-Device"] == "d1"
    assert call["headers"]["Herald-Conn"] == page.evaluate("herald.session.conn")


def test_rpc_to_a_function_nobody_serves_shows_no_function(page, gateway, user):
    demo = Demo(page, gateway).open(user)

    result = demo.call("nobody.home")
    expect(result).to_have_attribute("data-ok", "false")
    assert result.text_content().startswith("no_function: ")


def test_disconnect_then_connect_keeps_the_topics(page, gateway, nats, user):
    """Disconnect and Connect: the page keeps its client, which rejoins its topics and resumes from its
    last seq (what was published meanwhile is replayed)."""
    topic = f"t-{user}"
    demo = Demo(page, gateway).open(user)
    demo.subscribe(topic)
    expect(demo.topic(topic)).to_have_attribute("data-state", "subscribed")
    first = nats.publish(f"push.topic.{topic}", {"n": 1})
    demo.wait_for_message(first)
    page.get_by_test_id("disconnect").click()
    demo.expect_state("closed", 1000)
    missed = nats.publish(f"push.topic.{topic}", {"n": 2})
    page.get_by_test_id("connect").click()
    demo.expect_state("open")
    expect(demo.topic(topic)).to_have_count(1)
    assert demo.socket_params()["topics"] == topic
    assert demo.socket_params()["since"] == str(first)
    demo.wait_for_message(missed)
    live = nats.publish(f"push.topic.{topic}", {"n": 3})
    demo.wait_for_message(live)
    assert demo.seqs() == [first, missed, live]
