"""The personal inbox in a browser: a user's first page gets what was sent while they were away,
with its unread count, and reading in one tab updates the badge of the user's other tab.
"""

from playwright.sync_api import expect

from demo import Demo


def test_a_first_visit_shows_what_was_sent_while_away_and_the_unread_count(page, gateway, nats, user):
    sent = [nats.publish(f"push.user.{user}", {"n": n}) for n in range(5)]
    demo = Demo(page, gateway).open(user)
    for seq in sent:
        demo.wait_for_message(seq)
    expect(demo.log_entries("replayed", count=5)).to_have_count(1)
    expect(demo.unread).to_have_attribute("data-unread", "5")
    assert demo.seqs() == sent
    # A new message while the page is open is one more unread.
    live = nats.publish(f"push.user.{user}", {"n": "live"})
    demo.wait_for_message(live)
    expect(demo.unread).to_have_attribute("data-unread", "6")


def test_marking_all_read_in_one_tab_updates_the_other_tab(page, context, gateway, nats, user):
    first = Demo(page, gateway).open(user, device="tab-1")
    second = Demo(context.new_page(), gateway).open(user, device="tab-2")
    sent = [nats.publish(f"push.user.{user}", {"n": n}) for n in range(3)]
    for demo in (first, second):
        demo.wait_for_message(sent[-1])
        expect(demo.unread).to_have_attribute("data-unread", "3")
    first.mark_all_read()
    expect(second.unread).to_have_attribute("data-unread", "0")
    expect(first.unread).to_have_attribute("data-unread", "0")
    expect(second.log_entries("read", seq=sent[-1])).to_have_count(1)
