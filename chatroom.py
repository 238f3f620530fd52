"""A chat room that delivers every message to every open page at once, using HTTP long-polling.

Run it:    python chatroom.py            then open http://127.0.0.1:8000/ in two browser windows
           python chatroom.py --plain    the same room, made of Part I of this file alone
Options:   python chatroom.py --help

Everything lives in this file and Python's standard library: the web server is http.server, with a
thread for each connection (only one thread runs Python at a time: it must hold CPython's global
interpreter lock, the GIL), and messages are kept in an SQLite file. The page the browser loads is
index.html, next to this file; chime.wav is the sound it plays.

Long-polling in one paragraph
-----------------------------
The room has a *version*: a number that grows by one whenever anything in the room changes (a new
message, a new name, someone arriving or leaving). A page asks `GET /api/poll?since=41`, meaning
"I have seen everything up to version 41: what is new?". If the room is already past 41, the server
answers at once. If not, it does not answer yet: the request is *parked*, its thread waiting on a
threading.Condition. When another thread changes the room (say, to add a message), it saves the
change, moves the version on and calls notify_all(): every parked thread wakes up, sees that the
room has moved past what its page has, and writes its own page's response. If nothing changes for
25 s, the parked thread answers "nothing new". Either way the page at once asks again with the
newest version it has. So a message reaches every open page within milliseconds, while an idle page
costs one request every 25 seconds: no WebSockets, and no asking every second "anything new?".

    page A                              server                             page B
    GET /api/poll?since=41  ------->    41 is the newest: A's thread waits on the Condition
                                                       <-------  POST /api/messages {"text": "hi"}
                                        B's thread saves "hi" as version 42, and notify_all()
                                                       ------->  201 {"message": {"id": 42, ...}}
                                        A's thread wakes, and writes what is new since 41:
            <-------  200 {"version": 42, "messages": [{"id": 42, "text": "hi", ...}]}
    GET /api/poll?since=42  ------->    42 is the newest: A's thread waits again

How this file is organised
--------------------------
In three layers, each readable alone, put together the way socketserver puts its classes together
(`class ThreadingTCPServer(ThreadingMixIn, TCPServer): pass`):

  PART I. THE ROOM      The design above, whole and correct, and nothing else: the room and its
                        Condition, who is online, who you are, how often you may post, storage,
                        the HTTP handler, the server. Read it once, top to bottom, and you know the
                        room. `python chatroom.py --plain` runs Part I alone.
  PART II. SPEED        What lets the same room serve thousands of open pages on one core. Each
                        block names the cost it removes, the change, and the benchmark scenario
                        (bench_chatroom.py) that measures it.
  PART III. DEFENCES    What a room on the open network must survive: hostile, slow and broken
                        clients. Each block names the threat, the defence, and the test
                        (test_chatroom.py) that proves it.
  THE ROOM, COMPOSED    Part I's classes with Part II's and Part III's mixed in, then main().

A later part only adds to an earlier one, by subclassing, through the hooks that http.server and
socketserver offer (setup, handle_one_request, parse_request, process_request, service_actions)
and a few of Part I's own; no part uses a name from a later part. The tests run every request a
client can make against both --plain and the full server: the later layers change what the room
costs and what it survives, never what it does.
"""

import _thread
import argparse
import base64
import bisect
import collections
import contextlib
import email.utils
import gzip
import hashlib
import hmac
import http
import http.server
import io
import ipaddress
import itertools
import json
import math
import os
import re
import secrets
import select
import selectors
import signal
import socket
import sqlite3
import struct
import sys
import threading
import time
import traceback
import unicodedata
from pathlib import Path
from urllib.parse import parse_qs


# ##################################################################################################
# PART I. THE ROOM
# ##################################################################################################
# The whole room, plain and correct. A few of its methods are also the hooks that Parts II and III
# override (Room.publish, Room.answer, Presence.poll_began, Presence.wait_until_time_to_look,
# ChatHandler.new_poll, ChatHandler.send, count_post, uncount_post, issue_session_id): here they do
# the simplest thing that works, and some take what only a later part uses (a poll's connection,
# the message a change published).
#
# Short of time? The long-poll itself is section 2 (Room: poll, wait_for_change, answer, publish)
# and, in section 7, ChatHandler.get_poll and post_message. The rest is what a room needs around
# it: who is online, who you are, the rate limit, storage that loses nothing, bad input refused.

# ==================================================================================================
# 1. Settings
# ==================================================================================================

# Serving.
DEFAULT_HOST = "127.0.0.1"  # this machine only; --host 0.0.0.0 lets others on the network join
DEFAULT_PORT = 8000
LISTEN_BACKLOG = 4096  # connections the kernel queues for us until accept(): a crowd arriving at
#                        once must wait in this queue, not be refused (the stdlib's default is 5;
#                        Linux caps the number at net.core.somaxconn, 4096 on recent kernels)
OPEN_FILES = 65536  # open files we ask the system to allow (each connection is one): room for
#                     thousands of pages, where many systems allow 1024 unless asked
SHUTDOWN_GRACE = 2.0  # seconds we give requests in progress to finish when the server stops:
#                      parked polls answer at once, so this is for responses still being written
SHUTDOWN_CHECK_INTERVAL = 0.01  # seconds between two looks at whether they have finished

# Long-polling.
DEFAULT_POLL_TIMEOUT = 25  # seconds a poll stays parked; well under the ~60 s after which proxies
#                            and home routers cut a connection that carries no data
MAX_POLL_TIMEOUT = 60  # the longest a client may ask for, for the same reason
DEFAULT_ONLINE_WINDOW = 30  # seconds after their last poll that someone still counts as online:
#                             longer than a poll's wait, and a page that lost its connection for a
#                             moment is back well within it
PRESENCE_INTERVAL = 1.0  # seconds between two looks at who is online: each change of the list
#                          wakes every parked poll, so at most this often

# Messages and names.
SNAPSHOT_SIZE = 100  # messages a page gets when it first loads: a few screens' worth; older
#                     ones come a page at a time if the reader scrolls back
MAX_BATCH = 500  # messages in one response to a page that fell far behind; it asks again for the
#                  rest (fewer if they are long: see MAX_ANSWER_BYTES)
HISTORY_PAGE = 100  # older messages a reader gets each time they scroll back, unless they ask for
#                     another number (GET /api/messages?before=ID&limit=N)
MAX_HISTORY_PAGE = 500  # the most one such response may hold, as for a poll's batch. A larger
#                         limit is refused, not cut down: "fewer than asked for" must mean "no more"
#                         (unless the response says "more": see MAX_ANSWER_BYTES)
MAX_ANSWER_BYTES = 64 * 1024  # bytes of messages in one response (a snapshot, a batch, a history
#                               page), so that an 80-byte request cannot draw megabytes: 500 of
#                               the longest messages (2,000 characters of 4 bytes each in UTF-8)
#                               were 4 MB. A hundred chat messages fit several times over, the
#                               longest eight at a time; the page asks again for those left out
MAX_TEXT_LENGTH = 2000  # characters in one message: a long message, not a document
MAX_NAME_LENGTH = 40  # characters in a name: it must fit the online list and a message's line
MAX_BODY_BYTES = 16 * 1024  # a JSON body larger than this is refused unread (the longest message
#                             fits twice over as a browser's JSON.stringify sends it: 2000
#                             characters of at most 4 bytes each)

# Rate limits: at most COUNT messages in any SECONDS, for each (COUNT, SECONDS) pair (--rate-limits
# sets others). The short window lets a few quick lines through in a row, as people write, and
# stops a burst; the longer ones stop a steady flood (one message every 2 s, then every 3 s, kept
# up), while a person chatting, even briskly, keeps inside them all. (Tighter windows, such as
# 2/3, 3/10, 8/60, stop people in the middle of an ordinary conversation.)
RATE_LIMITS = [(5, 5), (30, 60), (200, 600)]

# A post may carry an Idempotency-Key header: a key the page made for this message, sent again
# with every retry, so that a post whose response was lost can be sent again and is stored once.
IDEMPOTENCY_KEY = re.compile(r"[!-~]{1,64}")  # 1 to 64 visible ASCII characters

# Identity.
SESSION_COOKIE = "sid"
SESSION_MAX_AGE = 365 * 24 * 3600  # seconds the browser keeps the cookie
SESSION_ID_PATTERN = re.compile(r"[A-Za-z0-9_-]{32}")  # what secrets.token_urlsafe(24) produces

# Storage.
SCHEMA_VERSION = 2  # stored in the file as PRAGMA user_version, so we never touch a foreign file
STORAGE_BUSY_TIMEOUT = 1.0  # seconds SQLite waits for a lock held elsewhere before a write fails:
#                             a post fails (503) rather than wait longer than a person would


# ==================================================================================================
# 2. The room: a version number, and a Condition to wait on for the next one
# ==================================================================================================

class Poll:
    """A request for news: who asks, the version they have seen, and the connection it came on.

    `since` is None for a page that has nothing yet: it gets a snapshot of the room.
    """

    def __init__(self, user, since, connection):
        self.user = user
        self.since = since
        self.connection = connection


class Room:
    """The room as all threads share it: its version, who is online, and the Condition that
    parked polls wait on.

    Every change (a message, a new name, a new online list) goes the same way: one change at a
    time, it takes the next version number and is saved to disk; only then is it published: the
    version in memory moves on, and every parked poll is woken. So no page ever sees a change
    that a crash could take back, and the versions a page sees only ever grow.
    """

    def __init__(self, storage, presence, log_polls=False):
        self.storage = storage
        self.presence = presence
        self.log_polls = log_polls  # print the life of each poll (--log-polls), for learners
        self.version = storage.load_version()
        self.online = []  # [{"id": ..., "name": ...}] as last announced
        self.online_version = self.version  # the version at which `online` last changed
        self.closing = False  # the server is stopping: no poll waits any more
        self.waiting = 0  # polls parked now (for --log-polls)
        # Two locks, so that waiting for the disk never holds up a poll: _write_lock makes the
        # changes take turns (one version number each, saved in order), and is held while the
        # disk works; _lock guards the fields above, each time for a moment only, and `changed`
        # is the Condition, built on it, that parked polls wait on.
        self._write_lock = threading.Lock()
        self._lock = threading.Lock()
        self.changed = threading.Condition(self._lock)

    # --- A poll: answered at once, or parked until the room changes -------------------------------

    def poll(self, poll, timeout, present=True):
        """Answer `GET /api/poll`: at once if the page is behind, otherwise once something changes.

        Returns the response's body: what is new since `poll.since`, as JSON bytes. `present` is
        False for a client that sent no cookie: it is answered, but not counted as online (see
        ChatHandler.read_poll).
        """
        if present:
            self.presence.poll_began(poll)
        try:
            self.wait_for_change(poll, timeout)
        finally:
            if present:
                self.presence.poll_ended(poll)
        return self.answer(poll.since, poll.user)

    def wait_for_change(self, poll, timeout):
        """Wait until the room is past `poll.since`, or `timeout` seconds pass, or the room closes.

        This is where a long-poll waits. A Condition is a lock with a place to wait: a thread
        must hold the lock to wait, and to notify (wake) the waiting threads. wait() lets go of
        the lock while it waits, and takes it back before it returns: so the version cannot
        change between our look at it and our wait, and the thread that changes it cannot miss
        us. Once back, we look again, in a `while` loop: wait() also returns when the time is up,
        and by the time a woken thread has the lock back, the room may have changed again.

        A page whose `since` is not the room's version does not wait: it is behind (there is
        news), or it has nothing yet (None), or its version is newer than the room's. That page
        knew a room that is gone (say, the data file was replaced): it gets a snapshot, at once,
        instead of waiting for a version that may never come.
        """
        deadline = time.monotonic() + timeout
        with self.changed:
            if poll.since != self.version or self.closing or timeout <= 0:
                return
            self.waiting += 1
            if self.log_polls:
                log(f"poll parked: {poll.user.name}, since version {poll.since} "
                    f"({self.waiting} waiting)")
            try:
                while self.version == poll.since and not self.closing:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        if self.log_polls:
                            log(f"poll timed out after {timeout:g} s: {poll.user.name}, "
                                f"nothing new since version {poll.since}")
                        return
                    self.changed.wait(remaining)
            finally:
                self.waiting -= 1

    def answer(self, since, user):
        """What a page that has seen version `since` is owed, as JSON bytes.

        {"version": V, "messages": [...], "online": [...], "you": {...}}: the messages after
        `since` (at most MAX_BATCH, and MAX_ANSWER_BYTES of them: then V is the last one's id,
        and the page asks again for the rest), or, for a page with no version of ours, a
        snapshot of the latest ones (as many as fit); the online list if it changed after
        `since`; and who the reader is.
        """
        with self._lock:  # the version and the online list, as one state
            version = self.version
            snapshot = since is None or since > version
            online = self.online if snapshot or self.online_version > since else None
        # Up to the published version only: a message being saved now is on the disk before it
        # is published, and no page may see it before then. And only as many as fit in
        # MAX_ANSWER_BYTES (that_fit, after this class).
        if snapshot:
            stored = self.storage.latest_messages(version, SNAPSHOT_SIZE)
            messages = that_fit(reversed(stored), size=json_size)[::-1]  # (the newest)
        else:
            stored = self.storage.messages_after(since, version, MAX_BATCH)
            messages = that_fit(stored, size=json_size)
            # Cut short (by MAX_BATCH or MAX_ANSWER_BYTES): the page continues from here with
            # its next poll.
            if len(messages) < len(stored) or len(stored) == MAX_BATCH:
                version = messages[-1]["id"]
        answer = {"version": version, "messages": messages}
        if online is not None:
            answer["online"] = online
        answer["you"] = user.public()
        return encode_json(answer)

    def close(self):
        """Wake every parked poll so that it answers, and park no more: the server is stopping."""
        with self.changed:
            self.closing = True
            self.changed.notify_all()

    # --- Changing the room ------------------------------------------------------------------------

    def add_message(self, user, text, key=None):
        """Save a message, then publish it. Raises StorageError, having published nothing.

        Returns (the message, True); or, if this person's post with the same Idempotency-Key
        `key` was stored already, (that message, False), and nothing is stored again.
        """
        # Under the write lock: two posts with one key store one message. (Only writers change
        # the version, and they take turns under this lock: so it is read here without _lock.)
        with self._write_lock:
            stored = key and self.storage.message_for_key(user.id, key)
            if stored:
                return stored, False
            message = {
                "id": self.version + 1,  # a message's id is the version its arrival created
                "user": user.id,
                "name": user.name,
                "text": text,
                "time": int(time.time() * 1000),
            }
            self.storage.save_message(message, user, key)
            self.publish(message["id"], message=message)
        return message, True

    def rename(self, user, name):
        """Save a user's new name, with a notice of it for the room, then publish both. Raises
        StorageError, having changed nothing."""
        with self._write_lock:
            if name == user.name:
                return  # nothing changes, so there is nothing to announce
            notice = {
                "id": self.version + 1,
                "user": user.id,
                "name": name,
                "text": f"{user.name} is now {name}",
                "time": int(time.time() * 1000),
                "kind": "rename",
                "old_name": user.name,
            }
            self.storage.save_name(user, notice)
            user.name = name
            self.publish(notice["id"], message=notice, online=self.presence.online_list())

    def refresh_presence(self):
        """Publish the online list if it changed since it was last published. True if it did.

        Called every PRESENCE_INTERVAL by a thread of its own (keep_presence_fresh, section 8).
        """
        # Under the write lock, or a rename published while we look could be overwritten by
        # the older list we looked at.
        with self._write_lock:
            online = self.presence.online_list()
            if online == self.online:
                return False
            version = self.version + 1
            # Saved although only the version changes: versions must keep growing across a
            # restart, or a page that saw this one would take the restarted room for a new one.
            self.storage.save_version(version)
            self.publish(version, online=online)
        return True

    def publish(self, version, message=None, online=None):
        """Make a saved change visible: move the version on, and wake every parked poll.

        `message` is the message (or rename notice) the change added, if any: the pages read it
        from the disk, so the room needs only its version. `online` is the new online list, if it
        changed.
        """
        with self.changed:
            self.version = version
            if online is not None:
                self.online, self.online_version = online, version
            if self.log_polls and self.waiting:
                log(f"version {version}: waking {self.waiting} waiting "
                    f"poll{'s' if self.waiting > 1 else ''}")
            self.changed.notify_all()


# --- Responses many times larger than their request ---
# Threat: an 80-byte request (a history page of 500, or a poll since=0) was answered with 500
# messages of 2,000 characters, 4 MB: a few clients asking again and again take the whole uplink.
# Defence: no response holds more than MAX_ANSWER_BYTES of messages. A batch stops early, and its
# version says where (the page goes on from there); a snapshot keeps the newest; a history page
# keeps the newest too, and says "more": true, so that a client never takes "fewer than asked
# for" for "that is all". (In Part I, not Part III: it is what the room answers, so --plain
# must answer the same.)
# Proved by: test_a_history_answer_keeps_to_its_byte_budget,
# test_a_batch_and_a_snapshot_keep_to_the_byte_budget

def that_fit(messages, size=len):
    """The first of `messages` that fit in MAX_ANSWER_BYTES together, one at least.

    `size(message)` is a message's size in the response, in bytes; len, for messages already
    encoded. `messages` is read no further than what fits: given an iterator that encodes as it
    goes, a request for 500 long messages costs little more than the response is large. A
    caller that keeps the newest passes them newest first.
    """
    taken, total = [], 0
    for message in messages:
        total += size(message) + 1  # (and a comma)
        if total > MAX_ANSWER_BYTES and taken:
            break
        taken.append(message)
    return taken


def json_size(message):
    return len(encode_json(message))


# ==================================================================================================
# 3. Presence: who is online
# ==================================================================================================

class Presence:
    """Who is online: anyone with a poll in progress, or whose last poll ended within the online
    window. (A poll in progress is counted from its start, parked or not.)"""

    def __init__(self, window):
        self.window = window
        self._lock = threading.Lock()  # guards the two fields below
        self._last_seen = {}  # user id -> (User, time.monotonic() of their last poll)
        self._polling = collections.defaultdict(list)  # user id -> their polls in progress,
        #                                                  oldest first

    def poll_began(self, poll):
        """A poll began: count it, and its user as seen now."""
        with self._lock:
            self._seen_now(poll.user)
            self._polling[poll.user.id].append(poll)

    def poll_ended(self, poll):
        """A poll ended: its user was seen now, unless it no longer counted (a later part may
        stop counting a poll before it ends)."""
        with self._lock:
            if self._stop_counting(poll):
                self._seen_now(poll.user)

    def _seen_now(self, user):
        """The caller holds _lock."""
        self._last_seen[user.id] = (user, time.monotonic())

    def _stop_counting(self, poll):
        """Stop counting a poll. True if it was counted. The caller holds _lock."""
        polls = self._polling.get(poll.user.id, [])
        if poll not in polls:
            return False
        polls.remove(poll)
        if not polls:
            del self._polling[poll.user.id]
        return True

    def online_list(self):
        """Forget who left, and return who is online, sorted by name."""
        with self._lock:
            self._forget_departed()
            return [user.public() for user in self._sorted_users()]

    def _forget_departed(self):
        """Forget those with no poll in progress and none within the window. True if anyone left.
        The caller holds _lock."""
        now = time.monotonic()
        departed = [user_id for user_id, (_, seen) in self._last_seen.items()
                    if user_id not in self._polling and now - seen > self.window]
        for user_id in departed:
            del self._last_seen[user_id]
        return bool(departed)

    def _sorted_users(self):
        """Those online, sorted by name. The caller holds _lock."""
        return sorted((user for user, _ in self._last_seen.values()),
                      key=lambda user: (user.name.casefold(), user.id))

    def wait_until_time_to_look(self, idle):
        """Return when the online list should be looked at again: after `idle` seconds."""
        time.sleep(idle)


# ==================================================================================================
# 4. Identity: a cookie says who you are
# ==================================================================================================

class User:
    """A person as the room knows them: a secret session id, a public id and a display name.

    The public id is derived from the session id, so someone who has never posted or renamed
    needs no stored record at all, yet keeps the same id and default name across restarts.
    """

    def __init__(self, sid, name=None):
        self.sid = sid
        # 16 hex digits (64 bits): enough to tell people apart, and short in every response.
        self.id = hashlib.sha256(sid.encode("ascii")).hexdigest()[:16]
        self.name = name or f"Guest {int(self.id, 16) % 9000 + 1000}"

    def public(self):
        return {"id": self.id, "name": self.name}


class Sessions:
    """Finds the User behind a session cookie: in memory if we can, else in the database."""

    def __init__(self, storage):
        self.storage = storage
        self._users = {}  # sid -> User
        self._lock = threading.Lock()

    def user_for(self, sid):
        user = self._users.get(sid)
        if user is None:
            user = User(sid, self.storage.load_name(sid))
            with self._lock:  # two first requests at once: both get the same User
                user = self._users.setdefault(sid, user)
        return user


def new_session_id():
    return secrets.token_urlsafe(24)


# ==================================================================================================
# 5. Rate limiting
# ==================================================================================================

class RateLimiter:
    """Remembers when each user posted, and says how long they must wait before posting again."""

    def __init__(self, limits):
        self.limits = limits
        self.longest = max(seconds for _, seconds in limits)
        self._times = {}  # user id -> deque of time.monotonic() of accepted posts, oldest first
        self._lock = threading.Lock()

    def limit_hit(self, user_id):
        """Count a post now, unless that would break a limit: then say which, and count nothing.

        Returns None if the post is counted, else (seconds to wait, (count, seconds) of the
        limit it would break).
        """
        now = time.monotonic()
        with self._lock:
            times = self._times.setdefault(user_id, collections.deque())
            while times and now - times[0] >= self.longest:
                times.popleft()
            worst = None
            for count, seconds in self.limits:
                recent = [t for t in times if now - t < seconds]
                if len(recent) >= count:
                    # Posting is allowed again once the oldest of the last `count` posts is
                    # more than `seconds` old.
                    wait = recent[-count] + seconds - now
                    if worst is None or wait > worst[0]:
                        worst = (wait, (count, seconds))
            if worst is None:
                times.append(now)
            return worst

    def refund(self, user_id):
        """Take back the last counted post: it could not be saved, so it does not count."""
        with self._lock:
            times = self._times.get(user_id)
            if times:
                times.pop()


# ==================================================================================================
# 6. Storage: SQLite
# ==================================================================================================

class StorageError(Exception):
    """The data file could not be read or written. Nothing was acknowledged."""


# --- The data file deleted, replaced, read-only or damaged ---
# Threat: the data file is deleted or replaced while the room runs (a clean-up, a restore from a
# backup): SQLite goes on writing into the old file, which no one will ever open again, and every
# post still gets its 201 while it is lost. At start-up, a read-only file opens without a word
# (every post then fails), a read-only folder looks like a foreign file, and a damaged one ends
# in a traceback.
# Defence: each write, before it is acknowledged, checks that the path still leads to the file we
# opened (Storage._check_still_ours: one stat() after the commit); if not, it and every later
# write are refused with 503, and one line is logged. At start-up, a test write, and SQLite's
# quick_check; the reason (read-only file, read-only folder, damaged) in one line.
# Proved by: test_a_deleted_or_replaced_data_file_refuses_posts_and_renames,
# test_a_read_only_data_file_or_folder_is_a_clear_error, test_a_damaged_data_file_is_a_clear_error

class DataFileGone(StorageError):
    """The data file was deleted or replaced while the room ran: what we write now is lost."""


SCHEMA = """
BEGIN;
CREATE TABLE room (version INTEGER NOT NULL);
INSERT INTO room VALUES (0);
CREATE TABLE users (sid TEXT PRIMARY KEY, id TEXT NOT NULL, name TEXT NOT NULL) WITHOUT ROWID;
CREATE TABLE messages (
    id INTEGER PRIMARY KEY,
    user TEXT NOT NULL,
    name TEXT NOT NULL,
    text TEXT NOT NULL,
    time INTEGER NOT NULL
);
PRAGMA user_version = 1;
COMMIT;
"""
# A new file is made as version 1 was, then brought up to date like a file made by an older
# chatroom.py: one way to the present, so that it is always the way that is tested.
# Version 2 adds, beside the messages: the keys posts came with (one message per person and key),
# and which messages are rename notices ("Guest 3115 is now Frances"), with the name before.
SCHEMA_2 = """
BEGIN;
CREATE TABLE post_keys (user TEXT NOT NULL, key TEXT NOT NULL, message INTEGER NOT NULL,
                        PRIMARY KEY (user, key)) WITHOUT ROWID;
CREATE TABLE renames (id INTEGER PRIMARY KEY, old_name TEXT NOT NULL);
PRAGMA user_version = 2;
COMMIT;
"""


# Each message, and the name before if it is a rename notice.
MESSAGES = ("SELECT messages.id, user, name, text, time, old_name "
            "FROM messages LEFT JOIN renames USING (id)")


class Storage:
    """The room's SQLite file: messages, named users, and the room's version.

    Two connections: one that writes (one thread at a time, under Room's write lock) and one
    that reads. In WAL mode (write-ahead logging) a change is appended to a log file beside the
    database, and readers go on reading the last committed state meanwhile: readers never wait
    for the writer, so a slow disk slows posting but never delays an answer to a poll. With
    synchronous=FULL, a commit returns only once the log is on the disk itself (SQLite asks the
    system to flush it): what we acknowledge survives the process being killed, and also the
    machine losing power.

    Each connection also has a lock of its own, and close() takes both: a connection closed
    while another thread is inside it can crash the whole process. After close(), every call raises
    StorageError, which the handler answers with 503.
    """

    def __init__(self, path):
        self.path = str(path)
        self.closed = False
        self._writer = self._connect()
        try:
            self._check_or_create_schema()
            self._writer.execute("PRAGMA journal_mode = WAL")
            self._writer.execute("PRAGMA synchronous = FULL")
            # A write that changes nothing, so that a file we may not write fails now, with its
            # reason, and not at every post: SQLite opens a read-only file without a word.
            self._writer.execute("BEGIN IMMEDIATE")
            self._writer.execute("UPDATE room SET version = version")
            self._writer.execute("COMMIT")
            found = os.stat(self.path)  # which file we opened, for _check_still_ours
        except sqlite3.OperationalError as error:  # (it could not be opened, read or written)
            self._writer.close()
            raise StorageError(self._why_not_writable() or error) from error
        except (sqlite3.Error, OSError) as error:
            self._writer.close()
            raise StorageError(error) from error
        except StorageError:
            self._writer.close()
            raise
        self._file = (found.st_dev, found.st_ino)
        self._gone = False  # set for good once the path no longer leads to that file
        self._reader = self._connect()
        self._writer_lock = threading.Lock()
        self._reader_lock = threading.Lock()

    def _connect(self):
        try:
            return sqlite3.connect(self.path, timeout=STORAGE_BUSY_TIMEOUT,
                                   isolation_level=None, check_same_thread=False)
        except sqlite3.Error as error:
            raise StorageError(self._why_not_writable() or error) from error

    def _why_not_writable(self):
        """Why this user cannot write the data file, if it is the file or its folder; else None."""
        folder = os.path.dirname(os.path.abspath(self.path))
        if not os.path.isdir(folder):
            return f"its folder {folder} does not exist"
        if os.path.exists(self.path) and not os.access(self.path, os.W_OK):
            return "the file is read-only (this user may not write to it)"
        if not os.access(folder, os.W_OK | os.X_OK):
            return (f"its folder {folder} is read-only (this user may not create files in it, "
                    f"and SQLite keeps its journal beside the data file, in a -wal file)")
        return None

    def _check_or_create_schema(self):
        """Create the tables in a new file; refuse a file that some other program made."""
        try:
            tables = {row[0] for row in self._writer.execute(
                "SELECT name FROM sqlite_master WHERE type = 'table'")}
            version = self._writer.execute("PRAGMA user_version").fetchone()[0]
        except sqlite3.OperationalError:
            raise  # it could not be read at all (a read-only folder, say): not a verdict on it
        except sqlite3.DatabaseError as error:
            raise StorageError(f"it is not an SQLite database, or it is damaged "
                               f"({error})") from error
        self._check_undamaged()  # before anything is written to it
        if not tables and version == 0:
            self._writer.executescript(SCHEMA)
            version = 1
        elif version not in (1, SCHEMA_VERSION) or not {"room", "users", "messages"} <= tables:
            raise StorageError("it is an SQLite database, but not one this chat room made "
                               f"(schema version {version}, tables {sorted(tables)})")
        if version == 1:  # a new file, or one an older chatroom.py made: bring it up to date
            self._writer.executescript(SCHEMA_2)

    def _check_undamaged(self):
        """Refuse a damaged file now, in one line, rather than fail on the page that is damaged.

        SQLite's quick_check reads the whole file: once, at start-up.
        """
        try:
            verdict = self._writer.execute("PRAGMA quick_check(1)").fetchone()[0]
        except sqlite3.OperationalError:
            raise  # it could not be read (see __init__): not a verdict on it
        except sqlite3.DatabaseError as error:
            verdict = str(error)
        if verdict != "ok":
            verdict = " ".join(verdict.split())[:200]  # one line
            raise StorageError(f"it is damaged (SQLite's quick_check says: {verdict}); "
                               f"restore it from a backup, or move it away to start an empty room")

    def close(self):
        """Close the file, once no thread is using it (see the class's docstring)."""
        with self._writer_lock, self._reader_lock:
            self.closed = True
            self._reader.close()
            self._writer.close()

    # --- Writing (one thread at a time: the caller holds Room's write lock) -----------------------

    def save_message(self, message, user, key=None):
        statements = [
            ("INSERT INTO messages VALUES (:id, :user, :name, :text, :time)", message),
            ("INSERT OR IGNORE INTO users VALUES (?, ?, ?)", (user.sid, user.id, user.name)),
            ("UPDATE room SET version = ?", (message["id"],)),
        ]
        if key is not None:
            statements.append(("INSERT INTO post_keys VALUES (?, ?, ?)",
                               (user.id, key, message["id"])))
        self._write(statements)

    def save_name(self, user, notice):
        """A new name, with the notice of it that the room shows (a message of kind "rename")."""
        self._write([
            ("INSERT OR REPLACE INTO users VALUES (?, ?, ?)", (user.sid, user.id, notice["name"])),
            ("INSERT INTO messages VALUES (:id, :user, :name, :text, :time)", notice),
            ("INSERT INTO renames VALUES (?, ?)", (notice["id"], notice["old_name"])),
            ("UPDATE room SET version = ?", (notice["id"],)),
        ])

    def save_version(self, version):
        self._write([("UPDATE room SET version = ?", (version,))])

    def _write(self, statements):
        """Run statements in one transaction and commit; on any failure, roll back and raise.

        Raises DataFileGone, even once committed, if the path no longer leads to our file.
        """
        with self._writer_lock:
            if self.closed:
                raise StorageError("the data file is closed: the server is stopping")
            if self._gone:
                raise DataFileGone(f"the data file {self.path} was deleted or replaced")
            try:
                self._writer.execute("BEGIN IMMEDIATE")
                for sql, parameters in statements:
                    self._writer.execute(sql, parameters)
                self._writer.execute("COMMIT")
            except sqlite3.Error as error:
                if self._writer.in_transaction:
                    try:
                        self._writer.execute("ROLLBACK")
                    except sqlite3.Error:
                        pass  # the connection rolls back by itself when it can
                raise StorageError(error) from error
            self._check_still_ours()

    def _check_still_ours(self):
        """Raise DataFileGone if the path leads to another file than ours, or to none.

        Deleting or replacing the file does not stop SQLite: it writes on into the file it
        opened, which no one will ever open again. So, before a write is acknowledged, one
        stat() of the path: cheap next to the commit's flush to disk.
        """
        try:
            found = os.stat(self.path)
            ours = (found.st_dev, found.st_ino) == self._file
        except OSError:
            ours = False
        if not ours:
            self._gone = True
            log(f"the data file {self.path} was deleted or replaced while the server ran: "
                f"posts and renames are refused until the server is restarted")
            raise DataFileGone(f"the data file {self.path} was deleted or replaced")

    # --- Reading ----------------------------------------------------------------------------------

    def load_version(self):
        return self._read_one("SELECT version FROM room")[0]

    def load_name(self, sid):
        row = self._read_one("SELECT name FROM users WHERE sid = ?", (sid,))
        return row[0] if row else None

    def latest_messages(self, upto, count):
        """The last `count` messages with id <= upto, oldest first."""
        rows = self._read_all(
            f"{MESSAGES} WHERE id <= ? ORDER BY id DESC LIMIT ?", (upto, count))
        return [message_from_row(row) for row in reversed(rows)]

    def messages_after(self, since, upto, limit):
        """Messages with since < id <= upto, oldest first, at most `limit` of them."""
        rows = self._read_all(
            f"{MESSAGES} WHERE id > ? AND id <= ? ORDER BY id LIMIT ?", (since, upto, limit))
        return [message_from_row(row) for row in rows]

    def message_for_key(self, user_id, key):
        """The message a person's post with this Idempotency-Key stored, or None."""
        row = self._read_one(f"{MESSAGES} WHERE id = (SELECT message FROM post_keys "
                             "WHERE user = ? AND key = ?)", (user_id, key))
        return message_from_row(row) if row else None

    def _read_one(self, sql, parameters=()):
        return self._read(sql, parameters, lambda cursor: cursor.fetchone())

    def _read_all(self, sql, parameters=()):
        return self._read(sql, parameters, lambda cursor: cursor.fetchall())

    def _read(self, sql, parameters, fetch):
        with self._reader_lock:
            if self.closed:
                raise StorageError("the data file is closed: the server is stopping")
            try:
                return fetch(self._reader.execute(sql, parameters))
            except sqlite3.Error as error:
                raise StorageError(error) from error


def message_from_row(row):
    message_id, user_id, name, text, sent, old_name = row
    message = {"id": message_id, "user": user_id, "name": name, "text": text, "time": sent}
    if old_name is not None:
        message.update(kind="rename", old_name=old_name)
    return message


def encode_json(value, encoder=json.JSONEncoder(ensure_ascii=False, separators=(",", ":"))):
    # One encoder for all: json.dumps() with these options would make a new one on every call.
    return encoder.encode(value).encode("utf-8")


# ==================================================================================================
# 7. The HTTP handler
# ==================================================================================================

# What a read or a write raises when the client hung up or stalled. (socket.timeout is the same as
# TimeoutError from Python 3.10 on; before, it is another class, so both are named.)
CLIENT_WENT_AWAY = (ConnectionError, TimeoutError, socket.timeout)


# Control characters: C0 (below 32) but tab and newline, DEL, and C1 (0x80 to 0x9f), which
# terminals and some fonts take as commands.
CONTROL_CHARACTERS = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f]")
DIGITS = re.compile(r"[0-9]+")
DECIMAL = re.compile(r"[0-9]+(?:\.[0-9]+)?")


class RequestError(Exception):
    """A request we refuse: becomes a JSON response {"error": message, ...} with this status."""

    def __init__(self, status, message, headers=(), **fields):
        super().__init__(message)
        self.status = status
        self.body = {"error": message, **fields}
        self.headers = list(headers)


class ChatHandler(http.server.BaseHTTPRequestHandler):
    """Serves one connection: reads each request, calls the room, writes one response to each.

    http.server runs one of these per connection, in its own thread. For each request it reads
    the request line and the headers (parse_request), then calls do_GET, do_POST, ...: they all
    go to dispatch(), which looks the path and method up in ROUTES and calls the method named.
    """

    # What answers what: path -> {method: the name of the method here that answers it}. Nothing
    # else is ever served.
    ROUTES = {
        "/": {"GET": "get_page"},
        "/chime.wav": {"GET": "get_chime"},
        "/api/poll": {"GET": "get_poll"},
        "/api/messages": {"GET": "get_history", "POST": "post_message"},
        "/api/name": {"POST": "post_name"},
    }

    protocol_version = "HTTP/1.1"  # keep-alive: a page's next poll reuses the same connection
    default_request_version = "HTTP/1.1"  # so that a refusal of a request line we cannot read
    #                                       still has a status line (not an HTTP/0.9 response)
    # Send each response the moment it is written. Otherwise Nagle's algorithm may hold the body
    # back for up to 40 ms, until the client acknowledges the headers written just before it.
    disable_nagle_algorithm = True

    def setup(self):
        super().setup()
        self.new_sid = None  # a session id this response gives the client, in Set-Cookie
        self.body_pending = False  # the request's body is still unread on the connection

    def do_GET(self):
        self.dispatch()

    # Every method goes to dispatch(): it answers 405 to a method that a path does not take.
    do_HEAD = do_POST = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = do_GET

    def dispatch(self):
        path, _, query = self.path.partition("?")
        methods = self.ROUTES.get(path)
        # A body stays unread on the connection until read_json() reads it. If we answer before
        # (a refusal, or a route that takes no body), send() closes the connection, or those
        # bytes would be read as the next request.
        self.body_pending = ("transfer-encoding" in self.headers
                             or self.headers.get("content-length", "0") != "0")
        with self.server.request_in_progress():
            try:
                if self.server.stopping:
                    self.close_connection = True
                    raise RequestError(503, "The server is stopping. Please try again in a moment.",
                                       headers=[("Retry-After", "1")])
                if methods is None:
                    raise RequestError(404, f"There is nothing at {path[:100]!r}.")
                action = methods.get("GET" if self.command == "HEAD" else self.command)
                if action is None:
                    served = {*methods, "HEAD"} if "GET" in methods else set(methods)
                    allowed = ", ".join(sorted(served))  # (HEAD wherever GET: see above)
                    raise RequestError(405, f"{path} accepts only {allowed}.",
                                       headers=[("Allow", allowed)])
                getattr(self, action)(query)
            except RequestError as refusal:
                self.refuse(refusal.status, refusal.body, refusal.headers)
            except DataFileGone:  # (logged once, by Storage; no Retry-After: retrying is no use)
                self.refuse(503, {"error": "Nothing can be saved any more: the room's data file "
                                           "was deleted or replaced while the server was "
                                           "running, so this was not saved. Whoever runs the "
                                           "server must restart it."})
            except StorageError as error:
                self.log_message("storage failed: %s", error)
                self.refuse(503, {"error": "The server could not save or read the room's data. "
                                           "Please try again in a moment."},
                            [("Retry-After", "1")])
            except CLIENT_WENT_AWAY:
                raise  # http.server logs it in one line (ChatServer.handle_error)
            except Exception:
                # Through log(), not log_message(), which would flatten the traceback onto one
                # line; the request line is repr()'d so that it cannot forge lines of its own.
                log(f"{self.client_address[0]}: error in {self.requestline[:200]!r}:\n"
                    f"{traceback.format_exc()}")
                self.close_connection = True
                self.refuse(500, {"error": "Something went wrong on the server. "
                                           "It has been logged."})

    # --- The routes ------------------------------------------------------------------------------

    def get_page(self, query):
        """GET /: the page, index.html. "no-cache": the browser may keep it, but must ask again
        before using it, so that a new page after an upgrade is seen at once."""
        self.send(200, self.server.page, "text/html; charset=utf-8",
                  [("Cache-Control", "no-cache")])

    def get_chime(self, query):
        """GET /chime.wav: the sound the page plays for someone else's message."""
        self.send(200, self.server.chime, "audio/wav", [("Cache-Control", "max-age=86400")])

    def get_poll(self, query):
        """GET /api/poll?since=V&timeout=S: the long-poll. The waiting happens in Room.poll."""
        poll, timeout, present = self.read_poll(query)
        body = self.server.room.poll(poll, timeout, present)
        if self.server.room.closing:  # the server is stopping: no next request on this one
            self.close_connection = True
        self.send(200, body, "application/json")

    def read_poll(self, query):
        """The poll a request asks for, its time-out, and whether its client counts as online."""
        # keep_blank_values: "since=" is there, and wrong, not absent. Other names are ignored.
        params = parse_qs(query, keep_blank_values=True)
        since = parse_number(params, "since", integer=True)
        timeout = parse_number(params, "timeout")
        timeout = self.server.poll_timeout if timeout is None else min(timeout, MAX_POLL_TIMEOUT)
        # A client that sent no cookie is given one, but does not count as online until it comes
        # back with it: so a script that ignores cookies cannot fill the online list.
        user = self.session_user()
        present = user is not None
        if not present:
            user = User(self.issue_session_id())
        return self.new_poll(user, since), timeout, present

    def new_poll(self, user, since):
        return Poll(user, since, self.connection)

    def get_history(self, query):
        """GET /api/messages?before=ID&limit=N: older messages, for a reader scrolling back.

        At most `limit` messages whose id is below `before` (the latest ones, without it),
        oldest first; fewer than `limit` means there are no more, unless the response says
        "more": true (the newest of them filled MAX_ANSWER_BYTES: ask again, before the first).
        A plain read from the file: it needs no cookie, never waits, and counts no one as online.
        """
        # Blank values kept, so that "before=" is refused rather than taken for "no before".
        params = parse_qs(query, keep_blank_values=True)
        before = parse_number(params, "before", integer=True)
        limit = parse_number(params, "limit", integer=True)
        limit = HISTORY_PAGE if limit is None else limit
        if not 1 <= limit <= MAX_HISTORY_PAGE:
            raise RequestError(400, f"limit must be a whole number from 1 to {MAX_HISTORY_PAGE}.")
        # No message is newer than the room, and a huge `before` would not fit SQLite's integers.
        newest = self.server.room.version
        upto = newest if before is None else min(before - 1, newest)
        stored = self.server.room.storage.latest_messages(upto, limit)
        messages = that_fit(reversed(stored), size=json_size)[::-1]  # (the newest)
        history = {"messages": messages}
        if len(messages) < len(stored):  # older ones left out: this is not the beginning
            history["more"] = True
        self.send_json(200, history)

    def post_message(self, query):
        """POST /api/messages {"text": ...}: check, rate-limit, save and announce a message.

        With an Idempotency-Key header, a retry of a post that was stored (its response lost
        on the way) gets the stored message back, 201 again, and is neither stored nor counted
        against the rate limit a second time; the same key with another text is refused (422).
        """
        user = self.required_user()
        key = self.headers.get("idempotency-key")
        if key is not None and not IDEMPOTENCY_KEY.fullmatch(key):
            raise RequestError(400, "The Idempotency-Key header must be 1 to 64 visible ASCII "
                                    "characters.")
        text = self.read_json_field("text")
        check_text(text, "message", MAX_TEXT_LENGTH)
        stored = key and self.server.room.storage.message_for_key(user.id, key)
        if stored:
            self.send_stored_message(stored, text)
            return
        with self.server.post_in_progress(user, key):
            self.count_post(user)
            try:
                message, new = self.server.room.add_message(user, text, key)
            except DataFileGone:
                self.uncount_post(user)
                raise  # dispatch() says why
            except StorageError as error:
                self.uncount_post(user)
                self.log_message("could not save a message: %s", error)
                raise RequestError(503, "The server could not save your message, so it was not "
                                        "sent. Please try again in a moment.",
                                   headers=[("Retry-After", "1")]) from error
        if not new:  # stored between our look and the room's: answered as a retry
            self.uncount_post(user)
            self.send_stored_message(message, text)
            return
        self.send_json(201, {"message": message})

    def count_post(self, user):
        """Count a post against the rate limits, or refuse it (429) if it would break one."""
        hit = self.server.limiter.limit_hit(user.id)
        if hit:
            wait, (count, seconds) = hit
            raise RequestError(
                429, f"You are posting too fast: at most {count} messages in {seconds} seconds. "
                     f"You can post again in {math.ceil(wait)} s.",
                headers=[("Retry-After", str(max(1, math.ceil(wait))))],
                retry_after=round(wait, 3), limit={"count": count, "seconds": seconds})

    def uncount_post(self, user):
        """Take back a counted post: it was not stored (or stored already), so it does not
        count."""
        self.server.limiter.refund(user.id)

    def send_stored_message(self, stored, text):
        """Answer a retried post with the message its first try stored."""
        if stored["text"] != text:
            raise RequestError(422, "This Idempotency-Key was used for another message: make a "
                                    "new key for each new message.")
        self.send_json(201, {"message": stored})

    def post_name(self, query):
        """POST /api/name {"name": ...}: change the name shown with your messages."""
        user = self.required_user()
        name = self.read_json_field("name").strip()  # (the length is counted once trimmed)
        check_text(name, "name", MAX_NAME_LENGTH)
        if any(character in name for character in "\n\t"):
            raise RequestError(400, "A name must be on one line, without tabs.")
        self.server.room.rename(user, name)
        self.send_json(200, {"you": user.public()})

    # --- Who is asking ----------------------------------------------------------------------------

    def session_user(self):
        """The User whose cookie came with this request, or None if there was no valid cookie."""
        sid = cookie_value(self.headers.get("cookie", ""), SESSION_COOKIE)
        if sid is None or not SESSION_ID_PATTERN.fullmatch(sid):
            return None
        return self.server.sessions.user_for(sid)

    def issue_session_id(self):
        """A new session id for a client that came without one; this request's response sets
        it as the cookie (see response_headers)."""
        self.new_sid = new_session_id()
        return self.new_sid

    def required_user(self):
        user = self.session_user()
        if user is None:
            self.issue_session_id()
            raise RequestError(403, "This request came without the session cookie. Load the room "
                                    "first; with curl, keep cookies: curl -c jar -b jar ...")
        return user

    # --- Reading a JSON body ----------------------------------------------------------------------

    def read_json_field(self, field):
        """Read the request's JSON object and return its `field`, which must be a string."""
        data = self.read_json()
        value = data.get(field)
        if not isinstance(value, str):
            raise RequestError(400, f'The JSON object needs a "{field}" string.')
        return value

    def read_json(self):
        if "transfer-encoding" in self.headers:
            raise RequestError(411, "Send the body with a Content-Length, not chunked.")
        length = self.headers.get("content-length")
        if length is None:
            raise RequestError(411, "The request needs a Content-Length header.")
        if not DIGITS.fullmatch(length):  # not isdigit(): it also accepts "²"
            raise RequestError(400, "The Content-Length header is not a number.")
        digits = length.lstrip("0") or "0"  # int() refuses thousands of digits: count them first
        if len(digits) > len(str(MAX_BODY_BYTES)) or int(digits) > MAX_BODY_BYTES:
            raise RequestError(413, f"The body is larger than {MAX_BODY_BYTES} bytes.")
        size = int(digits)
        body = self.rfile.read(size)
        if len(body) < size:
            raise ConnectionError("the client closed the connection in the middle of its body")
        self.body_pending = False
        content_type = self.headers.get("content-type", "").split(";")[0].strip().lower()
        if content_type != "application/json":
            # Also a CSRF defence: a plain HTML form on another site cannot send this type.
            raise RequestError(415, "Send the body as JSON, with Content-Type: application/json.")
        try:
            data = json.loads(body.decode("utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError):
            raise RequestError(400, "The body is not valid JSON in UTF-8.") from None
        if not isinstance(data, dict):
            raise RequestError(400, "The body must be a JSON object.")
        return data

    # --- Writing a response -----------------------------------------------------------------------

    def send_json(self, status, value, headers=()):
        self.send(status, encode_json(value), "application/json", headers)

    def send(self, status, body, content_type, headers=()):
        """Write a response: the status line, the headers, and (unless HEAD) the body."""
        self.send_response(status)  # the status line, and the Server and Date headers
        for name, value in self.response_headers(status, body, content_type, headers):
            self.send_header(name, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)
        self.new_sid = None  # (its Set-Cookie is in this response: given once)

    def response_headers(self, status, body, content_type, headers):
        """The headers of a response to this request, as (name, value) pairs. (With a body left
        unread, the response closes the connection: see dispatch.)"""
        if self.body_pending:
            self.close_connection = True
        lines = []
        if status != 304:  # a 304 has no body, so nothing for these to describe (RFC 9110 8.6)
            lines += [("Content-Type", content_type), ("Content-Length", str(len(body)))]
        lines += self.server.common_headers
        if not any(name == "Cache-Control" for name, _ in headers):
            lines.append(("Cache-Control", "no-store"))  # API responses are never reused
        lines += headers
        if self.new_sid:
            lines.append(("Set-Cookie", f"{SESSION_COOKIE}={self.new_sid}; Max-Age="
                                        f"{SESSION_MAX_AGE}; Path=/; HttpOnly; SameSite=Strict"))
        if self.close_connection:
            lines.append(("Connection", "close"))
        return lines

    def refuse(self, status, body, headers=()):
        """Answer with an error status and a JSON body, and say so in the log."""
        self.log_message('"%s" %s', self.requestline[:200], status)
        self.send_json(status, body, headers)

    def send_error(self, code, message=None, explain=None):
        """http.server calls this for requests it cannot parse; answer in JSON like the rest."""
        self.close_connection = True
        self.refuse(code, {"error": message or explain or http.HTTPStatus(code).phrase})

    def log_request(self, code="-", size="-"):
        pass  # not a line for every request, every poll among them: refuse() logs the refusals


# --- Text that hides or disguises itself ---
# Threat: a name with a right-to-left override shows "nimdA" as "Admin", and turns the time shown
# after it around; a name or a message made only of invisible characters looks like no one, or
# like an empty line, and cannot be told apart from another such.
# Defence: check_text refuses (400) the bidirectional controls that reorder the text after them
# (BIDI_CONTROLS), and a text with no visible character (is_invisible).
# Proved by: test_text_that_disguises_itself_is_refused, test_text_in_any_script_is_accepted

# The embeddings and overrides (U+202A to U+202E) and the isolates (U+2066 to U+2069): each one
# changes the direction of the text that follows it, up to its end mark or, without one, the end
# of the line, so in a name they reorder whatever the page shows next to it. Right-to-left
# scripts need none of them: their direction comes with their letters.
BIDI_CONTROLS = re.compile("[\u202a-\u202e\u2066-\u2069]")
# Characters that fonts draw as empty space although Unicode counts them as letters, symbols or
# marks: the Hangul fillers, the blank braille pattern, the Khmer inherent vowels, the combining
# grapheme joiner and the variation selectors.
BLANK_LOOKING = frozenset("\u115f\u1160\u3164\uffa0\u2800\u17b4\u17b5\u034f"
                          "\u180b\u180c\u180d\u180f"
                          + "".join(map(chr, range(0xfe00, 0xfe10)))
                          + "".join(map(chr, range(0xe0100, 0xe01f0))))


def is_invisible(character):
    """True for a character that shows nothing by itself: white space, a format character
    (Unicode category Cf: zero-width spaces and joiners, the word joiner, the byte order mark,
    the soft hyphen...), or one of BLANK_LOOKING."""
    return (character.isspace() or unicodedata.category(character) == "Cf"
            or character in BLANK_LOOKING)


def check_text(value, what, max_length):
    """Refuse (400) a name or a message that is too long, carries control characters, is not
    valid Unicode, could reorder the text around it, or shows nothing at all."""
    if len(value) > max_length:
        raise RequestError(400, f"The {what} is longer than {max_length} characters.")
    if CONTROL_CHARACTERS.search(value):
        raise RequestError(400, f"The {what} contains control characters.")
    try:
        value.encode("utf-8")  # JSON's "\ud800" decodes to half a character, which cannot be
    except UnicodeEncodeError:  # stored or sent
        raise RequestError(400, f"The {what} is not valid Unicode.") from None
    if BIDI_CONTROLS.search(value):
        raise RequestError(400, f"The {what} contains a character that changes the direction "
                                f"of the text after it (U+202A to U+202E, U+2066 to U+2069).")
    if all(map(is_invisible, value)):  # (stops at the first visible character)
        raise RequestError(400, f"The {what} is empty." if not value.strip() else
                                f"The {what} shows nothing: it is made only of invisible "
                                f"characters (and perhaps spaces).")


def parse_number(params, name, integer=False):
    """A non-negative number from the query string, or None if it is absent.

    Given once, in ASCII digits (with a decimal point if not `integer`): int() and float() also
    take "+1", " 1", "1_000", "1e3", "nan" and other scripts' digits. A name given twice is
    refused: a program in front of us might read the first `since=` where we read the last, and
    each would answer another request. Present but empty is as wrong as any other bad number.
    """
    values = params.get(name)
    if values is None:
        return None
    refusal = RequestError(400, f"{name} must be given once, as a non-negative "
                                f"{'whole number' if integer else 'number'}.")
    if len(values) > 1 or not (DIGITS if integer else DECIMAL).fullmatch(values[0]):
        raise refusal
    try:
        return int(values[0]) if integer else float(values[0])
    except ValueError:  # Python 3.11 and later refuse to read more than 4300 digits
        raise refusal from None


def cookie_value(header, name):
    for part in header.split(";"):
        key, _, value = part.strip().partition("=")
        if key == name:
            return value
    return None


# ==================================================================================================
# 8. The server
# ==================================================================================================

class ChatServer(http.server.ThreadingHTTPServer):
    """ThreadingHTTPServer (a thread per connection), holding what its handlers share.

    A handler reaches these through self.server: the room, the sessions, the rate limiter, the
    page and the chime, and the settings from the command line.
    """

    request_queue_size = LISTEN_BACKLOG

    common_headers = []  # (name, value) of headers every response carries, if a later part adds
    #                      any (Part III does)

    def __init__(self, address, handler, room, sessions, limiter, page, chime, settings):
        self.address_family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        self.room = room
        self.sessions = sessions
        self.limiter = limiter
        self.page = page
        self.chime = chime
        self.settings = settings
        self.poll_timeout = settings.poll_timeout
        self.stopping = False  # once True, every new request is answered 503
        self._in_progress = set()  # a token for each request being answered
        self._posts_in_progress = set()  # (user id, Idempotency-Key) of posts being handled
        self._posts_lock = threading.Lock()
        super().__init__(address, handler)

    @contextlib.contextmanager
    def request_in_progress(self):
        """Count the requests being answered, so that stopping can wait for them (see main)."""
        token = object()
        self._in_progress.add(token)  # (one step, which the GIL never splits: no lock needed)
        try:
            yield
        finally:
            self._in_progress.discard(token)

    @contextlib.contextmanager
    def post_in_progress(self, user, key):
        """Refuse (409) a post whose Idempotency-Key is in a post of the same person's still
        being handled: the copy's sender is to ask again in a moment, and will then be answered
        with the message the first one stored."""
        if key is None:
            yield
            return
        posting = (user.id, key)
        with self._posts_lock:
            if posting in self._posts_in_progress:
                raise RequestError(409, "This message is being posted already. Please try again "
                                        "in a moment.", headers=[("Retry-After", "1")])
            self._posts_in_progress.add(posting)
        try:
            yield
        finally:
            self._posts_in_progress.discard(posting)

    def wait_for_requests(self, timeout):
        """Wait until no request is being answered, or `timeout` seconds: at shutdown only."""
        deadline = time.monotonic() + timeout
        while self._in_progress and time.monotonic() < deadline:
            time.sleep(SHUTDOWN_CHECK_INTERVAL)

    def handle_error(self, request, client_address):
        """A client that hangs up or stalls is normal: one line. Anything else: a traceback."""
        error = sys.exc_info()[1]
        if isinstance(error, CLIENT_WENT_AWAY):
            log(f"{client_address[0]}: connection dropped ({type(error).__name__}: {error})")
        else:
            super().handle_error(request, client_address)


def plain_room(args, storage, page, chime):
    """The plain server and its room, made of Part I's classes alone (--plain)."""
    room = Room(storage, Presence(args.online_window), args.log_polls)
    return ChatServer((args.host, args.port), ChatHandler, room, Sessions(storage),
                      RateLimiter(args.rate_limits), page, chime, args)


def run(server, storage, title="Chat room"):
    """Serve until Ctrl-C or SIGTERM, then stop without losing or breaking anything."""
    stop = threading.Event()
    threading.Thread(target=keep_presence_fresh,
                     args=(server.room, stop, server.request_in_progress), daemon=True).start()
    try:
        host, port = server.server_address[:2]
        shown_host = f"[{host}]" if ":" in host else host
        print(f"{title} running at http://{shown_host}:{port}/ (Ctrl-C to stop)", flush=True)
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        # Stopping. A second Ctrl-C or SIGTERM must not cut this short. New requests are
        # answered 503; parked polls answer now; requests in progress get SHUTDOWN_GRACE to
        # finish; and the data file is closed once no thread is inside it (Storage.close), so
        # that a request still running gets a clean 503, never a crash.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        stop.set()
        server.stopping = True
        server.room.close()
        server.wait_for_requests(SHUTDOWN_GRACE)
        server.server_close()
        storage.close()
        print("Chat room stopped.", flush=True)


def keep_presence_fresh(room, stop, in_progress):
    """A thread of its own: publish who arrived and who left, once a second at most.

    Each look counts as a request in progress (`in_progress`), so that stopping the server
    waits for an online list being published, as for any response.
    """
    failure = None  # the last failure to save, logged once however long it lasts
    while True:
        room.presence.wait_until_time_to_look(idle=PRESENCE_INTERVAL)
        with in_progress():
            if stop.is_set():  # checked once counted: either the shutdown waits for us, or we stop
                return
            try:
                room.refresh_presence()
                failure = None
            except StorageError as error:
                if str(error) != failure:
                    log(f"could not save a presence change, will retry: {error}")
                failure = str(error)


def log(text):
    # One write per line: print() writes the text and the newline separately, and another
    # thread's line could land between them.
    sys.stderr.write(f"[{time.strftime('%H:%M:%S')}] {text}\n")
    sys.stderr.flush()


def raise_open_file_limit():
    """Each connection is an open file; many systems allow only 1024 unless asked."""
    try:
        import resource
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        wanted = OPEN_FILES if hard == resource.RLIM_INFINITY else min(hard, OPEN_FILES)
        if soft < wanted:  # raise it, never lower it
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
    except (ImportError, ValueError, OSError):
        pass  # not on this system (Windows), or not allowed: keep what we have


# ##################################################################################################
# PART II. SPEED
# ##################################################################################################

# Part I is the whole room, and it is correct; with a few open pages it is also fast enough. With
# a thousand, its costs add up: each message wakes every parked thread at once, and each woken
# thread reads the disk, builds its own response and writes it, while only one of them can run
# Python at a time. Each block below opens with the cost it removes, the change, and the scenario
# of bench_chatroom.py that measures it (`python bench_chatroom.py --compare` runs the plain room
# and the full server side by side). The room does exactly the same; only the cost changes.

# ==================================================================================================
# 9. Settings of the speed layer
# ==================================================================================================

PAGE_GZIP_LEVEL = 9  # the page is compressed once, at start-up, so the smallest (slowest) level
#                      costs nothing per request
JSON_GZIP_MIN_BYTES = 1024  # JSON responses smaller than this are sent as they are: compressing
#                             them saves less than a packet
JSON_GZIP_LEVEL = 1  # each larger one is compressed as it is sent, so the fastest level: on chat
#                      text it gets most of what the slowest would, at a fraction of the cost
RECENT_MESSAGES = 500  # the latest messages kept in memory, encoded: a page less far behind than
#                        this is answered without reading the disk (between 500 and 1000 are kept)
ARRIVALS_PAUSE = 0.2  # seconds without a newcomer after which the newcomers are announced: people
#                       arriving together are announced together, once they are all in
ARRIVALS_MAX_WAIT = 2.0  # seconds a newcomer waits for that pause at most, if people keep coming


# ==================================================================================================
# 10. The broadcast: the thread that changes the room writes every pending response
# ==================================================================================================
# Cost: notify_all() wakes every parked thread at once. They queue for the GIL, and take turns at
# every system call (a read of the disk, a write to a socket lets go of it): with a thousand pages,
# a message costs many thread switches per delivery, and the last page hears the news long after
# the first.
# Change: the room keeps the list of pending polls, and uses it to send their responses (in the
# words of the chat-room example this design comes from: "the backend uses this list of pending
# requests to send the corresponding HTTP responses"). The thread that changes the room takes the
# whole list in one step, writes its own client's response first, then every pending response
# straight to its socket without waiting for any client (send_now). The parked threads are still
# woken, for their connections' next requests, but one after another: each wakes the next when it
# is about to wait again (the relay), so that one woken thread runs at a time.
# Measured by: bench_chatroom.py fanout (everyone reached, switches per delivery), sustained.

class PendingPoll(Poll):
    """A poll parked in the room's list of pending polls, and how to write its response.

    Who writes a poll's response follows from that list, so that each response has exactly one
    writer however threads interleave: while the poll is in the list, its own thread may take
    it out again (nothing new after its time-out; the room closing), and so may a newer poll of
    the same user's if a presence caps them (Part III); once a change has taken the list, the
    poll is that change's to answer, until it is `done` with it.

    `build_response` turns a response's JSON body into the very bytes the poll's own thread would
    write (status line, headers, body); it is None for a poll that only its own thread may
    answer (see FastHandlerMixin.room_may_answer).
    """

    def __init__(self, user, since, connection, build_response):
        super().__init__(user, since, connection)
        self.build_response = build_response
        self.done = False  # the change that took it is done with it: its own thread may go on
        self.wake_up = None  # the Condition its thread waits on, made only if it parks
        #                      (most polls are answered at once: see wait_for_change)
        self.asleep = False  # its thread is waiting on it
        self.woken_by_relay = False  # ... and the relay has woken it (see _wake_next)
        self.written = False  # the change wrote all that the socket would take at once,
        self.unsent = b""  # ... and this is the rest, for the poll's own thread to finish
        self.error = None  # ... or the socket said that the client has gone (an OSError)


class BroadcastRoomMixin:
    """Room, answering its pending polls from the thread that changes it (see the block above)."""

    def __init__(self, storage, presence, log_polls=False):
        super().__init__(storage, presence, log_polls)
        # Re-entrant: a thread may let the next one go (wake_next_if_owed) while holding it. Each
        # parked poll waits on a Condition of its own, built on this lock, so that the room wakes
        # exactly the thread it means to; Part I's one Condition is not used.
        self._lock = threading.RLock()
        self.changed = None
        self._pending = {}  # PendingPoll -> None: the parked polls, in the order they parked
        # The relay: the polls that are done (answered, or now their thread's to answer) whose
        # threads may still be asleep, in the order to wake them; and, for each thread, whether
        # the relay woke it and it still owes the next one its wake-up (.owed).
        self._to_wake = collections.deque()
        self._relay = threading.local()
        self._taken_here = threading.local()  # .polls: those this thread took, to answer
        # The latest messages, oldest first, each encoded once (see shared_answer), and the
        # version after which every message is among them: those that came since we started.
        self._recent_ids, self._recent_json = [], []
        self._recent_from = self.version
        self.online_json = encode_json(self.online)  # the online list, encoded once

    # --- Parking a poll ---------------------------------------------------------------------------

    def poll(self, poll, timeout, present=True):
        """As Part I's, but returns None if the room has already written the response to the
        poll's socket (see write_answers)."""
        if present:
            self._count_poll(poll)
        try:
            self.wait_for_change(poll, timeout)
        finally:
            if present:
                self.presence.poll_ended(poll)
        if poll.written:
            return None
        return self.answer(poll.since, poll.user)

    def wait_for_change(self, poll, timeout):
        """Park the poll until it is answered, or `timeout` seconds pass. At once if it is behind.

        The poll joins the list of pending polls, and its thread waits on the poll's own
        Condition. When the room changes, the changing thread writes the response and wakes
        us (write_answers): we then only finish what it could not write. If `timeout` passes
        first (nothing new), or the room closes, the poll is ours to answer.
        """
        deadline = time.monotonic() + timeout
        with self._lock:
            self.wake_next_if_owed()  # we are about to wait (see _wake_next)
            if poll.since != self.version or self.closing or timeout <= 0:
                return  # behind (or ahead, or we are stopping, or no wait was asked for)
            poll.wake_up = threading.Condition(self._lock)
            if self.log_polls:
                log(f"poll parked: {poll.user.name}, since version {poll.since} "
                    f"({len(self._pending) + 1} waiting)")
            self._pending[poll] = None  # (last: from here on, a change may take the poll)
            while not poll.done:
                if poll in self._pending:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0 or self.closing:  # the poll is ours to answer
                        del self._pending[poll]
                        if self.log_polls and not self.closing:
                            log(f"poll timed out after {timeout:g} s: {poll.user.name}, "
                                f"nothing new since version {poll.since}")
                        return
                else:
                    # A change took the list, and is answering us: never for long, as
                    # write_answers() waits for no socket, and is done with all it took even if
                    # it fails. The time-out is only there in case.
                    remaining = SHUTDOWN_GRACE
                poll.asleep = True
                poll.wake_up.wait(remaining)
                poll.asleep = False
            if poll.woken_by_relay:
                self._relay.owed = True  # we owe the next thread its wake-up

    def _count_poll(self, poll):
        """Count the poll as its user's; if the presence says they have too many (Part III caps
        them), let their oldest go now: its own thread answers it."""
        oldest = self.presence.poll_began(poll)
        if oldest is not None:
            with self._lock:
                if oldest in self._pending:  # still parked, and still ours to take
                    del self._pending[oldest]
                    oldest.done = True  # (and not written: its own thread answers it)
                    oldest.wake_up.notify()  # that thread alone: it owes no one a wake-up

    def close(self):
        with self._lock:
            self.closing = True
            for poll in self._pending:
                poll.wake_up.notify()

    # --- The relay --------------------------------------------------------------------------------

    def _wake_next(self):
        """Wake the next parked thread whose poll is done, if any. The caller holds _lock.

        Waking is a relay: write_answers() wakes one parked thread, and each thread that wakes
        wakes the next, not at once, but when it is about to wait again: for its page's next
        poll, for its client, or for the disk (wake_next_if_owed). So one woken thread runs at a
        time. Woken together, as by notify_all(), threads take turns at the GIL at every system
        call, each turn a switch from one thread to another: more switches, and more of the
        server's time, than the responses themselves cost.

        A thread that woke by itself meanwhile (its time-out came) is past waiting, and is
        skipped: it needs no wake-up, and owes none.
        """
        while self._to_wake:
            poll = self._to_wake.popleft()
            if poll.asleep:
                poll.woken_by_relay = True
                poll.wake_up.notify()
                return

    def wake_next_if_owed(self):
        """If the relay woke this thread and it has not woken the next one yet, do it now.

        Called before anything that may wait: parking the next poll, reading from the client
        or writing to it (FastHandlerMixin), a change to the room (the disk), the end of a
        connection.
        """
        if self.owes_wake_up():
            with self._lock:
                self._relay.owed = False
                self._wake_next()

    def owes_wake_up(self):
        return getattr(self._relay, "owed", False)

    # --- Changing the room, and answering the pending polls ---------------------------------------

    def add_message(self, user, text, key=None):
        self.wake_next_if_owed()  # saving may wait for the disk
        return super().add_message(user, text, key)

    def rename(self, user, name):
        self.wake_next_if_owed()  # saving may wait for the disk
        super().rename(user, name)

    def refresh_presence(self):
        changed = super().refresh_presence()
        self.write_answers_taken_here()  # no client of ours to answer first, unlike a post
        return changed

    def publish(self, version, message=None, online=None):
        """Make a saved change visible, and take the list of pending polls, to answer them.

        Every poll in the list is behind the new version: a poll parks only when it is up to
        date. The list is taken whole, in one step, however long it is: the lock is held no
        longer with a thousand polls than with one. This thread answers them once its own
        client has its response (write_answers_taken_here).
        """
        online_json = None if online is None else encode_json(online)  # (not under the lock)
        with self._lock:
            self.version = version
            if message is not None:
                self._remember(message)
            if online is not None:
                self.online, self.online_json = online, online_json
                self.online_version = version
            taken, self._pending = self._pending, {}
        mine = getattr(self._taken_here, "polls", None)
        if mine:  # (a thread that changed the room twice before answering: rare)
            mine.update(taken)
        else:
            self._taken_here.polls = taken  # not copied: a thousand polls, on every change

    def write_answers_taken_here(self):
        """Answer the pending polls this thread took when it changed the room, if any."""
        taken = getattr(self._taken_here, "polls", None)
        if taken:
            self._taken_here.polls = {}
            self.write_answers(taken)

    def write_answers(self, taken):
        """Write each taken poll's response to its socket, never waiting; then wake their threads.

        It runs without the room's lock held, so other posts and polls go on meanwhile; a
        response is made when it is written, so it may also carry a change made since the list
        was taken (never less than the change that took it). Each woken thread finishes what did
        not fit, and reads its page's next request.
        """
        # Every poll taken has seen the same version: each parked when it was up to date, and
        # each change takes the whole list. So one shared answer serves them all.
        shared = None
        started, version = time.perf_counter(), self.version  # (both for the log line only)
        try:
            for poll in taken:
                if poll.build_response is None:
                    continue  # its own thread answers it
                if shared is None:
                    shared = self.shared_answer(poll.since)
                response = poll.build_response(with_you(shared, poll.user))
                try:
                    poll.unsent = send_now(poll.connection, response)
                except OSError as error:  # the client has gone
                    poll.error = error
                poll.written = True
        finally:
            with self._lock:
                for poll in taken:
                    poll.done = True
                self._to_wake.extend(taken)
                self._wake_next()
        if self.log_polls and taken:
            log(f"version {version}: answered {len(taken)} waiting "
                f"poll{'s' if len(taken) > 1 else ''} in "
                f"{(time.perf_counter() - started) * 1000:.1f} ms")

    # --- One answer for all, from the latest messages kept encoded --------------------------------
    # Cost: Part I reads every answer's messages from the disk and encodes them as JSON, once for
    # each page, although a thousand pages are owed the same bytes.
    # Change: each message is encoded once, when it arrives, and the latest are kept in memory;
    # an answer joins those bytes, and only its short "you" part differs from page to page.
    # Measured by: bench_chatroom.py fanout and sustained (server CPU per delivery).

    def _remember(self, message):
        """Keep a new message, encoded, with the latest ones (the caller holds the lock)."""
        self._recent_ids.append(message["id"])
        self._recent_json.append(encode_json(message))
        if len(self._recent_ids) > 2 * RECENT_MESSAGES:  # forget the older half, in one go
            self._recent_from = self._recent_ids[RECENT_MESSAGES - 1]
            del self._recent_ids[:RECENT_MESSAGES], self._recent_json[:RECENT_MESSAGES]

    def answer(self, since, user):
        return with_you(self.shared_answer(since), user)

    def shared_answer(self, since):
        """The part of the answer to `since` that is the same for every reader, encoded."""
        with self._lock:
            version = self.version
            snapshot = since is None or since > version
            online = self.online_json if snapshot or self.online_version > since else None
            # (_recent_from == 0: the room was empty when we started, so every message is kept)
            # (As many as fit in MAX_ANSWER_BYTES, and a batch cut short as in Part I's answer.)
            if snapshot and (len(self._recent_json) >= SNAPSHOT_SIZE or self._recent_from == 0):
                messages = that_fit(reversed(self._recent_json[-SNAPSHOT_SIZE:]))[::-1]
            elif not snapshot and since >= self._recent_from:
                first = bisect.bisect_right(self._recent_ids, since)
                messages = that_fit(self._recent_json[first:first + MAX_BATCH])
                if first + len(messages) < len(self._recent_ids) or len(messages) == MAX_BATCH:
                    version = self._recent_ids[first + len(messages) - 1]
            else:
                messages = None
        if messages is None and snapshot:
            stored = self.storage.latest_messages(version, SNAPSHOT_SIZE)
            messages = that_fit(map(encode_json, reversed(stored)))[::-1]
        elif messages is None:
            stored = self.storage.messages_after(since, version, MAX_BATCH)
            messages = that_fit(map(encode_json, stored))
            if len(messages) < len(stored) or len(stored) == MAX_BATCH:
                version = stored[len(messages) - 1]["id"]
        answer = b'{"version":%d,"messages":[%s]' % (version, b",".join(messages))
        if online is not None:
            answer += b',"online":' + online
        return answer + b"}"


def with_you(shared, user):
    """An answer's shared part, b'{...}', with this reader's own "you" field added at the end."""
    return shared[:-1] + b',"you":' + public_json(user) + b"}"


def public_json(user):
    """user.public(), encoded, and kept on the user until their name changes: every response to
    their polls carries it."""
    # One tuple, replaced whole: another thread (a broadcast) may read it at any moment.
    name, encoded = getattr(user, "public_json", (None, None))
    if name != user.name:
        name = user.name  # read once: so that the bytes match what is kept
        encoded = encode_json({"id": user.id, "name": name})
        user.public_json = (name, encoded)
    return encoded


# A send() that does not wait needs the MSG_DONTWAIT flag, which Windows lacks: there, every
# poll's own thread writes its response (see FastHandlerMixin.room_may_answer).
ANSWERS_WITHOUT_WAITING = hasattr(socket, "MSG_DONTWAIT")


def send_now(connection, data):
    """Write what the socket takes of `data` at once, without waiting; return the rest.

    MSG_DONTWAIT makes this one send() non-blocking, on a socket that stays blocking for its own
    thread. A client that reads slowly, or not at all, thus never holds up the room. Raises
    OSError if the client has gone.
    """
    if not ANSWERS_WITHOUT_WAITING:
        connection.sendall(data)
        return b""
    try:
        sent = connection.send(data, socket.MSG_DONTWAIT)
    except BlockingIOError:  # not a byte fits now
        return data
    return data[sent:]


def request_waiting(connection):
    """True if the client's next bytes are here: a peek at the socket that never waits."""
    if not ANSWERS_WITHOUT_WAITING:  # no MSG_DONTWAIT (Windows): take it that they are not
        return False
    try:
        return connection.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) != b""
    except OSError:  # BlockingIOError: nothing yet; or the connection has failed
        return False


class FastHandlerMixin:
    """ChatHandler's side of the broadcast, each response in one write, and a smaller page."""

    # --- The broadcast, seen from a poll's thread -------------------------------------------------
    # (The cost and the change: section 10.) A poll the room may answer carries a way to build
    # its response; a thread that changed the room answers its own client first, then the pending
    # polls it took; and a thread the relay woke lets the next one go before it waits again.

    def get_poll(self, query):
        """As Part I's; but the room may have written the response already."""
        poll, timeout, present = self.read_poll(query)
        body = self.server.room.poll(poll, timeout, present)
        if self.server.room.closing:  # the server is stopping: no next request on this one
            self.close_connection = True
        if body is not None:
            self.send(200, body, "application/json")
        elif poll.error is not None:
            raise poll.error  # the client has gone: one line in the log, as for any write
        elif poll.unsent:
            self.write(poll.unsent)  # what the room could not write at once

    def new_poll(self, user, since):
        return PendingPoll(user, since, self.connection,
                           self.poll_response if self.room_may_answer() else None)

    def room_may_answer(self):
        """True if the room may write this poll's response for us: if it is the same response
        whichever thread writes it. Not so for a HEAD request (no body), a new client (it is
        owed a cookie), or a response after which we close the connection (HTTP/1.0 without
        keep-alive, or a body we did not read)."""
        return (ANSWERS_WITHOUT_WAITING and self.command == "GET" and self.new_sid is None
                and not self.body_pending and not self.close_connection)

    def poll_response(self, body):
        """The bytes send(200, body, "application/json") writes, for a poll the room may answer.

        The room calls this from the thread that changed it, a thousand times in a row, so it
        reads nothing that belongs to this request alone (room_may_answer() made sure there is
        nothing of that kind), and only the Date and the length are written anew: the rest of
        the head is the same for every such response, and made once (poll_head_end).
        """
        return POLL_RESPONSE % (date_header().encode("latin-1"), len(body),
                                self.server.poll_head_end(), body)

    def handle_one_request(self):
        room = self.server.room
        if room.owes_wake_up() and not request_waiting(self.connection):
            room.wake_next_if_owed()  # we are about to wait for the next request
        try:
            super().handle_one_request()
        finally:
            room.write_answers_taken_here()  # (already done, unless the request failed)

    def read_json(self):
        self.server.room.wake_next_if_owed()  # reading the body may wait for the client
        return super().read_json()

    def finish(self):
        self.server.room.wake_next_if_owed()
        super().finish()

    # --- Each response in one write ---------------------------------------------------------------
    # Cost: send_response(), send_header() and end_headers() build the head line by line and
    # write it, then the body, in a second write: two system calls, and two turns at the GIL.
    # Change: the whole response is made as bytes (http_response) and written at once; a thread
    # that changed the room writes its own client's response without waiting, then the pending
    # responses it took, then whatever of its own did not fit.
    # Measured by: bench_chatroom.py fanout (the POST round trip with 1000 waiting).

    def send(self, status, body, content_type, headers=()):
        body, headers = self.compressed(body, content_type, headers)
        lines = self.response_headers(status, body, content_type, headers)
        response = http_response(status, lines, body if self.command != "HEAD" else b"")
        self.new_sid = None  # (its Set-Cookie is in this response: given once)
        try:
            rest = send_now(self.connection, response)
        finally:
            self.server.room.write_answers_taken_here()  # the waiting pages, next
        if rest:
            self.write(rest)

    def write(self, data):
        """Write all of `data`: a response, or what is left of one."""
        self.server.room.wake_next_if_owed()  # a write may wait for the client
        self.write_whole(data)

    def write_whole(self, data):
        self.wfile.write(data)  # (Part III gives this a deadline)

    # --- Responses with many messages, compressed -------------------------------------------------
    # Cost: a page's first response (a snapshot of 100 messages), a batch after it fell behind,
    # and each history page it reads back are the largest responses: tens of KB of chat text,
    # which gzip makes four to five times smaller.
    # Change: a JSON response of JSON_GZIP_MIN_BYTES or more is gzip-compressed for a client
    # whose Accept-Encoding allows it (accepts_gzip, below). Not the broadcast's responses to
    # parked polls: they carry only what is new, and the room writes them (poll_response)
    # without passing here, as fast as before.
    # Measured by: bench_chatroom.py bytes (snapshot_bytes);
    # test_responses_with_many_messages_are_gzipped_for_clients_that_accept_it.

    def compressed(self, body, content_type, headers):
        """`body` and `headers`, gzip-compressed if the response is large JSON and the client
        accepts it."""
        if content_type != "application/json" or len(body) < JSON_GZIP_MIN_BYTES:
            return body, headers
        headers = [*headers, ("Vary", "Accept-Encoding")]  # (for a cache: see get_page)
        if accepts_gzip(self.headers.get("accept-encoding", "")):
            body = gzip.compress(body, compresslevel=JSON_GZIP_LEVEL, mtime=0)
            headers.append(("Content-Encoding", "gzip"))
        return body, headers

    # --- The page, compressed, and not sent again to a browser that has it ------------------------
    # Cost: the page is about 40 KB; every visit, and every reload, sends all of it.
    # Change: it is sent gzip-compressed (about a third of the size) to a browser that accepts
    # it, both forms made once at start-up, each with an ETag; a browser that has the page asks
    # with If-None-Match and gets a 304 with no body.
    # Measured by: bench_chatroom.py crowd (2000 people opening the page at once).

    def get_page(self, query):
        """GET /: the page, gzip-compressed for a browser that accepts it, or 304."""
        coding = "gzip" if accepts_gzip(self.headers.get("accept-encoding", "")) else "identity"
        body, etag = self.server.page_representations[coding]
        # Vary: a cache must not hand the gzip response to a client that did not ask for it.
        # These three go in a 304 too, to refresh what the browser has stored (RFC 9110 15.4.5).
        headers = [("Cache-Control", "no-cache"), ("Vary", "Accept-Encoding"), ("ETag", etag)]
        if none_match(self.headers.get("if-none-match"), etag):
            self.send(304, b"", None, headers)
            return
        if coding == "gzip":
            headers.append(("Content-Encoding", "gzip"))
        self.send(200, body, "text/html; charset=utf-8", headers)


# A poll's response, as poll_response() fills it in: the Date, the length, the rest, the body.
POLL_RESPONSE = (b"HTTP/1.1 200 OK\r\n%s\r\n"
                 b"Content-Type: application/json\r\nContent-Length: %d\r\n%s%s")


def http_response(status, headers, body):
    """A whole response as bytes: the status line, the Date and the other headers, the body."""
    reason = http.server.BaseHTTPRequestHandler.responses[status][0]
    head = f"HTTP/1.1 {status} {reason}\r\n{date_header()}\r\n"
    head += "".join(f"{name}: {value}\r\n" for name, value in headers)
    return (head + "\r\n").encode("latin-1") + body


def date_header():
    """The Date line every response carries (RFC 9110 section 6.6.1: a server with a clock must).

    Its text changes once a second, and a broadcast writes a thousand responses in less, so it is
    made once a second and kept. Two threads may both make it at a new second: no harm.
    """
    global _date_line
    now = int(time.time())
    second, line = _date_line
    if second != now:
        line = "Date: " + email.utils.formatdate(now, usegmt=True)  # Tue, 01 Dec 2026 09:18:21 GMT
        _date_line = (now, line)
    return line


_date_line = (None, "")  # (the second it was made for, "Date: ..."), for date_header()


def accepts_gzip(header):
    """Whether an Accept-Encoding header allows gzip: named, or covered by "*", and not q=0.

    "gzip, deflate, br" says yes; "gzip;q=0" and "identity" say no. No header at all gets the
    page as it is: RFC 9110 (12.5.3) then allows any coding, but a client that sent none may not
    undo it (curl without --compressed would print the compressed bytes).
    """
    weights = {}
    for item in header.lower().split(","):
        coding, _, parameters = item.partition(";")
        weight = re.fullmatch(r"\s*q\s*=\s*([01](?:\.[0-9]{0,3})?)\s*", parameters)
        weights[coding.strip()] = float(weight.group(1)) if weight else 1.0
    return weights.get("gzip", weights.get("x-gzip", weights.get("*", 0))) > 0


def none_match(header, etag):
    """Whether If-None-Match names `etag`, so that the client already has it (RFC 9110 13.1.2).

    The header lists entity tags ("a", W/"b") or says "*", anything. The comparison is weak
    (W/ is ignored), as RFC 9110 asks for If-None-Match.
    """
    if header is None:
        return False
    if header.strip() == "*":
        return True
    return etag in re.findall(r'(?:W/)?("[^"]*")', header)


def representations(page):
    """The page as it can be sent, each with its ETag: {"identity": (body, etag), "gzip": ...}.

    Each ETag is a hash of exactly the bytes sent: a strong validator (RFC 9110 8.8.3),
    different for the two encodings, and different as soon as the page is changed.
    """
    compressed = gzip.compress(page, compresslevel=PAGE_GZIP_LEVEL, mtime=0)
    # 32 hex digits (128 bits) of the hash: more than enough to tell two pages apart.
    return {coding: (body, '"' + hashlib.sha256(body).hexdigest()[:32] + '"')
            for coding, body in (("identity", page), ("gzip", compressed))}


# ==================================================================================================
# 11. Presence for a crowd: the list kept, and arrivals announced together
# ==================================================================================================
# Cost: Part I sorts everyone online by name at every look, once a second; and a crowd arriving
# one by one over several seconds changes the list at every look: each change wakes every parked
# poll.
# Change: the sorted list is kept, and made again only when someone arrives or leaves or a name in
# it changes; and while newcomers keep coming, the list waits until they pause (ARRIVALS_PAUSE),
# so that a crowd coming in is announced once, when it is in.
# Measured by: bench_chatroom.py idle (the cost of a quiet room) and crowd.

class QuickPresenceMixin:
    """Presence, with the online list kept and arrivals announced together."""

    def __init__(self, window):
        super().__init__(window)
        self._online = None  # online_list()'s last answer; None once someone arrives or leaves
        self._online_names = []  # (User, the name it had) for each in _online
        # The presence thread waits on _arrivals; the first newcomer since it last looked wakes
        # it, and it reads _last_arrival again whenever its wait ends (wait_until_time_to_look).
        self._arrivals = threading.Condition(self._lock)
        self._first_arrival = None  # time.monotonic() of the first newcomer since then
        self._last_arrival = None  # and of the latest one
        self._last_look = time.monotonic()  # when wait_until_time_to_look last returned

    def _seen_now(self, user):
        if user.id not in self._last_seen:
            self._online = None  # someone arrived: online_list() must make the list again
            now = time.monotonic()
            self._last_arrival = now
            if self._first_arrival is None:
                self._first_arrival = now
                self._arrivals.notify()  # our callers hold _lock, which _arrivals is built on
        super()._seen_now(user)

    def wait_until_time_to_look(self, idle):
        """Return when the online list should be looked at again (by Room.refresh_presence).

        That is `idle` seconds after the last look, as in Part I; but while newcomers keep
        coming, not before they pause (ARRIVALS_PAUSE seconds without another), or until
        ARRIVALS_MAX_WAIT seconds after the first.
        """
        with self._arrivals:
            due = self._last_look + idle
            while True:
                if self._first_arrival is not None:
                    due = max(due, min(self._last_arrival + ARRIVALS_PAUSE,
                                       self._first_arrival + ARRIVALS_MAX_WAIT))
                remaining = due - time.monotonic()
                if remaining <= 0:
                    self._first_arrival = None
                    self._last_look = time.monotonic()
                    return
                self._arrivals.wait(remaining)

    def online_list(self):
        with self._lock:
            if self._forget_departed():
                self._online = None
            if self._online is None or any(user.name != name for user, name in self._online_names):
                self._online_names = [(user, user.name) for user in self._sorted_users()]
                self._online = [{"id": user.id, "name": name} for user, name in self._online_names]
            return self._online


# ==================================================================================================
# 12. A crowd arriving at once: threads that start without a handshake
# ==================================================================================================
# Cost: ThreadingHTTPServer starts a threading.Thread for each connection, and start() waits until
# the new thread runs: two turns at the GIL, each a long wait when hundreds of threads want it, so
# that newcomers queue behind the accepting thread.
# Change: _thread.start_new_thread, which returns at once.
# Measured by: bench_chatroom.py crowd (2000 people opening the room at once).

class FastServerMixin:
    """ChatServer, taking in a crowd quickly, and with the page's compressed forms."""

    def __init__(self, address, handler, room, sessions, limiter, page, chime, settings):
        super().__init__(address, handler, room, sessions, limiter, page, chime, settings)
        self.page_representations = representations(page)  # (made once: see get_page)
        self._poll_head_end = None  # made at the first broadcast, once every part has set
        #                             common_headers

    def poll_head_end(self):
        """The headers after Content-Length of a poll's response, and the empty line, as bytes:
        those response_headers() gives a poll the room may answer (see poll_response)."""
        if self._poll_head_end is None:
            lines = [*self.common_headers, ("Cache-Control", "no-store")]
            self._poll_head_end = "".join(f"{name}: {value}\r\n" for name, value in lines)
            self._poll_head_end = (self._poll_head_end + "\r\n").encode("latin-1")
        return self._poll_head_end

    def process_request(self, request, client_address):
        """Run the connection in a new thread, and return at once. Like a daemon thread, it does
        not hold up the exit of the process."""
        _thread.start_new_thread(self.process_request_thread, (request, client_address))


# ##################################################################################################
# PART III. DEFENCES
# ##################################################################################################

# Parts I and II make a room that trusts its clients: it takes requests as they come, waits as
# long as a client likes, and keeps whatever anyone sends it. On the open network some clients are
# hostile, and others just slow or broken. Each block below opens with the threat, the defence,
# and the test in test_chatroom.py that proves it.

# ==================================================================================================
# 13. Settings of the defences
# ==================================================================================================

# Connections.
DEFAULT_MAX_CLIENTS = 2500  # open connections (one thread each); past it newcomers get a quick 503
DEFAULT_MAX_CLIENTS_PER_ADDRESS = 500  # open connections from one IP address, so that one client
#                                        cannot take every place in the room. A browser opens at
#                                        most 6 connections to a host and a page holds 1 or 2, so
#                                        a home or an office behind one NAT address stays far below
BUSY_RETRY_AFTER = 5  # seconds we ask a refused client to wait before trying again
REFUSAL_LINGER = 2.0  # seconds a refused connection stays open so the client can read our 503
MAX_LINGERING = 256  # refused connections kept open at once for that; past it they close at once
LINGER_SWEEP_INTERVAL = 0.1  # seconds between two looks at the refused connections (each look is
#                              a read on every one of them): after every accept, a flood of
#                              refused clients would keep the accepting thread busy with them
MAX_CLOSING = 256  # connections we may hold past --max-clients for a moment: those let go of to
#                   make room for a newcomer (see let_go_of_oldest_waiting), whose threads have
#                   not ended yet. Past it, a newcomer gets the 503

# Time.
DEFAULT_REQUEST_TIMEOUT = 10  # seconds from the end of one response until the next request has
#                               fully arrived: a client that stalls, or sends a byte at a time, is
#                               dropped
FIRST_REQUEST_TIMEOUT = 3  # seconds from connecting until the head of the first request has
#                            arrived. A browser sends it at once (and one that opened a connection
#                            ahead of need finds it closed, and opens another), so a connection
#                            silent this long is a slow or idle client holding a place. Shorter
#                            than --request-timeout, which stays for the later requests on a
#                            kept-alive connection: a page may ask again seconds after an answer
MIN_READ_RATE = 16 * 1024  # bytes a second: a client must read a response at least this fast, after
#                            the grace of --request-timeout, or it is dropped (a slow phone link
#                            reads far faster)

# Memory.
MAX_PARKED_PER_USER = 6  # a browser opens at most 6 connections to one host: only scripts exceed it
MAX_ONLINE = 1000  # people in the online list: every response that carries the list carries them
#                    all, and a script can be many people. Past this, newcomers are served but not
#                    listed
MAX_CACHED_USERS = 10_000  # users kept in memory; past this, those not online are forgotten (and
#                            read back from the database when they return)
FORGET_POSTS_EVERY = 1000  # attempts to post between two clean-ups of the limiter's memory: a
#                            clean-up looks at every recent poster, too slow to do on every post
REQUEST_BUFFER = 2048  # bytes read ahead on each connection: a browser's request fits, and the
#                        usual 8 KB would stay mostly empty, on every one of thousands
MAX_REQUEST_LINE = 8 * 1024  # bytes in "GET /path?query HTTP/1.1": our URLs are short, and a
#                              parked poll keeps its request line (and path, and query) in memory
MAX_HEADER_BYTES = 32 * 1024  # bytes of all header lines together, also bounding each one: a
#                               browser sends 1 to 2 KB, and a parked poll keeps its headers
MAX_HEADERS = 100  # header lines in one request, as http.client allows
MAX_UNSENT = 32 * 1024  # bytes of responses the kernel may hold unsent for one connection; past it,
#                         writing waits for the client to read. (Unasked, the kernel holds
#                         megabytes for a client that reads slowly: memory anyone could tie up.)

# The request's head.
SINGLE_HEADERS = {"host": "Host", "content-length": "Content-Length"}  # refused if repeated: the
#                 request's length and its host must have one reading only. A repeat of any other
#                 header is joined to the first with a comma (RFC 9110 section 5.3), but Cookie
#                 lines, which are joined as the cookie list is written (COOKIE_SEPARATOR)
COOKIE_SEPARATOR = "; "  # between two Cookie lines joined into one (RFC 9113 section 8.2.3;
#                          RFC 6265 section 4.2.1 writes "a=1; b=2"): a comma would fuse the last
#                          cookie of one line with the first of the next

# Identities, and how fast one person or one address may act.
SESSION_RANDOM_BYTES = 12  # the random part of a session id (96 bits: never guessed, and nobody
#                            can try 2**96 of them against a server)
SESSION_TAG_BYTES = 12  # the part that signs it, an HMAC-SHA256 cut to 96 bits: as hard to forge.
#                         The two together are 24 bytes, 32 base64 characters: SESSION_ID_PATTERN
SESSION_KEY_BYTES = 32  # the key that signs them, made once and kept in the data file (256 bits)
DEFAULT_PEOPLE_PER_ADDRESS = 30  # people we expect behind one address at most (a class, an office
#                                  behind one NAT): the limits on one address are theirs together
NEW_SESSIONS_PER_PERSON = 2  # cookies an address may be given at once, for each such person (a
#                              person may open the room in two browsers); then ...
NEW_SESSION_EVERY = 30.0  # ... one more every this many seconds, per person (so one a second for
#                           30 people): a person is given a cookie once, and keeps it for a year
RENAME_LIMITS = [(3, 30), (10, 600)]  # renames by one person, as RATE_LIMITS for messages: a typo
#                                       fixed twice passes; each rename is a notice to everyone
MAX_TRACKED = 10_000  # people (or addresses) each rate limit remembers at most: about 1 KB each.
#                       Past it, the longest remembered are forgotten first

# The grammar of a request's head (RFC 9110 sections 5.1, 5.5 and 5.6.2; RFC 9112 section 3).
TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")  # a method or a header name
VISIBLE_ASCII = re.compile(r"[!-~]+")  # a request target: no spaces, controls or other bytes
# "http://host:port/path?query": (host:port, /path?query). A user name ("http://ann@host/") is
# refused by is_host: it is there to make a link look as if it led somewhere else.
ABSOLUTE_FORM = re.compile(r"(?i:https?)://([^/?]*)(.*)")
# Header lines: "Name: value" and the end of the line. A value may hold no control character but
# the tab: so no NUL, and no bare CR, which some programs take for the end of the line.
HEADER_BLOCK = re.compile(f"(?:{TOKEN.pattern}:[^\x00-\x08\x0a-\x1f\x7f]*\r?\n)*")
HEADER_LINE = re.compile("([^:]+):([^\r\n]*)\r?\n")  # (name, value), in lines HEADER_BLOCK passed
# A Host: a name, an IPv4 address or an [IPv6 address], and an optional :port (RFC 3986 3.2.2).
HOST = re.compile(r"(?:(\[[0-9A-Fa-f:.]+\])|(?:[A-Za-z0-9._~!$&'()*+,;=-]|%[0-9A-Fa-f]{2})+)"
                  r"(?::[0-9]*)?")

# Every response carries these: the page may run only its own script and style, may not be framed by
# another site, and the browser must not guess content types or leak our address to other sites.
# The page's inline <script> and <style> are allowed by their hashes, computed at start-up.
CONTENT_SECURITY_POLICY = (
    "default-src 'self'; script-src {script}; style-src {style}; img-src 'self' data:; "
    "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)


# ==================================================================================================
# 14. The defended handler
# ==================================================================================================

class DefendedHandlerMixin:
    """ChatHandler, for the open network: each block of methods below adds one defence."""

    # --- Request smuggling: one request read two ways -------------------------------------------
    # Threat: a proxy in front of us and this server read the same bytes as different requests
    # (two Content-Length headers, a header name with a space), so that a request hidden in
    # another's body reaches us as if someone else had sent it.
    # Defence: parse_request, a strict reading of the request's head: whatever RFC 9112 does not
    # allow is a 400, and the connection is closed. It also bounds the head's size (414, 431).
    # Proved by: test_a_request_with_unclear_framing_is_refused,
    # test_a_malformed_request_head_is_refused, test_at_most_100_header_lines_and_32_kib_of_them,
    # test_an_http_1_1_request_needs_one_valid_host,
    # test_the_absolute_form_is_served_and_judged_by_its_host

    def parse_request(self):
        """Read the request line and the headers. False if refused (and already answered).

        This replaces http.server's parse_request, which hands the header lines to the email
        package: a parser made for mail (folded lines, MIME parts), lenient where HTTP must not
        be. (Ours is also several times faster: parsing was the largest part of a poll's cost.)
        An HTTP header is one "Name: value" line; an empty line ends them.

        It is strict on purpose. When a proxy in front of us and this server read the same bytes
        differently (one takes the first Content-Length, the other the second; one ignores a
        header with a space in its name, the other does not), a request can hide inside another
        one's body and reach us as if sent by someone else: "request smuggling". So whatever
        RFC 9112 does not allow is refused with 400 and the connection closed, never guessed at.
        """
        self.command, self.request_version = None, "HTTP/0.9"
        self.close_connection = True
        self.requestline = str(self.raw_requestline, "iso-8859-1").rstrip("\r\n")
        if len(self.raw_requestline) > MAX_REQUEST_LINE:
            self.send_error(414, f"The request line is longer than {MAX_REQUEST_LINE} bytes.")
            return False
        words = self.requestline.split(" ")
        if len(words) != 3 or not words[2].startswith("HTTP/"):
            self.send_error(400, "The request line is not METHOD PATH HTTP/1.1.")
            return False
        if words[2] not in ("HTTP/1.0", "HTTP/1.1"):
            self.send_error(505, "Only HTTP/1.0 and HTTP/1.1 are spoken here.")
            return False
        self.command, target, self.request_version = words
        if not TOKEN.fullmatch(self.command) or not VISIBLE_ASCII.fullmatch(target):
            self.send_error(400, "The request line has a character no method or path may have.")
            return False
        # The absolute form, "GET http://host:port/path HTTP/1.1", is what a client sends to a
        # proxy, and a server must accept it too (RFC 9112 section 3.2.2): the host in it counts,
        # not the Host header.
        absolute = ABSOLUTE_FORM.fullmatch(target)
        if absolute is not None:
            authority, target = absolute.groups()
            if not target.startswith("/"):
                target = "/" + target  # "http://host" and "http://host?q" ask for the path "/"
        self.path = target
        if not self.read_headers():
            return False
        if self.waiting_for_first_request:
            self.first_request_arrived()  # (see "Slow and stalled clients", below)
        if self.request_version == "HTTP/1.1" and "host" not in self.headers:
            self.send_error(400, "An HTTP/1.1 request needs a Host header.")
            return False
        if absolute is not None:
            self.headers["host"] = authority
        if "host" in self.headers and not is_host(self.headers["host"]):
            self.send_error(400, "The host is not a host name or address with an optional port.")
            return False
        if not self.framing_is_clear() or not self.host_is_served():
            return False
        connection = self.headers.get("connection", "").lower()
        if "," in connection:  # a list, such as "keep-alive, Upgrade"
            connection = {token.strip() for token in connection.split(",")}
        else:
            connection = {connection}
        keep_alive = self.request_version == "HTTP/1.1" or "keep-alive" in connection
        self.close_connection = "close" in connection or not keep_alive
        # curl asks this before sending a larger body; an HTTP/1.0 client cannot (RFC 9110
        # section 10.1.1), and must never be sent a 1xx response (section 15.2).
        expect = self.headers.get("expect", "").lower()
        if expect == "100-continue" and self.request_version == "HTTP/1.1":
            return self.handle_expect_100()
        return True

    def read_headers(self):
        """Read the header lines into self.headers, within their budgets. False if refused.

        A name that comes again is joined to the first one's value with a comma, which RFC 9110
        (section 5.3) says means the same as the separate lines, so nothing that came is
        ignored (Cookie lines with "; ", as cookies are listed); but a header that must have one
        value (SINGLE_HEADERS) is refused if repeated.
        """
        lines = []
        budget = MAX_HEADER_BYTES  # what the lines still to come may take, together
        while True:
            line = self.rfile.readline(budget + 2)  # (+2: the CRLF, to know the line ended)
            if line in (b"\r\n", b"\n"):
                break
            budget -= len(line)
            if budget < 0 or len(lines) == MAX_HEADERS:
                self.send_error(431, f"The request's headers are more than {MAX_HEADERS} lines "
                                     f"or {MAX_HEADER_BYTES // 1024} KiB.")
                return False
            if not line.endswith(b"\n"):
                self.send_error(400, "The request ended in the middle of its headers.")
                return False
            lines.append(line)
        # The whole block is checked at once, and then cut into names and values, each by one
        # regular expression: a dozen steps of Python for each line made this the largest cost
        # of a poll (a browser sends ten lines or so).
        block = b"".join(lines).decode("iso-8859-1")
        if not HEADER_BLOCK.fullmatch(block):  # (also refusing a line folded onto the last one)
            self.send_error(400, "A header line is not Name: value, with a name of "
                                 "letters, digits and -!#$%&'*+.^_`|~ and a value with no "
                                 "control characters.")
            return False
        self.headers = {}  # by lower-case name
        for name, value in HEADER_LINE.findall(block):
            name, value = name.lower(), value.strip(" \t")
            if name not in self.headers:
                self.headers[name] = value
            elif name in SINGLE_HEADERS:
                self.send_error(400, f"A request may have only one {SINGLE_HEADERS[name]} header.")
                return False
            elif name == "cookie":  # (see "Cookies tossed in", section 16)
                self.headers[name] += COOKIE_SEPARATOR + value
            else:
                self.headers[name] += ", " + value
        return True

    def framing_is_clear(self):
        """Refuse a request whose body's length could be read two ways, or cannot be known at all
        (RFC 9112 section 6.3). False if refused. A chunked body, which no route takes, is refused
        later with 411, when it would be read."""
        length = self.headers.get("content-length")
        coding = self.headers.get("transfer-encoding")
        if coding is not None:
            if length is not None:
                self.send_error(400, "A request may not have both Content-Length and "
                                     "Transfer-Encoding.")
                return False
            if coding.rsplit(",", 1)[-1].strip(" \t").lower() != "chunked":
                # Only chunked says where a body ends; the codings before it only transform it.
                self.send_error(400, "The body's length cannot be known: its Transfer-Encoding "
                                     "does not end with chunked.")
                return False
            return True
        if length is None:
            return True
        if not DIGITS.fullmatch(length):  # not isdigit(): it also accepts "²"
            self.send_error(400, "The Content-Length header is not a number.")
            return False
        return True

    # --- DNS rebinding: another site's page talking to us as if it were us ------------------------
    # Threat: a hostile web page points its own domain name at this machine (at 127.0.0.1, or at
    # our address on the network with --host 0.0.0.0), and its script then talks to the room as
    # a page of the same site: it reads the history and posts. Its requests still carry the
    # hostile name in Host, as the browser knows it.
    # Defence: a request is served only if its Host names us: a name given with --allowed-host,
    # the IP address its connection arrived at (any port), or, if it came over loopback,
    # localhost or a loopback address. Any other name gets 421 (RFC 9110 section 15.5.20), with
    # the flag that would allow it. An IP address needs no flag: rebinding needs a name.
    # Proved by: test_a_foreign_host_name_is_refused,
    # test_on_the_network_only_the_rooms_own_host_names_are_served

    def host_is_served(self):
        """Refuse (421) a Host we do not answer for. False if refused."""
        host = self.headers.get("host")
        if host is None:  # (HTTP/1.0 without Host: no name, so nothing to rebind)
            return True
        name = host_name(host)
        if name in self.server.allowed_hosts or self.arrived_at(name):
            return True
        self.send_error(421, f"This server does not answer for the host {host[:100]!r}. If that "
                             f"name leads to it, start the server with --allowed-host "
                             f"{name[:100]}")
        return False

    def arrived_at(self, name):
        """True if `name` is the IP address this connection arrived at, or, for a connection
        that came over loopback, localhost or any loopback address."""
        if self.local_address is None:  # asked once per connection, and only if needed
            self.local_address = local_address(self.connection)
        if name == "localhost":
            return self.local_address.is_loopback
        try:
            address = ipaddress.ip_address(name.strip("[]"))
        except ValueError:
            return False  # a name, not an address
        return address == self.local_address or (address.is_loopback
                                                 and self.local_address.is_loopback)

    # --- Other web sites posting in the visitor's name (CSRF) -------------------------------------
    # Threat: a page on another site makes its visitor's browser post to the room, cookie and all.
    # Defence: a post from another site (by Origin, or Sec-Fetch-Site) is refused with 403. (Posts
    # must also be JSON, which a plain form cannot send, and the cookie is SameSite=Strict.)
    # Proved by: test_cross_site_posts_are_refused, test_own_page_behind_an_https_proxy_may_post

    def post_message(self, query):
        self.check_origin()
        super().post_message(query)

    def post_name(self, query):
        self.check_origin()
        super().post_name(query)

    def check_origin(self):
        """Refuse a POST that another web site's page sends with the visitor's browser (CSRF).

        Browsers say where a request comes from in Origin (and Sec-Fetch-Site). Only the host is
        compared, not the scheme, so that the room still works behind an HTTPS proxy.
        """
        origin = self.headers.get("origin")
        from_elsewhere = (origin is not None
                          and origin.partition("://")[2] != self.headers.get("host", ""))
        if from_elsewhere or self.headers.get("sec-fetch-site", "same-origin") not in (
                "same-origin", "none"):
            raise RequestError(403, "Posting is allowed only from this chat room's own page.")

    # --- Slow and stalled clients -----------------------------------------------------------------
    # Threat: a client that sends its request a byte at a time ("slowloris"), or stops halfway, or
    # reads its responses a trickle at a time, or never: each holds a thread, and the kernel's
    # memory, for as long as it likes.
    # Defence: every read and write waits at most --request-timeout (set_time_outs); a whole
    # request must arrive within it too (RequestReader), and the head of a connection's first
    # request within FIRST_REQUEST_TIMEOUT; a response must be read at MIN_READ_RATE
    # (write_within); and the kernel holds at most MAX_UNSENT bytes of responses for a connection
    # (limit_unsent), so pipelined requests are answered only as fast as the client reads.
    # Proved by: test_stalled_clients_are_dropped_and_hold_up_no_one,
    # test_a_new_connection_must_send_its_first_request_at_once,
    # test_a_client_sending_a_byte_at_a_time_is_dropped,
    # test_a_client_that_never_reads_its_answers_is_dropped,
    # test_a_client_that_reads_a_trickle_is_dropped,
    # test_a_client_that_pipelines_and_never_reads_ties_up_little_memory

    def setup(self):
        super().setup()
        self.local_address = None  # the IP address the connection arrived at, once needed
        # Until the first request's head has arrived, the shorter time-out (first_request_arrived
        # sets the longer one: two more system calls per connection, not per request).
        first_timeout = min(FIRST_REQUEST_TIMEOUT, self.server.request_timeout)
        self.waiting_for_first_request = True
        set_time_outs(self.connection, first_timeout)
        limit_unsent(self.connection)
        self.rfile.close()  # read through RequestReader instead, for its deadline
        self.request_reader = RequestReader(self.connection, first_timeout)
        self.rfile = io.BufferedReader(self.request_reader, REQUEST_BUFFER)
        self.server.room.presence.watch(self.connection)  # (see WatchfulPresenceMixin)

    def first_request_arrived(self):
        """The head of the connection's first request is here: from now on, --request-timeout.
        (Its body, if any, has that long from now.) The server may no longer let go of this
        connection to make room for a newcomer (see let_go_of_oldest_waiting)."""
        self.waiting_for_first_request = False
        self.server.first_request_arrived(self.connection)
        set_time_outs(self.connection, self.server.request_timeout)
        self.request_reader.seconds = self.server.request_timeout
        self.request_reader.start_deadline()

    def handle_one_request(self):
        self.request_reader.start_deadline()  # the next request must have arrived in time
        super().handle_one_request()

    def write_whole(self, data):
        write_within(self.connection, data, self.server.request_timeout + len(data) / MIN_READ_RATE)

    def finish(self):
        self.server.room.presence.forget_connection(self.connection)
        super().finish()


def is_host(value):
    """True if `value` is what Host may hold: uri-host, and a port if any."""
    found = HOST.fullmatch(value)
    if found is None:
        return False
    if found.group(1):
        try:
            ipaddress.IPv6Address(found.group(1)[1:-1])
        except ValueError:
            return False
    return True


def host_name(host):
    """The name in a Host, lower-case, without its port or a final dot: "[::1]", "chat.example"."""
    name = host.rsplit("]", 1)[0] + "]" if host.startswith("[") else host.rsplit(":", 1)[0]
    return name.lower().removesuffix(".")


def allowed_hosts(listening_on, names):
    """The names served without a look at the connection (see host_is_served): those of
    --allowed-host, the address we listen on if it is one address, and, listening on loopback,
    localhost and the loopback address (as every connection then arrives over it)."""
    allowed = {host_name(name) for name in names}
    if listening_on in ("", "0.0.0.0", "::"):  # every address of the machine
        return frozenset(allowed)
    try:
        loopback = ipaddress.ip_address(listening_on).is_loopback
        allowed.add(f"[{listening_on}]" if ":" in listening_on else listening_on)
    except ValueError:  # a name (--host localhost)
        loopback = listening_on.lower() == "localhost"
        allowed.add(host_name(listening_on))
    if loopback:
        allowed |= {"localhost", "127.0.0.1", "[::1]"}
    return frozenset(allowed)


def local_address(connection):
    """The IP address a connection arrived at; an IPv4 one as such, even on an IPv6 socket."""
    address = ipaddress.ip_address(connection.getsockname()[0].partition("%")[0])
    return getattr(address, "ipv4_mapped", None) or address


class RequestReader(io.RawIOBase):
    """The socket as http.server reads it, with one deadline for the whole request.

    The socket's time-out (set_time_outs) limits each wait for data, so on its own it lets a
    client that sends one byte every few seconds hold a thread for ever (the "slowloris" attack).
    So each request also has a deadline, restarted by handle_one_request(), and once it has
    passed, the next read is refused: such a client is dropped at most one socket time-out after
    its deadline (with the default 10 s, 20 s after its request began).

    Each read could instead wait only for the time left (socket.settimeout() before every
    read): exact, but each settimeout() is one more system call, and system calls are what cost
    most when a crowd arrives (see set_time_outs, next).
    """

    def __init__(self, connection, seconds):
        self.connection = connection
        self.seconds = seconds
        self.start_deadline()

    def readable(self):
        return True

    def start_deadline(self):
        self.deadline = time.monotonic() + self.seconds

    def readinto(self, buffer):
        if time.monotonic() > self.deadline:
            raise TimeoutError("the request did not arrive in time")
        try:
            return self.connection.recv_into(buffer)
        except BlockingIOError:  # a read that the kernel timed out (see set_time_outs)
            raise TimeoutError("the client sent nothing for too long") from None


def set_time_outs(connection, seconds):
    """Make each read and each write on the socket give up after `seconds` of waiting.

    socket.settimeout() would do it, but then Python makes a poll() system call (wait until the
    socket is ready, or the time is up) before every recv() and send(): two system calls instead
    of one. A thread releases the GIL for each system call, and when hundreds of threads wait
    for the GIL, each release wakes one of them: when a crowd arrives, more of the server's time
    goes to threads sleeping and waking for the GIL than to our Python code (docs/performance.md).

    So the kernel times out each call itself (the SO_RCVTIMEO and SO_SNDTIMEO options, given as
    a C struct timeval: seconds and microseconds), on a socket left blocking, as accept() made
    it. A call that timed out fails with EAGAIN, as on a non-blocking socket, and Python raises
    BlockingIOError: RequestReader turns it into TimeoutError, and write_within waits on until
    its own deadline. One difference: settimeout() limits a whole sendall(), the kernel each
    send() in it, so a client that reads a little every few seconds can stretch a response out.
    Windows wants milliseconds instead of a timeval: there we keep settimeout().
    """
    if sys.platform == "win32":
        connection.settimeout(seconds)
        return
    whole_seconds = int(seconds)
    # Rounded up: a timeval of zero would mean "wait for ever".
    microseconds = math.ceil((seconds - whole_seconds) * 1_000_000)
    timeval = struct.pack("@ll", whole_seconds, microseconds)
    connection.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, timeval)
    connection.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, timeval)


def limit_unsent(connection):
    """Let the kernel hold at most MAX_UNSENT bytes of our responses unsent on this connection.

    With TCP_NOTSENT_LOWAT, a write waits (and a socket counts as writable) only once the
    responses queued before it have mostly gone out. So a client that pipelines requests and
    reads slowly has them answered one at a time, as fast as it reads, and not into a buffer of
    megabytes. Where the option is missing (not Linux), the kernel's own limits apply.
    """
    if hasattr(socket, "TCP_NOTSENT_LOWAT"):
        connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NOTSENT_LOWAT, MAX_UNSENT)


def write_within(connection, data, seconds):
    """Write all of `data`, or raise ConnectionAbortedError once `seconds` have passed.

    sendall() would do it, but each send() in it may wait a socket time-out anew: a client that
    reads a little every few seconds could stretch one response out for ever. The first send()
    usually takes everything; if not, wait until the socket has room (poll(), with the time
    left), send what fits without waiting, and so on until all is written or the time is up.
    """
    deadline = time.monotonic() + seconds
    try:
        rest = memoryview(data)[connection.send(data):]  # waits at most one socket time-out
    except BlockingIOError:  # not a byte fitted within it (see set_time_outs): wait on, below
        rest = memoryview(data)
    if rest and not ANSWERS_WITHOUT_WAITING:  # Windows: settimeout() bounds a whole sendall()
        connection.sendall(rest)
        return
    if rest:
        room_to_write = select.poll()
        room_to_write.register(connection, select.POLLOUT)
    while rest:
        left = deadline - time.monotonic()
        if left <= 0 or not room_to_write.poll(left * 1000):
            # Not TimeoutError, which http.server would log as a request that timed out.
            raise ConnectionAbortedError("the client did not read its response in time")
        rest = send_now(connection, rest)


# --- Script injection and framing ---------------------------------------------------------------
# Threat: markup in a message or a name that runs as script in other people's pages; another site
# showing the room in a frame; the browser guessing a type, or telling other sites our address.
# Defence: the page puts user text in only as text (index.html); and every response carries a
# Content-Security-Policy that allows only the page's own inline script and style, by hash, and no
# framing, with nosniff and no-referrer (DefendedServerMixin: common_headers).
# Proved by: test_every_answer_carries_the_security_headers, test_markup_comes_back_verbatim,
# test_markup_in_messages_and_names_is_shown_as_text

def security_headers(page):
    """The headers every response carries, with the hashes of the page's inline script and
    style, as (name, value) pairs."""
    def hashes(tag):
        found = re.findall(rf"<{tag}>(.*?)</{tag}>".encode(), page, re.DOTALL)
        digests = [hashlib.sha256(block).digest() for block in found]
        return " ".join(f"'sha256-{base64.b64encode(digest).decode()}'" for digest in digests) \
            or "'none'"

    policy = CONTENT_SECURITY_POLICY.format(script=hashes("script"), style=hashes("style"))
    return [("Content-Security-Policy", policy), ("X-Content-Type-Options", "nosniff"),
            ("Referrer-Policy", "no-referrer")]


# ==================================================================================================
# 15. Who is online, when clients vanish or invent people
# ==================================================================================================
# --- A page that goes away without a word -------------------------------------------------------
# Threat: a parked thread does not read its socket, so it cannot notice that its page was closed
# (a tab shut, a laptop put to sleep): its person stays listed online until the poll times out, and
# one person's script can park polls without end.
# Defence: every open connection's socket is registered with a selector, which says at each look
# at the online list which sockets have something to read: a parked poll's socket that is readable
# with nothing to read is one whose page has gone, and it stops counting at once. And a person
# holds at most MAX_PARKED_PER_USER parked polls: a newer one lets their oldest go.
# Proved by: test_closed_connection_of_a_parked_poll_stops_counting,
# test_too_many_parked_polls_release_the_oldest,
# test_releasing_the_oldest_poll_wakes_only_its_thread
#
# --- Many people from one script -----------------------------------------------------------------
# Threat: every new identity is a person to list and to remember, and a script can be many
# (each given a cookie, as fast as section 16 lets one address be given them).
# Defence: the online list holds at most MAX_ONLINE people (newcomers past it are served but not
# listed), the users kept in memory at most MAX_CACHED_USERS, and the rate limiter forgets
# posters whose posts are all older than its longest window.
# Proved by: test_many_identities_fill_the_online_list_only_up_to_its_cap,
# test_a_cookieless_flood_leaves_no_trace

class WatchfulPresenceMixin:
    """Presence, noticing closed pages at once, and with caps on polls and people."""

    def __init__(self, window):
        super().__init__(window)
        self._parked_on = {}  # socket -> the poll parked on it (guarded by _lock)
        # The selector has a lock of its own, because poll_began() and poll_ended() run for every
        # poll and must make no system call while they hold _lock: a system call lets go of the
        # GIL, and every other poll would queue on _lock until this thread got the GIL back.
        self._selector_lock = threading.Lock()
        # poll(), not the default epoll: epoll makes a system call for each socket registered,
        # inside _selector_lock; poll() only notes the socket, and calls the system once a look.
        # (Windows has no poll(): there the default is select(), which only notes too.)
        self._selector = getattr(selectors, "PollSelector", selectors.DefaultSelector)()

    def _seen_now(self, user):
        if user.id in self._last_seen or len(self._last_seen) < MAX_ONLINE:
            super()._seen_now(user)

    def is_online(self, user_id):
        with self._lock:
            return user_id in self._last_seen

    def poll_began(self, poll):
        """Count a poll; return the user's oldest poll if they now have too many."""
        super().poll_began(poll)
        with self._lock:
            self._parked_on[poll.connection] = poll
            polls = self._polling.get(poll.user.id, [])
            if len(polls) > MAX_PARKED_PER_USER:
                oldest = polls[0]
                self._stop_counting(oldest)
                return oldest
        return None

    def _stop_counting(self, poll):
        self._parked_on.pop(poll.connection, None)
        return super()._stop_counting(poll)

    def online_list(self):
        self._forget_closed_connections()
        return super().online_list()

    def watch(self, connection):
        """A connection opened: watch its socket until forget_connection()."""
        with self._selector_lock:
            try:
                self._selector.register(connection, selectors.EVENT_READ)
            except (OSError, ValueError):
                pass  # not watched: its polls are still answered by their time-out

    def forget_connection(self, connection):
        """A connection is closing (or has closed): stop watching its socket."""
        with self._selector_lock:
            try:
                self._selector.unregister(connection)
            except (KeyError, ValueError):
                pass  # already gone

    def _forget_closed_connections(self):
        closed = []
        # Both locks, so that a poll parked when select() ran is still parked when we peek: its
        # socket is then readable only because the page closed it (or sent another request),
        # and the peek returns at once. An unparked poll's thread might have read the socket
        # empty in between, and the peek would wait for the socket's time-out.
        # The one place that makes system calls under _lock: once a second, and each of them
        # returns at once (select() with no time-out; a peek at a socket that has data or its end).
        with self._selector_lock, self._lock:
            try:
                ready = self._selector.select(timeout=0)
            except (OSError, ValueError):
                return  # e.g. too many sockets for select() on Windows: rely on time-outs alone
            for key, _ in ready:
                poll = self._parked_on.get(key.fileobj)
                if poll is None or not peer_has_closed(key.fileobj):
                    continue  # no poll parked on it (its own thread reads it), or a request
                closed.append(key.fileobj)
                self._stop_counting(poll)
        for connection in closed:
            self.forget_connection(connection)


def peer_has_closed(connection):
    """True if the other end closed a socket that select() reported readable.

    Readable means there is data or the end of the stream, so this peek returns at once: an
    empty peek is the end. (A reset connection raises instead, and is closed too.)
    """
    try:
        return connection.recv(1, socket.MSG_PEEK) == b""
    except OSError:
        return True


class BoundedSessionsMixin:
    """Sessions, keeping at most MAX_CACHED_USERS users in memory."""

    def __init__(self, storage, presence):
        super().__init__(storage)
        self.presence = presence

    def user_for(self, sid):
        if sid not in self._users and len(self._users) >= MAX_CACHED_USERS:
            with self._lock:  # forget those not online; they are read back when they return
                self._users = {sid: user for sid, user in self._users.items()
                               if self.presence.is_online(user.id)}
        return super().user_for(sid)


class BoundedRateLimiterMixin:
    """RateLimiter, forgetting now and then the posters whose posts are all old."""

    def __init__(self, limits):
        super().__init__(limits)
        self._attempts = 0

    def limit_hit(self, user_id):
        now = time.monotonic()
        with self._lock:
            self._attempts += 1
            if self._attempts % FORGET_POSTS_EVERY == 0:
                self._times = {user_id: times for user_id, times in self._times.items()
                               if times and now - times[-1] < self.longest}
        return super().limit_hit(user_id)


# ==================================================================================================
# 16. Identities that are issued, and limits on one address and on renames
# ==================================================================================================

# --- Made-up identities -------------------------------------------------------------------------
# Threat: any well-formed cookie was an identity, so a script could be a new person on every
# request: past the rate limit, which counts per person, and into the online list, until real
# people were no longer listed; and each made-up poster cost memory in the rate limiter.
# Defence: identities are issued, not claimed. A session id is a random part signed with a key
# kept in the data file (SessionIds), and a cookie we did not sign counts as no cookie at all
# (IssuedSessionsMixin.session_user). An address is given new cookies only so fast (NewSessions): a
# client past that is still served, as a guest without a cookie. Cookies of an older data file,
# unsigned, are no longer anyone's: their owners are given new ones, and a new name.
# Proved by: test_a_made_up_cookie_is_no_identity, test_made_up_cookies_leave_no_trace,
# test_an_address_is_given_new_cookies_only_so_fast,
# test_the_signing_key_outlives_a_restart_and_older_files_get_one

class IssuedSessionsMixin:
    """ChatHandler, counting a session id only if this server signed it, and issuing new ones to
    an address only as fast as NewSessions allows."""

    def session_user(self):
        """The User of the first cookie named sid that we issued, or None: the first valid one,
        not just the first (see "Cookies tossed in", below)."""
        for sid in cookie_values(self.headers.get("cookie", ""), SESSION_COOKIE):
            if self.server.session_ids.issued(sid):
                return self.server.sessions.user_for(sid)
        return None

    def issue_session_id(self):
        if self.server.new_sessions.take(network_of(self.client_address[0])):
            self.new_sid = self.server.session_ids.new()
            return self.new_sid
        # Past the allowance: served, but as a guest of this one response, with no cookie.
        self.new_sid = None
        return new_session_id()


class SessionIds:
    """Session ids this server issued: a random part and its HMAC tag, made with a secret key.

    Only the key's holder can make a tag that matches, so a made-up id is seen at once, without
    looking anything up; and with the key in the data file, ids stay valid across restarts.
    """

    def __init__(self, key):
        self.key = key

    def new(self):
        random_part = secrets.token_bytes(SESSION_RANDOM_BYTES)
        return base64.urlsafe_b64encode(random_part + self._tag(random_part)).decode("ascii")

    def issued(self, sid):
        if not SESSION_ID_PATTERN.fullmatch(sid):
            return False
        raw = base64.urlsafe_b64decode(sid)
        random_part, tag = raw[:SESSION_RANDOM_BYTES], raw[SESSION_RANDOM_BYTES:]
        # compare_digest takes as long wherever the first difference is: the time a response
        # takes tells nothing of how much of a forged tag was right.
        return hmac.compare_digest(tag, self._tag(random_part))

    def _tag(self, random_part):
        return hmac.digest(self.key, random_part, "sha256")[:SESSION_TAG_BYTES]


class KeyedStorageMixin:
    """Storage, also keeping the key that signs session ids."""

    def session_key(self):
        """The key, made and saved the first time. A table of its own, created if missing, so
        that a data file made before it still opens (its schema version stays the same)."""
        self._write([
            ("CREATE TABLE IF NOT EXISTS session_key (key BLOB NOT NULL)", ()),
            ("INSERT INTO session_key SELECT ? WHERE NOT EXISTS (SELECT * FROM session_key)",
             (secrets.token_bytes(SESSION_KEY_BYTES),)),
        ])
        return self._read_one("SELECT key FROM session_key")[0]


class NewSessions:
    """How many new cookies each address may still be given: a bucket that holds `burst` and
    refills at `per_second`. A class arriving together takes from the bucket; a script asking
    for thousands finds it empty. At most MAX_TRACKED addresses are remembered: an address
    forgotten (the one that asked longest ago) starts again with a full bucket."""

    def __init__(self, burst, per_second):
        self.burst = burst
        self.per_second = per_second
        self._buckets = {}  # address -> (cookies left, time.monotonic() then), least recent first
        self._lock = threading.Lock()

    def take(self, address):
        """True, and one fewer left, if `address` may be given a new cookie now."""
        now = time.monotonic()
        with self._lock:
            left, then = self._buckets.pop(address, (self.burst, now))
            left = min(self.burst, left + (now - then) * self.per_second)
            allowed = left >= 1
            self._buckets[address] = (left - allowed, now)  # (last: the most recent)
            if len(self._buckets) > MAX_TRACKED:
                del self._buckets[next(iter(self._buckets))]
            return allowed


def network_of(address):
    """What one household or office has of a client's IP address: all of an IPv4 address, the
    first 64 bits of an IPv6 one (each home is given a /64: billions of addresses to change to)."""
    if ":" not in address:
        return address
    try:
        ip = ipaddress.IPv6Address(address.split("%")[0])
    except ValueError:
        return address
    if ip.ipv4_mapped:  # an IPv4 client of a server listening on "::"
        return str(ip.ipv4_mapped)
    return str(ipaddress.IPv6Network((ip, 64), strict=False))


# --- Cookies tossed in ----------------------------------------------------------------------------
# Threat: a page of another site (a neighbouring subdomain, say) sets a cookie named sid, which the
# browser sends before ours, in the same Cookie line or in a line of its own; were the first sid to
# count, or the lines joined with a comma (which fuses two cookies into one bad value), the person
# would be locked out of their identity.
# Defence: Cookie lines are joined with "; " (COOKIE_SEPARATOR, in read_headers), and the first
# sid that we issued counts (IssuedSessionsMixin.session_user).
# Proved by: test_a_tossed_in_cookie_locks_no_one_out

def cookie_values(header, name):
    """Every value of the cookie `name` in a Cookie header, in order."""
    for part in header.split(";"):
        key, _, value = part.strip().partition("=")
        if key == name:
            yield value


# --- A flood of posts from one address ------------------------------------------------------------
# Threat: a script with many identities (each issued, at the rate NewSessions allows) posts under
# each in turn, each within its own limit, and floods the room all the same.
# Defence: the posts from one address count against the rate limits (--rate-limits) of
# --people-per-address people together: 30 people at one address, each posting as fast as their
# own limit allows, are never refused; a script is held to that.
# Proved by: test_one_address_posts_as_fast_as_its_people_and_no_faster

class PostsPerAddressMixin:
    """ChatHandler, counting a post that its person's limits allow against its address's limits
    too (server.posts_from): once it is read and checked, as the person's own count is."""

    def count_post(self, user):
        super().count_post(user)
        hit = self.server.posts_from.limit_hit(network_of(self.client_address[0]))
        if hit:
            super().uncount_post(user)  # refused, so it does not count as the person's either
            raise too_fast(hit, "Too many messages are coming from your network address: "
                                "at most {count} in {seconds} seconds. You can post again in "
                                "{wait} s.")

    def uncount_post(self, user):
        super().uncount_post(user)
        self.server.posts_from.refund(network_of(self.client_address[0]))


def too_fast(hit, text):
    """The 429 refusal for a limit hit (see RateLimiter.limit_hit): `text` with {count},
    {seconds} and {wait} filled in; the wait in Retry-After and in the JSON, as for posts."""
    wait, (count, seconds) = hit
    return RequestError(429, text.format(count=count, seconds=seconds, wait=math.ceil(wait)),
                        headers=[("Retry-After", str(max(1, math.ceil(wait))))],
                        retry_after=round(wait, 3), limit={"count": count, "seconds": seconds})


# --- The rate limits' memory ---------------------------------------------------------------------
# Threat: the rate limiter remembers everyone who posted in the last 600 s, about 1 KB each: with
# made-up identities, 140,000 posts grew the server from 28 to 181 MB.
# Defence: made-up identities no longer post at all; and each limit (per person, per address,
# on renames) remembers at most MAX_TRACKED keys, forgetting the longest remembered first.
# Proved by: test_made_up_cookies_leave_no_trace, test_a_rate_limit_remembers_a_bounded_number

class CappedRateLimiterMixin:
    """RateLimiter, remembering at most MAX_TRACKED people (or addresses).

    BoundedRateLimiterMixin forgets those whose posts are all old every FORGET_POSTS_EVERY; but
    within its longest window (600 s) it remembers everyone who posted, about 1 KB each. Past
    MAX_TRACKED, the least recently added are forgotten, a tenth at a time (so that forgetting,
    which looks at every one, is not done on every post). Someone forgotten may post again
    sooner than their own limit allows; their address's limit still holds.
    """

    def limit_hit(self, key):
        with self._lock:
            if key not in self._times and len(self._times) >= MAX_TRACKED:
                now = time.monotonic()
                self._times = {key: times for key, times in self._times.items()
                               if times and now - times[-1] < self.longest}
                excess = len(self._times) - MAX_TRACKED * 9 // 10
                for old in list(itertools.islice(self._times, max(0, excess))):
                    del self._times[old]
        return super().limit_hit(key)


# --- Rename storms --------------------------------------------------------------------------------
# Threat: renames were unlimited, and each sent the whole online list (70 KB with 1,000 people
# online) to every parked page at once: two scripted connections made hundreds a second, and the
# room's responses to everyone slowed tenfold.
# Defence: a person may rename only so often (RENAME_LIMITS, 429 as for posts; a name that does
# not change, which changes nothing, is not counted); and a rename's notice goes out at once, but
# without the online list: the presence thread, which already announces arrivals at most once a
# second, announces the list with the new names.
# Proved by: test_renames_are_limited, test_an_unchanged_name_changes_nothing,
# test_a_rename_storm_reaches_parked_pages_at_most_once_a_second

class RenameLimitMixin:
    """ChatHandler, counting each rename against its person's RENAME_LIMITS (server.renames)."""

    def post_name(self, query):
        user = self.session_user()
        if user is None:
            return super().post_name(query)  # refused there, with a cookie to retry with
        name = user.name
        with counted(self.server.renames, user.id,
                     "You are changing your name too often: at most {count} changes in "
                     "{seconds} seconds. You can change it again in {wait} s.") as refund:
            super().post_name(query)
            if user.name == name:
                refund()  # it did not change: it is not counted


@contextlib.contextmanager
def counted(limiter, key, text):
    """Count an action against `limiter`'s limits for `key`, or refuse it: too_fast(hit, text).

    The body of the `with` is the action: if it is refused after all (a RequestError, or a
    StorageError: it did not happen), it is not counted. Yields a function that takes the count
    back.
    """
    hit = limiter.limit_hit(key)
    if hit:
        raise too_fast(hit, text)
    try:
        yield lambda: limiter.refund(key)
    except (RequestError, StorageError):
        limiter.refund(key)
        raise


class RenamesAnnouncedWithArrivalsMixin:
    """Room, leaving the online list after a rename to the presence thread."""

    def publish(self, version, message=None, online=None):
        """As Part II's, but a rename's notice goes out at once without the online list: the
        presence thread publishes the list with the new name (refresh_presence), with any
        arrivals, however many renames come meanwhile."""
        if message is not None and message.get("kind") == "rename":
            online = None
            self.presence.names_changed()
        super().publish(version, message, online)


class RenamesPresenceMixin:
    """Presence, taking a rename as it takes an arrival (QuickPresenceMixin, section 11): a
    change to announce once they pause, and at most once a second."""

    def names_changed(self):
        with self._lock:
            self._online = None  # online_list() must make the list again, with the new names
            now = time.monotonic()
            self._last_arrival = now
            if self._first_arrival is None:
                self._first_arrival = now
                self._arrivals.notify()  # the presence thread: wait_until_time_to_look


# ==================================================================================================
# 17. The defended server
# ==================================================================================================

class DefendedServerMixin:
    """ChatServer, for the open network: caps on connections, and headers on every response."""

    def __init__(self, address, handler, room, sessions, limiter, page, chime, settings):
        super().__init__(address, handler, room, sessions, limiter, page, chime, settings)
        self.common_headers = security_headers(page)
        self.allowed_hosts = allowed_hosts(address[0], settings.allowed_host)
        self.request_timeout = settings.request_timeout
        self.max_clients = settings.max_clients
        self.max_clients_per_address = settings.max_clients_per_address
        # Identities, and the limits on one address and on renames (section 16). An address's
        # limits are those of --people-per-address people together; they are kept by limiters
        # of the room's own kind (type(limiter)), and so bounded as it is.
        people = settings.people_per_address
        self.session_ids = SessionIds(room.storage.session_key())
        self.new_sessions = NewSessions(burst=NEW_SESSIONS_PER_PERSON * people,
                                        per_second=people / NEW_SESSION_EVERY)
        self.posts_from = type(limiter)([(count * people, seconds)
                                         for count, seconds in limiter.limits])
        self.renames = type(limiter)(RENAME_LIMITS)
        self.open_connections = 0
        self.connections_from = collections.Counter()  # client IP address -> its open connections
        # The open connections whose first request's head has not arrived yet, oldest first
        # (connection -> its address): those we may let go of to make room for a newcomer.
        self._waiting = collections.OrderedDict()
        self._lingering = []  # (refused connection, time.monotonic() by which to close it)
        self._next_sweep = 0.0  # time.monotonic() of the next look at the lingering connections
        self._busy = threading.Lock()  # guards the counts of connections and _waiting above

    # --- Too many connections, or one client taking every place ---------------------------------
    # Threat: a flood of connections, each holding a thread, until the machine runs out; or one
    # client keeping every place taken, so that no one else gets in.
    # Defence: past --max-clients open connections (none of them still waiting for its first
    # request: see the next block), or --max-clients-per-address from one address, a newcomer
    # gets a quick 503 with Retry-After from the accepting thread, without a thread of its own;
    # its connection lingers a moment so that it can read the response.
    # Proved by: test_full_server_answers_newcomers_503_and_keeps_its_clients,
    # test_one_address_cannot_take_every_place

    def process_request(self, request, client_address):
        """Start a thread for the connection, unless too many are open already, in all or from
        its address (so that one client cannot take every place: --max-clients-per-address).
        If all places are taken, the oldest connection still waiting for its first request
        makes room for this one (see "Slow connections from many addresses", below)."""
        address = client_address[0]
        with self._busy:
            admitted = (self.connections_from[address] < self.max_clients_per_address
                        and (self.open_connections < self.max_clients
                             or self.let_go_of_oldest_waiting()))
            if admitted:
                self.open_connections += 1
                self.connections_from[address] += 1
                self._waiting[request] = address
        if not admitted:
            self.refuse(request)
            return
        try:
            super().process_request(request, client_address)
        except RuntimeError:  # the system would not start another thread
            with self._busy:
                self._waiting.pop(request, None)
            self._connection_closed(address)
            self.refuse(request)

    def refuse(self, request):
        """Answer 503 from the accepting thread, without starting a thread for the connection.

        Closing a socket that has unread data makes the system reset the connection, and a
        client still sending its request would get that error instead of our response. So the
        connection stays open a moment (see service_actions) while we discard what arrives.
        """
        send_refusal(request, self.common_headers)
        if len(self._lingering) >= MAX_LINGERING:
            self.shutdown_request(request)
            return
        try:
            request.shutdown(socket.SHUT_WR)  # the client reads our response, then the end
        except OSError:
            pass
        self._lingering.append((request, time.monotonic() + REFUSAL_LINGER))

    def service_actions(self):
        """serve_forever() calls this after each accept and twice a second: close the refused
        connections whose client has gone, or has had REFUSAL_LINGER seconds to read our 503
        (at most every LINGER_SWEEP_INTERVAL, so that a flood keeps the accepting thread cheap)."""
        now = time.monotonic()
        if now < self._next_sweep:
            return
        self._next_sweep = now + LINGER_SWEEP_INTERVAL
        lingering = []
        for connection, deadline in self._lingering:
            if now < deadline and discard_input(connection):
                lingering.append((connection, deadline))
            else:
                connection.close()
        self._lingering = lingering

    def process_request_thread(self, request, client_address):
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._connection_closed(client_address[0])

    # --- Slow connections from many addresses ---------------------------------------------------
    # Threat: thousands of connections that send a request slowly or not at all ("slowloris"),
    # from a few addresses each within --max-clients-per-address, take every place: newcomers
    # get 503 for as long as the attack lasts, however well the caps per address hold.
    # Defence: once all places are taken, a newcomer is let in by closing the connection that has
    # waited longest for its first request (which a browser sends at once), rather than being
    # refused; and that wait is short (FIRST_REQUEST_TIMEOUT). A connection that has sent a
    # request, such as a page's parked poll, is never let go of. The refusal path stays cheap
    # (no thread, and the refused connections looked at only every LINGER_SWEEP_INTERVAL).
    # Proved by: test_slow_connections_from_many_addresses_leave_room_for_newcomers

    def let_go_of_oldest_waiting(self):
        """Close the oldest connection still waiting for its first request, to make room for a
        newcomer; True if one was. Called with _busy held.

        Its thread is blocked reading; shutdown() wakes it with the end of the connection, and
        it ends as for a client that hung up (closing the socket here, under a thread that may
        still use it, could close another connection given the same number meanwhile). Its
        place is counted until the thread ends: at most MAX_CLOSING such places at once.
        """
        if not self._waiting or self.open_connections >= self.max_clients + MAX_CLOSING:
            return False
        connection, _ = self._waiting.popitem(last=False)
        try:
            connection.shutdown(socket.SHUT_RDWR)
        except OSError:  # the client has gone already
            pass
        return True

    def first_request_arrived(self, connection):
        """The handler says: this connection has sent a request, so it stays."""
        with self._busy:
            self._waiting.pop(connection, None)

    def shutdown_request(self, request):
        # Out of _waiting before it is closed: let_go_of_oldest_waiting must never shut down a
        # closed socket (its number may be another connection's by then).
        with self._busy:
            self._waiting.pop(request, None)
        super().shutdown_request(request)

    def _connection_closed(self, address):
        with self._busy:
            self.open_connections -= 1
            self.connections_from[address] -= 1
            if not self.connections_from[address]:
                del self.connections_from[address]  # so that the counter holds only who is here


def send_refusal(request, common_headers):
    """Tell a client we are full. Leaves the socket non-blocking, for discard_input()."""
    body = encode_json({"error": "The chat room is full right now. Please try again soon."})
    response = http_response(503, [
        ("Content-Type", "application/json"), ("Content-Length", str(len(body))),
        *common_headers, ("Cache-Control", "no-store"),
        ("Retry-After", str(BUSY_RETRY_AFTER)), ("Connection", "close")], body)
    try:
        request.setblocking(False)
        request.send(response)  # a few hundred bytes: a new socket's buffer always has room
    except OSError:
        pass


def discard_input(connection):
    """Read and drop what a non-blocking socket has received. False once the client has closed."""
    try:
        for _ in range(16):  # at most 1 MiB per call, so a fast sender cannot keep us here
            if not connection.recv(65536):
                return False
        return True
    except BlockingIOError:
        return True
    except OSError:
        return False



# ##################################################################################################
# THE ROOM, COMPOSED
# ##################################################################################################
# Part I alone is the plain room (--plain). The full server is Part I's classes with Part II's
# speed and Part III's defences mixed in, the way socketserver makes ThreadingTCPServer of
# ThreadingMixIn and TCPServer. The defences come first, so that they see each request before the
# rest; then the speed; then Part I, which does the work.

class FullRoom(RenamesAnnouncedWithArrivalsMixin, BroadcastRoomMixin, Room):
    pass


class FullPresence(RenamesPresenceMixin, WatchfulPresenceMixin, QuickPresenceMixin, Presence):
    pass


class FullSessions(BoundedSessionsMixin, Sessions):
    pass


class FullRateLimiter(CappedRateLimiterMixin, BoundedRateLimiterMixin, RateLimiter):
    pass


class FullStorage(KeyedStorageMixin, Storage):
    pass


class FullHandler(DefendedHandlerMixin, IssuedSessionsMixin, PostsPerAddressMixin,
                  RenameLimitMixin, FastHandlerMixin, ChatHandler):
    pass


class FullServer(DefendedServerMixin, FastServerMixin, ChatServer):
    pass


def full_room(args, storage, page, chime):
    """The full server and its room, made of the composed classes (plain_room: Part I's)."""
    presence = FullPresence(args.online_window)
    room = FullRoom(storage, presence, args.log_polls)
    return FullServer((args.host, args.port), FullHandler, room, FullSessions(storage, presence),
                      FullRateLimiter(args.rate_limits), page, chime, args)


def parse_arguments(argv):
    parser = argparse.ArgumentParser(description="A chat room over HTTP long-polling.")
    parser.add_argument("--host", default=DEFAULT_HOST,
                        help="address to listen on (default %(default)s; 0.0.0.0 for everyone)")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT,
                        help="port to listen on (default %(default)s; 0 picks a free one)")
    parser.add_argument("--data", default="chatroom.db",
                        help="SQLite file for messages and names (default %(default)s)")
    parser.add_argument("--poll-timeout", type=float, default=DEFAULT_POLL_TIMEOUT,
                        metavar="SECONDS", help="how long a poll waits for news (default "
                                                "%(default)s, at most 60)")
    parser.add_argument("--online-window", type=float, default=DEFAULT_ONLINE_WINDOW,
                        metavar="SECONDS", help="how long after their last poll someone counts "
                                                "as online (default %(default)s)")
    parser.add_argument("--rate-limits", type=rate_limits, metavar="COUNT/SECONDS,...",
                        default=RATE_LIMITS,
                        help="how often one person may post: at most COUNT messages in any "
                             "SECONDS, for each pair (default %s)" % ",".join(
                                 f"{count}/{seconds}" for count, seconds in RATE_LIMITS))
    parser.add_argument("--log-polls", action="store_true",
                        help="print a line when a poll parks, when a change answers the waiting "
                             "polls, and when a poll times out: watch long-polling at work")
    parser.add_argument("--plain", action="store_true",
                        help="run Part I of chatroom.py alone: the same room, without the speed "
                             "layer and the defences (on a loopback address only)")
    parser.add_argument("--max-clients", type=int, default=DEFAULT_MAX_CLIENTS, metavar="N",
                        help="open connections before new ones are refused (default %(default)s)")
    parser.add_argument("--max-clients-per-address", type=int,
                        default=DEFAULT_MAX_CLIENTS_PER_ADDRESS, metavar="N",
                        help="open connections from one IP address before its new ones are "
                             "refused (default %(default)s)")
    parser.add_argument("--request-timeout", type=float, default=DEFAULT_REQUEST_TIMEOUT,
                        metavar="SECONDS", help="how long a client may take to send a request, "
                                                "or stay idle between two (default %(default)s)")
    parser.add_argument("--allowed-host", action="append", default=[], metavar="NAME",
                        help="a name this server is reached by, besides its IP addresses (and "
                             "localhost, on this machine): with --host 0.0.0.0, a request that "
                             "names any other host is refused. Repeat it for more names")
    parser.add_argument("--people-per-address", type=int, default=DEFAULT_PEOPLE_PER_ADDRESS,
                        metavar="N", help="people who may share one IP address (a class or an "
                                          "office behind one NAT): one address may post, and be "
                                          "given new cookies, as fast as N people together "
                                          "(default %(default)s)")
    args = parser.parse_args(argv)
    for name in args.allowed_host:
        if not is_host(name) or host_name(name) != name.lower().removesuffix("."):
            parser.error(f"--allowed-host {name!r}: give a host name or an address, no port")
    if not 0 <= args.poll_timeout <= MAX_POLL_TIMEOUT:
        parser.error(f"--poll-timeout must be between 0 and {MAX_POLL_TIMEOUT}")
    if (args.online_window <= 0 or args.max_clients < 1 or args.max_clients_per_address < 1
            or args.request_timeout <= 0 or args.people_per_address < 1):
        parser.error("--online-window, --max-clients, --max-clients-per-address, "
                     "--request-timeout and --people-per-address must be positive")
    if args.plain and not is_loopback(args.host):
        parser.error("--plain has none of the defences a room on the network needs: "
                     "it listens on a loopback address only (such as 127.0.0.1)")
    return args


def rate_limits(text):
    """"5/5,30/60" -> [(5, 5), (30, 60)], for --rate-limits."""
    try:
        limits = [tuple(int(number) for number in pair.split("/")) for pair in text.split(",")]
    except ValueError:
        limits = None
    if not limits or any(len(pair) != 2 or min(pair) < 1 for pair in limits):
        raise argparse.ArgumentTypeError(f"{text!r} is not COUNT/SECONDS pairs of positive whole "
                                         "numbers, separated by commas, such as 5/5,30/60")
    return limits


def is_loopback(host):
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def read_beside_this_file(name):
    path = Path(__file__).resolve().parent / name
    try:
        return path.read_bytes()
    except OSError as error:
        sys.exit(f"chatroom: cannot read {path} ({error.strerror}); "
                 "it must be next to chatroom.py.")


def stop_on_sigterm(signum, frame):
    """SIGTERM (from `kill`, or a service manager) stops the server just as Ctrl-C does."""
    raise KeyboardInterrupt


def main(argv=None):
    args = parse_arguments(argv)
    signal.signal(signal.SIGTERM, stop_on_sigterm)
    page = read_beside_this_file("index.html")
    chime = read_beside_this_file("chime.wav")
    try:
        # (The full server's keeps the key that signs cookies too: section 16.)
        storage = (Storage if args.plain else FullStorage)(args.data)
    except StorageError as error:
        sys.exit(f"chatroom: cannot use the data file {args.data!r}: {error}")
    raise_open_file_limit()
    try:
        server = (plain_room if args.plain else full_room)(args, storage, page, chime)
    except OSError as error:
        storage.close()
        sys.exit(f"chatroom: cannot listen on {args.host}:{args.port} ({error.strerror})")
    except StorageError as error:  # (the room reads its version from the file)
        storage.close()
        sys.exit(f"chatroom: cannot use the data file {args.data!r}: {error}")
    run(server, storage, "Chat room (plain)" if args.plain else "Chat room")


if __name__ == "__main__":
    main()
