"""Fixtures for the real-browser tests: a NATS server, a dev-mode gateway, Debian's chromium.

See README.md. Every test gets its own browser context (fresh storage) and its own user id.
"""

import json
import os
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import pytest
from playwright.sync_api import sync_playwright

ROOT = Path(__file__).resolve().parents[2]
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def find_binary(env, *candidates):
    for path in [os.environ.get(env), *candidates]:
        if path and Path(path).is_file() and os.access(path, os.X_OK):
            return str(path)
    pytest.skip(f"none of {candidates} found (set {env}); see tests/browser/README.md")


def wait_http(url, timeout=20.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError):
            pass
        time.sleep(0.1)
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
        self.env = dict(os.environ, HERALD_NATS_URL=nats_url)
        self.log_path = log_path
        self.process = None

    def start(self):
        log = open(self.log_path, "a")
        self.process = subprocess.Popen([self.binary, "--dev", "--listen", self.addr], env=self.env, stdout=log, stderr=subprocess.STDOUT)
        wait_http(f"{self.url}/readyz")

    def stop(self):
        if self.process and self.process.poll() is None:
            self.process.terminate()  # SIGTERM: graceful, sockets closed with 1012
            self.process.wait(timeout=20)

    def restart(self):
        self.stop()
        self.start()

    def publish(self, subject, data, kind=None, msg_id=None):
        """Publishes with `herald-gateway pub` and returns the stream seq."""
        args = [self.binary, "pub", subject, data if isinstance(data, str) else json.dumps(data)]
        if kind:
            args += ["--kind", kind]
        if msg_id:
            args += ["--id", msg_id]
        out = subprocess.run(args, env=self.env, capture_output=True, text=True, timeout=30, check=True).stdout
        # "stored: seq 12 (duplicate: false)"
        return int(out.split("seq", 1)[1].split()[0])

    def serves(self, path):
        try:
            with urllib.request.urlopen(f"{self.url}{path}", timeout=5) as response:
                return response.status == 200
        except urllib.error.HTTPError:
            return False


@pytest.fixture
def gateway(nats, tmp_path):
    binary = find_binary(
        "HERALD_GATEWAY", ROOT / "target/release/herald-gateway", ROOT / "target/debug/herald-gateway"
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
def page(browser, gateway):
    """A fresh page on the gateway's origin. /herald.js comes from the gateway, or from
    clients/js/herald.js while the gateway does not serve it yet."""
    context = browser.new_context()
    page = context.new_page()
    errors = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    if not gateway.serves("/herald.js"):
        page.route("**/herald.js", lambda route: route.fulfill(path=str(ROOT / "clients/js/herald.js"), content_type="text/javascript"))
    yield page
    context.close()
    assert errors == [], f"errors in the page: {errors}"


@pytest.fixture
def user():
    """A user id of its own for each test, so tests never see each other's messages."""
    return "u-" + uuid.uuid4().hex[:12]
