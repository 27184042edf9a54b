"""Identify messages: their shape and their ids."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime

import orjson
import pytest

from audience_sync.config import Definition, Personas
from audience_sync.messages import MessageBuilder, message_id

COMPUTATION_ID = "16b7e0ff-cb3a-45b2-bbc5-4349e7283ada"


def builder(kind: str = "audience", personas: Personas | None = None) -> MessageBuilder:
    definition = Definition(kind, "VIP", "vip", "w", "SELECT 1", False)  # type: ignore[arg-type]
    return MessageBuilder(
        definition,
        COMPUTATION_ID,
        7,
        datetime(2026, 3, 1, 12, 30, tzinfo=UTC),
        personas or Personas(),
    )


@pytest.mark.parametrize("name", ["7:vip:u1", "1:k:ÜSER é", "", "x" * 300])
def test_message_ids_are_the_uuid5_of_run_key_and_user(name: str) -> None:
    """The fast id is exactly Python's uuid5 of the same name."""
    namespace = uuid.UUID(COMPUTATION_ID)

    assert message_id(namespace, name) == str(uuid.uuid5(namespace, name))


def test_spliced_message_equals_the_documented_shape() -> None:
    """The serialized message parses to the Engage Identify shape."""
    message = builder(personas=Personas(space_id="spa_1", namespace="ns")).build(
        42, 'u"1', "true"
    )

    assert message.change_id == 42
    assert orjson.loads(message.encoded) == {
        "type": "identify",
        "userId": 'u"1',
        "traits": {"vip": True},
        "context": {
            "personas": {
                "computation_class": "audience",
                "computation_key": "vip",
                "computation_id": COMPUTATION_ID,
                "space_id": "spa_1",
                "namespace": "ns",
            },
            "library": {
                "name": "audience-sync",
                "version": message.body["context"]["library"]["version"],
            },
        },
        "integrations": {"All": False, "Plotline": True},
        "messageId": str(uuid.uuid5(uuid.UUID(COMPUTATION_ID), '7:vip:u"1')),
        "timestamp": "2026-03-01T12:30:00.000Z",
    }


def test_trait_values_keep_their_json_type() -> None:
    """A computed trait's value goes out as the JSON value it was stored as."""
    build = builder(kind="trait").build

    assert build(1, "u", "12.5").body["traits"] == {"vip": 12.5}
    assert build(1, "u", '"gold"').body["traits"] == {"vip": "gold"}
    assert build(1, "u", "null").body["traits"] == {"vip": None}
    assert (
        build(1, "u", "null").body["context"]["personas"]["computation_class"]
        == "trait"
    )
