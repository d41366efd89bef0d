"""A second session of the same user and device replaces the first: close 4009, and the first page
stays closed (the client must not reconnect and fight the newer session)."""

from playwright.sync_api import expect

from demo import Demo


def test_a_newer_session_on_the_same_device_closes_the_older_for_good(page, context, gateway, nats, user):
    older = Demo(page, gateway).open(user)
    newer = Demo(context.new_page(), gateway).open(user)

    older.expect_state("closed", code=4009)
    expect(older.state).to_contain_text("closed (4009")
    seq = nats.publish(f"push.user.{user}", {"text": "to the newer session"})
    newer.wait_for_message(seq)

    newer.expect_state("open")
    assert len(older.sockets) == 1, "the replaced page tried to reconnect"
    assert older.seqs() == []
