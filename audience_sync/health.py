"""Health and metrics over HTTP for the daemon: `/healthz` and `/metrics`.

`/healthz` answers 200 while the latest run of every configured key succeeded within
its schedule (every + jitter, plus a grace period for the run itself), 503 otherwise,
with a JSON body saying which key is late or failing. It reads the store, so with
several daemons on one store every one of them reports on the work of all.

`/metrics` exposes Prometheus metrics of this process's runs.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import orjson
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from sqlalchemy import Engine

from audience_sync.config import Config
from audience_sync.runner import RunResult
from audience_sync.store import history
from audience_sync.store.leases import utcnow

logger = logging.getLogger(__name__)

# The *_created series double the output and nothing here needs them.
disable_created_metrics()  # type: ignore[no-untyped-call]


class Metrics:
    """The Prometheus metrics of one daemon, in a registry of their own."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.runs = Counter(
            "audience_sync_runs",
            "Runs finished, by final status.",
            ["status"],
            registry=self.registry,
        )
        self.changes = Counter(
            "audience_sync_changes",
            "Changes computed, by kind (entered, exited, changed).",
            ["kind"],
            registry=self.registry,
        )
        self.acknowledged = Counter(
            "audience_sync_messages_acknowledged",
            "Messages the destination acknowledged.",
            registry=self.registry,
        )
        self.rejected = Counter(
            "audience_sync_messages_rejected",
            "Messages the destination rejected for good.",
            registry=self.registry,
        )
        self.retries = Counter(
            "audience_sync_retries",
            "Requests sent again after a 429, 5xx or network error.",
            registry=self.registry,
        )
        self.duration = Histogram(
            "audience_sync_run_duration_seconds",
            "Wall time of a run.",
            buckets=(1, 5, 15, 60, 300, 900, 1800, 3600, 7200),
            registry=self.registry,
        )
        self.snapshot = Gauge(
            "audience_sync_snapshot_members",
            "Users the destination holds for a key, by key.",
            ["key"],
            registry=self.registry,
        )

    def observe(self, result: RunResult, seconds: float) -> None:
        """Count one finished run."""
        self.runs.labels(result.status).inc()
        self.duration.observe(seconds)
        self.retries.inc(result.retries)
        for key in result.keys:
            self.changes.labels("entered").inc(key.diff.entered)
            self.changes.labels("exited").inc(key.diff.exited)
            self.changes.labels("changed").inc(key.diff.changed)
            self.acknowledged.inc(key.acknowledged)
            self.rejected.inc(key.rejected)

    def observe_sizes(self, sizes: dict[str, int]) -> None:
        """Set the snapshot size of each key."""
        for key, size in sizes.items():
            self.snapshot.labels(key).set(size)


@dataclass(frozen=True)
class KeyHealth:
    """Whether one key's latest run succeeded recently enough."""

    key: str
    healthy: bool
    last_status: str | None
    last_synced_at: datetime | None

    def as_json(self) -> dict[str, Any]:
        """The JSON form in the /healthz body."""
        return {
            "healthy": self.healthy,
            "last_status": self.last_status,
            "last_synced_at": (
                self.last_synced_at.isoformat().replace("+00:00", "Z")
                if self.last_synced_at
                else None
            ),
        }


def check_health(engine: Engine, config: Config) -> list[KeyHealth]:
    """Judge every configured key by its latest run in the store."""
    every, jitter = config.schedule.every, config.schedule.jitter
    # A run takes time too: allow a whole interval on top before calling a key late.
    deadline = utcnow() - (every + jitter + max(every, timedelta(minutes=1)))
    with engine.connect() as connection:
        latest = {info.key: info for info in history.list_keys(connection)}

    found = []
    for definition in config.definitions:
        if not definition.enabled:
            continue  # paused or retired keys are not expected to sync
        info = latest.get(definition.key)
        status = info.last_status if info else None
        synced = info.last_synced_at if info else None
        healthy = status == "succeeded" and synced is not None and synced >= deadline
        found.append(KeyHealth(definition.key, healthy, status, synced))
    return found


class HealthServer:
    """A small HTTP server on a thread: /healthz and /metrics."""

    def __init__(
        self,
        host: str,
        port: int,
        health: Callable[[], list[KeyHealth]],
        metrics: Metrics,
    ) -> None:
        self._health = health
        self._metrics = metrics
        self._server = ThreadingHTTPServer((host, port), self._handler())
        self._server.daemon_threads = True
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="audience-sync-health", daemon=True
        )

    @property
    def address(self) -> tuple[str, int]:
        """The host and port the server listens on."""
        host, port = self._server.server_address[:2]
        return str(host), int(port)

    def start(self) -> None:
        """Serve in the background."""
        self._thread.start()
        logger.info("Serving /healthz and /metrics on %s:%d", *self.address)

    def stop(self) -> None:
        """Stop serving and close the socket."""
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        health, metrics = self._health, self._metrics

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                if self.path == "/healthz":
                    self._healthz()
                elif self.path == "/metrics":
                    self._reply(
                        200, CONTENT_TYPE_LATEST, generate_latest(metrics.registry)
                    )
                else:
                    self._reply(404, "text/plain", b"not found\n")

            def _healthz(self) -> None:
                try:
                    keys = health()
                except Exception as exc:
                    logger.warning("Health check could not read the store: %s", exc)
                    failure = {"status": "unhealthy", "error": "cannot read the store"}
                    self._reply(503, "application/json", orjson.dumps(failure))
                    return
                healthy = bool(keys) and all(k.healthy for k in keys)
                body: dict[str, Any] = {
                    "status": "ok" if healthy else "unhealthy",
                    "keys": {k.key: k.as_json() for k in keys},
                }
                self._reply(
                    200 if healthy else 503, "application/json", orjson.dumps(body)
                )

            def _reply(self, status: int, content_type: str, body: bytes) -> None:
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                logger.debug("health: " + format, *args)

        return Handler
