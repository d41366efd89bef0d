"""The first hour: `scripts/dev` as a newcomer runs it (a clean start, on its own ports 4222, 8080, 8081,
8222, 9090), the commands it prints run as printed, the demo page as `dev` and as `?user=42`, and a Ctrl-C that
stops everything without a warning or an error in any log."""

import json
import os
import re
import shlex
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request

import pytest
from playwright.sync_api import expect

from conftest import REQUIRED, ROOT
from demo import Demo

PORTS = (4222, 8080, 8081, 8222, 9090)
PAGE = "http://127.0.0.1:8080"


def port_taken(port):
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


class DevStack:
    """`scripts/dev` with the debug binaries (HERALD_DEV_PROFILE=dev) and a fresh data directory."""

    def __init__(self, data):
        self.data = data
        self.output = data / "dev.out"
        env = {name: value for name, value in os.environ.items() if not name.startswith("HERALD_")}
        env.update(HERALD_DEV_PROFILE="dev", HERALD_DEV_DATA=str(data), NO_COLOR="1")
        with open(self.output, "w") as out:
            self.process = subprocess.Popen(
                [str(ROOT / "scripts/dev")],
                cwd=ROOT,
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                # A test suite started as a background job of a non-interactive shell ignores SIGINT, and
                # bash cannot trap a signal ignored when it starts: give the script Ctrl-C back.
                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
            )

    def text(self):
        return self.output.read_text(errors="replace")

    def wait_ready(self, timeout=900):
        """Until the gateway answers /readyz (the first build included); fails at once if the script exits."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                pytest.fail(f"scripts/dev exited with {self.process.returncode}:\n{self.text()}")
            try:
                with urllib.request.urlopen(f"{PAGE}/readyz", timeout=2) as response:
                    if response.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError):
                pass
            time.sleep(0.1)
        pytest.fail(f"the dev stack was not ready after {timeout} s:\n{self.text()}")

    def printed(self, label):
        """The command printed after `label` (e.g. "A connect token for user 42: ")."""
        match = re.search(re.escape(label) + r"(.*)", self.text())
        assert match, f"scripts/dev did not print {label!r}:\n{self.text()}"
        return match.group(1).strip()

    def stop(self):
        """Ctrl-C: SIGINT to the script; returns its exit status."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            self.process.wait(timeout=60)
        return self.process.returncode

    def logs(self):
        """Every log of the stack: the script's output (the gateway logs there) and the files in the data dir."""
        return {path.name: path.read_text(errors="replace") for path in sorted(self.data.glob("*.log"))} | {
            "scripts/dev": self.text()
        }


def run(command):
    """Runs a printed shell command (`NAME=value` words, then the program) from the repository root."""
    words = shlex.split(command)
    env = {name: value for name, value in os.environ.items() if not name.startswith("HERALD_")}
    while words and re.fullmatch(r"[A-Z_]+=.*", words[0]):
        name, value = words.pop(0).split("=", 1)
        env[name] = value
    out = subprocess.run(words, cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, f"{command} failed ({out.returncode}): {out.stderr}"
    return out.stdout.strip()


@pytest.fixture
def dev_stack(tmp_path):
    taken = [port for port in PORTS if port_taken(port)]
    if taken:
        message = f"ports {taken} are in use: scripts/dev cannot start its stack"
        if REQUIRED:
            pytest.fail(message)
        pytest.skip(message)
    stack = DevStack(tmp_path)
    yield stack
    stack.stop()


def test_the_dev_stack_works_as_printed_and_stops_cleanly(dev_stack, context):
    dev_stack.wait_ready()
    text = dev_stack.text()
    assert "the first build takes several minutes" in text

    # The page, as user dev: what the printed `herald-gateway pub` command publishes shows up.
    page = context.new_page()
    errors = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.goto(PAGE + "/")
    demo = Demo(page, None)
    demo.expect_state("open")
    expect(page.get_by_test_id("identity")).to_contain_text("user dev ")
    seq = int(re.search(r"seq (\d+)", run(dev_stack.printed("or without the nats CLI: "))).group(1))
    assert json.loads(demo.wait_for_message(seq).locator("pre").text_content()) == {"text": "hi"}

    # The printed token command signs a token the gateway accepts.
    token = run(dev_stack.printed("A connect token for user 42: "))
    welcome = page.evaluate(
        """(url) => new Promise((resolve, reject) => {
             const socket = new WebSocket(url);
             socket.onmessage = (event) => { resolve(JSON.parse(event.data)); socket.close(); };
             socket.onclose = (event) => reject(new Error(`closed ${event.code} ${event.reason}`));
           })""",
        f"ws://127.0.0.1:8080/ws?token={token}",
    )
    assert (welcome["type"], welcome["user"]) == ("welcome", "42")

    # The page as user 42 (the README's examples publish to push.user.42).
    other = context.new_page()
    other.goto(dev_stack.printed("The demo page as user 42: "))
    Demo(other, None).expect_state("open")
    expect(other.get_by_test_id("identity")).to_contain_text("user 42 ")

    # The admin page, with the printed key: the gateway, the stream, the functions.
    admin_line = dev_stack.printed("The admin page: ")
    url, key = re.fullmatch(r"(\S+) \(API key: (\S+)\)", admin_line).groups()
    admin = context.new_page()
    admin.goto(url)
    admin.get_by_test_id("key").fill(key)
    admin.get_by_test_id("key-save").click()
    expect(admin.locator("body")).to_have_attribute("data-loaded", "true")
    # Users dev and 42 (the pages); the token check's socket may still be closing.
    expect(admin.get_by_test_id("gateways-total")).to_have_text(re.compile(r"^1 gateway\(s\), [23] connection\(s\), 2 user\(s\)$"))
    expect(admin.get_by_test_id("stream-last-seq")).to_have_text(str(seq))
    expect(admin.locator("[data-testid=function-listed][data-function='notify']")).to_have_count(1)
    assert errors == []

    assert dev_stack.stop() == 0
    for name, log in dev_stack.logs().items():
        bad = [line for line in log.splitlines() if re.search(r"\b(WARN|ERROR)\b|\[(WRN|ERR|FTL)\]", line)]
        # NATS's advice at start: nats.conf takes the passwords from the environment in plain text (the
        # dev stack's), where production would use nkeys or bcrypt hashes (docs/operations.md).
        bad = [line for line in bad if "Plaintext passwords detected" not in line]
        assert bad == [], f"{name} logged warnings or errors:\n" + "\n".join(bad)
    assert "a process of the stack stopped" not in dev_stack.text()
    # Nothing of the stack is left running.
    assert [port for port in PORTS if port_taken(port)] == []
