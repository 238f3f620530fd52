"""Tests for the chat room: a real chatroom.py process on 127.0.0.1, spoken to over real HTTP.

Run:  python -m pytest

Each test starts from a scenario comment. Servers are separate processes started with --port 0 (any
free port) and a data file in the test's temporary folder, so tests can also stop, kill -9 and
restart them. Waits are bounded: a test that would hang fails instead.

The file follows chatroom.py: the helpers, then the tests of Part I section by section (the room,
presence, identity, the rate limit, storage, the HTTP handler, the server), then those of Part II
(the defended handler, the defended server), a fuzz test, and last the page in a real browser.
"""

import base64
import collections
import contextlib
import datetime
import email.utils
import gzip
import hashlib
import http.client
import json
import os
import random
import re
import secrets
import select
import shutil
import signal
import socket
import sqlite3
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path
from urllib.parse import parse_qs, urlsplit
from zoneinfo import ZoneInfo

import pytest

import chatroom

try:
    from playwright.sync_api import expect, sync_playwright
except ImportError:  # the browser tests skip (or fail under CI) when Playwright is missing
    expect = sync_playwright = None
try:
    from axe_playwright_python.sync_playwright import Axe  # axe-core, bundled for Playwright
except ImportError:  # likewise for the accessibility audit
    Axe = None


# --------------------------------------------------------------------------------------------------
# Helpers: a server process, a client with a cookie, raw requests, pages that keep polling
# --------------------------------------------------------------------------------------------------

ROOT = Path(__file__).resolve().parent
CHATROOM = ROOT / "chatroom.py"
START_TIMEOUT = 15  # seconds a server may take to print its address
HTTP_TIMEOUT = 70  # seconds any single request may take (the longest poll is 60 s)
WAKE_BOUND = 5  # seconds within which parked pages must be answered (their time-out is 60 s)


class Server:
    """A chatroom.py process listening on 127.0.0.1 on a free port (ours, or a copy `script`)."""

    def __init__(self, folder, *flags, data=None, script=CHATROOM):
        self.folder = Path(folder)
        self.data = Path(data) if data else self.folder / "chat.db"
        self.script = script
        self.flags = list(flags)
        self.plain = "--plain" in self.flags  # Part I of chatroom.py alone
        self.process = None
        self.start()

    def start(self, port=0):
        self.log_path = self.folder / f"server-{time.monotonic_ns()}.log"
        self.log = open(self.log_path, "w")
        self.process = subprocess.Popen(
            [sys.executable, str(self.script), "--host", "127.0.0.1", "--port", str(port),
             "--data", str(self.data), *self.flags],
            stdout=self.log, stderr=subprocess.STDOUT, cwd=self.folder)
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            # (any address it listens on: tests speak to it on 127.0.0.1 all the same)
            found = re.search(r"running at http://\S+:(\d+)/", self.log_path.read_text())
            if found:
                self.port = int(found.group(1))
                return
            if self.process.poll() is not None:
                raise AssertionError(f"server exited at start:\n{self.log_path.read_text()}")
            time.sleep(0.02)
        self.process.kill()
        raise AssertionError(f"server did not start in {START_TIMEOUT} s")

    def stop(self, sig=signal.SIGTERM, timeout=10):
        """Stop the process (SIGTERM by default) and return its exit status."""
        if self.process.poll() is None:
            self.process.send_signal(sig)
        status = self.process.wait(timeout)
        self.log.close()
        return status

    def restart(self, same_port=False):
        """Stop and start again on the same data; on the same port if open pages must find it."""
        port = self.port if same_port else 0
        self.stop()
        self.start(port)

    def output(self):
        return self.log_path.read_text()


class Response:
    def __init__(self, status, headers, body):
        self.status = status
        self.headers = headers
        self.body = body

    @property
    def json(self):
        return json.loads(self.body)


class Client:
    """One person: keeps the session cookie like a browser, and knows the version it has seen."""

    def __init__(self, server, sid=None):
        self.server = server
        self.sid = sid
        self.version = None

    def request(self, method, path, body=None, headers=None, timeout=HTTP_TIMEOUT):
        headers = dict(headers or {})
        if self.sid and "Cookie" not in headers:
            headers["Cookie"] = f"sid={self.sid}"
        if isinstance(body, (dict, list)):
            body = json.dumps(body)
            headers.setdefault("Content-Type", "application/json")
        connection = http.client.HTTPConnection("127.0.0.1", self.server.port, timeout=timeout)
        try:
            connection.request(method, path, body=body, headers=headers)
            answer = connection.getresponse()
            response = Response(answer.status, answer.headers, answer.read())
        finally:
            connection.close()
        cookie = response.headers.get("Set-Cookie", "")
        found = re.match(r"sid=([^;]+)", cookie)
        if found:
            self.sid = found.group(1)
        return response

    def poll(self, since="current", timeout=None):
        """GET /api/poll; since="current" means the last version this client saw."""
        if since == "current":
            since = self.version
        query = []
        if since is not None:
            query.append(f"since={since}")
        if timeout is not None:
            query.append(f"timeout={timeout}")
        response = self.request("GET", "/api/poll" + ("?" + "&".join(query) if query else ""))
        assert response.status == 200, (response.status, response.body)
        answer = response.json
        self.version = answer["version"]
        return answer

    def join(self):
        """Get a cookie and a snapshot, then poll once with the cookie, which counts as online."""
        self.poll(since=None)
        return self.poll(timeout=0)

    def post(self, text):
        return self.request("POST", "/api/messages", {"text": text})

    def rename(self, name):
        return self.request("POST", "/api/name", {"name": name})


def new_client(server):
    """A client that already has its own session cookie (as a browser would after loading)."""
    return Client(server, sid=issued_sid(server))


def issued_sid(server):
    """A session id such as the server issues: signed with the key in its data file.

    Made here rather than asked for with a cookieless poll, because the full server gives one
    address new cookies only so fast, and the tests' many people all come from 127.0.0.1. (A
    made-up id is no identity: test_a_made_up_cookie_is_no_identity.) The plain room keeps no
    key, and takes any well-formed id.
    """
    with contextlib.closing(sqlite3.connect(server.data)) as db:
        try:
            key = db.execute("SELECT key FROM session_key").fetchone()[0]
        except sqlite3.OperationalError:  # no such table: the plain room
            return secrets.token_urlsafe(24)
    return chatroom.SessionIds(key).new()


def wait_until(predicate, timeout=10, interval=0.05, message="condition"):
    """Poll `predicate` until it is true; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {message}")


def poll_in_background(client, **kwargs):
    """Start client.poll(...) in a thread; returns (thread, result dict with 'answer')."""
    result = {}

    def run():
        result["answer"] = client.poll(**kwargs)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, result


# The room's behaviour, as a client sees it, must be the same whether the server runs Part I of
# chatroom.py alone (--plain) or all of it: the tests of Part I run against both.
ROOMS = {"full": [], "plain": ["--plain"]}
# The rate limits of the original example, which the tests of the limit know by heart: two
# quick messages pass and the third is refused.
ORIGINAL_LIMITS = ["--rate-limits", "2/3,3/10,8/60,50/600"]


@pytest.fixture(scope="module", params=list(ROOMS))
def server(request, tmp_path_factory):
    """One shared server for tests that only add to the room: the full one, then the plain one."""
    running = Server(tmp_path_factory.mktemp("shared"), *ROOMS[request.param], *ORIGINAL_LIMITS)
    yield running
    running.stop()


@pytest.fixture(scope="module")
def full_server(tmp_path_factory):
    """One shared full server, for the tests of the speed layer and the defences."""
    running = Server(tmp_path_factory.mktemp("shared-full"))
    yield running
    running.stop()


def server_starter(tmp_path, room_flags):
    """start(*flags) starts a private server; all are stopped at the end of the test."""
    started = []

    def start(*flags, data=None):
        running = Server(tmp_path, *flags, *room_flags, data=data)
        started.append(running)
        return running

    return start, started


@pytest.fixture(params=list(ROOMS))
def start_server(request, tmp_path):
    """Start a private server with extra flags, full or plain."""
    start, started = server_starter(tmp_path, ROOMS[request.param])
    yield start
    for running in started:
        if running.process.poll() is None:
            running.stop(signal.SIGKILL)


@pytest.fixture
def start_full_server(tmp_path):
    """Start a private full server with extra flags."""
    start, started = server_starter(tmp_path, [])
    yield start
    for running in started:
        if running.process.poll() is None:
            running.stop(signal.SIGKILL)


def read_answer(source, method="GET"):
    """Read one answer from a socket (or its file), checking it is well-formed HTTP.

    Returns (status, headers with lower-case names, body), skipping a "100 Continue". Status 0
    means the server closed the connection without answering.
    """
    reader = source.makefile("rb") if isinstance(source, socket.socket) else source
    try:
        while True:
            status_line = reader.readline(1000)
            if not status_line:
                return 0, {}, b""
            found = re.fullmatch(rb"HTTP/1\.1 (\d{3}) [^\r\n]+\r\n", status_line)
            assert found, f"malformed status line {status_line!r}"
            headers = {}
            while True:
                line = reader.readline(10_000)
                assert line.endswith(b"\r\n"), f"header line cut short: {line!r}"
                if line == b"\r\n":
                    break
                name, colon, value = line.decode("latin-1").partition(":")
                assert colon and re.fullmatch(r"[A-Za-z0-9-]+", name), f"malformed header {line!r}"
                headers[name.lower()] = value.strip()
            status = int(found.group(1))
            if status != 100:
                break
        if method == "HEAD" or status == 304:  # these never have a body, whatever the headers say
            return status, headers, b""
        length = int(headers["content-length"])
        body = reader.read(length)
        assert len(body) == length, f"body of {len(body)} bytes, Content-Length said {length}"
        return status, headers, body
    finally:
        if reader is not source:
            reader.close()


def exchange(port, data, method="GET", timeout=10):
    """Send raw bytes on a new connection and read one answer: (status, headers, body)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as connection:
        connection.sendall(data)
        return read_answer(connection, method)


def exchange_raw(port, data):
    """Send one request on a new connection; return the bytes of its answer, exactly."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as connection:
        connection.sendall(data)
        reader = connection.makefile("rb")
        head = b""
        while not head.endswith(b"\r\n\r\n"):
            head += reader.readline()
        length = int(re.search(rb"Content-Length: (\d+)", head).group(1))
        return head + reader.read(length)


def answers_to(port, data, timeout=10):
    """Send raw bytes, then read answers until the server closes: [(status, headers, body)]."""
    answers = []
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as connection:
        connection.sendall(data)
        connection.shutdown(socket.SHUT_WR)
        reader = connection.makefile("rb")  # one buffer for all answers, so none is lost
        while True:
            status, headers, body = read_answer(reader)
            if not status:
                return answers
            answers.append((status, headers, body))


def http_request(method, path, headers=None, body=b""):
    """A request with the headers exactly as given (plus Content-Length for a body)."""
    lines = [f"{method} {path} HTTP/1.1", *(f"{name}: {value}" for name, value in
                                           (headers or {}).items())]
    if body:
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def is_open(connection, wait=0):
    """True if the server has neither answered nor closed this connection (within `wait` s)."""
    return all_open([connection], wait)


def all_open(connections, wait=0):
    """True if the server has neither answered nor closed any of these (within `wait` s)."""
    return not select.select(connections, [], [], wait)[0]


def server_memory(server):
    """The server process's resident memory in bytes (Linux), or None where /proc is missing."""
    try:
        status = Path(f"/proc/{server.process.pid}/status").read_text()
    except OSError:
        return None
    return int(re.search(r"VmRSS:\s+(\d+) kB", status).group(1)) * 1024


def server_switches(server):
    """How often the server's threads have been switched out, so far (Linux), or None."""
    total = 0
    for status in Path(f"/proc/{server.process.pid}/task").glob("*/status"):
        with contextlib.suppress(OSError):  # (a thread that has just ended)
            total += sum(map(int, re.findall(r"ctxt_switches:\s+(\d+)", status.read_text())))
    return total or None


def fill_room(server, count, text):
    """Stop the server, store `count` messages with this text directly in its file, restart it."""
    store_messages(server, [(i, text, 0) for i in range(1, count + 1)])


def store_messages(server, messages, same_port=False):
    """Stop the server, store messages [(id, text, time in ms)] directly in its file, restart it.

    On the same port if open pages must find it again; the room's version moves up to the
    newest id.
    """
    port = server.port if same_port else 0
    server.stop()
    with sqlite3.connect(server.data) as db:
        db.executemany("INSERT INTO messages VALUES (?, 'u', 'n', ?, ?)", messages)
        db.execute("UPDATE room SET version = max(version, ?)", (max(m[0] for m in messages),))
    db.close()
    server.start(port)


def wait_until_listed(watcher, ids):
    """Poll as `watcher` until everyone in `ids` is listed online, so no arrival changes the room
    after this."""
    wait_until(lambda: ids <= {p["id"] for p in watcher.poll(since=None)["online"]},
               message="everyone to be listed online")


def wait_until_online(client):
    """Poll until `client` shows in the online list, so no arrival changes the room after this."""
    wait_until_listed(client, {client.poll(since=None)["you"]["id"]})


def park_alone(server):
    """A client alone online, with a poll parked in the background: (thread, result)."""
    bob = new_client(server)
    bob_id = bob.join()["you"]["id"]
    wait_until(lambda: [p["id"] for p in bob.poll(since=None)["online"]] == [bob_id],
               message="Bob alone online")
    return poll_in_background(bob, timeout=30)


class Page:
    """A page's poll loop on one keep-alive connection, with the cookie of its own person."""

    def __init__(self, server):
        self.client = new_client(server)
        self.connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=HTTP_TIMEOUT)
        self.seen = []  # ids of the messages it was sent, in the order they came

    def poll(self, since, timeout=60, method="GET"):
        """One poll on this page's connection; returns (status, headers, parsed answer or None)."""
        self.connection.request(method, f"/api/poll?since={since}&timeout={timeout}",
                                headers={"Cookie": f"sid={self.client.sid}"})
        response = self.connection.getresponse()
        body = response.read()
        answer = json.loads(body) if body else None
        if answer:
            assert all(message["id"] > since for message in answer["messages"]), \
                f"poll since={since} was answered with older messages: {answer['messages']}"
            self.seen += [message["id"] for message in answer["messages"]]
        return response.status, response.headers, answer

    def close(self):
        self.connection.close()


def open_pages(server, count):
    """`count` pages that have joined and are listed online; returns (pages, the room's version).

    Waiting until everyone is listed means no arrival changes the room after this.
    """
    pages = [Page(server) for _ in range(count)]
    wait_until_listed(pages[0].client, {page.client.join()["you"]["id"] for page in pages})
    return pages, pages[0].client.poll(since=None)["version"]


def wait_until_parked(server, count, after=0):
    """Wait until `count` polls are parked, as a server started with --log-polls tells.

    `after` is a length of its log: only what it said after that counts. Returns the log's length.
    """
    def parked():
        log = server.output()
        counts = [int(n) for n in re.findall(r"\((\d+) waiting\)", log[after:])]
        return len(log) if counts and max(counts) >= count else None

    return wait_until(parked, timeout=WAKE_BOUND, message=f"{count} polls to be parked")


def pages_polling(pages, since, timeout=60, after=0):
    """Start one poll on each page in a thread, `after` seconds from now (as on a network with
    that round trip); returns the threads and {page index: answer}."""
    answers = {}

    def run(index, page):
        time.sleep(after)
        answers[index] = page.poll(since, timeout)[2]

    threads = [threading.Thread(target=run, args=item, daemon=True) for item in enumerate(pages)]
    for thread in threads:
        thread.start()
    return threads, answers


def join_all(threads, within):
    deadline = time.monotonic() + within
    for thread in threads:
        thread.join(max(0, deadline - time.monotonic()))
    return sum(thread.is_alive() for thread in threads)


def run_chatroom(*arguments, cwd, timeout=20):
    return subprocess.run([sys.executable, *map(str, arguments)], cwd=cwd, capture_output=True,
                          text=True, timeout=timeout)


def get_page(port, **headers):
    """GET / with exactly these headers (and Host): (status, headers, body)."""
    return exchange(port, http_request("GET", "/", {"Host": "127.0.0.1", **headers}))


def history(client, query=""):
    """The ids of the messages GET /api/messages answers with, checking that it is a 200."""
    response = client.request("GET", "/api/messages" + query)
    assert response.status == 200, (query, response.status, response.body)
    return [message["id"] for message in response.json["messages"]]


def send_queue(server, connection):
    """Bytes the server's kernel holds, sent or not, for the other end of `connection` (Linux)."""
    client_port = connection.getsockname()[1]
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        local, remote = fields[1], fields[2]
        if int(local.split(":")[1], 16) == server.port and \
                int(remote.split(":")[1], 16) == client_port:
            return int(fields[4].split(":")[0], 16)
    return None


def hang_up(port, data=b"", read=0, reset=False):
    """Connect, send `data`, read `read` bytes of the answer, and close (with a reset if asked)."""
    connection = socket.create_connection(("127.0.0.1", port), timeout=10)
    try:
        if data:
            connection.sendall(data)
        if read:
            connection.recv(read)
        if reset:
            connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    finally:
        connection.close()


# ==================================================================================================
# PART I. THE CHAT ROOM: tests in the order of chatroom.py's sections
# ==================================================================================================


# --------------------------------------------------------------------------------------------------
# 2. The room: polls, posts, and the broadcast that answers every waiting page
# --------------------------------------------------------------------------------------------------
# Most of the broadcast's tests use Page: one keep-alive connection, as a browser keeps, so that
# a poll's answer (written by the room) and the page's next poll travel to the same server thread.

def test_first_poll_gives_cookie_and_snapshot(server):
    # A newcomer without a cookie gets one, a snapshot of the room, and a default name.
    client = Client(server)
    response = client.request("GET", "/api/poll")
    assert response.status == 200
    cookie = response.headers["Set-Cookie"]
    for part in ("HttpOnly", "SameSite=Strict", "Path=/", "Max-Age="):
        assert part in cookie, cookie
    answer = response.json
    assert isinstance(answer["version"], int)
    assert isinstance(answer["messages"], list) and "online" in answer
    assert re.fullmatch(r"Guest \d+", answer["you"]["name"])
    # The same cookie is the same person on the next request.
    assert client.poll(since=None)["you"] == answer["you"]


def test_post_returns_message_and_poll_delivers_it(server):
    # One person posts; another, behind by one version, gets the message at once.
    alice, bob = new_client(server), new_client(server)
    alice.join()
    bob.join()
    before = bob.version
    response = alice.post("hello, room")
    assert response.status == 201
    message = response.json["message"]
    assert set(message) == {"id", "user", "name", "text", "time"}
    assert message["text"] == "hello, room" and message["user"] == alice.poll(timeout=0)["you"]["id"]
    assert abs(message["time"] - time.time() * 1000) < 60_000
    answer = bob.poll(since=before, timeout=0)
    assert [m["id"] for m in answer["messages"]] == [message["id"]]
    assert answer["version"] >= message["id"]


def post_with_key(client, text, key):
    return client.request("POST", "/api/messages", {"text": text}, {"Idempotency-Key": key})


def test_a_retried_post_is_stored_once(start_server):
    # A post whose response was lost is sent again with the same Idempotency-Key: it gets the
    # same message back (201, same id), and nothing new is stored, nor counted by the rate limit,
    # also after a restart. The same key with another text is refused (422); another person's
    # post with the same key is their own new message; a malformed key is a 400.
    server = start_server(*ORIGINAL_LIMITS)
    ann, bob = new_client(server), new_client(server)
    ann.join()
    first = post_with_key(ann, "hello once", "key-1")
    assert first.status == 201
    assert ann.post("and another").status == 201  # 2 in 3 s: the limit is reached
    retries = [post_with_key(ann, "hello once", "key-1") for _ in range(4)]
    assert [r.status for r in retries] == [201] * 4
    assert all(r.json == first.json for r in retries), "a retry got another message"
    assert post_with_key(ann, "something else", "key-1").status == 422
    theirs = post_with_key(bob, "hello once", "key-1")
    assert theirs.status == 201 and theirs.json["message"]["id"] != first.json["message"]["id"]
    for bad in ("", "x" * 65, "two words", "caf\u00e9"):
        answer = exchange(server.port, http_request(
            "POST", "/api/messages", {"Host": "127.0.0.1", "Cookie": f"sid={ann.sid}",
                                      "Content-Type": "application/json",
                                      "Idempotency-Key": bad}, b'{"text": "x"}'))
        assert answer[0] == 400, (bad, answer)
    server.restart()
    again = post_with_key(ann, "hello once", "key-1")
    assert again.status == 201 and again.json == first.json
    texts = [m["text"] for m in ann.request("GET", "/api/messages").json["messages"]]
    assert texts.count("hello once") == 2, texts  # Ann's, once, and Bob's


def test_identical_posts_at_once_store_one_message(start_server):
    # Eight copies of one post (same person, same key) arrive together: one message is stored,
    # and every copy is answered with it (or, while the first is being saved, told to retry).
    server = start_server()
    client = new_client(server)
    client.join()
    results = []

    def post():
        results.append(post_with_key(client, "only once", "same-key"))

    threads = [threading.Thread(target=post) for _ in range(8)]
    for thread in threads:
        thread.start()
    assert join_all(threads, 30) == 0
    ids = {r.json["message"]["id"] for r in results if r.status == 201}
    assert len(ids) == 1 and all(r.status in (201, 409) for r in results), \
        [(r.status, r.body) for r in results]
    texts = [m["text"] for m in client.request("GET", "/api/messages").json["messages"]]
    assert texts.count("only once") == 1, texts


def test_parked_poll_is_woken_by_a_post(server):
    # Bob parks a poll with a long time-out; Alice's post wakes it long before that.
    alice, bob = new_client(server), new_client(server)
    alice.join()
    bob.join()
    thread, result = poll_in_background(bob, timeout=30)
    wait_until(lambda: thread.is_alive(), message="poll to be in flight")
    started = time.monotonic()
    message = alice.post("wake up").json["message"]
    thread.join(20)
    assert not thread.is_alive(), "the parked poll was not woken by the post"
    assert time.monotonic() - started < 20
    assert message["id"] in [m["id"] for m in result["answer"]["messages"]]


def test_timeout_zero_answers_at_once_and_timeout_expires(server):
    # With nothing new, timeout=0 answers at once, and timeout=1 answers (unchanged) once the
    # time-out passes. (A presence change may wake a poll first, so try a few times.)
    client = new_client(server)
    client.join()
    assert client.poll(timeout=0)["messages"] == []

    def a_poll_times_out():
        since = client.version
        return client.poll(timeout=1)["version"] == since

    wait_until(a_poll_times_out, timeout=15, interval=0, message="a poll to time out")


def test_future_since_gets_a_snapshot_at_once(server):
    # A page that knew a newer room (data file replaced) gets a snapshot instead of hanging.
    client = new_client(server)
    now = client.join()["version"]
    answer = client.poll(since=now + 1000, timeout=30)
    assert answer["version"] == now and "online" in answer


def test_many_pollers_see_the_same_messages_in_order(server):
    # 20 readers keep polling while 8 writers post 16 messages: every reader sees all 16, in
    # order, each once.
    readers = [new_client(server) for _ in range(20)]
    writers = [new_client(server) for _ in range(8)]
    for client in readers + writers:
        client.join()
    start = min(reader.version for reader in readers)
    seen = {index: [] for index in range(len(readers))}
    posted = []
    done = threading.Event()

    def read(index, reader):
        reader.version = start
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not (done.is_set() and reader.version >= max(posted)):
            answer = reader.poll(timeout=2)
            seen[index] += [m["id"] for m in answer["messages"]]

    threads = [threading.Thread(target=read, args=item) for item in enumerate(readers)]
    for thread in threads:
        thread.start()
    for round_ in range(2):
        for writer in writers:
            response = writer.post(f"message {round_} from {writer.sid[:4]}")
            assert response.status == 201, response.body
            posted.append(response.json["message"]["id"])
    done.set()
    for thread in threads:
        thread.join(40)
    ours = set(posted)
    for index, ids in seen.items():
        mine = [i for i in ids if i in ours]
        assert mine == sorted(posted), f"reader {index} saw {mine}, expected {sorted(posted)}"
        assert len(ids) == len(set(ids)), f"reader {index} saw a message twice"


def test_markup_comes_back_verbatim(server):
    # The server stores text exactly as sent: escaping is the page's job, at the DOM.
    client = new_client(server)
    client.join()
    text = '<img src=x onerror="window.__xss=1"> & "quotes" \u00e9\U0001F600\n line two'
    assert client.post(text).json["message"]["text"] == text
    assert client.rename("<b>bold</b>").json["you"]["name"] == "<b>bold</b>"
    answer = client.poll(since=None)
    said, notice = answer["messages"][-2:]  # the message, then the notice of the new name
    assert said["text"] == text
    assert notice["kind"] == "rename" and notice["name"] == "<b>bold</b>"


def test_sustained_posting_reaches_every_page_once_in_order(start_server):
    # 30 pages keep polling on keep-alive connections while 40 people post 80 messages as fast as
    # the rate limit lets them: every page sees every message exactly once, in order. (An answer
    # written twice for one poll would be read as the answer to the page's next poll.)
    server = start_server("--people-per-address", "70")  # (all of them at 127.0.0.1)
    pages, start = open_pages(server, 30)
    posters = [new_client(server) for _ in range(40)]
    posted, done = [], threading.Event()
    lock = threading.Lock()

    def listen(page):
        since = start
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not (done.is_set() and since >= max(posted)):
            status, _, answer = page.poll(since, timeout=5)
            assert status == 200
            since = answer["version"]

    def post(people):
        for _ in range(2):  # two each: within "at most 2 messages in 3 s"
            for person in people:
                response = person.post(f"sustained from {person.sid[:6]}")
                assert response.status == 201, response.body
                with lock:
                    posted.append(response.json["message"]["id"])

    listeners = [threading.Thread(target=listen, args=(page,), daemon=True) for page in pages]
    writers = [threading.Thread(target=post, args=(posters[i::8],), daemon=True) for i in range(8)]
    for thread in listeners + writers:
        thread.start()
    assert join_all(writers, 60) == 0, "posting did not finish"
    done.set()
    assert join_all(listeners, 60) == 0, "some pages never caught up"
    expected = sorted(posted)
    assert len(expected) == 80
    for index, page in enumerate(pages):
        ours = [i for i in page.seen if i in set(expected)]
        assert ours == expected, f"page {index} saw {len(ours)} messages, duplicates " \
                                 f"{len(ours) - len(set(ours))}, expected {len(expected)} in order"
        page.close()


def test_posts_during_shutdown_are_acknowledged_and_delivered_or_refused(start_server):
    # Pages are parked and people are posting when the server is told to stop. Every post gets
    # a whole 201 (and its message is there after a restart, and reached the pages that were
    # answered with later versions), or no answer, or a refusal: never half an answer.
    server = start_server()
    pages, since = open_pages(server, 10)
    threads, answers = pages_polling(pages, since)
    posters = [new_client(server) for _ in range(10)]
    outcomes = {}

    def post(person):
        data = http_request("POST", "/api/messages",
                            {"Host": f"127.0.0.1:{server.port}", "Cookie": f"sid={person.sid}",
                             "Content-Type": "application/json"},
                            json.dumps({"text": f"at shutdown {person.sid[:6]}"}).encode())
        try:
            outcomes[person.sid] = exchange(server.port, data)
        except (OSError, AssertionError) as error:
            outcomes[person.sid] = error

    time.sleep(0.2)
    writers = [threading.Thread(target=post, args=(person,), daemon=True) for person in posters]
    for thread in writers:
        thread.start()
    assert server.stop(signal.SIGTERM) == 0
    assert join_all(writers + threads, 20) == 0
    acknowledged = []
    for sid, outcome in outcomes.items():
        assert not isinstance(outcome, AssertionError), f"a half-written answer: {outcome}"
        if isinstance(outcome, tuple) and outcome[0] == 201:
            acknowledged.append(json.loads(outcome[2])["message"]["id"])
        else:
            assert isinstance(outcome, OSError) or outcome[0] in (0, 503), outcome
    server.start()
    stored = {m["id"] for m in Client(server).poll(since=since, timeout=0)["messages"]}
    assert set(acknowledged) <= stored, "an acknowledged message was lost"
    for index, answer in answers.items():
        delivered = {m["id"] for m in answer["messages"]}
        assert {i for i in acknowledged if i <= answer["version"]} <= delivered, \
            f"page {index} was answered with version {answer['version']} but not every message"


def test_stopping_under_a_burst_of_posts_never_crashes(start_server):
    # Twenty people post as fast as they can on keep-alive connections, and the server is sent
    # SIGTERM twice, a moment apart, three times over: it exits 0 each time, with no crash and no
    # traceback; no post is ever answered 500; and every acknowledged message is there afterwards.
    server = start_server("--rate-limits", "1000/1")
    posters = [new_client(server) for _ in range(20)]
    acknowledged, statuses = [], collections.Counter()

    def post(person, port, stop):
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        body = json.dumps({"text": f"burst {person.sid[:6]}"})
        headers = {"Cookie": f"sid={person.sid}", "Content-Type": "application/json"}
        while not stop.is_set():
            try:
                connection.request("POST", "/api/messages", body, headers)
                response = connection.getresponse()
                data = response.read()
            except (OSError, http.client.HTTPException):
                return  # the server has gone: this try was not acknowledged
            statuses[response.status] += 1
            if response.status == 201:
                acknowledged.append(json.loads(data)["message"]["id"])
            if response.will_close:
                return

    for _ in range(3):
        stop = threading.Event()
        threads = [threading.Thread(target=post, args=(person, server.port, stop), daemon=True)
                   for person in posters]
        for thread in threads:
            thread.start()
        time.sleep(0.5)
        server.process.send_signal(signal.SIGTERM)
        time.sleep(0.05)
        server.process.send_signal(signal.SIGTERM)  # impatient: a second one, mid-shutdown
        status = server.stop(timeout=15)
        stop.set()
        assert join_all(threads, 15) == 0
        log = server.output()
        assert status == 0, f"exit status {status}:\n{log[-2000:]}"
        assert "Traceback" not in log, log[-3000:]
        server.start()
    assert statuses[500] == 0 and statuses[201] > 0, statuses
    assert set(statuses) <= {201, 503}, statuses
    stored = set(history(Client(server), f"?limit={chatroom.MAX_HISTORY_PAGE}"))
    while len(stored) < len(set(acknowledged)):
        older = history(Client(server), f"?before={min(stored)}&limit={chatroom.MAX_HISTORY_PAGE}")
        if not older:
            break
        stored.update(older)
    assert set(acknowledged) <= stored, "an acknowledged message was lost"



def test_log_polls_tells_the_life_of_each_poll(start_server, tmp_path):
    # With --log-polls the server says when a poll parks, when a change answers the waiting
    # polls (how many, in how long) and when a poll times out; without it, it says nothing.
    quiet = start_server(data=tmp_path / "quiet.db")
    server = start_server("--log-polls")
    for room in (quiet, server):
        client = new_client(room)
        client.join()
        wait_until_online(client)
        since = client.poll(since=None)["version"]
        thread, _ = poll_in_background(client, since=since, timeout=30)
        time.sleep(0.2)  # parked
        assert new_client(room).post("hello").status == 201
        thread.join(WAKE_BOUND)
        client.poll(since=since + 1, timeout=0.5)
    lines = server.output()
    assert re.search(rf"poll parked: Guest \d+, since version {since} \(1 waiting\)", lines), lines
    # (The full server says how long its broadcast took; the plain room, whom it wakes.)
    assert re.search(rf"version {since + 1}: (answered 1 waiting poll in [\d.]+ ms|"
                     rf"waking 1 waiting poll)", lines), lines
    assert re.search(rf"poll timed out after 0.5 s: Guest \d+, nothing new since version "
                     rf"{since + 1}", lines), lines
    assert "poll" not in quiet.output()


# --------------------------------------------------------------------------------------------------
# 3. Presence
# --------------------------------------------------------------------------------------------------

def test_parked_poll_is_woken_by_someone_arriving(start_server):
    # Bob is alone and parked; when Carol comes online, Bob's poll answers with the new list.
    server = start_server()
    thread, result = park_alone(server)
    carol = new_client(server)
    carol.join()
    carol_id = carol.poll(timeout=0)["you"]["id"]
    thread.join(20)
    assert not thread.is_alive(), "a presence change did not wake the parked poll"
    assert carol_id in [person["id"] for person in result["answer"]["online"]]


def test_a_steady_stream_of_arrivals_is_announced_before_it_ends(start_server):
    # People keep arriving, one every 0.1 s, for 4 s. Bob's parked poll does not wait for a
    # pause that never comes: it wakes within ARRIVALS_MAX_WAIT (2 s) of the first arrival.
    server = start_server()
    thread, _ = park_alone(server)
    for _ in range(40):
        new_client(server).poll(since=None, timeout=0)
        if not thread.is_alive():
            break
        time.sleep(0.1)  # the pace at which people arrive
    assert not thread.is_alive(), "arrivals were announced only once they stopped"


def test_presence_comes_online_and_goes_offline(start_server):
    # Dora polls and shows up online; she stops polling and drops off after the window (2 s).
    server = start_server("--online-window", "2", "--poll-timeout", "5")
    dora, watcher = new_client(server), new_client(server)
    dora_id = dora.join()["you"]["id"]
    watcher.join()

    def online_ids():
        return {person["id"] for person in watcher.poll(since=None)["online"]}

    wait_until(lambda: dora_id in online_ids(), message="Dora to be online")
    wait_until(lambda: dora_id not in online_ids(), message="Dora to go offline")


def test_client_without_cookie_is_not_counted_online(server):
    # A script that never sends the cookie back polls, but never appears in the online list.
    anonymous = Client(server)
    anonymous.request("GET", "/api/poll")
    stranger = anonymous.request("GET", "/api/poll", headers={"Cookie": ""}).json["you"]["id"]
    watcher = new_client(server)
    watcher.join()
    time.sleep(1.2)  # one presence interval
    assert stranger not in {p["id"] for p in watcher.poll(since=None)["online"]}


# --------------------------------------------------------------------------------------------------
# 4. Identity and names
# --------------------------------------------------------------------------------------------------

def test_rename_is_trimmed_and_carried_by_new_messages(server):
    # A renamed user's new messages carry the new name; earlier ones keep the old one.
    client = new_client(server)
    client.join()
    old = client.post("before").json["message"]
    response = client.rename("  Ada Lovelace  ")
    assert response.status == 200 and response.json["you"]["name"] == "Ada Lovelace"
    new = client.post("after").json["message"]
    assert new["name"] == "Ada Lovelace" and old["name"] != "Ada Lovelace"
    answer = client.poll(since=old["id"] - 1, timeout=0)
    names = {m["id"]: m["name"] for m in answer["messages"]}
    assert names[old["id"]] == old["name"] and names[new["id"]] == "Ada Lovelace"
    assert answer["you"]["name"] == "Ada Lovelace"


def test_a_rename_is_announced_in_the_room_and_kept(start_server):
    # Frances renames herself: everyone's next poll carries a notice "Guest N is now Frances" (a
    # message of kind "rename", with the name before) in the order of the room, as history does,
    # also after a restart. Renaming to the same name again changes nothing at all.
    server = start_server()
    frances, reader = new_client(server), new_client(server)
    frances.join()
    before = frances.poll(timeout=0)["you"]["name"]
    since = reader.poll(since=None)["version"]
    assert frances.rename("Frances").status == 200
    notices = [m for m in reader.poll(since=since, timeout=0)["messages"]
               if m.get("kind") == "rename"]
    assert len(notices) == 1, notices
    notice = notices[0]
    assert notice["name"] == "Frances" and notice["old_name"] == before
    assert notice["text"] == f"{before} is now Frances" and notice["user"] == frances.poll(
        timeout=0)["you"]["id"]
    # (The full server publishes the online list with the new name within a second: after it.)
    wait_until(lambda: "Frances" in {p["name"] for p in reader.poll(since=None)["online"]},
               message="the online list to name Frances")
    version = reader.poll(since=None)["version"]
    assert frances.rename("  Frances ").status == 200  # the same name: nothing to announce
    assert reader.poll(since=version, timeout=0.5)["version"] == version
    server.restart()
    kept = reader.request("GET", "/api/messages").json["messages"]
    assert notice in kept, "the notice was not kept across a restart"
    assert frances.poll(since=None)["you"]["name"] == "Frances"


@pytest.mark.parametrize("name, why", [
    ("", "blank"), ("   ", "blank"), ("x" * 41, "too long"), ("a\x00b", "control"),
    ("a\nb", "newline"), ("bell\x07", "control"), ("\x1b[31mred", "control"),
    ("a\x7fb", "DEL"), ("a\x85b", "C1 control (next line)"), ("\x9b31mred", "C1 control (CSI)"),
])
def test_bad_names_are_refused(server, name, why):
    # Names that are blank, too long or carry control characters get a 400 and change nothing.
    client = new_client(server)
    before = client.join()["you"]["name"]
    response = client.rename(name)
    assert response.status == 400, (why, response.status)
    assert response.json["error"]
    assert client.poll(timeout=0)["you"]["name"] == before


DISGUISED_TEXT = [
    # (what, text): text that shows other than it is, or shows nothing at all
    ("a right-to-left override", "\u202enimdA"),
    ("a left-to-right override", "Ad\u202dmin"),
    ("a right-to-left embedding", "\u202bAdmin\u202c"),
    ("a pop of the direction alone", "Admin\u202c"),
    ("a right-to-left isolate", "\u2067Admin\u2069"),
    ("a first-strong isolate", "\u2068Admin"),
    ("zero-width spaces only", "\u200b\u200b"),
    ("joiners only", "\u200c\u200d"),
    ("a word joiner", "\u2060"),
    ("a byte order mark", "\ufeff"),
    ("a soft hyphen", "\u00ad"),
    ("a Hangul filler", "\u3164"),
    ("Hangul jamo fillers", "\u115f\u1160"),
    ("a blank braille pattern", "\u2800\u2800"),
    ("a variation selector", "\ufe0f"),
    ("a tag character", "\U000e0020"),
    ("spaces and invisible ones", " \u3000\u200b\u00a0 "),
]


@pytest.mark.parametrize("what, text", DISGUISED_TEXT, ids=[case[0] for case in DISGUISED_TEXT])
def test_text_that_disguises_itself_is_refused(server, what, text):
    # A name or a message that would reorder what the page shows after it ("nimdA" shown as
    # "Admin", with the time after it turned around), or that shows nothing at all, gets a 400
    # that says why, and changes nothing.
    client = new_client(server)
    before = client.join()["you"]["name"]
    for path, body in (("/api/name", {"name": text}), ("/api/messages", {"text": text})):
        response = client.request("POST", path, body)
        assert response.status == 400, (what, path, response.status, response.body)
        error = response.json["error"]
        assert "direction" in error or "invisible" in error, (what, error)
    answer = client.poll(since=None)
    assert answer["you"]["name"] == before
    assert text not in [m["text"] for m in answer["messages"]]


@pytest.mark.parametrize("text", ["שלום", "مرحبا بكم", "Zoë 日本語", "👨\u200d👩\u200d👧",
                                  "\u200eAda\u200f", "x\u3164", "\u200bA"])
def test_text_in_any_script_is_accepted(server, text):
    # Right-to-left scripts, joined emoji, and invisible characters beside visible ones are fine.
    client = new_client(server)
    client.join()
    assert client.rename(text).status == 200, text
    assert client.post(text).status == 201, text


def test_name_of_40_characters_is_accepted(server):
    # The limit is inclusive, and counts the name as trimmed.
    client = new_client(server)
    client.join()
    assert client.rename("n" * 40).status == 200
    response = client.rename("  " + "m" * 40 + " ")
    assert response.status == 200 and response.json["you"]["name"] == "m" * 40


def test_name_and_identity_survive_a_restart(start_server):
    # After a restart, the same cookie is the same person with the same name.
    server = start_server()
    client = new_client(server)
    client.join()
    client.rename("Grace")
    who = client.poll(timeout=0)["you"]
    server.restart()
    assert client.poll(since=None)["you"] == who == {"id": who["id"], "name": "Grace"}


def test_post_without_cookie_is_refused_with_a_cookie_to_retry_with(server):
    # A POST without the session cookie is refused (403) but gets a cookie; the retry works.
    client = Client(server)
    refused = client.post("hi")
    assert refused.status == 403 and "cookie" in refused.json["error"]
    assert client.sid
    assert client.post("hi").status == 201


def test_a_cookieless_flood_leaves_no_trace(start_server):
    # 2000 requests that never send a cookie back (polls, posts, renames): no user or message is
    # stored, the data file does not grow, nobody is online, the version does not move, and the
    # server's memory stays flat.
    server = start_server()

    def room():
        return Client(server).request("GET", "/api/poll?timeout=0").json

    def file_sizes():
        return [path.stat().st_size if path.exists() else 0
                for path in (server.data, Path(f"{server.data}-wal"))]

    def flood(count):
        statuses = []

        def run(share):
            for n in range(share):
                kind = n % 4
                if kind == 0:
                    response = Client(server).request("GET", "/api/poll?timeout=0")
                elif kind == 1:
                    response = Client(server).request("GET", f"/api/poll?since={n}&timeout=0")
                elif kind == 2:
                    response = Client(server).post(f"anonymous {n}")
                else:
                    response = Client(server).rename(f"anonymous {n}")
                statuses.append(response.status)

        threads = [threading.Thread(target=run, args=(count // 8,)) for _ in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        return statuses

    flood(200)  # warm up: threads, caches and buffers the server allocates once
    before, sizes, memory = room(), file_sizes(), server_memory(server)
    statuses = flood(2000)
    assert len(statuses) == 2000 and set(statuses) <= {200, 403}, set(statuses)
    time.sleep(chatroom.PRESENCE_INTERVAL + 0.2)  # had anyone come online, it would show now
    after = room()
    assert after["version"] == before["version"] and after["online"] == before["online"] == []
    assert file_sizes() == sizes, "cookieless requests grew the data file"
    with sqlite3.connect(server.data) as db:
        assert db.execute("SELECT COUNT(*) FROM users").fetchone() == (0,)
        assert db.execute("SELECT COUNT(*) FROM messages").fetchone() == (0,)
    db.close()
    if memory is not None:
        grown = server_memory(server) - memory
        assert grown < 4 * 2**20, f"the server grew by {grown // 2**20} MiB"


# --------------------------------------------------------------------------------------------------
# 5. Rate limiting
# --------------------------------------------------------------------------------------------------

def test_rate_limit_refuses_the_third_message_in_three_seconds(server):
    # Two quick messages pass; the third gets 429 with Retry-After and is not stored. Someone
    # else can still post.
    flooder, other = new_client(server), new_client(server)
    flooder.join()
    other.join()
    assert flooder.post("one").status == 201
    assert flooder.post("two").status == 201
    refused = flooder.post("three")
    assert refused.status == 429
    retry = int(refused.headers["Retry-After"])
    assert 1 <= retry <= 3
    assert 0 < refused.json["retry_after"] <= 3
    assert refused.json["limit"] == {"count": 2, "seconds": 3}
    assert "2 messages in 3 seconds" in refused.json["error"]
    texts = [m["text"] for m in flooder.poll(since=None)["messages"]]
    assert "three" not in texts
    assert other.post("I am not limited").status == 201


def test_rate_limit_lifts_after_retry_after(server):
    # After waiting as told, the same person can post again.
    client = new_client(server)
    client.join()
    client.post("a")
    client.post("b")
    refused = client.post("c")
    assert refused.status == 429
    time.sleep(refused.json["retry_after"] + 0.05)  # the wait the server asked for
    assert client.post("c").status == 201


def test_default_limits_let_a_conversation_flow_and_stop_a_flood(start_server):
    # With the default limits, five quick lines in a row go through (a conversation, not a
    # queue); the sixth within five seconds is refused, and says which limit it met.
    server = start_server()
    client = new_client(server)
    client.join()
    assert [client.post(f"line {n}").status for n in range(5)] == [201] * 5
    refused = client.post("line 5")
    assert refused.status == 429 and refused.json["limit"] == {"count": 5, "seconds": 5}


def test_rate_limits_flag_is_checked(tmp_path):
    # --rate-limits takes COUNT/SECONDS pairs; anything else is a one-line error, exit status 2.
    for bad in ("2/x", "0/3", "3", "2/3,", "2/3/4"):
        result = run_chatroom(CHATROOM, "--rate-limits", bad, "--port", "0", cwd=tmp_path)
        assert result.returncode == 2 and "--rate-limits" in result.stderr, (bad, result.stderr)


# --------------------------------------------------------------------------------------------------
# 6. Storage: persistence, restarts, faults
# --------------------------------------------------------------------------------------------------

def test_messages_survive_kill_9_and_ids_keep_growing(start_server):
    # Acknowledged messages are on disk: after kill -9 and a restart they are all there, and
    # new ids continue above the old ones.
    server = start_server()
    clients = [new_client(server) for _ in range(3)]
    acknowledged = []
    for client in clients:
        client.join()
        for n in range(2):
            response = client.post(f"{client.sid[:4]} #{n}")
            assert response.status == 201
            acknowledged.append(response.json["message"])
    assert server.stop(signal.SIGKILL) == -signal.SIGKILL
    server.start()
    stored = clients[0].poll(since=0, timeout=0)["messages"]
    assert [(m["id"], m["text"]) for m in stored] == [(m["id"], m["text"]) for m in acknowledged]
    new = clients[0].post("after the crash").json["message"]
    assert new["id"] > max(m["id"] for m in acknowledged)


def test_version_never_goes_backwards_across_restart(start_server):
    # Renames and presence changes also move the version, and it is stored: a restart never
    # shows a version older than one a page has already seen.
    server = start_server()
    client = new_client(server)
    client.join()
    client.rename("Version Keeper")
    seen = client.poll(since=None)["version"]
    server.stop(signal.SIGKILL)
    server.start()
    assert client.poll(since=None)["version"] >= seen


def test_long_history_is_sent_in_batches(start_server, tmp_path):
    # A page 700 messages behind gets them in two answers: 500, then the rest, in order.
    server = start_server()
    server.stop()
    with sqlite3.connect(server.data) as db:
        db.executemany("INSERT INTO messages VALUES (?, 'u', 'n', ?, 0)",
                       [(i, f"m{i}") for i in range(1, 701)])
        db.execute("UPDATE room SET version = 700")
    server.start()
    client = new_client(server)
    first = client.poll(since=0, timeout=0)
    assert [m["id"] for m in first["messages"]] == list(range(1, 501))
    assert first["version"] == 500
    second = client.poll(timeout=0)
    assert [m["id"] for m in second["messages"]] == list(range(501, 701))
    assert client.poll(since=None)["messages"][-1]["id"] == 700
    assert len(client.poll(since=None)["messages"]) == 100


def test_a_storage_failure_refuses_the_post_and_announces_nothing(start_server):
    # Another program holds the data file's write lock. A post then gets 503 JSON, is neither
    # acknowledged nor shown to a parked poll, and the version stays; polls keep working. Once the
    # lock is released posting works again, and the failed posts did not count against the rate
    # limit (two in 3 s would otherwise make the next one a 429).
    server = start_server()
    alice, bob, carol = new_client(server), new_client(server), new_client(server)
    for client in (alice, bob, carol):
        client.join()
    for client in (alice, bob, carol):
        wait_until_online(client)
    version = carol.poll(since=None)["version"]
    thread, result = poll_in_background(bob, since=version, timeout=30)
    time.sleep(0.2)  # Bob's poll is parked
    lock = sqlite3.connect(server.data, timeout=5, isolation_level=None)
    try:
        lock.execute("BEGIN EXCLUSIVE")
        for attempt in ("lost one", "lost two"):
            refused = alice.post(attempt)
            assert refused.status == 503, (refused.status, refused.body)
            assert "could not save your message" in refused.json["error"]
            assert "message" not in refused.json and int(refused.headers["Retry-After"]) >= 1
            answer = carol.poll(since=None)
            assert answer["version"] == version, "the version moved for an unsaved message"
            assert attempt not in [m["text"] for m in answer["messages"]]
        assert thread.is_alive(), "the parked poll was woken by an unsaved message"
    finally:
        lock.execute("ROLLBACK")
        lock.close()
    saved = alice.post("saved")
    assert saved.status == 201, (saved.status, saved.body)
    assert saved.json["message"]["id"] == version + 1
    thread.join(10)
    assert [m["text"] for m in result["answer"]["messages"]] == ["saved"]
    assert "Traceback" not in server.output()


def test_kill_9_under_load_loses_no_acknowledged_message(start_server):
    # 40 writers post (each starting at a random moment) while 100 readers poll; the server is
    # killed with -9 at a random moment. After a restart on the same file: every message that got
    # a 201 is there with its id and text, in order; every message a reader saw is there; new
    # ids are above anything seen before; a reader continuing from its version gets the rest.
    rng = random.Random(20240613)
    server = start_server()
    writers = [new_client(server) for _ in range(40)]
    readers = [new_client(server) for _ in range(100)]
    acknowledged, seen, problems = [], {}, []
    stop = threading.Event()
    gone = (OSError, http.client.HTTPException)  # the server was killed

    def write(writer, number, delay):
        if stop.wait(delay):
            return
        for n in range(3):
            try:
                response = writer.post(f"writer {number} #{n}")
            except gone:
                return
            if response.status == 201:
                acknowledged.append((response.json["message"]["id"], f"writer {number} #{n}"))
            elif response.status == 429:
                if stop.wait(response.json["retry_after"]):
                    return
            else:
                problems.append((response.status, response.body))

    def read(reader, number):
        reader.version = 0
        seen[number] = []
        while not stop.is_set():
            try:
                answer = reader.poll(timeout=1)
            except gone:
                return
            except AssertionError as error:  # an answer other than 200
                problems.append(error)
                return
            seen[number] += [(m["id"], m["text"]) for m in answer["messages"]]

    threads = [threading.Thread(target=write, args=(writer, n, rng.uniform(0, 2)))
               for n, writer in enumerate(writers)]
    threads += [threading.Thread(target=read, args=(reader, n)) for n, reader in enumerate(readers)]
    for thread in threads:
        thread.start()
    time.sleep(rng.uniform(0.8, 2.0))
    server.stop(signal.SIGKILL)
    stop.set()
    for thread in threads:
        thread.join(15)
    assert not any(thread.is_alive() for thread in threads)
    assert not problems, problems
    assert len(acknowledged) >= 10, "too little load to mean anything"
    highest_seen = max([reader.version or 0 for reader in readers] +
                       [message_id for message_id, _ in acknowledged])

    server.start()
    stored = [(m["id"], m["text"]) for m in Client(server).poll(since=0, timeout=0)["messages"]]
    ids = [message_id for message_id, _ in stored]
    assert ids == sorted(set(ids)), "stored messages are out of order or repeated"
    assert set(acknowledged) <= set(stored), "an acknowledged message was lost"
    assert len({message_id for message_id, _ in acknowledged}) == len(acknowledged)
    for number, messages in seen.items():
        assert set(messages) <= set(stored), f"reader {number} saw a message that was not kept"
    newcomer = new_client(server)
    newcomer.join()
    assert newcomer.version >= highest_seen, "the version went backwards"
    new = newcomer.post("after the crash").json["message"]
    assert new["id"] > highest_seen, "an id was used again"
    for reader in readers[:20]:
        since = reader.version
        answer = reader.poll(since=since, timeout=0)
        assert [(m["id"], m["text"]) for m in answer["messages"]] == \
            [m for m in stored + [(new["id"], new["text"])] if m[0] > since]


@pytest.mark.parametrize("content", [b"this is not a database at all" * 100,
                                     "foreign schema"])
def test_foreign_data_file_is_refused_untouched(tmp_path, content):
    # A data file that is not ours: a clear message, a non-zero exit, and the file unchanged.
    data = tmp_path / "foreign.db"
    if content == "foreign schema":
        with sqlite3.connect(data) as db:
            db.execute("CREATE TABLE accounts (id INTEGER, balance INTEGER)")
        db.close()
    else:
        data.write_bytes(content)
    before = data.read_bytes()
    result = run_chatroom(CHATROOM, "--port", "0", "--data", data, cwd=tmp_path)
    assert result.returncode != 0
    assert str(data) in result.stderr or "data file" in result.stderr
    assert data.read_bytes() == before


def test_a_data_file_of_the_first_schema_is_brought_up_to_date(tmp_path):
    # A file made by an earlier chatroom.py (schema 1: messages, users, the version) opens with
    # its messages, names and version, and then takes rename notices and retried posts.
    data = tmp_path / "old.db"
    with sqlite3.connect(data) as db:
        db.executescript(chatroom.SCHEMA)
        db.execute("INSERT INTO messages VALUES (7, 'u', 'Old Timer', 'from before', 0)")
        db.execute("UPDATE room SET version = 9")
    db.close()
    server = Server(tmp_path, data=data)
    try:
        client = new_client(server)
        answer = client.poll(since=None)
        assert answer["version"] == 9 and answer["messages"][0]["text"] == "from before"
        client.join()
        assert client.rename("New Name").status == 200
        assert post_with_key(client, "after the upgrade", "k").status == 201
        assert post_with_key(client, "after the upgrade", "k").status == 201
        texts = [m["text"] for m in client.request("GET", "/api/messages").json["messages"]]
        assert texts.count("after the upgrade") == 1 and texts[0] == "from before"
    finally:
        server.stop()


def test_unusable_data_path_is_a_clear_error(tmp_path):
    # A data file in a folder that does not exist cannot be opened: say so and exit non-zero.
    result = run_chatroom(CHATROOM, "--port", "0", "--data", tmp_path / "no" / "such" / "x.db",
                          cwd=tmp_path)
    assert result.returncode != 0 and "data file" in result.stderr
    assert "does not exist" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize("how", ["deleted", "replaced"])
def test_a_deleted_or_replaced_data_file_refuses_posts_and_renames(start_server, how):
    # The data file is deleted, or replaced by a copy, while the room runs. What is written now
    # would be lost, so from then on a post and a rename get 503 JSON that says why, nothing is
    # acknowledged or shown to a parked poll, and one line in the log says what happened. Polls
    # go on.
    server = start_server()
    alice, bob = new_client(server), new_client(server)
    for client in (alice, bob):
        client.join()
    for client in (alice, bob):
        wait_until_online(client)
    assert alice.post("before").status == 201
    version = bob.poll(since=None)["version"]
    thread, result = poll_in_background(bob, since=version, timeout=30)
    if how == "deleted":
        server.data.unlink()
    else:
        shutil.copyfile(server.data, server.folder / "copy.db")
        os.replace(server.folder / "copy.db", server.data)
    for path, body in (("/api/messages", {"text": "lost one"}), ("/api/name", {"name": "Lost"}),
                       ("/api/messages", {"text": "lost two"})):
        refused = alice.request("POST", path, body)
        assert refused.status == 503, (how, path, refused.status, refused.body)
        assert "deleted or replaced" in refused.json["error"] and "restart" in refused.json["error"]
    answer = alice.poll(since=None)
    assert answer["version"] == version and answer["you"]["name"] != "Lost"
    assert [m["text"] for m in answer["messages"]] == ["before"]
    assert thread.is_alive(), "the parked poll was woken by an unsaved change"
    log = server.output()
    assert log.count("was deleted or replaced while the server ran") == 1, log
    assert "Traceback" not in log
    server.stop()  # (which answers the parked poll: nothing new)
    thread.join(10)
    assert result["answer"]["messages"] == []


def without_root_powers(command):
    """`command`, run so that file permissions bind it even when the tests run as root.

    Root may write a read-only file; without the capability CAP_DAC_OVERRIDE (setpriv drops it
    from what the command may ever have) it may not, like any other user.
    """
    if os.geteuid() != 0:
        return command
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.skip("running as root, and setpriv (util-linux) is missing to drop root's powers")
    return [setpriv, "--bounding-set=-dac_override,-dac_read_search", *command]


@pytest.mark.skipif(not hasattr(os, "geteuid"), reason="file permissions as on Unix")
@pytest.mark.parametrize("what", ["file", "folder", "folder, new file"])
def test_a_read_only_data_file_or_folder_is_a_clear_error(tmp_path, what):
    # A data file this user may not write, or one in a folder it may not write (where SQLite
    # keeps its journal), is refused at start-up, in one line that says which, with a non-zero
    # exit: not a room where every post fails, nor "not an SQLite database".
    folder = tmp_path / "room"
    folder.mkdir()
    data = folder / ("new.db" if what == "folder, new file" else "chat.db")
    if what != "folder, new file":
        Server(folder, data=data).stop()
    locked = data if what == "file" else folder
    locked.chmod(0o555 if what != "file" else 0o444)
    try:
        result = subprocess.run(
            without_root_powers([sys.executable, str(CHATROOM), "--port", "0", "--data", str(data)]),
            cwd=tmp_path, capture_output=True, text=True, timeout=20)
    finally:
        locked.chmod(0o755 if what != "file" else 0o644)
    assert result.returncode != 0, result.stdout
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert f"{what.split(',')[0]} is read-only" in lines[0] or \
        f"folder {folder} is read-only" in lines[0], lines[0]
    assert "not an SQLite database" not in lines[0]


@pytest.mark.parametrize("table", ["room", "messages"])
def test_a_damaged_data_file_is_a_clear_error(tmp_path, table):
    # A data file with a damaged page (here the first page of one of its tables) is refused at
    # start-up in one line, with a non-zero exit, and left as it was: no traceback, and no room
    # that fails later on the damaged page.
    data = tmp_path / "damaged.db"
    with sqlite3.connect(data) as db:
        db.executescript(chatroom.SCHEMA)
        db.executemany("INSERT INTO messages VALUES (?, 'u', 'n', ?, 0)",
                       [(i, "x" * 500) for i in range(1, 200)])
        db.execute("UPDATE room SET version = 199")
        page_size = db.execute("PRAGMA page_size").fetchone()[0]
        page = db.execute("SELECT rootpage FROM sqlite_master WHERE name = ?",
                          (table,)).fetchone()[0]
    db.close()
    with open(data, "r+b") as file:
        file.seek((page - 1) * page_size)
        file.write(b"\xde\xad" * (page_size // 2))
    before = data.read_bytes()
    result = run_chatroom(CHATROOM, "--port", "0", "--data", data, cwd=tmp_path)
    assert result.returncode != 0, result.stdout
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "damaged" in lines[0], result.stderr
    assert data.read_bytes() == before




# --------------------------------------------------------------------------------------------------
# 7. The HTTP handler: what is served, what is refused, what every answer carries
# --------------------------------------------------------------------------------------------------

def test_page_and_chime_are_served(server):
    # A browser loads the page and the chime; both come with the right type.
    client = Client(server)
    page = client.request("GET", "/")
    assert page.status == 200
    assert page.headers["Content-Type"] == "text/html; charset=utf-8"
    assert b"<title>Chat room</title>" in page.body
    assert re.search(rb'<meta name="description" content="[^"]{20,}">', page.body), \
        "no description for search engines to show"
    chime = client.request("GET", "/chime.wav")
    assert chime.status == 200 and chime.headers["Content-Type"] == "audio/wav"
    assert chime.body[:4] == b"RIFF" and len(chime.body) < 100_000


@pytest.mark.parametrize("path", ["/index.html", "/chatroom.py", "/../chatroom.py",
                                  "/%2e%2e/chatroom.py", "//etc/passwd", "/chime.wav/..",
                                  "/api", "/api/poll/x"])
def test_nothing_else_is_served(server, path):
    # Only the page and the chime are files; any other path, traversal included, is a JSON 404.
    status, _, body = exchange(server.port, f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())
    assert status == 404, (path, status, body)
    assert "error" in json.loads(body)


def test_history_pages_back_to_the_first_message(start_server):
    # 250 stored messages, with gaps between their ids as renames and arrivals leave, read back
    # from the newest a page at a time (100, the default, and 7): each message once, in order, and
    # the last page, shorter than asked for, ends with the first message.
    server = start_server()
    ids = list(range(3, 503, 2))
    store_messages(server, [(i, f"m{i}", i) for i in ids])
    client = Client(server)
    for size, limit in ((100, ""), (7, "&limit=7")):
        pages = [history(client, "?" + limit[1:])]
        while len(pages[-1]) == size and len(pages) < 100:
            pages.append(history(client, f"?before={pages[-1][0]}{limit}"))
        assert len(pages[-1]) < size, f"pages of {size} never came to an end"
        read = [i for page in reversed(pages) for i in page]
        assert read == ids, f"pages of {size}: gaps, repeats or disorder"
    assert history(client, "?limit=500") == ids
    assert history(client, f"?before={10 ** 30}&limit=3") == ids[-3:], "a huge before is the end"
    assert history(client, f"?before={ids[0]}") == history(client, "?before=0") == []
    snapshot = client.poll(since=None)["messages"]
    response = client.request("GET", "/api/messages")
    assert response.json["messages"] == snapshot, "history messages differ from a poll's"


def test_a_history_answer_keeps_to_its_byte_budget(start_server):
    # 60 messages of 2,000 four-byte characters (8 KB each), then 20 short ones. An 80-byte
    # request for 500 messages is answered with the newest that fit in MAX_ANSWER_BYTES, and
    # "more": true, since fewer than asked for would otherwise mean "that is all". Reading back
    # from the first one each answer holds brings every message once, in order; the answer that
    # reaches the first message says no "more". Short messages come as many as asked for.
    server = start_server()
    rng = random.Random(20261205)
    long_ones = ["".join(chr(rng.randint(0x1F300, 0x1FAFF)) for _ in range(2000))
                 for _ in range(60)]
    store_messages(server, [(i, text, i) for i, text in enumerate(long_ones, 1)]
                   + [(i, f"short {i}", i) for i in range(61, 81)])
    request = http_request("GET", "/api/messages?limit=500", {"Host": "127.0.0.1"})
    assert len(request) < 80
    status, headers, body = exchange(server.port, request)
    assert status == 200 and "content-encoding" not in headers
    assert len(body) <= chatroom.MAX_ANSWER_BYTES + 100, f"{len(body)} bytes of history at once"
    answer = json.loads(body)
    ids = [m["id"] for m in answer["messages"]]
    assert answer.get("more") is True and ids == list(range(ids[0], 81)) and ids[0] > 1, ids
    pages = [answer]
    while pages[-1].get("more") and len(pages) < 100:
        first = pages[-1]["messages"][0]["id"]
        response = Client(server).request("GET", f"/api/messages?before={first}&limit=500")
        assert response.status == 200
        pages.append(response.json)
    read = [m for page in reversed(pages) for m in page["messages"]]
    assert [m["id"] for m in read] == list(range(1, 81)), "gaps, repeats or disorder"
    assert [m["text"] for m in read[:60]] == long_ones
    assert len(pages) > 2 and "more" not in pages[-1]
    short = Client(server).request("GET", "/api/messages?limit=20").json
    assert "more" not in short and [m["id"] for m in short["messages"]] == list(range(61, 81))


def test_a_batch_and_a_snapshot_keep_to_the_byte_budget(start_server):
    # 12 messages of 2,000 four-byte characters (8 KB each) and 5 short ones. A page that has
    # seen nothing (since=0) gets them in batches of at most MAX_ANSWER_BYTES, each with the
    # version of its last message, and following the versions brings every message once, in
    # order; a new page's snapshot holds the newest that fit. The same after a restart, when
    # they are read from the disk, not from memory.
    server = start_server()
    rng = random.Random(20261205)
    texts = ["".join(chr(rng.randint(0x1F300, 0x1FAFF)) for _ in range(2000)) for _ in range(12)]
    ids = []
    for text in texts + [f"short {n}" for n in range(5)]:  # in UTF-8, as a browser sends them
        response = new_client(server).request(
            "POST", "/api/messages", json.dumps({"text": text}, ensure_ascii=False).encode(),
            {"Content-Type": "application/json"})
        assert response.status == 201, (response.status, response.body)
        ids.append(response.json["message"]["id"])
    for where in ("memory", "disk"):
        client = Client(server)
        since, read, batches = 0, [], 0
        while since < ids[-1] and batches < 50:
            response = client.request("GET", f"/api/poll?since={since}&timeout=0")
            assert len(response.body) <= chatroom.MAX_ANSWER_BYTES + 500, (where, len(response.body))
            read += [m["id"] for m in response.json["messages"]]
            since, batches = response.json["version"], batches + 1
        assert read == ids and batches > 1, (where, read, batches)
        snapshot = client.request("GET", "/api/poll?timeout=0")
        assert len(snapshot.body) <= chatroom.MAX_ANSWER_BYTES + 500, (where, len(snapshot.body))
        held = [m["id"] for m in snapshot.json["messages"]]
        assert held == ids[-len(held):] and len(held) < len(ids), (where, held)
        assert snapshot.json["version"] >= ids[-1]
        server.restart()


@pytest.mark.parametrize("query", ["before=", "before=abc", "before=-1", "before=1.5", "limit=",
                                   "limit=0", "limit=-1", "limit=501", "limit=1e3",
                                   "before=10&limit=", "limit=" + "9" * 5000])
def test_bad_history_requests_are_refused(server, query):
    # An empty, malformed, negative, zero or too large `before` or `limit` is a 400 in JSON; a
    # limit over 500 is refused, not cut down, since a shorter page means "there is no more".
    response = Client(server).request("GET", "/api/messages?" + query)
    assert response.status == 400, (query, response.status, response.body)
    assert response.headers["Content-Type"] == "application/json"
    assert len(response.json["error"]) > 10


def test_reading_history_needs_no_cookie_sets_none_and_counts_no_one(server):
    # A reader with a cookie the room has never seen, and one without any, read the history
    # (GET and HEAD): both are answered, neither is given a cookie, nothing may be cached, and
    # neither is listed online, even once someone who polls after them is.
    someone_says(server, "something to read")
    someone_says(server, "and something more")
    reader, stranger, control = new_client(server), Client(server), new_client(server)
    for client in (reader, stranger):
        got = client.request("GET", "/api/messages?limit=2")
        head = client.request("HEAD", "/api/messages?limit=2")
        for response in (got, head):
            assert response.status == 200, (response.status, response.body)
            assert "Set-Cookie" not in response.headers, "reading history handed out a cookie"
            assert response.headers["Cache-Control"] == "no-store"
        assert len(got.json["messages"]) == 2 and head.body == b""
        assert head.headers["Content-Length"] == got.headers["Content-Length"]
    assert stranger.sid is None
    wait_until_online(control)
    online = [person["id"] for person in control.poll(since=None)["online"]]
    assert chatroom.User(reader.sid).id not in online, "reading history counted as being online"


BAD_REQUESTS = [
    # (what, method, path, headers, body, expected status)
    ("not JSON", "POST", "/api/messages", {"Content-Type": "application/json"}, b"{nope", 400),
    ("JSON array", "POST", "/api/messages", {"Content-Type": "application/json"}, b"[1]", 400),
    ("JSON string", "POST", "/api/messages", {"Content-Type": "application/json"}, b'"hi"', 400),
    ("text is a number", "POST", "/api/messages", {"Content-Type": "application/json"},
     b'{"text": 5}', 400),
    ("no text field", "POST", "/api/messages", {"Content-Type": "application/json"}, b"{}", 400),
    ("blank text", "POST", "/api/messages", {"Content-Type": "application/json"},
     b'{"text": "  \\n "}', 400),
    ("text too long", "POST", "/api/messages", {"Content-Type": "application/json"},
     json.dumps({"text": "x" * 2001}).encode(), 400),
    ("invalid UTF-8", "POST", "/api/messages", {"Content-Type": "application/json"},
     b'{"text": "\xff\xfe"}', 400),
    ("lone surrogate", "POST", "/api/messages", {"Content-Type": "application/json"},
     b'{"text": "\\ud800"}', 400),
    ("deep JSON", "POST", "/api/messages", {"Content-Type": "application/json"},
     b"[" * 5000 + b"]" * 5000, 400),
    ("form post", "POST", "/api/messages", {"Content-Type": "application/x-www-form-urlencoded"},
     b"text=hi", 415),
    ("text/plain", "POST", "/api/messages", {"Content-Type": "text/plain"}, b'{"text": "hi"}', 415),
    ("body too large", "POST", "/api/messages", {"Content-Type": "application/json"},
     b'{"text": "' + b"x" * 17000 + b'"}', 413),
    ("name is null", "POST", "/api/name", {"Content-Type": "application/json"},
     b'{"name": null}', 400),
    ("wrong method on messages", "PUT", "/api/messages", {}, None, 405),
    ("wrong method on poll", "POST", "/api/poll", {"Content-Type": "application/json"}, b"{}", 405),
    ("DELETE the page", "DELETE", "/", {}, None, 405),
    ("since is text", "GET", "/api/poll?since=abc", {}, None, 400),
    ("since is negative", "GET", "/api/poll?since=-1", {}, None, 400),
    ("since is a fraction", "GET", "/api/poll?since=1.5", {}, None, 400),
    ("timeout is text", "GET", "/api/poll?since=0&timeout=soon", {}, None, 400),
    ("timeout is negative", "GET", "/api/poll?since=0&timeout=-2", {}, None, 400),
    ("timeout is NaN", "GET", "/api/poll?since=0&timeout=nan", {}, None, 400),
    ("text with DEL", "POST", "/api/messages", {"Content-Type": "application/json"},
     b'{"text": "a\\u007fb"}', 400),
    ("text with a C1 control", "POST", "/api/messages", {"Content-Type": "application/json"},
     b'{"text": "a\\u009bb"}', 400),
    ("since is empty", "GET", "/api/poll?since=", {}, None, 400),
    ("since has no value", "GET", "/api/poll?since", {}, None, 400),
    ("timeout is empty", "GET", "/api/poll?since=0&timeout=", {}, None, 400),
    ("since is given twice", "GET", "/api/poll?since=0&since=1&timeout=0", {}, None, 400),
    ("timeout is given twice", "GET", "/api/poll?since=0&timeout=0&timeout=30", {}, None, 400),
    ("since with a plus sign", "GET", "/api/poll?since=%2B1&timeout=0", {}, None, 400),
    ("since in Arabic-Indic digits", "GET", "/api/poll?since=%D9%A1&timeout=0", {}, None, 400),
    ("since with an underscore", "GET", "/api/poll?since=1_0&timeout=0", {}, None, 400),
    ("timeout in exponent form", "GET", "/api/poll?since=0&timeout=1e1", {}, None, 400),
]


@pytest.mark.parametrize("what, method, path, headers, body, status", BAD_REQUESTS,
                         ids=[case[0] for case in BAD_REQUESTS])
def test_bad_input_gets_a_clear_error(server, what, method, path, headers, body, status):
    # Each kind of bad request gets its status and a JSON sentence; the server stays healthy.
    client = new_client(server)
    client.join()
    response = client.request(method, path, body=body, headers=headers)
    assert response.status == status, (what, response.status, response.body)
    assert response.headers["Content-Type"] == "application/json"
    assert len(response.json["error"]) > 10
    if status == 405:  # it says what the path does take: HEAD wherever GET
        allowed = set(response.headers["Allow"].split(", "))
        assert method not in allowed and ("GET" not in allowed or "HEAD" in allowed), allowed
    assert client.post(f"still fine after {what}").status in (201, 429)


def test_other_query_parameters_are_ignored(server):
    # A poll with a parameter we do not know (a cache buster, say), even twice, is answered;
    # so is a timeout with a decimal point.
    client = new_client(server)
    client.join()
    response = client.request("GET", f"/api/poll?since={client.version}&timeout=0.5&_=1&_=2")
    assert response.status == 200, (response.status, response.body)


def test_post_without_content_length_gets_411(server):
    # A POST with no Content-Length (and no body) is refused with 411, in JSON.
    client = new_client(server)
    status, _, body = exchange(server.port, (
        "POST /api/messages HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        f"Cookie: sid={client.sid}\r\n\r\n").encode())
    assert status == 411 and json.loads(body)["error"]


def test_timeout_above_sixty_is_accepted(server):
    # timeout=1000 is not an error (it counts as 60); the poll answers when something happens.
    client, other = new_client(server), new_client(server)
    client.join()
    other.join()
    thread, result = poll_in_background(client, timeout=1000)
    other.post("for the long poll")
    thread.join(20)
    assert not thread.is_alive() and result["answer"]["messages"]


HIDDEN_REQUEST = b"GET /api/poll?timeout=0 HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"


@pytest.mark.parametrize("what, method, path, extra, status", [
    ("no cookie", "POST", "/api/messages", {}, 403),
    ("another site", "POST", "/api/messages", {"Origin": "http://evil.example"}, 403),
    ("wrong method", "POST", "/api/poll", {"Cookie": "sid=" + "a" * 32}, 405),
    ("no such path", "POST", "/nowhere", {"Cookie": "sid=" + "a" * 32}, 404),
    ("a GET with a body", "GET", "/api/poll?timeout=0", {}, 200),
    ("a foreign host", "POST", "/api/messages", {"Host": "evil.example"}, 421),
])
def test_an_unread_body_is_never_taken_for_the_next_request(server, what, method, path, extra,
                                                            status):
    # A request answered without reading its body carries, as that body, a whole second request.
    # The server answers the first only and closes the connection: the hidden one never runs.
    headers = {"Host": "127.0.0.1", "Content-Type": "application/json", **extra}
    if server.plain and status == 421:
        status = 403  # the plain room does not check Host (Part III does): no cookie, then
    answers = answers_to(server.port, http_request(method, path, headers, HIDDEN_REQUEST))
    assert [answer[0] for answer in answers] == [status], (what, answers)
    assert answers[0][1]["connection"] == "close"


IMF_FIXDATE = re.compile(r"(Mon|Tue|Wed|Thu|Fri|Sat|Sun), \d\d (Jan|Feb|Mar|Apr|May|Jun|Jul|Aug|"
                         r"Sep|Oct|Nov|Dec) \d{4} \d\d:\d\d:\d\d GMT")


def test_every_answer_carries_a_date(server, start_full_server):
    # Every answer has a Date in the one format RFC 9110 allows a sender (IMF-fixdate), from
    # the server's clock (within an hour of ours: the same machine): the page, a poll, errors
    # of every kind, those http.server makes itself, and the 503 of a full server, which the
    # accepting thread writes.
    host = "Host: 127.0.0.1\r\n"
    requests = [
        ("page", f"GET / HTTP/1.1\r\n{host}\r\n", 200),
        ("page, HEAD", f"HEAD / HTTP/1.1\r\n{host}\r\n", 200),
        ("poll", f"GET /api/poll?timeout=0 HTTP/1.1\r\n{host}\r\n", 200),
        ("not found", f"GET /nowhere HTTP/1.1\r\n{host}\r\n", 404),
        ("garbage", "BLAH\r\n\r\n", 400),
        ("unknown method", f"BREW / HTTP/1.1\r\n{host}\r\n", 501),
        ("request line too long", "GET /" + "a" * 70_000 + " HTTP/1.1\r\n\r\n", 414),
        ("too many headers", f"GET / HTTP/1.1\r\n{host}" + "X-A: 1\r\n" * 200 + "\r\n", 431),
    ]
    answers = [(what, status, exchange(server.port, request.encode(), method=request[:4].strip()))
               for what, request, status in requests]
    full = start_full_server("--max-clients", "1")  # (a cap of Part III's)
    with socket.create_connection(("127.0.0.1", full.port), timeout=10) as held:
        held.sendall(requests[2][1].encode())
        assert read_answer(held)[0] == 200  # it holds the one place
        answers.append(("server full", 503, exchange(full.port, requests[2][1].encode())))
    for what, status, (got, headers, _) in answers:
        assert got == status, (what, got)
        assert IMF_FIXDATE.fullmatch(headers.get("date", "")), (what, headers.get("date"))
        sent = email.utils.parsedate_to_datetime(headers["date"]).timestamp()
        assert abs(sent - time.time()) < 3600, (what, headers["date"])


def test_asking_for_many_cursors_does_not_grow_memory(start_server):
    # 64 polls, each from a different `since` far behind, get answers as large as any may be
    # (MAX_ANSWER_BYTES, 64 KiB). The server keeps none of them, so its memory grows by far less
    # than 64 MB.
    server = start_server()
    if server_memory(server) is None:
        pytest.skip("needs /proc to read the server's memory")
    fill_room(server, 600, "x" * 2000)
    client = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)

    def poll(since):
        client.request("GET", f"/api/poll?since={since}&timeout=0")
        answer = client.getresponse()
        assert answer.status == 200 and len(answer.read()) > chatroom.MAX_ANSWER_BYTES // 2

    poll(0)
    memory = server_memory(server)
    for since in range(1, 65):
        poll(since)
    grown = server_memory(server) - memory
    client.close()
    assert grown < 32 * 2**20, f"the server grew by {grown // 2**20} MiB for 64 answers"


def test_clients_that_hang_up_cost_a_log_line_and_no_traceback(start_server):
    # Clients hang up at every stage: before sending, mid-line, mid-headers, mid-body, while
    # parked, in the middle of a 1 MB answer, or after stalling past the time-out. None of it
    # logs a traceback or more than one short line, and the room works normally afterwards.
    server = start_server("--request-timeout", "1")
    fill_room(server, 600, "x" * 2000)
    client = new_client(server)
    client.join()
    wait_until_online(client)
    port, cookie = server.port, f"Cookie: sid={client.sid}\r\n"
    lines_before = len(server.output().splitlines())
    parked = []
    for _ in range(5):
        hang_up(port)
        hang_up(port, b"GET /api/po")
        hang_up(port, b"GET /api/poll HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        hang_up(port, f"POST /api/messages HTTP/1.1\r\nHost: 127.0.0.1\r\n{cookie}"
                      "Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"te".encode())
        big = f"GET /api/poll?since=0&timeout=0 HTTP/1.1\r\nHost: 127.0.0.1\r\n{cookie}\r\n"
        hang_up(port, big.encode(), read=100)
        hang_up(port, big.encode(), read=100, reset=True)
        connection = socket.create_connection(("127.0.0.1", port), timeout=10)
        connection.sendall(f"GET /api/poll?since={client.version}&timeout=30 HTTP/1.1\r\n"
                           f"Host: 127.0.0.1\r\n{cookie}\r\n".encode())
        parked.append(connection)
    time.sleep(0.2)
    for connection in parked:
        connection.close()
    if not server.plain:  # the request time-out is one of Part III's defences
        stalled = socket.create_connection(("127.0.0.1", port), timeout=10)
        stalled.sendall(b"GET /api/poll HTTP/1.1\r\n")
        assert stalled.recv(100) == b"", "the stalled client was not dropped"
        stalled.close()
    assert client.post("everyone hung up").status == 201  # wakes the closed parked polls
    assert client.poll(timeout=0)["you"]["id"]
    time.sleep(0.3)  # the woken polls write to their closed connections
    log = server.output()
    assert "Traceback" not in log, log
    new_lines = log.splitlines()[lines_before:]
    assert len(new_lines) <= 7 * 5 + 5, f"{len(new_lines)} log lines for 36 hang-ups:\n{log}"
    assert all(len(line) < 200 and re.match(r"\[\d\d:|127\.0\.0\.1 - - \[", line)
               for line in new_lines), f"lines too long, or mixed up:\n{log}"


def test_a_bug_in_a_handler_gives_500_and_the_server_keeps_serving(start_server):
    # A message stored as bytes (a BLOB) cannot be put in JSON: a poll that would include it gets
    # a 500 in JSON, the traceback is logged, and the server goes on serving everything else.
    server = start_server()
    server.stop()
    with sqlite3.connect(server.data) as db:
        db.execute("INSERT INTO messages VALUES (1, 'u', 'n', x'00ff', 0)")
        db.execute("UPDATE room SET version = 1")
    db.close()
    server.start()
    client = new_client(server)
    response = client.request("GET", "/api/poll")
    assert response.status == 500, (response.status, response.body)
    assert response.headers["Content-Type"] == "application/json" and response.json["error"]
    log = server.output()
    assert "Traceback (most recent call last):\n" in log and "TypeError" in log
    assert client.post("still here").status == 201
    assert [m["text"] for m in client.poll(since=1, timeout=0)["messages"]] == ["still here"]
    assert client.request("GET", "/").status == 200
    assert server.process.poll() is None


# --------------------------------------------------------------------------------------------------
# 8. The server and main()
# --------------------------------------------------------------------------------------------------

def test_help_lists_the_flags(tmp_path):
    # --help explains every flag.
    result = run_chatroom(CHATROOM, "--help", cwd=tmp_path)
    assert result.returncode == 0
    for flag in ("--host", "--port", "--data", "--poll-timeout", "--online-window", "--max-clients",
                 "--max-clients-per-address", "--log-polls"):
        assert flag in result.stdout


def test_request_timeout_flag_is_listed_in_help(tmp_path):
    # --help explains the flag that sets the request time-out.
    result = run_chatroom(CHATROOM, "--help", cwd=tmp_path)
    assert result.returncode == 0 and "--request-timeout" in result.stdout


def test_missing_page_is_a_clear_error(tmp_path):
    # chatroom.py copied alone (without index.html) says what is missing and exits non-zero.
    (tmp_path / "chatroom.py").write_bytes(CHATROOM.read_bytes())
    result = run_chatroom(tmp_path / "chatroom.py", "--port", "0", cwd=tmp_path)
    assert result.returncode != 0 and "index.html" in result.stderr


def test_files_are_found_next_to_the_script_not_in_the_working_directory(tmp_path):
    # Started from another folder, the server still finds index.html and chime.wav.
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    server = Server(elsewhere)
    try:
        assert Client(server).request("GET", "/").status == 200
    finally:
        server.stop()


def test_shutdown_answers_parked_polls_and_exits_zero(start_server):
    # SIGTERM while a poll is parked: the poll gets its answer, and the server exits with 0.
    server = start_server("--log-polls")
    client = new_client(server)
    client.join()
    wait_until_online(client)  # so that no arrival answers the poll before the shutdown does
    version = client.poll(timeout=0)["version"]
    seen = len(server.output())
    thread, result = poll_in_background(client, timeout=60)
    wait_until_parked(server, 1, after=seen)
    started = time.monotonic()
    assert server.stop(signal.SIGTERM) == 0
    thread.join(10)
    assert not thread.is_alive(), "the parked poll was not answered at shutdown"
    assert time.monotonic() - started < 10
    assert result["answer"]["version"] == version and result["answer"]["messages"] == []


def test_sigterm_right_after_start_exits_cleanly(start_server):
    # A server stopped the moment it has printed its address still shuts down cleanly.
    server = start_server()
    assert server.stop(signal.SIGTERM) == 0
    assert "Traceback" not in server.output() and "Chat room stopped." in server.output()


# ==================================================================================================
# PART II. SPEED: the same room, for less (against the full server)
# ==================================================================================================
# The speed layer must change what the room costs and nothing it does: these tests look at what
# its changes could break (who writes a poll's response, the relay that wakes parked threads, the
# page's compressed form). Its figures are bench_chatroom.py's, never a timed assertion here.

def test_parked_pages_are_all_answered_and_woken_to_wait_again(start_full_server):
    # Twenty pages park with a 60 s time-out; one post answers all of them at once. Then each asks
    # again on the same connection, which its server thread reads only if the broadcast woke it:
    # a second post must reach all twenty again, and a third, when they take 0.3 s to ask again.
    server = start_full_server()
    pages, version = open_pages(server, 20)
    for round_, after in enumerate((0, 0, 0.3)):
        threads, answers = pages_polling(pages, version, after=after)
        time.sleep(0.2 + after)  # let the polls park (one that has not yet is answered at once)
        posted = new_client(server).post(f"round {round_}")
        assert posted.status == 201, posted.body
        version = posted.json["message"]["id"]
        waiting = join_all(threads, WAKE_BOUND)
        assert waiting == 0, f"round {round_}: {waiting} of 20 parked pages had no answer " \
                             f"{WAKE_BOUND} s after the post"
        for index, answer in answers.items():
            assert version in [m["id"] for m in answer["messages"]], f"page {index}: {answer}"
            version = max(version, answer["version"])
    for page in pages:
        page.close()


@pytest.mark.parametrize("slow_page", ["is quiet", "has closed its connection"])
def test_a_page_slow_to_ask_again_holds_up_no_one(start_full_server, slow_page):
    # A slow page parks first, then nineteen others; a post answers all twenty. The slow page's
    # thread is the first to be woken, and its page does not ask again for a while (or closed
    # its connection while it waited): the others ask again at once, and their threads must
    # read those polls and park them meanwhile.
    server = start_full_server("--log-polls")
    pages, version = open_pages(server, 20)
    slow = socket.create_connection(("127.0.0.1", server.port), timeout=HTTP_TIMEOUT)
    slow.sendall(http_request("GET", f"/api/poll?since={version}&timeout=60",
                              {"Host": "127.0.0.1", "Cookie": f"sid={pages.pop().client.sid}"}))
    seen = wait_until_parked(server, 1)  # the slow page parks first
    threads, _ = pages_polling(pages, version)
    seen = wait_until_parked(server, 20, after=seen)
    if slow_page == "has closed its connection":
        slow.close()
    version = new_client(server).post("to everyone").json["message"]["id"]
    assert join_all(threads, WAKE_BOUND) == 0
    threads, answers = pages_polling(pages, version)
    wait_until_parked(server, 19, after=seen)  # their threads were woken to read these
    version = new_client(server).post("while the slow page is quiet").json["message"]["id"]
    waiting = join_all(threads, WAKE_BOUND)
    assert waiting == 0, f"{waiting} of 19 pages had no answer while a slow page was quiet"
    assert all(version in [m["id"] for m in answer["messages"]] for answer in answers.values())
    slow.close()
    for page in pages:
        page.close()


def test_the_room_writes_what_the_polls_own_thread_would(start_full_server):
    # A parked poll answered by the room, and the same poll answered by its own thread (asked
    # again once the message is there): the same bytes, headers included.
    server = start_full_server()
    alice, bob = new_client(server), new_client(server)
    since = bob.join()["version"]
    wait_until_online(bob)  # so no arrival changes the room between the two answers
    since = bob.poll(since=None)["version"]
    request = http_request("GET", f"/api/poll?since={since}&timeout=60",
                           {"Host": f"127.0.0.1:{server.port}", "Cookie": f"sid={bob.sid}"})
    for _ in range(3):  # the Date header may tick between the two answers: then try again
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as parked:
            parked.sendall(request)
            time.sleep(0.2)  # parked
            assert alice.post("the same either way").status == 201
            by_room = parked.recv(65536)
        by_own_thread = exchange_raw(server.port, request)
        if by_room == by_own_thread:
            break
        assert by_room.split(b"\r\nDate: ")[0] == by_own_thread.split(b"\r\nDate: ")[0]
    assert by_room == by_own_thread, (by_room, by_own_thread)
    assert b"Set-Cookie" not in by_room and b"Connection: close" not in by_room


def test_head_and_cookieless_polls_are_answered_by_their_own_thread(start_full_server):
    # A parked HEAD poll gets the head of the answer and no body; a parked poll without a cookie
    # gets the message and its cookie. Both connections then serve another request, which would
    # be read wrong after a body that HEAD does not expect.
    server = start_full_server()
    poster = new_client(server)
    (page,), since = open_pages(server, 1)
    host = {"Host": f"127.0.0.1:{server.port}"}
    head = socket.create_connection(("127.0.0.1", server.port), timeout=HTTP_TIMEOUT)
    stranger = socket.create_connection(("127.0.0.1", server.port), timeout=HTTP_TIMEOUT)
    head.sendall(http_request("HEAD", f"/api/poll?since={since}&timeout=60",
                              {**host, "Cookie": f"sid={page.client.sid}"}))
    stranger.sendall(http_request("GET", f"/api/poll?since={since}&timeout=60", host))
    time.sleep(0.2)  # parked
    message_id = poster.post("for HEAD and the stranger").json["message"]["id"]
    with head, stranger, head.makefile("rb") as head_answers, \
            stranger.makefile("rb") as stranger_answers:
        status, headers, body = read_answer(head_answers, "HEAD")
        assert status == 200 and body == b"" and int(headers["content-length"]) > 0
        status, headers, body = read_answer(stranger_answers)
        assert status == 200 and "sid=" in headers["set-cookie"]
        assert message_id in [m["id"] for m in json.loads(body)["messages"]]
        for connection, answers in ((head, head_answers), (stranger, stranger_answers)):
            connection.sendall(http_request("GET", "/api/poll?timeout=0", host))
            assert read_answer(answers)[0] == 200  # the next answer starts where it should
    page.close()


def test_people_arriving_together_are_announced_together(start_full_server):
    # Bob is parked while 24 people arrive over more than a second, closer together than
    # ARRIVALS_PAUSE (0.2 s). His poll wakes once they stop coming, with all 24 in the list,
    # not at some moment in between with part of them.
    server = start_full_server()
    thread, result = park_alone(server)
    newcomers = set()
    for _ in range(24):
        newcomers.add(new_client(server).poll(since=None, timeout=0)["you"]["id"])
        time.sleep(0.05)  # the pace at which people arrive
    thread.join(20)
    assert not thread.is_alive(), "the arrivals were never announced"
    listed = {person["id"] for person in result["answer"]["online"]}
    assert newcomers <= listed, f"announced with {len(newcomers & listed)} of the 24 in"


def test_releasing_the_oldest_poll_wakes_only_its_thread(start_full_server):
    # With 100 other pages parked, one person's poll past MAX_PARKED_PER_USER releases their
    # oldest: the room wakes that one thread, not every parked thread in turn until it reaches
    # it (which took a switch of threads for each of the 100).
    server = start_full_server("--log-polls")
    if server_switches(server) is None:
        pytest.skip("needs Linux's /proc to count the server's thread switches")
    pages, version = open_pages(server, 101)
    script = pages.pop().client
    threads, _ = pages_polling(pages, version)
    seen = wait_until_parked(server, 100)
    parked = []
    for count in range(101, 101 + chatroom.MAX_PARKED_PER_USER):
        parked.append(socket.create_connection(("127.0.0.1", server.port), timeout=10))
        parked[-1].sendall(http_request("GET", f"/api/poll?since={version}&timeout=60",
                                        {"Host": "127.0.0.1", "Cookie": f"sid={script.sid}"}))
        seen = wait_until_parked(server, count, after=seen)  # so the first one is the oldest
    try:
        time.sleep(0.3)  # let the last thread settle
        before = server_switches(server)
        parked.append(socket.create_connection(("127.0.0.1", server.port), timeout=10))
        parked[-1].sendall(http_request("GET", f"/api/poll?since={version}&timeout=60",
                                        {"Host": "127.0.0.1", "Cookie": f"sid={script.sid}"}))
        assert read_answer(parked[0])[0] == 200  # the oldest, released
        time.sleep(0.3)  # any thread still being woken in turn
        switches = server_switches(server) - before
        assert switches < 40, f"{switches} thread switches to release one poll"
        assert all_open(parked[1:]) and join_all(threads, 0) == 100  # no one else was answered
    finally:
        for connection in parked:
            connection.close()
        new_client(server).post("the end")  # answers the 100 pages, so that their threads end
        join_all(threads, WAKE_BOUND)
        for page in pages:
            page.close()


@pytest.mark.parametrize("accept, gzipped", [
    ("gzip, deflate, br, zstd", True), ("GZIP", True), ("br;q=1.0, gzip;q=0.5", True), ("*", True),
    ("x-gzip", True), (None, False), ("identity", False), ("gzip;q=0", False),
    ("deflate, *;q=0", False), ("*, gzip;q=0.000", False),
])
def test_the_page_is_gzipped_for_clients_that_accept_it(full_server, accept, gzipped):
    # A browser that accepts gzip gets the page compressed, one that does not gets it as it is,
    # and both answers say that they depend on Accept-Encoding, so a cache keeps them apart.
    plain = Client(full_server).request("GET", "/").body
    status, headers, body = get_page(full_server.port, **({"Accept-Encoding": accept} if accept else {}))
    assert status == 200
    assert headers.get("vary") == "Accept-Encoding", headers
    if gzipped:
        assert headers.get("content-encoding") == "gzip", (accept, headers)
        assert gzip.decompress(body) == plain and len(body) < len(plain) / 2
    else:
        assert "content-encoding" not in headers and body == plain, (accept, headers)


def test_a_page_the_browser_has_is_confirmed_with_304(full_server):
    # A browser that has the page asks again with its ETag in If-None-Match: a 304 with no body,
    # the same ETag, Cache-Control and Vary. Each encoding has its own ETag, and a tag for
    # something else gets the whole page.
    _, plain, page = get_page(full_server.port)
    _, zipped, _ = get_page(full_server.port, **{"Accept-Encoding": "gzip"})
    tag, gzip_tag = plain["etag"], zipped["etag"]
    assert re.fullmatch(r'"[!#-~]+"', tag) and re.fullmatch(r'"[!#-~]+"', gzip_tag), (tag, gzip_tag)
    assert tag != gzip_tag, "the compressed page has the same ETag as the plain one"
    gzip_ok = {"Accept-Encoding": "gzip"}
    for headers, sent, expected in [({}, tag, tag), (gzip_ok, gzip_tag, gzip_tag), ({}, "*", tag),
                                    ({}, "W/" + tag, tag), ({}, f'"old", {tag}', tag)]:
        # A second request follows on the same connection: had the 304 a body, it would be read
        # as the second answer's status line.
        answers = answers_to(full_server.port, http_request(
            "GET", "/", {"Host": "127.0.0.1", **headers, "If-None-Match": sent})
            + http_request("GET", "/nowhere", {"Host": "127.0.0.1", "Connection": "close"}))
        assert [status for status, _, _ in answers] == [304, 404], (sent, answers)
        answer = answers[0][1]
        assert answer.get("etag") == expected, (sent, answer)
        assert answer.get("cache-control") == "no-cache" and answer.get("vary") == "Accept-Encoding"
        assert "content-length" not in answer and "content-encoding" not in answer, answer
    for headers, sent in [({}, '"old"'), ({}, gzip_tag), (gzip_ok, tag)]:
        status, answer, body = get_page(full_server.port, **headers, **{"If-None-Match": sent})
        assert status == 200 and answer["etag"] != sent and body, (sent, status)


def test_a_changed_page_gets_a_new_etag(tmp_path):
    # The same page keeps its ETag across a restart; a changed page (an upgrade) gets new ones,
    # so a browser's copy of the old page is not confirmed with a 304.
    upgraded = tmp_path / "upgraded"
    upgraded.mkdir()
    for name in ("chatroom.py", "chime.wav"):
        shutil.copy(ROOT / name, upgraded)
    (upgraded / "index.html").write_bytes(
        (ROOT / "index.html").read_bytes().replace(b"<h1>Chat room</h1>", b"<h1>Chat room!</h1>"))
    old, new = Server(tmp_path), Server(upgraded, script=upgraded / "chatroom.py")
    try:
        tags = {}
        for which, running in (("old", old), ("new", new)):
            for coding in ("identity", "gzip"):
                answer = get_page(running.port, **{"Accept-Encoding": coding})[1]
                tags[which, coding] = answer["etag"]
        old.restart()
        assert get_page(old.port)[1]["etag"] == tags["old", "identity"], "the ETag changed alone"
        assert tags["new", "identity"] != tags["old", "identity"]
        assert tags["new", "gzip"] != tags["old", "gzip"]
        status, _, body = get_page(new.port, **{"If-None-Match": tags["old", "identity"]})
        assert status == 200 and b"Chat room!" in body
    finally:
        old.stop()
        new.stop()


def test_responses_with_many_messages_are_gzipped_for_clients_that_accept_it(
        start_full_server):
    # 150 stored messages. A history page, a snapshot and a batch, asked for with
    # Accept-Encoding: gzip, come compressed (Content-Encoding: gzip, Vary: Accept-Encoding) and
    # hold what they hold uncompressed; asked for without it, or with gzip;q=0, they come as
    # they are. A small answer is never compressed, nor is the broadcast's answer to a parked
    # poll (written by the room, however long its message).
    server = start_full_server()
    store_messages(server, [(i, f"message number {i}, " * 5, i) for i in range(1, 151)])
    for target in ("/api/messages?limit=100", "/api/poll?timeout=0", "/api/poll?since=0&timeout=0"):
        ask = {"Host": "127.0.0.1"}
        _, plain_headers, plain = exchange(server.port, http_request("GET", target, ask))
        _, headers, zipped = exchange(server.port, http_request(
            "GET", target, {**ask, "Accept-Encoding": "gzip, deflate, br"}))
        _, refused_headers, _ = exchange(server.port, http_request(
            "GET", target, {**ask, "Accept-Encoding": "gzip;q=0, identity"}))
        assert headers.get("content-encoding") == "gzip", (target, headers)
        assert "Accept-Encoding" in headers["vary"] and "Accept-Encoding" in plain_headers["vary"]
        assert "content-encoding" not in plain_headers and "content-encoding" not in refused_headers
        assert len(zipped) < len(plain) / 2, (target, len(zipped), len(plain))
        assert json.loads(gzip.decompress(zipped))["messages"] == json.loads(plain)["messages"]
    small = http_request("GET", "/api/poll?since=150&timeout=0",
                         {"Host": "127.0.0.1", "Accept-Encoding": "gzip"})
    assert "content-encoding" not in exchange(server.port, small)[1]
    poster, reader = new_client(server), new_client(server)
    wait_until_listed(reader, {poster.join()["you"]["id"], reader.join()["you"]["id"]})
    version = reader.poll(since=None)["version"]
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as connection:
        connection.sendall(http_request("GET", f"/api/poll?since={version}&timeout=30", {
            "Host": "127.0.0.1", "Cookie": f"sid={reader.sid}", "Accept-Encoding": "gzip"}))
        time.sleep(0.2)  # parked
        long_message = "a long message, " * 120
        assert poster.post(long_message).status == 201
        status, headers, body = read_answer(connection)
    assert status == 200 and "content-encoding" not in headers, headers
    assert long_message in [m["text"] for m in json.loads(body)["messages"]]


# ==================================================================================================
# PART III. DEFENCES FOR THE OPEN NETWORK
# ==================================================================================================


# --------------------------------------------------------------------------------------------------
# Who is online, when clients vanish or invent people; a page that never reads
# --------------------------------------------------------------------------------------------------

def test_a_page_that_never_reads_delays_no_one(start_full_server):
    # One page asks for 24 polls ahead, each for the next version, with a tiny receive buffer,
    # and never reads: the room's writes to it soon find its socket full (after a dozen). Then 24
    # large messages are posted, one after another on one connection (the thread that answers a
    # post writes the broadcast before it reads the next post): all are posted and reach five
    # other pages while it is still connected, and it is dropped once a write to it has waited
    # the request time-out.
    server = start_full_server("--request-timeout", "5")
    people = [new_client(server) for _ in range(12)]
    pages, since = open_pages(server, 6)
    hog = pages.pop().client
    stalled = socket.socket()
    stalled.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 2048)
    stalled.connect(("127.0.0.1", server.port))
    stalled.sendall(b"".join(
        http_request("GET", f"/api/poll?since={since + n}&timeout=60",
                     {"Host": "127.0.0.1", "Cookie": f"sid={hog.sid}"}) for n in range(24)))
    posted = []

    def keep_listening(page):
        version = since
        while len(posted) < 24 or not set(posted) <= set(page.seen):
            version = page.poll(version, timeout=5)[2]["version"]

    listeners = [threading.Thread(target=keep_listening, args=(page,), daemon=True)
                 for page in pages]
    for thread in listeners:
        thread.start()
    time.sleep(0.2)  # parked
    posting = http.client.HTTPConnection("127.0.0.1", server.port, timeout=HTTP_TIMEOUT)
    for person in people * 2:
        posting.request("POST", "/api/messages", json.dumps({"text": "x" * 1900}),
                        {"Cookie": f"sid={person.sid}", "Content-Type": "application/json"})
        response = posting.getresponse()
        assert response.status == 201, response.read()
        posted.append(json.loads(response.read())["message"]["id"])
    assert join_all(listeners, 20) == 0, "the other pages did not get every message"
    assert "connection dropped" not in server.output(), \
        "the posts and the other pages waited until the stalled page was dropped"
    wait_until(lambda: "connection dropped" in server.output(), timeout=30,
               message="the stalled page to be dropped")
    stalled.close()
    posting.close()
    for page in pages:
        page.close()


def test_closed_connection_of_a_parked_poll_stops_counting(start_full_server):
    # Eve parks a poll and then closes the connection (closes her tab): she goes offline within
    # the window, although her poll's time-out is far away.
    server = start_full_server("--online-window", "1", "--poll-timeout", "60")
    eve, watcher = new_client(server), new_client(server)
    eve_id = eve.join()["you"]["id"]
    watcher_id = watcher.join()["you"]["id"]

    def online_ids():
        return {person["id"] for person in watcher.poll(since=None)["online"]}

    wait_until(lambda: {eve_id, watcher_id} <= online_ids(), message="both to be online")
    # The room is quiet now; park a poll for Eve at its current version on a raw connection.
    connection = socket.create_connection(("127.0.0.1", server.port))
    connection.sendall(f"GET /api/poll?since={watcher.version}&timeout=60 HTTP/1.1\r\n"
                       f"Host: 127.0.0.1\r\nCookie: sid={eve.sid}\r\n\r\n".encode())
    time.sleep(1.5)  # longer than the window: only the parked poll keeps her online now
    assert eve_id in online_ids(), "a parked poll should keep its user online"
    connection.close()
    wait_until(lambda: eve_id not in online_ids(), timeout=5, message="Eve to go offline")


def test_too_many_parked_polls_release_the_oldest(start_full_server):
    # A script parks MAX_PARKED_PER_USER + 1 polls with one cookie: the oldest is answered at once
    # (with no news), the others stay parked.
    server = start_full_server()
    client = new_client(server)
    client.join()
    wait_until_online(client)
    version = client.poll(timeout=0)["version"]

    def park():
        connection = socket.create_connection(("127.0.0.1", server.port), timeout=10)
        connection.sendall(http_request("GET", f"/api/poll?since={version}&timeout=30",
                                        {"Host": "127.0.0.1", "Cookie": f"sid={client.sid}"}))
        time.sleep(0.1)  # so that the order in which they park is the order we opened them
        return connection

    parked = [park() for _ in range(chatroom.MAX_PARKED_PER_USER)]
    try:
        assert all_open(parked, 0.3), "a poll was answered early"
        parked.append(park())
        status, _, body = read_answer(parked[0])
        assert status == 200
        answer = json.loads(body)
        assert answer["version"] == version and answer["messages"] == []
        assert all_open(parked[1:], 0.3), "a poll other than the oldest was answered"
    finally:
        for connection in parked:
            connection.close()


def test_many_identities_fill_the_online_list_only_up_to_its_cap(start_full_server):
    # A script polls once with each of MAX_ONLINE + 100 cookies of its own. Each poll is
    # answered, but the online list stops at MAX_ONLINE people.
    server = start_full_server()
    cap = chatroom.MAX_ONLINE
    statuses = []

    def run(count):
        for _ in range(count):
            statuses.append(new_client(server).request("GET", "/api/poll?timeout=0").status)

    threads = [threading.Thread(target=run, args=((cap + 100) // 10,)) for _ in range(10)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert statuses == [200] * (cap + 100)
    time.sleep(chatroom.PRESENCE_INTERVAL + 0.3)  # the online list is refreshed once a second
    online = Client(server).request("GET", "/api/poll?timeout=0").json["online"]
    assert len(online) == cap, f"{len(online)} people online, the cap is {cap}"


# --------------------------------------------------------------------------------------------------
# Identities that are issued; limits on one address and on renames; cookies tossed in
# --------------------------------------------------------------------------------------------------

def cookie_given(response):
    """The sid a response sets as the cookie, or None."""
    found = re.match(r"sid=([^;]+)", response.headers.get("Set-Cookie") or "")
    return found and found.group(1)


def poll_with_cookie_lines(port, *lines):
    """GET /api/poll?timeout=0 with exactly these Cookie lines: (status, headers, answer)."""
    head = "GET /api/poll?timeout=0 HTTP/1.1\r\nHost: 127.0.0.1\r\n"
    head += "".join(f"Cookie: {line}\r\n" for line in lines)
    status, headers, body = exchange(port, (head + "\r\n").encode("latin-1"))
    return status, headers, json.loads(body)


def test_a_made_up_cookie_is_no_identity(full_server):
    # A well-formed cookie the server never issued, and an issued one with its signature changed,
    # count as no cookie: a poll is answered with a new cookie and is not listed online; a post
    # is refused (403) with a new cookie, and posting with that new cookie works.
    server = full_server
    watcher = new_client(server)
    watcher.join()
    issued = issued_sid(server)
    forged = issued[:-1] + ("A" if issued[-1] != "A" else "B")
    for what, sid in [("made up", secrets.token_urlsafe(24)), ("forged", forged)]:
        polled = Client(server, sid=sid).request("GET", "/api/poll?timeout=0")
        assert polled.status == 200 and cookie_given(polled) not in (None, sid), what
        assert polled.json["you"]["id"] != chatroom.User(sid).id, \
            f"the {what} cookie was taken as an identity"
        poster = Client(server, sid=sid)
        refused = poster.post(f"as nobody ({what})")
        assert refused.status == 403 and cookie_given(refused) not in (None, sid), what
        assert poster.post(f"with the cookie given ({what})").status == 201
    time.sleep(chatroom.PRESENCE_INTERVAL + 0.3)  # had the made-up one come online, it shows now
    assert chatroom.User(forged).id not in {p["id"] for p in watcher.poll(since=None)["online"]}


def test_made_up_cookies_leave_no_trace(start_full_server):
    # 2000 requests, each with a new made-up cookie (polls, posts, renames): each is answered (200
    # or 403), no message or name is stored, nobody comes online, the version does not move, and
    # the server's memory stays flat (each made-up poster used to cost the rate limiter ~1 KB).
    server = start_full_server()

    def room():  # (asked without a cookie, so as not to come online)
        return Client(server).request("GET", "/api/poll?timeout=0").json

    def flood(count):
        statuses = []

        def run(share):
            for n in range(share):
                client = Client(server, sid=secrets.token_urlsafe(24))
                if n % 3 == 0:
                    response = client.request("GET", "/api/poll?timeout=0")
                elif n % 3 == 1:
                    response = client.post(f"made up {n}")
                else:
                    response = client.rename(f"made up {n}")
                statuses.append(response.status)

        threads = [threading.Thread(target=run, args=(count // 8,)) for _ in range(8)]
        for thread in threads:
            thread.start()
        assert join_all(threads, 60) == 0, "the flood did not finish"
        return statuses

    flood(200)  # warm up: threads, caches and buffers the server allocates once
    before, memory = room(), server_memory(server)
    statuses = flood(2000)
    assert len(statuses) == 2000 and set(statuses) <= {200, 403}, set(statuses)
    time.sleep(chatroom.PRESENCE_INTERVAL + 0.2)  # had anyone come online, it would show now
    after = room()
    assert after["version"] == before["version"] and after["online"] == before["online"] == []
    with contextlib.closing(sqlite3.connect(server.data)) as db:
        assert db.execute("SELECT COUNT(*) FROM users").fetchone() == (0,)
        assert db.execute("SELECT COUNT(*) FROM messages").fetchone() == (0,)
    if memory is not None:
        grown = server_memory(server) - memory
        assert grown < 4 * 2**20, f"the server grew by {grown // 2**20} MiB"


def test_an_address_is_given_new_cookies_only_so_fast(start_full_server):
    # With 2 people expected per address, an address is given 4 cookies at once: a 5th newcomer
    # is still served the page and its polls, as a guest, without a cookie; a post without a
    # cookie is then refused without one. The cookies given are identities.
    server = start_full_server("--people-per-address", "2")
    burst = 2 * chatroom.NEW_SESSIONS_PER_PERSON
    given = []
    for _ in range(burst + 3):
        assert Client(server).request("GET", "/").status == 200
        polled = Client(server).request("GET", "/api/poll?timeout=0")
        assert polled.status == 200 and polled.json["you"]["id"], polled.body
        given.append(cookie_given(polled))
    assert all(given[:burst]) and given[burst:] == [None] * 3, given
    refused = Client(server).post("no cookie")
    assert refused.status == 403 and cookie_given(refused) is None
    person = Client(server, sid=given[0])
    person.join()
    assert person.sid == given[0] and person.post("I was given a cookie").status == 201


def test_the_signing_key_outlives_a_restart_and_older_files_get_one(start_full_server):
    # A cookie the server issued is still the same person after a restart. A data file made
    # before cookies were signed (no session_key table) opens; the cookies of its people are no
    # longer identities (they are given new ones), and newcomers are served as usual.
    server = start_full_server()
    client = Client(server)
    client.join()
    client.rename("Grace")
    who = client.poll(timeout=0)["you"]
    server.restart()
    assert client.poll(since=None)["you"] == who
    assert client.request("GET", "/api/poll?timeout=0").headers.get("Set-Cookie") is None
    server.stop()
    with contextlib.closing(sqlite3.connect(server.data)) as db:
        db.execute("DROP TABLE session_key")
        db.commit()
    server.start()
    old = client.sid
    assert client.poll(since=None)["you"]["id"] != who["id"] and client.sid != old
    newcomer = Client(server)
    newcomer.join()
    assert newcomer.post("hello").status == 201


def test_one_address_posts_as_fast_as_its_people_and_no_faster(start_full_server):
    # With each person allowed 2 messages a minute, 30 people behind one address (the default
    # --people-per-address) each post 2: none is refused. A 31st person at that address is
    # refused (429, Retry-After, a JSON error that says why): the address has had 30 people's.
    server = start_full_server("--rate-limits", "2/60")
    people = [new_client(server) for _ in range(31)]
    for person in people[:30]:
        for n in range(2):
            response = person.post(f"one of thirty, message {n}")
            assert response.status == 201, response.body
    refused = people[30].post("one too many")
    assert refused.status == 429 and "network address" in refused.json["error"], refused.body
    assert int(refused.headers["Retry-After"]) >= 1 and refused.json["retry_after"] > 0
    assert refused.json["limit"] == {"count": 60, "seconds": 60}


def test_a_rate_limit_remembers_a_bounded_number(monkeypatch):
    # A rate limiter that sees 5,000 posters remembers at most MAX_TRACKED of them (here 100),
    # and still limits the one posting now.
    monkeypatch.setattr(chatroom, "MAX_TRACKED", 100)
    limiter = chatroom.FullRateLimiter([(2, 60)])
    for n in range(5000):
        assert limiter.limit_hit(f"poster {n}") is None
        assert len(limiter._times) <= 100
    assert limiter.limit_hit("poster 4999") is None and limiter.limit_hit("poster 4999")


def test_renames_are_limited(start_full_server):
    # Three renames in a row pass; the fourth gets 429 with Retry-After and a JSON error that
    # says why, and changes nothing. Someone else can still rename.
    server = start_full_server()
    client, other = new_client(server), new_client(server)
    client.join()
    for name in ("Ann", "Anne", "Annie"):
        assert client.rename(name).status == 200
    refused = client.rename("Anna")
    assert refused.status == 429 and "name" in refused.json["error"]
    assert 1 <= int(refused.headers["Retry-After"]) <= 30
    assert refused.json["limit"] == {"count": 3, "seconds": 30}
    assert client.poll(timeout=0)["you"]["name"] == "Annie"
    assert other.rename("Bob").status == 200


def test_an_unchanged_name_changes_nothing(start_full_server):
    # Renaming to the name one has (trimmed) answers 200 and changes nothing: no new version, a
    # parked page is not woken, and it does not count against the rename limit.
    server = start_full_server()
    client, watcher = new_client(server), new_client(server)
    client.join()
    assert client.rename("Ada").status == 200
    wait_until(lambda: "Ada" in {p["name"] for p in watcher.poll(since=None)["online"]},
               message="Ada in the online list")
    version = watcher.poll(since=None)["version"]
    thread, result = poll_in_background(watcher, since=version, timeout=2)
    for name in ("Ada", " Ada ", "Ada"):
        response = client.rename(name)
        assert response.status == 200 and response.json["you"]["name"] == "Ada"
    thread.join(10)
    assert result["answer"]["version"] == version and "online" not in result["answer"], \
        "an unchanged name woke a parked page"
    assert client.rename("Bea").status == 200 and client.rename("Cy").status == 200, \
        "unchanged names were counted against the rename limit"


def test_a_rename_storm_reaches_parked_pages_at_most_once_a_second(start_full_server):
    # 20 people rename 3 times each as fast as they can (60 renames) while a page keeps polling:
    # the page is sent the online list at most about once a second (PRESENCE_INTERVAL), not once
    # per rename, and then has everyone's last name.
    server = start_full_server()
    people = [new_client(server) for _ in range(20)]
    watcher = new_client(server)
    wait_until_listed(watcher, {person.join()["you"]["id"] for person in people})
    version = watcher.poll(since=None)["version"]
    updates, stop = [], threading.Event()

    def listen():
        since = version
        while not stop.is_set():
            answer = watcher.poll(since=since, timeout=2)
            since = answer["version"]
            if "online" in answer:
                updates.append(time.monotonic())

    def rename(share):
        for round_ in range(3):
            for person in share:
                assert person.rename(f"storm {round_} {person.sid[:6]}").status == 200

    listener = threading.Thread(target=listen, daemon=True)
    listener.start()
    started = time.monotonic()
    writers = [threading.Thread(target=rename, args=(people[i::2],)) for i in range(2)]
    for thread in writers:
        thread.start()
    assert join_all(writers, 30) == 0, "the renames did not finish"
    last_names = {f"storm 2 {person.sid[:6]}" for person in people}
    wait_until(lambda: last_names <= {p["name"] for p in watcher.poll(since=None)["online"]},
               timeout=WAKE_BOUND, message="the last names in the online list")
    stop.set()
    listener.join(5)
    seconds = time.monotonic() - started
    assert len(updates) <= seconds / chatroom.PRESENCE_INTERVAL + 1, \
        f"{len(updates)} online lists in {seconds:.1f} s of renames"


def test_a_tossed_in_cookie_locks_no_one_out(full_server):
    # Another site tosses in a cookie named sid, sent before ours, in the same Cookie line or in
    # a line of its own: the first sid the server issued counts, and no new cookie is set.
    person = new_client(full_server)
    me = person.join()["you"]["id"]
    tossed = secrets.token_urlsafe(24)
    for lines in [(f"sid={tossed}; sid={person.sid}",),
                  (f"sid={tossed}", f"sid={person.sid}"),
                  ("theme=dark", f"sid={tossed}", f"lang=en; sid={person.sid}")]:
        status, headers, answer = poll_with_cookie_lines(full_server.port, *lines)
        assert status == 200 and answer["you"]["id"] == me, lines
        assert "set-cookie" not in headers, lines


# --------------------------------------------------------------------------------------------------
# 10. The defended handler: strict request heads, other web sites, slow and stalled clients
# --------------------------------------------------------------------------------------------------

OVERSIZED = [
    # (what, the request without Host, Cookie and Content-Type (added by the test), status)
    ("request line over 64 KiB", "GET /api/poll?x=" + "a" * 70_000 + " HTTP/1.1\r\n\r\n", 414),
    ("request line over 8 KiB",
     "GET /api/poll?x=" + "a" * chatroom.MAX_REQUEST_LINE + " HTTP/1.1\r\n\r\n", 414),
    ("headers over 32 KiB in all",
     "GET / HTTP/1.1\r\n" + "".join(f"X-{i}: {'a' * 4000}\r\n" for i in range(9)) + "\r\n", 431),
    ("header line over 64 KiB", "GET / HTTP/1.1\r\nX-Big: " + "a" * 70_000 + "\r\n\r\n", 431),
    ("over 100 headers",
     "GET / HTTP/1.1\r\n" + "".join(f"X-{i}: 1\r\n" for i in range(101)) + "\r\n", 431),
    ("body over 16 KiB", "POST /api/messages HTTP/1.1\r\nContent-Length: 17000\r\n\r\n", 413),
    ("Content-Length of 30 digits",
     "POST /api/messages HTTP/1.1\r\nContent-Length: " + "9" * 30 + "\r\n\r\n", 413),
    ("Content-Length of 5000 digits",
     "POST /api/messages HTTP/1.1\r\nContent-Length: " + "9" * 5000 + "\r\n\r\n", 413),
    ("Content-Length in superscript digits",
     "POST /api/messages HTTP/1.1\r\nContent-Length: \u00b2\r\n\r\n", 400),
    ("negative Content-Length", "POST /api/messages HTTP/1.1\r\nContent-Length: -1\r\n\r\n", 400),
]


@pytest.mark.parametrize("what, head, status", OVERSIZED, ids=[case[0] for case in OVERSIZED])
def test_oversized_requests_get_a_clear_json_error(full_server, what, head, status):
    # Each size limit answers with its 4xx in JSON and closes the connection, unread parts and all.
    client = new_client(full_server)
    line, _, rest = head.partition("\r\n")
    data = (f"{line}\r\nHost: 127.0.0.1\r\nCookie: sid={client.sid}\r\n"
            f"Content-Type: application/json\r\n{rest}").encode("latin-1")
    got, headers, body = exchange(full_server.port, data)
    assert got == status, (what, got, body)
    assert headers["content-type"] == "application/json" and len(json.loads(body)["error"]) > 5
    assert headers["connection"] == "close"
    assert client.post(f"fine after {what}").status == 201


def test_at_most_100_header_lines_and_32_kib_of_them(full_server):
    # The limits are inclusive: MAX_HEADERS header lines are served, one more is a 431; headers
    # of MAX_HEADER_BYTES in all are served, one byte more is a 431.
    def request(lines):
        return ("GET /api/poll?timeout=0 HTTP/1.1\r\n" + "".join(lines) + "\r\n").encode()

    host = "Host: 127.0.0.1\r\n"
    count = chatroom.MAX_HEADERS
    assert exchange(full_server.port, request([host] + ["X-A: 1\r\n"] * (count - 1)))[0] == 200
    assert exchange(full_server.port, request([host] + ["X-A: 1\r\n"] * count))[0] == 431
    filler = chatroom.MAX_HEADER_BYTES - len(host) - len("X-Big: \r\n")
    assert exchange(full_server.port, request([host, f"X-Big: {'b' * filler}\r\n"]))[0] == 200
    assert exchange(full_server.port, request([host, f"X-Big: {'b' * (filler + 1)}\r\n"]))[0] == 431


def smuggling_post(client, framing, body):
    """A post of `body` whose length is given by the header lines `framing`."""
    return (f"POST /api/messages HTTP/1.1\r\nHost: 127.0.0.1\r\nCookie: sid={client.sid}\r\n"
            f"Content-Type: application/json\r\n{framing}\r\n").encode("latin-1") + body


SMUGGLING = [
    # (what, header lines that give the length; {first} and {whole} are filled in)
    ("two different Content-Length", "Content-Length: {first}\r\nContent-Length: {whole}\r\n"),
    ("Content-Length and content-length", "Content-Length: {first}\r\ncontent-length: {whole}\r\n"),
    ("the same Content-Length twice", "Content-Length: {whole}\r\nContent-Length: {whole}\r\n"),
    ("Transfer-Encoding and Content-Length",
     "Transfer-Encoding: chunked\r\nContent-Length: {whole}\r\n"),
    ("a space in the name", "Content Length: {whole}\r\n"),
    ("a NUL in the name", "Content-Length\x00: {whole}\r\n"),
    ("a space before the colon", "Content-Length : {whole}\r\n"),
    ("a folded line", "Content-Length:\r\n {whole}\r\n"),
    ("a bare CR in a value", "X-Note: a\rContent-Length: {whole}\r\n"),
]


@pytest.mark.parametrize("what, framing", SMUGGLING, ids=[case[0] for case in SMUGGLING])
def test_a_request_with_unclear_framing_is_refused(full_server, what, framing):
    # A post whose length two programs could read differently, with a second request (a post as
    # someone else) in its body: the server answers 400 and closes the connection, so that
    # neither the post nor the request hidden in it is ever run.
    client, hidden = new_client(full_server), new_client(full_server)
    client.join()
    hidden.join()
    marker = secrets.token_hex(4)
    inner = json.dumps({"text": f"hidden {marker}"}).encode()
    body = json.dumps({"text": f"outer {marker}"}).encode() + smuggling_post(
        hidden, f"Content-Length: {len(inner)}\r\n", inner)
    first = len(json.dumps({"text": f"outer {marker}"}))
    data = smuggling_post(client, framing.format(first=first, whole=len(body)), body)
    answers = answers_to(full_server.port, data)
    assert [status for status, _, _ in answers] == [400], (what, answers)
    status, headers, answer = answers[0]
    assert headers["connection"] == "close" and headers["content-type"] == "application/json"
    assert json.loads(answer)["error"]
    stored = [m["text"] for m in client.poll(since=None)["messages"]]
    assert not [text for text in stored if marker in text], f"{what}: stored {stored[-3:]}"


BAD_HEADS = [
    # (what, the request's head without its final empty line)
    ("a NUL in a value", "GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nX-A: a\x00b\r\n"),
    ("a control character in a value", "GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nX-A: a\x01b\r\n"),
    ("DEL in a value", "GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nX-A: a\x7fb\r\n"),
    ("a byte above ASCII in a name", "GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nX-\xe9: 1\r\n"),
    ("a slash in a name", "GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nX/A: 1\r\n"),
    ("an empty name", "GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n: 1\r\n"),
    ("a method that is not a token", "G(T / HTTP/1.1\r\nHost: 127.0.0.1\r\n"),
    ("a control character in the path", "GET /api/poll?x=\x01 HTTP/1.1\r\nHost: 127.0.0.1\r\n"),
    ("a DEL in the path", "GET /\x7f HTTP/1.1\r\nHost: 127.0.0.1\r\n"),
    ("a byte above ASCII in the path", "GET /\xe9 HTTP/1.1\r\nHost: 127.0.0.1\r\n"),
    ("tabs between the words", "GET\t/\tHTTP/1.1\r\nHost: 127.0.0.1\r\n"),
    ("two spaces between the words", "GET  / HTTP/1.1\r\nHost: 127.0.0.1\r\n"),
    ("a Transfer-Encoding that does not end in chunked",
     "GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nTransfer-Encoding: chunked, gzip\r\n"),
]


@pytest.mark.parametrize("what, head", BAD_HEADS, ids=[case[0] for case in BAD_HEADS])
def test_a_malformed_request_head_is_refused(full_server, what, head):
    # A header line or request line that breaks HTTP's grammar gets 400 in JSON and a close.
    status, headers, body = exchange(full_server.port, (head + "\r\n").encode("latin-1"))
    assert status == 400, (what, status, body)
    assert headers["connection"] == "close" and json.loads(body)["error"]


def test_an_http_1_0_client_is_never_sent_100_continue(full_server):
    # An HTTP/1.0 client's Expect is ignored, and it is never sent a 1xx answer (RFC 9110
    # sections 10.1.1 and 15.2): its post is answered 201 straight away.
    client = new_client(full_server)
    client.join()
    body = b'{"text": "from an old client"}'
    head = (f"POST /api/messages HTTP/1.0\r\nHost: 127.0.0.1\r\nCookie: sid={client.sid}\r\n"
            f"Content-Type: application/json\r\nExpect: 100-continue\r\n"
            f"Content-Length: {len(body)}\r\n\r\n")
    answer = exchange_raw(full_server.port, head.encode("latin-1") + body)
    assert answer.startswith(b"HTTP/1.1 201 "), answer[:200]


def test_tabs_and_latin_1_bytes_in_header_values_are_fine(full_server):
    # What a value may hold besides visible ASCII (a tab, a byte above 0x7f) is served normally.
    status, _, _ = exchange(full_server.port, b"GET /api/poll?timeout=0 HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                                         b"X-A: a\tb\xe9\r\nX-B:\t  padded  \t\r\n\r\n")
    assert status == 200


def test_a_request_cut_off_in_its_headers_is_not_served(full_server):
    # A client that closes its side in the middle of the headers gets a 400, not an answer to
    # the part it sent.
    answers = answers_to(full_server.port, b"GET /api/poll?timeout=0 HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                                      b"X-Half: the rest never comes")
    assert [status for status, _, _ in answers] == [400], answers


BAD_HOSTS = [
    # (what, the Host header lines)
    ("no Host", ""),
    ("two Host lines, ours first", "Host: 127.0.0.1\r\nHost: evil.example\r\n"),
    ("two Host lines, the same", "Host: 127.0.0.1\r\nHost: 127.0.0.1\r\n"),
    ("a port that is not a number", "Host: localhost:notaport\r\n"),
    ("a user name before the host", "Host: 127.0.0.1@evil.example\r\n"),
    ("an empty Host", "Host: \r\n"),
    ("a space in the host", "Host: 127.0.0.1 evil.example\r\n"),
    ("an IPv6 address without its bracket", "Host: [::1\r\n"),
    ("brackets around no address", "Host: [zz]\r\n"),
]


@pytest.mark.parametrize("what, host_lines", BAD_HOSTS, ids=[case[0] for case in BAD_HOSTS])
def test_an_http_1_1_request_needs_one_valid_host(full_server, what, host_lines):
    # An HTTP/1.1 request without Host, with two, or with one that is not host[:port] gets 400
    # (RFC 9112 section 3.2) for a page, a poll and a post alike, and the post is not stored.
    client = new_client(full_server)
    client.join()
    text = f"posted with {what}"
    for method, path, body in (("GET", "/", b""), ("GET", "/api/poll?timeout=0", b""),
                               ("POST", "/api/messages", json.dumps({"text": text}).encode())):
        head = (f"{method} {path} HTTP/1.1\r\n{host_lines}Cookie: sid={client.sid}\r\n"
                f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n")
        status, headers, answer = exchange(full_server.port, head.encode("latin-1") + body)
        assert status == 400, (what, path, status, answer)
        assert headers["connection"] == "close" and json.loads(answer)["error"]
    assert text not in [m["text"] for m in client.poll(since=None)["messages"]]


def test_an_http_1_0_request_may_leave_out_host(full_server):
    # HTTP/1.0 had no Host header: such a request is still served.
    assert exchange(full_server.port, b"GET /api/poll?timeout=0 HTTP/1.0\r\n\r\n")[0] == 200


def test_the_absolute_form_is_served_and_judged_by_its_host(full_server):
    # "GET http://127.0.0.1:PORT/path" (as sent to a proxy) is routed by its path, and the host
    # in it counts instead of the Host header: ours is served whatever Host says, a foreign one
    # gets 421 whatever Host says, and one with a user name gets 400.
    client = new_client(full_server)
    client.join()
    ours = f"http://127.0.0.1:{full_server.port}"

    def ask(method, target, host, body=b""):
        head = (f"{method} {target} HTTP/1.1\r\nHost: {host}\r\nCookie: sid={client.sid}\r\n"
                f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n")
        return exchange(full_server.port, head.encode() + body)

    status, _, body = ask("GET", f"{ours}/api/poll?timeout=0", "evil.example")
    assert status == 200 and json.loads(body)["you"]["id"]
    assert ask("GET", ours, "evil.example")[0] == 200  # no path: the page, at "/"
    assert ask("GET", f"HTTP://LOCALHOST:{full_server.port}/chime.wav", "127.0.0.1")[0] == 200
    posted = ask("POST", f"{ours}/api/messages", "evil.example", b'{"text": "absolute"}')
    assert posted[0] == 201 and json.loads(posted[2])["message"]["text"] == "absolute"
    for target in ("http://evil.example/", "http://evil.example/api/poll?timeout=0",
                   f"https://evil.example:{full_server.port}/"):
        assert ask("GET", target, f"127.0.0.1:{full_server.port}")[0] == 421, target
    assert ask("GET", f"http://127.0.0.1@evil.example:{full_server.port}/", "127.0.0.1")[0] == 400
    assert ask("GET", f"http://evil.example@127.0.0.1:{full_server.port}/", "127.0.0.1")[0] == 400


@pytest.mark.parametrize("host", ["evil.example", "evil.example:8000", "127.0.0.1.evil.example",
                                  "localhost.evil.example:80", "[::2]"])
def test_a_foreign_host_name_is_refused(full_server, host):
    # DNS rebinding: a hostile page points its own name at 127.0.0.1 and talks to us as itself.
    # Its requests name its host: the page, a poll and a post all get 421, and nothing is saved.
    client = new_client(full_server)
    client.join()
    for method, path, body in (("GET", "/", None), ("GET", "/api/poll?timeout=0", None),
                               ("POST", "/api/messages", {"text": f"rebound via {host}"})):
        response = client.request(method, path, body, headers={"Host": host})
        assert response.status == 421, (host, path, response.status)
        assert response.json["error"]
    assert f"rebound via {host}" not in [m["text"] for m in client.poll(since=None)["messages"]]
    for own in (f"127.0.0.1:{full_server.port}", f"localhost:{full_server.port}", "LOCALHOST"):
        assert client.request("GET", "/", headers={"Host": own}).status == 200, own


SERVED_ON_THE_NETWORK = ["127.0.0.1:{port}", "localhost", "LOCALHOST:{port}", "[::1]:8000",
                         "127.0.0.2", "chat.example", "Chat.Example:8000", "chat.example.",
                         "other.example"]
REFUSED_ON_THE_NETWORK = ["evil.example", "chat.example.evil.example", "localhost.evil.example",
                          "10.0.0.1", "0.0.0.0:{port}", "[::2]", "other.example.evil.example"]


@pytest.mark.parametrize("listening_on", ["0.0.0.0", "127.0.0.1"])
def test_on_the_network_only_the_rooms_own_host_names_are_served(start_full_server,
                                                                   listening_on):
    # The room listens beyond loopback (--host 0.0.0.0, for a LAN) or on it, with two names
    # given by --allowed-host. A rebinding page's name is refused with 421 (reading the history
    # and posting alike), saying which flag would allow it; the room's own names are served:
    # those given, localhost and loopback addresses for a connection over loopback (as this
    # test's are), and the address the connection arrived at, whatever the port.
    server = start_full_server("--host", listening_on, "--allowed-host", "chat.example",
                          "--allowed-host", "Other.Example")
    client = new_client(server)
    client.join()
    for host in SERVED_ON_THE_NETWORK:
        host = host.format(port=server.port)
        assert client.request("GET", "/api/messages", headers={"Host": host}).status == 200, host
    for host in REFUSED_ON_THE_NETWORK:
        host = host.format(port=server.port)
        for method, path, body in (("GET", "/api/messages", None), ("GET", "/", None),
                                   ("POST", "/api/messages", {"text": f"rebound via {host}"})):
            response = client.request(method, path, body, headers={"Host": host})
            assert response.status == 421, (host, path, response.status)
            assert "--allowed-host" in response.json["error"], response.json
    texts = [m["text"] for m in client.poll(since=None)["messages"]]
    assert not [text for text in texts if text.startswith("rebound")], texts


@pytest.mark.parametrize("name", ["chat.example:8000", "two words", "[::1", ""])
def test_allowed_host_takes_a_name_without_a_port(tmp_path, name):
    # --allowed-host takes a host name or an address, nothing else: a clear error and exit 2.
    result = run_chatroom(CHATROOM, "--port", "0", "--allowed-host", name, cwd=tmp_path)
    assert result.returncode == 2 and "--allowed-host" in result.stderr, result.stderr


CROSS_SITE = [
    # (what, headers, status)
    ("another site's Origin", {"Origin": "http://evil.example"}, 403),
    ("a look-alike Origin", {"Origin": "http://127.0.0.1.evil.example"}, 403),
    ("Origin null (a sandboxed frame)", {"Origin": "null"}, 403),
    ("Sec-Fetch-Site cross-site", {"Sec-Fetch-Site": "cross-site"}, 403),
    ("Sec-Fetch-Site same-site", {"Sec-Fetch-Site": "same-site"}, 403),
    ("an HTML form", {"Content-Type": "application/x-www-form-urlencoded"}, 415),
    ("a multipart form", {"Content-Type": "multipart/form-data; boundary=x"}, 415),
    ("text/plain", {"Content-Type": "text/plain"}, 415),
]


@pytest.mark.parametrize("what, headers, status", CROSS_SITE, ids=[case[0] for case in CROSS_SITE])
def test_cross_site_posts_are_refused(full_server, what, headers, status):
    # A POST another site's page could make with the visitor's cookie is refused in JSON, and
    # neither the message nor the name is saved. The same POST from our own page goes through.
    client = new_client(full_server)
    before = client.join()["you"]["name"]
    text = f"forged: {what}"
    for path, body in (("/api/messages", {"text": text}), ("/api/name", {"name": "Forged"})):
        response = client.request("POST", path, json.dumps(body).encode(),
                                  {"Content-Type": "application/json", **headers})
        assert response.status == status, (what, path, response.status, response.body)
        assert response.headers["Content-Type"] == "application/json" and response.json["error"]
    answer = client.poll(since=None)
    assert text not in [m["text"] for m in answer["messages"]] and answer["you"]["name"] == before
    own_page = {"Origin": f"http://127.0.0.1:{full_server.port}", "Sec-Fetch-Site": "same-origin"}
    assert client.request("POST", "/api/messages", {"text": "from our page"},
                          headers=own_page).status == 201


def test_own_page_behind_an_https_proxy_may_post(full_server):
    # Behind a TLS proxy our own page's Origin is https://host: only the host must match.
    client = new_client(full_server)
    client.join()
    own_page = {"Origin": f"https://127.0.0.1:{full_server.port}", "Sec-Fetch-Site": "same-origin"}
    assert client.request("POST", "/api/name", {"name": "Proxied"}, headers=own_page).status == 200


def stalled_requests(sid):
    """Requests cut off mid request line, mid headers, and mid body (of a post by `sid`)."""
    return [
        b"GET /api/po",
        b"GET /api/poll?timeout=0 HTTP/1.1\r\nHost: 127.0.0.1\r\nCookie: sid=",
        b"POST /api/messages HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        b"Cookie: sid=" + sid.encode() + b"\r\nContent-Length: 100\r\n\r\n{\"te",
    ]


def test_stalled_clients_are_dropped_and_hold_up_no_one(start_full_server):
    # 200 clients each send part of a request (line, headers or body) and stall. While they are
    # open, a post still reaches a parked poll; after the request time-out (3 s) the server has
    # closed every one of them.
    server = start_full_server("--request-timeout", "3")
    alice, bob = new_client(server), new_client(server)
    alice.join()
    bob.join()
    requests = stalled_requests(issued_sid(server))
    started = time.monotonic()
    stalled = []
    try:
        for n in range(200):
            stalled.append(socket.create_connection(("127.0.0.1", server.port), timeout=10))
            stalled[-1].sendall(requests[n % len(requests)])
        thread, result = poll_in_background(bob, timeout=30)
        posted = alice.post("through the crowd")
        assert posted.status == 201
        thread.join(10)
        assert not thread.is_alive(), "the parked poll was not woken while stalled clients wait"
        assert posted.json["message"]["id"] in [m["id"] for m in result["answer"]["messages"]]
        assert time.monotonic() - started < 3 and all_open(stalled), \
            "too slow to show that the post and poll went through while the stalled were open"
        # Now the server drops them: each sees the end of the connection, with no answer.
        for connection in stalled:
            connection.settimeout(max(0.1, started + 10 - time.monotonic()))
            try:
                assert connection.recv(100) == b""
            except ConnectionResetError:
                pass
            except TimeoutError:
                raise AssertionError("a stalled client was not dropped") from None
        assert time.monotonic() - started > 2.5, "stalled clients were dropped too early"
    finally:
        for connection in stalled:
            connection.close()
    assert alice.post("after the crowd").status in (201, 429)


def test_a_client_sending_a_byte_at_a_time_is_dropped(start_full_server):
    # A "slowloris" client sends its request one byte every 0.2 s, never pausing long enough for
    # a socket time-out. The request as a whole must still arrive within the time-out (1 s).
    server = start_full_server("--request-timeout", "1")
    request = b"GET /api/poll?timeout=0 HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Pad: " + b"a" * 200
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as connection:
        started = time.monotonic()
        for byte in request:
            try:
                connection.send(bytes([byte]))
            except OSError:
                break  # closed by the server
            if not is_open(connection, 0.2) or time.monotonic() - started > 6:
                break
        assert not is_open(connection), "a client sending a byte at a time was never dropped"
        assert time.monotonic() - started < 3


def test_a_client_that_never_reads_its_answers_is_dropped(start_full_server):
    # A client asks for the chime again and again without reading the answers. Once the socket
    # buffers are full, the server's write waits, and must give up after the request time-out
    # (1 s) instead of holding the thread for ever; other people are served meanwhile.
    server = start_full_server("--request-timeout", "1")
    someone_else = new_client(server)
    request = b"GET /chime.wav HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n" * 10
    with socket.create_connection(("127.0.0.1", server.port)) as connection:
        connection.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        connection.settimeout(0.2)  # a full buffer on our side makes send() wait; try again
        started = time.monotonic()
        dropped = False
        while not dropped and time.monotonic() - started < 15:
            try:
                connection.send(request)
            except socket.timeout:
                pass
            except OSError:  # reset or broken pipe: the server closed the connection
                dropped = True
            assert someone_else.poll(since=None, timeout=0)["version"] >= 0
        assert dropped, "a client that never reads was never dropped"
    assert "connection dropped" in server.output()


@pytest.mark.skipif(not Path("/proc/net/tcp").exists(), reason="reads /proc/net/tcp (Linux)")
def test_a_client_that_pipelines_and_never_reads_ties_up_little_memory(start_full_server):
    # A client asks for the chime 200 times in one go and reads nothing: the server answers one
    # at a time, as the client reads, and keeps at most MAX_UNSENT bytes of them queued (the
    # kernel alone would queue megabytes).
    server = start_full_server()
    with socket.create_connection(("127.0.0.1", server.port)) as connection:
        connection.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        connection.sendall(http_request("GET", "/chime.wav", {"Host": "127.0.0.1"}) * 200)
        time.sleep(1)
        queued = send_queue(server, connection)
        assert queued is not None and queued <= 2 * chatroom.MAX_UNSENT, \
            f"{queued} bytes queued for a client that reads nothing"


def test_a_client_that_reads_a_trickle_is_dropped(start_full_server):
    # A client asks for the chime many times and reads 512 bytes every quarter second (2 KB/s):
    # each answer must be read within the request time-out (1 s) plus a second per MIN_READ_RATE
    # bytes, so it is dropped within a few seconds, though every write makes some progress.
    server = start_full_server("--request-timeout", "1")
    with socket.create_connection(("127.0.0.1", server.port), timeout=1) as connection:
        connection.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        connection.sendall(http_request("GET", "/chime.wav", {"Host": "127.0.0.1"}) * 50)
        deadline = time.monotonic() + 15
        while "connection dropped" not in server.output() and time.monotonic() < deadline:
            try:
                connection.recv(512)
            except socket.timeout:
                pass
            time.sleep(0.25)
    assert "connection dropped" in server.output(), "a client reading a trickle was never dropped"
    assert "did not read its response in time" in server.output()


def test_every_answer_carries_the_security_headers(full_server):
    # Answers of every kind (page, sound, poll, each error, and errors http.server itself makes)
    # carry the content security policy with the page's script hash, nosniff and no-referrer;
    # answers of the API may not be stored by a cache.
    page = Client(full_server).request("GET", "/").body
    scripts = re.findall(rb"<script>(.*?)</script>", page, re.DOTALL)
    assert scripts, "the page has no inline script to check the policy against"
    hashes = [base64.b64encode(hashlib.sha256(script).digest()).decode() for script in scripts]
    host = "Host: 127.0.0.1\r\n"
    requests = [
        ("page", f"GET / HTTP/1.1\r\n{host}\r\n", 200),
        ("sound", f"GET /chime.wav HTTP/1.1\r\n{host}\r\n", 200),
        ("poll", f"GET /api/poll?timeout=0 HTTP/1.1\r\n{host}\r\n", 200),
        ("not found", f"GET /nowhere HTTP/1.1\r\n{host}\r\n", 404),
        ("wrong method", f"DELETE / HTTP/1.1\r\n{host}\r\n", 405),
        ("no cookie", f"POST /api/messages HTTP/1.1\r\n{host}Content-Length: 0\r\n\r\n", 403),
        ("foreign host", "GET / HTTP/1.1\r\nHost: evil.example\r\n\r\n", 421),
        ("garbage", "BLAH\r\n\r\n", 400),
        ("HTTP/2 request line", f"GET / HTTP/2.0\r\n{host}\r\n", 505),
        ("unknown method", f"BREW / HTTP/1.1\r\n{host}\r\n", 501),
        ("request line too long", "GET /" + "a" * 70_000 + " HTTP/1.1\r\n\r\n", 414),
    ]
    for what, request, status in requests:
        got, headers, _ = exchange(full_server.port, request.encode())
        assert got == status, (what, got)
        policy = headers.get("content-security-policy", "")
        for part in ("default-src 'self'", "frame-ancestors 'none'", "base-uri 'none'",
                     "form-action 'none'", *(f"'sha256-{digest}'" for digest in hashes)):
            assert part in policy, f"{what}: {part} missing from the policy {policy!r}"
        assert headers.get("x-content-type-options") == "nosniff", what
        assert headers.get("referrer-policy") == "no-referrer", what
        if what not in ("page", "sound"):
            assert headers.get("cache-control") == "no-store", what


# --------------------------------------------------------------------------------------------------
# 11. The defended server: caps on connections, a crowd arriving at once
# --------------------------------------------------------------------------------------------------

def test_full_server_answers_newcomers_503_and_keeps_its_clients(start_full_server):
    # With 5 connections open (the cap), each newcomer gets a quick 503 in JSON with Retry-After,
    # also one whose body comes a moment after its headers (closing on unread data would reset
    # the connection before the client reads the 503); the 5 clients carry on undisturbed.
    server = start_full_server("--max-clients", "5")
    held = [http.client.HTTPConnection("127.0.0.1", server.port, timeout=10) for _ in range(5)]
    for connection in held:
        connection.request("GET", "/api/poll?timeout=0")
        answer = connection.getresponse()
        assert answer.status == 200 and answer.read()
    sockets = [connection.sock for connection in held]
    for attempt in range(20):
        newcomer = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
        started = time.monotonic()
        try:
            if attempt % 2:
                newcomer.putrequest("POST", "/api/messages")
                newcomer.putheader("Content-Type", "application/json")
                newcomer.putheader("Content-Length", "13")
                newcomer.endheaders()
                time.sleep(0.02)
                newcomer.send(b'{"text":"hi"}')
            else:
                newcomer.request("GET", "/api/poll?timeout=0")
            answer = newcomer.getresponse()
            body = answer.read()
        except OSError as error:
            raise AssertionError(f"newcomer {attempt} got {error!r} instead of a 503") from None
        finally:
            newcomer.close()
        assert answer.status == 503, (attempt, answer.status, body)
        assert time.monotonic() - started < 2, "the 503 was not quick"
        assert int(answer.headers["Retry-After"]) > 0
        assert answer.headers["Content-Type"] == "application/json" and json.loads(body)["error"]
        assert answer.headers["X-Content-Type-Options"] == "nosniff"
    for connection, sock in zip(held, sockets):
        connection.request("GET", "/api/poll?timeout=0")
        answer = connection.getresponse()
        assert answer.status == 200 and answer.read()
        assert connection.sock is sock, "a connected client lost its connection"
        connection.close()
    # Once they have gone, there is room again.
    wait_until(lambda: exchange(server.port, b"GET /api/poll?timeout=0 HTTP/1.1\r\n"
                                             b"Host: 127.0.0.1\r\n\r\n")[0] == 200,
               message="a newcomer to be served once the others left")


def test_one_address_cannot_take_every_place(start_full_server):
    # With --max-clients-per-address 3 and three connections open from 127.0.0.1, a fourth from
    # there gets the quick 503 with Retry-After that a full server gives, while a newcomer from
    # another address (127.0.0.2) is served and the three carry on. Once one of the three has
    # gone, 127.0.0.1 may connect again.
    server = start_full_server("--max-clients-per-address", "3")
    request = b"GET /api/poll?timeout=0 HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"

    def connect(source="127.0.0.1"):
        return socket.create_connection(("127.0.0.1", server.port), timeout=10,
                                        source_address=(source, 0))

    def served(connection):
        connection.sendall(request)
        return read_answer(connection)[0] == 200

    held = [connect() for _ in range(3)]
    try:
        assert all(served(connection) for connection in held)
        for _ in range(5):
            with connect() as newcomer:
                newcomer.sendall(request)
                status, headers, body = read_answer(newcomer)
            assert status == 503, status
            assert int(headers["retry-after"]) > 0 and json.loads(body)["error"]
        try:
            elsewhere = connect("127.0.0.2")
        except OSError:  # not every system routes all of 127.0.0.0/8 to loopback
            elsewhere = None
        if elsewhere is not None:
            with elsewhere:
                assert served(elsewhere), "a client from another address was refused"
        assert all(served(connection) for connection in held), "a connected client was hurt"
        held.pop().close()
        wait_until(lambda: exchange(server.port, request)[0] == 200,
                   message="127.0.0.1 to be served once one of its connections closed")
    finally:
        for connection in held:
            connection.close()


SLOW_ADDRESSES = 60  # loopback addresses slow clients come from: 127.0.0.10 to 127.0.0.69
SLOW_PER_ADDRESS = 50  # slow connections from each, far below --max-clients-per-address
SLOW_START = b"GET /api/po"  # what each slow client sends of its request, and then nothing


def test_slow_connections_from_many_addresses_leave_room_for_newcomers(start_full_server):
    # 60 addresses open 50 connections each, send part of a request line and then nothing, and
    # open another whenever the server closes one, on a server of 600 places. A newcomer from
    # another address (127.0.0.250) is still served within 2 s in most tries; and a page whose
    # poll is parked on its kept-alive connection keeps it, and gets the next message on it.
    server = start_full_server("--max-clients", "600", "--log-polls")
    port = server.port
    try:
        socket.create_connection(("127.0.0.1", port), source_address=("127.0.0.250", 0)).close()
    except OSError:
        pytest.skip("this system does not route all of 127.0.0.0/8 to loopback")
    alice = new_client(server)
    sid = issued_sid(server)
    page = socket.create_connection(("127.0.0.1", port), timeout=10)
    page.sendall(http_request("GET", "/api/poll?timeout=0",
                              {"Host": "127.0.0.1", "Cookie": f"sid={sid}"}))
    version = json.loads(read_answer(page)[2])["version"]
    page.sendall(http_request("GET", f"/api/poll?since={version}&timeout=25",
                              {"Host": "127.0.0.1", "Cookie": f"sid={sid}"}))
    wait_until_parked(server, 1)
    slow = {}  # file number -> (slow connection, its source address)
    watch = select.poll()  # (select.select cannot watch file numbers past 1023)

    def open_slow(source):
        connection = socket.socket()
        try:
            connection.settimeout(5)
            connection.bind((source, 0))
            connection.connect(("127.0.0.1", port))
            connection.sendall(SLOW_START)
        except OSError:  # refused, or closed at once: tried again at the next refill
            pass
        slow[connection.fileno()] = connection, source
        watch.register(connection, select.POLLIN)

    def refill():
        """Open a new slow connection for each one the server answered or closed."""
        for number, _ in watch.poll(0):
            connection, source = slow.pop(number)
            watch.unregister(number)
            connection.close()
            open_slow(source)

    def newcomer_served():
        started = time.monotonic()
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=2,
                                          source_address=("127.0.0.250", 0)) as newcomer:
                newcomer.sendall(b"GET /api/poll?timeout=0 HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                                 b"Connection: close\r\n\r\n")
                status = read_answer(newcomer)[0]
        except OSError:  # (a time-out too)
            return False
        return status == 200 and time.monotonic() - started < 2

    try:
        for n in range(SLOW_ADDRESSES * SLOW_PER_ADDRESS):
            open_slow("127.0.0.%d" % (10 + n % SLOW_ADDRESSES))
        served = []
        for _ in range(5):
            refill()
            served.append(newcomer_served())
        assert served.count(True) >= 3, f"newcomers served in 2 s: {served}"
        posted = alice.post("still here?")
        assert posted.status == 201, posted.status
        page.settimeout(10)
        for _ in range(5):  # (the room may have changed first: someone arrived)
            status, headers, body = read_answer(page)
            assert status == 200, "the page's parked poll was dropped"
            answer = json.loads(body)
            if "still here?" in [message["text"] for message in answer["messages"]]:
                break
            page.sendall(http_request("GET", f"/api/poll?since={answer['version']}&timeout=25",
                                      {"Host": "127.0.0.1", "Cookie": f"sid={sid}"}))
        else:
            raise AssertionError("the page never got the message on its connection")
    finally:
        page.close()
        for connection, _ in slow.values():
            connection.close()


def test_a_new_connection_must_send_its_first_request_at_once(start_full_server):
    # With --request-timeout 30, a connection that sends nothing, and one that sends part of a
    # request line, are closed after FIRST_REQUEST_TIMEOUT (3 s), long before 30 s; while a
    # kept-alive connection that has been answered waits for its next request as long as
    # --request-timeout allows.
    server = start_full_server("--request-timeout", "30")
    request = b"GET /api/poll?timeout=0 HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
    connections = [socket.create_connection(("127.0.0.1", server.port), timeout=10)
                   for _ in range(3)]
    silent, partial, kept = connections
    try:
        partial.sendall(SLOW_START)
        kept.sendall(request)
        assert read_answer(kept)[0] == 200
        started = time.monotonic()
        for connection in (silent, partial):
            connection.settimeout(max(0.1, started + 15 - time.monotonic()))
            try:
                assert connection.recv(100) == b"", "a slow first request was answered"
            except ConnectionResetError:
                pass
            except TimeoutError:
                raise AssertionError("a connection that sent no request in time was kept open "
                                     "as if for --request-timeout") from None
        assert time.monotonic() - started > 1, "closed before its first request was due"
        assert is_open(kept), "a kept-alive connection was closed before --request-timeout"
        kept.sendall(request)
        assert read_answer(kept)[0] == 200
    finally:
        for connection in connections:
            connection.close()


def test_a_burst_of_connections_is_not_refused(full_server):
    # 300 clients connect at once: the listen backlog holds them all, and each gets an answer.
    connections = [socket.create_connection(("127.0.0.1", full_server.port), timeout=10)
                   for _ in range(300)]
    try:
        for connection in connections:
            connection.sendall(b"GET /api/poll?timeout=0 HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                               b"Connection: close\r\n\r\n")
        for connection in connections:
            assert connection.recv(12).startswith(b"HTTP/1.1 200")
    finally:
        for connection in connections:
            connection.close()


# --------------------------------------------------------------------------------------------------
# Everything at once: random requests never break the room
# --------------------------------------------------------------------------------------------------

# The fuzz test's vocabulary. A case starts as a valid request and then gets 0 to 3 of these
# mutations, so that it gets past the first check and reaches the code behind it.
FUZZ_METHODS = ["GET", "POST", "HEAD", "PUT", "DELETE", "OPTIONS", "PATCH", "TRACE", "CONNECT",
                "get", "BREW", "G\x00T", "G\xe9T", ""]


FUZZ_PATHS = ["/", "/api/poll", "/api/messages", "/api/name", "/chime.wav", "/api/poll/",
              "//api/poll", "/%2e%2e/chatroom.py", "/api/poll%00", "*", "http://127.0.0.1/api/poll",
              "/\xff\xfe", "/" + "a" * 3000, ""]


FUZZ_NUMBERS = ["0", "1", "3", "-1", "1.5", "abc", "", "nan", "inf", "-inf", "1e309", "1e-400",
                "9" * 30, "9" * 5000, "%D9%A1", "%00", "%ff", "0x10", "+2", "1_0"]


FUZZ_TEXTS = ["hi", "<script>alert(1)</script>", "\u00e9\U0001F600", "a\x00b", " ", "x" * 2001,
              "\ud800", "line\nbreak", "\u202e", "x" * 2000, "", "\x1b[31m"]


FUZZ_BODIES = [b"", b"{}", b"[]", b"null", b'{"text": "\xff\xfe"}', b"[" * 3000 + b"]" * 3000,
               b'{"text": 1e999999}', b'{"text": ' + b"9" * 5000 + b"}", b'{"text": ["a"]}',
               b'{"text": "' + b"x" * 17_000 + b'"}', b"\xef\xbb\xbf{}", b"{\"text\": \"a\"", ]


FUZZ_HEADERS = [
    ("Host", ["localhost", "evil.example", "", "[::1]", "\xff", "a:b:c", "127.0.0.1:x"]),
    ("Cookie", ["sid=short", "sid=" + "A" * 32, "a=b; sid", ";;;;", "sid=\xff" * 5, "sid"]),
    ("Origin", ["http://evil.example", "null", "\x00", "http://127.0.0.1"]),
    ("Sec-Fetch-Site", ["cross-site", "same-site", "none", "?"]),
    ("Content-Type", ["APPLICATION/JSON", "application/json; charset=utf-8", "text/plain",
                      "application/x-www-form-urlencoded", "", ";;"]),
    ("Expect", ["100-continue", "200-ok"]),
    ("Connection", ["close", "keep-alive", "upgrade"]),
    ("Transfer-Encoding", ["chunked", "gzip"]),
    ("X-Junk", ["\x7f\x00 value", "a" * 5000]),
    ("NoColonHere", None), (" folded", ["continuation"]), ("X-\x01", ["control"]),
]


def fuzz_case(rng, port, sids):
    """One request: (bytes to send, method, whether it may rightly go unanswered)."""
    kind = rng.choice(["post", "post", "rename", "poll", "poll", "page"])
    method = "GET" if kind in ("poll", "page") else "POST"
    path = {"post": "/api/messages", "rename": "/api/name", "poll": "/api/poll",
            "page": rng.choice(["/", "/chime.wav"])}[kind]
    query = f"?since={rng.randrange(0, 50)}&timeout=0" if kind == "poll" else ""
    headers = {"Host": f"127.0.0.1:{port}", "Cookie": f"sid={rng.choice(sids)}"}
    body = None
    if method == "POST":
        headers["Content-Type"] = "application/json"
        field = "text" if kind == "post" else "name"
        text = rng.choice(FUZZ_TEXTS) if rng.random() < 0.3 else f"fuzz {rng.random()}"
        body = json.dumps({field: text}, ensure_ascii=rng.random() < 0.5).encode("utf-8",
                                                                               "surrogatepass")
    length, version, truncate, may_hang = "right", "HTTP/1.1", False, False
    for _ in range(rng.choice([0, 1, 1, 2, 3])):
        mutation = rng.choice(["method", "path", "query", "header", "header", "drop header",
                               "body", "length", "version", "truncate"])
        if mutation == "method":
            method = rng.choice(FUZZ_METHODS)
        elif mutation == "path":
            path = rng.choice(FUZZ_PATHS)
        elif mutation == "query":
            pairs = [(rng.choice(["since", "timeout", "x"]), rng.choice(FUZZ_NUMBERS))
                     for _ in range(rng.randrange(1, 4))]
            query = "?" + "&".join(f"{name}={value}" for name, value in pairs)
            may_hang = True  # a valid poll parks until the room changes or its time-out passes
        elif mutation == "header":
            name, values = rng.choice(FUZZ_HEADERS)
            headers[name] = None if values is None else rng.choice(values)
        elif mutation == "drop header" and headers:
            del headers[rng.choice(sorted(headers))]
        elif mutation == "body":
            body = rng.choice(FUZZ_BODIES + [bytes(rng.randrange(256) for _ in range(40))])
        elif mutation == "length":
            length = rng.choice(["missing", "short", "long", "abc", "-4", "\u00b2", "1e3", "9" * 40,
                                 "two"])
        elif mutation == "version":
            version = rng.choice(["HTTP/1.0", "HTTP/2.0", "HTTP/1.1x", "", "HTTP/1.1 extra"])
        else:
            truncate = True
    lines = [" ".join(part for part in (method, path + query, version) if part)]
    lines += [name if value is None else f"{name}: {value}" for name, value in headers.items()]
    if body is not None and length != "missing":
        size = {"right": len(body), "short": max(0, len(body) - 3), "long": len(body) + 50}
        if length == "two":
            lines += [f"Content-Length: {len(body)}", "Content-Length: 1"]
        else:
            lines.append(f"Content-Length: {size.get(length, length)}")
        may_hang = may_hang or length == "long"  # the server waits for the rest of the body
    data = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + (body or b"")
    if truncate:
        data = data[:rng.randrange(len(data))]
        may_hang = True
    return data, method, may_hang


def test_fuzzing_never_breaks_the_room(start_full_server):
    # 3000 random requests from a fixed seed (odd methods and paths, wrong numbers and lengths,
    # invalid UTF-8, deep JSON, truncated connections): every answer is well-formed HTTP with the
    # security headers and, for an error, a JSON body; none is a 500; the server never dies; and
    # afterwards every acknowledged message is intact and the room works normally.
    # (--people-per-address: the fuzzer's posts come from 127.0.0.1 as if from many people)
    server = start_full_server("--request-timeout", "1", "--poll-timeout", "1",
                               "--people-per-address", "1000")
    rng = random.Random(1234)
    sids = [new_client(server).sid for _ in range(20)]
    cases = [fuzz_case(rng, server.port, sids) for _ in range(3000)]
    failures, acknowledged = [], []

    def run(share):
        for data, method, may_hang in share:
            try:
                with socket.create_connection(("127.0.0.1", server.port), timeout=3) as connection:
                    connection.sendall(data)
                    try:
                        connection.shutdown(socket.SHUT_WR)
                    except OSError:  # the server has already answered and closed: read that answer
                        pass
                    status, headers, body = read_answer(connection, method)
            except (TimeoutError, ConnectionResetError, BrokenPipeError):
                if not may_hang:
                    failures.append(("no answer", data[:200]))
                continue
            except AssertionError as error:
                failures.append((str(error), data[:200]))
                continue
            if status == 0:
                if not may_hang and method in ("GET", "POST", "HEAD"):
                    failures.append(("closed without an answer", data[:200]))
                continue
            problem = None
            if status == 500 or status >= 600:
                problem = f"status {status}"
            elif "nosniff" not in headers.get("x-content-type-options", ""):
                problem = "no security headers"
            elif status >= 400 or headers["content-type"] == "application/json":
                try:
                    answer = json.loads(body) if method != "HEAD" else {"error": "(HEAD)"}
                except ValueError:
                    problem = "not JSON"
                else:
                    if status >= 400 and not isinstance(answer.get("error"), str):
                        problem = "no error sentence"
                    if status == 201:
                        acknowledged.append((answer["message"]["id"], answer["message"]["text"]))
            if problem:
                failures.append((problem, status, body[:200], data[:200]))

    threads = [threading.Thread(target=run, args=(cases[n::12],)) for n in range(12)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not any(thread.is_alive() for thread in threads), "the fuzzing did not finish"
    assert not failures, f"{len(failures)} bad answers, the first: {failures[:3]}"
    assert server.process.poll() is None, "the server died"
    assert "Traceback" not in server.output()
    assert acknowledged, "no fuzzed post was accepted: the fuzzing is too far off the mark"
    client = new_client(server)
    stored = {(m["id"], m["text"]) for m in client.poll(since=0, timeout=0)["messages"]}
    assert set(acknowledged) <= stored, "an acknowledged message was lost or changed"
    client.join()
    posted = client.post("after the fuzzing")
    assert posted.status == 201
    assert client.poll(since=posted.json["message"]["id"] - 1, timeout=0)["messages"][0]["text"] \
        == "after the fuzzing"


# ==================================================================================================
# THE PAGE IN A REAL BROWSER
# ==================================================================================================
# --------------------------------------------------------------------------------------------------
# The page in a real browser
# --------------------------------------------------------------------------------------------------
# Headless Debian Chromium driven by Playwright: one browser for the whole session, one browser
# context (own cookies and storage) per simulated person. Long-polling means the network is never
# idle, so waits are on things a person would see.

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-quic",
    # The chime for an incoming message has no user gesture behind it; without this, no sound.
    "--autoplay-policy=no-user-gesture-required",
]
BROWSER_TIMEOUT_MS = 5000  # any single wait in the page; a failure shows fast
PAGE_TITLE = "Chat room"
ONLINE_WINDOW = 2  # seconds, for the presence test: short, so a departure shows soon

# Init scripts run in every page of a context before the page's own script.
RECORD_CHIMES = """
window.__plays = [];
const realPlay = HTMLMediaElement.prototype.play;
HTMLMediaElement.prototype.play = function () {
  const call = { src: this.currentSrc || this.src, outcome: "pending" };
  window.__plays.push(call);
  const promise = realPlay.call(this);
  promise.then(() => { call.outcome = "played"; }, (error) => { call.outcome = error.name; });
  return promise;
};
"""
BLOCK_SOUND = """
window.__plays = [];
HTMLMediaElement.prototype.play = function () {
  window.__plays.push({ src: this.currentSrc || this.src, outcome: "NotAllowedError" });
  return Promise.reject(new DOMException(
    "play() failed because the user didn't interact with the document first.", "NotAllowedError"));
};
"""
EMULATE_VISIBILITY = """
let __hidden = false;
Object.defineProperty(Document.prototype, "visibilityState",
                      { configurable: true, get() { return __hidden ? "hidden" : "visible"; } });
Object.defineProperty(Document.prototype, "hidden",
                      { configurable: true, get() { return __hidden; } });
window.__setHidden = (hidden) => {
  __hidden = hidden;
  document.dispatchEvent(new Event("visibilitychange"));
};
"""
# What screen readers are told: each text put into a live region, with the region's politeness at
# that moment ("off" is not read out). A region may change its aria-live, so the records of one
# batch are walked backwards from now, undoing each change of aria-live on the way.
RECORD_ANNOUNCEMENTS = """
window.__announced = [];
const IMPLICIT_LIVE = { status: "polite", log: "polite", alert: "assertive", timer: "off" };
const LIVE_REGION = "[aria-live], [role=status], [role=log], [role=alert], [role=timer]";
new MutationObserver((records) => {
  const before = new Map();  // region -> its aria-live before the records walked so far
  const found = [];
  for (const record of records.reverse()) {
    if (record.type === "attributes") { before.set(record.target, record.oldValue); continue; }
    const element = record.target.nodeType === Node.TEXT_NODE ? record.target.parentElement
                                                               : record.target;
    const region = element && element.closest(LIVE_REGION);
    const text = record.type === "characterData" ? record.target.data
                 : [...record.addedNodes].map((node) => node.textContent).join("");
    if (!region || !text) continue;
    const live = before.has(region) ? before.get(region) : region.getAttribute("aria-live");
    found.push({ region: region.id, politeness: live || IMPLICIT_LIVE[region.getAttribute("role")],
                 text });
  }
  window.__announced.push(...found.reverse());
}).observe(document, { subtree: true, childList: true, characterData: true, attributes: true,
                       attributeFilter: ["aria-live"], attributeOldValue: true });
"""
# Layout shifts (Chromium's Layout Instability API) that the person's own input did not cause.
OBSERVE_LAYOUT_SHIFTS = """
window.__shifts = [];
new PerformanceObserver((list) => {
  for (const shift of list.getEntries()) {
    if (shift.hadRecentInput) continue;
    window.__shifts.push({ at: shift.startTime, value: shift.value, moved: shift.sources.map(
      (source) => source.node ? source.node.id || source.node.nodeName : "?") });
  }
}).observe({ type: "layout-shift", buffered: true });
"""


def browser_unavailable(reason):
    """Skip, but fail under CI: a broken install step must never turn into a quietly green run."""
    if os.environ.get("CI"):
        pytest.fail(f"{reason}, and the CI environment variable is set", pytrace=False)
    pytest.skip(reason)


@pytest.fixture(scope="session")
def browser():
    """One headless Chromium for the whole test session."""
    if sync_playwright is None:
        browser_unavailable("playwright is not installed (pip install playwright)")
    if not os.access(CHROMIUM, os.X_OK):
        browser_unavailable(f"{CHROMIUM} is missing (apt-get install chromium)")
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield launched
        launched.close()


@pytest.fixture(scope="module")
def browser_room(tmp_path_factory):
    """One server for the browser tests that only add to the room."""
    running = Server(tmp_path_factory.mktemp("browser-room"), *ORIGINAL_LIMITS)
    yield running
    running.stop()


def since_of(request):
    """The `since` of a page's poll request, or None (another request, or a first poll)."""
    url = urlsplit(request.url)
    if url.path != "/api/poll":
        return None
    values = parse_qs(url.query).get("since")
    return int(values[-1]) if values else None


def exactly(text):
    return re.compile("^" + re.escape(text) + "$")


def online_entry(page, name, you=False):
    """The entries of the online list whose name is exactly `name` (marked as one's own)."""
    return page.locator("#online li.you" if you else "#online li",
                        has=page.locator(".name", has_text=exactly(name)))


def unique(prefix):
    """A text that no other test has put in the shared room."""
    return f"{prefix} {secrets.token_hex(3)}"


def someone_says(server, text):
    """A new person posts `text` over HTTP (so no rate limit applies); returns the message id."""
    response = new_client(server).post(text)
    assert response.status == 201, (response.status, response.body)
    return response.json["message"]["id"]


class Person:
    """Someone in the room: their own browser context (cookies, storage) and their page."""

    def __init__(self, context, server):
        self.context = context
        self.url = f"http://127.0.0.1:{server.port}/"
        self.problems = []  # console errors, uncaught errors, failed requests, error answers
        self.polled_since = {}  # page -> every `since` it has polled with: what it has taken in
        self.requested = []  # the path of every request its pages made
        context.on("console", self._console)
        context.on("weberror", lambda error: self.problems.append(f"uncaught: {error.error}"))
        context.on("requestfailed", lambda request: self.problems.append(
            f"request failed: {request.method} {request.url} {request.failure}"))
        context.on("response", lambda response: response.status >= 400 and self.problems.append(
            f"answer {response.status}: {response.request.method} {response.url}"))
        context.on("request", self._request)
        self.page = context.new_page()

    def _console(self, message):
        if message.type == "error":
            self.problems.append(f"console: {message.text}")

    def _request(self, request):
        self.requested.append(urlsplit(request.url).path)
        since = since_of(request)
        if since is not None:
            self.polled_since.setdefault(request.frame.page, []).append(since)

    def open(self):
        """Load the page and wait until its first poll has been answered."""
        self.page.goto(self.url)
        expect(self.page.locator("#status")).to_have_text("Connected")
        return self

    def reload(self):
        self.page.reload()
        expect(self.page.locator("#status")).to_have_text("Connected")

    def row(self, text):
        """The message rows whose text is exactly `text`."""
        return self.page.locator("#messages li").filter(
            has=self.page.locator("p.text", has_text=exactly(text)))

    def texts(self):
        return self.page.locator("#messages p.text").all_text_contents()

    def say(self, text):
        """Type a message and press Enter; wait until it is sent and shown. Returns its id."""
        box = self.page.locator("#text")
        box.fill(text)
        box.press("Enter")
        expect(box).to_have_value("")
        expect(self.row(text)).to_have_count(1)
        return int(self.row(text).get_attribute("data-id"))

    def sees(self, text):
        """Wait until the message `text` is on the page (once). Returns its id."""
        expect(self.row(text)).to_have_count(1)
        return int(self.row(text).get_attribute("data-id"))

    def caught_up(self, version, page=None):
        """Wait until the page has taken in the room up to `version`: its next poll asks past it."""
        page = page or self.page
        if max(self.polled_since.get(page, []), default=-1) >= version:
            return
        page.wait_for_event("request", lambda request: since_of(request) is not None
                            and since_of(request) >= version)

    def open_side(self):
        """On a phone, open the sheet of people and settings (elsewhere it is always shown)."""
        toggle = self.page.locator("#people-toggle")
        if toggle.is_visible() and toggle.get_attribute("aria-expanded") == "false":
            toggle.click()
        expect(self.page.locator("#name-button")).to_be_visible()

    def close_side(self):
        """On a phone, close the sheet of people and settings, if it is open."""
        toggle = self.page.locator("#people-toggle")
        if toggle.is_visible() and toggle.get_attribute("aria-expanded") == "true":
            toggle.click()

    def rename(self, name):
        """Change the name the way a person does: the name button, type, Enter."""
        self.open_side()
        self.page.locator("#name-button").click()
        field = self.page.locator("#name-input")
        expect(field).to_be_focused()
        field.fill(name)
        field.press("Enter")
        expect(self.page.locator("#name-form")).to_be_hidden()
        expect(self.page.locator("#name-button")).to_contain_text(name)
        self.close_side()

    def my_name(self):
        return self.page.locator("#online li.you .name").text_content()

    def online(self):
        """The names in the online list, with " (you)" after one's own."""
        return self.page.locator("#online li").evaluate_all("""items => items.map((item) =>
            item.querySelector(".name").textContent + (item.matches(".you") ? " (you)" : ""))""")

    def plays(self):
        return self.page.evaluate("window.__plays")

    def settled_plays(self):
        """Wait until the chime has been asked for and play() has settled; returns plays().

        Polled from here: the page's policy forbids the string evaluation wait_for_function
        uses, and the chime is fetched only when first played, so it may take a moment.
        """
        wait_until(lambda: (self.plays() and
                            all(play["outcome"] != "pending" for play in self.plays())),
                   timeout=BROWSER_TIMEOUT_MS / 1000, message="the chime to play")
        return self.plays()

    def announced(self, politeness=("polite", "assertive")):
        """What screen readers were told (with RECORD_ANNOUNCEMENTS): [(region id, text)]."""
        return [(said["region"], said["text"]) for said in self.page.evaluate("window.__announced")
                if said["politeness"] in politeness]


@pytest.fixture
def people(browser, request, tmp_path):
    """join(server, **context_options) opens the room for one more person and returns them.

    If the test fails, every page still open is saved as a screenshot in the test's tmp_path.
    """
    joined = []
    failures_before = request.session.testsfailed

    def join(server, *, init_script=None, **context_options):
        context = browser.new_context(**context_options)
        context.set_default_timeout(BROWSER_TIMEOUT_MS)
        if init_script:
            context.add_init_script(init_script)
        person = Person(context, server)
        joined.append(person)
        return person.open()

    yield join
    if request.session.testsfailed > failures_before:
        for number, person in enumerate(joined):
            for tab, page in enumerate(person.context.pages):
                try:
                    page.screenshot(path=tmp_path / f"person-{number}-tab-{tab}.png")
                except Exception as error:  # a screenshot must not hide the real failure
                    print(f"no screenshot of person {number}, tab {tab}: {error}")
        print(f"screenshots in {tmp_path}")
    for person in joined:
        person.context.close()


def test_two_people_chat_both_ways(browser_room, people):
    # Ann and Ben take turns: each sees the other's messages appear, in order, once, no reload.
    ann, ben = people(browser_room), people(browser_room)
    for person in (ann, ben):
        person.page.evaluate("window.__sameDocument = true")
    said = [unique("Ann: hi Ben"), unique("Ben: hi Ann"), unique("Ann: how are you?"),
            unique("Ben: fine, thanks")]
    for number, text in enumerate(said):
        speaker, listener = (ann, ben) if number % 2 == 0 else (ben, ann)
        last_id = speaker.say(text)
        assert listener.sees(text) == last_id
    mine = re.compile(r"\bmine\b")
    for person, own in ((ann, said[0::2]), (ben, said[1::2])):
        person.caught_up(last_id)
        ours = [text for text in person.texts() if text in said]
        assert ours == said, f"messages missing, out of order or repeated: {ours}"
        ids = person.page.locator("#messages li").evaluate_all("rs => rs.map(r => r.dataset.id)")
        assert len(ids) == len(set(ids)), "a message row is shown twice"
        for text in said:
            if text in own:
                expect(person.row(text)).to_have_class(mine)
            else:
                expect(person.row(text)).not_to_have_class(mine)
        assert person.page.evaluate("window.__sameDocument"), "the page was reloaded"


def test_chime_for_others_only_and_mute_survives_reload(browser_room, people):
    # The chime plays for someone else's message, not for my own (in this tab or another of
    # mine) nor for the history shown on first load; muted, nothing plays, and the mute setting
    # survives a reload.
    history = unique("said before Cleo came")
    history_id = someone_says(browser_room, history)
    cleo = people(browser_room, init_script=RECORD_CHIMES)
    cleo.sees(history)
    cleo.caught_up(history_id)
    assert cleo.plays() == [], "the chime played for the history shown on first load"

    other_tab = cleo.context.new_page()
    other_tab.goto(cleo.url)
    expect(other_tab.locator("#status")).to_have_text("Connected")
    own = unique("Cleo's own message")
    own_id = cleo.say(own)
    expect(other_tab.locator("#messages p.text", has_text=exactly(own))).to_have_count(1)
    cleo.caught_up(own_id)  # her own message has come back by poll too
    cleo.caught_up(own_id, page=other_tab)
    assert cleo.plays() == [], "the chime played for Cleo's own message"
    assert other_tab.evaluate("window.__plays") == [], "Cleo's other tab chimed for her message"
    assert "/chime.wav" not in cleo.requested, "the chime was fetched before it was needed"
    other_tab.close()

    other = unique("someone else speaks")
    someone_says(browser_room, other)
    cleo.sees(other)
    cleo.settled_plays()
    plays = cleo.plays()
    assert len(plays) == 1 and plays[0]["src"].endswith("/chime.wav"), plays
    assert plays[0]["outcome"] == "played", f"the browser could not play the chime: {plays}"

    # The setting says its state, to the eye and to a screen reader alike.
    chime = cleo.page.locator("#chime")
    expect(chime).to_have_accessible_name("Chime")
    expect(chime).to_have_value("always")
    chime.select_option("never")
    expect(chime.locator("option:checked")).to_have_text("Never")
    quiet_id = someone_says(browser_room, unique("while muted"))
    cleo.caught_up(quiet_id)
    assert len(cleo.plays()) == 1, "the chime played while muted"

    cleo.reload()
    expect(chime).to_have_value("never")
    quiet_id = someone_says(browser_room, unique("muted after reload"))
    cleo.caught_up(quiet_id)
    assert cleo.plays() == [], "the chime played after a reload although it was muted"


def test_blocked_sound_breaks_nothing(browser_room, people):
    # A browser that refuses to play sound: no uncaught error, and messages keep arriving.
    dan = people(browser_room, init_script=BLOCK_SOUND)
    for number in range(2):
        text = unique(f"for Dan, who hears nothing, #{number}")
        message_id = someone_says(browser_room, text)
        dan.sees(text)
        dan.caught_up(message_id)
    assert len(dan.plays()) == 2, "the page did not even try to play the chime"
    assert [problem for problem in dan.problems if problem.startswith("uncaught")] == []
    expect(dan.page.locator("#status")).to_have_text("Connected")


def test_rename_in_the_page(browser_room, people):
    # Eva renames herself (Enter saves; Escape cancels); Finn sees the new name in the online
    # list and on her new messages; after a reload her name is still there.
    eva, finn = people(browser_room), people(browser_room)
    new_name = unique("Eva")
    eva.rename(new_name)
    button, field = eva.page.locator("#name-button"), eva.page.locator("#name-input")

    button.click()
    expect(field).to_be_focused()
    expect(field).to_have_value(new_name)
    field.fill("Not my name")
    field.press("Escape")
    expect(eva.page.locator("#name-form")).to_be_hidden()
    expect(button).to_be_focused()
    expect(button).to_contain_text(new_name)
    expect(button).not_to_contain_text("Not my name")

    expect(online_entry(finn.page, new_name)).to_have_count(1)
    expect(online_entry(eva.page, new_name, you=True)).to_have_count(1)
    text = unique("Eva after renaming")
    eva.say(text)
    expect(finn.row(text).locator(".name")).to_have_text(new_name)

    eva.reload()
    expect(button).to_contain_text(new_name)
    assert eva.my_name() == new_name
    assert "Not my name" not in finn.online()


def test_online_list_shows_arrivals_and_departures(start_full_server, people):
    # Gus and Hana both see each other online; Hana closes her page, and she leaves Gus's
    # list within the presence window (2 s) plus the server's one-second check.
    server = start_full_server("--online-window", str(ONLINE_WINDOW))
    gus, hana = people(server), people(server)
    gus_name, hana_name = gus.my_name(), hana.my_name()
    expect(online_entry(gus.page, hana_name)).to_have_count(1)
    expect(online_entry(hana.page, gus_name)).to_have_count(1)
    expect(gus.page.locator("#online-count")).to_have_text("2")

    hana.page.close()
    expect(online_entry(gus.page, hana_name)).to_have_count(
        0, timeout=(ONLINE_WINDOW + 1) * 1000 + BROWSER_TIMEOUT_MS)
    expect(gus.page.locator("#online-count")).to_have_text("1")
    assert gus.online() == [f"{gus_name} (you)"]


def test_rate_limit_keeps_the_text_and_counts_down(browser_room, people):
    # Ivy sends three messages fast (the limit is 2 in 3 s): the third is refused with a notice
    # saying when she may post again, and her text waits at the end of the log; once the notice
    # says she can, it goes through by itself. A screen reader hears the limit once and then
    # once that she can post again, not every second of the countdown; the notice is not left
    # in red, and the message box does not move when it appears.
    ivy = people(browser_room, init_script=RECORD_ANNOUNCEMENTS)
    ivy.say(unique("Ivy one"))
    ivy.say(unique("Ivy two"))
    third = unique("Ivy three")
    box, notice = ivy.page.locator("#text"), ivy.page.locator("#notice")
    box_before = box.bounding_box()
    ivy.page.evaluate("window.__announced = []")
    box.fill(third)
    box.press("Enter")
    # On a very slow machine the 10-second limit may be the one hit: accept any limit here.
    expect(notice).to_contain_text(re.compile(r"at most \d+ messages in \d+ seconds"))
    expect(notice).to_contain_text(re.compile(r"You can post again in \d+ s\."))
    wait = int(re.search(r"again in (\d+) s", notice.text_content()).group(1))
    assert 1 <= wait <= 10, notice.text_content()
    waiting = ivy.page.locator("#outbox li", has_text=third)
    expect(waiting).to_contain_text("Waiting")
    expect(ivy.row(third)).to_have_count(0)
    warning_colour = notice.evaluate("element => getComputedStyle(element).color")

    expect(notice).to_have_text("You can post again now.", timeout=wait * 1000 + BROWSER_TIMEOUT_MS)
    said = [text for region, text in ivy.announced() if region != "log"]
    assert len(said) == 2 and re.fullmatch(r"Slow down: .*at most \d+ messages in \d+ seconds\.",
                                           said[0]) and said[1] == "You can post again now.", said
    assert notice.evaluate("element => getComputedStyle(element).color") != warning_colour, \
        "'You can post again now.' is shown in the colour of the warning"
    assert box.bounding_box() == box_before, "the notice line moved the message box"
    expect(ivy.row(third)).to_have_count(1)
    expect(waiting).to_have_count(0)


def test_markup_in_messages_and_names_is_shown_as_text(browser_room, people):
    # Jay names himself <b>bold</b> and sends an <img onerror=...>: Kim and Jay see the markup
    # as text, no element is made from it, and nothing runs.
    jay, kim = people(browser_room), people(browser_room)
    name = "<b>bold</b>"
    text = '<img src=x onerror="window.__xss=1"> ' + secrets.token_hex(3)
    jay.rename(name)
    jay.say(text)
    kim.sees(text)
    expect(kim.row(text).locator(".name")).to_have_text(name)
    expect(online_entry(kim.page, name)).to_have_count(1)
    for person in (jay, kim):
        made = person.page.evaluate("document.querySelectorAll('#messages img, #messages b, "
                                    "#online img, #online b, #name-button b').length")
        assert made == 0, "the page turned user text into elements"
        assert person.page.evaluate("window.__xss") is None, "user text ran as script"
    expect(jay.page.locator("#name-button")).to_contain_text(name)


def test_page_recovers_by_itself_after_a_server_restart(start_server, people):
    # The server restarts under Lea's open page on her phone: it says the connection is lost,
    # comes back by itself, and shows what was said meanwhile, once each, without a reload.
    # Nothing on the page moves when "Connection lost. Trying again in N s…" comes and goes.
    server = start_server()
    lea = people(server, init_script=OBSERVE_LAYOUT_SHIFTS, viewport={"width": 390, "height": 844},
                 is_mobile=True, has_touch=True)
    before = unique("before the restart")
    someone_says(server, before)
    lea.sees(before)
    # Steady: the history asked for at first is in too (else its "beginning of the room" line,
    # arriving after the restart, would be taken for a shift that the restart caused).
    expect(lea.page.locator("#beginning")).to_be_visible()
    lea.page.evaluate("window.__sameDocument = true")
    steady_since = lea.page.evaluate("performance.now()")

    server.stop()
    status = lea.page.locator("#status")
    expect(status).to_have_class("lost")
    expect(status).to_contain_text("Connection lost")

    server.restart(same_port=True)
    meanwhile = [unique("said while Lea was away"), unique("and this too")]
    for text in meanwhile:
        someone_says(server, text)
    expect(status).to_have_text("Connected", timeout=10_000)
    for text in [before, *meanwhile]:
        lea.sees(text)
    assert lea.texts() == [before, *meanwhile]
    assert lea.page.evaluate("window.__sameDocument"), "the page was reloaded"
    shifts = [shift for shift in lea.page.evaluate("window.__shifts") if shift["at"] > steady_since]
    assert shifts == [], f"the page moved while the connection was lost and back: {shifts}"


def test_unread_count_in_the_title_while_hidden(browser_room, people):
    # While Max's page is hidden, new messages show as a count in the title; it clears when the
    # page is shown again, and messages read while visible are not counted.
    max_ = people(browser_room, init_script=EMULATE_VISIBILITY)
    max_.page.evaluate("window.__setHidden(true)")
    for number in range(2):
        someone_says(browser_room, unique(f"while Max is away #{number}"))
    expect(max_.page).to_have_title(f"(2) {PAGE_TITLE}")

    max_.page.evaluate("window.__setHidden(false)")
    expect(max_.page).to_have_title(PAGE_TITLE)
    seen_id = someone_says(browser_room, unique("while Max is looking"))
    max_.caught_up(seen_id)
    expect(max_.page).to_have_title(PAGE_TITLE)


# Reading the room: older messages at the top, links, days, reading back while messages arrive, and
# the panel on the long-poll.

IN_LOS_ANGELES = {"timezone_id": "America/Los_Angeles", "locale": "en-US"}
MAX_ROWS = int(re.search(r"const MAX_ROWS = (\d+);", (ROOT / "index.html").read_text()).group(1))
SCROLL_LOG_TO_THE_TOP = """() => {
  const log = document.getElementById("log");
  log.scrollTop = 0;
  const row = log.querySelector("li[data-id]");
  // Its text: the row itself may lose its name line, joined to a group by older messages.
  return { id: row.dataset.id, top: row.querySelector(".text").getBoundingClientRect().top };
}"""
DAYS_AND_THEIR_FIRST_MESSAGE = """() => [...document.querySelectorAll("#messages li.day")].map(
  (day) => [day.textContent, Number(day.nextElementSibling.dataset.id)])"""
WATCH_THE_PANEL = """() => {
  window.__panelChanges = 0;
  new MutationObserver((records) => { window.__panelChanges += records.length; }).observe(
    document.getElementById("panel"),
    { subtree: true, childList: true, characterData: true, attributes: true });
}"""


def in_los_angeles(days_ago):
    """The date in Los Angeles `days_ago` days ago."""
    today = datetime.datetime.now(ZoneInfo(IN_LOS_ANGELES["timezone_id"])).date()
    return today - datetime.timedelta(days=days_ago)


def evening_in_los_angeles(days_ago, second=0):
    """8 pm in Los Angeles `days_ago` days ago, plus `second` s, in ms since 1970. In UTC it is
    already the next day: a page that counted days in UTC would put it under another one."""
    moment = datetime.datetime.combine(in_los_angeles(days_ago), datetime.time(20),
                                       ZoneInfo(IN_LOS_ANGELES["timezone_id"]))
    return int((moment + datetime.timedelta(seconds=second)).timestamp() * 1000)


def message_ids(page):
    return page.locator("#messages li[data-id]").evaluate_all(
        "rows => rows.map((row) => Number(row.dataset.id))")


def scroll_log(page, where):
    """Scroll the log ("top", "bottom", or a fraction of the way down) and wait until the page's
    own scroll handler has run, as after a reader's scrolling. Returns the new scrollTop."""
    return page.locator("#log").evaluate("""async (log, where) => {
        const end = log.scrollHeight - log.clientHeight;
        log.scrollTop = where === "top" ? 0 : where === "bottom" ? end : where * end;
        await new Promise((resolve) => requestAnimationFrame(() => setTimeout(resolve)));
        return log.scrollTop;
    }""", where)


def test_scrolling_to_the_top_brings_older_messages_in_place(start_server, people):
    # Wes, in Los Angeles, opens a room of 250 messages from before today and sees the latest 100.
    # At the top of the log the 100 before them come in above, and the message at the top stays
    # where it was on screen; at the top again, the first 50, and "This is the beginning of the
    # room." Each day's divider (the date, "Yesterday", as his clock counts days) stands just
    # before its first message, also where two pages met. None of it is read out, or chimes.
    server = start_server()
    store_messages(server, [(i, f"old message #{i}", evening_in_los_angeles(2 if i <= 130 else 1, i))
                            for i in range(1, 251)])
    wes = people(server, init_script=RECORD_CHIMES + RECORD_ANNOUNCEMENTS, **IN_LOS_ANGELES)
    page, rows, beginning = wes.page, wes.page.locator("#messages li[data-id]"), None
    beginning = page.locator("#beginning")
    expect(rows).to_have_count(100)
    for count in (200, 250):
        expect(beginning).to_be_hidden()
        place = page.evaluate(SCROLL_LOG_TO_THE_TOP)
        expect(rows).to_have_count(count)
        now_at = page.locator(f'#messages li[data-id="{place["id"]}"] .text').evaluate(
            "text => text.getBoundingClientRect().top")
        assert abs(now_at - place["top"]) < 1, \
            f"the message at the top jumped from {place['top']} to {now_at} px"
    expect(beginning).to_have_text("This is the beginning of the room.")
    expect(beginning).to_be_visible()
    assert message_ids(page) == list(range(1, 251)), "gaps, repeats or disorder"
    day = in_los_angeles(2)
    assert page.evaluate(DAYS_AND_THEIR_FIRST_MESSAGE) == [
        [f"{day:%A}, {day:%B} {day.day}, {day.year}", 1], ["Yesterday", 131]]
    heard = [text for region, text in wes.announced() if region == "log"]
    assert heard == [], f"older messages were read out as news: {heard[:2]}"
    assert wes.plays() == [], "older messages chimed"


def test_a_message_from_today_starts_a_new_day(start_server, people):
    # Xia opens a room whose two messages are from yesterday evening: "Yesterday" stands above
    # them. Someone says something now: "Today" stands just before it.
    server = start_server()
    store_messages(server, [(1, "late yesterday", evening_in_los_angeles(1)),
                            (2, "later still", evening_in_los_angeles(1, 60))])
    xia = people(server, **IN_LOS_ANGELES)
    xia.sees("later still")
    assert xia.page.evaluate(DAYS_AND_THEIR_FIRST_MESSAGE) == [["Yesterday", 1]]
    text = unique("this morning")
    message_id = someone_says(server, text)
    xia.sees(text)
    assert xia.page.evaluate(DAYS_AND_THEIR_FIRST_MESSAGE) == [["Yesterday", 1],
                                                               ["Today", message_id]]


def test_web_addresses_become_links_and_nothing_else_does(browser_room, people):
    # Yan's message has web addresses ending a sentence, in brackets, in quotes and in angle
    # brackets, a javascript: and a data: address, one that looks like a web address but is not
    # one (new URL() refuses it), and markup. Only the web addresses are links, without the
    # punctuation around them, each opening in a new tab that cannot reach back to the room; the
    # rest is text, exactly as typed.
    yan = people(browser_room)
    text = ('See https://example.com/a?b=1&c=2. (Or https://en.wikipedia.org/wiki/Foo_(bar)), '
            '"https://example.org/q" and <https://example.net/>; not javascript:alert(1), '
            'JavaScript://example.com/%0Aalert(1), data:text/html,<b>x</b>, https://[nope]/ nor '
            '<a href="javascript:window.__xss=1">this</a> ' + secrets.token_hex(3))
    yan.say(text)
    shown = yan.row(text).locator("p.text")
    expect(shown).to_have_text(text)
    links = shown.locator("a").evaluate_all(
        "links => links.map((a) => [a.getAttribute('href'), a.textContent, a.target, a.rel])")
    addresses = ["https://example.com/a?b=1&c=2", "https://en.wikipedia.org/wiki/Foo_(bar)",
                 "https://example.org/q", "https://example.net/"]
    assert links == [[address, address, "_blank", "noopener noreferrer nofollow"]
                     for address in addresses], links
    assert shown.locator(":not(a)").count() == 0, "the message made elements other than links"
    assert yan.page.evaluate("window.__xss") is None


def test_reading_back_is_not_yanked_and_the_newest_is_a_click_away(start_server, people):
    # Zoe (laptop), Abe (a 390x844 phone) and Ida (a tall narrow window, 600x1200) open a room of
    # 40 messages where three others are online. Each sees the newest message whole, and the next
    # one from someone else scrolls into view: in a narrow window the online list sits under the
    # log, and drawn after the messages it used to shorten the log, leaving it short of the
    # bottom. Abe's keyboard comes up (the window gets shorter): the newest stays in view.
    # Scrolled up, new messages leave the log where it is, and "2 new messages" appears at its
    # bottom; clicking it (Zoe presses Enter on it) shows the newest, and it goes, leaving the
    # keyboard on the newest message. Scrolling down to the bottom clears it too, and the next
    # time the count starts again from one.
    server = start_server()
    store_messages(server, [(i, f"earlier #{i}", int(time.time() * 1000)) for i in range(1, 41)])
    for _ in range(3):
        new_client(server).join()
    readers = [people(server, viewport={"width": 1100, "height": 700}),
               people(server, viewport={"width": 390, "height": 844}, is_mobile=True,
                      has_touch=True),
               people(server, viewport={"width": 600, "height": 1200})]
    for person in readers:
        expect(person.page.locator("#online li")).to_have_count(6)
        expect(person.row("earlier #40")).to_be_in_viewport(ratio=1)
    text = unique("at the bottom")
    someone_says(server, text)
    for person in readers:
        expect(person.row(text)).to_be_in_viewport(ratio=1)
    readers[1].page.set_viewport_size({"width": 390, "height": 500})
    expect(readers[1].row(text)).to_be_in_viewport(ratio=1)

    said = [unique("while they read back") for _ in range(2)]
    read_at = [scroll_log(person.page, 0.3) for person in readers]
    for text in said:
        last_id = someone_says(server, text)
    for person, scroll_top in zip(readers, read_at):
        person.sees(said[-1])
        jump = person.page.locator("#jump")
        expect(jump).to_have_text(re.compile(r"^2 new messages\b"))
        assert person.page.locator("#log").evaluate("log => log.scrollTop") == scroll_top, \
            "the log moved under someone reading back"
        expect(person.row(said[-1])).not_to_be_in_viewport()
        if person is readers[0]:
            jump.press("Enter")
            expect(person.row(said[-1])).to_be_focused()
        else:
            jump.click()
        expect(person.row(said[-1])).to_be_in_viewport(ratio=1)
        expect(jump).to_be_hidden()
        person.caught_up(last_id)

    for scroll_to in ("bottom", None):
        for person in readers:
            scroll_log(person.page, 0.3)
        text = unique("and one more")
        someone_says(server, text)
        for person in readers:
            jump = person.page.locator("#jump")
            expect(jump).to_have_text(re.compile(r"^1 new message\b"))
            if scroll_to:
                scroll_log(person.page, scroll_to)
                expect(jump).to_be_hidden()
                expect(person.row(text)).to_be_in_viewport(ratio=1)


def test_the_panel_shows_the_long_poll_at_work(start_full_server, people):
    # Bea opens "How this page talks to the server" (closed at first). It shows her poll open, the
    # seconds of its wait ticking; when someone posts, that poll's answer with the message it
    # carried and the new version, and her next poll open; her own post, and the rate limit.
    # Closed, it is not touched at all, yet shows on opening what happened meanwhile. It stays
    # open across a reload, and closed once closed.
    room = start_full_server(*ORIGINAL_LIMITS)  # a quiet room: no one else's comings and goings
    bea = people(room)
    page = bea.page
    panel, summary = page.locator("#panel"), page.locator("#panel summary")
    open_poll, waiting = page.locator("#panel-open"), page.locator("#panel-waiting")
    done = page.locator("#panel-done li")
    expect(panel).not_to_have_attribute("open", "")
    summary.click()
    expect(open_poll).to_have_text(re.compile(r"^GET /api/poll\?since=\d+$"))
    expect(waiting).to_have_text(re.compile(r"^, waiting [1-9]\d*\ss…$"))  # it has ticked
    message_id = someone_says(room, unique("for Bea's panel"))
    expect(done.filter(has_text=f"version {message_id}")).to_have_text(re.compile(
        rf"^GET /api/poll\?since=\d+ answered after [\d.]+\sm?s: 1 new message, "
        rf"version {message_id}$"))
    expect(open_poll).to_have_text(re.compile(r"^GET /api/poll\?since=\d+$"))
    assert int(open_poll.text_content().split("=")[1]) >= message_id
    bea.say(unique("Bea posts"))
    expect(done.filter(has_text="POST").first).to_have_text(
        re.compile(r"^POST /api/messages: 201 in \d+\sms$"))
    hit_the_rate_limit(bea)
    # The messages held back are sent again by themselves, and may meet the limit again.
    expect(done.filter(has_text="429").first).to_have_text(
        re.compile(r"^POST /api/messages: 429: wait \d+\ss$"))

    summary.click()
    expect(panel).not_to_have_attribute("open", "")
    page.evaluate(WATCH_THE_PANEL)
    closed_at = page.evaluate("performance.now()")
    quiet_id = someone_says(room, unique("while Bea's panel is closed"))
    bea.caught_up(quiet_id)
    wait_until(lambda: page.evaluate("performance.now()") > closed_at + 1100,
               message="the panel's tick to have come, had it been running")
    assert page.evaluate("window.__panelChanges") == 0, "the closed panel was drawn"
    summary.click()
    expect(done.filter(has_text=f"version {quiet_id}")).to_have_count(1)

    bea.reload()
    expect(panel).to_have_attribute("open", "")
    expect(open_poll).to_have_text(re.compile(r"^GET /api/poll"))
    summary.click()
    bea.reload()
    expect(panel).not_to_have_attribute("open", "")


def test_a_long_page_keeps_its_size_bounded(start_server, people):
    # Cal's page is open while MAX_ROWS + 500 messages come in (after a restart, in batches, as
    # to a page that was away): it holds MAX_ROWS of them, the newest in view. Back at the top,
    # the dropped ones come back a page at a time, and the newest go instead; "Newest messages"
    # brings those back.
    server = start_server()
    cal = people(server)
    count = MAX_ROWS + 500
    store_messages(server, [(i, f"one of many #{i}", int(time.time() * 1000))
                            for i in range(1, count + 1)], same_port=True)
    # The page finds the server again by itself (its first retry comes after about a second).
    expect(cal.row(f"one of many #{count}")).to_have_count(1, timeout=15_000)
    rows = cal.page.locator("#messages li[data-id]")
    expect(cal.row(f"one of many #{count}")).to_be_in_viewport()
    assert message_ids(cal.page) == list(range(count - MAX_ROWS + 1, count + 1))
    scroll_log(cal.page, "top")
    expect(cal.row(f"one of many #{count - MAX_ROWS}")).to_have_count(1)
    expect(rows).to_have_count(MAX_ROWS)
    assert message_ids(cal.page)[0] == count - MAX_ROWS - 100 + 1
    jump = cal.page.locator("#jump")
    expect(jump).to_have_text(re.compile(r"^Newest messages\b"))
    jump.click()
    expect(cal.row(f"one of many #{count}")).to_be_in_viewport()
    expect(jump).to_be_hidden()
    assert message_ids(cal.page) == list(range(count - 100 + 1, count + 1))


def test_a_normal_visit_has_no_errors(browser_room, people):
    # Nia and Oto load the page, chat and rename: no console error (CSP violations included),
    # no uncaught error, no failed request and no error answer.
    page_answer = Client(browser_room).request("GET", "/")
    assert "script-src 'sha256-" in page_answer.headers["Content-Security-Policy"], \
        "without a CSP, 'no CSP violations' would prove nothing"
    nia, oto = people(browser_room, init_script=RECORD_CHIMES), people(browser_room)
    hello = unique("Nia says hi")
    nia.say(hello)
    oto.sees(hello)
    answer = unique("Oto answers")
    answer_id = oto.say(answer)
    nia.sees(answer)
    assert [play for play in nia.settled_plays() if play["outcome"] == "played"], nia.plays()
    name = unique("Nia")
    nia.rename(name)
    expect(online_entry(oto.page, name)).to_have_count(1)
    nia.caught_up(answer_id)
    assert nia.problems == [] and oto.problems == [], nia.problems + oto.problems


def assert_fits_width(page, width):
    """Nothing scrolls sideways: not the page, and not a region inside it (the log, the sidebar)."""
    too_wide = page.evaluate("""width => {
        const found = [];
        if (document.documentElement.scrollWidth > width) found.push("the page");
        for (const element of document.querySelectorAll("header, #log, #composer, aside")) {
            if (element.scrollWidth > element.clientWidth + 1) {
                found.push(element.localName + (element.id ? "#" + element.id : ""));
            }
        }
        return found;
    }""", width)
    assert too_wide == [], f"wider than the {width} px screen: {too_wide}"


def test_phone_layout_fits_and_keeps_the_box_in_view(browser_room, people, tmp_path):
    # On a 375x667 phone nothing scrolls sideways, even with long words and names, and the
    # message box and Send stay on screen; screenshots of both layouts go to tmp_path.
    poster = new_client(browser_room)
    poster.join()
    assert poster.rename("W" * 40).status == 200
    long_text = unique("https://example.com/" + "a" * 300)
    assert poster.post(long_text).status == 201
    phone = people(browser_room, viewport={"width": 375, "height": 667}, is_mobile=True,
                   has_touch=True)
    desktop = people(browser_room, viewport={"width": 1280, "height": 800})
    for person in (phone, desktop):
        person.sees(long_text)
        person.rename("N" * 40)
    phone.page.screenshot(path=tmp_path / "phone.png")
    desktop.page.screenshot(path=tmp_path / "desktop.png")

    assert_fits_width(phone.page, 375)
    for selector in ("#text", "#send"):
        expect(phone.page.locator(selector)).to_be_in_viewport(ratio=1)
    phone.page.locator("#text").tap()
    text = unique("sent from a phone")
    phone.say(text)
    expect(phone.page.locator("#text")).to_be_in_viewport(ratio=1)
    assert_fits_width(phone.page, 375)


def test_zoomed_in_the_page_scrolls_as_a_whole(browser_room, people):
    # Rae reads at 400% zoom (a 320x256 window): the page scrolls as a whole and the log keeps
    # most of the window, instead of being squeezed to a line; nothing scrolls sideways, and she
    # can still reach the box and post.
    rae = people(browser_room, viewport={"width": 320, "height": 256})
    someone_says(browser_room, unique("for Rae, zoomed in"))
    sizes = rae.page.evaluate("({ log: document.getElementById('log').clientHeight, "
                              "page: document.documentElement.scrollHeight })")
    assert sizes["log"] >= 256 / 2, f"the log has {sizes['log']} px of a 256 px window"
    assert sizes["page"] > 256, "the page does not scroll, so something had to be squeezed"
    assert_fits_width(rae.page, 320)
    rae.say(unique("Rae, zoomed in, posts"))
    expect(rae.page.locator("#text")).to_be_in_viewport()


def test_opening_the_page_fetches_little_and_finishes(browser_room, people):
    # Opening the page brings it gzip-compressed and not the chime (fetched when first needed),
    # and polls go at low priority: an open poll is not the page still loading. A reload asks
    # whether the page changed, and is told no with a 304.
    sam = people(browser_room)
    loaded = sam.page.evaluate("performance.getEntriesByType('navigation')[0].toJSON()")
    assert loaded["encodedBodySize"] < loaded["decodedBodySize"] / 2, f"not compressed: {loaded}"
    session = sam.context.new_cdp_session(sam.page)
    sent, statuses = {}, {}  # request id -> (path, priority); request id -> status on the wire
    session.on("Network.requestWillBeSent", lambda event: sent.setdefault(event["requestId"], (
        urlsplit(event["request"]["url"]).path, event["request"]["initialPriority"])))
    session.on("Network.responseReceivedExtraInfo", lambda event: statuses.setdefault(
        event["requestId"], event["statusCode"]))
    session.send("Network.enable")
    sam.reload()
    sam.caught_up(someone_says(browser_room, unique("for Sam")))
    polls = [priority for path, priority in sent.values() if path == "/api/poll"]
    assert len(polls) >= 2 and set(polls) <= {"Low", "VeryLow"}, sent
    reloads = [statuses.get(request) for request, (path, _) in sent.items() if path == "/"]
    assert reloads == [304], (reloads, sent, statuses)
    assert "/chime.wav" not in sam.requested, sam.requested


def colour_ratio(first, second):
    """WCAG's contrast ratio of two computed colours, "rgb(r, g, b)" (1 to 21)."""
    def luminance(colour):
        channels = [int(value) / 255 for value in re.findall(r"\d+", colour)[:3]]
        linear = [c / 12.92 if c <= 0.04045 else ((c + 0.055) / 1.055) ** 2.4 for c in channels]
        return 0.2126 * linear[0] + 0.7152 * linear[1] + 0.0722 * linear[2]
    light, dark = sorted((luminance(first), luminance(second)), reverse=True)
    return (light + 0.05) / (dark + 0.05)


# The colours of the page that axe-core does not check, each with what lies behind it:
# [what, colour, background, ratio it needs]. Focus rings and borders of text boxes mark controls
# (3:1, WCAG 1.4.11); a placeholder is text (4.5:1).
MARKS_OF_CONTROLS = """() => {
  const behind = (element) => {  // the colour under an element: the nearest one painted
    for (let at = element; at; at = at.parentElement) {
      const colour = getComputedStyle(at).backgroundColor;
      if (colour !== "rgba(0, 0, 0, 0)") return colour;
    }
    return "rgb(255, 255, 255)";
  };
  const style = (element) => getComputedStyle(element);
  const box = document.getElementById("text"), field = document.getElementById("name-input");
  const pairs = [
    ["message box border", style(box).borderTopColor, behind(box.parentElement), 3],
    ["name field border", style(field).borderTopColor, behind(field.parentElement), 3],
    ["placeholder", getComputedStyle(box, "::placeholder").color, behind(box), 4.5],
  ];
  for (const button of document.querySelectorAll("button")) {
    pairs.push([`#${button.id} edge`, style(button).borderTopColor,
                behind(button.parentElement), 3]);
  }
  return pairs;
}"""
FOCUS_RING = """() => {
  const element = document.activeElement;
  // Drawn outside the element, it lies on the parent's background; drawn inside, on its own.
  let under = getComputedStyle(element).outlineOffset.startsWith("-") ? element
                                                                     : element.parentElement;
  while (getComputedStyle(under).backgroundColor === "rgba(0, 0, 0, 0)" && under.parentElement) {
    under = under.parentElement;
  }
  const what = element.id ? `#${element.id}` : "a message row";
  return [`focus ring of ${what}`, getComputedStyle(element).outlineColor,
          getComputedStyle(under).backgroundColor, 3];
}"""


@pytest.mark.parametrize("scheme", ["light", "dark"])
def test_focus_rings_and_borders_stand_out(browser_room, people, scheme):
    # In the light and the dark theme, the focus ring on everything Tab reaches, the borders of
    # the text boxes and buttons, and the placeholder stand out from what is behind them by the
    # ratios WCAG asks (axe-core checks the text). The dark theme is dark.
    una = people(browser_room, color_scheme=scheme)
    page = una.page
    background = page.evaluate("getComputedStyle(document.documentElement).backgroundColor")
    assert (colour_ratio(background, "rgb(0, 0, 0)") < 2) == (scheme == "dark"), background
    page.locator("#name-button").click()  # the name field is drawn only while the editor is open
    pairs = page.evaluate(MARKS_OF_CONTROLS)
    page.locator("#name-input").press("Escape")
    page.locator("h1").click()
    for _ in ("log", "text", "send", "chime", "name-button"):
        page.keyboard.press("Tab")
        pairs.append(page.evaluate(FOCUS_RING))
    weak = [f"{what}: {colour} on {under} is {colour_ratio(colour, under):.2f}:1, needs {needed}"
            for what, colour, under, needed in pairs if colour_ratio(colour, under) < needed]
    assert weak == [], weak


# axe-core's rules for WCAG 2.0, 2.1 and 2.2 at levels A and AA, and its best practices.
AXE_RULES = ["wcag2a", "wcag2aa", "wcag21a", "wcag21aa", "wcag22aa", "best-practice"]


def start_axe(page):
    """Start axe-core's audit of the page as it is now; axe_violations(page) waits for it.

    Started on every page before any is waited for, the audits run side by side.
    """
    if not page.evaluate("'axe' in window"):
        page.evaluate(Axe().axe_script)  # axe-core itself, once per page
    page.evaluate("rules => { window.__audit = axe.run(document, "
                  "{ runOnly: { type: 'tag', values: rules }, resultTypes: ['violations'] }); }",
                  AXE_RULES)


def axe_violations(page):
    """The findings of the audit start_axe(page) started, one line per rule broken."""
    return [f"{rule['id']} ({rule['help']}): "
            + ", ".join(" ".join(node["target"]) for node in rule["nodes"])
            for rule in page.evaluate("window.__audit")["violations"]]


def hit_the_rate_limit(person):
    """Post until the room says to slow down (the third with the original limits, the sixth with
    the default ones)."""
    box, notice = person.page.locator("#text"), person.page.locator("#notice-text")
    sent_or_refused = person.page.locator("#text:placeholder-shown, #notice-text:not(:empty)")
    for number in range(8):
        box.fill(f"Quick message #{number}")
        box.press("Enter")
        expect(sent_or_refused).not_to_have_count(0)
        if notice.text_content():
            break
    expect(notice).to_contain_text("Slow down")


def test_axe_finds_nothing_in_any_state(start_server, people):
    # axe-core audits the page in six states (an empty room, messages, the name editor open, the
    # rate-limit notice shown, reading back at the top of the log, with links, days, "1 new
    # message" and the panel on the long-poll open, and back from a time away: the away marker, a
    # mention, a group, a rename notice, a message waiting to be sent, a draft over the limit and
    # the connection lost), on a laptop and a phone, in the light and the dark theme: it finds
    # no violation.
    if Axe is None:
        browser_unavailable("axe-playwright-python is not installed")
    server = start_server()
    # axe-core is injected as a script, which the page's Content-Security-Policy refuses: these
    # contexts bypass the policy, and serve this audit only (the CSP is tested on normal ones).
    screens = {f"{width}x{height} {scheme}": people(
                   server, bypass_csp=True, color_scheme=scheme, init_script=EMULATE_VISIBILITY,
                   viewport={"width": width, "height": height})
               for width, height in ((1100, 700), (390, 844)) for scheme in ("light", "dark")}
    found = {}

    def audit(state):
        for person in screens.values():
            start_axe(person.page)
        for screen, person in screens.items():
            violations = axe_violations(person.page)
            if violations:
                found[f"{state}, {screen}"] = violations

    audit("empty room")
    someone_says(server, "Hello from someone who is not here")
    for screen, person in screens.items():
        person.say(f"Hello from the {screen} screen")
    audit("messages")
    for person in screens.values():
        person.open_side()
        person.page.locator("#name-button").click()
        expect(person.page.locator("#name-input")).to_be_focused()
    audit("name editor open")
    for person in screens.values():
        person.page.locator("#name-input").press("Escape")
        hit_the_rate_limit(person)
    audit("rate-limit notice")
    for number in range(10):
        someone_says(server, f"Earlier, #{number}: see https://example.com/{number}.")
    for person in screens.values():
        person.open_side()
        person.page.locator("#panel summary").click()
        scroll_log(person.page, "top")
        expect(person.page.locator("#beginning")).to_be_visible()
    someone_says(server, "News for those reading back")
    for person in screens.values():
        expect(person.page.locator("#jump")).to_be_visible()
        expect(person.page.locator("#panel-done li")).not_to_have_count(0)
    audit("reading back, the panel open")

    for person in screens.values():
        person.close_side()
        person.page.evaluate("window.__setHidden(true)")
    for person in screens.values():
        someone_says(server, f"@{person.my_name()} are you there?")
    grouper = new_client(server)
    for text in ("One of two in a row", "Two of two in a row"):
        assert grouper.post(text).status == 201
    for person in screens.values():
        person.sees("Two of two in a row")
        person.page.evaluate("window.__setHidden(false)")
        person.page.locator("#messages li.mentions-me").first.scroll_into_view_if_needed()
        expect(person.page.locator("#messages .away")).to_have_count(1)
        expect(person.page.locator("#messages li.continued")).not_to_have_count(0)
        person.page.locator("#text").fill("x" * 2001)
        expect(person.page.locator("#length")).to_have_class("over")
    server.stop()
    for person in screens.values():
        expect(person.page.locator("#retry")).to_be_visible()
        person.page.locator("#text").fill("Waiting to be sent")
        person.page.locator("#text").press("Enter")
        expect(person.page.locator("#outbox li")).not_to_have_count(0)
        person.page.locator("#text").fill("x" * 2001)
        # A rename notice, as the server is to send them, drawn by the page's own code.
        person.page.evaluate("""() => showMessages([{ id: 1e9, user: "0123456789abcdef",
            name: "Frances", text: "Guest 3115 is now Frances", time: Date.now(),
            kind: "rename", old_name: "Guest 3115" }])""")
    audit("back from a time away, the connection lost")
    assert found == {}, "\n".join(f"{where}: {line}" for where, lines in found.items()
                                  for line in lines)


def assert_visibly_focused(page):
    """Check that the focused element shows a focus ring; returns its id ("log" for a message)."""
    focused = page.evaluate("""() => {
        const element = document.activeElement;
        const id = element.closest("#log") ? "log" : element.id;
        return { id, visible: element.matches(":focus-visible"),
                 outline: getComputedStyle(element).outlineStyle };
    }""")
    assert focused["visible"] and focused["outline"] != "none", \
        f"#{focused['id']} has the focus but does not show it: {focused}"
    return focused["id"]


def test_keyboard_only(browser_room, people):
    # Pia uses only the keyboard: Tab reaches the message log (a message), the message box,
    # Send, the chime setting and her name in that order, each visibly focused and named; the
    # name editor works by keyboard.
    said = unique("for Pia to read")  # an empty log has nothing to stop at
    someone_says(browser_room, said)
    pia = people(browser_room)
    pia.sees(said)
    page = pia.page
    page.locator("h1").click()  # start from the top of the page, as after loading
    wanted = ["log", "text", "send", "chime", "name-button"]
    visited = []
    while "name-button" not in visited and len(visited) < 10:
        page.keyboard.press("Tab")
        visited.append(assert_visibly_focused(page))
        if visited[-1] in wanted:
            expect(page.locator("#" + visited[-1])).to_have_accessible_name(re.compile(r"\w"))
    order = [element for element in visited if element in wanted]
    assert order == wanted, f"Tab visits {visited}, expected {wanted} in this order"

    # The name button's accessible name contains the name it shows (WCAG "label in name").
    name_button = page.locator("#name-button")
    expect(name_button).to_have_accessible_name(re.compile(re.escape(pia.my_name())))
    page.keyboard.press("Enter")
    field = page.locator("#name-input")
    expect(field).to_be_focused()
    expect(field).to_have_accessible_name("Your name")
    assert_visibly_focused(page)
    name = unique("Pia")
    page.keyboard.press("ControlOrMeta+a")
    page.keyboard.type(name)
    page.keyboard.press("Enter")
    expect(name_button).to_be_focused()
    expect(name_button).to_have_accessible_name(re.compile(re.escape(name)))


def accessible_texts(page):
    """Every name in Chromium's accessibility tree: all the text a screen reader can reach."""
    session = page.context.new_cdp_session(page)
    try:
        nodes = session.send("Accessibility.getFullAXTree")["nodes"]
    finally:
        session.detach()
    return [node.get("name", {}).get("value", "") for node in nodes if not node.get("ignored")]


def test_what_a_screen_reader_hears(browser_room, people):
    # Quinn listens with a screen reader. The history on the page when it opens is not read out;
    # each new message is, with its sender's name and time apart; "Connected" is said once, not
    # on every answer; the green dots are not read; the name editor's hint and error belong to
    # its field, which says when what was typed is refused.
    history = unique("said before Quinn came")
    someone_says(browser_room, history)
    quinn = people(browser_room, init_script=RECORD_ANNOUNCEMENTS)
    page = quinn.page
    quinn.sees(history)
    news = [unique(f"news for Quinn #{number}") for number in range(3)]
    for text in news:
        quinn.caught_up(someone_says(browser_room, text))
    said = quinn.announced()
    logged = [text for region, text in said if region == "log"]
    assert not any(history in text for text in logged), "the history was read out as news"
    for text in news:
        assert [entry for entry in logged if entry.endswith(text)], f"{text!r} was not read out"
    assert [text for region, text in said if region == "connection-said"] == ["Connected"], said
    meta = quinn.row(news[0]).locator(".meta")
    assert re.fullmatch(r"Guest \d+\s+\S.*", meta.text_content()), \
        f"name and time run together: {meta.text_content()!r}"
    dots = [text for text in accessible_texts(page) if "\u25cf" in text]
    assert dots == [], f"the decorative dots are read out: {dots}"

    page.locator("#name-button").click()
    field = page.locator("#name-input")
    expect(field).to_have_accessible_description("Enter saves, Escape cancels.")
    expect(field).not_to_have_attribute("aria-invalid", "true")
    field.fill("   ")
    field.press("Enter")
    expect(page.locator("#name-notice")).to_have_text("The name is empty.")
    expect(field).to_have_attribute("aria-invalid", "true")
    expect(field).to_have_accessible_description(
        re.compile(r"Escape cancels\. The name is empty\."))
    field.press("Escape")
    page.locator("#name-button").click()
    expect(field).not_to_have_attribute("aria-invalid", "true")
    expect(field).to_have_accessible_description("Enter saves, Escape cancels.")


# What a small group met in three days of daily use, each with the test that keeps it fixed.

def test_the_focus_stays_in_the_box_after_send(browser_room, people):
    # Ray sends by clicking Send, by Tab to Send and Space, and on his phone by tapping Send: each
    # time the message goes and the focus is back in the box (never on the page's body), so he
    # types on; on the phone the box never loses the focus at all, so the keyboard stays up.
    ray = people(browser_room)
    box, send = ray.page.locator("#text"), ray.page.locator("#send")
    for how in ("click", "space"):
        text = unique(f"Ray sends by {how}")
        box.fill(text)
        if how == "click":
            send.click()
        else:
            box.press("Tab")
            expect(send).to_be_focused()
            ray.page.keyboard.press("Space")
        ray.sees(text)
        expect(box).to_be_focused()
        ray.page.keyboard.type("x")
        expect(box).to_have_value("x")
        box.fill("")
    phone = people(browser_room, viewport={"width": 390, "height": 844}, is_mobile=True,
                   has_touch=True)
    phone_box = phone.page.locator("#text")
    phone_box.tap()
    phone.page.evaluate("""() => { window.__blurs = 0;
        document.getElementById("text").addEventListener("blur", () => window.__blurs++); }""")
    text = unique("Ray taps Send")
    phone_box.fill(text)
    phone.page.locator("#send").tap()
    phone.sees(text)
    expect(phone_box).to_be_focused()
    assert phone.page.evaluate("window.__blurs") == 0, "tapping Send took the focus from the box"


FOCUSED = """() => { const at = document.activeElement;
    const row = at.closest("li[data-id]");
    return { tag: at.localName, id: at.id, row: row ? Number(row.dataset.id) : null }; }"""


def test_the_log_is_one_tab_stop_with_arrow_keys_inside(start_server, people):
    # Sol's room holds 40 messages, each with a link. From the top of the page, one Tab enters the
    # log on the newest message, the next reaches that message's link and the one after the
    # message box: not 40 links. The log does not scroll back on the way. Inside the log the arrow
    # keys, Home and End move between messages, Enter goes to a message's link and Escape back;
    # Shift+Tab from the box comes back the same way. "1 new message" leaves him on the newest.
    server = start_server()
    store_messages(server, [(i, f"link #{i}: https://example.com/{i}", int(time.time() * 1000))
                            for i in range(1, 41)])
    sol = people(server, viewport={"width": 1280, "height": 800})
    page = sol.page
    expect(sol.row("link #40: https://example.com/40")).to_be_in_viewport()
    page.locator("h1").click()
    stops = []
    for _ in range(6):
        page.keyboard.press("Tab")
        stops.append(page.evaluate(FOCUSED))
        if stops[-1]["id"] == "text":
            break
    assert stops == [{"tag": "li", "id": "", "row": 40}, {"tag": "a", "id": "", "row": 40},
                     {"tag": "textarea", "id": "text", "row": None}], stops
    expect(sol.row("link #40: https://example.com/40")).to_be_in_viewport()
    page.keyboard.press("Shift+Tab")
    page.keyboard.press("Shift+Tab")
    assert page.evaluate(FOCUSED) == {"tag": "li", "id": "", "row": 40}
    assert_visibly_focused_row(page)
    for key, row in (("ArrowUp", 39), ("ArrowUp", 38), ("ArrowDown", 39), ("End", 40),
                     ("Home", 1), ("ArrowDown", 2)):
        page.keyboard.press(key)
        assert page.evaluate(FOCUSED)["row"] == row, f"{key} did not reach message {row}"
        expect(page.locator(f'#messages li[data-id="{row}"]')).to_be_in_viewport()
    page.keyboard.press("Enter")
    assert page.evaluate(FOCUSED) == {"tag": "a", "id": "", "row": 2}
    page.keyboard.press("Escape")
    assert page.evaluate(FOCUSED) == {"tag": "li", "id": "", "row": 2}
    tab_stops = page.locator("#log [tabindex='0']").evaluate_all(
        "stops => stops.map((stop) => stop.localName)")
    assert tab_stops == ["li", "a"], f"the log's Tab stops: {tab_stops}"

    news = unique("news for Sol")
    news_id = someone_says(server, news)
    jump = page.locator("#jump")
    expect(jump).to_be_visible()
    jump.press("Enter")
    expect(sol.row(news)).to_be_in_viewport()
    assert page.evaluate(FOCUSED) == {"tag": "li", "id": "", "row": news_id}


def assert_visibly_focused_row(page):
    """Check that the focused message row shows a focus ring."""
    shown = page.evaluate("""() => { const at = document.activeElement;
        return at.matches(":focus-visible") && getComputedStyle(at).outlineStyle !== "none"; }""")
    assert shown, "the focused message shows no focus ring"


TAG_OF = """(element) => { const tag = element.querySelector(".tag");
    return { text: tag.innerText, title: tag.title, colour: getComputedStyle(tag).color }; }"""


def test_two_people_with_one_name_are_told_apart(browser_room, people):
    # Two people call themselves Sam, and a third writes her name in Hebrew. Each message and each
    # entry of the online list shows, after the name, the start of the sender's public id in a
    # colour of their own (readable: 4.5:1), the whole id on hover and while the keyboard is on
    # the message; the two Sams' tags differ. The Hebrew name sits in a <bdi>, so its tag and
    # time stay after it instead of being drawn into its right-to-left order.
    first, second, third = people(browser_room), people(browser_room), people(browser_room)
    ids = {}
    for person, name in ((first, "Sam"), (second, "Sam"), (third, "\u05e9\u05dc\u05d5\u05dd")):
        person.rename(name)
        text = unique(f"{name} speaks")
        person.say(text)
        ids[person] = (text, person.page.evaluate(
            "fetch('/api/poll').then((response) => response.json()).then((a) => a.you.id)"))
    for person, (text, public_id) in ids.items():
        assert re.fullmatch(r"[0-9a-f]{16}", public_id), public_id
        third.sees(text)
        row = third.row(text)
        tag = row.evaluate(TAG_OF)
        assert tag["text"] == public_id[:4], (tag, public_id)
        assert public_id in tag["title"], tag
        background = third.page.evaluate(
            "getComputedStyle(document.documentElement).backgroundColor")
        assert colour_ratio(tag["colour"], background) >= 4.5, tag
        shown = row.locator(".tag")
        row.hover()
        expect(shown).to_have_js_property("innerText", public_id)
        third.page.locator("h1").hover()
        expect(shown).to_have_js_property("innerText", public_id[:4])
        row.focus()
        expect(shown).to_have_js_property("innerText", public_id)
        entry = third.page.locator("#online li", has=third.page.locator(
            f'.tag[title="Public id {public_id}"]'))
        expect(entry).to_have_count(1)
    sams = [third.row(ids[person][0]).evaluate(TAG_OF) for person in (first, second)]
    assert sams[0]["text"] != sams[1]["text"], sams
    hebrew = third.row(ids[third][0])
    assert hebrew.locator(".name").evaluate("name => name.localName") == "bdi"
    name_box = hebrew.locator(".name").bounding_box()
    tag_box = hebrew.locator(".tag").bounding_box()
    assert tag_box["x"] >= name_box["x"] + name_box["width"], (name_box, tag_box)


def test_an_outage_is_counted_down_said_once_and_retried_at_will(start_server, people):
    # The server stops under Tia's page. A screen reader hears "Connection lost." once, not every
    # retry; the status counts down to the next retry, second by second, never from more than 5 s;
    # the online list is greyed and its count unknown. Tia presses "Retry now": the page asks at
    # once. The server comes back: the page says "Connected again." once, lists who is online,
    # and the keyboard, left on the button that went, goes on in the message box.
    server = start_server()
    tia = people(server, init_script=RECORD_ANNOUNCEMENTS)
    page, status = tia.page, tia.page.locator("#status")
    retry = page.locator("#retry")
    expect(retry).to_be_hidden()
    server.stop()
    expect(status).to_contain_text("Connection lost")
    expect(page.locator("#online")).to_have_class("stale")
    expect(page.locator("#online-count")).to_have_text("unknown")
    expect(retry).to_be_visible()
    seen = []  # the seconds shown, in the order they were
    deadline = time.monotonic() + 12  # long enough for the wait to reach its cap
    while time.monotonic() < deadline:
        found = re.search(r"Retrying in (\d+) s", status.text_content())
        if found and (not seen or seen[-1] != int(found.group(1))):
            seen.append(int(found.group(1)))
        time.sleep(0.1)
    assert max(seen) <= 5, f"waits longer than 5 s: {seen}"
    assert any(later == earlier - 1 for earlier, later in zip(seen, seen[1:])), \
        f"the countdown does not tick: {seen}"

    wait_until(lambda: re.search(r"Retrying in [3-9] s", status.text_content()),
               timeout=15, message="a wait of 3 s or more")
    retry.focus()
    with page.expect_request(lambda request: request.url.split("?")[0].endswith("/api/poll"),
                             timeout=1500):
        page.keyboard.press("Enter")  # at once, not when the wait ends

    server.start(server.port)
    expect(status).to_have_text("Connected", timeout=10_000)
    expect(retry).to_be_hidden()
    expect(page.locator("#text")).to_be_focused()
    expect(page.locator("#online")).not_to_have_class("stale")
    expect(page.locator("#online-count")).to_have_text(re.compile(r"^\d+$"))
    said = tia.announced()
    assert said == [("connection-said", "Connected"), ("connection-said", "Connection lost."),
                    ("connection-said", "Connected again.")], said


def test_a_phone_gives_the_log_its_height_and_keeps_the_box_in_view(browser_room, people):
    # Uma's phone (390x844): the log takes most of the height; the people and settings are a
    # sheet behind the "People" button (Escape closes it, back on the button). With the keyboard
    # up (390x560) the log keeps most of what is left, and at 390x480 the message box and Send
    # are whole on screen. A notice of two lines does not move the box; a draft of six lines
    # shows whole, the box grown to hold it (four of them with the keyboard up).
    uma = people(browser_room, viewport={"width": 390, "height": 844}, is_mobile=True,
                 has_touch=True)
    page = uma.page
    assert "interactive-widget=resizes-content" in page.locator(
        "meta[name=viewport]").get_attribute("content")
    log = page.locator("#log")
    for width, height, share in ((390, 844, 0.75), (390, 560, 0.65), (390, 480, 0.6)):
        page.set_viewport_size({"width": width, "height": height})
        log_height = log.evaluate("log => log.getBoundingClientRect().height")
        assert log_height >= share * height, f"the log has {log_height} of {height} px"
        for selector in ("#text", "#send"):
            expect(page.locator(selector)).to_be_in_viewport(ratio=1)
    expect(page.locator("#online")).to_be_hidden()
    toggle = page.locator("#people-toggle")
    expect(toggle).to_have_attribute("aria-expanded", "false")
    toggle.click()
    expect(page.locator("#online")).to_be_visible()
    expect(toggle).to_have_attribute("aria-expanded", "true")
    page.keyboard.press("Escape")
    expect(page.locator("#online")).to_be_hidden()
    expect(toggle).to_be_focused()

    box = page.locator("#text")
    before = box.bounding_box()
    page.locator("#notice-text").evaluate(
        "notice => { notice.textContent = 'A notice long enough to take two lines on a phone, "
        "as some of them do.'; }")
    assert page.locator("#notice").evaluate("notice => notice.clientHeight") > 30, \
        "the notice did not take two lines, so this proves nothing"
    assert box.bounding_box() == before, "a notice of two lines moved the message box"
    box.fill("\n".join(f"line {number}" for number in range(1, 7)))
    for height, lines in ((844, 6), (560, 4)):
        page.set_viewport_size({"width": 390, "height": height})
        shown = box.evaluate("""box => { const style = getComputedStyle(box);
            const padding = parseFloat(style.paddingTop) + parseFloat(style.paddingBottom);
            return (box.clientHeight - padding) / parseFloat(style.lineHeight); }""")
        assert shown >= lines - 0.1, f"at 390x{height} the box shows {shown:.1f} lines of 6"
        for selector in ("#text", "#send"):
            expect(page.locator(selector)).to_be_in_viewport(ratio=1)


def test_times_in_the_readers_own_way_and_a_long_name_keeps_its_dot(start_server, people):
    # Vic in Los Angeles (en-US) reads a message sent at 8 pm as "8:00 PM", not "08:00 PM";
    # Wyn in London (en-GB) reads it as her clock does. A name of 40 letters in the online list
    # wraps beside its green dot instead of leaving the dot alone on the first line.
    server = start_server()
    store_messages(server, [(1, "said at eight", evening_in_los_angeles(1))])
    vic = people(server, **IN_LOS_ANGELES)
    wyn = people(server, timezone_id="Europe/London", locale="en-GB")
    expect(vic.row("said at eight").locator("time")).to_have_text("8:00 PM")
    london = datetime.datetime.fromtimestamp(evening_in_los_angeles(1) / 1000,
                                             ZoneInfo("Europe/London"))
    expect(wyn.row("said at eight").locator("time")).to_have_text(f"{london:%H:%M}")
    vic.rename("W" * 40)
    entry = vic.page.locator("#online li.you")
    lines = entry.evaluate("""item => {
        const name = item.querySelector(".name").getClientRects();
        return { first: name[0].top - item.getBoundingClientRect().top, count: name.length,
                 height: name[0].height }; }""")
    assert lines["first"] < lines["height"] / 2, f"the name starts below its dot: {lines}"


def test_a_long_paste_is_never_cut_and_the_limit_is_said(browser_room, people):
    # Xan pastes 2,345 characters (the limit is 2,000): all of them stay in the box, a counter
    # shows "2,345 / 2,000", and a notice says the message is 345 characters over and that
    # nothing was cut; Enter sends nothing. Cut to exactly 2,000, the notice goes and the whole
    # message is sent. Near the limit the counter shows; well under it, it does not.
    xan = people(browser_room)
    xan.context.grant_permissions(["clipboard-read", "clipboard-write"])
    page, box = xan.page, xan.page.locator("#text")
    length, notice = page.locator("#length"), page.locator("#notice-text")
    words = " ".join(f"word{number:04d}" for number in range(300))[:2000 - 7]
    pasted = words + " " + secrets.token_hex(3) + " and the end of it, cut mid-word by the old page"
    pasted += "x" * (2345 - len(pasted))
    page.evaluate("text => navigator.clipboard.writeText(text)", pasted)
    box.focus()
    page.keyboard.press("ControlOrMeta+V")
    expect(box).to_have_value(pasted)
    expect(length).to_be_visible()
    expect(length).to_have_text("2,345 / 2,000")
    expect(notice).to_have_text("With what you pasted, the message is 345 characters over the "
                                "limit of 2,000. Nothing was cut: shorten it to send it.")
    expect(box).to_have_attribute("aria-invalid", "true")
    box.press("Enter")
    expect(box).to_have_value(pasted)
    expect(xan.row(pasted)).to_have_count(0)

    box.fill(pasted[:2000])
    expect(notice).to_have_text("")
    expect(length).to_have_text("2,000 / 2,000")
    box.press("Enter")
    xan.sees(pasted[:2000])
    expect(length).to_be_hidden()
    box.fill("short")
    expect(length).to_be_hidden()


IDEMPOTENCY_KEY = re.compile(r"[!-~]{1,64}")  # 1 to 64 visible ASCII characters


def stored_texts(server, text):
    """How many times the room holds a message whose text is `text` (its latest 500)."""
    answer = new_client(server).request("GET", "/api/messages?limit=500")
    return [message["text"] for message in answer.json["messages"]].count(text)


def test_a_message_is_sent_once_with_its_own_key_whatever_is_lost(start_server, people):
    # Yui's messages each carry a key of their own in an Idempotency-Key header. One POST is lost
    # on its way out, the response to another on its way back, and a third is written while the
    # server is down. Each waits in the log as "Sending…" or "Not sent yet", is tried again with
    # the same key, and ends as one message, shown once and stored once; the red notice goes
    # when the server is back.
    server = start_server()
    yui = people(server)
    page = yui.page
    posts = []  # (text, key) of every POST of a message the page made
    page.on("request", lambda request: request.method == "POST" and request.url.endswith(
        "/api/messages") and posts.append((json.loads(request.post_data)["text"],
                                           request.headers.get("idempotency-key"))))
    lost = {"out": unique("lost on the way out"), "back": unique("its response lost")}
    losses = []

    def lose_once(route):
        text = json.loads(route.request.post_data)["text"]
        if text == lost["out"] and "out" not in losses:
            losses.append("out")
            route.abort()
        elif text == lost["back"] and "back" not in losses:
            losses.append("back")
            route.fetch()  # the server stores it; the page never hears so
            route.abort()
        else:
            route.continue_()

    page.route("**/api/messages", lose_once)
    for text in lost.values():
        page.locator("#text").fill(text)
        page.locator("#text").press("Enter")
        yui.sees(text)
    expect(page.locator("#outbox li")).to_have_count(0)
    keys = {}
    for text, key in posts:
        keys.setdefault(text, set()).add(key)
    assert [len(keys[text]) for text in lost.values()] == [1, 1], \
        f"a message was tried again with another key: {posts}"
    assert [text for text, _ in posts].count(lost["out"]) == 2, posts
    page.unroute("**/api/messages")
    # (Few posts, and none on top of another: the room's rate limit must not be what is tested.)

    server.stop()
    expect(page.locator("#status")).to_contain_text("Connection lost")
    offline = unique("written while the server is down")
    page.locator("#text").fill(offline)
    page.locator("#text").press("Enter")
    expect(page.locator("#text")).to_have_value("")
    waiting = page.locator("#outbox li", has_text=offline)
    expect(waiting).to_contain_text("Not sent yet")
    expect(page.locator("#notice-text")).to_contain_text("will be sent when it is back")
    server.start(server.port)
    yui.sees(offline)
    expect(waiting).to_have_count(0)
    expect(page.locator("#notice-text")).to_have_text("")
    assert len({key for text, key in posts if text == offline}) == 1, posts
    assert len({key for _, key in posts}) == 3, f"two messages with one key: {posts}"
    assert all(key and IDEMPOTENCY_KEY.fullmatch(key) for _, key in posts), posts
    for text in [*lost.values(), offline]:
        expect(yui.row(text)).to_have_count(1)
        assert stored_texts(server, text) == 1, f"{text!r} is stored more than once"


RECORD_NOTIFICATIONS = """
window.__notes = [];
if (window.Notification) {
  const RealNotification = window.Notification;
  window.Notification = class extends RealNotification {
    constructor(title, options = {}) {
      super(title, options);
      window.__notes.push({ title, body: options.body });
    }
  };
}
"""
INSECURE_CONTEXT = """
Object.defineProperty(window, "isSecureContext", { get: () => false });
"""


def test_notifications_and_the_chime_while_the_tab_is_hidden(browser_room, people):
    # Zed asks for desktop notifications (his browser allows them on 127.0.0.1) and a chime only
    # while the tab is hidden. Hidden, a message from someone else chimes and notifies with its
    # sender and text; visible, neither. The choice survives a reload. On a page that is not a
    # secure context (plain http:// on a LAN address) the box cannot be ticked, and says why.
    zed = people(browser_room, init_script=EMULATE_VISIBILITY + RECORD_CHIMES
                 + RECORD_NOTIFICATIONS)
    zed.context.grant_permissions(["notifications"], origin=zed.url.rstrip("/"))
    page = zed.page
    zed.open_side()
    page.locator("#chime").select_option("hidden")
    box = page.locator("#notify")
    box.check()
    expect(box).to_be_checked()
    seen = unique("while Zed looks")
    zed.caught_up(someone_says(browser_room, seen))
    assert zed.plays() == [] and page.evaluate("window.__notes") == [], "it alerted a visible tab"

    page.evaluate("window.__setHidden(true)")
    hidden = unique("while Zed is away")
    someone_says(browser_room, hidden)
    zed.settled_plays()
    wait_until(lambda: page.evaluate("window.__notes"), timeout=5, message="a notification")
    notes = page.evaluate("window.__notes")
    assert len(notes) == 1 and notes[0]["body"] == hidden and notes[0]["title"].startswith(
        "Guest "), notes
    page.evaluate("window.__setHidden(false)")
    zed.reload()
    expect(page.locator("#notify")).to_be_checked()
    expect(page.locator("#chime")).to_have_value("hidden")

    lan = people(browser_room, init_script=INSECURE_CONTEXT)
    lan.open_side()
    expect(lan.page.locator("#notify")).to_be_disabled()
    expect(lan.page.locator("#notify")).to_have_accessible_description(
        re.compile(r"only on https:// or on this computer \(http://localhost"))


def away_marker_row(page):
    """The id of the message row that holds the "New since you were away" marker, if one does."""
    return page.evaluate("""() => { const markers = document.querySelectorAll("#messages .away");
        if (markers.length > 1) return "more than one marker";
        return markers.length ? Number(markers[0].closest("li").dataset.id) : null; }""")


def test_new_since_you_were_away_and_your_place_and_draft_kept(start_server, people):
    # Abi's tab is hidden while two messages come: back, "New since you were away" stands at the
    # first of them; away again, it moves to the next one that comes meanwhile. She closes the
    # room, three messages come, she opens it again: the marker stands at the first of those,
    # at the top of the log. Her half-written draft and her place, scrolled back in a room of
    # 60 messages, are where she left them after a reload.
    server = start_server()
    store_messages(server, [(i, f"before #{i}", int(time.time() * 1000)) for i in range(1, 61)])
    abi = people(server, init_script=EMULATE_VISIBILITY, viewport={"width": 1000, "height": 600})
    page = abi.page
    abi.caught_up(60)
    assert away_marker_row(page) is None
    page.evaluate("window.__setHidden(true)")
    first = someone_says(server, unique("while Abi is away"))
    abi.caught_up(someone_says(server, unique("and this too")))
    page.evaluate("window.__setHidden(false)")
    assert away_marker_row(page) == first
    expect(page.locator("#messages .away")).to_have_text("New since you were away")
    seen = someone_says(server, unique("while Abi looks"))
    abi.caught_up(seen)
    assert away_marker_row(page) == first, "a message read as it came moved the marker"
    page.evaluate("window.__setHidden(true)")
    later = someone_says(server, unique("while Abi is away again"))
    abi.caught_up(later)
    page.evaluate("window.__setHidden(false)")
    assert away_marker_row(page) == later

    page.close()
    missed = [someone_says(server, unique(f"missed #{number}")) for number in range(3)]
    page = abi.context.new_page()
    page.goto(abi.url)
    expect(page.locator(f'#messages li[data-id="{missed[-1]}"]')).to_have_count(1)
    assert away_marker_row(page) == missed[0]
    expect(page.locator("#messages .away")).to_be_in_viewport()

    page.locator("#text").fill("half-written, not to be lost")
    scroll_log(page, 0.3)
    place = page.evaluate(SCROLL_PLACE)
    page.reload()
    expect(page.locator("#status")).to_have_text("Connected")
    expect(page.locator("#text")).to_have_value("half-written, not to be lost")

    def back_in_place():  # (the page may settle in more than one step: the last one counts)
        now = page.evaluate(SCROLL_PLACE)
        return now["id"] == place["id"] and abs(now["above"] - place["above"]) < 2

    wait_until(back_in_place, timeout=5,
               message=f"message {place['id']} at the top of the log again, as far down "
                       f"as before ({place['above']:.0f} px hidden above)")


SCROLL_PLACE = """() => { const top = document.getElementById("log").getBoundingClientRect().top;
    const row = [...document.querySelectorAll("#messages li[data-id]")].find(
        (each) => each.getBoundingClientRect().bottom > top);
    return { id: Number(row.dataset.id), above: top - row.getBoundingClientRect().top }; }"""


def test_a_mention_of_your_name_is_marked_said_and_chimes(browser_room, people):
    # Cai, whose chime rings only while the tab is hidden, is looking at the room when someone
    # writes "@cai ..." (any case): the message is marked as one that mentions her, the mention
    # is highlighted, a screen reader hears who mentioned her, and the chime rings even so.
    # "@Cai2..." (someone else) and her own "@Cai" do not count.
    cai = people(browser_room, init_script=RECORD_CHIMES + RECORD_ANNOUNCEMENTS)
    name = unique("Cai")
    cai.rename(name)
    cai.open_side()
    cai.page.locator("#chime").select_option("hidden")
    cai.close_side()
    cai.say(f"I am @{name}")
    other = f"not you: @{name}2"
    cai.caught_up(someone_says(browser_room, other))
    assert cai.plays() == [], "a message for someone else chimed"
    expect(cai.row(other)).not_to_have_class(re.compile(r"\bmentions-me\b"))
    expect(cai.row(f"I am @{name}")).not_to_have_class(re.compile(r"\bmentions-me\b"))
    cai.page.evaluate("window.__announced = []")
    text = f"hey @{name.upper()}, look at this"
    someone_says(browser_room, text)
    row = cai.row(text)
    expect(row).to_have_class(re.compile(r"\bmentions-me\b"))
    expect(row.locator("mark")).to_have_text(f"@{name.upper()}")
    assert [play["src"] for play in cai.settled_plays()], "the mention did not chime"
    said = [said for region, said in cai.announced() if region == "mention-said"]
    assert len(said) == 1 and re.fullmatch(r"Guest \d+ mentioned you\.", said[0]), said


def test_messages_in_a_row_from_one_person_are_grouped(start_server, people):
    # In Dee's room one person wrote at 8:00 pm and 8:01 pm, and again at 8:30 pm. Then Eli
    # writes twice, someone else once, Eli once more. A run from one person within 5 minutes
    # shows one name and time, over its first message; each message keeps its own row, a
    # screen reader still hears who said it, and its time shows on hover.
    server = start_server()
    store_messages(server, [(1, "at eight", evening_in_los_angeles(1)),
                            (2, "a minute later", evening_in_los_angeles(1, 60)),
                            (3, "half an hour later", evening_in_los_angeles(1, 1800))])
    dee = people(server, **IN_LOS_ANGELES)
    eli = new_client(server)
    said = [unique("Eli one"), unique("Eli two")]
    for text in said:
        assert eli.post(text).status == 201
    between = unique("someone between")
    someone_says(server, between)
    last = unique("Eli again")
    time.sleep(3.1)  # the room allows Eli 2 messages in 3 s
    assert eli.post(last).status == 201
    texts = ["at eight", "a minute later", "half an hour later", *said, between, last]
    dee.sees(last)
    grouped = {text: "continued" in (dee.row(text).get_attribute("class") or "")
               for text in texts}
    assert grouped == {"at eight": False, "a minute later": True, "half an hour later": False,
                       said[0]: False, said[1]: True, between: False, last: False}, grouped
    row = dee.row(said[1])
    expect(row.locator(".name")).not_to_be_in_viewport()  # hidden from the eye only
    expect(row.locator(".name")).to_have_text(re.compile(r"^Guest \d+$"))
    opacity = "time => getComputedStyle(time).opacity"
    assert row.locator("time").evaluate(opacity) == "0"
    row.hover()
    wait_until(lambda: row.locator("time").evaluate(opacity) == "1", timeout=5,
               message="the time on hover")


def rename_notice(message, old_name, new_name):
    """A message of the room turned into the rename notice the server is to send in its place."""
    return {"id": message["id"], "user": message["user"], "name": new_name,
            "text": f"{old_name} is now {new_name}", "time": message["time"], "kind": "rename",
            "old_name": old_name}


def test_a_rename_notice_is_shown_quietly(browser_room, people):
    # The poll's answer carries a rename notice (here put in place of a message on its way to
    # Gil's page, as the server is to send them): it shows as a quiet row, "Guest 3115 is now
    # Frances", among the messages in order of id, not as a message; it does not chime nor
    # count as unread while the tab is hidden, and the next real message still does.
    gil = people(browser_room, init_script=EMULATE_VISIBILITY + RECORD_CHIMES)
    page = gil.page
    trigger = unique("to become a rename notice")

    def as_rename(route):
        response = route.fetch(timeout=HTTP_TIMEOUT * 1000)  # a long-poll: up to 60 s
        answer = response.json()
        answer["messages"] = [rename_notice(message, "Guest 3115", "Frances")
                              if message["text"] == trigger else message
                              for message in answer.get("messages", [])]
        route.fulfill(response=response, json=answer)

    page.route("**/api/poll*", as_rename)
    gil.reload()  # so that every poll goes by the route, the open one too
    page.evaluate("window.__setHidden(true)")
    notice_id = someone_says(browser_room, trigger)
    gil.caught_up(notice_id)
    row = page.locator(f'#messages li[data-id="{notice_id}"]')
    expect(row).to_have_text("Guest 3115 is now Frances")
    expect(row).to_have_class(re.compile(r"\brename\b"))
    expect(row.locator(".meta")).to_have_count(0)
    expect(row.locator("bdi")).to_have_text(["Guest 3115", "Frances"])
    expect(page).to_have_title(PAGE_TITLE)
    assert gil.plays() == [], "a rename chimed"
    after = unique("a real message after it")
    after_id = someone_says(browser_room, after)
    gil.sees(after)
    expect(page).to_have_title(f"(1) {PAGE_TITLE}")
    assert message_ids(page)[-2:] == [notice_id, after_id]


def test_a_rename_shows_in_the_log_of_others(browser_room, people):
    # Hal renames himself: Ida's log shows "Guest N is now <his new name>", by the real server.
    hal, ida = people(browser_room), people(browser_room)
    old_name = hal.my_name()
    new_name = unique("Hal")
    hal.rename(new_name)
    expect(ida.page.locator("#messages li.rename").filter(
        has_text=exactly(f"{old_name} is now {new_name}"))).to_have_count(1)


def test_the_same_words_twice_are_two_messages(browser_room, people):
    # Kit sends "ok" and at once "ok" again: both are sent and shown, once each; the reply to
    # the first is not taken for the second. (Kit's polls after the first are held back, so the
    # replies to his posts are what brings his messages.)
    kit = people(browser_room)
    held = []  # routes left unanswered: the page's poll waits, as for a slow answer

    def hold_polls(route):
        if "since=" in route.request.url:
            held.append(route)
        else:
            route.continue_()

    kit.page.route("**/api/poll*", hold_polls)
    kit.reload()
    text = unique("ok")
    # Both sent in one go, so that the second waits in the outbox while the first is answered.
    kit.page.evaluate("""text => { const box = document.getElementById("text");
        for (let time = 0; time < 2; time++) {
          box.value = text;
          document.getElementById("composer").requestSubmit();
        } }""", text)
    expect(kit.row(text)).to_have_count(2)
    expect(kit.page.locator("#outbox li")).to_have_count(0)
    assert stored_texts(browser_room, text) == 2
    kit.page.unroute_all(behavior="ignoreErrors")  # the polls held back go on
