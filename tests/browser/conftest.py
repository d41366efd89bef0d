"""Fixtures for the real-browser tests: a NATS server and a nats-py client of it (publishing, push
functions), a dev-mode gateway, the real push functions (herald-functions), Debian's chromium.

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
import shlex
import shutil
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import nats as nats_py
import pytest
from nats.errors import NoRespondersError
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


def wait_http(url, process, timeout=20.0):
    """Polls an HTTP endpoint of a process just started until it answers 200 (process start-up, not
    page behaviour); fails at once if the process exits."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{process.args[0]} exited with status {process.returncode} before {url} answered")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError):
            pass
        time.sleep(0.05)
    raise TimeoutError(f"{url} not ready after {timeout} s")


# nats.conf reads each role's password from the server's environment; these are the tests' own.
NATS_PASSWORDS = {role: f"browser-{role}-password" for role in ("gateway", "functions", "publisher", "admin")}


def nats_password_env():
    return {f"HERALD_NATS_{role.upper()}_PASSWORD": password for role, password in NATS_PASSWORDS.items()}


@pytest.fixture(scope="session")
def nats_server(tmp_path_factory):
    """A NATS server with JetStream on a free port, started from nats.conf; yields its URL."""
    binary = find_binary("HERALD_NATS_SERVER", ROOT / ".tools/bin/nats-server", shutil.which("nats-server"))
    port, monitor = free_port(), free_port()
    store = tmp_path_factory.mktemp("nats")
    log = open(store / "nats.log", "w")
    process = subprocess.Popen(
        [binary, "-c", str(ROOT / "nats.conf"), "-a", "127.0.0.1", "-p", str(port), "-m", str(monitor), "-sd", str(store)],
        stdout=log, stderr=subprocess.STDOUT, env=dict(os.environ, **nats_password_env()),
    )
    wait_http(f"http://127.0.0.1:{monitor}/healthz?js-enabled-only=true", process)
    yield f"nats://127.0.0.1:{port}"
    process.terminate()
    process.wait(timeout=10)
    log.close()


class Nats:
    """The tests' own NATS client (nats-py) on an event loop in a thread of its own (the tests and
    Playwright are synchronous): publishes with JetStream like a backend, serves push functions."""

    def __init__(self, url):
        self.url = url
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="nats-py", daemon=True)
        self.thread.start()
        # As the admin user: the tests act as a backend (publish) and as a push function (serve rpc).
        self.client = self.run(
            nats_py.connect(url, name="herald browser tests", user="admin", password=NATS_PASSWORDS["admin"])
        )
        self.js = self.client.jetstream()

    def run(self, coroutine, timeout=10):
        """Runs a coroutine on the client's loop and returns its result."""
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout)

    def publish(self, subject, data, kind=None, msg_id=None):
        """Publishes with JetStream (a dict is sent as JSON) and returns the stream seq from the PubAck."""
        payload = (data if isinstance(data, str) else json.dumps(data)).encode()
        headers = {name: value for name, value in (("Herald-Type", kind), ("Nats-Msg-Id", msg_id)) if value}
        return self.run(self.js.publish(subject, payload, headers=headers or None)).seq

    def serve(self, name, answer):
        """Starts a push function on `herald.fn.<name>`; see PushFunction."""
        return PushFunction(self, name, answer)

    def answers(self, subject):
        """Whether anything answers a request on `subject` (False: no responders). The request has no
        `Herald-User`, so a Herald function answers it with an error and does nothing."""

        async def ask():
            try:
                await self.client.request(subject, b"null", timeout=5)
                return True
            except NoRespondersError:
                return False

        return self.run(ask())

    def close(self):
        self.run(self.client.drain())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)
        self.loop.close()


class PushFunction:
    """A push function written in another language than Herald's (Python), following docs/functions.md:
    a queue subscription on `herald.fn.<name>` in the queue group `herald-functions`, shared with every
    other copy, answering each request with `answer(call)` (bytes), where `call` is
    `{"data": <request body>, "headers": {...}}`. `calls` records each request."""

    QUEUE_GROUP = "herald-functions"

    def __init__(self, nats, name, answer):
        self.nats, self.answer = nats, answer
        self.calls = []
        self.subscription = nats.run(self._subscribe(f"herald.fn.{name}"))

    async def _subscribe(self, subject):
        async def handle(msg):
            call = {"data": msg.data, "headers": dict(msg.headers or {})}
            self.calls.append(call)
            await msg.respond(self.answer(call))

        subscription = await self.nats.client.subscribe(subject, queue=self.QUEUE_GROUP, cb=handle)
        await self.nats.client.flush()  # the server knows the subscription before a test calls it
        return subscription

    def stop(self):
        self.nats.run(self.subscription.unsubscribe())


@pytest.fixture(scope="session")
def nats(nats_server):
    """A nats-py client of the test NATS server: `nats.publish(subject, data, kind=, msg_id=)` → seq."""
    client = Nats(nats_server)
    yield client
    client.close()


class Gateway:
    """A dev-mode herald-gateway process, stopped and started again by the tests that need to."""

    def __init__(self, binary, nats_url, log_path):
        self.binary = binary
        self.addr = f"127.0.0.1:{free_port()}"
        self.url = f"http://{self.addr}"
        # The gateway verifies tokens with this secret (dev mode signs /dev/token with it too), so
        # tests can sign their own (`token()`).
        self.secret = "herald-browser-tests-" + uuid.uuid4().hex
        # The HTTP API and the admin page (`/admin`), with one key.
        self.api_url = f"http://127.0.0.1:{free_port()}"
        self.api_key = "browser-admin-" + uuid.uuid4().hex[:8]
        self.env = dict(
            os.environ,
            HERALD_NATS_URL=nats_url,
            HERALD_NATS_USER="gateway",
            HERALD_NATS_PASSWORD=NATS_PASSWORDS["gateway"],
            HERALD_JWT_SECRET=self.secret,
            HERALD_API_LISTEN=self.api_url.removeprefix("http://"),
            HERALD_API_KEYS=json.dumps([self.api_key]),
            HERALD_API_NATS_USER="publisher",
            HERALD_API_NATS_PASSWORD=NATS_PASSWORDS["publisher"],
            NO_COLOR="1",
        )
        self.log_path = log_path
        self.process = None

    def start(self):
        """Starts it on its port (the same every time) and waits until it is ready (`/readyz`)."""
        with open(self.log_path, "a") as log:
            self.process = subprocess.Popen(
                [self.binary, "--dev", "--listen", self.addr], env=self.env, stdout=log, stderr=subprocess.STDOUT
            )
        wait_http(f"{self.url}/readyz", self.process)

    def stop(self):
        """SIGTERM (graceful: every socket is closed with 1012); returns the exit status."""
        if self.process and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=20)
        return self.process.returncode if self.process else None

    def pub(self, subject, data, kind=None, msg_id=None):
        """Publishes with `herald-gateway pub` (JetStream, straight to NATS; what the page's hint shows)
        and returns the stream seq. `nats.publish` does the same without starting a process."""
        args = [self.binary, "pub", subject, data if isinstance(data, str) else json.dumps(data)]
        if kind:
            args += ["--kind", kind]
        if msg_id:
            args += ["--id", msg_id]
        # As a backend does: with the publisher's credentials (gateways may not publish pushes).
        env = dict(self.env, HERALD_NATS_USER="publisher", HERALD_NATS_PASSWORD=NATS_PASSWORDS["publisher"])
        return self._run_pub(args, env)

    def run_hint(self, hint, dev_password="dev-publisher"):
        """Runs the page's `herald-gateway pub` hint as written (its `NAME=value` environment, its
        arguments) with this gateway's binary and NATS URL. The hint shows the dev stack's publisher
        password, which must be `dev_password`; the tests' NATS has its own, used instead. Returns the seq."""
        words = shlex.split(hint)
        env = {name: value for name, value in os.environ.items() if not name.startswith("HERALD_")}
        env["HERALD_NATS_URL"] = self.env["HERALD_NATS_URL"]
        while words and re.fullmatch(r"[A-Z_]+=.*", words[0]):
            name, value = words.pop(0).split("=", 1)
            env[name] = value
        # The hint names the binary where scripts/dev builds it (it is not on PATH).
        assert words[:2] == ["target/release/herald-gateway", "pub"], f"not a herald-gateway pub command: {hint}"
        assert env.get("HERALD_NATS_USER") == "publisher", f"the hint does not publish as `publisher`: {hint}"
        assert env.get("HERALD_NATS_PASSWORD") == dev_password, f"the hint does not use the dev password: {hint}"
        env["HERALD_NATS_PASSWORD"] = NATS_PASSWORDS["publisher"]
        return self._run_pub([self.binary, *words[1:]], env)

    @staticmethod
    def _run_pub(args, env):
        out = subprocess.run(args, env=env, capture_output=True, text=True, timeout=30)
        assert out.returncode == 0, f"{shlex.join(args[1:])} failed ({out.returncode}): {out.stderr}"
        # "stored: seq 12 (duplicate: false)"
        return int(re.search(r"seq (\d+)", out.stdout).group(1))

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
def gateway(nats_server, tmp_path):
    binary = find_binary(
        "HERALD_GATEWAY", ROOT / "target/debug/herald-gateway", ROOT / "target/release/herald-gateway"
    )
    gateway = Gateway(binary, nats_server, tmp_path / "gateway.log")
    gateway.start()
    yield gateway
    gateway.stop()


class Functions:
    """The real `herald-functions` binary (built-ins `prefs.get`/`prefs.set`, `presence`, `notify`) on
    the test NATS as its `functions` user, configured through HERALD_* variables (docs/functions.md)."""

    def __init__(self, binary, nats, log_path):
        self.binary, self.nats, self.log_path = binary, nats, log_path
        self.env = dict(
            os.environ,
            HERALD_NATS_URL=nats.url,
            HERALD_NATS_USER="functions",
            HERALD_NATS_PASSWORD=NATS_PASSWORDS["functions"],
            # Port 0: the kernel picks a free port, so it never clashes with anything (the address is logged).
            HERALD_METRICS_LISTEN="127.0.0.1:0",
            NO_COLOR="1",
        )
        self.process = None

    def start(self, timeout=20.0):
        """Starts it and waits until NATS has its rpc endpoints: `prefs.get` and `prefs.set` answer
        (process start-up, polled like `/readyz`; fails at once if it exits)."""
        with open(self.log_path, "a") as log:
            self.process = subprocess.Popen([self.binary], env=self.env, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        waiting = ["herald.fn.prefs.get", "herald.fn.prefs.set"]
        while waiting:
            if self.process.poll() is not None:
                raise RuntimeError(f"herald-functions exited with status {self.process.returncode}:\n{self.log_tail()}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"herald-functions: nothing answers {waiting} after {timeout} s:\n{self.log_tail()}")
            if self.nats.answers(waiting[0]):
                waiting.pop(0)
            else:
                time.sleep(0.05)

    def stop(self):
        """SIGTERM (graceful); returns the exit status."""
        if self.process and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=20)
        return self.process.returncode if self.process else None

    def log_tail(self, lines=40):
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"


@pytest.fixture
def functions(nats, tmp_path):
    """`herald-functions`, ready (its prefs functions answer) before the test. Binary:
    `HERALD_FUNCTIONS`, else `target/debug/`, else `target/release/`."""
    binary = find_binary(
        "HERALD_FUNCTIONS", ROOT / "target/debug/herald-functions", ROOT / "target/release/herald-functions"
    )
    functions = Functions(binary, nats, tmp_path / "functions.log")
    functions.start()
    yield functions
    assert functions.stop() == 0, f"herald-functions did not stop cleanly:\n{functions.log_tail()}"


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


@pytest.fixture
def echo_function(nats):
    """`herald.fn.echo`: answers `{"echo": <request body>, "user": <Herald-User header>}`."""

    def answer(call):
        return json.dumps({"echo": json.loads(call["data"] or b"null"), "user": call["headers"].get("Herald-User")}).encode()

    function = nats.serve("echo", answer)
    yield function
    function.stop()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    """Keeps each phase's report on the test item (for the `page` fixture), and adds the logs of the
    gateway and the functions to the report of a failed test."""
    report = yield
    setattr(item, f"report_{report.when}", report)
    funcargs = item.funcargs if hasattr(item, "funcargs") else {}
    for name, kind in (("gateway", Gateway), ("functions", Functions)):
        process = funcargs.get(name)
        if report.failed and isinstance(process, kind):
            report.sections.append((f"{name} log (last 40 lines)", process.log_tail()))
    return report
