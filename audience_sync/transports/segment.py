"""The Segment transport: Identify messages in batches to the HTTP Tracking API.

Segment takes at most 500 KB per batch request and 32 KB per message, and forwards each
message to Plotline because the message enables it in its `integrations` object.
"""

from __future__ import annotations

import functools
import random
import threading
import time
from collections.abc import Sequence
from datetime import UTC, datetime

import httpx

from audience_sync.config import SegmentDestination
from audience_sync.messages import Message, iso_utc
from audience_sync.transports.base import Delivery
from audience_sync.transports.http import (
    Clock,
    HttpTransport,
    Job,
    Sleep,
    wait_or_stop,
)

BATCH_PATH = "/v1/batch"
BATCH_LIMIT = 500_000  # bytes of one request body, under Segment's 500 KB
MESSAGE_LIMIT = 32 * 1024  # bytes of one message, Segment's 32 KB

# The body is `{"batch":[m1,m2,...],"sentAt":"2024-01-01T00:00:00.000Z"}`; this is
# everything but the messages and the commas between them.
_HEAD = b'{"batch":['
_SENT_AT = len(b'],"sentAt":"') + len(b"2024-01-01T00:00:00.000Z") + len(b'"}')
_OVERHEAD = len(_HEAD) + _SENT_AT


def batch_body(encoded: Sequence[bytes]) -> bytes:
    """Wrap encoded messages in a batch body, stamped with the time it is sent."""
    sent_at = iso_utc(datetime.now(UTC)).encode()
    return _HEAD + b",".join(encoded) + b'],"sentAt":"' + sent_at + b'"}'


def pack(sizes: Sequence[int], limit: int = BATCH_LIMIT) -> list[list[int]]:
    """Group message indices, in order, so that each batch body stays under `limit`."""
    batches: list[list[int]] = []
    current: list[int] = []
    size = _OVERHEAD
    for index, length in enumerate(sizes):
        extra = length + (1 if current else 0)  # the comma before it
        if current and size + extra >= limit:
            batches.append(current)
            current, size, extra = [], _OVERHEAD, length
        current.append(index)
        size += extra
    if current:
        batches.append(current)
    return batches


class SegmentTransport(HttpTransport):
    """POST messages to `{endpoint}/v1/batch` in batches under 500 KB.

    A batch refused whole (a 4xx other than 401/403/404/405/408/429) is split in
    halves until the refused messages are alone, so the rest of it is delivered.
    """

    name = "segment"

    def __init__(
        self,
        destination: SegmentDestination,
        *,
        http_transport: httpx.BaseTransport | None = None,
        clock: Clock = time.monotonic,
        sleep: Sleep = wait_or_stop,
        rng: random.Random | None = None,
    ) -> None:
        super().__init__(
            destination,
            destination.endpoint + BATCH_PATH,
            destination.write_key,
            http_transport=http_transport,
            clock=clock,
            sleep=sleep,
            rng=rng,
        )

    def _jobs(
        self, messages: Sequence[Message], deliveries: list[Delivery]
    ) -> list[Job]:
        encoded = [message.encoded for message in messages]

        # Segment refuses a message over 32 KB whatever happens, so it is not sent.
        fits: list[int] = []
        for index, data in enumerate(encoded):
            if len(data) > MESSAGE_LIMIT:
                deliveries[index] = Delivery(
                    "rejected",
                    None,
                    f"the message is {len(data)} bytes, over Segment's 32 KB limit",
                )
            else:
                fits.append(index)

        batches = pack([len(encoded[i]) for i in fits])
        return [
            functools.partial(
                self._deliver,
                [fits[i] for i in batch],
                [encoded[fits[i]] for i in batch],
            )
            for batch in batches
        ]

    def _deliver(
        self, indices: list[int], encoded: list[bytes], stop: threading.Event
    ) -> list[tuple[int, Delivery]]:
        """Send one batch; when it is refused whole, send each half on its own."""
        answer = self._post(lambda: batch_body(encoded), stop)
        if answer.outcome != "rejected" or len(indices) == 1:
            delivery = answer.delivery()
            return [(index, delivery) for index in indices]

        half = len(indices) // 2
        return self._deliver(indices[:half], encoded[:half], stop) + self._deliver(
            indices[half:], encoded[half:], stop
        )
