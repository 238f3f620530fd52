"""A chat room that delivers every message to every open page at once, using HTTP long-polling.

Run it:    python chatroom.py        then open http://127.0.0.1:8000/ in two browser windows
Options:   python chatroom.py --help

Everything lives in this file and Python's standard library: the web server is http.server, each
connection gets its own thread (only one thread runs Python at a time: it must hold CPython's
global interpreter lock, the GIL), and messages are kept in an SQLite file. The page the browser
loads is index.html, next to this file; chime.wav is the sound it plays.

Long-polling in one paragraph
-----------------------------
The room has a *version*: a number that grows by one whenever anything in the room changes (a new
message, a new name, someone arriving or leaving). A page asks `GET /api/poll?since=41`, meaning
"I have seen everything up to version 41: what is new?". If the room is already past 41, the server
answers at once. If not, it does not answer yet: the request is *parked*. The room keeps a list of
the pending polls, and the poll's thread waits on a threading.Condition. When another thread
changes the room (say, to add a message), that thread uses the list to answer every pending poll
itself, writing each answer straight to its socket, and then wakes the parked threads, which go
back to reading their connection's next request. If nothing changes for 25 s, the poll's own
thread answers "nothing new". Either way the page at once asks again with the newest version it
has. So a message reaches every open page within milliseconds, while an idle page costs one
request every 25 seconds: no WebSockets, and no asking every second "anything new?".

    page A                              server                             page B
    GET /api/poll?since=41  ------->    nothing newer: add it to the pending polls, park A's thread
                                                          <-------  POST /api/messages {"text": "hi"}
                                        B's thread saves "hi" as version 42,
                                                          ------->  201 {"message": {"id": 42, ...}}
                                        then writes every pending answer:
            <-------  200 {"version": 42, "messages": [{"id": 42, "text": "hi", ...}]}
                                        and wakes A's thread, which reads A's next request:
    GET /api/poll?since=42  ------->    nothing newer: park again

The path of one message
-----------------------
Page A waits; page B says "hi". Read these functions in this order; all of them are in Part I.

  page A   GET /api/poll?since=41
           ChatHandler.get_poll -> Room.poll -> Room.wait_for_change: the poll joins the room's
           list of pending polls, and A's thread waits on the Condition.
  page B   POST /api/messages {"text": "hi"}
           ChatHandler.post_message -> Room.add_message -> Storage.save_message: on disk first,
           -> Room._publish: the version becomes 42, and the list of pending polls is taken,
           -> ChatHandler.send: B's 201,
           -> Room.write_answers: A's answer goes straight to A's socket (and every other
              waiting page's to theirs); then A's thread is woken (Room._wake_next).
  page A   has "hi". Its thread reads A's next poll, since=42, and parks it again.

How this file is organised
--------------------------
Part I, the chat room: a whole room, in the order a message travels through it.
  1. Settings that shape the room, each with its unit and the reason for its value.
  2. The room: its version, the list of pending polls, and how a change answers them.
  3. Presence: who is online.
  4. Identity: the cookie that says who you are, and the name you chose.
  5. Rate limiting: how often one person may post.
  6. Storage: SQLite. Nothing is announced to anyone before it is safely on disk.
  7. The HTTP handler: the routes, reading requests, writing answers.
  8. The server and main().
Part II, defences for the open network: what a room on the internet needs besides. Each defence
is added by subclassing Part I's handler and server, through the hooks http.server and
socketserver offer for it, and each says what it defends against and which test proves it.
  9. Settings of the defences.
  10. The defended handler: strict requests, slow and stalled clients, other web sites.
  11. The defended server: too many connections, and a crowd that arrives at once.

On a first read, skip Part II: main() runs Part I's room behind it, and the room works the same
without it. In Part I you may also skip how presence notices that a page was closed (the end of
Presence), and the calls to Room.wake_next_if_owed: read each as "before waiting, let the next
woken thread go" (Room._wake_next tells why).
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
import http
import http.server
import io
import ipaddress
import json
import math
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
from pathlib import Path
from urllib.parse import parse_qs


# ##################################################################################################
# PART I. THE CHAT ROOM
# ##################################################################################################

# ==================================================================================================
# 1. Settings that shape the room
# ==================================================================================================

# Serving.
DEFAULT_HOST = "127.0.0.1"  # this machine only; --host 0.0.0.0 lets others on the network join
DEFAULT_PORT = 8000
LISTEN_BACKLOG = 4096  # connections the kernel queues for us until accept(): a crowd arriving at
#                        once must wait in this queue, not be refused (the stdlib's default is 5;
#                        Linux caps the number at net.core.somaxconn, 4096 on recent kernels)
OPEN_FILES = 65536  # open files we ask the system to allow (each connection is one): room for
#                     --max-clients and more, where many systems allow 1024 unless asked
PAGE_GZIP_LEVEL = 9  # the page is compressed once, at start-up, so the smallest (slowest) level
#                      costs nothing per request

# Long-polling.
DEFAULT_POLL_TIMEOUT = 25  # seconds a poll stays parked; well under the ~60 s after which proxies
#                            and home routers cut a connection that carries no data
MAX_POLL_TIMEOUT = 60  # the longest a client may ask for, for the same reason
MAX_PARKED_PER_USER = 6  # a browser opens at most 6 connections to one host: only scripts exceed it
PRESENCE_INTERVAL = 1.0  # seconds: a change in who is online wakes the parked polls at most this
#                          often, however many come and go; in a quiet room, departures are looked
#                          for this often
ARRIVALS_PAUSE = 0.2  # seconds without a newcomer after which the newcomers are announced: people
#                       arriving together are announced together, once they are all in
ARRIVALS_MAX_WAIT = 2.0  # seconds a newcomer waits for that pause at most, if people keep coming
DEFAULT_ONLINE_WINDOW = 30  # seconds after their last poll that someone still counts as online:
#                             longer than a poll's wait, and a page that lost its connection for a
#                             moment is back well within it
MAX_ONLINE = 1000  # people in the online list: every answer that carries the list carries them all,
#                    and anyone can make up a cookie. Past this, newcomers are served but not listed
SHUTDOWN_GRACE = 2.0  # seconds we give requests in progress to finish when the server stops:
#                      parked polls answer at once, so this is for answers still being written
SHUTDOWN_CHECK_INTERVAL = 0.01  # seconds between two looks, then, at whether they have finished

# Messages and names.
SNAPSHOT_SIZE = 100  # messages a page gets when it first loads: a few screens' worth; older
#                     ones come a page at a time if the reader scrolls back
MAX_BATCH = 500  # messages in one answer to a page that fell far behind; it asks again for the rest
#                  (so that no answer grows past a few hundred KB, however long it was away)
RECENT_MESSAGES = 500  # the latest messages kept in memory, encoded: a page less far behind than
#                        this is answered without reading the disk (between 500 and 1000 are kept)
HISTORY_PAGE = 100  # older messages a reader gets each time they scroll back, unless they ask for
#                     another number (GET /api/messages?before=ID&limit=N)
MAX_HISTORY_PAGE = 500  # the most one such answer may hold, as for a poll's batch. A larger limit is
#                         refused, not cut down: "fewer than asked for" must mean "that is all"
MAX_TEXT_LENGTH = 2000  # characters in one message: a long message, not a document
MAX_NAME_LENGTH = 40  # characters in a name: it must fit the online list and a message's line
MAX_BODY_BYTES = 16 * 1024  # a JSON body larger than this is refused unread (the longest message
#                             fits twice over as a browser's JSON.stringify sends it: 2000
#                             characters of at most 4 bytes each)

# Rate limits: at most COUNT messages in any SECONDS, for each (COUNT, SECONDS) pair. Short windows
# stop a burst, long ones a steady flood; a person chatting keeps well inside them all.
RATE_LIMITS = [(2, 3), (3, 10), (8, 60), (50, 600)]
FORGET_POSTS_EVERY = 1000  # attempts to post between two clean-ups of the limiter's memory: a
#                            clean-up looks at every recent poster, too slow to do on every post

# Identity.
SESSION_COOKIE = "sid"
SESSION_MAX_AGE = 365 * 24 * 3600  # seconds the browser keeps the cookie
SESSION_ID_PATTERN = re.compile(r"[A-Za-z0-9_-]{32}")  # what secrets.token_urlsafe(24) produces
MAX_CACHED_USERS = 10_000  # users kept in memory; past this, those not online are forgotten (and
#                            read back from the database when they return)

# Storage.
SCHEMA_VERSION = 1  # stored in the file as PRAGMA user_version, so we never touch a foreign file
STORAGE_BUSY_TIMEOUT = 1.0  # seconds SQLite waits for a lock held elsewhere before a write fails:
#                             a post fails (503) rather than wait longer than a person would


# ==================================================================================================
# 2. The room: a version number, the list of pending polls, and how a change answers them
# ==================================================================================================

class PendingPoll:
    """A poll parked in the room: who asked, what they have seen, and how to answer them.

    The room keeps these in its list of pending polls, Room._pending. Who writes a poll's answer
    follows from that list, so that each answer has exactly one writer however threads
    interleave: while the poll is in the list, its own thread may take it out again (nothing new
    after its time-out; the room closing), and so may a newer poll of the same user's, if they
    have too many (Room._count_parked), to let the old one's thread answer it; once a change has
    taken the list, the poll is that change's to answer, until it is `done` with it.

    `as_http_answer` turns an answer's JSON body into the very bytes the poll's own thread would
    write (status line, headers, body); it is None for a poll that only its own thread may
    answer (see ChatHandler.room_may_answer).
    """

    def __init__(self, user, since, connection, as_http_answer):
        self.user = user
        self.since = since
        self.connection = connection  # its socket
        self.as_http_answer = as_http_answer
        self.done = False  # the change that took it is done with it: its own thread may go on
        self.wake_up = None  # the Condition its thread waits on, made only if it parks
        #                      (most polls are answered at once: see Room.wait_for_change)
        self.asleep = False  # its thread is waiting on it
        self.woken_by_relay = False  # ... and the relay has woken it (see Room._wake_next)
        self.written = False  # the change wrote all that the socket would take at once,
        self.unsent = b""  # ... and this is the rest, for the poll's own thread to finish
        self.error = None  # ... or the socket said that the client has gone (an OSError)


class Room:
    """The room as all threads share it: its version, who is online, and the pending polls.

    Every change (a message, a rename, the online list) goes the same way: take the write lock,
    give the change the next version number, save it to disk, and only then publish it: set the
    version in memory and take the list of pending polls, which the changing thread then answers
    (see write_answers). So no page ever sees something that a crash could take back, and the
    versions a page sees only ever grow.
    """

    def __init__(self, storage, presence, log_polls=False):
        self.storage = storage
        self.presence = presence
        self.log_polls = log_polls  # print the life of each poll (--log-polls), for learners
        self.version = storage.load_version()
        self.online = []  # [{"id": ..., "name": ...}] as last announced
        self.online_json = b"[]"  # ... and encoded, once
        self.online_version = self.version  # the version at which `online` last changed
        # The latest messages, oldest first, each encoded once (see shared_answer), and the
        # version after which every message is among them: those that came since we started.
        self._recent_ids, self._recent_json = [], []
        self._recent_from = self.version
        self.closing = False
        # Two locks, so that waiting for the disk never holds up the parked polls:
        # _write_lock puts writers in a line (one version number each, saved in order);
        # _lock guards the fields above and below, and each parked poll waits on a Condition of
        # its own that is built on it (see wait_for_change).
        self._write_lock = threading.Lock()
        self._lock = threading.RLock()
        self._pending = {}  # PendingPoll -> None: the parked polls, in the order they parked
        # The relay (see _wake_next): the polls that are done (answered, or now their thread's to
        # answer) whose threads may still be asleep, in the order to wake them; and, for each
        # thread, whether the relay woke it and it still owes the next one its wake-up (.owed).
        self._to_wake = collections.deque()
        self._relay = threading.local()

    # --- Parking a poll ---------------------------------------------------------------------------

    def poll(self, poll, timeout, present=True):
        """Answer `GET /api/poll`: at once if the page is behind, otherwise once something changes.

        `poll.since` is None for a page that has nothing yet; it gets a snapshot. A `since` newer
        than the room means the page knew a room that is gone (say, the data file was replaced):
        it gets a snapshot too, at once, instead of waiting for a version that may never come.
        `present` is False for a client that sent no cookie: it is answered, but not counted as
        online (see ChatHandler.get_poll).

        Returns the answer's JSON body as bytes, for the caller to write; or None if the room
        has already written the answer to the poll's socket (see write_answers).
        """
        if present:
            self._count_parked(poll)
        try:
            self.wait_for_change(poll, timeout)
        finally:
            if present:
                self.presence.unpark(poll)
        if poll.written:
            return None
        return self.answer(poll.since, poll.user)

    def wait_for_change(self, poll, timeout):
        """Park the poll until it is answered, or `timeout` seconds pass. At once if it is behind.

        This is where a long-poll waits: the poll joins the list of pending polls, and its
        thread waits on the Condition. When the room changes, the changing thread writes the
        answer and wakes us (see write_answers): we then only finish what it could not write.
        If `timeout` passes first (nothing new), or the room closes, the poll is ours to answer.

        A Condition is a lock with a place to wait. A thread must hold the lock to wait, and to
        notify (wake) a waiting thread. wait() lets go of the lock while it waits, and takes it
        back before it returns: so the state the waiter looks at cannot change under its eyes,
        and the thread that changes it cannot miss a waiter. Once back, the thread looks again,
        in a `while` loop: wait() may return because the time is up, or before anything it
        waits for is true. Several Conditions may share one lock: each poll has its own, built on
        the room's lock, so that the room can wake the very thread it means to.
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

    def _wake_next(self):
        """Wake the next parked thread, if any thread still has an answer waiting for it.

        Waking is a relay: write_answers() wakes one parked thread, and each thread that wakes
        wakes the next, not at once, but when it is about to wait again: for its page's next
        poll, for its client, or for the disk (wake_next_if_owed). So one woken thread runs at a
        time. Woken together, as by notify_all(), threads take turns at the GIL at every system
        call (any read or write lets go of it), each turn a switch from one thread to another:
        more switches, and more of the server's time, than the answers themselves cost.

        Each poll has its own Condition, so the relay wakes exactly the threads it means to, in
        the order their polls were done. A thread that woke by itself meanwhile (its time-out
        came) is past waiting, and is skipped: it needs no wake-up, and owes none.
        """
        while self._to_wake:
            poll = self._to_wake.popleft()
            if poll.asleep:
                poll.woken_by_relay = True
                poll.wake_up.notify()
                return

    def wake_next_if_owed(self):
        """If the relay woke this thread and it has not woken the next one yet, do it now.

        Called before anything that may wait: parking the next poll (wait_for_change), a read
        that would wait for the client (ChatHandler.handle_one_request, read_json), a write
        (ChatHandler.write), a change to the room (the disk), the end of a connection
        (ChatHandler.finish). On a first read, take each call as "before waiting, let the next
        thread go".
        """
        if self.owes_wake_up():
            with self._lock:  # (an RLock: a caller may hold it already)
                self._relay.owed = False
                self._wake_next()

    def owes_wake_up(self):
        """True if the relay woke this thread and it has not woken the next one yet."""
        return getattr(self._relay, "owed", False)

    def _count_parked(self, poll):
        """Count the poll as its user's; if they now have too many, answer their oldest now."""
        oldest = self.presence.park(poll)
        if oldest is not None:
            with self._lock:
                if oldest in self._pending:  # still parked, and still ours to take
                    del self._pending[oldest]
                    oldest.done = True  # (and not written: its own thread answers it)
                    oldest.wake_up.notify()  # that thread alone: it owes no one a wake-up

    def close(self):
        """Wake every parked poll so that it answers, and refuse to park new ones."""
        with self._lock:
            self.closing = True
            for poll in self._pending:
                poll.wake_up.notify()

    # --- Answering the pending polls --------------------------------------------------------------

    def _publish(self, version, message=None, online=None):
        """Make a saved change visible, and take the list of pending polls, to answer them.

        Every poll in the list is behind the new version: a poll parks only when it is up to
        date (wait_for_change). The list is taken whole, in one step, however long it is: the
        lock is held for no longer with a thousand polls than with one. Returns the polls, for
        the calling thread to answer with write_answers(), once it has answered its own client.
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
        return taken

    def _remember(self, message):
        """Keep a new message, encoded, with the latest ones (the caller holds the lock)."""
        self._recent_ids.append(message["id"])
        self._recent_json.append(encode_json(message))
        if len(self._recent_ids) > 2 * RECENT_MESSAGES:  # forget the older half, in one go
            self._recent_from = self._recent_ids[RECENT_MESSAGES - 1]
            del self._recent_ids[:RECENT_MESSAGES], self._recent_json[:RECENT_MESSAGES]

    def write_answers(self, taken):
        """Write each taken poll's answer to its socket, never waiting; then wake their threads.

        This is the broadcast: one thread writes every waiting page's answer, straight from the
        list of pending polls. (Waking each parked thread to build and write its own answer
        would cost each page a turn at the GIL, one after another, before it heard the news.)
        It runs without the room's lock held, so other posts and polls go on meanwhile; an
        answer is made when it is written, so it may also carry a change made since the list was
        taken (never less than the change that took it). Each woken thread finishes what did not
        fit, and reads its page's next request.
        """
        # Every poll taken has seen the same version: each parked when it was up to date, and
        # each change takes the whole list. So one shared answer serves them all.
        shared = None
        started, version = time.perf_counter(), self.version  # (both for the log line only)
        try:
            for poll in taken:
                if poll.as_http_answer is None:
                    continue  # its own thread answers it
                if shared is None:
                    shared = self.shared_answer(poll.since)
                answer = poll.as_http_answer(with_you(shared, poll.user))
                try:
                    poll.unsent = send_now(poll.connection, answer)
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

    def answer(self, since, user):
        """The JSON answer to a poll that has seen `since`: what changed after it, or a snapshot."""
        return with_you(self.shared_answer(since), user)

    def shared_answer(self, since):
        """The part of the answer to `since` that is the same for every reader, encoded.

        Each message is encoded once, when it arrives, and kept with the latest others: an
        answer is made of those bytes, joined, however many readers ask and from whichever
        version. Only the short "you" part differs from one reader to the next, and is added at
        the end (with_you). A page further behind than the messages kept is answered from disk.
        """
        with self._lock:
            version = self.version
            snapshot = since is None or since > version
            online = self.online_json if snapshot or self.online_version > since else None
            # (_recent_from == 0: the room was empty when we started, so every message is kept)
            if snapshot and (len(self._recent_json) >= SNAPSHOT_SIZE or self._recent_from == 0):
                messages = self._recent_json[-SNAPSHOT_SIZE:]
            elif not snapshot and since >= self._recent_from:
                first = bisect.bisect_right(self._recent_ids, since)
                messages = self._recent_json[first:first + MAX_BATCH]
                if len(messages) == MAX_BATCH:  # the page continues from here with its next poll
                    version = self._recent_ids[first + MAX_BATCH - 1]
            else:
                messages = None
        if messages is None and snapshot:
            messages = map(encode_json, self.storage.latest_messages(version, SNAPSHOT_SIZE))
        elif messages is None:
            stored = self.storage.messages_after(since, version, MAX_BATCH)
            if len(stored) == MAX_BATCH:
                version = stored[-1]["id"]
            messages = map(encode_json, stored)
        answer = b'{"version":%d,"messages":[%s]' % (version, b",".join(messages))
        if online is not None:
            answer += b',"online":' + online
        return answer + b"}"

    # --- Changing the room -----------------------------------------------------------------------

    def add_message(self, user, text):
        """Save a message and publish it. Raises StorageError, having published nothing.

        Returns the message and the polls taken from the list, for write_answers().
        """
        self.wake_next_if_owed()  # saving may wait for the disk
        with self._write_lock:
            message = {
                "id": self.version + 1,  # a message's id is the version its arrival created
                "user": user.id,
                "name": user.name,
                "text": text,
                "time": int(time.time() * 1000),
            }
            self.storage.save_message(message, user)
            return message, self._publish(message["id"], message=message)

    def rename(self, user, name):
        """Save a user's new name and publish it. Raises StorageError, having changed nothing.

        Returns the polls taken from the list, for write_answers().
        """
        self.wake_next_if_owed()  # saving may wait for the disk
        with self._write_lock:
            version = self.version + 1
            self.storage.save_name(user, name, version)
            user.name = name
            return self._publish(version, online=self.presence.online_list(recompute=True))

    def refresh_presence(self):
        """Announce the online list if it changed. Returns True if it did.

        Called by a background thread: keep_presence_fresh, in section 8.
        """
        # Under the write lock, or a rename published while we look could be overwritten by
        # the older list we looked at.
        with self._write_lock:
            online = self.presence.online_list()
            if online is self.online or online == self.online:  # `is`: usually the same kept list
                return False
            version = self.version + 1
            # Saved although nothing but the version is: versions must keep growing across a
            # restart, or a page that saw this one would take the restarted room for a new one.
            self.storage.save_version(version)
            taken = self._publish(version, online=online)
        self.write_answers(taken)  # no client of ours to answer first, unlike a post's 201
        return True


def with_you(shared, user):
    """An answer's shared part, b'{...}', with this reader's own "you" field added at the end."""
    return shared[:-1] + b',"you":' + user.public_json() + b"}"


# A send() that does not wait needs the MSG_DONTWAIT flag, which Windows lacks: there, every
# poll's own thread writes its answer (see ChatHandler.room_may_answer).
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


# ==================================================================================================
# 3. Presence: who is online
# ==================================================================================================

class Presence:
    """Who is online: anyone with a parked poll, or whose last poll is within the online window.

    A parked thread does not read its socket, so it cannot notice that its page was closed. To
    notice anyway, every connection's socket is registered with a selector while it is open. A
    selector (the selectors module) watches many sockets at once: one call says which of them
    have something to read. When the browser closes a page, its socket becomes readable with
    nothing to read, and the poll parked on it stops counting.

    The selector has a lock of its own, because park() and unpark() run for every poll and must
    make no system call while they hold _lock: a system call lets go of the GIL, and every other
    poll would queue on _lock until this thread got the GIL back.
    """

    def __init__(self, window):
        self.window = window
        self._lock = threading.Lock()  # guards the fields below, up to _selector_lock
        self._last_seen = {}  # user id -> (User, time.monotonic() of their last poll)
        self._parked = collections.defaultdict(list)  # user id -> [PendingPoll, ...], oldest first
        self._parked_on = {}  # socket -> the PendingPoll waiting on it
        self._online = None  # online_list()'s last answer; None once someone arrives or leaves
        # The presence thread waits on _arrivals; the first newcomer since it last looked wakes
        # it, and it reads _last_arrival again whenever its wait ends (wait_until_time_to_look).
        self._arrivals = threading.Condition(self._lock)
        self._first_arrival = None  # time.monotonic() of the first newcomer since then
        self._last_arrival = None  # and of the latest one
        self._selector_lock = threading.Lock()
        # poll(), not the default epoll: epoll makes a system call for each socket registered,
        # and a system call inside _selector_lock hands the GIL away while holding the lock, so
        # that a busy server's newcomers queue on it (README, Performance). poll() only notes
        # the socket, and calls the system once a look. (Windows has no poll(): there the
        # default is select(), which only notes too.)
        self._selector = getattr(selectors, "PollSelector", selectors.DefaultSelector)()

    def _seen_now(self, user):
        """Count `user` as online from now, unless the list is full (see MAX_ONLINE)."""
        now = time.monotonic()
        if user.id in self._last_seen:
            self._last_seen[user.id] = (user, now)
        elif len(self._last_seen) < MAX_ONLINE:
            self._last_seen[user.id] = (user, now)
            self._online = None  # someone arrived: online_list() must make the list again
            self._last_arrival = now
            if self._first_arrival is None:
                self._first_arrival = now
                self._arrivals.notify()  # our callers hold _lock, which _arrivals is built on

    def park(self, poll):
        """Count a poll, and its user as seen now. Returns the user's oldest parked poll if they
        now have too many."""
        with self._lock:
            self._seen_now(poll.user)
            polls = self._parked[poll.user.id]
            polls.append(poll)
            self._parked_on[poll.connection] = poll
            if len(polls) > MAX_PARKED_PER_USER:
                oldest = polls[0]
                self._drop_parked(oldest)
                return oldest
        return None

    def unpark(self, poll):
        with self._lock:
            # If it is no longer counted (its user had too many, or its page went away), its end
            # is no visit either.
            if self._drop_parked(poll):
                self._seen_now(poll.user)

    def _drop_parked(self, poll):
        """Stop counting a parked poll. True if it was counted. The caller holds _lock."""
        polls = self._parked.get(poll.user.id, [])
        if poll not in polls:
            return False
        polls.remove(poll)
        if not polls:
            del self._parked[poll.user.id]
        self._parked_on.pop(poll.connection, None)
        return True

    def wait_until_time_to_look(self, idle):
        """Return when the online list should be looked at again (by Room.refresh_presence).

        If nobody arrives, that is after `idle` seconds. If someone does, it is once newcomers
        pause (ARRIVALS_PAUSE seconds without another), or ARRIVALS_MAX_WAIT seconds after the
        first, even if that is later than `idle`. Each announcement wakes every parked poll, so
        a crowd coming in is announced once, when it is in, not once a second while it comes.
        On return, the newcomers count as seen: the caller is to announce them.
        """
        with self._arrivals:
            due = time.monotonic() + idle
            while True:
                if self._first_arrival is not None:
                    due = min(self._last_arrival + ARRIVALS_PAUSE,
                              self._first_arrival + ARRIVALS_MAX_WAIT)
                remaining = due - time.monotonic()
                if remaining <= 0:
                    self._first_arrival = None
                    return
                self._arrivals.wait(remaining)

    def is_online(self, user_id):
        with self._lock:
            return user_id in self._last_seen

    def online_list(self, recompute=False):
        """Forget who left, and return who is online, sorted by name.

        The sorted list is kept, and made again only when someone arrived or left, or when
        asked to (a name changed): sorting a thousand names every second was most of what an
        idle room cost.
        """
        self._forget_closed_connections()
        now = time.monotonic()
        with self._lock:
            for user_id, (user, seen) in list(self._last_seen.items()):
                if user_id not in self._parked and now - seen > self.window:
                    del self._last_seen[user_id]
                    self._online = None
            if self._online is None or recompute:
                users = sorted((user for user, _ in self._last_seen.values()),
                               key=lambda user: (user.name.casefold(), user.id))
                self._online = [user.public() for user in users]
            return self._online

    # --- Watching connections ---------------------------------------------------------------------

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
                self._drop_parked(poll)
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
        # 16 hex digits (64 bits): enough to tell people apart, and short in every answer.
        self.id = hashlib.sha256(sid.encode("ascii")).hexdigest()[:16]
        self.name = name or f"Guest {int(self.id, 16) % 9000 + 1000}"
        self._public_json = (None, None)  # (the name it was made from, public() encoded)

    def public(self):
        return {"id": self.id, "name": self.name}

    def public_json(self):
        """public(), encoded: every answer to this user's polls carries it, so it is kept."""
        # One tuple, replaced whole: another thread (a broadcast) may read it at any moment.
        name, encoded = self._public_json
        if name != self.name:
            name = self.name  # read once (not public()): so that the bytes match what is kept
            encoded = encode_json({"id": self.id, "name": name})
            self._public_json = (name, encoded)
        return encoded


class Sessions:
    """Finds the User behind a session cookie: in memory if we can, else in the database."""

    def __init__(self, storage, presence):
        self.storage = storage
        self.presence = presence
        self._users = {}  # sid -> User
        self._lock = threading.Lock()

    def user_for(self, sid):
        user = self._users.get(sid)
        if user is None:
            user = User(sid, self.storage.load_name(sid))
            with self._lock:
                if len(self._users) >= MAX_CACHED_USERS:
                    self._forget_offline_users()
                user = self._users.setdefault(sid, user)
        return user

    def _forget_offline_users(self):
        self._users = {sid: user for sid, user in self._users.items()
                       if self.presence.is_online(user.id)}


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
        self._attempts = 0
        self._lock = threading.Lock()

    def limit_hit(self, user_id):
        """Count a post now, unless that would break a limit: then say which, and count nothing.

        Returns None if the post is counted, else (seconds to wait, (count, seconds) of the
        limit it would break).
        """
        now = time.monotonic()
        with self._lock:
            self._attempts += 1
            if self._attempts % FORGET_POSTS_EVERY == 0:
                self._forget_old_posts(now)
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

    def _forget_old_posts(self, now):
        """Drop the users whose every post is older than the longest window."""
        self._times = {user_id: times for user_id, times in self._times.items()
                       if times and now - times[-1] < self.longest}


# ==================================================================================================
# 6. Storage: SQLite
# ==================================================================================================

class StorageError(Exception):
    """The data file could not be read or written. Nothing was acknowledged."""


SCHEMA = f"""
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
PRAGMA user_version = {SCHEMA_VERSION};
COMMIT;
"""


class Storage:
    """The room's SQLite file: messages, named users, and the room's version.

    Two connections: one that writes (used by one thread at a time, under Room's write lock) and
    one that reads. In WAL mode (write-ahead logging) a change is appended to a log file beside
    the database, and readers go on reading the last committed state meanwhile: readers never
    wait for the writer, so a slow disk slows posting but never delays an answer to a poll.
    With synchronous=FULL, a commit returns only once the log is on the disk itself (SQLite asks
    the system to flush it): what we acknowledge survives the process being killed, and also the
    machine losing power.
    """

    def __init__(self, path):
        self.path = str(path)
        self._writer = self._connect()
        try:
            self._check_or_create_schema()
            self._writer.execute("PRAGMA journal_mode = WAL")
            self._writer.execute("PRAGMA synchronous = FULL")
            self._writer.execute("BEGIN IMMEDIATE")  # fails now, not at the first post, if read-only
            self._writer.execute("COMMIT")
        except sqlite3.Error as error:
            self._writer.close()
            raise StorageError(error) from error
        self._reader = self._connect()
        self._read_lock = threading.Lock()

    def _connect(self):
        try:
            return sqlite3.connect(self.path, timeout=STORAGE_BUSY_TIMEOUT,
                                   isolation_level=None, check_same_thread=False)
        except sqlite3.Error as error:
            raise StorageError(error) from error

    def _check_or_create_schema(self):
        """Create the tables in a new file; refuse a file that some other program made."""
        try:
            tables = {row[0] for row in self._writer.execute(
                "SELECT name FROM sqlite_master WHERE type = 'table'")}
            version = self._writer.execute("PRAGMA user_version").fetchone()[0]
        except sqlite3.DatabaseError as error:
            raise StorageError(f"it is not an SQLite database ({error})") from error
        if not tables and version == 0:
            self._writer.executescript(SCHEMA)
        elif version != SCHEMA_VERSION or not {"room", "users", "messages"} <= tables:
            raise StorageError("it is an SQLite database, but not one this chat room made "
                               f"(schema version {version}, tables {sorted(tables)})")

    def close(self):
        self._reader.close()
        self._writer.close()

    # --- Writing (one thread at a time: the caller holds Room's write lock) -----------------------

    def save_message(self, message, user):
        self._write([
            ("INSERT INTO messages VALUES (:id, :user, :name, :text, :time)", message),
            ("INSERT OR IGNORE INTO users VALUES (?, ?, ?)", (user.sid, user.id, user.name)),
            ("UPDATE room SET version = ?", (message["id"],)),
        ])

    def save_name(self, user, name, version):
        self._write([
            ("INSERT OR REPLACE INTO users VALUES (?, ?, ?)", (user.sid, user.id, name)),
            ("UPDATE room SET version = ?", (version,)),
        ])

    def save_version(self, version):
        self._write([("UPDATE room SET version = ?", (version,))])

    def _write(self, statements):
        """Run statements in one transaction and commit; on any failure, roll back and raise."""
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

    # --- Reading ----------------------------------------------------------------------------------

    def load_version(self):
        return self._read_one("SELECT version FROM room")[0]

    def load_name(self, sid):
        row = self._read_one("SELECT name FROM users WHERE sid = ?", (sid,))
        return row[0] if row else None

    def latest_messages(self, upto, count):
        """The last `count` messages with id <= upto, oldest first."""
        rows = self._read_all(
            "SELECT * FROM messages WHERE id <= ? ORDER BY id DESC LIMIT ?", (upto, count))
        return [message_from_row(row) for row in reversed(rows)]

    def messages_after(self, since, upto, limit):
        """Messages with since < id <= upto, oldest first, at most `limit` of them."""
        rows = self._read_all(
            "SELECT * FROM messages WHERE id > ? AND id <= ? ORDER BY id LIMIT ?",
            (since, upto, limit))
        return [message_from_row(row) for row in rows]

    def _read_one(self, sql, parameters=()):
        return self._read(sql, parameters, lambda cursor: cursor.fetchone())

    def _read_all(self, sql, parameters=()):
        return self._read(sql, parameters, lambda cursor: cursor.fetchall())

    def _read(self, sql, parameters, fetch):
        try:
            with self._read_lock:
                return fetch(self._reader.execute(sql, parameters))
        except sqlite3.Error as error:
            raise StorageError(error) from error


def message_from_row(row):
    message_id, user_id, name, text, sent = row
    return {"id": message_id, "user": user_id, "name": name, "text": text, "time": sent}


def encode_json(value, encoder=json.JSONEncoder(ensure_ascii=False, separators=(",", ":"))):
    # One encoder for all: json.dumps() with these options would make a new one on every call.
    return encoder.encode(value).encode("utf-8")


# ==================================================================================================
# 7. The HTTP handler
# ==================================================================================================

# What a read or a write raises when the client hung up or stalled. (socket.timeout is the same as
# TimeoutError from Python 3.10 on; before, it is another class, so both are named. A write that
# the kernel timed out raises BlockingIOError: see set_time_outs, in Part II.)
CLIENT_WENT_AWAY = (ConnectionError, TimeoutError, socket.timeout, BlockingIOError)


class RequestError(Exception):
    """A request we refuse: becomes a JSON answer {"error": message, ...} with this status."""

    def __init__(self, status, message, headers=(), **fields):
        super().__init__(message)
        self.status = status
        self.body = {"error": message, **fields}
        self.headers = list(headers)


class ChatHandler(http.server.BaseHTTPRequestHandler):
    """Serves one connection: reads each request, calls the room, writes one answer per request.

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
    # Send each answer the moment it is written. Otherwise Nagle's algorithm may hold a small
    # answer back for up to 40 ms, waiting for the client to acknowledge the last one.
    disable_nagle_algorithm = True

    def setup(self):
        super().setup()
        self.new_sid = None
        self.body_pending = False
        self.server.room.presence.watch(self.connection)  # to notice when the page goes away

    def finish(self):
        self.server.room.wake_next_if_owed()
        self.server.room.presence.forget_connection(self.connection)
        super().finish()

    def handle_one_request(self):
        if self.server.room.owes_wake_up() and not request_waiting(self.connection):
            self.server.room.wake_next_if_owed()  # we are about to wait for the next request
        super().handle_one_request()

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
                self.send_json(refusal.status, refusal.body, refusal.headers)
            except StorageError as error:
                self.log_message("storage failed: %s", error)
                self.send_json(503, {"error": "The server could not save or read the room's data. "
                                              "Please try again in a moment."},
                               [("Retry-After", "1")])
            except CLIENT_WENT_AWAY:
                raise  # one line in the log, by http.server for a time-out, else by handle_error
            except Exception:
                # Through log(), not log_message(), which would flatten the traceback onto one
                # line; the request line is repr()'d so that it cannot forge lines of its own.
                log(f"{self.client_address[0]}: error in {self.requestline[:200]!r}:\n"
                    f"{traceback.format_exc()}")
                self.close_connection = True
                self.send_json(500, {"error": "Something went wrong on the server. "
                                              "It has been logged."})

    # --- The routes ------------------------------------------------------------------------------

    def get_page(self, query):
        """GET /: the page, index.html, gzip-compressed for a browser that accepts it.

        "no-cache" lets the browser keep the page, but it must ask before using it again: it
        sends the ETag it has in If-None-Match, and if the page is still the same the answer is
        a 304 with no body. So a reload costs a few hundred bytes, and a new page after an
        upgrade is seen at once.
        """
        coding = "gzip" if accepts_gzip(self.headers.get("accept-encoding", "")) else "identity"
        body, etag = self.server.page[coding]
        # Vary: a cache must not hand the gzip answer to a client that did not ask for it. These
        # three go in a 304 too, to refresh what the browser has stored (RFC 9110 15.4.5).
        headers = [("Cache-Control", "no-cache"), ("Vary", "Accept-Encoding"), ("ETag", etag)]
        if none_match(self.headers.get("if-none-match"), etag):
            self.send(304, b"", None, headers)
            return
        if coding == "gzip":
            headers.append(("Content-Encoding", "gzip"))
        self.send(200, body, "text/html; charset=utf-8", headers)

    def get_chime(self, query):
        """GET /chime.wav: the sound the page plays for someone else's message."""
        self.send(200, self.server.chime, "audio/wav", [("Cache-Control", "max-age=86400")])

    def get_poll(self, query):
        """GET /api/poll?since=V&timeout=S: the long-poll. The waiting happens in Room.poll."""
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
            self.new_sid = new_session_id()
            user = User(self.new_sid)
        poll = PendingPoll(user, since, self.connection,
                           self.poll_answer if self.room_may_answer() else None)
        body = self.server.room.poll(poll, timeout, present)
        if self.server.room.closing:  # the server is stopping: no next request on this one
            self.close_connection = True
        if body is None:  # the room wrote the answer itself (Room.write_answers)
            self.finish_answer(poll)
        else:
            self.send(200, body, "application/json")

    def room_may_answer(self):
        """True if the room may write this poll's answer for us: if it is the same answer
        whichever thread writes it. Not so for a HEAD request (no body), a new client (it is
        owed a cookie), or an answer after which we close the connection (HTTP/1.0 without
        keep-alive, or a body we did not read)."""
        return (ANSWERS_WITHOUT_WAITING and self.command == "GET" and self.new_sid is None
                and not self.body_pending and not self.close_connection)

    def poll_answer(self, body):
        """The bytes send(200, body, "application/json") writes, for a poll the room may answer.

        The room calls this from the thread that changed it, so it reads nothing that belongs
        to this request alone: room_may_answer() made sure there is nothing of that kind.
        """
        return http_answer(200, body, "application/json", (), self.server.common_headers)

    def finish_answer(self, poll):
        """Write what the room could not write at once of this poll's answer, if anything."""
        if poll.error is not None:
            raise poll.error  # the client has gone: one line in the log, as for any write
        if poll.unsent:
            self.write(poll.unsent)

    def get_history(self, query):
        """GET /api/messages?before=ID&limit=N: older messages, for a reader scrolling back.

        At most `limit` messages whose id is below `before` (the latest ones, without it),
        oldest first; fewer than `limit` means there are no more. A plain read from the file:
        it needs no cookie, never waits, and counts no one as online.
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
        self.send_json(200, {"messages": self.server.room.storage.latest_messages(upto, limit)})

    def post_message(self, query):
        """POST /api/messages {"text": ...}: check, rate-limit, save and announce a message."""
        user = self.required_user()
        text = self.read_json_field("text")
        check_text(text, "message", MAX_TEXT_LENGTH)
        if not text.strip():
            raise RequestError(400, "The message is empty.")
        hit = self.server.limiter.limit_hit(user.id)
        if hit:
            wait, (count, seconds) = hit
            raise RequestError(
                429, f"You are posting too fast: at most {count} messages in {seconds} seconds. "
                     f"You can post again in {math.ceil(wait)} s.",
                headers=[("Retry-After", str(max(1, math.ceil(wait))))],
                retry_after=round(wait, 3), limit={"count": count, "seconds": seconds})
        try:
            message, taken = self.server.room.add_message(user, text)
        except StorageError as error:
            self.server.limiter.refund(user.id)
            self.log_message("could not save a message: %s", error)
            raise RequestError(503, "The server could not save your message, so it was not "
                                    "sent. Please try again in a moment.",
                               headers=[("Retry-After", "1")]) from error
        # The sender hears first; then the same thread answers everyone who was waiting.
        self.send_json(201, {"message": message},
                       then=lambda: self.server.room.write_answers(taken))

    def post_name(self, query):
        """POST /api/name {"name": ...}: change the name shown with your messages."""
        user = self.required_user()
        name = self.read_json_field("name").strip()  # (the length is counted once trimmed)
        check_text(name, "name", MAX_NAME_LENGTH)
        if not name:
            raise RequestError(400, "The name is empty.")
        if any(character in name for character in "\n\t"):
            raise RequestError(400, "A name must be on one line, without tabs.")
        taken = self.server.room.rename(user, name)
        self.send_json(200, {"you": user.public()},
                       then=lambda: self.server.room.write_answers(taken))

    # --- Who is asking ----------------------------------------------------------------------------

    def session_user(self):
        """The User whose cookie came with this request, or None if there was no valid cookie."""
        sid = cookie_value(self.headers.get("cookie", ""), SESSION_COOKIE)
        if sid is None or not SESSION_ID_PATTERN.fullmatch(sid):
            return None
        return self.server.sessions.user_for(sid)

    def required_user(self):
        user = self.session_user()
        if user is None:
            self.new_sid = new_session_id()
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
        self.server.room.wake_next_if_owed()  # reading the body may wait for the client
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

    # --- Writing an answer ------------------------------------------------------------------------

    def send_json(self, status, value, headers=(), then=None):
        self.send(status, encode_json(value), "application/json", headers, then)

    def send(self, status, body, content_type, headers=(), then=None):
        """Write an answer (status line, headers and body) with a single write to the socket.

        `then`, if given, is called as soon as the answer is on its way: a post uses it to answer
        the waiting polls. If our client's socket cannot take the whole answer at once, `then`
        is called before the rest is written: a client that does not read cannot hold up the room.
        """
        if self.body_pending:
            self.close_connection = True
        if self.new_sid:
            headers = [*headers, ("Set-Cookie", f"{SESSION_COOKIE}={self.new_sid}; "
                                  f"Max-Age={SESSION_MAX_AGE}; Path=/; HttpOnly; SameSite=Strict")]
            self.new_sid = None
        answer = http_answer(status, body, content_type, headers, self.server.common_headers,
                             close=self.close_connection, with_body=self.command != "HEAD")
        if then is None:
            self.write(answer)
        else:
            try:
                answer = send_now(self.connection, answer)
            finally:
                then()
            self.write(answer)
        if status >= 400:
            self.log_message('"%s" %s', self.requestline[:200], status)

    def write(self, data):
        """Write all of `data`: an answer, or what is left of one."""
        self.server.room.wake_next_if_owed()  # a write may wait for the client
        self.write_whole(data)

    def write_whole(self, data):
        self.wfile.write(data)  # (DefendedHandler gives this a deadline)

    def send_error(self, code, message=None, explain=None):
        """http.server calls this for requests it cannot parse; answer in JSON like the rest."""
        self.close_connection = True
        self.send_json(code, {"error": message or explain or http.HTTPStatus(code).phrase})


def http_answer(status, body, content_type, headers, common_headers, close=False,
                with_body=True):
    """An HTTP answer as bytes: the status line, the headers, and (unless HEAD) the body.

    Every answer the server writes is made here: by a handler for its own request, by the room
    for a poll it answers (ChatHandler.poll_answer), by the accepting thread for a refusal.
    """
    reason = http.server.BaseHTTPRequestHandler.responses[status][0]
    head = f"HTTP/1.1 {status} {reason}\r\n{date_header()}\r\n"
    if status != 304:  # a 304 has no body, so nothing for these to describe (RFC 9110 8.6)
        head += f"Content-Type: {content_type}\r\nContent-Length: {len(body)}\r\n"
    head += common_headers
    if not any(name == "Cache-Control" for name, _ in headers):
        head += "Cache-Control: no-store\r\n"  # API answers are never reused from a cache
    for name, value in headers:
        head += f"{name}: {value}\r\n"
    if close:
        head += "Connection: close\r\n"
    head = (head + "\r\n").encode("latin-1")
    return head + body if with_body else head


def date_header():
    """The Date line every answer carries (RFC 9110 section 6.6.1: a server with a clock must).

    Its text changes once a second, and a broadcast writes a thousand answers in less, so it is
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


# Control characters: C0 (below 32) but tab and newline, DEL, and C1 (0x80 to 0x9f), which
# terminals and some fonts take as commands.
CONTROL_CHARACTERS = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f]")
DIGITS = re.compile(r"[0-9]+")
DECIMAL = re.compile(r"[0-9]+(?:\.[0-9]+)?")


def check_text(value, what, max_length):
    if len(value) > max_length:
        raise RequestError(400, f"The {what} is longer than {max_length} characters.")
    if CONTROL_CHARACTERS.search(value):
        raise RequestError(400, f"The {what} contains control characters.")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise RequestError(400, f"The {what} is not valid Unicode.") from None


def parse_number(params, name, integer=False):
    """A non-negative number from the query string, or None if it is absent.

    Given once, in ASCII digits (with a decimal point if not `integer`): int() and float() also
    take "+1", " 1", "1_000", "1e3", "nan" and other scripts' digits, and a program in front
    of us that read the first of two `since=` where we read the last would see another request.
    Present but empty is as wrong as any other bad number.
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

    Both are made once, at start-up, as the page never changes while the server runs. Each ETag
    is a hash of exactly the bytes sent: a strong validator (RFC 9110 8.8.3), different for the
    two encodings, and different as soon as the page is changed.
    """
    compressed = gzip.compress(page, compresslevel=PAGE_GZIP_LEVEL, mtime=0)
    # 32 hex digits (128 bits) of the hash: more than enough to tell two pages apart.
    return {coding: (body, '"' + hashlib.sha256(body).hexdigest()[:32] + '"')
            for coding, body in (("identity", page), ("gzip", compressed))}


def request_waiting(connection):
    """True if the client's next bytes are here: a peek at the socket that never waits."""
    if not ANSWERS_WITHOUT_WAITING:  # no MSG_DONTWAIT (Windows): take it that they are not
        return False
    try:
        return connection.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) != b""
    except OSError:  # BlockingIOError: nothing yet; or the connection has failed
        return False


# ==================================================================================================
# 8. The server and main()
# ==================================================================================================

class ChatServer(http.server.ThreadingHTTPServer):
    """ThreadingHTTPServer (a thread per connection), holding what its handlers share.

    A handler reaches these through self.server: the room, the sessions, the rate limiter, the
    page and the chime. DefendedServer, in Part II, is the one main() runs.
    """

    request_queue_size = LISTEN_BACKLOG
    common_headers = ""  # header lines every answer carries; DefendedServer adds its own

    def __init__(self, address, room, sessions, limiter, page, chime, poll_timeout,
                 handler=ChatHandler):
        self.address_family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        self.room = room
        self.sessions = sessions
        self.limiter = limiter
        self.page = representations(page)
        self.chime = chime
        self.poll_timeout = poll_timeout
        self._in_progress = set()  # a token for each request being answered
        super().__init__(address, handler)

    @contextlib.contextmanager
    def request_in_progress(self):
        """Count the requests being handled, so that shutdown can wait for them.

        A generator, not a class made on each call: a new class per request is slow to make and
        leaves reference cycles that only the garbage collector frees, a large part of the
        server's memory with a thousand pages polling.

        A set of tokens, not a count under a lock: set.add() and discard() are each one step no
        other thread can break into, and a lock that every request takes is where all of them
        queue when the server is busy. A thread holding it may lose the GIL (Python takes it
        from a thread every 5 ms when others wait), and then every request waits until that
        thread has the GIL back (README, Performance).
        """
        token = object()
        self._in_progress.add(token)
        try:
            yield
        finally:
            self._in_progress.discard(token)

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


def keep_presence_fresh(room, stop, in_progress):
    """Background thread: announce arrivals and departures, at most once a second.

    In a quiet room it looks for departures once a second. Newcomers are announced when they
    stop coming (Presence.wait_until_time_to_look), with any departures found by then. Each
    look counts as a request in progress (`in_progress`), so that stopping the server waits for
    an announcement being written, as for any answer.
    """
    while True:
        room.presence.wait_until_time_to_look(idle=PRESENCE_INTERVAL)
        try:
            with in_progress():
                if stop.is_set():  # (looked at once counted: the shutdown waits, or we stop)
                    return
                if not room.refresh_presence():
                    continue
        except StorageError as error:
            log(f"could not save a presence change, will retry: {error}")
        # Announcements (and retries) at least PRESENCE_INTERVAL apart, as each wakes every
        # parked poll; stop.wait(), so that stopping the server is not held up.
        stop.wait(PRESENCE_INTERVAL)


def log(text):
    # One write per line: print() writes the text and the newline separately, and another
    # thread's line could land between them.
    sys.stderr.write(f"[{time.strftime('%H:%M:%S')}] {text}\n")
    sys.stderr.flush()


def parse_arguments(argv):
    # (The defences' flags have their defaults in Part II, section 9.)
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
    parser.add_argument("--max-clients", type=int, default=DEFAULT_MAX_CLIENTS, metavar="N",
                        help="open connections before new ones are refused (default %(default)s)")
    parser.add_argument("--max-clients-per-address", type=int,
                        default=DEFAULT_MAX_CLIENTS_PER_ADDRESS, metavar="N",
                        help="open connections from one IP address before its new ones are "
                             "refused (default %(default)s)")
    parser.add_argument("--request-timeout", type=float, default=DEFAULT_REQUEST_TIMEOUT,
                        metavar="SECONDS", help="how long a client may take to send a request, "
                                                "or stay idle between two (default %(default)s)")
    parser.add_argument("--log-polls", action="store_true",
                        help="print a line when a poll parks, when a change answers the waiting "
                             "polls, and when a poll times out: watch long-polling at work")
    args = parser.parse_args(argv)
    if not 0 <= args.poll_timeout <= MAX_POLL_TIMEOUT:
        parser.error(f"--poll-timeout must be between 0 and {MAX_POLL_TIMEOUT}")
    if (args.online_window <= 0 or args.max_clients < 1 or args.max_clients_per_address < 1
            or args.request_timeout <= 0):
        parser.error("--online-window, --max-clients, --max-clients-per-address and "
                     "--request-timeout must be positive")
    return args


def read_beside_this_file(name):
    path = Path(__file__).resolve().parent / name
    try:
        return path.read_bytes()
    except OSError as error:
        sys.exit(f"chatroom: cannot read {path} ({error.strerror}); it must be next to chatroom.py.")


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


def stop_on_sigterm(signum, frame):
    """SIGTERM (from `kill`, or a service manager) stops the server just as Ctrl-C does."""
    raise KeyboardInterrupt


def main(argv=None):
    args = parse_arguments(argv)
    signal.signal(signal.SIGTERM, stop_on_sigterm)
    page = read_beside_this_file("index.html")
    chime = read_beside_this_file("chime.wav")
    try:
        storage = Storage(args.data)
    except StorageError as error:
        sys.exit(f"chatroom: cannot use the data file {args.data!r}: {error}")
    raise_open_file_limit()
    presence = Presence(args.online_window)
    room = Room(storage, presence, args.log_polls)
    sessions = Sessions(storage, presence)
    limiter = RateLimiter(RATE_LIMITS)
    try:
        # The room behind the defences of Part II.
        server = DefendedServer((args.host, args.port), room, sessions, limiter, page, chime,
                                args.poll_timeout, max_clients=args.max_clients,
                                max_clients_per_address=args.max_clients_per_address,
                                request_timeout=args.request_timeout)
    except OSError as error:
        storage.close()
        sys.exit(f"chatroom: cannot listen on {args.host}:{args.port} ({error.strerror})")

    stop = threading.Event()
    threading.Thread(target=keep_presence_fresh, args=(room, stop, server.request_in_progress),
                     daemon=True).start()
    try:
        host, port = server.server_address[:2]
        shown_host = f"[{host}]" if ":" in host else host
        print(f"Chat room running at http://{shown_host}:{port}/ (Ctrl-C to stop)", flush=True)
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        stop.set()
        room.close()  # parked polls answer now
        server.wait_for_requests(SHUTDOWN_GRACE)
        server.server_close()
        storage.close()
        print("Chat room stopped.", flush=True)


# ##################################################################################################
# PART II. DEFENCES FOR THE OPEN NETWORK
# ##################################################################################################

# Part I is a whole chat room, but one that trusts its clients: it waits as long as they like,
# takes requests as they come, and serves as many as connect. On the open network some clients
# are hostile, and others just slow or broken. Each block below opens with what it defends
# against, how, and the test in test_chatroom.py that proves it.
# ==================================================================================================
# 9. Settings of the defences
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

# Time.
DEFAULT_REQUEST_TIMEOUT = 10  # seconds from the end of one answer until the next request has fully
#                               arrived: a client that stalls, or sends a byte at a time, is dropped
MIN_READ_RATE = 16 * 1024  # bytes a second: a client must read an answer at least this fast, after
#                            the grace of --request-timeout, or it is dropped (a slow phone link
#                            reads far faster)

# Memory.
REQUEST_BUFFER = 2048  # bytes read ahead on each connection: a browser's request fits, and the
#                        usual 8 KB would stay mostly empty, on every one of thousands
MAX_REQUEST_LINE = 8 * 1024  # bytes in "GET /path?query HTTP/1.1": our URLs are short, and a
#                              parked poll keeps its request line (and path, and query) in memory
MAX_HEADER_BYTES = 32 * 1024  # bytes of all header lines together, also bounding each one: a
#                               browser sends 1 to 2 KB, and a parked poll keeps its headers
MAX_HEADERS = 100  # header lines in one request, as http.client allows
MAX_UNSENT = 32 * 1024  # bytes of answers the kernel may hold unsent for one connection; past it,
#                         writing waits for the client to read. (Unasked, the kernel holds
#                         megabytes for a client that reads slowly: memory anyone could tie up.)

# The request's head.
SINGLE_HEADERS = {"host": "Host", "content-length": "Content-Length"}  # refused if repeated: the
#                 request's length and its host must have one reading only. A repeat of any other
#                 header is joined to the first with a comma (RFC 9110 section 5.3)

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

# Every answer carries these: the page may run only its own script and style, may not be framed by
# another site, and the browser must not guess content types or leak our address to other sites.
# The page's inline <script> and <style> are allowed by their hashes, computed at start-up.
CONTENT_SECURITY_POLICY = (
    "default-src 'self'; script-src {script}; style-src {style}; img-src 'self' data:; "
    "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)


# ==================================================================================================
# 10. The defended handler
# ==================================================================================================

class DefendedHandler(ChatHandler):
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
        be, and several times slower than ours; parsing is the largest part of a poll's cost.
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
        # section 10.1.1), and must never be sent a 1xx answer (section 15.2).
        expect = self.headers.get("expect", "").lower()
        if expect == "100-continue" and self.request_version == "HTTP/1.1":
            return self.handle_expect_100()
        return True

    def read_headers(self):
        """Read the header lines into self.headers, within their budgets. False if refused.

        A name that comes again is joined to the first one's value with a comma, which RFC 9110
        (section 5.3) says means the same as the separate lines, so nothing that came is
        ignored; but a header that must have one value (SINGLE_HEADERS) is refused if repeated.
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
    # Threat: a hostile web page points its own domain name at 127.0.0.1, and its script then
    # talks to the room on this machine as a page of the same site.
    # Defence: listening on loopback, a request for any other host name gets 421 (its requests
    # still carry the hostile name in Host).
    # Proved by: test_a_foreign_host_name_is_refused

    def host_is_served(self):
        """Refuse (421) a Host we do not answer for. False if refused."""
        allowed = self.server.allowed_hosts
        host = self.headers.get("host")
        if allowed is None or host is None:
            return True
        name = host.rsplit("]", 1)[0] + "]" if host.startswith("[") else host.rsplit(":", 1)[0]
        if name.lower() not in allowed:
            self.send_error(421, f"This server does not answer for the host {host[:100]!r}.")
            return False
        return True

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
    # reads its answers a trickle at a time, or never: each holds a thread, and the kernel's
    # memory, for as long as it likes.
    # Defence: every read and write waits at most --request-timeout (set_time_outs); a whole
    # request must arrive within it too (RequestReader); an answer must be read at MIN_READ_RATE
    # (write_within); and the kernel holds at most MAX_UNSENT bytes of answers for a connection
    # (limit_unsent), so pipelined requests are answered only as fast as the client reads.
    # Proved by: test_stalled_clients_are_dropped_and_hold_up_no_one,
    # test_a_client_sending_a_byte_at_a_time_is_dropped,
    # test_a_client_that_never_reads_its_answers_is_dropped,
    # test_a_client_that_reads_a_trickle_is_dropped,
    # test_a_client_that_pipelines_and_never_reads_ties_up_little_memory

    def setup(self):
        super().setup()
        set_time_outs(self.connection, self.server.request_timeout)
        limit_unsent(self.connection)
        self.rfile.close()  # read through RequestReader instead, for its deadline
        self.request_reader = RequestReader(self.connection, self.server.request_timeout)
        self.rfile = io.BufferedReader(self.request_reader, REQUEST_BUFFER)

    def handle_one_request(self):
        self.request_reader.start_deadline()  # the next request must have arrived in time
        super().handle_one_request()

    def write_whole(self, data):
        write_within(self.connection, data, self.server.request_timeout + len(data) / MIN_READ_RATE)


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


def allowed_hosts(host):
    """Host names a request may name when we listen on loopback; None (any) otherwise."""
    loopback = {"127.0.0.1", "localhost", "::1", "[::1]"}
    if host.lower() in loopback or host.startswith("127."):
        return loopback | {host.lower()}
    return None


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
    goes to threads sleeping and waking for the GIL than to our Python code (README,
    Performance).

    So the kernel times out each call itself (the SO_RCVTIMEO and SO_SNDTIMEO options, given as
    a C struct timeval: seconds and microseconds), on a socket left blocking, as accept() made
    it. A call that timed out fails with EAGAIN, as on a non-blocking socket, and Python raises
    BlockingIOError: RequestReader turns it into TimeoutError; for writes it is in
    CLIENT_WENT_AWAY. One difference: settimeout() limits a whole sendall(), the kernel each
    send() in it, so a client that reads a little every few seconds can stretch an answer out.
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
    """Let the kernel hold at most MAX_UNSENT bytes of our answers unsent on this connection.

    With TCP_NOTSENT_LOWAT, a write waits (and a socket counts as writable) only once the
    answers queued before it have mostly gone out. So a client that pipelines requests and
    reads slowly has them answered one at a time, as fast as it reads, and not into a buffer of
    megabytes. Where the option is missing (not Linux), the kernel's own limits apply.
    """
    if hasattr(socket, "TCP_NOTSENT_LOWAT"):
        connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NOTSENT_LOWAT, MAX_UNSENT)


def write_within(connection, data, seconds):
    """Write all of `data`, or raise ConnectionAbortedError once `seconds` have passed.

    sendall() would do it, but each send() in it may wait a socket time-out anew: a client that
    reads a little every few seconds could stretch one answer out for ever. The first send()
    usually takes everything; if not, wait until the socket has room (poll(), with the time
    left), send what fits without waiting, and so on until all is written or the time is up.
    """
    deadline = time.monotonic() + seconds
    rest = memoryview(data)[connection.send(data):]  # waits at most one socket time-out
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
            raise ConnectionAbortedError("the client did not read its answer in time")
        rest = send_now(connection, rest)


# --- Script injection and framing ---------------------------------------------------------------
# Threat: markup in a message or a name that runs as script in other people's pages; another site
# showing the room in a frame; the browser guessing a type, or telling other sites our address.
# Defence: the page puts user text in only as text (index.html); and every answer carries a
# Content-Security-Policy that allows only the page's own inline script and style, by hash, and no
# framing, with nosniff and no-referrer (DefendedServer.common_headers).
# Proved by: test_every_answer_carries_the_security_headers, test_markup_comes_back_verbatim,
# test_markup_in_messages_and_names_is_shown_as_text

def security_headers(page):
    """The header lines every answer carries, with the hashes of the page's inline script and
    style; joined once, here, as http_answer() writes them."""
    def hashes(tag):
        found = re.findall(rf"<{tag}>(.*?)</{tag}>".encode(), page, re.DOTALL)
        digests = [hashlib.sha256(block).digest() for block in found]
        return " ".join(f"'sha256-{base64.b64encode(digest).decode()}'" for digest in digests) \
            or "'none'"

    policy = CONTENT_SECURITY_POLICY.format(script=hashes("script"), style=hashes("style"))
    return (f"Content-Security-Policy: {policy}\r\n"
            "X-Content-Type-Options: nosniff\r\n"
            "Referrer-Policy: no-referrer\r\n")


# ==================================================================================================
# 11. The defended server
# ==================================================================================================

class DefendedServer(ChatServer):
    """ChatServer, for the open network: caps on connections, and threads that start at once."""

    def __init__(self, address, room, sessions, limiter, page, chime, poll_timeout, *,
                 max_clients, max_clients_per_address, request_timeout):
        super().__init__(address, room, sessions, limiter, page, chime, poll_timeout,
                         handler=DefendedHandler)
        self.common_headers = security_headers(page)
        self.allowed_hosts = allowed_hosts(address[0])
        self.request_timeout = request_timeout
        self.max_clients = max_clients
        self.max_clients_per_address = max_clients_per_address
        self.open_connections = 0
        self.connections_from = collections.Counter()  # client IP address -> its open connections
        self._lingering = []  # (refused connection, time.monotonic() by which to close it)
        self._busy = threading.Lock()  # guards the counts of connections above

    # --- Too many connections, or one client taking every place ---------------------------------
    # Threat: a flood of connections, each holding a thread, until the machine runs out; or one
    # client keeping every place taken, so that no one else gets in.
    # Defence: past --max-clients open connections, or --max-clients-per-address from one
    # address, a newcomer gets a quick 503 with Retry-After from the accepting thread, without a
    # thread of its own; its connection lingers a moment so that it can read the answer.
    # Proved by: test_full_server_answers_newcomers_503_and_keeps_its_clients,
    # test_one_address_cannot_take_every_place
    #
    # --- A crowd arriving at once -----------------------------------------------------------------
    # Threat: thousands of people opening the room together (after a link is shared, or when the
    # server restarts under open pages): the accepting thread must take them in fast.
    # Defence: each connection's thread starts without waiting for it to run (start_thread).
    # Proved by: test_a_burst_of_connections_is_not_refused; measured by bench_chatroom.py, crowd

    def process_request(self, request, client_address):
        """Start a thread for the connection, unless too many are open already, in all or from
        its address (so that one client cannot take every place: --max-clients-per-address)."""
        address = client_address[0]
        with self._busy:
            full = (self.open_connections >= self.max_clients
                    or self.connections_from[address] >= self.max_clients_per_address)
            if not full:
                self.open_connections += 1
                self.connections_from[address] += 1
        if full:
            self.refuse(request)
            return
        try:
            start_thread(self.process_request_thread, request, client_address)
        except RuntimeError:  # the system would not start another thread
            self._connection_closed(address)
            self.refuse(request)

    def refuse(self, request):
        """Answer 503 from the accepting thread, without starting a thread for the connection.

        Closing a socket that has unread data makes the system reset the connection, and a
        client still sending its request would get that error instead of our answer. So the
        connection stays open a moment (see service_actions) while we discard what arrives.
        """
        send_refusal(request, self.common_headers)
        if len(self._lingering) >= MAX_LINGERING:
            self.shutdown_request(request)
            return
        try:
            request.shutdown(socket.SHUT_WR)  # the client reads our answer, then the end
        except OSError:
            pass
        self._lingering.append((request, time.monotonic() + REFUSAL_LINGER))

    def service_actions(self):
        """serve_forever() calls this after each accept and twice a second: close the refused
        connections whose client has gone, or has had REFUSAL_LINGER seconds to read our 503."""
        now = time.monotonic()
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

    def _connection_closed(self, address):
        with self._busy:
            self.open_connections -= 1
            self.connections_from[address] -= 1
            if not self.connections_from[address]:
                del self.connections_from[address]  # so that the counter holds only who is here


def start_thread(function, *arguments):
    """Run function(*arguments) in a new thread, and return at once.

    ThreadingHTTPServer would start a threading.Thread, whose start() waits until the new thread
    is running. That costs two turns at the GIL: one for the new thread to say it started, one
    for the accepting thread to get the GIL back. When a crowd arrives, hundreds of threads are
    waiting for the GIL, so each turn is a long wait, and newcomers queue behind the accepting
    thread (README, Performance). _thread, the module threading is built on, starts a thread
    without waiting. Like a daemon thread, the new thread does not hold up the exit of the
    process.
    """
    _thread.start_new_thread(function, arguments)


def send_refusal(request, common_headers):
    """Tell a client we are full. Leaves the socket non-blocking, for discard_input()."""
    body = encode_json({"error": "The chat room is full right now. Please try again soon."})
    answer = http_answer(503, body, "application/json", [("Retry-After", str(BUSY_RETRY_AFTER))],
                         common_headers, close=True)
    try:
        request.setblocking(False)
        request.send(answer)  # a few hundred bytes: a new socket's buffer always has room
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


if __name__ == "__main__":
    main()
