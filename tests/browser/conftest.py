"""Fixtures for the real-browser tests: a NATS server, a dev-mode gateway, Debian's chromium, a push
function written with nats-py.

See README.md. Every test gets its own browser context (fresh storage) and its own user id.
With HERALD_REQUIRE_BROWSER=1 (CI) a missing chromium, nats-server or gateway binary fails the tests
instead of skipping them.
"""

import asyncio
import base64
import hashlib
import hmac
import json
import os
import re
import shutil
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import pytest
from playwright.sync_api import expect, sync_playwright

ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = ROOT / "tests/artifacts"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"]
REQUIRED = os.environ.get("HERALD_REQUIRE_BROWSER") == "1"

# Every Playwright `expect` waits up to this long for its condition (the default is 5 s); a reconnect
# after a gateway restart can take a few seconds of backoff.
expect.set_options(timeout=15_000)


def pytest_sessionstart(session):
    """Screenshots of failures from an earlier run would mislead: remove them."""
    for old in ARTIFACTS.glob("failed-*.png"):
        old.unlink()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def find_binary(env, *candidates):
    for path in [os.environ.get(env), *candidates]:
        if path and Path(path).is_file() and os.access(path, os.X_OK):
            return str(path)
    message = f"none of {[str(c) for c in candidates if c]} found (set {env}); see tests/browser/README.md"
    if REQUIRED:
        pytest.fail(f"HERALD_REQUIRE_BROWSER=1: {message}", pytrace=False)
    pytest.skip(message)


def wait_http(url, timeout=20.0):
    """Polls an HTTP endpoint until it answers 200 (process start-up, not page behaviour)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError):
            pass
        time.sleep(0.05)
    raise TimeoutError(f"{url} not ready after {timeout} s")


@pytest.fixture(scope="session")
def nats(tmp_path_factory):
    """A NATS server with JetStream on a free port, started from nats.conf; yields its URL."""
    binary = find_binary("HERALD_NATS_SERVER", ROOT / ".tools/bin/nats-server", shutil.which("nats-server"))
    port, monitor = free_port(), free_port()
    store = tmp_path_factory.mktemp("nats")
    log = open(store / "nats.log", "w")
    process = subprocess.Popen(
        [binary, "-c", str(ROOT / "nats.conf"), "-a", "127.0.0.1", "-p", str(port), "-m", str(monitor), "-sd", str(store)],
        stdout=log, stderr=subprocess.STDOUT,
    )
    wait_http(f"http://127.0.0.1:{monitor}/healthz?js-enabled-only=true")
    yield f"nats://127.0.0.1:{port}"
    process.terminate()
    process.wait(timeout=10)


class Gateway:
    """A dev-mode herald-gateway process; `restart()` stops it (1012 to every socket) and starts it again."""

    def __init__(self, binary, nats_url, log_path):
        self.binary = binary
        self.addr = f"127.0.0.1:{free_port()}"
        self.url = f"http://{self.addr}"
        # The gateway verifies tokens with this secret (dev mode signs /dev/token with it too), so
        # tests can sign their own (`token()`).
        self.secret = "herald-browser-tests-" + uuid.uuid4().hex
        self.env = dict(os.environ, HERALD_NATS_URL=nats_url, HERALD_JWT_SECRET=self.secret, NO_COLOR="1")
        self.log_path = log_path
        self.process = None

    def start(self):
        log = open(self.log_path, "a")
        self.process = subprocess.Popen([self.binary, "--dev", "--listen", self.addr], env=self.env, stdout=log, stderr=subprocess.STDOUT)
        wait_http(f"{self.url}/readyz")

    def stop(self):
        """SIGTERM (graceful: every socket is closed with 1012); returns the exit status."""
        if self.process and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=20)
        return self.process.returncode if self.process else None

    def restart(self):
        self.stop()
        self.start()

    def publish(self, subject, data, kind=None, msg_id=None):
        """Publishes with `herald-gateway pub` (JetStream, straight to NATS) and returns the stream seq."""
        args = [self.binary, "pub", subject, data if isinstance(data, str) else json.dumps(data)]
        if kind:
            args += ["--kind", kind]
        if msg_id:
            args += ["--id", msg_id]
        out = subprocess.run(args, env=self.env, capture_output=True, text=True, timeout=30, check=True).stdout
        # "stored: seq 12 (duplicate: false)"
        return int(re.search(r"seq (\d+)", out).group(1))

    def token(self, user, lifetime, topics=("*",)):
        """An HS256 connect token for `user` expiring `lifetime` seconds from now (whole seconds),
        signed with this gateway's secret."""

        def b64(raw):
            return base64.urlsafe_b64encode(raw).rstrip(b"=")

        header = b64(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
        claims = {"sub": user, "exp": int(time.time()) + lifetime, "topics": list(topics)}
        body = b64(json.dumps(claims).encode())
        signature = b64(hmac.new(self.secret.encode(), header + b"." + body, hashlib.sha256).digest())
        return (header + b"." + body + b"." + signature).decode()

    def log_tail(self, lines=40):
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"


@pytest.fixture
def gateway(nats, tmp_path):
    binary = find_binary(
        "HERALD_GATEWAY", ROOT / "target/debug/herald-gateway", ROOT / "target/release/herald-gateway"
    )
    gateway = Gateway(binary, nats, tmp_path / "gateway.log")
    gateway.start()
    yield gateway
    gateway.stop()


@pytest.fixture(scope="session")
def browser():
    executable = find_binary("HERALD_CHROMIUM", "/usr/lib/chromium/chromium", "/usr/bin/chromium")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture
def context(browser):
    """A fresh browser context: empty localStorage, nothing shared with other tests."""
    context = browser.new_context()
    yield context
    context.close()


@pytest.fixture
def page(context, gateway, request):
    """A page in the test's context; fails the test on any uncaught page error, and saves a
    screenshot to tests/artifacts/failed-<test>.png when the test fails."""
    page = context.new_page()
    errors = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    yield page
    report = getattr(request.node, "report_call", None)
    if report is not None and report.failed and not page.is_closed():
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=ARTIFACTS / f"failed-{request.node.name}.png", full_page=True)
    assert errors == [], f"errors in the page: {errors}"


@pytest.fixture
def artifacts():
    """tests/artifacts/ (git-ignored), for screenshots worth keeping."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    return ARTIFACTS


@pytest.fixture
def user():
    """A user id of its own for each test, so tests never see each other's messages."""
    return "u-" + uuid.uuid4().hex[:12]


class PushFunction:
    """A push function on `herald.fn.<name>`, written with nats-py and run on an event loop in a
    thread of its own (the tests and Playwright are synchronous). `calls` records each request's
    body and headers."""

    def __init__(self, nats_url, name, answer):
        self.nats_url, self.name, self.answer = nats_url, name, answer
        self.calls = []
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name=f"fn-{name}", daemon=True)
        self.client = None

    def start(self):
        self.thread.start()
        asyncio.run_coroutine_threadsafe(self._subscribe(), self.loop).result(timeout=10)

    async def _subscribe(self):
        import nats as nats_py

        self.client = await nats_py.connect(self.nats_url, name=f"browser-test fn {self.name}")

        async def handle(msg):
            call = {"data": msg.data, "headers": dict(msg.headers or {})}
            self.calls.append(call)
            await msg.respond(self.answer(call))

        await self.client.subscribe(f"herald.fn.{self.name}", cb=handle)
        await self.client.flush()  # the subscription is known to the server before a test calls it

    def stop(self):
        if self.client is not None:
            asyncio.run_coroutine_threadsafe(self.client.drain(), self.loop).result(timeout=10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)
        self.loop.close()


@pytest.fixture
def echo_function(nats):
    """`herald.fn.echo`: answers `{"echo": <request body>, "user": <Herald-User header>}`."""

    def answer(call):
        return json.dumps({"echo": json.loads(call["data"] or b"null"), "user": call["headers"].get("Herald-User")}).encode()

    function = PushFunction(nats, "echo", answer)
    function.start()
    yield function
    function.stop()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    """Keeps each phase's report on the test item (for the `page` fixture), and adds the gateway's
    log to the report of a failed test."""
    report = yield
    setattr(item, f"report_{report.when}", report)
    gateway = item.funcargs.get("gateway") if hasattr(item, "funcargs") else None
    if report.failed and isinstance(gateway, Gateway):
        report.sections.append(("gateway log (last 40 lines)", gateway.log_tail()))
    return report
