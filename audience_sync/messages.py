"""Identify messages, in the shape Segment Engage sends them to Plotline."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import orjson

from audience_sync import __version__
from audience_sync.config import Definition, Personas

# Message ids are uuid5 names under this namespace, so that the same run, key and user
# always give the same id and a destination can drop a duplicate delivery.
MESSAGE_NAMESPACE = uuid.UUID("5b0e8d8a-3c1e-4f43-9a57-2f4e7c3b9d10")

INTEGRATIONS = {"All": False, "Plotline": True}


def iso_utc(moment: datetime) -> str:
    """Format a timezone-aware time as ISO 8601 UTC with milliseconds and a Z."""
    if moment.tzinfo is None:
        raise ValueError("times must be timezone-aware")
    text = moment.astimezone(UTC).isoformat(timespec="milliseconds")
    return text.replace("+00:00", "Z")


@dataclass(frozen=True)
class Message:
    """One Identify call and the change it carries."""

    change_id: int
    user_id: str
    body: dict[str, Any]


class MessageBuilder:
    """Build the Identify messages of one key in one run."""

    def __init__(
        self,
        definition: Definition,
        computation_id: str,
        run_id: int,
        now: datetime,
        personas: Personas,
    ) -> None:
        self._key = definition.key
        self._run_id = run_id
        self._namespace = uuid.UUID(computation_id)
        self._timestamp = iso_utc(now)

        # Everything but the user and the value is the same for every message of the
        # key, so it is built once.
        context_personas: dict[str, Any] = {
            "computation_class": definition.kind,
            "computation_key": definition.key,
            "computation_id": computation_id,
        }
        if personas.space_id:
            context_personas["space_id"] = personas.space_id
        if personas.namespace:
            context_personas["namespace"] = personas.namespace
        self._context = {
            "personas": context_personas,
            "library": {"name": "audience-sync", "version": __version__},
        }

    def build(self, change_id: int, user_id: str, value_json: str) -> Message:
        """Build the message that sets the key to `value_json` for one user."""
        body = {
            "type": "identify",
            "userId": user_id,
            "traits": {self._key: orjson.loads(value_json)},
            "context": self._context,
            "integrations": INTEGRATIONS,
            "messageId": str(
                uuid.uuid5(self._namespace, f"{self._run_id}:{self._key}:{user_id}")
            ),
            "timestamp": self._timestamp,
        }
        return Message(change_id=change_id, user_id=user_id, body=body)
