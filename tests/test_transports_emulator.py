"""Both HTTP transports against the emulator, a real server on 127.0.0.1."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from typing import Any

import httpx
import pytest
from pydantic import SecretStr

from audience_sync.config import (
    Definition,
    Personas,
    PlotlineDestination,
    SegmentDestination,
)
from audience_sync.emulator import Emulator
from audience_sync.errors import TerminalTransportError
from audience_sync.messages import Message, MessageBuilder
from audience_sync.transports.http import HttpTransport, basic_auth
from audience_sync.transports.plotline import PlotlineTransport
from audience_sync.transports.segment import SegmentTransport

WRITE_KEY = "wk-test"
API_KEY = "ak-test"
REFUSED = frozenset({"u0100", "u0500", "u1500"})

# Short timeouts and waits keep every test here well under a second or two.
FAST = {
    "connect_timeout": 1,
    "read_timeout": 1,
    "request_timeout": 2,
    "max_in_flight": 8,
    "max_attempts": 8,
    "max_retry_wait": 0.01,
    "retry_budget": 60,
}


def make_messages(count: int, run_id: int = 1) -> tuple[list[Message], dict[str, Any]]:
    """Messages setting a computed trait for `count` users, and the values they set."""
    definition = Definition(
        kind="trait",
        name="Orders",
        key="orders",
        source="warehouse",
        query="SELECT 1",
        explicit_key=False,
    )
    builder = MessageBuilder(
        definition, str(uuid.uuid4()), run_id, datetime.now(UTC), Personas()
    )
    values = {f"u{i:04d}": i % 7 for i in range(count)}
    messages = [
        builder.build(i, user, str(value))
        for i, (user, value) in enumerate(values.items())
    ]
    return messages, values


@pytest.fixture
def emulator() -> Iterator[Emulator]:
    """An emulator on a free port of 127.0.0.1, faults off."""
    with Emulator(write_key=WRITE_KEY, api_key=API_KEY, seed=3) as running:
        yield running


@pytest.fixture
def connect(emulator: Emulator) -> Iterator[Callable[..., HttpTransport]]:
    """Build a transport aimed at the emulator; close it before the emulator stops."""
    made: list[HttpTransport] = []

    def connect(kind: str, **settings: Any) -> HttpTransport:
        options = {**FAST, **settings}
        transport: HttpTransport
        if kind == "segment":
            options.setdefault("write_key", WRITE_KEY)
            transport = SegmentTransport(
                SegmentDestination(
                    transport="segment", endpoint=emulator.segment_endpoint, **options
                )
            )
        else:
            options.setdefault("api_key", API_KEY)
            transport = PlotlineTransport(
                PlotlineDestination(
                    transport="plotline", endpoint=emulator.plotline_endpoint, **options
                )
            )
        made.append(transport)
        return transport

    yield connect
    for transport in made:
        transport.close()


@pytest.mark.parametrize("kind", ["segment", "plotline"])
def test_every_fault_at_once_leaves_the_truth(
    kind: str, emulator: Emulator, connect: Callable[..., HttpTransport]
) -> None:
    """Through 429s, 500s, 400s, a hang and a drop, the emulator ends with the truth."""
    emulator.set_faults(
        rate_limit=0.2,
        retry_after=1,
        server_error=0.1,
        reject_users=REFUSED,
        hang_on=4,
        hang_for=3,
        drop_on=7,
    )
    transport = connect(kind)
    messages, values = make_messages(2000)

    deliveries = transport.send(messages, threading.Event())

    faulted = emulator.faulted
    refused = {m.user_id: d for m, d in zip(messages, deliveries, strict=True)}
    truth = {u: {"orders": v} for u, v in values.items() if u not in REFUSED}
    assert emulator.state == truth
    assert {u for u, d in refused.items() if d.status == "rejected"} == REFUSED
    assert {refused[u].status_code for u in REFUSED} == {400}
    assert all(
        d.status == "acknowledged" for u, d in refused.items() if u not in REFUSED
    )
    assert emulator.received == 1997
    assert emulator.duplicates == 0
    assert (faulted["hang"], faulted["drop"]) == (1, 1)
    assert faulted["429"] > 0
    assert faulted["500"] > 0
    assert transport.requests == emulator.requests
    assert transport.rate_limited == faulted["429"]
    assert transport.retries == sum(faulted[k] for k in ("429", "500", "hang", "drop"))
    assert (transport.acknowledged, transport.rejected) == (1997, 3)


@pytest.mark.parametrize("kind", ["segment", "plotline"])
def test_retry_after_dates_are_obeyed(
    kind: str, emulator: Emulator, connect: Callable[..., HttpTransport]
) -> None:
    """429s whose Retry-After is an HTTP date are waited out and delivered."""
    emulator.set_faults(rate_limit=0.5, retry_after=1, retry_after_date=True)
    transport = connect(kind)
    messages, values = make_messages(50)

    deliveries = transport.send(messages, threading.Event())

    assert {d.status for d in deliveries} == {"acknowledged"}
    assert emulator.state == {u: {"orders": v} for u, v in values.items()}
    assert transport.rate_limited == emulator.faulted["429"] > 0


@pytest.mark.parametrize("kind", ["segment", "plotline"])
def test_a_wrong_key_stops_the_run(
    kind: str, emulator: Emulator, connect: Callable[..., HttpTransport]
) -> None:
    """The emulator's 401 makes the transport raise, and nothing is recorded."""
    key = "write_key" if kind == "segment" else "api_key"
    transport = connect(kind, **{key: "not-the-key"})

    with pytest.raises(TerminalTransportError) as raised:
        transport.send(make_messages(20)[0], threading.Event())

    assert "not-the-key" not in str(raised.value)
    assert emulator.received == 0
    assert emulator.faulted["401"] >= 1


def test_later_messages_win(
    connect: Callable[..., HttpTransport], emulator: Emulator
) -> None:
    """A user's trait ends with the value of the message that arrived last."""
    transport = connect("plotline")
    first, _ = make_messages(3, run_id=1)
    transport.send(first, threading.Event())
    builder = MessageBuilder(
        Definition("trait", "Orders", "orders", "warehouse", "SELECT 1", False),
        str(uuid.uuid4()),
        2,
        datetime.now(UTC),
        Personas(),
    )

    transport.send([builder.build(9, "u0001", "42")], threading.Event())

    assert emulator.state == {
        "u0000": {"orders": 0},
        "u0001": {"orders": 42},
        "u0002": {"orders": 2},
    }


def test_a_batch_without_plotline_enabled_is_refused(emulator: Emulator) -> None:
    """The segment endpoint refuses a batch whose message does not enable Plotline."""
    messages, _ = make_messages(2)
    bodies = [dict(m.body) for m in messages]
    bodies[1]["integrations"] = {"All": True}

    with httpx.Client(headers={"Authorization": basic_auth_for(WRITE_KEY)}) as client:
        response = client.post(
            emulator.segment_endpoint + "/v1/batch", json={"batch": bodies}
        )

    assert response.status_code == 400
    assert response.json()["message"] == "batch[1]: integrations.Plotline must be true"
    assert emulator.received == 0


def test_a_message_with_two_traits_is_refused(emulator: Emulator) -> None:
    """The plotline endpoint refuses a message whose traits have two keys."""
    messages, _ = make_messages(1)
    body = {**messages[0].body, "traits": {"a": 1, "b": 2}}

    with httpx.Client(headers={"Authorization": basic_auth_for(API_KEY)}) as client:
        response = client.post(emulator.plotline_endpoint, json=body)

    assert response.status_code == 400
    assert "exactly one key" in response.json()["message"]
    assert emulator.state == {}


def test_the_command_line_serves_until_terminated() -> None:
    """`python -m audience_sync.emulator --port 0` serves on 127.0.0.1 until SIGTERM."""
    process = subprocess.Popen(
        [sys.executable, "-m", "audience_sync.emulator", "--port", "0"],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout is not None
        banner = process.stdout.readline()
        process.send_signal(signal.SIGTERM)
        summary, _ = process.communicate(timeout=10)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()

    assert banner.startswith("Segment at http://127.0.0.1:")
    assert "/plotline" in banner
    assert "0 requests" in summary
    assert process.returncode == 0


def basic_auth_for(key: str) -> str:
    """The Authorization header for a key, as the transports send it."""
    return basic_auth(SecretStr(key))
