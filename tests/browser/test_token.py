"""An expired token is renewed through the page's token function without losing a message.

`/dev/token` hands out day-long tokens, so the test stands in for it: the page's token function
fetches `/dev/token`, and a route answers with tokens the test signs (HS256, with the secret the
gateway was given), short-lived until the renewal.
"""

from urllib.parse import urlparse

from playwright.sync_api import expect

from demo import Demo

# Seconds. The gateway closes the socket with 4001 when the clock reaches `exp` (whole seconds), so
# the first connection lives between LIFETIME - 1 and LIFETIME seconds.
LIFETIME = 3


def test_expired_token_is_renewed_and_the_connection_resumes(page, gateway, nats, user):
    subject = f"push.user.{user}"
    issued = []  # (token, lifetime) in the order the page asked
    during_renewal = []

    def token_function(route):
        # The page asks once to detect dev mode and once to connect: both get short tokens. The
        # next request is the renewal after 4001; messages published before it is answered are
        # published while the page has no connection.
        renewal = len(issued) >= 2
        if renewal and not during_renewal:
            during_renewal.extend(nats.publish(subject, {"n": n}) for n in (2, 3))
        lifetime = 3600 if renewal else LIFETIME
        token = gateway.token(user, lifetime)
        issued.append((token, lifetime))
        route.fulfill(json={"user": user, "token": token})

    page.route(lambda url: urlparse(url).path == "/dev/token", token_function)
    demo = Demo(page, gateway).open(user)
    first_token = demo.socket_params()["token"]
    assert (first_token, LIFETIME) in issued
    first = nats.publish(subject, {"n": 1})
    demo.wait_for_message(first)

    # Nothing to do but wait for the expiry: bounded by the token's lifetime (plus the expect timeout).
    expect(demo.log_entries("state", state="reconnecting", code=4001)).to_have_count(1)
    demo.expect_state("open")
    params = demo.socket_params()
    assert params.get("since") == str(first)
    assert params["token"] == issued[2][0] and issued[2][1] == 3600, "reconnected with the renewed token"
    expect(demo.log_entries("replayed", count=2, **{"from": first + 1})).to_have_count(1)
    last = nats.publish(subject, {"n": 4})
    demo.wait_for_message(last)

    assert demo.seqs() == [first, *during_renewal, last]
    assert len(issued) == 3, f"token requests: {[lifetime for _, lifetime in issued]}"
    assert demo.log_entries("state", code=4001).count() == 1
