"""What the Segment and Plotline transports share.

One pooled keep-alive client, at most `max_in_flight` requests at a time (a thread pool
of that many workers), an optional rate limit, and the retry rules:

- 2xx: acknowledged.
- 429: wait what `Retry-After` asks (seconds or an HTTP date), or back off when it says
  nothing usable; these retries do not count against `max_attempts`.
- 5xx, 408 and network trouble (connect errors, timeouts, dropped connections): back
  off with full jitter and retry, up to `max_attempts` attempts; then pending.
- 401 and 403 (credentials), and answers that say the endpoint is wrong (3xx, 404,
  405): nothing more can be sent this run, so `send` raises TerminalTransportError.
- Any other 4xx: rejected for good, with the status code and the body's message.

Every wait (429s and backoff) draws from one retry budget per transport, which lives as
long as one run. When a wait no longer fits in it, the rest of the run is pending.
"""

from __future__ import annotations

import base64
import email.utils
import ipaddress
import logging
import math
import random
import re
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Literal
from urllib.parse import quote, urlsplit

import httpx
import orjson
from pydantic import SecretStr

from audience_sync import __version__
from audience_sync.config import HttpDestination
from audience_sync.errors import TerminalTransportError
from audience_sync.messages import Message
from audience_sync.transports.base import ACKNOWLEDGED, PENDING, Delivery

logger = logging.getLogger(__name__)

USER_AGENT = f"audience-sync/{__version__}"
BASE_BACKOFF = 0.5  # seconds; the first backoff is drawn from 0..BASE_BACKOFF
REASON_LIMIT = 200  # characters of a rejection's reason that are kept
BODY_LIMIT = 64 * 1024  # bytes of a response read; only its message is ever used

Clock = Callable[[], float]
Sleep = Callable[[float, threading.Event], object]

# A job delivers some of a send's messages and says what became of each, by index.
Job = Callable[[threading.Event], list[tuple[int, Delivery]]]


def wait_or_stop(seconds: float, stop: threading.Event) -> None:
    """Sleep for `seconds`, waking early when `stop` is set."""
    stop.wait(seconds)


def retry_after_seconds(value: str | None, now: datetime) -> float | None:
    """Read a Retry-After header: seconds to wait, or None when it says nothing usable.

    The header holds seconds or an HTTP date; a date in the past means no wait.
    """
    if value is None:
        return None
    text = value.strip()

    try:
        seconds = float(text)
    except ValueError:
        pass
    else:
        return seconds if math.isfinite(seconds) and seconds >= 0 else None

    try:
        moment = email.utils.parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError):
        return None
    # A date written with -0000 parses as naive; HTTP dates are always UTC.
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return max(0.0, (moment - now).total_seconds())


def full_jitter(failures: int, cap: float, rng: random.Random) -> float:
    """Exponential backoff with full jitter: uniform in 0..min(cap, base * 2^n)."""
    ceiling = min(cap, BASE_BACKOFF * 2 ** min(max(failures - 1, 0), 32))
    return rng.uniform(0.0, ceiling)


def rejection_reason(status_code: int, content: bytes) -> str:
    """Say in one short line why a destination refused a request."""
    text = ""
    try:
        data = orjson.loads(content)
    except orjson.JSONDecodeError:
        data = None

    # Segment and most JSON APIs put the explanation under one of these fields.
    if isinstance(data, dict):
        for field in ("message", "error", "reason", "detail"):
            value = data.get(field)
            if isinstance(value, str) and value.strip():
                text = value
                break
    elif content:
        text = content.decode("utf-8", errors="replace")

    text = " ".join(text.split()) or f"HTTP {status_code}"
    if len(text) > REASON_LIMIT:
        text = text[: REASON_LIMIT - 1] + "…"
    return text


def basic_auth(key: SecretStr) -> str:
    """Build the Authorization value Segment and Plotline expect: the key as user."""
    token = base64.b64encode(f"{key.get_secret_value()}:".encode()).decode("ascii")
    return f"Basic {token}"


def _is_loopback(url: str) -> bool:
    host = urlsplit(url).hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class RateLimiter:
    """Space requests at least 1/rate seconds apart, across threads."""

    def __init__(self, rate: float, clock: Clock, sleep: Sleep) -> None:
        self._interval = 1.0 / rate
        self._clock = clock
        self._sleep = sleep
        self._lock = threading.Lock()
        self._next = -math.inf

    def wait(self, stop: threading.Event) -> bool:
        """Wait for this request's turn; False when `stop` was set meanwhile."""
        with self._lock:
            now = self._clock()
            slot = max(now, self._next)
            self._next = slot + self._interval

        if slot > now:
            self._sleep(slot - now, stop)
        return not stop.is_set()


class RetryBudget:
    """The time one run may spend waiting before retries, shared by every worker.

    Waits that overlap (several workers backing off at once) count once: the budget
    measures how long the run is held up, not the sum of every thread's sleep.
    """

    def __init__(self, seconds: float, clock: Clock) -> None:
        self.seconds = seconds
        self.spent = 0.0
        self.exhausted = False
        self._clock = clock
        self._lock = threading.Lock()
        self._waiting_until = -math.inf

    def draw(self, seconds: float) -> bool:
        """Take a wait from the budget; False, now and from then on, if it won't fit."""
        with self._lock:
            if self.exhausted:
                return False

            now = self._clock()
            end = now + seconds
            extra = max(0.0, end - max(now, self._waiting_until))
            if self.spent + extra > self.seconds:
                self.exhausted = True
                return False

            self.spent += extra
            self._waiting_until = max(self._waiting_until, end)
            return True


@dataclass(frozen=True)
class Answer:
    """How one request ended, after its retries."""

    outcome: Literal["acknowledged", "rejected", "pending"]
    status_code: int | None = None
    reason: str | None = None

    def delivery(self) -> Delivery:
        """The Delivery each message of the request gets."""
        if self.outcome == "acknowledged":
            return ACKNOWLEDGED
        if self.outcome == "rejected":
            return Delivery("rejected", self.status_code, self.reason)
        return PENDING


_ACKNOWLEDGED = Answer("acknowledged")
_PENDING = Answer("pending")

# Network trouble another attempt may cure. UnsupportedProtocol and LocalProtocolError
# are mistakes on our side, so they are not here.
_RETRYABLE_ERRORS = (
    httpx.TimeoutException,
    httpx.NetworkError,
    httpx.RemoteProtocolError,
)


class HttpTransport:
    """Deliver messages over HTTP with pooling, concurrency, rate limit and retries.

    Subclasses say how messages become requests (`_jobs`); this class sends them.
    `requests`, `retries`, `rate_limited`, `acknowledged` and `rejected` count, over
    the transport's life (one run), requests made, retries scheduled, 429 answers,
    and messages acknowledged and rejected.
    """

    name = "http"

    def __init__(
        self,
        settings: HttpDestination,
        url: str,
        key: SecretStr,
        *,
        http_transport: httpx.BaseTransport | None = None,
        clock: Clock = time.monotonic,
        sleep: Sleep = wait_or_stop,
        rng: random.Random | None = None,
    ) -> None:
        self.url = url
        self.requests = 0
        self.retries = 0
        self.rate_limited = 0
        self.acknowledged = 0
        self.rejected = 0

        self._key = key
        self._max_attempts = settings.max_attempts
        self._max_wait = settings.max_retry_wait.total_seconds()
        self._request_timeout = settings.request_timeout.total_seconds()
        self._clock = clock
        self._sleep = sleep
        # Jitter only spreads retries out; it needs no cryptographic strength.
        self._rng = rng or random.Random()  # noqa: S311
        self._budget = RetryBudget(settings.retry_budget.total_seconds(), clock)
        self._limiter = (
            RateLimiter(settings.rate_limit, clock, sleep)
            if settings.rate_limit
            else None
        )
        self._lock = threading.Lock()
        self._halted: TerminalTransportError | None = None
        self._trouble: Counter[str] = Counter()

        # No phase may outlast the whole-request deadline; the deadline itself is
        # checked while the body streams in (see _exchange).
        whole = self._request_timeout
        read = min(settings.read_timeout.total_seconds(), whole)
        connect = min(settings.connect_timeout.total_seconds(), whole)
        headers = {
            "Authorization": basic_auth(key),
            "User-Agent": USER_AGENT,
            "Content-Type": "application/json",
        }
        self._client = httpx.Client(
            headers=headers,
            timeout=httpx.Timeout(connect=connect, read=read, write=read, pool=whole),
            limits=httpx.Limits(
                max_connections=settings.max_in_flight,
                max_keepalive_connections=settings.max_in_flight,
            ),
            # A proxy from the environment must never see traffic meant for this host.
            trust_env=not _is_loopback(url),
            transport=http_transport,
        )
        self._pool = ThreadPoolExecutor(
            max_workers=settings.max_in_flight, thread_name_prefix=f"{self.name}-send"
        )

    def __repr__(self) -> str:
        return f"{type(self).__name__}(url={self.url!r})"

    # -- the Transport protocol ----------------------------------------------------

    def send(
        self, messages: Sequence[Message], stop: threading.Event
    ) -> list[Delivery]:
        """Deliver a batch; return one Delivery per message, in the same order."""
        self._raise_if_halted()

        deliveries = [PENDING] * len(messages)
        jobs = self._jobs(messages, deliveries)
        futures = [self._pool.submit(job, stop) for job in jobs]
        for future in futures:
            for index, delivery in future.result():
                deliveries[index] = delivery

        self._report_trouble()
        if self._halted is not None:
            raise TerminalTransportError(str(self._halted))
        with self._lock:
            self.acknowledged += sum(d.status == "acknowledged" for d in deliveries)
            self.rejected += sum(d.status == "rejected" for d in deliveries)
        return deliveries

    def close(self) -> None:
        """Wait for the workers and close the connection pool."""
        self._pool.shutdown(wait=True, cancel_futures=True)
        self._client.close()

    # -- what subclasses provide ---------------------------------------------------

    def _jobs(
        self, messages: Sequence[Message], deliveries: list[Delivery]
    ) -> list[Job]:
        """Split a send into jobs; may settle some deliveries without a request."""
        raise NotImplementedError

    # -- sending one request, with its retries -------------------------------------

    def _post(self, body: Callable[[], bytes], stop: threading.Event) -> Answer:
        """POST a body (rebuilt for each attempt) until it is answered for good."""
        failures = 0
        throttled = 0
        while True:
            if self._cannot_continue(stop):
                return _PENDING
            if self._limiter is not None and not self._limiter.wait(stop):
                return _PENDING
            if self._cannot_continue(stop):
                return _PENDING

            with self._lock:
                self.requests += 1
            try:
                status, retry_after, content = self._exchange(body())
            except _RETRYABLE_ERRORS as exc:
                failures += 1
                kind = type(exc).__name__
                wait = full_jitter(failures, self._max_wait, self._rng)
            except httpx.HTTPError as exc:
                self._halt(
                    f"{self.name} cannot send to {self.url}: {type(exc).__name__}"
                )
                return _PENDING
            else:
                if 200 <= status < 300:
                    return _ACKNOWLEDGED
                if status == 429:
                    throttled += 1
                    with self._lock:
                        self.rate_limited += 1
                    kind = "HTTP 429 (rate limited)"
                    wait = self._rate_limit_wait(retry_after, throttled)
                elif status == 408 or status >= 500:
                    failures += 1
                    kind = f"HTTP {status}"
                    wait = full_jitter(failures, self._max_wait, self._rng)
                elif status in (401, 403):
                    self._halt(
                        f"{self.name} refused the credentials ({status}); "
                        "check the configured key"
                    )
                    return _PENDING
                elif status < 200 or 300 <= status < 400 or status in (404, 405):
                    self._halt(
                        f"{self.name} answered {status} at {self.url}; "
                        "check the endpoint"
                    )
                    return _PENDING
                else:
                    return Answer(
                        "rejected",
                        status,
                        self._redact(rejection_reason(status, content)),
                    )

            if failures >= self._max_attempts:
                self._note(f"still failing after {self._max_attempts} attempts")
                return _PENDING
            if not self._budget.draw(wait):
                self._note("budget")
                return _PENDING

            self._note(kind)
            with self._lock:
                self.retries += 1
            self._sleep(wait, stop)

    def _exchange(self, content: bytes) -> tuple[int, str | None, bytes]:
        """Make one request; return its status, Retry-After and the body's start."""
        deadline = self._clock() + self._request_timeout
        with self._client.stream("POST", self.url, content=content) as response:
            received = bytearray()
            for chunk in response.iter_bytes():
                # Only the start of a body is ever used (for a rejection's reason).
                if len(received) < BODY_LIMIT:
                    received += chunk[: BODY_LIMIT - len(received)]
                if self._clock() > deadline:
                    raise httpx.ReadTimeout(
                        "the request took longer than request_timeout",
                        request=response.request,
                    )
            return (
                response.status_code,
                response.headers.get("Retry-After"),
                bytes(received),
            )

    def _rate_limit_wait(self, retry_after: str | None, throttled: int) -> float:
        """How long to wait after a 429, capped at max_retry_wait."""
        seconds = retry_after_seconds(retry_after, datetime.now(UTC))
        # A server that keeps saying "now" is not obeyed blindly: back off instead.
        if seconds is None or (seconds == 0 and throttled > 1):
            seconds = full_jitter(throttled, self._max_wait, self._rng)
        return min(seconds, self._max_wait)

    # -- stopping, and telling the operator ----------------------------------------

    def _cannot_continue(self, stop: threading.Event) -> bool:
        return stop.is_set() or self._halted is not None or self._budget.exhausted

    def _halt(self, message: str) -> None:
        with self._lock:
            if self._halted is None:
                self._halted = TerminalTransportError(message)
                # The run logs the error it gets from send; once is enough.
                logger.debug("%s", message)

    def _raise_if_halted(self) -> None:
        if self._halted is not None:
            raise TerminalTransportError(str(self._halted))
        if self._budget.exhausted:
            raise TerminalTransportError(
                f"{self.name} spent its retry budget of {self._budget.seconds:g} s; "
                "the remaining changes wait for the next run"
            )

    def _note(self, kind: str) -> None:
        with self._lock:
            self._trouble[kind] += 1

    def _report_trouble(self) -> None:
        """Log one line per kind of trouble this send met, then forget it."""
        with self._lock:
            trouble, self._trouble = self._trouble, Counter()

        budget = trouble.pop("budget", 0)
        for kind, count in sorted(trouble.items()):
            if kind.startswith("still failing"):
                logger.warning(
                    "%s: %d requests %s; their messages stay pending",
                    self.name,
                    count,
                    kind,
                )
            else:
                logger.warning(
                    "%s: %d requests met %s and were retried", self.name, count, kind
                )
        if budget:
            logger.warning(
                "%s: the retry budget of %g s is spent; the remaining changes "
                "wait for the next run",
                self.name,
                self._budget.seconds,
            )

    def _redact(self, text: str) -> str:
        """Remove the key from text a destination sent back, in case it echoes it."""
        secret = self._key.get_secret_value()
        if not secret:
            return text
        # Also the Authorization header's forms of it, should a server echo that:
        # base64 with or without padding, URL-encoded, in any case.
        token = base64.b64encode(f"{secret}:".encode()).decode()
        forms = {secret, token, token.rstrip("="), quote(token, safe=""), quote(secret)}
        pattern = "|".join(
            re.escape(form) for form in sorted(forms, key=len, reverse=True)
        )
        return re.sub(pattern, "***", text, flags=re.IGNORECASE)
