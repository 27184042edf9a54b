"""The HTTP transports' retry, rate limit, batching and credential rules, on mocks."""

from __future__ import annotations

import base64
import logging
import random
import re
import threading
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from typing import Any

import httpx
import orjson
import pytest

from audience_sync import __version__
from audience_sync.config import PlotlineDestination, SegmentDestination
from audience_sync.errors import TerminalTransportError
from audience_sync.messages import Message
from audience_sync.transports import make_transport
from audience_sync.transports.http import (
    HttpTransport,
    RetryBudget,
    retry_after_seconds,
)
from audience_sync.transports.plotline import PlotlineTransport
from audience_sync.transports.segment import SegmentTransport

KEY = "s3cret-key-do-not-show"
ENDPOINT = "http://127.0.0.1:9"  # never contacted: every request goes to a mock
NOW = datetime(2024, 1, 1, 12, 0, 0, tzinfo=UTC)

Answer = Callable[[httpx.Request], httpx.Response]


class FakeTime:
    """A monotonic clock that moves only when the transport sleeps."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.sleeps: list[float] = []
        self.on_sleep: Callable[[threading.Event], None] | None = None

    def clock(self) -> float:
        return self.now

    def sleep(self, seconds: float, stop: threading.Event) -> None:
        self.sleeps.append(seconds)
        self.now += seconds
        if self.on_sleep is not None:
            self.on_sleep(stop)


class Destination:
    """A mock destination that plays answers in order and repeats the last one."""

    def __init__(self, *answers: Answer) -> None:
        self.answers = list(answers)
        self.requests: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        answer = self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]
        return answer(request)


def status(code: int, retry_after: str | None = None, **kwargs: Any) -> Answer:
    """Answer with a status code, and a Retry-After header when given."""
    headers = {"Retry-After": retry_after} if retry_after is not None else {}
    return lambda request: httpx.Response(code, headers=headers, **kwargs)


def fail(error: type[httpx.TransportError]) -> Answer:
    """Answer by raising a network error."""

    def answer(request: httpx.Request) -> httpx.Response:
        raise error("simulated", request=request)

    return answer


def make_messages(count: int, padding: int = 0) -> list[Message]:
    """Identify messages for users u0, u1, ...; `padding` bytes make them bigger."""
    messages = []
    for i in range(count):
        body: dict[str, Any] = {
            "type": "identify",
            "userId": f"u{i}",
            "traits": {"vip": True},
            "integrations": {"All": False, "Plotline": True},
            "messageId": f"m{i}",
            "timestamp": "2024-01-01T00:00:00.000Z",
        }
        if padding:
            body["context"] = {"padding": "x" * padding}
        messages.append(Message.from_body(i, f"u{i}", body))
    return messages


def batch_users(request: httpx.Request) -> list[str]:
    """The users in a Segment batch request."""
    return [m["userId"] for m in orjson.loads(request.content)["batch"]]


@pytest.fixture
def fake_time() -> FakeTime:
    """A clock and sleep that never really wait."""
    return FakeTime()


@pytest.fixture
def build(fake_time: FakeTime) -> Iterator[Callable[..., HttpTransport]]:
    """Build a segment or plotline transport on a mock destination; close it after."""
    made: list[HttpTransport] = []

    def build(kind: str, destination: Destination, **settings: Any) -> HttpTransport:
        settings.setdefault("max_in_flight", 1)
        options: dict[str, Any] = {
            "http_transport": httpx.MockTransport(destination),
            "clock": fake_time.clock,
            "sleep": fake_time.sleep,
            "rng": random.Random(7),
        }
        transport: HttpTransport
        if kind == "segment":
            transport = SegmentTransport(
                SegmentDestination(
                    transport="segment", endpoint=ENDPOINT, write_key=KEY, **settings
                ),
                **options,
            )
        else:
            transport = PlotlineTransport(
                PlotlineDestination(
                    transport="plotline",
                    endpoint=ENDPOINT + "/v1/identify",
                    api_key=KEY,
                    **settings,
                ),
                **options,
            )
        made.append(transport)
        return transport

    yield build
    for transport in made:
        transport.close()


def statuses(deliveries: list[Any]) -> list[str]:
    return [d.status for d in deliveries]


# -- Retry-After ------------------------------------------------------------------


def test_retry_after_in_seconds_is_read() -> None:
    """A Retry-After of seconds asks for that many seconds."""
    seconds = retry_after_seconds("7", NOW)

    assert seconds == 7.0


def test_retry_after_as_http_date_is_read() -> None:
    """A Retry-After HTTP date asks for the time until that date."""
    seconds = retry_after_seconds("Mon, 01 Jan 2024 12:00:30 GMT", NOW)

    assert seconds == 30.0


def test_retry_after_in_the_past_means_no_wait() -> None:
    """A Retry-After date already past asks for no wait at all."""
    seconds = retry_after_seconds("Mon, 01 Jan 2024 11:00:00 GMT", NOW)

    assert seconds == 0.0


def test_unreadable_retry_after_says_nothing() -> None:
    """A Retry-After that is neither seconds nor a date is ignored."""
    values = ["soon", "", "-5", "nan", "Mon, 99 Foo 2024"]

    assert [retry_after_seconds(v, NOW) for v in values] == [None] * 5


def test_429_waits_what_retry_after_asks(build: Any, fake_time: FakeTime) -> None:
    """A 429 is retried after the seconds its Retry-After asks for."""
    destination = Destination(status(429, "3"), status(200))
    transport = build("plotline", destination)

    deliveries = transport.send(make_messages(1), threading.Event())

    assert statuses(deliveries) == ["acknowledged"]
    assert fake_time.sleeps == [3.0]
    assert (transport.requests, transport.retries, transport.rate_limited) == (2, 1, 1)


def test_429_with_a_past_date_is_retried_at_once(
    build: Any, fake_time: FakeTime
) -> None:
    """A 429 whose Retry-After date is past is retried without waiting."""
    destination = Destination(status(429, "Thu, 01 Jan 2015 00:00:00 GMT"), status(200))
    transport = build("plotline", destination)

    deliveries = transport.send(make_messages(1), threading.Event())

    assert statuses(deliveries) == ["acknowledged"]
    assert fake_time.sleeps == [0.0]


def test_429_with_garbage_retry_after_backs_off(
    build: Any, fake_time: FakeTime
) -> None:
    """A 429 with an unreadable Retry-After waits a first backoff (0 to 0.5 s)."""
    destination = Destination(status(429, "later please"), status(200))
    transport = build("plotline", destination)

    deliveries = transport.send(make_messages(1), threading.Event())

    assert statuses(deliveries) == ["acknowledged"]
    assert len(fake_time.sleeps) == 1
    assert 0.0 <= fake_time.sleeps[0] <= 0.5


def test_a_long_wait_is_capped_at_max_retry_wait(
    build: Any, fake_time: FakeTime
) -> None:
    """A Retry-After longer than max_retry_wait waits max_retry_wait only."""
    destination = Destination(
        status(429, "120"), status(429, "Fri, 01 Jan 2100 00:00:00 GMT"), status(200)
    )
    transport = build("plotline", destination, max_retry_wait=2)

    transport.send(make_messages(1), threading.Event())

    assert fake_time.sleeps == [2.0, 2.0]


def test_429s_do_not_use_up_attempts(build: Any) -> None:
    """Five 429s in a row still end in delivery when max_attempts is 2."""
    destination = Destination(*[status(429, "1")] * 5, status(200))
    transport = build("plotline", destination, max_attempts=2)

    deliveries = transport.send(make_messages(1), threading.Event())

    assert statuses(deliveries) == ["acknowledged"]
    assert (transport.requests, transport.rate_limited) == (6, 5)


# -- server errors and network trouble -------------------------------------------


def test_server_errors_are_retried_up_to_max_attempts_then_pending(
    build: Any,
) -> None:
    """A 503 is tried max_attempts times in all, then the message is pending."""
    destination = Destination(status(503))
    transport = build("plotline", destination, max_attempts=3)

    deliveries = transport.send(make_messages(1), threading.Event())

    assert statuses(deliveries) == ["pending"]
    assert (transport.requests, transport.retries) == (3, 2)


def test_network_trouble_and_408_are_retried(build: Any) -> None:
    """A 408, a refused connect, a read timeout and a dropped connection are retried."""
    destination = Destination(
        status(408),
        fail(httpx.ConnectError),
        fail(httpx.ReadTimeout),
        fail(httpx.RemoteProtocolError),
        status(200),
    )
    transport = build("plotline", destination, max_attempts=5)

    deliveries = transport.send(make_messages(1), threading.Event())

    assert statuses(deliveries) == ["acknowledged"]
    assert (transport.requests, transport.retries) == (5, 4)


def test_backoff_is_exponential_with_full_jitter(
    build: Any, fake_time: FakeTime
) -> None:
    """The n-th backoff is drawn from 0 to 0.5 * 2^(n-1) seconds, capped."""
    destination = Destination(status(500))
    transport = build("plotline", destination, max_attempts=7, max_retry_wait=4)

    transport.send(make_messages(1), threading.Event())

    ceilings = [0.5, 1.0, 2.0, 4.0, 4.0, 4.0]
    assert len(fake_time.sleeps) == 6
    assert all(0 <= s <= c for s, c in zip(fake_time.sleeps, ceilings, strict=True))


def test_a_slow_body_past_request_timeout_is_retried(
    build: Any, fake_time: FakeTime
) -> None:
    """A response still streaming after request_timeout counts as a timeout."""

    def slow(request: httpx.Request) -> httpx.Response:
        def chunks() -> Iterator[bytes]:
            yield b"{"
            fake_time.now += 11  # as if the next chunk came 11 s later
            yield b"}"

        return httpx.Response(200, content=chunks())

    destination = Destination(slow, status(200))
    transport = build("plotline", destination, request_timeout=10)

    deliveries = transport.send(make_messages(1), threading.Event())

    assert statuses(deliveries) == ["acknowledged"]
    assert (transport.requests, transport.retries) == (2, 1)


# -- the retry budget --------------------------------------------------------------


def test_spent_budget_leaves_the_rest_pending(build: Any, fake_time: FakeTime) -> None:
    """Once a wait no longer fits the budget, every unsent message is pending."""
    destination = Destination(status(429, "0.4"))
    transport = build("plotline", destination, retry_budget=1)

    deliveries = transport.send(make_messages(3), threading.Event())

    assert statuses(deliveries) == ["pending"] * 3
    assert fake_time.sleeps == [0.4, 0.4]
    assert transport.requests == 3


def test_after_the_budget_is_spent_the_next_send_raises(build: Any) -> None:
    """A send after the budget ran out raises without making a request."""
    destination = Destination(status(429, "5"))
    transport = build("plotline", destination, retry_budget=1)
    transport.send(make_messages(1), threading.Event())
    made = transport.requests

    with pytest.raises(TerminalTransportError, match="retry budget"):
        transport.send(make_messages(1), threading.Event())

    assert transport.requests == made


def test_overlapping_waits_count_once_against_the_budget() -> None:
    """Two workers waiting at the same moment spend the budget once."""
    budget = RetryBudget(10, clock=lambda: 100.0)

    budget.draw(4)
    budget.draw(4)
    budget.draw(6)

    assert budget.spent == 6
    assert not budget.exhausted


# -- rejections and credentials ---------------------------------------------------


def test_a_refused_batch_is_split_until_the_bad_messages_are_alone(
    build: Any,
) -> None:
    """A 400 batch is halved until only u3 and u7 are rejected; the rest land."""
    accepted: list[str] = []

    def validate(request: httpx.Request) -> httpx.Response:
        users = batch_users(request)
        if {"u3", "u7"} & set(users):
            return httpx.Response(400, json={"message": "bad user in batch"})
        accepted.extend(users)
        return httpx.Response(200, json={"success": True})

    transport = build("segment", Destination(validate))

    deliveries = transport.send(make_messages(10), threading.Event())

    assert statuses(deliveries) == [
        "rejected" if i in (3, 7) else "acknowledged" for i in range(10)
    ]
    assert deliveries[3].status_code == 400
    assert deliveries[3].reason == "bad user in batch"
    assert sorted(accepted) == sorted(f"u{i}" for i in range(10) if i not in (3, 7))
    assert transport.rejected == 2


def test_other_4xx_is_rejected_with_a_short_reason(build: Any) -> None:
    """A 422 rejects the message, with the body's message trimmed to 200 chars."""
    destination = Destination(status(422, json={"message": "bad trait " * 100}))
    transport = build("plotline", destination)

    deliveries = transport.send(make_messages(1), threading.Event())

    assert statuses(deliveries) == ["rejected"]
    assert deliveries[0].status_code == 422
    assert deliveries[0].reason.startswith("bad trait bad trait")
    assert len(deliveries[0].reason) <= 200
    assert transport.requests == 1


def test_bad_credentials_raise_without_showing_the_key(build: Any) -> None:
    """A 401 raises TerminalTransportError whose message and repr hide the key."""
    transport = build("segment", Destination(status(401)))

    with pytest.raises(TerminalTransportError, match="credentials") as raised:
        transport.send(make_messages(2), threading.Event())

    assert KEY not in str(raised.value)
    assert KEY not in repr(transport)
    assert base64.b64encode(f"{KEY}:".encode()).decode() not in repr(transport)


def test_after_bad_credentials_nothing_more_is_sent(build: Any) -> None:
    """Once a 403 has been seen, later sends raise at once."""
    transport = build("plotline", Destination(status(403)))
    with pytest.raises(TerminalTransportError):
        transport.send(make_messages(3), threading.Event())

    with pytest.raises(TerminalTransportError):
        transport.send(make_messages(3), threading.Event())

    assert transport.requests == 1


def test_a_wrong_endpoint_raises(build: Any) -> None:
    """A 404 means the endpoint is wrong: nothing can be sent, so send raises."""
    transport = build("plotline", Destination(status(404)))

    with pytest.raises(TerminalTransportError, match="endpoint"):
        transport.send(make_messages(1), threading.Event())


# -- batching ---------------------------------------------------------------------


def test_an_oversized_message_is_rejected_without_a_request(build: Any) -> None:
    """A message over 32 KB is rejected by the segment transport, never sent."""
    destination = Destination(status(200))
    transport = build("segment", destination)

    deliveries = transport.send(make_messages(1, padding=33_000), threading.Event())

    assert statuses(deliveries) == ["rejected"]
    assert "32 KB" in (deliveries[0].reason or "")
    assert destination.requests == []


def test_batches_stay_under_500_kb(build: Any) -> None:
    """3,000 messages of 1 KB go out in order, in bodies under 500,000 bytes."""
    destination = Destination(status(200, json={"success": True}))
    transport = build("segment", destination)

    deliveries = transport.send(make_messages(3000, padding=900), threading.Event())

    sizes = [len(r.content) for r in destination.requests]
    users = [u for r in destination.requests for u in batch_users(r)]
    assert statuses(deliveries) == ["acknowledged"] * 3000
    assert len(sizes) > 1
    assert max(sizes) < 500_000
    assert users == [f"u{i}" for i in range(3000)]


# -- stopping -----------------------------------------------------------------------


def test_stop_set_before_sending_leaves_everything_pending(build: Any) -> None:
    """With stop already set, nothing is sent and every message is pending."""
    destination = Destination(status(200))
    transport = build("plotline", destination)
    stop = threading.Event()
    stop.set()

    deliveries = transport.send(make_messages(3), stop)

    assert statuses(deliveries) == ["pending"] * 3
    assert destination.requests == []


def test_stop_during_a_wait_leaves_the_rest_pending(
    build: Any, fake_time: FakeTime
) -> None:
    """Stop set while waiting out a 429 ends the send without another request."""
    destination = Destination(status(429, "1"), status(200))
    transport = build("plotline", destination)
    fake_time.on_sleep = lambda stop: stop.set()

    deliveries = transport.send(make_messages(2), threading.Event())

    assert statuses(deliveries) == ["pending", "pending"]
    assert len(destination.requests) == 1


# -- the wire -------------------------------------------------------------------


def test_segment_sends_batches_with_auth_agent_and_sent_at(build: Any) -> None:
    """Segment gets POST /v1/batch with Basic auth, our User-Agent and a sentAt."""
    destination = Destination(status(200))
    transport = build("segment", destination)

    transport.send(make_messages(2), threading.Event())

    request = destination.requests[0]
    body = orjson.loads(request.content)
    assert request.method == "POST"
    assert str(request.url) == ENDPOINT + "/v1/batch"
    assert request.headers["Authorization"] == (
        "Basic " + base64.b64encode(f"{KEY}:".encode()).decode()
    )
    assert request.headers["User-Agent"] == f"audience-sync/{__version__}"
    assert request.headers["Content-Type"] == "application/json"
    assert [m["userId"] for m in body["batch"]] == ["u0", "u1"]
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", body["sentAt"])


def test_plotline_posts_each_message_to_the_endpoint(build: Any) -> None:
    """Plotline gets one message per POST, at the endpoint exactly, with its key."""
    destination = Destination(status(200))
    transport = build("plotline", destination)
    messages = make_messages(2)

    transport.send(messages, threading.Event())

    assert [str(r.url) for r in destination.requests] == [ENDPOINT + "/v1/identify"] * 2
    assert [orjson.loads(r.content) for r in destination.requests] == [
        m.body for m in messages
    ]
    assert destination.requests[0].headers["Authorization"] == (
        "Basic " + base64.b64encode(f"{KEY}:".encode()).decode()
    )
    assert destination.requests[0].headers["User-Agent"].startswith("audience-sync/")


# -- pacing ---------------------------------------------------------------------


def test_rate_limit_spaces_requests(build: Any, fake_time: FakeTime) -> None:
    """With rate_limit 4, requests go out a quarter of a second apart."""
    transport = build("plotline", Destination(status(200)), rate_limit=4)

    transport.send(make_messages(3), threading.Event())

    assert fake_time.sleeps == [0.25, 0.25]


def test_requests_run_max_in_flight_at_a_time(build: Any) -> None:
    """Four workers send four requests at once, and never a fifth alongside them."""
    lock = threading.Lock()
    active = 0
    peak = 0
    together = threading.Barrier(4)

    def count(request: httpx.Request) -> httpx.Response:
        nonlocal active, peak
        with lock:
            active += 1
            peak = max(peak, active)
        # Twenty requests meet here in five groups of four, which proves that four
        # were in flight together; a slower transport breaks the barrier.
        together.wait(timeout=5)
        with lock:
            active -= 1
        return httpx.Response(200)

    transport = build("plotline", Destination(count), max_in_flight=4)

    deliveries = transport.send(make_messages(20), threading.Event())

    assert statuses(deliveries) == ["acknowledged"] * 20
    assert peak == 4


def test_retried_trouble_is_logged_once_per_kind(
    build: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """Three 429s and two 500s give two warnings, one per kind, with counts."""
    destination = Destination(
        status(429, "0"),
        status(200),
        status(429, "0"),
        status(500),
        status(200),
        status(429, "0"),
        status(500),
        status(200),
    )
    transport = build("plotline", destination)

    with caplog.at_level(logging.WARNING, logger="audience_sync.transports.http"):
        transport.send(make_messages(3), threading.Event())

    lines = [r.getMessage() for r in caplog.records]
    assert lines == [
        "plotline: 3 requests met HTTP 429 (rate limited) and were retried",
        "plotline: 2 requests met HTTP 500 and were retried",
    ]


def test_make_transport_builds_the_http_transports() -> None:
    """make_transport gives a SegmentTransport and a PlotlineTransport."""
    segment = make_transport(
        SegmentDestination(transport="segment", endpoint=ENDPOINT, write_key=KEY)
    )
    plotline = make_transport(
        PlotlineDestination(transport="plotline", endpoint=ENDPOINT, api_key=KEY)
    )
    segment.close()
    plotline.close()

    assert isinstance(segment, SegmentTransport)
    assert isinstance(plotline, PlotlineTransport)
