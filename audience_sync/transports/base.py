"""What every transport promises the run that drives it."""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

from audience_sync.messages import Message

DeliveryStatus = Literal["acknowledged", "rejected", "pending"]


@dataclass(frozen=True)
class Delivery:
    """What became of one message.

    `acknowledged`: the destination took it (a 2xx, or the file's fsync).
    `rejected`: the destination refused it for good; `status_code` and `reason` say why.
    `pending`: its fate is unknown or it was never sent; the next run's diff sends the
    change again, with the truth as it is then.
    """

    status: DeliveryStatus
    status_code: int | None = None
    reason: str | None = None


ACKNOWLEDGED = Delivery("acknowledged")
PENDING = Delivery("pending")


class Transport(Protocol):
    """Sends messages and reports, for each one, whether it was acknowledged."""

    name: str

    def send(
        self, messages: Sequence[Message], stop: threading.Event
    ) -> list[Delivery]:
        """Deliver a batch; return one Delivery per message, in the same order.

        A transport stops retrying when `stop` is set and reports what it has not
        delivered as pending. It raises TransportError only when nothing more can be
        sent in this run (the destination is unreachable, credentials are refused).
        """
        ...

    def close(self) -> None:
        """Release connections and files."""
        ...
