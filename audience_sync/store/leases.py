"""Leases: at most one process syncs a key at a time, across every process.

A lease is a row in the store with an owner and an expiry. Taking one is a single
`INSERT ... ON CONFLICT DO UPDATE ... WHERE <free>` statement, atomic on PostgreSQL and
on SQLite (whose writers are serialised by BEGIN IMMEDIATE). The holder renews it from
a heartbeat thread; a holder that dies stops renewing, and its lease expires. A holder
on this same machine whose process is gone is recognised at once.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from sqlalchemy import Engine, or_, select, update
from sqlalchemy.dialects import postgresql, sqlite

from audience_sync.errors import LockHeldError
from audience_sync.store.schema import leases, runs

logger = logging.getLogger(__name__)

DEFAULT_TTL = timedelta(seconds=90)


def utcnow() -> datetime:
    """The current time, timezone-aware, in UTC."""
    return datetime.now(UTC)


@dataclass(frozen=True)
class Owner:
    """Who holds a lease: a host, a process, and a token unique to this process."""

    host: str
    pid: int
    token: str

    def __str__(self) -> str:
        return f"{self.host}:{self.pid}:{self.token}"

    @classmethod
    def current(cls) -> Owner:
        """The owner that stands for this process."""
        return cls(socket.gethostname(), os.getpid(), uuid.uuid4().hex[:8])

    @classmethod
    def parse(cls, text: str) -> Owner | None:
        """Read an owner back from the store; None for a string of another shape."""
        host, _, rest = text.rpartition(":")
        host, _, pid = host.rpartition(":")
        if not host or not pid.isdigit():
            return None
        return cls(host, int(pid), rest)

    def describe(self) -> str:
        """Say who this is in words."""
        return f"process {self.pid} on {self.host}"


def is_gone(owner_text: str) -> bool:
    """Tell whether an owner is a process on this host that no longer runs."""
    owner = Owner.parse(owner_text)
    if owner is None or owner.host != socket.gethostname():
        return False
    if owner.pid == os.getpid():
        return owner_text != str(_PROCESS_OWNER)
    try:
        os.kill(owner.pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


_PROCESS_OWNER = Owner.current()


def process_owner() -> Owner:
    """The one owner of every lease this process takes."""
    return _PROCESS_OWNER


class Leases:
    """Take, renew and release the leases of keys in one store."""

    def __init__(self, engine: Engine, ttl: timedelta = DEFAULT_TTL) -> None:
        self._engine = engine
        self.ttl = ttl
        self.owner = str(process_owner())
        self._held: dict[str, int | None] = {}
        self._lock = threading.Lock()

    def _insert(self) -> postgresql.Insert | sqlite.Insert:
        if self._engine.dialect.name == "postgresql":
            return postgresql.insert(leases)
        return sqlite.insert(leases)

    def acquire(self, key: str, run_id: int | None, wait: float = 0.0) -> None:
        """Take the lease of a key, waiting up to `wait` seconds for its holder.

        Raises:
            LockHeldError: another live process still holds it; the message names it.
        """
        deadline = time.monotonic() + wait
        while True:
            try:
                self._try_acquire(key, run_id)
                return
            except LockHeldError:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise
                time.sleep(min(0.5, left))

    def _try_acquire(self, key: str, run_id: int | None) -> None:
        now = utcnow()
        with self._engine.begin() as connection:
            holder = connection.execute(
                select(leases.c.owner, leases.c.expires_at).where(leases.c.key == key)
            ).first()
            # A holder on this host whose process has died can be replaced at once.
            dead_owner = (
                holder.owner if holder and is_gone(holder.owner) else self.owner
            )

            statement = self._insert().values(
                key=key,
                owner=self.owner,
                run_id=run_id,
                acquired_at=now,
                expires_at=now + self.ttl,
            )
            taken = connection.execute(
                statement.on_conflict_do_update(
                    index_elements=["key"],
                    set_={
                        "owner": statement.excluded.owner,
                        "run_id": statement.excluded.run_id,
                        "acquired_at": statement.excluded.acquired_at,
                        "expires_at": statement.excluded.expires_at,
                    },
                    where=or_(
                        leases.c.expires_at < now,
                        leases.c.owner == self.owner,
                        leases.c.owner == dead_owner,
                    ),
                ).returning(leases.c.owner)
            ).first()

        if taken is None:
            if holder is None:
                # Another process took the key between our look and our insert.
                with self._engine.connect() as connection:
                    holder = connection.execute(
                        select(leases.c.owner, leases.c.expires_at).where(
                            leases.c.key == key
                        )
                    ).first()
            if holder is None:
                raise LockHeldError(f"{key!r} was being taken by another process")
            who = Owner.parse(holder.owner)
            raise LockHeldError(
                f"{key!r} is being synced by "
                f"{who.describe() if who else holder.owner} "
                f"(its lease runs until {holder.expires_at:%Y-%m-%d %H:%M:%S} UTC)"
            )
        with self._lock:
            self._held[key] = run_id

    def renew(self) -> list[str]:
        """Extend every lease this process holds; return the keys it has lost."""
        with self._lock:
            held = list(self._held)
        if not held:
            return []

        now = utcnow()
        lost = []
        with self._engine.begin() as connection:
            for key in held:
                result = connection.execute(
                    update(leases)
                    .where(leases.c.key == key, leases.c.owner == self.owner)
                    .values(expires_at=now + self.ttl)
                )
                if result.rowcount == 0:
                    lost.append(key)
        return lost

    def release(self, key: str) -> None:
        """Give a lease back."""
        with self._lock:
            self._held.pop(key, None)
        with self._engine.begin() as connection:
            connection.execute(
                leases.delete().where(leases.c.key == key, leases.c.owner == self.owner)
            )


class Heartbeat:
    """A thread that renews leases and the run's heartbeat until it is stopped."""

    def __init__(
        self,
        engine: Engine,
        leases_: Leases,
        on_lost: Callable[[list[str]], None],
    ) -> None:
        self._engine = engine
        self._leases = leases_
        self.run_id: int | None = None
        self._on_lost = on_lost
        self._stopped = threading.Event()
        self._thread = threading.Thread(
            target=self._loop, name="audience-sync-heartbeat", daemon=True
        )

    def __enter__(self) -> Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stopped.set()
        self._thread.join()

    def _loop(self) -> None:
        interval = self._leases.ttl.total_seconds() / 3
        while not self._stopped.wait(interval):
            try:
                lost = self._leases.renew()
                run_id = self.run_id
                if run_id is not None:
                    with self._engine.begin() as connection:
                        connection.execute(
                            update(runs)
                            .where(runs.c.id == run_id)
                            .values(heartbeat_at=utcnow())
                        )
            except Exception:
                # The next beat tries again; a lease only lapses after a whole ttl.
                logger.warning("Could not renew leases; retrying", exc_info=True)
                continue
            if lost:
                logger.warning("Lost the lease of %s", ", ".join(lost))
                self._on_lost(lost)
