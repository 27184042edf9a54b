"""Identify messages, in the shape Segment Engage sends them to Plotline."""

from __future__ import annotations

import hashlib
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
    """One Identify call, serialized once, and the change it carries."""

    change_id: int
    user_id: str
    encoded: bytes

    @classmethod
    def from_body(cls, change_id: int, user_id: str, body: dict[str, Any]) -> Message:
        """Wrap a message given as a dict."""
        return cls(change_id, user_id, orjson.dumps(body))

    @property
    def body(self) -> dict[str, Any]:
        """The message as a dict (parsed again on each call; not for hot paths)."""
        return orjson.loads(self.encoded)  # type: ignore[no-any-return]


def message_id(namespace: uuid.UUID, name: str) -> str:
    """`str(uuid.uuid5(namespace, name))`, without building UUID objects."""
    # SHA-1 because RFC 4122 names it for version 5 ids, not for security.
    name_hash = hashlib.sha1(namespace.bytes + name.encode(), usedforsecurity=False)
    digest = bytearray(name_hash.digest()[:16])
    digest[6] = (digest[6] & 0x0F) | 0x50  # version 5
    digest[8] = (digest[8] & 0x3F) | 0x80  # RFC 4122 variant
    text = digest.hex()
    return f"{text[:8]}-{text[8:12]}-{text[12:16]}-{text[16:20]}-{text[20:]}"


class MessageBuilder:
    """Build the Identify messages of one key in one run.

    Everything but the user, the value and the message id is the same for every
    message of a key, so it is serialized once and the rest is spliced in: a run
    builds a million messages without a dict or a UUID object per message.
    """

    def __init__(
        self,
        definition: Definition,
        computation_id: str,
        run_id: int,
        now: datetime,
        personas: Personas,
    ) -> None:
        self._namespace = uuid.UUID(computation_id)
        self._name_prefix = f"{run_id}:{definition.key}:"

        context_personas: dict[str, Any] = {
            "computation_class": definition.kind,
            "computation_key": definition.key,
            "computation_id": computation_id,
        }
        if personas.space_id:
            context_personas["space_id"] = personas.space_id
        if personas.namespace:
            context_personas["namespace"] = personas.namespace
        context = {
            "personas": context_personas,
            "library": {"name": "audience-sync", "version": __version__},
        }

        self._head = b'{"type":"identify","userId":'
        self._traits = b',"traits":{' + orjson.dumps(definition.key) + b":"
        self._middle = (
            b'},"context":'
            + orjson.dumps(context)
            + b',"integrations":'
            + orjson.dumps(INTEGRATIONS)
            + b',"messageId":"'
        )
        self._tail = b'","timestamp":' + orjson.dumps(iso_utc(now)) + b"}"

    def build(self, change_id: int, user_id: str, value_json: str) -> Message:
        """Build the message that sets the key to `value_json` for one user."""
        identifier = message_id(self._namespace, self._name_prefix + user_id)
        encoded = b"".join(
            (
                self._head,
                orjson.dumps(user_id),
                self._traits,
                value_json.encode(),
                self._middle,
                identifier.encode(),
                self._tail,
            )
        )
        return Message(change_id, user_id, encoded)
