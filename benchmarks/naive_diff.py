"""The audience diff a user would write by hand, as a yardstick for audience-sync.

It reads the previous membership from the JSON file it wrote on its last run, reads
the current members from a SQLite source, diffs the two as Python sets, appends one
Identify message per change to a JSON Lines file, writes the new membership back, and
prints `{"members": ..., "entered": ..., "exited": ...}`. Everything is held in memory,
nothing is fsynced, and a crash between the two writes loses or repeats changes: the
usual shortcuts of a script like this.

    python benchmarks/naive_diff.py --source source.db --query "SELECT user_id FROM t" \
        --key vip --snapshot snapshot.json --out messages.jsonl
"""

from __future__ import annotations

import argparse
import json
import sqlite3
import sys
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any


def identify(key: str, user_id: str, value: bool, timestamp: str) -> dict[str, Any]:
    """One Identify message setting the audience trait of one user."""
    return {
        "type": "identify",
        "userId": user_id,
        "traits": {key: value},
        "context": {
            "personas": {"computation_class": "audience", "computation_key": key}
        },
        "integrations": {"All": False, "Plotline": True},
        "messageId": str(uuid.uuid4()),
        "timestamp": timestamp,
    }


def read_previous(snapshot: Path) -> set[str]:
    """The members written on the previous run, or none on the first."""
    if not snapshot.exists():
        return set()
    with snapshot.open(encoding="utf-8") as handle:
        return set(json.load(handle))


def read_current(source: Path, query: str) -> set[str]:
    """The members the source query returns now."""
    connection = sqlite3.connect(source)
    try:
        return {row[0] for row in connection.execute(query)}
    finally:
        connection.close()


def main(argv: Sequence[str] | None = None) -> None:
    """Diff the source against the last snapshot and write the changes."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", type=Path, required=True, help="SQLite file")
    parser.add_argument("--query", required=True, help="returns user_id")
    parser.add_argument("--key", required=True, help="the trait name")
    parser.add_argument("--snapshot", type=Path, required=True, help="JSON file")
    parser.add_argument("--out", type=Path, required=True, help="JSON Lines file")
    args = parser.parse_args(argv)

    previous = read_previous(args.snapshot)
    current = read_current(args.source, args.query)
    entered = current - previous
    exited = previous - current

    timestamp = datetime.now(UTC).isoformat()
    with args.out.open("a", encoding="utf-8") as out:
        for user_id in entered:
            out.write(json.dumps(identify(args.key, user_id, True, timestamp)) + "\n")
        for user_id in exited:
            out.write(json.dumps(identify(args.key, user_id, False, timestamp)) + "\n")

    with args.snapshot.open("w", encoding="utf-8") as handle:
        json.dump(list(current), handle)

    json.dump(
        {"members": len(current), "entered": len(entered), "exited": len(exited)},
        sys.stdout,
    )
    print()


if __name__ == "__main__":
    main()
