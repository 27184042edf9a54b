"""The Plotline transport: each Identify message POSTed on its own to Plotline.

Plotline publishes no server-side API reference; this follows the contract by which
Segment delivers events to partner destinations: one JSON message per request, to the
configured endpoint, with the API key as the Basic auth user.
"""

from __future__ import annotations

import functools
import random
import threading
import time
from collections.abc import Sequence

import httpx

from audience_sync.config import PlotlineDestination
from audience_sync.messages import Message
from audience_sync.transports.base import Delivery
from audience_sync.transports.http import (
    Clock,
    HttpTransport,
    Job,
    Sleep,
    wait_or_stop,
)


class PlotlineTransport(HttpTransport):
    """POST each message as its own JSON body to the endpoint, exactly as configured."""

    name = "plotline"

    def __init__(
        self,
        destination: PlotlineDestination,
        *,
        http_transport: httpx.BaseTransport | None = None,
        clock: Clock = time.monotonic,
        sleep: Sleep = wait_or_stop,
        rng: random.Random | None = None,
    ) -> None:
        super().__init__(
            destination,
            destination.endpoint,
            destination.api_key,
            http_transport=http_transport,
            clock=clock,
            sleep=sleep,
            rng=rng,
        )

    def _jobs(
        self, messages: Sequence[Message], deliveries: list[Delivery]
    ) -> list[Job]:
        return [
            functools.partial(self._deliver, index, message.encoded)
            for index, message in enumerate(messages)
        ]

    def _deliver(
        self, index: int, body: bytes, stop: threading.Event
    ) -> list[tuple[int, Delivery]]:
        """Send one message."""
        return [(index, self._post(lambda: body, stop).delivery())]
