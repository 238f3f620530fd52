"""How fast is the chat room with a thousand people in it? A benchmark for chatroom.py.

Run it:    python bench_chatroom.py                    every scenario, a few minutes
           python bench_chatroom.py --quick            small sizes, a smoke test in about a minute
           python bench_chatroom.py --scenarios single,fanout --fanout-sizes 100,1000
           python bench_chatroom.py --chatroom copy/chatroom.py          measure a changed copy
           python bench_chatroom.py --url http://127.0.0.1:8000/ --pid 1234   a running server
           python bench_chatroom.py --compare          the plain room against the full server
           python bench_chatroom.py --compare --quick  the same, smaller, in about a minute
           python bench_chatroom.py --compare --against old=old-copy/chatroom.py   and an older one

Standard library only, Linux only (server CPU and memory come from /proc).

What it measures
----------------
By default the benchmark starts chatroom.py itself (the one beside this file) on a free port,
with a data file in a temporary directory: a fresh server for each scenario, so that one
scenario's leftovers (threads, cached users, rate-limit memory) cannot colour the next. Then it
plays the part of many browsers at once:

    single     One page waits; someone else posts. How long until the page has the message?
    fanout     N pages wait (N = 100, 1000, 2000), each its own person with its own cookie. Each
               round one new person posts one message, and every page asks again the moment it
               gets its answer, as the real page does. How long until one page, and every page,
               has it? How long does the poster wait for its 201? Was any delivery lost?
    idle       N pages wait and nothing happens for 10 s. What does that cost the server? (It is
               started with --poll-timeout 60, so that no poll times out inside the window.)
    bytes      The size of the answer that carries one new message to a waiting page, with 2000
               pages waiting and 10,000 messages stored.
    crowd      2000 people open the room at the same moment (page, chime, first poll). How long
               until every one of them is parked and the server is quiet again? One crowd is one
               sample of a noisy machine, so it is run three times, each on a fresh server: the
               table shows the run with the median settling time, and lists all three. (With
               --url, once: the server would still be letting go of the last crowd.)
    startup    How long the server takes to start, and to answer a first poll, with 1,000,000
               stored messages. (That file is built once by writing rows straight into SQLite,
               and cached under /tmp, so reruns are quick.)
    sustained  50 people chat as fast as the rate limits allow while 500 listen, for 20 s. Every
               listener must see every accepted message exactly once, in order.

Latency is measured from the moment the POST is written to the socket to the moment a page has
read its whole answer. Percentiles are over every delivery of every round; "reach everyone" is
the time the slowest page of a round needed, and the table shows its median over the rounds. The
first round of single and fanout is a warm-up and is not counted.

How the load is generated, and why that way
--------------------------------------------
A load generator must not be the bottleneck, or it measures itself. A thread per simulated page
would put 2000 threads of our own on the same two cores as the server's. Instead there is one
asyncio event loop, and each simulated page is one small HTTP/1.1 client (HttpConnection below)
on one keep-alive connection, which is what a browser's page does. The requests carry the
headers a browser sends (BROWSER_HEADERS), because parsing them is part of the server's work.
The benchmark's own CPU time is printed beside the server's, so you can see it had room to spare.

The pages of a scenario arrive a few at a time (CONNECT_BATCH), each batch once the last has
had its first answers, so that a scenario about delivery measures delivery, not arriving (the
crowd is the scenario about arriving); how long they took is shown too. A page whose
connection is lost connects again after a wait, as the real page does, and its next poll
brings what it missed; the table counts it.

Beside time, fan-out reports the server's context switches per delivery (from /proc): with a
thread per connection and one GIL, switching threads is where much of the time goes.

The machine is shared and noisy: run twice and trust what both runs agree on.

What the speed layer buys: --compare
------------------------------------
`python chatroom.py --plain` runs Part I of chatroom.py alone: the plain room, where a change
wakes every parked thread with notify_all() and each thread writes its own answer. The full
server adds Part II's speed and Part III's defences. --compare measures both in one run, and
prints one table with a column for each and the ratio plain / full. Each --against NAME=PATH
adds a column: another chatroom.py (with the index.html and chime.wav it reads beside it),
started without --plain, say a copy of an older version, so that "old full, new full, new
plain" is one run.

Unless --scenarios says otherwise it runs fan-out to 1000 and 2000 waiting pages (how long
until everyone has the message, the POST's round trip while they wait, the server's context
switches and CPU per delivery) and sustained posting: a few minutes on 2 cores. With --quick,
fan-out to 1000 and a shorter, smaller sustained run: about a minute.

Why the servers take turns: the machine's speed drifts over minutes as other people's work
starts and stops. Measure plain first and full after, and the drift falls between the two
columns, where it reads as a difference between the servers. So within each scenario the
servers take turns, A B A B (--runs times each, 2 by default), each run on a fresh server:
the drift falls on every server alike, and shows as spread within a column. Each cell is a
median with its range (min-max): over every round of every run where a figure is taken each
round (the time to reach everyone, the POST's round trip), over the runs otherwise.

A slow server is a result, not an error. Deliveries that never came, or came later than
ROUND_TIMEOUT, and rounds not everyone had in time are counted in its column; fan-out stops
starting rounds after FANOUT_SECONDS_PER_ROUND a round. A run fails, with a note under the
table, if the server does not start, cannot take the pages in within SETUP_TIMEOUT (the note
says how many it had; --setup-timeout gives it longer), or outlives --run-timeout. After such
a failure that server is not run again at that size, which would cost minutes to say the same.
The other columns go on.
"""

import argparse
import asyncio
import collections
import contextlib
import gzip
import hashlib
import http.client
import importlib.util
import itertools
import json
import math
import os
import random
import resource
import secrets
import selectors
import shutil
import signal
import socket
import sqlite3
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from urllib.parse import urlsplit

# ==================================================================================================
# Settings
# ==================================================================================================

SCENARIOS = ["single", "fanout", "idle", "bytes", "crowd", "startup", "sustained"]

# The targets, on a 2-core machine. Every one reads "at most LIMIT".
# (scenario, N or None for any N, metric, limit)
TARGETS = [
    ("single", None, "p50_ms", 2.0),
    ("fanout", 1000, "reach_all_ms", 60.0),
    ("fanout", 2000, "reach_all_ms", 120.0),
    ("fanout", 1000, "post_ms", 2.0),
    ("fanout", 2000, "post_ms", 2.0),
    ("fanout", 1000, "switches_per_delivery", 3.0),
    ("fanout", 2000, "switches_per_delivery", 3.0),
    ("fanout", 1000, "rss_mb", 64.0),
    ("idle", 1000, "rss_mb", 64.0),
    ("idle", 1000, "cpu_s", 0.02),  # server CPU seconds in the 10 s window
    ("bytes", None, "broadcast_bytes", 1023),  # "less than 1 KB", headers included
    ("crowd", 2000, "settle_s", 3.0),
    ("startup", None, "start_s", 1.0),
    ("sustained", None, "p50_ms", 25.0),
    (None, None, "lost", 0),
    (None, None, "duplicates", 0),
    (None, None, "out_of_order", 0),
    (None, None, "rounds_incomplete", 0),
    (None, None, "late_deliveries", 0),
]

# What a browser sends with every request from the page (Chrome, give or take a header).
BROWSER_HEADERS = [
    ("Connection", "keep-alive"),
    ("User-Agent", "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) "
                   "Chrome/120.0.0.0 Safari/537.36"),
    ("Accept", "*/*"),
    ("Sec-Fetch-Site", "same-origin"),
    ("Sec-Fetch-Mode", "cors"),
    ("Sec-Fetch-Dest", "empty"),
    ("Accept-Encoding", "gzip, deflate, br"),
    ("Accept-Language", "en-GB,en;q=0.9"),
]

# The server's rate limits allow 3 messages in any 10 s (and 8 a minute): one every 3.5 s keeps
# a sustained poster inside all of them for the 20 s the scenario lasts.
SUSTAINED_POST_INTERVAL = 3.5  # seconds

PRESENCE_INTERVAL = 1.0  # seconds; chatroom.py announces arrivals and departures at most this often
# Pages that connect at the same moment while a scenario sets up (not the crowd, which is about
# arriving at once), each batch after the last one's first answers: no more than the listen
# queue socketserver gives a server by default (request_queue_size = 5). A batch that overflows
# it waits for the kernel's retries, seconds apart, or is reset, and the scenario would measure
# arriving instead of what it is about.
CONNECT_BATCH = 5
# The addresses simulated pages connect from, in turn, when the server is on loopback: people in
# a real crowd come from many addresses, and from one alone the server's cap per address
# (--max-clients-per-address) would refuse most of the crowd. On Linux, every 127.x.y.z reaches
# a server listening on 127.0.0.1.
SOURCE_ADDRESSES = [f"127.0.1.{n}" for n in range(1, 201)]
# chatroom.py limits what one address may do together (--people-per-address: its posts, and how
# fast it is given new cookies). Behind each of our 200 addresses are tens of simulated people, and
# a round of `single` or `fanout` can post faster than people do: the limit is raised so that the
# benchmark measures the room, not its defence. (A copy of chatroom.py without the flag runs as is.)
PEOPLE_PER_ADDRESS = 100_000
ROUND_TIMEOUT = 10.0  # seconds a round may take before its missing deliveries count as lost
# Seconds the pages of a scenario may take to arrive (CONNECT_BATCH at a time) and be parked
# with the server quiet (--setup-timeout). The full server needs a few seconds for 2000, the
# plain room about a minute on a busy 2-core machine; a server that needs more than this is
# reported as failing to take the pages in, with how far it got.
SETUP_TIMEOUT = 90.0
OPEN_TIMEOUT = 30.0  # seconds a page may take to connect (and load, in the crowd) before giving up
POST_TIMEOUT = 10.0  # seconds a POST may wait for its answer before it counts as unanswered
# A slow server is measured on fewer fan-out rounds rather than for ever: no round starts once
# this many seconds per round asked for have passed (a round that is slow to reach everyone
# takes up to ROUND_TIMEOUT, then up to ROUND_SETTLE_TIMEOUT for the pages to ask again).
FANOUT_SECONDS_PER_ROUND = 12.0
ROUND_SETTLE_TIMEOUT = 20.0  # seconds
RUN_TIMEOUT = 300.0  # seconds one scenario may take on one server before it is stopped (a bound)
SAMPLES = "samples"  # the key under which a result keeps every round's figure (not printed)
SETTLE_TIMEOUT = 60.0  # seconds we wait for the pages to be parked and the server to be quiet
START_TIMEOUT = 30.0  # seconds the server may take to print its address
STARTUP_REPEATS = 3  # start-up is timed this many times; the median is shown
# A page whose connection is lost connects again as index.html does: after 1 s, then twice as
# long each time up to 15 s, +-30% so that pages do not all come back at once. It gives up
# after RECONNECT_ATTEMPTS (about half a minute), and then counts as gone.
RETRY_FIRST = 1.0  # seconds
RETRY_MAX = 15.0  # seconds
RETRY_JITTER = 0.3
RECONNECT_ATTEMPTS = 5
PAGE_MAX_POLLS = 100_000  # a page stops after this many polls whatever happens (a safety bound)
CACHE_DIR = Path(tempfile.gettempdir())  # where the big data file is kept between runs

QUICK_SIZES = dict(single_rounds=20, fanout_sizes="50,200", rounds=10, idle_sizes="200",
                   idle_seconds=3.0, bytes_clients=200, bytes_history=1000, crowd=300,
                   crowd_runs=1, startup_messages=100_000, posters=10, listeners=50,
                   sustained_seconds=6.0)
# --compare runs every scenario several times on each server, so its defaults are smaller: a
# few minutes on 2 cores for plain and full (about a minute with --quick).
COMPARE_SIZES = dict(scenarios="fanout,sustained", fanout_sizes="1000,2000",
                     sustained_seconds=10.0)
COMPARE_QUICK_SIZES = dict(scenarios="fanout,sustained", fanout_sizes="1000", rounds=5,
                           posters=20, listeners=200, sustained_seconds=5.0)


# ==================================================================================================
# Measuring a process: CPU and memory from /proc
# ==================================================================================================

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


class ProcessMeter:
    """Reads a process's CPU time and memory from /proc/PID (Linux)."""

    def __init__(self, pid):
        self.pid = pid

    def cpu_seconds(self):
        """User + system CPU of all the process's threads, in clock ticks (usually 10 ms)."""
        with open(f"/proc/{self.pid}/stat") as file:
            fields = file.read().rsplit(")", 1)[1].split()  # the name in (...) may hold spaces
        return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS  # fields 14 and 15: utime, stime

    def precise_cpu_seconds(self):
        """The same, to the nanosecond, summed over threads (/proc/PID/task/*/schedstat).

        Costly with thousands of threads, so used only where ticks are too coarse (idle).
        Threads that ended are missing from the sum; in an idle window none end.
        """
        total = 0
        for task in os.listdir(f"/proc/{self.pid}/task"):
            try:
                with open(f"/proc/{self.pid}/task/{task}/schedstat") as file:
                    total += int(file.read().split()[0])
            except (OSError, ValueError, IndexError):
                pass  # the thread ended while we looked
        return total / 1e9

    def context_switches(self):
        """Context switches of the process's live threads so far (/proc/PID/task/*/status)."""
        total = 0
        for task in os.listdir(f"/proc/{self.pid}/task"):
            try:
                with open(f"/proc/{self.pid}/task/{task}/status") as file:
                    for line in file:
                        if "ctxt_switches:" in line:  # voluntary and nonvoluntary
                            total += int(line.split()[1])
            except (OSError, ValueError):
                pass  # the thread ended while we looked
        return total

    def memory(self):
        """(resident memory in MB, number of threads)."""
        status = {}
        with open(f"/proc/{self.pid}/status") as file:
            for line in file:
                name, _, value = line.partition(":")
                status[name] = value.split()
        return int(status["VmRSS"][0]) / 1024, int(status["Threads"][0])


def own_cpu_seconds():
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


class CpuWatch:
    """CPU used by the server and by this benchmark between start() and stop()."""

    def __init__(self, meter):
        self.meter = meter

    def start(self):
        self.server_start = self.meter.cpu_seconds() if self.meter else None
        self.own_start = own_cpu_seconds()
        self.wall_start = time.perf_counter()
        return self

    def stop(self):
        result = {"wall_s": round(time.perf_counter() - self.wall_start, 3),
                  "bench_cpu_s": round(own_cpu_seconds() - self.own_start, 3)}
        if self.meter:
            result["server_cpu_s"] = round(self.meter.cpu_seconds() - self.server_start, 3)
        return result


def memory_fields(meter):
    if meter is None:
        return {}
    rss, threads = meter.memory()
    return {"rss_mb": round(rss, 1), "threads": threads}


# ==================================================================================================
# The server under test
# ==================================================================================================

class LocalServer:
    """A chatroom.py that we start on a free port, with a data file of our choosing."""

    setup_timeout = SETUP_TIMEOUT  # seconds its pages may take to be in and parked (see there)

    def __init__(self, script, data_path, *options):
        self.script = Path(script)
        self.data_path = Path(data_path)
        self.options = [str(option) for option in options]
        self.log_path = self.data_path.with_suffix(".log")
        self.process = None

    def start(self):
        """Start the server; returns the seconds until it printed the address it listens on."""
        command = [sys.executable, str(self.script), "--host", "127.0.0.1", "--port", "0",
                   "--data", str(self.data_path), *self.options]
        if takes_flag(self.script, "--people-per-address"):
            command += ["--people-per-address", str(PEOPLE_PER_ADDRESS)]
        self.log = open(self.log_path, "ab")
        started = time.perf_counter()
        self.process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=self.log)
        line = read_line_within(self.process.stdout, START_TIMEOUT)
        elapsed = time.perf_counter() - started
        if "running at http://" not in line:
            self.stop()
            last_words = self.log_tail(1) or repr(line)
            raise RuntimeError(f"{self.script} did not start: {last_words}\n{self.log_tail()}")
        address = line.split("http://", 1)[1].split("/", 1)[0]
        self.host, port = address.rsplit(":", 1)
        self.port = int(port)
        self.host_header = address
        self.meter = ProcessMeter(self.process.pid)
        self.new_sid = session_id_maker(self.script, self.data_path)
        return elapsed

    def stop(self):
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
        self.process.stdout.close()
        self.log.close()
        self.process = None

    def check_alive(self):
        if self.process.poll() is not None:
            raise RuntimeError(f"the server exited with {self.process.returncode}\n"
                               f"{self.log_tail()}")

    def log_summary(self):
        """How many lines the server logged, and whether any was a traceback (a problem)."""
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return {}
        tracebacks = sum(line.startswith("Traceback") for line in lines)
        summary = {"server_log_lines": len(lines)}
        if tracebacks:
            summary["problems"] = {"tracebacks in the server's log": tracebacks}
        return summary

    def log_tail(self, lines=15):
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc_info):
        self.stop()


class RunningServer:
    """A server someone else started (--url). We cannot restart it or choose its data.

    Nor read its key: the session ids we make up are no one to a chatroom.py that signs its own
    (it takes them for no cookie), so its posts would be refused. Measure such a server by
    starting it through the benchmark (--chatroom).
    """

    new_sid = staticmethod(lambda: secrets.token_urlsafe(24))

    setup_timeout = SETUP_TIMEOUT

    def __init__(self, url, pid):
        parts = urlsplit(url)
        self.host_header = parts.netloc
        self.host = socket.getaddrinfo(parts.hostname, None, socket.AF_INET)[0][4][0]
        self.port = parts.port or 80
        self.meter = ProcessMeter(pid) if pid else None

    def check_alive(self):
        pass

    def log_summary(self):
        return {}

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        pass


def takes_flag(script, flag, _known={}):
    """Whether the chatroom.py at `script` knows `flag` (its --help names it). Asked once."""
    if (script, flag) not in _known:
        shown = subprocess.run([sys.executable, str(script), "--help"], capture_output=True,
                               text=True, timeout=START_TIMEOUT).stdout
        _known[script, flag] = flag in shown
    return _known[script, flag]


def session_id_maker(script, data_path):
    """A function that makes session ids the server takes as ones it issued.

    chatroom.py signs the session ids it issues, with a key it keeps in its data file, and
    takes any other cookie for no cookie at all. So we sign ours with that key, by the server's
    own code (SessionIds, in the script we run). A server that signs nothing (the plain room, or
    an older copy: no key in its file) takes any well-formed id.
    """
    try:
        with contextlib.closing(sqlite3.connect(f"file:{data_path}?mode=ro", uri=True)) as db:
            key = db.execute("SELECT key FROM session_key").fetchone()[0]
    except (sqlite3.Error, TypeError):
        return lambda: secrets.token_urlsafe(24)
    spec = importlib.util.spec_from_file_location("chatroom_under_test", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.SessionIds(key).new


def read_line_within(pipe, timeout):
    """One line from a child's stdout, or '' if none comes within `timeout` seconds."""
    with selectors.DefaultSelector() as selector:
        selector.register(pipe, selectors.EVENT_READ)
        if not selector.select(timeout):
            return ""
    return pipe.readline().decode("utf-8", "replace")


# --- Data files with a long history -----------------------------------------------------------

def build_data_file(script, path, count):
    """A data file holding `count` messages: created by the server, then filled with sqlite3.

    Posting a million messages through the API would take days under the rate limits, so we
    let the server create an empty file (its schema, its settings), stop it, and write the rows
    straight into the tables: room(version), users(sid, id, name), messages(id, user, name,
    text, time). The room's version is then the newest message's id, as the server would have it.
    """
    with LocalServer(script, path) as server:
        first_poll(server)  # it is fully up (stopping it sooner can leave a traceback in its log)
    users = []
    for _ in range(20):
        sid = secrets.token_urlsafe(24)
        user_id = hashlib.sha256(sid.encode("ascii")).hexdigest()[:16]
        users.append((sid, user_id, f"Tester {user_id[:4]}"))
    start_ms = int(time.time() * 1000) - count * 1000
    rows = ((number, users[number % 20][1], users[number % 20][2],
             f"Message number {number}: the quick brown fox jumps over the lazy dog.",
             start_ms + number * 1000) for number in range(1, count + 1))
    database = sqlite3.connect(path, isolation_level=None)
    try:
        database.execute("PRAGMA journal_mode = DELETE")  # one big write; no WAL to checkpoint
        database.execute("PRAGMA synchronous = OFF")  # a scratch file: a crash just means rebuild
        database.execute("BEGIN")
        database.executemany("INSERT INTO users VALUES (?, ?, ?)", users)
        database.executemany("INSERT INTO messages VALUES (?, ?, ?, ?, ?)", rows)
        database.execute("UPDATE room SET version = (SELECT max(id) FROM messages)")
        database.execute("COMMIT")  # (the server switches the file back to WAL when it opens it)
    finally:
        database.close()


def schema_of(path):
    """(user_version, table definitions): enough to tell whether a cached file still fits."""
    database = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        version = database.execute("PRAGMA user_version").fetchone()[0]
        tables = sorted(row[0] for row in database.execute("SELECT sql FROM sqlite_master"))
        return version, tables
    finally:
        database.close()


def cached_data_file(script, count, scratch):
    """A file with `count` messages, built once and kept in CACHE_DIR for the next run."""
    cached = CACHE_DIR / f"chatroom-bench-{count}.db"
    fresh = Path(scratch) / "schema-probe.db"
    with LocalServer(script, fresh) as server:
        first_poll(server)
    if cached.exists():
        try:
            database = sqlite3.connect(f"file:{cached}?mode=ro", uri=True)
            newest = database.execute("SELECT max(id) FROM messages").fetchone()[0]
            database.close()
            if newest == count and schema_of(cached) == schema_of(fresh):
                return cached, 0.0
        except sqlite3.Error:
            pass
        progress(f"  the cached {cached} does not fit this chatroom.py; building it again")
    started = time.perf_counter()
    building = Path(scratch) / f"building-{count}.db"
    build_data_file(script, building, count)
    shutil.copyfile(building, cached.with_suffix(".part"))
    os.replace(cached.with_suffix(".part"), cached)  # never leave a half-built file behind
    return cached, time.perf_counter() - started


# ==================================================================================================
# A minimal HTTP/1.1 client for asyncio: one connection, one request at a time
# ==================================================================================================

class Response:
    __slots__ = ("status", "headers", "body", "size", "received", "stamped")

    def __init__(self, status, headers, body, size, received, stamped):
        self.status = status
        self.headers = headers  # lower-cased names
        self.body = body
        self.size = size  # bytes on the wire: head and body
        self.received = received  # time.perf_counter() when the last byte had arrived
        self.stamped = stamped  # True: `received` is the kernel's time, not the time we read it

    def json(self):
        return json.loads(self.body)


# Linux's SO_TIMESTAMPNS (asm-generic/socket.h), which the socket module does not name: with it,
# every read also says when the kernel received the data, to the nanosecond (CLOCK_REALTIME).
SO_TIMESTAMPNS = 35
TIMESPEC = struct.Struct("@qq")  # struct timespec: seconds, nanoseconds
ANCILLARY_SPACE = socket.CMSG_SPACE(TIMESPEC.size)
READ_SIZE = 65536


def perf_counter_of(realtime_ns):
    """A kernel timestamp (CLOCK_REALTIME, ns) on time.perf_counter()'s scale."""
    return realtime_ns / 1e9 - PERF_COUNTER_OFFSET


PERF_COUNTER_OFFSET = time.time() - time.perf_counter()


class HttpConnection:
    """A keep-alive HTTP/1.1 connection: write a request, get a Future for its response.

    Just enough HTTP for chatroom.py, which always sends Content-Length. A plain non-blocking
    socket that the event loop watches (loop.add_reader), rather than an asyncio transport: it
    costs less per answer, and it can read with recvmsg(), which brings the kernel's receive
    time. That time, not the moment this process got round to reading, is when the answer
    reached the page: so a benchmark busy with other pages does not count its own delay as the
    server's. (Without the timestamp, as on other systems, the read time is used.)
    """

    def __init__(self, sock, loop):
        self.sock = sock
        self.loop = loop
        self.closed = False
        self._buffer = bytearray()
        self._waiter = None  # the Future of the request in flight
        self._head = None  # (status, headers, head size, total size) once the head has arrived
        self._stamped = False

    @classmethod
    async def open(cls, host, port, source=None):
        loop = asyncio.get_running_loop()
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # small requests go at once
        try:
            sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
            stamped = True
        except OSError:
            stamped = False
        try:
            if source:
                sock.bind((source, 0))
            await loop.sock_connect(sock, (host, port))
        except BaseException:
            sock.close()
            raise
        connection = cls(sock, loop)
        connection._stamped = stamped
        loop.add_reader(sock.fileno(), connection._readable)
        return connection

    def request(self, method, target, head_lines, body=b""):
        """Send a request; `head_lines` is the already-encoded header block (see header_block)."""
        if self._waiter is not None:
            raise RuntimeError("one request at a time on a connection")
        if self.closed:
            raise ConnectionError("the connection is closed")
        self._waiter = self.loop.create_future()
        if body:
            head_lines += b"Content-Length: %d\r\n" % len(body)
        data = b"%s %s HTTP/1.1\r\n%s\r\n%s" % (method.encode(), target.encode(), head_lines, body)
        try:
            sent = self.sock.send(data)  # a request is small: the socket's buffer takes it all
        except BlockingIOError:
            sent = 0
        except OSError:
            self._lost()
            return self._waiter
        if sent < len(data):
            self.loop.create_task(self.loop.sock_sendall(self.sock, data[sent:]))
        return self._waiter

    def close(self):
        if not self.closed:
            self.closed = True
            self.loop.remove_reader(self.sock.fileno())
            self.sock.close()

    def _readable(self):
        try:
            data, ancillary, _, _ = self.sock.recvmsg(READ_SIZE, ANCILLARY_SPACE)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data, ancillary = b"", []
        if not data:
            self._lost()
            return
        received = None
        for level, kind, value in ancillary:
            if level == socket.SOL_SOCKET and kind == SO_TIMESTAMPNS:
                seconds, nanoseconds = TIMESPEC.unpack(value[:TIMESPEC.size])
                received = perf_counter_of(seconds * 1_000_000_000 + nanoseconds)
        self._data_received(data, received)

    def _data_received(self, data, received):
        self._buffer += data
        while self._waiter is not None:
            if self._head is None:
                end = self._buffer.find(b"\r\n\r\n")
                if end < 0:
                    return
                lines = self._buffer[:end].decode("latin-1").split("\r\n")
                headers = {}
                for line in lines[1:]:
                    name, _, value = line.partition(":")
                    headers[name.strip().lower()] = value.strip()
                length = int(headers.get("content-length", 0))
                self._head = (int(lines[0].split(" ", 2)[1]), headers, end + 4, end + 4 + length)
            status, headers, head_size, total = self._head
            if len(self._buffer) < total:
                return
            body = bytes(self._buffer[head_size:total])
            if headers.get("content-encoding") == "gzip":  # (`total` stays the bytes on the wire)
                body = gzip.decompress(body)
            del self._buffer[:total]
            self._head = None
            waiter, self._waiter = self._waiter, None
            if not waiter.done():
                waiter.set_result(Response(status, headers, body, total,
                                           received or time.perf_counter(), received is not None))

    def _lost(self):
        self.close()
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_exception(ConnectionError("the server closed the connection"))
        self._waiter = None


def header_block(server, sid=None, extra=()):
    """The encoded header lines of a browser's request to `server`, with its cookie."""
    lines = [("Host", server.host_header), *BROWSER_HEADERS, *extra]
    if sid:
        lines.append(("Cookie", f"sid={sid}"))
    return "".join(f"{name}: {value}\r\n" for name, value in lines).encode("latin-1")


_sources = itertools.cycle(SOURCE_ADDRESSES)


def next_source(server):
    """The address to connect from: the next of SOURCE_ADDRESSES for a server on loopback."""
    return next(_sources) if server.host.startswith("127.") else None


async def open_connection(server, attempts=3):
    """Connect, trying again after a pause if refused: a browser would, too."""
    for attempt in range(attempts):
        try:
            return await HttpConnection.open(server.host, server.port, next_source(server))
        except OSError:
            if attempt == attempts - 1:
                raise
            await asyncio.sleep(0.5 * (attempt + 1))


# ==================================================================================================
# Simulated people: pages that listen, and people who post
# ==================================================================================================

class Page:
    """One open chat page: its own person (cookie) and connection, always with one poll open."""

    def __init__(self, audience):
        self.audience = audience
        self.sid = audience.server.new_sid()  # a person to the server
        self.connection = None
        self.version = None  # the last version this page has seen; None before its first answer
        self.seen = []  # ids of the messages it was sent after its snapshot, in arrival order
        self.parked = False  # a poll with `since` has been sent and not yet answered
        self.alive = True  # False once its connection is lost for good

    async def open(self, server, load_page=False):
        self.server = server
        self.connection = await open_connection(server)
        self.head = header_block(server, self.sid)
        if load_page:  # what a browser fetches when someone opens the room
            for path in ("/", "/chime.wav"):
                response = await self.connection.request("GET", path, self.head)
                if response.status != 200:
                    self.audience.problems[f"GET {path} answered {response.status}"] += 1

    async def live(self, server, load_page, opened):
        """Open the page as a browser does, say so through `opened`, then keep a poll open."""
        try:
            await asyncio.wait_for(self.open(server, load_page), OPEN_TIMEOUT)
        except (OSError, ConnectionError, asyncio.TimeoutError) as error:
            self.audience.problems[f"could not open the page: {type(error).__name__}"] += 1
            self.alive = False
            return
        finally:
            if not opened.done():  # (it is cancelled if the whole scenario was)
                opened.set_result(None)
        await self.run()

    async def run(self):
        audience = self.audience
        for _ in range(PAGE_MAX_POLLS):
            target = "/api/poll" if self.version is None else f"/api/poll?since={self.version}"
            self.parked = self.version is not None
            audience.last_poll_sent = time.perf_counter()
            try:
                response = await self.connection.request("GET", target, self.head)
            except ConnectionError:
                self.parked = False
                if await self.reconnect():
                    audience.problems["connection lost, and the page connected again"] += 1
                    continue
                audience.problems["connection lost for good"] += 1
                self.alive = False
                return
            finally:
                self.parked = False
            audience.answers += 1
            audience.last_answer = response.received
            audience.unstamped += not response.stamped
            if response.status != 200:
                audience.problems[f"poll answered {response.status}"] += 1
                await asyncio.sleep(1)
                continue
            answer = decode_answer(response.body)
            if self.version is None:
                audience.snapshot_bytes = max(audience.snapshot_bytes, response.size)
            else:
                audience.largest_answer = max(audience.largest_answer, response.size)
                for message in answer["messages"]:
                    self.seen.append(message["id"])
                    audience.arrived(message["id"], response.received, response.size)
            self.version = answer["version"]


    async def reconnect(self):
        """Connect again after waiting, as the real page does; False if it never could."""
        wait = RETRY_FIRST
        for _ in range(RECONNECT_ATTEMPTS):
            await asyncio.sleep(wait * (1 + RETRY_JITTER * random.uniform(-1, 1)))
            wait = min(wait * 2, RETRY_MAX)
            try:
                self.connection = await asyncio.wait_for(open_connection(self.server),
                                                         OPEN_TIMEOUT)
                return True
            except (OSError, asyncio.TimeoutError):
                pass
        return False


def decode_answer(body):
    """A poll answer's version and messages, without decoding its online list.

    The online list names everyone in the room: tens of KB with a thousand people. Decoding that
    in Python for each of 2000 pages would make the benchmark, not the server, the slow part (a
    browser's JSON.parse is much faster). The server writes "online" after "messages", and the bytes
    ,"online":[ cannot occur inside a JSON string (a quote there is escaped as \"), so cutting
    there leaves a valid object. If the server ever changes its order, we decode it all.
    """
    cut = body.find(b',"online":[')
    if cut >= 0:
        answer = json.loads(body[:cut] + b"}")
        if "version" in answer and "messages" in answer:
            return answer
    return json.loads(body)


class SetupFailed(Exception):
    """The pages of a scenario were not all in and parked within SETUP_TIMEOUT."""


class Audience:
    """A crowd of pages, and the bookkeeping of what reached whom and when."""

    def __init__(self, server, size):
        self.server = server
        self.pages = [Page(self) for _ in range(size)]
        self.arrivals = collections.defaultdict(list)  # message id -> [time it reached a page]
        self.answer_sizes = {}  # message id -> bytes of the last answer that carried it
        self._everyone_has = {}  # message id -> Future resolved when every page has it
        self.problems = collections.Counter()
        self.tasks = []
        self.answers = 0
        self.unstamped = 0  # answers whose arrival time is our read time, not the kernel's
        self.last_answer = self.last_poll_sent = 0.0
        self.snapshot_bytes = self.largest_answer = 0

    def __len__(self):
        return len(self.pages)

    async def connect(self, batch=CONNECT_BATCH, load_page=False, answered=True):
        """Open the pages, `batch` at a time; each starts polling as soon as it is open.

        With `answered`, a batch must also have had its first answers before the next starts
        (within OPEN_TIMEOUT). A server that is slow to accept connections then meets the pages
        a batch at a time, as the scenario means it to, rather than a queue of them that its
        kernel's listen queue overflows with, and that may be reset before it gets to them.
        """
        loop = asyncio.get_running_loop()
        for start in range(0, len(self.pages), batch):
            pages = self.pages[start:start + batch]
            opened = [loop.create_future() for _ in pages]
            self.tasks += [asyncio.create_task(page.live(self.server, load_page, done))
                           for page, done in zip(pages, opened)]
            await asyncio.gather(*opened)
            if answered:
                await wait_until(lambda: all(page.version is not None or not page.alive
                                             for page in pages), OPEN_TIMEOUT)

    async def arrive(self):
        """Connect the pages and wait until they are parked and the server is quiet.

        Notes how long that took in `setup_s`; raises SetupFailed if it takes longer than the
        server's setup_timeout.
        """
        timeout = self.server.setup_timeout
        started = time.perf_counter()
        try:
            await asyncio.wait_for(self.connect(), timeout)
            # Long enough for the presence announcement of the pages' arrival to come and go.
            settled = await self.settle(quiet_for=PRESENCE_INTERVAL * 1.5,
                                        timeout=max(1.0, started + timeout - time.perf_counter()))
        except asyncio.TimeoutError:
            settled = False
        if not settled:
            answered = sum(page.version is not None for page in self.pages)
            raise SetupFailed(f"after {timeout:g} s, {answered} of {len(self.pages)} pages had "
                              f"had a first answer and {self.parked_count()} were parked")
        self.setup_s = round(time.perf_counter() - started, 2)

    def arrived(self, message_id, when, size):
        times = self.arrivals[message_id]
        times.append(when)
        self.answer_sizes[message_id] = size
        if len(times) == len(self.pages):
            waiter = self._everyone_has.pop(message_id, None)
            if waiter is not None and not waiter.done():
                waiter.set_result(None)

    async def everyone_has(self, message_id, timeout=ROUND_TIMEOUT):
        """Wait until every page has the message; False if some still lack it after `timeout`."""
        if len(self.arrivals[message_id]) >= len(self.pages):
            return True
        waiter = self._everyone_has[message_id] = asyncio.get_running_loop().create_future()
        try:
            await asyncio.wait_for(waiter, timeout)
            return True
        except asyncio.TimeoutError:
            return False

    def parked_count(self):
        return sum(page.parked for page in self.pages)

    def alive_count(self):
        return sum(page.alive for page in self.pages)

    async def settle(self, quiet_for=0.0, timeout=SETTLE_TIMEOUT):
        """Wait until every page has a poll open and the server is quiet.

        With `quiet_for`, also wait until no answer has come for that many seconds: long enough
        for a presence announcement (at most one a second) to have come and gone.
        """
        deadline = time.perf_counter() + timeout
        while time.perf_counter() < deadline:
            self.server.check_alive()
            now = time.perf_counter()
            if self.parked_count() == self.alive_count() and now - self.last_answer >= quiet_for:
                # Check again after waiting for quiet: a page may have been answered meanwhile.
                if await server_is_quiet(self.server.meter) and (
                        self.parked_count() == self.alive_count()):
                    return True
            await asyncio.sleep(0.02)
        return False

    def check_deliveries(self, expected):
        """Compare what every page saw with the ids in `expected` (ascending). Returns counts."""
        wanted = set(expected)
        lost = duplicates = out_of_order = extra = complete = 0
        for page in self.pages:
            seen = page.seen
            got = set(seen)
            lost += len(wanted - got)
            extra += len(got - wanted)
            duplicates += len(seen) - len(got)
            out_of_order += sum(1 for a, b in zip(seen, seen[1:]) if b <= a)
            complete += seen == list(expected)
        return {"lost": lost, "duplicates": duplicates, "out_of_order": out_of_order,
                "unexpected": extra, "pages_complete": complete}

    async def close(self):
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        for page in self.pages:
            if page.connection:
                page.connection.close()
        await asyncio.sleep(0)


async def server_is_quiet(meter, window=0.1):
    """True if the server used at most one clock tick of CPU in the next `window` seconds."""
    if meter is None:
        await asyncio.sleep(0.3)  # no pid to watch: just give it a moment
        return True
    before = meter.cpu_seconds()
    await asyncio.sleep(window)
    return meter.cpu_seconds() - before <= 1.0 / CLOCK_TICKS


class Poster:
    """Posts messages over one keep-alive connection; each post can come from a new person."""

    def __init__(self, server):
        self.server = server
        self.connection = None
        self.origin = ("Origin", f"http://{server.host_header}")

    async def open(self):
        self.connection = await asyncio.wait_for(open_connection(self.server), OPEN_TIMEOUT)

    async def post(self, text, sid=None):
        """Post as `sid` (a new person if None). Returns (response, time the POST was sent).

        Raises ConnectionError if the server closes the connection twice, and
        asyncio.TimeoutError if no answer comes within POST_TIMEOUT.
        """
        head = header_block(self.server, sid or self.server.new_sid(),
                            [self.origin, ("Content-Type", "application/json")])
        body = json.dumps({"text": text}).encode()
        for attempt in range(2):
            # The server closes a keep-alive connection that stays idle too long (while the
            # pages of a big scenario connect, say); a browser then opens a new one, as we do.
            if self.connection is None or self.connection.closed:
                await self.open()
            sent = time.perf_counter()
            try:
                response = await asyncio.wait_for(
                    self.connection.request("POST", "/api/messages", head, body), POST_TIMEOUT)
                return response, sent
            except ConnectionError:
                if attempt == 1:
                    raise
                self.connection = None
            except asyncio.TimeoutError:
                self.connection.close()  # its answer may still come: a new POST needs a new one
                self.connection = None
                raise

    def close(self):
        if self.connection:
            self.connection.close()


def percentile(values, p):
    """The p-th percentile by the nearest-rank method (p99 of 100 values is the 99th smallest)."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, -(-len(ordered) * p // 100))  # ceil without floats
    return ordered[int(rank) - 1]


def ms(seconds):
    return None if seconds is None else round(seconds * 1000, 2)


def progress(text):
    print(text, file=sys.stderr, flush=True)


# ==================================================================================================
# The scenarios: each returns a dict of results (one JSON line, and rows of the table)
# ==================================================================================================

@contextlib.asynccontextmanager
async def parked_audience(server, size):
    """`size` pages with a poll parked and a poster ready, once the room is quiet; closed after."""
    audience = Audience(server, size)
    poster = Poster(server)
    try:
        await poster.open()
        await audience.arrive()
        yield audience, poster
    finally:
        poster.close()
        await audience.close()


async def post_one(poster, audience, text, posted):
    """Post `text`; return (message id, response, time sent) and note the id, or None if refused."""
    try:
        response, sent = await poster.post(text)
    except (ConnectionError, OSError, asyncio.TimeoutError) as error:
        audience.problems[f"POST failed: {type(error).__name__}"] += 1
        return None
    if response.status != 201:
        audience.problems[f"POST answered {response.status}"] += 1
        return None
    message_id = response.json()["message"]["id"]
    posted.append(message_id)
    return message_id, response, sent


async def single_delivery(server, rounds):
    """One parked page; a new person posts; time from POST to the page having the message."""
    async with parked_audience(server, 1) as (audience, poster):
        latencies, round_trips, posted = [], [], []
        watch = None
        for number in range(rounds + 1):  # round 0 is a warm-up
            if number == 1:
                watch = CpuWatch(server.meter).start()
            accepted = await post_one(poster, audience, f"single delivery, round {number}", posted)
            if accepted is None:
                continue
            message_id, response, sent = accepted
            if await audience.everyone_has(message_id) and number > 0:
                latencies.append(audience.arrivals[message_id][0] - sent)
                round_trips.append(response.received - sent)
            await wait_until(lambda: audience.parked_count() == 1, 5)
            await asyncio.sleep(0.05)  # the server has read the new poll and parked it
        cpu = watch.stop() if watch else {}
        return {"rounds": len(latencies), "p50_ms": ms(percentile(latencies, 50)),
                "p99_ms": ms(percentile(latencies, 99)), "max_ms": ms(max(latencies, default=None)),
                "post_ms": ms(percentile(round_trips, 50)),
                **audience.check_deliveries(posted), **cpu,
                **memory_fields(server.meter), **problems(audience),
                SAMPLES: {"post_ms": [ms(value) for value in round_trips]}}


async def fan_out(server, size, rounds):
    """N parked pages; each round a new person posts one message; how fast does it reach all?

    A slow server gets fewer rounds rather than an endless run: no round starts once
    FANOUT_SECONDS_PER_ROUND per round have passed, and the result says how many were run.
    """
    time_limit = FANOUT_SECONDS_PER_ROUND * rounds
    async with parked_audience(server, size) as (audience, poster):
        latencies, reach_all, first, round_trips, posted = [], [], [], [], []
        read_all, own_cpu = [], []  # when we had read every answer, and our CPU in between
        sent_at = {}  # message id -> time its POST was sent
        incomplete = unsettled = 0  # rounds not delivered to all in time; rounds that never settled
        watch = switches = None
        began = time.perf_counter()
        for number in range(rounds + 1):  # round 0 is a warm-up
            if time.perf_counter() - began > time_limit:
                audience.problems[f"time limit of {time_limit:g} s: "
                                  f"{max(0, number - 1)} of {rounds} rounds run"] += 1
                break
            if number == 1:
                switches = server.meter.context_switches() if server.meter else None
                watch = CpuWatch(server.meter).start()
            cpu_before = own_cpu_seconds()
            text = f"fan-out to {size}, round {number}"
            accepted = await post_one(poster, audience, text, posted)
            if accepted is None:
                continue
            message_id, response, sent = accepted
            sent_at[message_id] = sent
            everyone = await audience.everyone_has(message_id)
            if number > 0:
                incomplete += not everyone
                read_all.append(time.perf_counter() - sent)
                own_cpu.append(own_cpu_seconds() - cpu_before)
                times = [when - sent for when in audience.arrivals[message_id]]
                latencies += times
                if times:
                    first.append(min(times))
                if len(times) == size:
                    reach_all.append(max(times))
                round_trips.append(response.received - sent)
            # Every page has asked again and the server is idle.
            if not await audience.settle(timeout=ROUND_SETTLE_TIMEOUT):
                unsettled += 1
        cpu = watch.stop() if watch else {}
        deliveries = len(latencies)
        if switches is not None and deliveries:  # a thread switch costs more than most of a poll
            switches = round((server.meter.context_switches() - switches) / deliveries, 1)
        else:
            switches = None
        if "server_cpu_s" in cpu and deliveries:
            cpu["server_cpu_us_per_delivery"] = round(cpu["server_cpu_s"] / deliveries * 1e6, 1)
        # A delivery that came after ROUND_TIMEOUT was late for its round, but it came.
        late = sum(1 for message_id, sent in sent_at.items()
                   for when in audience.arrivals[message_id] if when - sent > ROUND_TIMEOUT)
        return {"n": size, "setup_s": audience.setup_s, "rounds": len(round_trips),
                "p50_ms": ms(percentile(latencies, 50)), "p99_ms": ms(percentile(latencies, 99)),
                "first_ms": ms(statistics.median(first)) if first else None,
                "reach_all_ms": ms(statistics.median(reach_all)) if reach_all else None,
                "reach_all_max_ms": ms(max(reach_all, default=None)),
                "post_ms": ms(statistics.median(round_trips)) if round_trips else None,
                "post_max_ms": ms(max(round_trips, default=None)),
                "switches_per_delivery": switches,
                "rounds_incomplete": incomplete, "late_deliveries": late,
                "rounds_unsettled": unsettled,
                "bench_read_all_ms": ms(statistics.median(read_all)) if read_all else None,
                "bench_round_cpu_ms": ms(statistics.median(own_cpu)) if own_cpu else None,
                **arrival_clock(audience, read_all, own_cpu),
                **audience.check_deliveries(posted), **cpu, **memory_fields(server.meter),
                **problems(audience),
                # Every round's figure, so that a comparison can show the spread over rounds.
                SAMPLES: {"reach_all_ms": [ms(value) for value in reach_all],
                          "first_ms": [ms(value) for value in first],
                          "post_ms": [ms(value) for value in round_trips]}}


async def idle_cost(server, size, seconds):
    """N parked pages and nothing happening: server CPU over the window, and its memory."""
    audience = Audience(server, size)
    try:
        await audience.arrive()
        answers_before = audience.answers
        meter = server.meter
        own_before = own_cpu_seconds()
        server_before = meter.precise_cpu_seconds() if meter else None
        await asyncio.sleep(seconds)
        result = {"n": size, "seconds": seconds, "setup_s": audience.setup_s,
                  "bench_cpu_s": round(own_cpu_seconds() - own_before, 3),
                  "answers_in_window": audience.answers - answers_before}
        if meter:
            result["cpu_s"] = round(meter.precise_cpu_seconds() - server_before, 4)
            result["server_cpu_s"] = result["cpu_s"]
        return {**result, **memory_fields(meter), **problems(audience)}
    finally:
        await audience.close()


async def answer_bytes(server, size):
    """The size of the answer that carries one new message to a parked page."""
    async with parked_audience(server, size) as (audience, poster):
        watch = CpuWatch(server.meter).start()
        accepted = await post_one(poster, audience, "How big is the answer that brings me to you?",
                                  [])
        if accepted is None:
            return {"n": size, "lost": size, **problems(audience)}
        message_id, response, sent = accepted
        delivered = await audience.everyone_has(message_id)
        await audience.settle()
        return {"n": size, "broadcast_bytes": audience.answer_sizes.get(message_id),
                "post_answer_bytes": response.size, "snapshot_bytes": audience.snapshot_bytes,
                "largest_answer_bytes": audience.largest_answer,
                "lost": 0 if delivered else size - len(audience.arrivals[message_id]),
                **watch.stop(), **memory_fields(server.meter), **problems(audience)}


async def crowd(server, size):
    """N people open the room at the same moment: page, chime, first poll, then park."""
    audience = Audience(server, size)
    watch = CpuWatch(server.meter).start()
    started = time.perf_counter()
    try:
        await audience.connect(batch=size, load_page=True, answered=False)  # all at once
        connected = time.perf_counter() - started
        await wait_until(lambda: all(page.version is not None or not page.alive
                                     for page in audience.pages), SETTLE_TIMEOUT)
        all_answered = time.perf_counter() - started
        await wait_until(lambda: audience.parked_count() == audience.alive_count(), SETTLE_TIMEOUT)
        all_parked = time.perf_counter() - started
        # Settled: every page parked, no answer for longer than a presence interval, and the
        # server quiet. It settled when the last page asked again (and stayed parked).
        settled = await audience.settle(quiet_for=PRESENCE_INTERVAL * 1.5)
        settle_s = max(audience.last_poll_sent - started, all_parked) if settled else None
        return {"n": size, "connected_s": round(connected, 3),
                "first_answers_s": round(all_answered, 3), "all_parked_s": round(all_parked, 3),
                "settle_s": None if settle_s is None else round(settle_s, 3),
                "answers": audience.answers, "largest_answer_bytes": audience.largest_answer,
                **watch.stop(), **memory_fields(server.meter), **problems(audience)}
    finally:
        await audience.close()


def startup(contender, messages, scratch):
    """Seconds from starting chatroom.py to its first answer, with `messages` stored."""
    script = contender.script
    cached, built = cached_data_file(script, messages, scratch)
    result = {"messages": messages, "build_s": round(built, 1)}
    for label, source in (("empty", None), ("full", cached)):
        starts, firsts = [], []
        for attempt in range(STARTUP_REPEATS):
            data = Path(scratch) / f"startup-{contender.name}-{label}-{attempt}.db"
            if source:
                shutil.copyfile(source, data)
            server = LocalServer(script, data, *contender.options)
            try:
                started = time.perf_counter()
                server.start()
                starts.append(time.perf_counter() - started)
                first_poll(server)
                firsts.append(time.perf_counter() - started)
                rss = server.meter.memory()[0]
            finally:
                server.stop()
            data.unlink(missing_ok=True)
        prefix = "" if source else "empty_"
        result[prefix + "start_s"] = round(statistics.median(starts), 3)
        result[prefix + "first_answer_s"] = round(statistics.median(firsts), 3)
        result[prefix + "rss_mb"] = round(rss, 1)
    return result


def first_poll(server):
    """A page's first poll (a snapshot), with plain http.client: one request needs no loop."""
    connection = http.client.HTTPConnection(server.host, server.port, timeout=30)
    try:
        connection.request("GET", "/api/poll", headers={
            "Host": server.host_header, "Cookie": f"sid={server.new_sid()}"})
        response = connection.getresponse()
        response.read()
        if response.status != 200:
            raise RuntimeError(f"the first poll answered {response.status}")
    finally:
        connection.close()


async def sustained(server, posters, listeners, seconds):
    """`posters` people chat within the rate limits while `listeners` pages listen."""
    audience = Audience(server, listeners)
    people = [Poster(server) for _ in range(posters)]
    accepted, refused = {}, collections.Counter()  # message id -> time the POST was sent
    round_trips = []
    try:
        await asyncio.gather(*(person.open() for person in people))
        await audience.arrive()
        watch = CpuWatch(server.meter).start()
        began = time.perf_counter()

        async def chat(person, sid):
            await asyncio.sleep(random.uniform(0, SUSTAINED_POST_INTERVAL))  # spread them out
            for number in range(int(seconds / SUSTAINED_POST_INTERVAL) + 1):
                sent = time.perf_counter()
                try:
                    response, sent = await person.post(f"sustained message {number}", sid)
                except (ConnectionError, OSError, asyncio.TimeoutError) as error:
                    refused[type(error).__name__] += 1  # no answer in time, or no connection
                else:
                    if response.status == 201:
                        accepted[response.json()["message"]["id"]] = sent
                        round_trips.append(response.received - sent)
                    else:
                        refused[response.status] += 1
                next_post = sent + SUSTAINED_POST_INTERVAL
                if next_post - began >= seconds:
                    return
                await asyncio.sleep(max(0.0, next_post - time.perf_counter()))

        await asyncio.gather(*(chat(person, server.new_sid()) for person in people))
        posting_s = max(seconds, time.perf_counter() - began)  # the window, or longer if slow
        expected = sorted(accepted)
        if expected:
            await audience.everyone_has(expected[-1], ROUND_TIMEOUT)
        await audience.settle()
        latencies = [when - accepted[message_id]
                     for message_id in expected for when in audience.arrivals[message_id]]
        return {"posters": posters, "listeners": listeners, "seconds": round(posting_s, 1),
                "setup_s": audience.setup_s,
                "accepted": len(expected), "accepted_per_s": round(len(expected) / posting_s, 2),
                "refused": dict(refused), "deliveries": len(latencies),
                "p50_ms": ms(percentile(latencies, 50)), "p99_ms": ms(percentile(latencies, 99)),
                "post_ms": ms(percentile(round_trips, 50)),
                **audience.check_deliveries(expected), **watch.stop(),
                **memory_fields(server.meter), **problems(audience),
                SAMPLES: {"post_ms": [ms(value) for value in round_trips]}}
    finally:
        for person in people:
            person.close()
        await audience.close()


async def wait_until(predicate, timeout, interval=0.01):
    deadline = time.perf_counter() + timeout
    while not predicate():
        if time.perf_counter() > deadline:
            return False
        await asyncio.sleep(interval)
    return True


BUSY_SHARE = 0.8  # a benchmark that used this share of a round's time in CPU was the bottleneck


def arrival_clock(audience, read_all, own_cpu):
    """Say how arrival times were taken, and whether the benchmark itself was what was slow.

    With the kernel's receive times, a page "has" its answer when the answer reached its socket,
    whatever this process was busy with. Without them (not Linux), it is when we read it; and
    if reading every answer kept us busy for most of that time, the figure measures us.
    """
    if audience.unstamped == 0:
        return {"arrival_clock": "kernel receive times"}
    busy = bool(read_all) and statistics.median(own_cpu) >= BUSY_SHARE * statistics.median(read_all)
    return {"arrival_clock": "our read times" + (": BOUNDED BY THE BENCHMARK" if busy else "")}


def problems(audience):
    return {"problems": dict(audience.problems)} if audience.problems else {}


# ==================================================================================================
# Running the scenarios, and the report
# ==================================================================================================

class Contender:
    """A server to measure: a chatroom.py, the options it is always started with, and a name."""

    def __init__(self, name, script, options=()):
        self.name = name
        self.script = Path(script).resolve()
        self.options = [str(option) for option in options]


def describe(error):
    """An exception in one line: its type and the first line of its message."""
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[0]}" if text else type(error).__name__


class RunTimedOut(Exception):
    """A scenario outlived --run-timeout on one server."""


async def within(coroutine, seconds):
    try:
        return await asyncio.wait_for(coroutine, seconds)
    except asyncio.TimeoutError:
        raise RunTimedOut(f"stopped after {seconds:g} s (--run-timeout)") from None


def scenario_jobs(args, scratch):
    """The runs the chosen scenarios ask for, in order, as (scenario, label, job).

    job(contender) runs the scenario once against a fresh server of that contender (or the one
    at --url) and returns its result. A run that fails returns {"failed": why}, not an exception:
    a slow server that loses a round must still get its column in the table.
    """
    counter = itertools.count()
    built = {}  # script -> a data file with args.bytes_history messages, built once

    def run(contender, make_coroutine, *options, data=None):
        if args.url:
            room = RunningServer(args.url, args.pid)
        else:
            room = LocalServer(contender.script, Path(scratch) / f"room-{next(counter)}.db",
                               *contender.options, *options)
            if data:
                shutil.copyfile(data, room.data_path)  # a run may add to it: each gets a copy
        try:
            room.setup_timeout = args.setup_timeout
            with room:
                result = asyncio.run(within(make_coroutine(room), args.run_timeout))
        except Exception as error:  # a failed run is a result too
            result = {"failed": describe(error)}
            progress(f"    the run failed: {result['failed']}")
        for name, value in room.log_summary().items():
            if name == "problems":
                result.setdefault("problems", {}).update(value)
            else:
                result[name] = value
        return result

    def history(contender):
        if contender.script not in built:
            built[contender.script] = Path(scratch) / f"history-{len(built)}.db"
            build_data_file(contender.script, built[contender.script], args.bytes_history)
        return built[contender.script]

    def sizes(text):
        return [int(size) for size in text.split(",") if size]

    chosen = args.scenarios.split(",")
    if "single" in chosen:
        yield "single", "single", lambda contender: run(
            contender, lambda room: single_delivery(room, args.single_rounds))
    if "fanout" in chosen:
        for size in sizes(args.fanout_sizes):
            yield "fanout", f"fanout N={size}", lambda contender, size=size: {"n": size, **run(
                contender, lambda room: fan_out(room, size, args.rounds))}
    if "idle" in chosen:
        for size in sizes(args.idle_sizes):
            # Polls must not time out inside the window we measure: the server gets 60 s.
            def idle(contender, size=size):
                result = {"n": size, **run(contender, lambda room: idle_cost(
                    room, size, args.idle_seconds), "--poll-timeout", 60)}
                result["note"] = ("server started with --poll-timeout 60" if not args.url
                                  else "the running server's poll time-out is unknown")
                return result
            yield "idle", f"idle N={size}", idle
    if "bytes" in chosen:
        def bytes_run(contender):
            data = None if args.url else history(contender)
            result = {"n": args.bytes_clients,
                      **run(contender, lambda room: answer_bytes(room, args.bytes_clients),
                            data=data)}
            result["history"] = "as it is" if args.url else args.bytes_history
            return result
        yield "bytes", f"bytes N={args.bytes_clients}", bytes_run
    if "crowd" in chosen:
        yield "crowd", f"crowd N={args.crowd}", lambda contender: {"n": args.crowd, **run(
            contender, lambda room: crowd(room, args.crowd))}
    if "startup" in chosen and not args.url:  # needs servers of our own
        def startup_run(contender):
            try:
                return startup(contender, args.startup_messages, scratch)
            except Exception as error:
                return {"messages": args.startup_messages, "failed": describe(error)}
        yield "startup", "startup", startup_run
    if "sustained" in chosen:
        yield "sustained", "sustained", lambda contender: run(
            contender, lambda room: sustained(room, args.posters, args.listeners,
                                              args.sustained_seconds))


def run_scenarios(args, scratch):
    """Yield (scenario, label, result) for each scenario chosen, each on a fresh server."""
    contender = Contender("chatroom", args.chatroom)
    for scenario, label, job in scenario_jobs(args, scratch):
        if scenario == "crowd":
            # One crowd is one sample of a noisy machine: show the median of a few.
            count = 1 if args.url else args.crowd_runs
            yield scenario, label, median_run([job(contender) for _ in range(count)], "settle_s")
        else:
            yield scenario, label, job(contender)


def run_comparison(args, scratch, contenders):
    """Yield (scenario, label, contender, run number, result): each scenario, run by run.

    Within a scenario the contenders take turns, A B A B, each run on a fresh server: the
    machine's drift (someone else's tests starting, say) then falls on all of them alike,
    rather than on whichever happened to be measured second.
    """
    for scenario, label, job in scenario_jobs(args, scratch):
        given_up = {}  # contender name -> why its next runs of this scenario are not worth it
        for number in range(1, args.runs + 1):
            for contender in contenders:
                if contender.name in given_up:
                    yield scenario, label, contender, number, {"failed": given_up[contender.name]}
                    continue
                progress(f"  {label}, run {number} of {args.runs}: {contender.name}")
                result = job(contender)
                # A server that could not take the pages in, or ran out of time, costs minutes
                # a run and would again: once is enough to say so.
                if result.get("failed", "").startswith(("SetupFailed", "RunTimedOut")):
                    given_up[contender.name] = f"not run again after run {number} failed"
                yield scenario, label, contender, number, result


def median_run(runs, metric):
    """The run with the median `metric` (None counts as the worst), with every run's value."""
    def key(result):
        return math.inf if result.get(metric) is None else result[metric]
    ranked = sorted(runs, key=key)
    return {**ranked[(len(ranked) - 1) // 2],
            f"{metric}_runs": [result.get(metric) for result in runs]}


SETUP_LABEL = f"pages in, parked and quiet ({CONNECT_BATCH} at a time, s)"
# What the table shows for each scenario, in order: (metric, label).
TABLE = {
    "single": [("p50_ms", "delivery p50 (ms)"), ("p99_ms", "delivery p99 (ms)"),
               ("post_ms", "POST round trip p50 (ms)"), ("lost", "lost deliveries")],
    "fanout": [("setup_s", SETUP_LABEL),
               ("p50_ms", "per-page latency p50 (ms)"), ("p99_ms", "per-page latency p99 (ms)"),
               ("first_ms", "first page reached (ms, median)"),
               ("reach_all_ms", "everyone reached (ms, median)"),
               ("reach_all_max_ms", "everyone reached (ms, worst)"),
               ("post_ms", "POST round trip (ms, median)"), ("rounds", "rounds measured"),
               ("rounds_incomplete", f"rounds not everyone had within {ROUND_TIMEOUT:g} s"),
               ("late_deliveries", f"deliveries later than {ROUND_TIMEOUT:g} s"),
               ("rounds_unsettled", f"rounds not settled within {ROUND_SETTLE_TIMEOUT:g} s"),
               ("lost", "lost deliveries"), ("duplicates", "duplicate deliveries"),
               ("switches_per_delivery", "server context switches / delivery"),
               ("server_cpu_us_per_delivery", "server CPU / delivery (microseconds)"),
               ("rss_mb", "server RSS (MB)"), ("threads", "server threads"),
               ("arrival_clock", "arrival times are"),
               ("bench_read_all_ms", "benchmark had read every answer (ms, median)"),
               ("bench_round_cpu_ms", "benchmark CPU in that time (ms, median)")],
    "idle": [("cpu_s", "server CPU in window (s)"), ("answers_in_window", "answers in window"),
             ("rss_mb", "server RSS (MB)"), ("threads", "server threads")],
    "bytes": [("broadcast_bytes", "answer carrying a message (B)"),
              ("post_answer_bytes", "201 answer to the POST (B)"),
              ("snapshot_bytes", "first answer, a snapshot (B)"),
              ("largest_answer_bytes", "largest answer seen (B)"), ("lost", "lost deliveries")],
    "crowd": [("connected_s", "all connected, page loaded (s)"),
              ("first_answers_s", "all had a first answer (s)"),
              ("all_parked_s", "all parked once (s)"),
              ("settle_s", "settled: parked and quiet (s, median run)"),
              ("settle_s_runs", "settled, each run (s)"),
              ("answers", "poll answers sent"), ("largest_answer_bytes", "largest answer (B)"),
              ("rss_mb", "server RSS (MB)")],
    "startup": [("messages", "messages stored"), ("start_s", "start-up, address printed (s)"),
                ("first_answer_s", "start-up, first poll answered (s)"),
                ("empty_start_s", "start-up, empty file (s)"), ("rss_mb", "server RSS (MB)")],
    "sustained": [("setup_s", SETUP_LABEL), ("accepted_per_s", "messages accepted per second"),
                  ("accepted", "messages accepted"), ("refused", "posts refused"),
                  ("p50_ms", "delivery p50 (ms)"), ("p99_ms", "delivery p99 (ms)"),
                  ("post_ms", "POST round trip p50 (ms)"),
                  ("pages_complete", "listeners who saw all, once, in order"),
                  ("lost", "lost deliveries"), ("duplicates", "duplicate deliveries"),
                  ("out_of_order", "out-of-order deliveries"), ("rss_mb", "server RSS (MB)")],
}


def target_for(scenario, result, metric):
    for target_scenario, size, target_metric, limit in TARGETS:
        if target_metric == metric and target_scenario in (None, scenario) \
                and size in (None, result.get("n")):
            return limit
    return None


def print_rows(rows, right_aligned, out):
    """Rows of text as columns; the first row is the heading, underlined."""
    widths = [max(len(row[column]) for row in rows) for column in range(len(rows[0]))]
    for index, row in enumerate(rows):
        print("  ".join(cell.rjust(width) if column in right_aligned else cell.ljust(width)
                        for column, (cell, width) in enumerate(zip(row, widths))).rstrip(),
              file=out)
        if index == 0:
            print("  ".join("-" * width for width in widths), file=out)


def print_table(results, out=sys.stdout):
    rows = [("scenario", "metric", "value", "target", "")]
    for scenario, label, result in results:
        if "failed" in result:
            rows.append((label, "the run failed", result["failed"], "", "MISSED"))
        for metric, text in TABLE[scenario]:
            if metric not in result:
                continue
            value = result[metric]
            limit = target_for(scenario, result, metric)
            verdict = ""
            if limit is not None:
                verdict = "ok" if value is not None and value <= limit else "MISSED"
            shown = "-" if value is None else str(value) if not isinstance(value, float) \
                else f"{value:g}"
            rows.append((label, text, shown, "" if limit is None else f"<= {limit:g}", verdict))
        cpu = f"{result.get('server_cpu_s', '-')} / {result.get('bench_cpu_s', '-')}"
        if "bench_cpu_s" in result:
            rows.append((label, "CPU s: server / benchmark", cpu, "", ""))
        if result.get("problems"):
            rows.append((label, "problems", json.dumps(result["problems"]), "", "MISSED"))
    print_rows(rows, {2}, out)


# --- Comparing servers ----------------------------------------------------------------------

# Counts that add up over runs: a comparison shows their total, not a typical run's.
SUMMED = {"lost", "duplicates", "out_of_order", "unexpected", "rounds_incomplete",
          "late_deliveries", "rounds_unsettled"}
COMPARE_SKIP = {"reach_all_max_ms", "settle_s_runs"}  # the spread in each cell says it already
COMPARE_EXTRA = [("server_cpu_s", "server CPU in the measured part (s)"),
                 ("bench_cpu_s", "benchmark CPU in the measured part (s)")]
# Figures that pool every round (or POST) of every run get a label that says so.
COMPARE_LABELS = {("single", "post_ms"): "POST round trip (ms), each round",
                  ("fanout", "first_ms"): "first page reached (ms), each round",
                  ("fanout", "reach_all_ms"): "everyone reached (ms), each round",
                  ("fanout", "post_ms"): "POST round trip (ms), each round",
                  ("sustained", "post_ms"): "POST round trip (ms), each POST"}
# A ratio of two servers' figures means something for times, CPU, memory and rates.
RATIO_SUFFIXES = ("_ms", "_s", "_mb", "_bytes", "_per_delivery", "_per_s")


def number(value):
    """A figure with as many digits as a noisy machine deserves: about three."""
    if isinstance(value, int):
        return str(value)
    size = abs(value)
    if size >= 100:
        return f"{value:.0f}"
    if size >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}" if size >= 0.1 else f"{value:.2g}"  # (0.0009, not 0.00)


def summarise(metric, runs):
    """(a typical value or None, the text of a cell) for `metric` over one contender's runs.

    Where the runs kept every round's figure (SAMPLES), the rounds of all runs are pooled: the
    median of them all, and their range. Otherwise each run gives one figure: the median of the
    runs, and their range. Counts of what went wrong (SUMMED) are added up.
    """
    done = [result for result in runs if "failed" not in result]
    present = [result[metric] for result in done if result.get(metric) is not None]
    if metric in SUMMED:
        return (sum(present), str(sum(present))) if present else (None, "-")
    values = [value for result in done for value in result.get(SAMPLES, {}).get(metric, ())]
    if not values:
        values = [value for value in present
                  if isinstance(value, (int, float)) and not isinstance(value, bool)]
    if values:
        middle, low, high = statistics.median(values), min(values), max(values)
        if all(isinstance(value, int) for value in values) and middle == int(middle):
            middle = int(middle)
        if low == high:
            return middle, number(middle)
        return middle, f"{number(middle)} ({number(low)}-{number(high)})"
    shown = []
    for value in present:
        text = json.dumps(value) if isinstance(value, (dict, list)) else str(value)
        if text not in shown:
            shown.append(text)
    return None, " / ".join(shown) or "-"


def print_comparison(groups, contenders, out=sys.stdout):
    """One table, a column per contender; `groups` is [(scenario, label, {name: [result]})]."""
    names = [contender.name for contender in contenders]
    ratio = "plain" in names and "full" in names
    rows = [("scenario", "metric", *names, *(["plain / full"] if ratio else []))]
    notes = []
    for scenario, label, runs in groups:
        rows.append((label, "runs completed", *(
            f"{sum('failed' not in result for result in runs[name])} of {len(runs[name])}"
            for name in names), *([""] if ratio else [])))
        pooled = {metric for results in runs.values() for result in results
                  for metric in result.get(SAMPLES, {})}
        metrics = [(metric, text) for metric, text in TABLE[scenario] + COMPARE_EXTRA
                   if metric not in COMPARE_SKIP]
        for metric, text in metrics:
            if not any(metric in result for results in runs.values() for result in results):
                continue
            cells = {name: summarise(metric, runs[name]) for name in names}
            if metric in pooled:
                text = COMPARE_LABELS.get((scenario, metric), text + ", each round")
            row = [label, text, *(cells[name][1] for name in names)]
            if ratio:
                full, plain = cells["full"][0], cells["plain"][0]
                row.append(f"{plain / full:.1f}x" if metric.endswith(RATIO_SUFFIXES) and full
                           and plain is not None else "")
            rows.append(tuple(row))
        for name in names:
            problems_seen = collections.Counter()
            for run, result in enumerate(runs[name], 1):
                if "failed" in result:
                    notes.append(f"{label}, {name}, run {run}: failed: {result['failed']}")
                problems_seen.update(result.get("problems", {}))
            if problems_seen:
                notes.append(f"{label}, {name}: problems over all runs: "
                             f"{json.dumps(dict(problems_seen))}")
    print_rows(rows, set(range(2, len(rows[0]))), out)
    print("\nEach cell: the median, and (min-max). Rows that say \"each round\" or \"each POST\""
          "\npool those of every run; the others take one figure per run. Counts of lost,"
          "\nduplicate, late or out-of-order deliveries are totals over all runs.", file=out)
    if notes:
        print("\n" + "\n".join(notes), file=out)


def parse_against(text):
    name, equals, path = text.partition("=")
    if not equals or not name or not path:
        raise argparse.ArgumentTypeError(f"expected NAME=PATH, got {text!r}")
    if not Path(path).is_file():
        raise argparse.ArgumentTypeError(f"no such file: {path}")
    return name, path


def parse_arguments(argv):
    parser = argparse.ArgumentParser(description="Benchmark chatroom.py's long-polling.")
    parser.add_argument("--chatroom", default=Path(__file__).resolve().parent / "chatroom.py",
                        help="the chatroom.py to start (default: the one beside this file)")
    parser.add_argument("--url", help="measure a server that is already running, at this URL")
    parser.add_argument("--pid", type=int, help="with --url: its process id, for CPU and memory")
    parser.add_argument("--compare", action="store_true",
                        help="measure chatroom.py and chatroom.py --plain in turns; one table "
                             "with a column for each (scenarios: fanout,sustained unless chosen)")
    parser.add_argument("--against", action="append", default=[], type=parse_against,
                        metavar="NAME=PATH", help="with --compare (implied): one more column, a "
                        "copy of chatroom.py at PATH, started without --plain; can be repeated")
    parser.add_argument("--runs", type=int, default=2, metavar="RUNS",
                        help="with --compare: runs of each scenario on each server (default 2)")
    parser.add_argument("--run-timeout", type=float, default=RUN_TIMEOUT, metavar="SECONDS",
                        help="a scenario that takes longer on one server is stopped and counted "
                             "as failed (default %(default)g)")
    parser.add_argument("--setup-timeout", type=float, default=SETUP_TIMEOUT, metavar="SECONDS",
                        help="the pages of a scenario must be in and parked within this, or the "
                             "run fails (default %(default)g)")
    parser.add_argument("--scenarios", default=",".join(SCENARIOS),
                        help="comma-separated, from: %(default)s")
    parser.add_argument("--quick", action="store_true", help="small sizes, for a smoke test")
    parser.add_argument("--single-rounds", type=int, default=30)
    parser.add_argument("--fanout-sizes", default="100,1000,2000", metavar="N,N,...")
    parser.add_argument("--rounds", type=int, default=10, help="fan-out rounds (default 10)")
    parser.add_argument("--idle-sizes", default="1000,2000", metavar="N,N,...")
    parser.add_argument("--idle-seconds", type=float, default=10.0)
    parser.add_argument("--bytes-clients", type=int, default=2000, metavar="N")
    parser.add_argument("--bytes-history", type=int, default=10_000, metavar="MESSAGES")
    parser.add_argument("--crowd", type=int, default=2000, metavar="N")
    parser.add_argument("--crowd-runs", type=int, default=3, metavar="RUNS")
    parser.add_argument("--startup-messages", type=int, default=1_000_000)
    parser.add_argument("--posters", type=int, default=50)
    parser.add_argument("--listeners", type=int, default=500)
    parser.add_argument("--sustained-seconds", type=float, default=20.0)
    args = parser.parse_args(argv)
    args.compare = args.compare or bool(args.against)
    sizes = dict(QUICK_SIZES) if args.quick else {}
    if args.compare:
        sizes.update(COMPARE_QUICK_SIZES if args.quick else COMPARE_SIZES)
    for name, value in sizes.items():  # only where the command line did not choose
        if getattr(args, name) == parser.get_default(name):
            setattr(args, name, value)
    unknown = set(args.scenarios.split(",")) - set(SCENARIOS)
    if unknown:
        parser.error(f"unknown scenarios: {', '.join(sorted(unknown))}")
    if args.pid and not args.url:
        parser.error("--pid goes with --url")
    if args.compare and args.url:
        parser.error("--compare starts servers of its own; it cannot use --url")
    names = [name for name, _ in args.against]
    if len(set(names)) < len(names) or {"full", "plain"} & set(names):
        parser.error("each --against needs a name of its own, other than full and plain")
    if args.runs < 1 or args.run_timeout <= 0 or args.setup_timeout <= 0:
        parser.error("--runs, --run-timeout and --setup-timeout must be positive")
    return args


def raise_open_file_limit():
    """Every simulated page is an open socket; the usual limit of 1024 is too few."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = 65536 if hard == resource.RLIM_INFINITY else min(hard, 65536)
    if soft < wanted:
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))


def printable(result):
    """A result without its per-round samples, for a JSON line."""
    return {name: value for name, value in result.items() if name != SAMPLES}


def compare(args):
    """Run the comparison and print its table, then one JSON line per run."""
    script = Path(args.chatroom).resolve()
    contenders = [*(Contender(name, path) for name, path in args.against),
                  Contender("full", script), Contender("plain", script, ["--plain"])]
    progress(f"comparing {len(contenders)} servers, {args.runs} runs each, taking turns, "
             f"with Python {sys.version.split()[0]} on {os.cpu_count()} CPUs")
    groups, lines = {}, []
    with tempfile.TemporaryDirectory(prefix="chatroom-bench-") as scratch:
        for scenario, label, contender, run, result in run_comparison(args, scratch, contenders):
            progress(f"    {json.dumps(printable(result))}")
            runs = groups.setdefault(label, (scenario, {name.name: [] for name in contenders}))[1]
            runs[contender.name].append(result)
            lines.append({"scenario": scenario, "label": label, "server": contender.name,
                          "run": run, **printable(result)})
    print()
    for contender in contenders:
        print(f"{contender.name}: {' '.join([str(contender.script), *contender.options])}")
    print()
    print_comparison([(scenario, label, runs) for label, (scenario, runs) in groups.items()],
                     contenders)
    print()
    for line in lines:
        print(json.dumps(line))
    return 0


def main(argv=None):
    args = parse_arguments(argv)
    raise_open_file_limit()
    if args.compare:
        return compare(args)
    target = args.url or Path(args.chatroom).resolve()
    progress(f"benchmarking {target} with Python {sys.version.split()[0]} "
             f"on {os.cpu_count()} CPUs")
    results = []
    with tempfile.TemporaryDirectory(prefix="chatroom-bench-") as scratch:
        for scenario, label, result in run_scenarios(args, scratch):
            progress(f"  {label}: {json.dumps(printable(result))}")
            results.append((scenario, label, result))
    print(f"\nchatroom: {target}")
    print_table(results)
    print()
    for scenario, label, result in results:
        print(json.dumps({"scenario": scenario, **printable(result)}))
    missed = ["failed" in result for scenario, label, result in results] + [
        1 for scenario, label, result in results for metric, _ in TABLE[scenario]
        if target_for(scenario, result, metric) is not None and metric in result
        and (result[metric] is None or result[metric] > target_for(scenario, result, metric))]
    return 1 if any(missed) else 0


if __name__ == "__main__":
    sys.exit(main())
