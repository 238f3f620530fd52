"""Tests for the chat room: a real chatroom.py process on 127.0.0.1, spoken to over real HTTP.

Run:  python -m pytest

Each test starts from a scenario comment. Servers are separate processes started with --port 0 (any
free port) and a data file in the test's temporary folder, so tests can also stop, kill -9 and
restart them. Waits are bounded: a test that would hang fails instead.
"""

import http.client
import json
import os
import re
import secrets
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent
CHATROOM = ROOT / "chatroom.py"
START_TIMEOUT = 15  # seconds a server may take to print its address
HTTP_TIMEOUT = 70  # seconds any single request may take (the longest poll is 60 s)


# --------------------------------------------------------------------------------------------------
# Helpers: a server process, a client with a cookie, raw requests
# --------------------------------------------------------------------------------------------------

class Server:
    """A chatroom.py process listening on 127.0.0.1 on a free port."""

    def __init__(self, folder, *flags, data=None):
        self.folder = Path(folder)
        self.data = Path(data) if data else self.folder / "chat.db"
        self.flags = list(flags)
        self.process = None
        self.start()

    def start(self):
        self.log_path = self.folder / f"server-{time.monotonic_ns()}.log"
        self.log = open(self.log_path, "w")
        self.process = subprocess.Popen(
            [sys.executable, str(CHATROOM), "--host", "127.0.0.1", "--port", "0",
             "--data", str(self.data), *self.flags],
            stdout=self.log, stderr=subprocess.STDOUT, cwd=self.folder)
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            found = re.search(r"running at http://127\.0\.0\.1:(\d+)/", self.log_path.read_text())
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

    def restart(self):
        self.stop()
        self.start()

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
    return Client(server, sid=secrets.token_urlsafe(24))


def raw_request(port, data, timeout=10):
    """Send bytes as they are and return (status, body) of the answer (status 0 if none)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as connection:
        connection.sendall(data)
        connection.shutdown(socket.SHUT_WR)
        received = b""
        while True:
            chunk = connection.recv(65536)
            if not chunk:
                break
            received += chunk
    head, _, body = received.partition(b"\r\n\r\n")
    found = re.match(rb"HTTP/1\.[01] (\d{3})", head)
    return (int(found.group(1)) if found else 0), body


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


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """One shared server for tests that only add to the room."""
    running = Server(tmp_path_factory.mktemp("shared"))
    yield running
    running.stop()


@pytest.fixture
def start_server(tmp_path):
    """Start a private server with extra flags; all are stopped at the end of the test."""
    started = []

    def start(*flags, data=None):
        running = Server(tmp_path, *flags, data=data)
        started.append(running)
        return running

    yield start
    for running in started:
        if running.process.poll() is None:
            running.stop(signal.SIGKILL)


# --------------------------------------------------------------------------------------------------
# Serving the page and the sound
# --------------------------------------------------------------------------------------------------

def test_page_and_chime_are_served(server):
    # A browser loads the page and the chime; both come with the right type.
    client = Client(server)
    page = client.request("GET", "/")
    assert page.status == 200
    assert page.headers["Content-Type"] == "text/html; charset=utf-8"
    assert b"<title>Chat room</title>" in page.body
    chime = client.request("GET", "/chime.wav")
    assert chime.status == 200 and chime.headers["Content-Type"] == "audio/wav"
    assert chime.body[:4] == b"RIFF" and len(chime.body) < 100_000


@pytest.mark.parametrize("path", ["/index.html", "/chatroom.py", "/../chatroom.py",
                                  "/%2e%2e/chatroom.py", "//etc/passwd", "/chime.wav/..",
                                  "/api", "/api/poll/x"])
def test_nothing_else_is_served(server, path):
    # Only the page and the chime are files; any other path, traversal included, is a JSON 404.
    status, body = raw_request(server.port, f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())
    assert status == 404, (path, status, body)
    assert "error" in json.loads(body)


# --------------------------------------------------------------------------------------------------
# The API's happy paths
# --------------------------------------------------------------------------------------------------

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


def test_parked_poll_is_woken_by_someone_arriving(tmp_path, start_server):
    # Bob is alone and parked; when Carol comes online, Bob's poll answers with the new list.
    server = start_server()
    bob, carol = new_client(server), new_client(server)
    bob_id = bob.join()["you"]["id"]
    wait_until(lambda: [p["id"] for p in bob.poll(since=None)["online"]] == [bob_id],
               message="Bob alone online")
    thread, result = poll_in_background(bob, timeout=30)
    carol.join()
    carol_id = carol.poll(timeout=0)["you"]["id"]
    thread.join(20)
    assert not thread.is_alive(), "a presence change did not wake the parked poll"
    assert carol_id in [person["id"] for person in result["answer"]["online"]]


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
    assert answer["messages"][-1]["text"] == text


# --------------------------------------------------------------------------------------------------
# Names
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


@pytest.mark.parametrize("name, why", [
    ("", "blank"), ("   ", "blank"), ("x" * 41, "too long"), ("a\x00b", "control"),
    ("a\nb", "newline"), ("bell\x07", "control"), ("\x1b[31mred", "control"),
])
def test_bad_names_are_refused(server, name, why):
    # Names that are blank, too long or carry control characters get a 400 and change nothing.
    client = new_client(server)
    before = client.join()["you"]["name"]
    response = client.rename(name)
    assert response.status == 400, (why, response.status)
    assert response.json["error"]
    assert client.poll(timeout=0)["you"]["name"] == before


def test_name_of_40_characters_is_accepted(server):
    # The limit is inclusive.
    client = new_client(server)
    client.join()
    assert client.rename("n" * 40).status == 200


def test_name_and_identity_survive_a_restart(start_server):
    # After a restart, the same cookie is the same person with the same name.
    server = start_server()
    client = new_client(server)
    client.join()
    client.rename("Grace")
    who = client.poll(timeout=0)["you"]
    server.restart()
    assert client.poll(since=None)["you"] == who == {"id": who["id"], "name": "Grace"}


# --------------------------------------------------------------------------------------------------
# Presence
# --------------------------------------------------------------------------------------------------

def test_presence_comes_online_and_goes_offline(start_server):
    # Dora polls and shows up online; she stops polling and drops off after the window (1 s).
    server = start_server("--online-window", "1", "--poll-timeout", "5")
    dora, watcher = new_client(server), new_client(server)
    dora_id = dora.join()["you"]["id"]
    watcher.join()

    def online_ids():
        return {person["id"] for person in watcher.poll(since=None)["online"]}

    wait_until(lambda: dora_id in online_ids(), message="Dora to be online")
    wait_until(lambda: dora_id not in online_ids(), message="Dora to go offline")


def test_closed_connection_of_a_parked_poll_stops_counting(start_server):
    # Eve parks a poll and then closes the connection (closes her tab): she goes offline within
    # the window, although her poll's time-out is far away.
    server = start_server("--online-window", "1", "--poll-timeout", "60")
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
# Rate limiting
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


# --------------------------------------------------------------------------------------------------
# Bad input: each gets its 4xx JSON error, and the server keeps working
# --------------------------------------------------------------------------------------------------

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
    ("wrong method on messages", "GET", "/api/messages", {}, None, 405),
    ("wrong method on poll", "POST", "/api/poll", {"Content-Type": "application/json"}, b"{}", 405),
    ("DELETE the page", "DELETE", "/", {}, None, 405),
    ("since is text", "GET", "/api/poll?since=abc", {}, None, 400),
    ("since is negative", "GET", "/api/poll?since=-1", {}, None, 400),
    ("since is a fraction", "GET", "/api/poll?since=1.5", {}, None, 400),
    ("timeout is text", "GET", "/api/poll?since=0&timeout=soon", {}, None, 400),
    ("timeout is negative", "GET", "/api/poll?since=0&timeout=-2", {}, None, 400),
    ("timeout is NaN", "GET", "/api/poll?since=0&timeout=nan", {}, None, 400),
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
    assert client.post(f"still fine after {what}").status in (201, 429)


def test_post_without_content_length_gets_411(server):
    # A POST with no Content-Length (and no body) is refused with 411, in JSON.
    client = new_client(server)
    status, body = raw_request(server.port, (
        "POST /api/messages HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        f"Cookie: sid={client.sid}\r\n\r\n").encode())
    assert status == 411 and json.loads(body)["error"]


def test_post_without_cookie_is_refused_with_a_cookie_to_retry_with(server):
    # A POST without the session cookie is refused (403) but gets a cookie; the retry works.
    client = Client(server)
    refused = client.post("hi")
    assert refused.status == 403 and "cookie" in refused.json["error"]
    assert client.sid
    assert client.post("hi").status == 201


def test_timeout_above_sixty_is_accepted(server):
    # timeout=1000 is not an error (it counts as 60); the poll answers when something happens.
    client, other = new_client(server), new_client(server)
    client.join()
    other.join()
    thread, result = poll_in_background(client, timeout=1000)
    other.post("for the long poll")
    thread.join(20)
    assert not thread.is_alive() and result["answer"]["messages"]


# --------------------------------------------------------------------------------------------------
# Persistence and restarts
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


def test_shutdown_answers_parked_polls_and_exits_zero(start_server):
    # SIGTERM while a poll is parked: the poll gets its answer, and the server exits with 0.
    server = start_server()
    client = new_client(server)
    client.join()
    thread, result = poll_in_background(client, timeout=60)
    wait_until(lambda: "answer" not in result and thread.is_alive(), message="poll parked")
    time.sleep(0.2)  # let the request reach the server and park
    started = time.monotonic()
    assert server.stop(signal.SIGTERM) == 0
    thread.join(10)
    assert not thread.is_alive(), "the parked poll was not answered at shutdown"
    assert time.monotonic() - started < 10
    assert result["answer"]["version"] == client.version


# --------------------------------------------------------------------------------------------------
# Start-up checks
# --------------------------------------------------------------------------------------------------

def run_chatroom(*arguments, cwd, timeout=20):
    return subprocess.run([sys.executable, *map(str, arguments)], cwd=cwd, capture_output=True,
                          text=True, timeout=timeout)


def test_help_lists_the_flags(tmp_path):
    # --help explains every flag.
    result = run_chatroom(CHATROOM, "--help", cwd=tmp_path)
    assert result.returncode == 0
    for flag in ("--host", "--port", "--data", "--poll-timeout", "--online-window", "--max-clients"):
        assert flag in result.stdout


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


def test_unusable_data_path_is_a_clear_error(tmp_path):
    # A data file in a folder that does not exist cannot be opened: say so and exit non-zero.
    result = run_chatroom(CHATROOM, "--port", "0", "--data", tmp_path / "no" / "such" / "x.db",
                          cwd=tmp_path)
    assert result.returncode != 0 and "data file" in result.stderr


def test_a_burst_of_connections_is_not_refused(server):
    # 300 clients connect at once: the listen backlog holds them all, and each gets an answer.
    connections = [socket.create_connection(("127.0.0.1", server.port), timeout=10)
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
