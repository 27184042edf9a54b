"""The configuration file: loading, `${VAR}` substitution and validation.

A config is read once, validated whole, and turned into plain objects before anything
else happens, so a bad file is reported in one sentence and nothing is written.
"""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError, NoSuchModuleError

from audience_sync.declarations import UNION_TAGS, Compute, Condition, EventLayout
from audience_sync.durations import parse_duration
from audience_sync.errors import ConfigError
from audience_sync.keys import is_valid_key, snake_case

CONFIG_ENV = "AUDIENCE_SYNC_CONFIG"
DEFAULT_CONFIG = "config.yaml"
DEFAULT_STORE = "sqlite:///audience_sync.db"
MAX_KEY = 255

Kind = Literal["audience", "trait"]


# ---------------------------------------------------------------------------
# Loading: YAML that remembers lines, and ${VAR} substitution
# ---------------------------------------------------------------------------


class _Mapping(dict[Any, Any]):
    """A YAML mapping that remembers the line of each of its keys."""

    line: int = 0
    lines: dict[Any, int]


class _Sequence(list[Any]):
    """A YAML sequence that remembers the line of each of its items."""

    line: int = 0
    lines: dict[int, int]


class _LineLoader(yaml.SafeLoader):
    """A safe loader whose mappings and sequences know where they came from."""


def _construct_mapping(loader: _LineLoader, node: yaml.MappingNode) -> _Mapping:
    mapping = _Mapping()
    mapping.line = node.start_mark.line + 1
    mapping.lines = {}
    loader.flatten_mapping(node)
    for key_node, value_node in node.value:
        key = loader.construct_object(key_node, deep=True)
        if key in mapping:
            raise ConfigError(
                f"line {key_node.start_mark.line + 1}: the key {key!r} appears twice"
            )
        mapping[key] = loader.construct_object(value_node, deep=True)
        mapping.lines[key] = key_node.start_mark.line + 1
    return mapping


def _construct_sequence(loader: _LineLoader, node: yaml.SequenceNode) -> _Sequence:
    sequence = _Sequence(
        loader.construct_object(item, deep=True) for item in node.value
    )
    sequence.line = node.start_mark.line + 1
    sequence.lines = {i: item.start_mark.line + 1 for i, item in enumerate(node.value)}
    return sequence


_LineLoader.add_constructor(
    yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG,
    _construct_mapping,
)
_LineLoader.add_constructor(
    yaml.resolver.BaseResolver.DEFAULT_SEQUENCE_TAG,
    _construct_sequence,
)

_VARIABLE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def _substitute(node: Any, env: Mapping[str, str], line: int) -> Any:
    """Replace `${VAR}` and `${VAR:-default}` in every string of a loaded tree."""
    if isinstance(node, _Mapping):
        for key in list(node):
            node[key] = _substitute(node[key], env, node.lines.get(key, node.line))
        return node
    if isinstance(node, _Sequence):
        for i, item in enumerate(node):
            node[i] = _substitute(item, env, node.lines.get(i, node.line))
        return node
    if not isinstance(node, str):
        return node

    def replace(match: re.Match[str]) -> str:
        name, default = match.group(1), match.group(2)
        if name in env:
            return env[name]
        if default is not None:
            return default
        raise ConfigError(
            f"line {line}: the environment variable {name} is not set "
            "and has no default (write ${" + name + ":-default})"
        )

    return _VARIABLE.sub(replace, node)


def _line_of(tree: Any, loc: tuple[int | str, ...]) -> int | None:
    """Find the line of the deepest part of `loc` that exists in the loaded tree."""
    line = getattr(tree, "line", None)
    node = tree
    for part in loc:
        lines = getattr(node, "lines", None)
        if lines is None or part not in lines:
            continue  # a union's tag or a validator's name: not in the file
        line = lines[part]
        node = node[part]
    return line


def _field_name(loc: tuple[int | str, ...], tree: Any) -> str:
    """Render a pydantic location as the path a user sees in the file."""
    text = ""
    node = tree
    for part in loc:
        if (isinstance(node, dict) and node.get("transport") == part) or (
            part in UNION_TAGS
        ):
            continue  # a tag pydantic adds for a union, not a name in the file
        if isinstance(part, int):
            text += f"[{part}]"
            node = node[part] if isinstance(node, list) and part < len(node) else None
        elif isinstance(node, dict) and part in node:
            text += f".{part}" if text else str(part)
            node = node[part]
        elif node is None or isinstance(node, dict):
            # A missing or unknown field: name it too.
            text += f".{part}" if text else str(part)
            node = None
    return text or "the file"


# ---------------------------------------------------------------------------
# The schema
# ---------------------------------------------------------------------------


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _check_url(value: str) -> str:
    try:
        url = make_url(value)
        url.get_dialect()
    except NoSuchModuleError as exc:
        raise ValueError(f"names an unknown database kind {url.drivername!r}") from exc
    except (ArgumentError, ValueError) as exc:
        raise ValueError("is not a database URL such as sqlite:///file.db") from exc
    return value


class SourceSettings(_Strict):
    """A database that audience and trait queries run on."""

    url: SecretStr
    demo: bool = Field(
        default=False,
        description="Build the demo warehouse at this SQLite URL when it is missing.",
    )
    timeout: timedelta = Field(default=timedelta(minutes=10))
    events: EventLayout = Field(
        default_factory=EventLayout,
        description="Where Segment's warehouse tables are, for declared audiences.",
    )

    @field_validator("url", mode="before")
    @classmethod
    def _url(cls, value: Any) -> Any:
        return _check_url(value) if isinstance(value, str) else value

    @field_validator("timeout", mode="before")
    @classmethod
    def _timeout(cls, value: Any) -> timedelta:
        return parse_duration(value)

    @model_validator(mode="after")
    def _demo_is_sqlite(self) -> SourceSettings:
        if self.demo and make_url(self.url.get_secret_value()).get_backend_name() != (
            "sqlite"
        ):
            raise ValueError("demo: true needs a sqlite:/// URL")
        return self


class FileDestination(_Strict):
    """Write messages as JSON Lines to a file, fsynced before they count as sent."""

    transport: Literal["file"]
    path: Path

    @field_validator("path")
    @classmethod
    def _path(cls, value: Path) -> Path:
        if str(value) in ("", ".") or str(value).endswith(("/", "\\")):
            raise ValueError("must name a file")
        return value


class HttpDestination(_Strict):
    """Settings every HTTP transport shares: timeouts, concurrency, retries."""

    endpoint: str
    connect_timeout: timedelta = timedelta(seconds=5)
    read_timeout: timedelta = timedelta(seconds=30)
    request_timeout: timedelta = Field(
        default=timedelta(seconds=60),
        description="The most one request may take, from connect to the last byte.",
    )
    max_in_flight: int = Field(default=8, ge=1, le=256)
    rate_limit: float | None = Field(
        default=None,
        ge=0.001,
        description="Requests per second at most; none by default.",
    )
    max_attempts: int = Field(
        default=6, ge=1, description="Attempts per request for 5xx and network errors."
    )
    max_retry_wait: timedelta = Field(
        default=timedelta(seconds=60), description="The longest single wait."
    )
    retry_budget: timedelta = Field(
        default=timedelta(minutes=30),
        description="Total time one run may spend waiting on 429s and retries.",
    )

    @field_validator(
        "connect_timeout",
        "read_timeout",
        "request_timeout",
        "max_retry_wait",
        "retry_budget",
        mode="before",
    )
    @classmethod
    def _duration(cls, value: Any) -> timedelta:
        return parse_duration(value)

    @field_validator("endpoint")
    @classmethod
    def _endpoint(cls, value: str) -> str:
        parsed = urlsplit(value)
        if parsed.scheme not in ("http", "https") or not parsed.hostname:
            raise ValueError("must be an http(s) URL such as https://api.segment.io")
        if parsed.username or parsed.password:
            raise ValueError("must not carry credentials; use write_key or api_key")
        if parsed.scheme == "http" and not _is_loopback(parsed.hostname):
            raise ValueError("must use https unless it is on this machine (loopback)")
        return value.rstrip("/")


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class SegmentDestination(HttpDestination):
    """Send through Segment's HTTP Tracking API, with Plotline enabled: batches."""

    transport: Literal["segment"]
    endpoint: str = "https://api.segment.io"
    write_key: SecretStr


class PlotlineDestination(HttpDestination):
    """Send straight to Plotline's endpoint, one message per request."""

    transport: Literal["plotline"]
    api_key: SecretStr


Destination = Annotated[
    FileDestination | SegmentDestination | PlotlineDestination,
    Field(discriminator="transport"),
]


class Schedule(_Strict):
    """When the daemon runs: every `every` plus a random part of `jitter`."""

    every: timedelta = timedelta(hours=2)
    jitter: timedelta = timedelta(hours=1)
    shutdown_timeout: timedelta = Field(
        default=timedelta(seconds=30),
        description="How long a stopping daemon lets in-flight work finish.",
    )

    @field_validator("every", "jitter", "shutdown_timeout", mode="before")
    @classmethod
    def _duration(cls, value: Any) -> timedelta:
        return parse_duration(value)

    @field_validator("every")
    @classmethod
    def _positive(cls, value: timedelta) -> timedelta:
        if value <= timedelta(0):
            raise ValueError("must be longer than zero")
        return value


class Guard(_Strict):
    """Hold an audience when most of it would leave in one run."""

    max_exit_fraction: float = Field(default=0.5, gt=0, le=1)
    min_members: int = Field(default=100, ge=0)


class Personas(_Strict):
    """Optional identifiers copied into every message's context.personas."""

    space_id: str | None = None
    namespace: str | None = None


class DefinitionSettings(_Strict):
    """What audiences and computed traits share, as written in the file."""

    name: str = Field(min_length=1)
    key: str | None = None
    source: str
    query: str | None = None
    enabled: bool = True
    on_remove: Literal["keep", "unset"] = "keep"

    @field_validator("key")
    @classmethod
    def _key(cls, value: str | None) -> str | None:
        if value is not None and not is_valid_key(value):
            raise ValueError(
                "must be lower-case letters, digits and _ and start with a letter "
                "or digit"
            )
        if value is not None and len(value) > MAX_KEY:
            raise ValueError(f"is longer than {MAX_KEY} characters")
        return value

    @field_validator("query")
    @classmethod
    def _query(cls, value: str | None) -> str | None:
        if value is not None and not value.strip():
            raise ValueError("is empty")
        return value

    def _one_of(self, declared: object, field: str) -> None:
        if (self.query is None) == (declared is None):
            raise ValueError(f"needs exactly one of query: and {field}:")


class AudienceSettings(DefinitionSettings):
    """An audience: a raw SQL `query:` or an Engage-style `condition:`."""

    condition: Condition | None = None

    @model_validator(mode="after")
    def _exactly_one(self) -> AudienceSettings:
        self._one_of(self.condition, "condition")
        return self


class TraitSettings(DefinitionSettings):
    """A computed trait: a raw SQL `query:` or an Engage-style `compute:`."""

    compute: Compute | None = None

    @model_validator(mode="after")
    def _exactly_one(self) -> TraitSettings:
        self._one_of(self.compute, "compute")
        return self


class Settings(_Strict):
    """The whole configuration file."""

    store: SecretStr = SecretStr(DEFAULT_STORE)
    sources: dict[str, SourceSettings] = Field(default_factory=dict)
    destination: Destination
    schedule: Schedule = Schedule()
    guard: Guard = Guard()
    personas: Personas = Personas()
    audiences: list[AudienceSettings] = Field(default_factory=list)
    traits: list[TraitSettings] = Field(default_factory=list)

    @field_validator("store", mode="before")
    @classmethod
    def _store(cls, value: Any) -> Any:
        if not isinstance(value, str):
            return value
        url = make_url(_check_url(value))
        if url.get_backend_name() not in ("sqlite", "postgresql"):
            raise ValueError("must be a SQLite or PostgreSQL URL")
        if url.get_backend_name() == "sqlite" and url.database in (
            None,
            "",
            ":memory:",
        ):
            raise ValueError(
                "must name a SQLite file; an in-memory store keeps nothing"
            )
        return value

    @field_validator("sources", mode="before")
    @classmethod
    def _source_shorthand(cls, value: Any) -> Any:
        # `name: URL` is shorthand for `name: {url: URL}`.
        if isinstance(value, dict):
            return {
                name: {"url": spec} if isinstance(spec, str) else spec
                for name, spec in value.items()
            }
        return value


# ---------------------------------------------------------------------------
# What the rest of the program sees
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Definition:
    """One audience or computed trait, resolved: its key is final."""

    kind: Kind
    name: str
    key: str
    source: str
    query: str | None
    explicit_key: bool
    declaration: Condition | Compute | None = None
    enabled: bool = True
    on_remove: Literal["keep", "unset"] = "keep"
    where: str = ""

    @property
    def label(self) -> str:
        """How messages name it: its place in the file and its name."""
        return f"{self.where} ({self.name!r})" if self.where else repr(self.name)


@dataclass(frozen=True)
class Source:
    """A source database, its URL kept secret."""

    name: str
    url: SecretStr
    demo: bool
    timeout: timedelta
    events: EventLayout = field(default_factory=EventLayout)


@dataclass(frozen=True)
class Config:
    """A validated configuration, with every path resolved against its folder."""

    path: Path
    store_url: SecretStr
    sources: dict[str, Source]
    destination: FileDestination | SegmentDestination | PlotlineDestination
    schedule: Schedule
    guard: Guard
    personas: Personas
    definitions: tuple[Definition, ...]

    def select(self, keys: list[str] | None) -> list[Definition]:
        """Return the definitions with the given keys, or all of them."""
        if not keys:
            return list(self.definitions)

        known = {d.key: d for d in self.definitions}
        unknown = [k for k in keys if k not in known]
        if unknown:
            raise ConfigError(
                f"no audience or trait has the key {unknown[0]!r} "
                f"(known keys: {', '.join(sorted(known)) or 'none'})"
            )
        return [known[k] for k in dict.fromkeys(keys)]

    def __iter__(self) -> Iterator[Definition]:
        return iter(self.definitions)


def _resolve_sqlite(url: str, folder: Path) -> str:
    """Make a relative SQLite file path absolute against the config file's folder."""
    parsed: URL = make_url(url)
    database = parsed.database
    if parsed.get_backend_name() != "sqlite" or not database or database == ":memory:":
        return url
    if database.startswith("file:") or Path(database).is_absolute():
        return url
    return parsed.set(database=str(folder / database)).render_as_string(
        hide_password=False
    )


def _definitions(settings: Settings, tree: Any) -> tuple[Definition, ...]:
    """Give every audience and trait its final key, and refuse clashes."""
    seen: dict[str, str] = {}
    result = []
    for kind, section in (("audience", "audiences"), ("trait", "traits")):
        for index, item in enumerate(getattr(settings, section)):
            where = f"{section}[{index}]"
            line = _line_of(tree, (section, index))
            prefix = f"line {line}: " if line else ""

            key = item.key or snake_case(item.name)
            if not key:
                raise ConfigError(
                    f"{prefix}{where}.name {item.name!r} gives an empty key; "
                    "set key: explicitly"
                )
            if len(key) > MAX_KEY:
                raise ConfigError(
                    f"{prefix}{where}.name gives a key longer than {MAX_KEY} "
                    "characters; set a shorter key: explicitly"
                )
            if key in seen:
                raise ConfigError(
                    f"{prefix}{where} has the key {key!r}, "
                    f"which {seen[key]} already uses"
                )
            if item.source not in settings.sources:
                raise ConfigError(
                    f"{prefix}{where}.source names {item.source!r}, "
                    "which is not under sources:"
                )

            seen[key] = f"{where} ({item.name!r})"
            result.append(
                Definition(
                    kind=kind,  # type: ignore[arg-type]
                    name=item.name,
                    key=key,
                    source=item.source,
                    query=item.query,
                    explicit_key=item.key is not None,
                    declaration=getattr(item, "condition", None)
                    or getattr(item, "compute", None),
                    enabled=item.enabled,
                    on_remove=item.on_remove,
                    where=where,
                )
            )
    return tuple(result)


def config_path(explicit: str | None) -> Path:
    """Choose the config file: --config, $AUDIENCE_SYNC_CONFIG, or ./config.yaml."""
    return Path(explicit or os.environ.get(CONFIG_ENV) or DEFAULT_CONFIG)


def parse_config(text: str, path: Path, env: Mapping[str, str] | None = None) -> Config:
    """Validate the text of a config file that lives at `path`."""
    name = path.name
    try:
        tree = yaml.load(text, Loader=_LineLoader)  # noqa: S506 (a SafeLoader subclass)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark
        where = f" at line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{name} is not valid YAML{where}: {exc.problem}") from exc
    except ConfigError as exc:
        raise ConfigError(f"{name} {exc}") from exc
    except yaml.YAMLError as exc:
        # Not tied to a place in the text, such as a control character.
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else "unreadable"
        raise ConfigError(f"{name} is not valid YAML: {reason}") from None

    if tree is None:
        raise ConfigError(f"{name} is empty; it needs at least a destination")
    if not isinstance(tree, dict):
        raise ConfigError(f"{name} must be a mapping of settings at the top level")

    try:
        tree = _substitute(tree, os.environ if env is None else env, 1)
        settings = Settings.model_validate(tree)
        definitions = _definitions(settings, tree)
    except ValidationError as exc:
        error = exc.errors()[0]
        loc = tuple(error["loc"])
        line = _line_of(tree, loc)
        where = f"{name} line {line}" if line else name
        message = error["msg"].removeprefix("Value error, ")
        if error["type"] == "union_tag_invalid":
            loc = (*loc, "transport")
            line = _line_of(tree, loc)
            where = f"{name} line {line}" if line else name
            expected = error.get("ctx", {}).get("expected_tags", "")
            message = f"must be one of {expected.replace(chr(39), '')}"
        elif error["type"] == "missing":
            message = "is required"
        elif error["type"] == "extra_forbidden":
            message = "is not a known setting"
        more = len(exc.errors()) - 1
        suffix = (
            f" ({more} more problem{'s' if more > 1 else ''} after it)" if more else ""
        )
        raise ConfigError(
            f"{where}: {_field_name(loc, tree)} {message}{suffix}"
        ) from None
    except ConfigError as exc:
        raise ConfigError(f"{name} {exc}") from None

    folder = path.resolve().parent
    destination = settings.destination
    if isinstance(destination, FileDestination) and not destination.path.is_absolute():
        destination = destination.model_copy(update={"path": folder / destination.path})
    if isinstance(destination, FileDestination) and destination.path.is_dir():
        raise ConfigError(
            f"{name}: destination.path {destination.path} is a folder; name a file"
        )

    sources = {
        source_name: Source(
            name=source_name,
            url=SecretStr(_resolve_sqlite(spec.url.get_secret_value(), folder)),
            demo=spec.demo,
            timeout=spec.timeout,
            events=spec.events,
        )
        for source_name, spec in settings.sources.items()
    }

    return Config(
        path=path,
        store_url=SecretStr(_resolve_sqlite(settings.store.get_secret_value(), folder)),
        sources=sources,
        destination=destination,
        schedule=settings.schedule,
        guard=settings.guard,
        personas=settings.personas,
        definitions=definitions,
    )


def load_config(path: Path, env: Mapping[str, str] | None = None) -> Config:
    """Read and validate the config file at `path`."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(
            f"no config file at {path} (pass --config or set {CONFIG_ENV})"
        ) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read the config file {path}: {exc}") from None

    return parse_config(text, path, env)
