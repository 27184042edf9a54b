"""A stand-in for Segment's Tracking API and for Plotline, on 127.0.0.1 only.

It answers like the real services would, records what it was told, and can be asked to
misbehave, so that tests and benchmarks can check the transports end to end:

- `POST /v1/batch`: Segment's batch endpoint. Basic auth with the write key; the body is
  `{"batch": [...], "sentAt": "..."}`, at most 500 KB, each message at most 32 KB and
  with `integrations.Plotline` true. One bad message refuses the whole batch (400).
- `POST /plotline`: Plotline directly. Basic auth with the API key; one message a body.

A message must be an Identify call: `type` "identify", a string `userId`, `traits` with
exactly one key, a string `messageId` and an ISO 8601 `timestamp` with a zone.

    with Emulator(write_key="wk", api_key="ak") as emulator:
        emulator.set_faults(rate_limit=0.2, reject_users=frozenset({"u_7"}))
        ...  # send to emulator.segment_endpoint or emulator.plotline_endpoint
        assert emulator.state["u_1"] == {"vip": True}

A request that meets a fault records nothing, so `state` is exactly what was
acknowledged. From the command line: `python -m audience_sync.emulator --port 8765`.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import contextlib
import dataclasses
import email.utils
import hmac
import logging
import random
import signal
import socket
import sys
import threading
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import FrameType, TracebackType
from typing import Any

import orjson

logger = logging.getLogger(__name__)

HOST = "127.0.0.1"
SEGMENT_PATH = "/v1/batch"
PLOTLINE_PATH = "/plotline"
BATCH_LIMIT = 500 * 1024
MESSAGE_LIMIT = 32 * 1024
BODY_LIMIT = 16 * 1024 * 1024  # larger bodies are refused unread


@dataclass(frozen=True)
class Faults:
    """How the emulator misbehaves; every fault is off by default.

    Request numbers count every request the emulator receives, from 1.
    """

    rate_limit: float = 0.0  # fraction of requests answered 429
    retry_after: float = 1.0  # seconds a 429 asks the client to wait
    retry_after_date: bool = False  # give Retry-After as an HTTP date, not seconds
    server_error: float = 0.0  # fraction of requests answered 500
    reject_users: frozenset[str] = frozenset()  # requests with these users get 400
    hang_on: int | None = None  # this request waits `hang_for` s, then gets 503
    hang_for: float = 5.0
    drop_on: int | None = None  # this request's connection closes unanswered


@dataclass(frozen=True)
class _Reply:
    status: int
    body: dict[str, Any]
    headers: tuple[tuple[str, str], ...] = ()


_OK = _Reply(200, {"success": True})


class Emulator:
    """A Segment and Plotline emulator in a background thread on 127.0.0.1."""

    def __init__(
        self,
        write_key: str = "wk",
        api_key: str = "ak",
        *,
        port: int = 0,
        seed: int = 0,
        faults: Faults | None = None,
    ) -> None:
        self._keys = {SEGMENT_PATH: write_key, PLOTLINE_PATH: api_key}
        self._port = port
        self._faults = faults or Faults()
        # Seeded so a test's faults fall the same way on every run.
        self._random = random.Random(seed)  # noqa: S311
        self._lock = threading.Lock()
        self._closing = threading.Event()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

        self._requests = 0
        self._received = 0
        self._state: dict[str, dict[str, Any]] = {}
        self._message_ids: Counter[str] = Counter()
        self._faulted: Counter[str] = Counter()

    def __repr__(self) -> str:
        return f"Emulator(url={self.url!r})" if self._server else "Emulator()"

    # -- life cycle ---------------------------------------------------------------

    def start(self) -> Emulator:
        """Start listening on 127.0.0.1 and serving in a background thread."""
        self._closing.clear()
        self._server = _Server(self, self._port)
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.05},
            name="emulator",
        )
        self._thread.start()
        return self

    def close(self) -> None:
        """Stop serving, hang up on every client and join every thread."""
        if self._server is None or self._thread is None:
            return

        # Wake hanging requests first, so the server can be joined without delay.
        self._closing.set()
        self._server.shutdown()
        self._server.hang_up()
        self._server.server_close()
        self._thread.join()
        self._server = None
        self._thread = None

    def __enter__(self) -> Emulator:
        return self.start()

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    # -- where to send -------------------------------------------------------------

    @property
    def url(self) -> str:
        """The base URL, which is also the Segment endpoint."""
        if self._server is None:
            raise RuntimeError("the emulator is not running")
        return f"http://{HOST}:{self._server.server_address[1]}"

    @property
    def segment_endpoint(self) -> str:
        """What to configure as a segment destination's endpoint."""
        return self.url

    @property
    def plotline_endpoint(self) -> str:
        """What to configure as a plotline destination's endpoint."""
        return self.url + PLOTLINE_PATH

    # -- faults --------------------------------------------------------------------

    @property
    def faults(self) -> Faults:
        """The faults in force."""
        with self._lock:
            return self._faults

    def set_faults(self, **changes: Any) -> None:
        """Change some faults (fields of Faults), safely while requests arrive."""
        with self._lock:
            self._faults = dataclasses.replace(self._faults, **changes)

    # -- what it received ----------------------------------------------------------

    @property
    def state(self) -> dict[str, dict[str, Any]]:
        """Each user's traits, as the acknowledged messages left them."""
        with self._lock:
            return {user: dict(traits) for user, traits in self._state.items()}

    @property
    def received(self) -> int:
        """How many messages were acknowledged."""
        with self._lock:
            return self._received

    @property
    def requests(self) -> int:
        """How many requests arrived, faulted or not."""
        with self._lock:
            return self._requests

    @property
    def message_ids(self) -> Counter[str]:
        """How many times each messageId was acknowledged."""
        with self._lock:
            return Counter(self._message_ids)

    @property
    def duplicates(self) -> int:
        """How many acknowledged messages repeated a messageId seen before."""
        with self._lock:
            return self._received - len(self._message_ids)

    @property
    def faulted(self) -> Counter[str]:
        """Requests answered other than 200, by kind: 429, 500, 400, hang, drop..."""
        with self._lock:
            return Counter(self._faulted)

    # -- answering -----------------------------------------------------------------

    def _answer(
        self, path: str, authorization: str | None, body: bytes
    ) -> _Reply | None:
        """Decide the reply to one request; None means hang up without one."""
        with self._lock:
            self._requests += 1
            number = self._requests
            faults = self._faults
            fault = self._draw_fault(faults, number)

        if path not in self._keys:
            return self._refuse("404", 404, f"no such path {path}")
        if fault == "drop":
            self._count("drop")
            return None
        if fault == "hang":
            self._count("hang")
            if self._closing.wait(faults.hang_for):
                return None
            return _Reply(503, {"message": "the emulator hung on purpose"})
        if not _authorized(authorization, self._keys[path]):
            return self._refuse("401", 401, "the key is not valid")
        if fault == "429":
            self._count("429")
            return _Reply(429, {"message": "rate limited"}, _retry_after(faults))
        if fault == "500":
            self._count("500")
            return _Reply(500, {"message": "internal error"})

        if path == SEGMENT_PATH and len(body) > BATCH_LIMIT:
            return self._refuse("413", 413, "the batch is larger than 500 KB")
        try:
            document = orjson.loads(body)
        except orjson.JSONDecodeError:
            return self._refuse("400", 400, "the body is not JSON")

        messages, problem = _messages(document, segment=path == SEGMENT_PATH)
        if problem is None:
            refused = [
                m["userId"] for m in messages if m["userId"] in faults.reject_users
            ]
            if refused:
                problem = f"the user {refused[0]} is not accepted"
        if problem is not None:
            return self._refuse("400", 400, problem)

        with self._lock:
            for message in messages:
                self._state.setdefault(message["userId"], {}).update(message["traits"])
                self._message_ids[message["messageId"]] += 1
            self._received += len(messages)
        return _OK

    def _draw_fault(self, faults: Faults, number: int) -> str | None:
        if faults.drop_on == number:
            return "drop"
        if faults.hang_on == number:
            return "hang"
        if faults.rate_limit and self._random.random() < faults.rate_limit:
            return "429"
        if faults.server_error and self._random.random() < faults.server_error:
            return "500"
        return None

    def _count(self, kind: str) -> None:
        with self._lock:
            self._faulted[kind] += 1

    def _refuse(self, kind: str, status: int, message: str) -> _Reply:
        self._count(kind)
        return _Reply(status, {"success": False, "message": message})


def _authorized(header: str | None, key: str) -> bool:
    """Check Basic auth whose user is the key and whose password is empty."""
    scheme, _, token = (header or "").partition(" ")
    if scheme.lower() != "basic":
        return False
    try:
        user, _, _password = base64.b64decode(token, validate=True).partition(b":")
    except (binascii.Error, ValueError):
        return False
    return hmac.compare_digest(user, key.encode())


def _retry_after(faults: Faults) -> tuple[tuple[str, str], ...]:
    if faults.retry_after_date:
        moment = datetime.now(UTC) + timedelta(seconds=faults.retry_after)
        return (("Retry-After", email.utils.format_datetime(moment, usegmt=True)),)
    return (("Retry-After", f"{faults.retry_after:g}"),)


def _messages(document: Any, *, segment: bool) -> tuple[list[Any], str | None]:
    """Take the messages out of a body, or say what is wrong with it."""
    if not segment:
        return [document], _problem(document, segment=False)

    if not isinstance(document, dict) or not isinstance(document.get("batch"), list):
        return [], "the body must be an object with a batch list"
    batch: list[Any] = document["batch"]
    if not batch:
        return [], "the batch is empty"
    if "sentAt" in document and not isinstance(document["sentAt"], str):
        return [], "sentAt must be a string"
    for index, message in enumerate(batch):
        problem = _problem(message, segment=True)
        if problem is not None:
            return [], f"batch[{index}]: {problem}"
    return batch, None


def _problem(message: Any, *, segment: bool) -> str | None:
    """Say what is wrong with one Identify message, or None."""
    if not isinstance(message, dict):
        return "a message must be an object"
    if message.get("type") != "identify":
        return "type must be identify"
    if not isinstance(message.get("userId"), str) or not message["userId"]:
        return "userId must be a non-empty string"
    traits = message.get("traits")
    if not isinstance(traits, dict) or len(traits) != 1:
        return "traits must be an object with exactly one key"
    if not isinstance(message.get("messageId"), str) or not message["messageId"]:
        return "messageId must be a non-empty string"
    if not _is_zoned_time(message.get("timestamp")):
        return "timestamp must be an ISO 8601 time with a zone"

    if segment:
        integrations = message.get("integrations")
        if (
            not isinstance(integrations, dict)
            or integrations.get("Plotline") is not True
        ):
            return "integrations.Plotline must be true"
        if len(orjson.dumps(message)) > MESSAGE_LIMIT:
            return "the message is larger than 32 KB"
    return None


def _is_zoned_time(value: Any) -> bool:
    if not isinstance(value, str):
        return False
    try:
        return datetime.fromisoformat(value).tzinfo is not None
    except ValueError:
        return False


class _Handler(BaseHTTPRequestHandler):
    """Reads one request at a time off a keep-alive connection and answers it."""

    protocol_version = "HTTP/1.1"
    # Headers and body go out in two writes; without this, Nagle's algorithm holds the
    # body back for the client's delayed ACK.
    disable_nagle_algorithm = True
    server: _Server

    def do_POST(self) -> None:
        """Answer a POST to one of the emulated endpoints."""
        length = self.headers.get("Content-Length")
        if length is None or not length.isdigit():
            self._reply(_Reply(411, {"message": "Content-Length is required"}))
            return
        if int(length) > BODY_LIMIT:
            self.close_connection = True
            self._reply(_Reply(413, {"message": "the body is too large"}))
            return
        body = self.rfile.read(int(length))

        reply = self.server.emulator._answer(
            self.path, self.headers.get("Authorization"), body
        )
        if reply is None:
            self.close_connection = True
            return
        self._reply(reply)

    def _reply(self, reply: _Reply) -> None:
        payload = orjson.dumps(reply.body)
        self.send_response(reply.status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        for name, value in reply.headers:
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, format: str, *args: Any) -> None:
        """Log each request at DEBUG only; a benchmark sends a great many."""
        logger.debug(format, *args)


class _Server(ThreadingHTTPServer):
    """A thread per connection, every thread joined on close."""

    daemon_threads = False
    block_on_close = True
    request_queue_size = 512

    def __init__(self, emulator: Emulator, port: int) -> None:
        self.emulator = emulator
        self._connections: set[socket.socket] = set()
        self._connections_lock = threading.Lock()
        super().__init__((HOST, port), _Handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        """Remember the connection, so that close can hang up on it."""
        with self._connections_lock:
            self._connections.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request: Any) -> None:
        """Forget a connection once its thread is done with it."""
        with self._connections_lock:
            self._connections.discard(request)
        super().shutdown_request(request)

    def hang_up(self) -> None:
        """Shut every open connection, so that threads waiting on idle ones end."""
        with self._connections_lock:
            connections = list(self._connections)
        for connection in connections:
            # A connection the client closed already cannot be shut down again.
            with contextlib.suppress(OSError):
                connection.shutdown(socket.SHUT_RDWR)

    def handle_error(self, request: Any, client_address: Any) -> None:
        """Ignore clients that hung up first (they timed out); log anything else."""
        if isinstance(sys.exc_info()[1], OSError):
            return
        logger.exception("The emulator failed to answer a request")


def main(argv: Sequence[str] | None = None) -> None:
    """Run the emulator until Ctrl-C or SIGTERM."""
    parser = argparse.ArgumentParser(
        prog="python -m audience_sync.emulator",
        description="Emulate Segment (/v1/batch) and Plotline (/plotline) on "
        "127.0.0.1.",
    )
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port")
    parser.add_argument("--write-key", default="wk", help="Segment's write key")
    parser.add_argument("--api-key", default="ak", help="Plotline's API key")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rate-limit", type=float, default=0.0, metavar="FRACTION")
    parser.add_argument("--retry-after", type=float, default=1.0, metavar="SECONDS")
    parser.add_argument("--retry-after-date", action="store_true")
    parser.add_argument("--server-error", type=float, default=0.0, metavar="FRACTION")
    parser.add_argument("--reject-user", action="append", default=[], metavar="ID")
    args = parser.parse_args(argv)

    faults = Faults(
        rate_limit=args.rate_limit,
        retry_after=args.retry_after,
        retry_after_date=args.retry_after_date,
        server_error=args.server_error,
        reject_users=frozenset(args.reject_user),
    )
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    with Emulator(
        args.write_key, args.api_key, port=args.port, seed=args.seed, faults=faults
    ) as emulator:
        print(
            f"Segment at {emulator.segment_endpoint}, Plotline at "
            f"{emulator.plotline_endpoint}; Ctrl-C stops",
            flush=True,
        )
        while not stop.wait(0.5):
            pass
        print(
            f"{emulator.requests} requests, {emulator.received} messages, "
            f"{len(emulator.state)} users, {emulator.duplicates} duplicates",
            flush=True,
        )


if __name__ == "__main__":
    main()
