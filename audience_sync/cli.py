"""The `audience-sync` command line: run syncs and read their history.

Anything a user caused (a bad config, an unknown run, an unreachable store) ends in one
sentence on stderr and an exit code: 0 success, 1 a run finished with something failed
or pending, 2 usage or configuration error, 3 another process holds an audience's lease.
"""

from __future__ import annotations

import functools
import logging
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any, TypeVar

import click
import orjson
from rich.console import Console
from rich.table import Table
from sqlalchemy import Connection
from sqlalchemy.exc import SQLAlchemyError

from audience_sync import __version__
from audience_sync.config import Config, config_path, load_config
from audience_sync.declarations import DeclarationError, check_declaration
from audience_sync.durations import parse_duration
from audience_sync.errors import (
    EXIT_USAGE,
    AudienceSyncError,
    ConfigError,
    StoreError,
    UsageError,
)
from audience_sync.logs import LogFormat, setup_logging
from audience_sync.progress import BarProgress, LogProgress
from audience_sync.runner import RunOptions, RunResult, run_once
from audience_sync.scheduler import Daemon
from audience_sync.sources import ReadCounts, Sources
from audience_sync.store import history
from audience_sync.store import snapshot as snapshots
from audience_sync.store.database import open_store
from audience_sync.store.migrate import check_current, current_revision, head_revision
from audience_sync.store.migrate import upgrade as upgrade_store

logger = logging.getLogger(__name__)

F = TypeVar("F", bound=Callable[..., Any])

PREVIEW_ROWS = 20


def _console() -> Console:
    # Off a terminal, a wide console keeps tables on one line per row for logs.
    # No markup: user ids and error texts are data, and "[/x]" is a valid user id.
    console = Console(highlight=False, markup=False)
    if not console.is_terminal:
        console = Console(highlight=False, markup=False, width=160)
    return console


def handle_errors(function: F) -> F:
    """Turn our errors into one sentence and an exit code, never a traceback."""

    @functools.wraps(function)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return function(*args, **kwargs)
        except AudienceSyncError as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(exc.exit_code)
        except SQLAlchemyError as exc:
            reason = str(getattr(exc, "orig", None) or exc).splitlines()[0]
            click.echo(f"error: the store failed: {reason}", err=True)
            sys.exit(EXIT_USAGE)

    return wrapper  # type: ignore[return-value]


class Context:
    """What every command shares: where the config is, and a lazily loaded config."""

    def __init__(self, config_option: str | None) -> None:
        self.config_option = config_option
        self._config: Config | None = None

    @property
    def config(self) -> Config:
        """The validated config, loaded on first use."""
        if self._config is None:
            self._config = load_config(config_path(self.config_option))
        return self._config

    @contextmanager
    def read_store(self) -> Iterator[Connection]:
        """A read-only connection to a store at the current schema version."""
        engine = open_store(self.config.store_url.get_secret_value(), read_only=True)
        try:
            check_current(engine)
            with engine.connect() as connection:
                yield connection
        finally:
            engine.dispose()


pass_context = click.make_pass_decorator(Context)


def _parse_now(value: str | None) -> datetime:
    """Read --now: an ISO 8601 time, or a shift from the present such as +10d or -2h."""
    present = datetime.now(UTC)
    if value is None:
        return present
    if value[:1] in "+-" and value[1:2].isdigit():
        try:
            shift = parse_duration(value[1:])
        except ValueError:
            shift = None
        if shift is not None:
            try:
                return present + shift if value[0] == "+" else present - shift
            except OverflowError:
                raise UsageError(f"--now {value!r} is out of range") from None
    try:
        moment = datetime.fromisoformat(value)
        # The extremes of the calendar cannot move to UTC.
        moment.astimezone(UTC)
    except OverflowError:
        raise UsageError(f"--now {value!r} is out of range") from None
    except ValueError:
        raise UsageError(
            f"--now {value!r} is not an ISO 8601 time such as 2026-03-01T12:00:00Z "
            "or a shift such as +10d"
        ) from None
    # A time without an offset is read as UTC, the only zone audience-sync uses.
    return (
        moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)
    )


def _time(moment: datetime | None) -> str:
    return (
        "" if moment is None else moment.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S")
    )


def _dump(data: Any) -> None:
    click.echo(orjson.dumps(data, option=orjson.OPT_INDENT_2).decode())


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--config",
    "config_option",
    metavar="PATH",
    help="Config file [default: $AUDIENCE_SYNC_CONFIG, else ./config.yaml].",
)
@click.option(
    "--log-level",
    type=click.Choice(["debug", "info", "warning", "error"], case_sensitive=False),
    default=None,
    help="Log level on stderr [default: info for run, warning otherwise].",
)
@click.option(
    "--log-format",
    type=click.Choice(["text", "json"]),
    default="text",
    show_default=True,
    help="Log lines for people, or JSON lines for log shippers.",
)
@click.version_option(__version__, prog_name="audience-sync")
@click.pass_context
def cli(
    ctx: click.Context,
    config_option: str | None,
    log_level: str | None,
    log_format: LogFormat,
) -> None:
    """Keep Plotline user attributes in step with audiences in your SQL databases."""
    is_run = ctx.invoked_subcommand == "run"
    setup_logging(log_level or ("info" if is_run else "warning"), log_format)
    ctx.obj = Context(config_option)


# ---------------------------------------------------------------------------
# run
# ---------------------------------------------------------------------------


@cli.command()
@click.option("--run-now", is_flag=True, help="Run one sync now, then exit.")
@click.option(
    "--audience",
    "keys",
    multiple=True,
    metavar="KEY",
    help="Sync only this key (repeat for more).",
)
@click.option("--full", is_flag=True, help="Re-send the current value of every member.")
@click.option(
    "--dry-run", is_flag=True, help="Compute and print changes; send nothing."
)
@click.option("--force", is_flag=True, help="Send even when the collapse guard holds.")
@click.option("--now", "now_text", metavar="ISO8601", help="Reference time of the run.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@click.option(
    "--wait",
    type=click.FloatRange(min=0),
    default=0,
    show_default=True,
    metavar="SECONDS",
    help="With --run-now: wait this long for another process's lease.",
)
@click.option(
    "--health-port",
    type=click.IntRange(0, 65535),
    metavar="PORT",
    help="Daemon: serve /healthz and /metrics on this port.",
)
@click.option(
    "--health-host",
    default="127.0.0.1",
    show_default=True,
    help="Daemon: the address /healthz and /metrics listen on.",
)
@pass_context
@handle_errors
def run(
    context: Context,
    run_now: bool,
    keys: tuple[str, ...],
    full: bool,
    dry_run: bool,
    force: bool,
    now_text: str | None,
    as_json: bool,
    wait: float,
    health_port: int | None,
    health_host: str,
) -> None:
    """Sync audiences and traits: once with --run-now, else as a daemon."""
    if not run_now:
        one_shot = {
            "--audience": keys,
            "--full": full,
            "--dry-run": dry_run,
            "--force": force,
            "--now": now_text,
            "--json": as_json,
        }
        given = [name for name, value in one_shot.items() if value]
        if given:
            raise UsageError(f"{given[0]} works only with --run-now")
        daemon = Daemon(
            config_path(context.config_option),
            context.config,
            health_address=None if health_port is None else (health_host, health_port),
        )
        sys.exit(daemon.run_forever())

    options = RunOptions(
        now=_parse_now(now_text),
        keys=list(keys) or None,
        full=full,
        dry_run=dry_run,
        force=force,
        wait=wait,
    )
    config = context.config
    stop = threading.Event()
    err_console = Console(stderr=True, markup=False)
    with _stop_on_signals(stop):
        if err_console.is_terminal and not as_json:
            with BarProgress(err_console) as bars:
                result = run_once(config, options, progress=bars, stop=stop)
        else:
            with LogProgress() as progress:
                result = run_once(config, options, progress=progress, stop=stop)

    if as_json:
        _dump(_run_result_json(result))
    else:
        _print_run_result(_console(), result)
    for key in result.keys:
        if key.status == "locked":
            click.echo(f"error: {key.error}", err=True)
    sys.exit(result.exit_code)


@contextmanager
def _stop_on_signals(stop: threading.Event) -> Iterator[None]:
    """SIGTERM or SIGINT stops the run between batches; a second one stops at once."""

    def request_stop(signum: int, _frame: Any) -> None:
        if stop.is_set():
            raise KeyboardInterrupt
        logger.warning(
            "Received %s: finishing in-flight work, then stopping",
            signal.Signals(signum).name,
        )
        stop.set()

    previous = {
        signum: signal.signal(signum, request_stop)
        for signum in (signal.SIGTERM, signal.SIGINT)
    }
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def _run_result_json(result: RunResult) -> dict[str, Any]:
    return {
        "id": result.run_id,
        "now": result.now.isoformat().replace("+00:00", "Z"),
        "status": "dry-run" if result.dry_run else result.status,
        "audiences": [
            {
                "key": k.key,
                "kind": k.kind,
                "status": k.status,
                "full": k.full,
                **{
                    name: value
                    for name, value in k.counts().items()
                    if name not in ("sent",)
                },
                "error": k.error,
                **(
                    {
                        "changes": [
                            {
                                "user_id": user_id,
                                "kind": kind,
                                "old": orjson.loads(old),
                                "new": orjson.loads(new),
                            }
                            for user_id, kind, old, new in k.preview
                        ]
                    }
                    if result.dry_run
                    else {}
                ),
            }
            for k in result.keys
        ],
    }


def _print_run_result(console: Console, result: RunResult) -> None:
    if result.dry_run:
        title = f"Dry run at now={_time(result.now)} UTC (nothing sent or recorded)"
    elif result.run_id is None:
        title = f"Nothing was synced (now={_time(result.now)} UTC)"
    else:
        title = f"Run {result.run_id} {result.status} (now={_time(result.now)} UTC)"
    table = Table(title=title, title_justify="left")
    for column in ("key", "kind", "status", "members", "entered", "exited", "changed"):
        table.add_column(column, justify="right" if column in _NUMERIC else "left")
    if not result.dry_run:
        for column in ("acked", "rejected", "pending", "seconds"):
            table.add_column(column, justify="right")

    for k in result.keys:
        row = [
            k.key,
            k.kind,
            k.status,
            str(k.members),
            str(k.diff.entered),
            str(k.diff.exited),
            str(k.diff.changed),
        ]
        if not result.dry_run:
            row += [
                str(k.acknowledged),
                str(k.rejected),
                str(k.pending),
                f"{k.seconds:.1f}",
            ]
        table.add_row(*row)
    console.print(table)

    for k in result.keys:
        if k.error:
            console.print(f"{k.key}: {k.error}")
    if result.dry_run:
        for k in result.keys:
            if not k.preview:
                continue
            console.print(
                f"\nChanges of {k.key} (first {min(len(k.preview), PREVIEW_ROWS)}"
                f" of {k.diff.total}):"
            )
            preview = Table(show_header=True)
            for column in ("user_id", "kind", "old", "new"):
                preview.add_column(column)
            for user_id, kind, old, new in k.preview[:PREVIEW_ROWS]:
                preview.add_row(user_id, kind, old, new)
            console.print(preview)


_NUMERIC = {"members", "entered", "exited", "changed"}


# ---------------------------------------------------------------------------
# history, show, changes, members, audiences
# ---------------------------------------------------------------------------


def _known_key(connection: Connection, key: str) -> history.KeyInfo:
    """The store's record of a key, or a usage error listing the keys it knows."""
    known = {info.key: info for info in history.list_keys(connection)}
    if key not in known:
        raise UsageError(
            f"the store knows no key {key!r} "
            f"(known keys: {', '.join(sorted(known)) or 'none'})"
        )
    return known[key]


@cli.command("history")
@click.option(
    "--audience", "key", metavar="KEY", help="Only runs that synced this key."
)
@click.option("--limit", default=20, show_default=True, type=click.IntRange(min=1))
@click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
@pass_context
@handle_errors
def history_command(
    context: Context, key: str | None, limit: int, as_json: bool
) -> None:
    """List runs, newest first."""
    with context.read_store() as connection:
        if key is not None:
            _known_key(connection, key)
        found = history.list_runs(connection, key=key, limit=limit)

    if as_json:
        _dump([run_.as_json() for run_ in found])
        return

    table = Table(title="Runs (times in UTC)", title_justify="left")
    for column in ("run", "started", "now", "status", "keys"):
        table.add_column(column)
    for column in (
        "members",
        "entered",
        "exited",
        "changed",
        "acked",
        "rejected",
        "pending",
    ):
        table.add_column(column, justify="right")
    for run_ in found:
        keys = run_.audiences
        table.add_row(
            str(run_.id),
            _time(run_.started_at),
            _time(run_.now),
            run_.status,
            str(len(keys)),
            *(
                str(sum(getattr(k, name) for k in keys))
                for name in (
                    "members",
                    "entered",
                    "exited",
                    "changed",
                    "acknowledged",
                    "rejected",
                    "pending",
                )
            ),
        )
    console = _console()
    if not found:
        console.print("No runs yet.")
        return
    console.print(table)


@cli.command()
@click.argument("run_id", type=int)
@click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
@pass_context
@handle_errors
def show(context: Context, run_id: int, as_json: bool) -> None:
    """Show one run with the counts of each key."""
    with context.read_store() as connection:
        found = history.get_run(connection, run_id)
    if found is None:
        raise UsageError(f"there is no run {run_id}")

    if as_json:
        _dump(found.as_json())
        return

    console = _console()
    console.print(
        f"Run {found.id}: {found.status}, trigger {found.trigger}\n"
        f"  started  {_time(found.started_at)} UTC\n"
        f"  finished {_time(found.finished_at) or '-'} UTC\n"
        f"  now      {_time(found.now)} UTC"
    )
    if found.error:
        console.print(f"  error    {found.error}")
    table = Table()
    table.add_column("key")
    table.add_column("status")
    table.add_column("full")
    for column in (
        "members",
        "entered",
        "exited",
        "changed",
        "acked",
        "rejected",
        "pending",
        "skipped",
    ):
        table.add_column(column, justify="right")
    for k in found.audiences:
        table.add_row(
            k.key,
            k.status,
            "yes" if k.full else "",
            *(
                str(getattr(k, name))
                for name in (
                    "members",
                    "entered",
                    "exited",
                    "changed",
                    "acknowledged",
                    "rejected",
                    "pending",
                    "skipped",
                )
            ),
        )
    console.print(table)
    for k in found.audiences:
        if k.error:
            console.print(f"{k.key}: {k.error}")


@cli.command()
@click.argument("run_id", type=int)
@click.option("--audience", "key", metavar="KEY", help="Only this key.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
@pass_context
@handle_errors
def changes(context: Context, run_id: int, key: str | None, as_json: bool) -> None:
    """List the changes of one run, user by user, with their delivery status."""
    with context.read_store() as connection:
        if history.get_run(connection, run_id) is None:
            raise UsageError(f"there is no run {run_id}")
        if key is not None:
            _known_key(connection, key)
        rows = history.list_changes(connection, run_id, key)

    if as_json:
        _dump([history.change_as_json(row) for row in rows])
        return

    table = Table(title=f"Changes of run {run_id}", title_justify="left")
    for column in ("key", "user_id", "kind", "old", "new", "status", "reason"):
        table.add_column(column)
    for row in rows:
        reason = row.reason or ""
        if row.status_code:
            reason = f"{row.status_code} {reason}".strip()
        table.add_row(
            row.key, row.user_id, row.kind, row.old, row.new, row.status, reason
        )
    _console().print(table)


@cli.command()
@click.argument("key")
@click.option("--as-of", "as_of", type=int, metavar="RUN_ID", help="As of a past run.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
@pass_context
@handle_errors
def members(context: Context, key: str, as_of: int | None, as_json: bool) -> None:
    """List the members of a key that the destination acknowledged."""
    with context.read_store() as connection:
        info = _known_key(connection, key)
        if as_of is not None and history.get_run(connection, as_of) is None:
            raise UsageError(f"there is no run {as_of}")
        absent = "false" if info.kind == "audience" else "null"
        rows = snapshots.members(connection, key, as_of, absent)

    if as_json:
        _dump([{"user_id": u, "value": orjson.loads(v)} for u, v in rows])
        return

    console = _console()
    when = f"as of run {as_of}" if as_of is not None else "now"
    console.print(f"{key}: {len(rows)} members {when}")
    table = Table()
    table.add_column("user_id")
    table.add_column("value")
    for user_id, value in rows:
        table.add_row(user_id, value)
    console.print(table)


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
@pass_context
@handle_errors
def audiences(context: Context, as_json: bool) -> None:
    """List configured and synced keys with their size and latest run."""
    config = context.config
    try:
        with context.read_store() as connection:
            stored = {info.key: info for info in history.list_keys(connection)}
    except StoreError:
        stored = {}

    configured = {d.key: d for d in config.definitions}
    rows = []
    for key in sorted(set(configured) | set(stored)):
        definition, info = configured.get(key), stored.get(key)
        rows.append(
            {
                "key": key,
                "kind": definition.kind if definition else info.kind if info else None,
                "name": definition.name if definition else info.name if info else None,
                "source": definition.source if definition else None,
                "configured": definition is not None,
                "members": info.members if info else 0,
                "last_run": info.last_run if info else None,
                "last_status": info.last_status if info else None,
                "last_synced_at": (
                    info.last_synced_at.isoformat().replace("+00:00", "Z")
                    if info and info.last_synced_at
                    else None
                ),
                "computation_id": info.computation_id if info else None,
            }
        )

    if as_json:
        _dump(rows)
        return

    table = Table(title="Audiences and traits", title_justify="left")
    for column in (
        "key",
        "kind",
        "name",
        "source",
        "members",
        "last run",
        "status",
        "synced at (UTC)",
    ):
        table.add_column(
            column, justify="right" if column in ("members", "last run") else "left"
        )
    for row in rows:
        synced = row["last_synced_at"] or ""
        table.add_row(
            str(row["key"]),
            str(row["kind"]),
            str(row["name"]),
            str(row["source"] or "(not configured)"),
            str(row["members"]),
            str(row["last_run"] or ""),
            str(row["last_status"] or "never synced"),
            str(synced).replace("T", " ").removesuffix("Z")[:19],
        )
    _console().print(table)


@cli.command("explain")
@click.argument("key")
@click.option("--now", "now_text", metavar="ISO8601", help="Reference time.")
@pass_context
@handle_errors
def explain_command(context: Context, key: str, now_text: str | None) -> None:
    """Print the SQL an audience or trait runs, and how many users it returns now."""
    config = context.config
    (definition,) = config.select([key])
    now = _parse_now(now_text)
    sources = Sources(config.sources)
    try:
        if definition.declaration is not None:
            source = config.sources[definition.source]
            try:
                with sources.engine(definition.source).connect() as connection:
                    check_declaration(definition.declaration, source.events, connection)
            except DeclarationError as exc:
                raise ConfigError(f"{definition.label}: {exc}") from None
        sql = sources.sql(definition, now)
        counts = ReadCounts()
        users = sum(len(batch) for batch in sources.read(definition, now, counts))
    finally:
        sources.close()

    # Plain echo, not rich: SQL must come out exactly, unwrapped and unstyled.
    click.echo(f"-- {definition.kind} {key} on source {definition.source!r}")
    click.echo(sql)
    skipped = f", {counts.skipped} blank ids skipped" if counts.skipped else ""
    click.echo(f"-- returns {users} rows at {_time(now)} UTC{skipped}")


# ---------------------------------------------------------------------------
# db
# ---------------------------------------------------------------------------


@cli.group()
def db() -> None:
    """Manage the state store's schema."""


@db.command("upgrade")
@pass_context
@handle_errors
def db_upgrade(context: Context) -> None:
    """Create the store, or apply pending migrations to it."""
    engine = open_store(context.config.store_url.get_secret_value())
    try:
        upgrade_store(engine)
        with engine.connect() as connection:
            revision = current_revision(connection)
    finally:
        engine.dispose()
    click.echo(f"The store is at revision {revision} (head).")


@db.command("current")
@pass_context
@handle_errors
def db_current(context: Context) -> None:
    """Print the store's schema revision and the one this version needs."""
    engine = open_store(context.config.store_url.get_secret_value(), read_only=True)
    try:
        with engine.connect() as connection:
            revision = current_revision(connection)
    finally:
        engine.dispose()
    click.echo(f"store: {revision or 'empty'}; this version needs: {head_revision()}")


def main() -> None:
    """Entry point of the `audience-sync` console script."""
    cli(prog_name="audience-sync")
