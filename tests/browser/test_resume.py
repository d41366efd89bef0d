"""Nothing lost, nothing twice: the page across a gateway restart and across a page reload.

Each test ends with a message published after the page is back: the connection delivers in seq
order, so once that one is shown, everything before it has been, and the exact list can be checked.
"""

import uuid

from playwright.sync_api import expect

from demo import Demo


def test_gateway_restart_loses_nothing_and_shows_nothing_twice(page, gateway, nats, user):
    demo = Demo(page, gateway).open(user)
    topic = "room-" + uuid.uuid4().hex[:8]
    demo.subscribe(topic)
    expect(demo.topic(topic)).to_have_attribute("data-state", "subscribed")
    first = nats.publish(f"push.user.{user}", {"n": 1})
    demo.wait_for_message(first)

    assert gateway.stop() == 0, "the gateway did not stop cleanly on SIGTERM"
    # The gateway said it was restarting: the client reconnects at once (and, the gateway being
    # down, keeps trying with backoff).
    expect(demo.log_entries("state", state="reconnecting", code=1012)).to_have_count(1)
    while_down = [
        nats.publish(f"push.user.{user}", {"n": 2}),
        nats.publish(f"push.topic.{topic}", {"n": 3}),
        nats.publish(f"push.user.{user}", {"n": 4}),
    ]
    gateway.start()  # same port

    demo.expect_state("open")
    params = demo.socket_params()
    assert (params.get("since"), params.get("topics")) == (str(first), topic), "resumed, topic rejoined in the URL"
    expect(demo.log_entries("replayed", count=3, **{"from": first + 1})).to_have_count(1)
    last = nats.publish(f"push.topic.{topic}", {"n": 5})
    demo.wait_for_message(last)

    assert demo.seqs() == [first, *while_down, last]
    assert demo.log_entries("state", code=1012).count() == 1


def test_a_device_that_has_handled_nothing_misses_nothing_across_a_restart(page, gateway, nats, user):
    # No seq to resume from: the client reconnects without `since`, and the gateway resumes from the
    # device's cursor, which it set to the welcome's seq on the first connection.
    demo = Demo(page, gateway).open(user)
    assert gateway.stop() == 0
    while_down = nats.publish(f"push.user.{user}", {"n": 1})
    gateway.start()

    demo.expect_state("open")
    assert "since" not in demo.socket_params()
    expect(demo.log_entries("replayed", count=1)).to_have_count(1)
    last = nats.publish(f"push.user.{user}", {"n": 2})
    demo.wait_for_message(last)
    assert demo.seqs() == [while_down, last]


def test_page_reload_resumes_from_local_storage(page, gateway, nats, user):
    demo = Demo(page, gateway).open(user)
    subject = f"push.user.{user}"
    before = [nats.publish(subject, {"n": n}) for n in (1, 2)]
    demo.wait_for_message(before[-1])

    page.goto("about:blank")  # pagehide: the client acks and stores its last seq
    away = nats.publish(subject, {"n": 3})
    demo.open(user)

    assert demo.socket_params().get("since") == str(before[-1]), "the resume point comes from localStorage"
    demo.wait_for_message(away)
    last = nats.publish(subject, {"n": 4})
    demo.wait_for_message(last)
    assert demo.seqs() == [away, last]
