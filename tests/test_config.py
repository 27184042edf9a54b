"""Loading and validating the config file."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest

from audience_sync.config import FileDestination, load_config, parse_config
from audience_sync.errors import ConfigError

HEAD = """\
sources:
  warehouse: sqlite:///warehouse.db
destination:
  transport: file
  path: out.jsonl
"""


def parse(text: str, env: dict[str, str] | None = None) -> object:
    return parse_config(text, Path("/srv/sync/config.yaml"), env or {})


def error_of(text: str, env: dict[str, str] | None = None) -> str:
    with pytest.raises(ConfigError) as caught:
        parse(text, env)
    return str(caught.value)


def test_minimal_config_has_the_documented_defaults() -> None:
    """Store, schedule and guard take their defaults when the file omits them."""
    config = parse_config(HEAD, Path("/srv/sync/config.yaml"), {})

    assert config.store_url.get_secret_value() == "sqlite:////srv/sync/audience_sync.db"
    assert config.schedule.every == timedelta(hours=2)
    assert config.schedule.jitter == timedelta(hours=1)
    assert config.guard.max_exit_fraction == 0.5
    assert config.guard.min_members == 100
    assert config.definitions == ()


def test_relative_paths_resolve_against_the_config_folder() -> None:
    """SQLite files and the message file are found next to the config file."""
    config = parse_config(HEAD, Path("/srv/sync/config.yaml"), {})

    assert config.sources["warehouse"].url.get_secret_value() == (
        "sqlite:////srv/sync/warehouse.db"
    )
    assert isinstance(config.destination, FileDestination)
    assert config.destination.path == Path("/srv/sync/out.jsonl")


def test_environment_variables_are_substituted() -> None:
    """${VAR} takes the variable's value and ${VAR:-default} falls back."""
    text = HEAD.replace("out.jsonl", "${OUT}") + "store: ${STORE:-sqlite:///s.db}\n"

    config = parse_config(text, Path("/srv/config.yaml"), {"OUT": "/tmp/m.jsonl"})

    assert isinstance(config.destination, FileDestination)
    assert config.destination.path == Path("/tmp/m.jsonl")
    assert config.store_url.get_secret_value() == "sqlite:////srv/s.db"


def test_an_unset_variable_without_default_names_it_and_its_line() -> None:
    """A missing variable is an error naming the variable and the line."""
    message = error_of(HEAD + "store: ${NOT_SET_ANYWHERE}\n")

    assert "NOT_SET_ANYWHERE" in message
    assert "line 6" in message


def test_secrets_are_not_echoed_in_errors_or_repr() -> None:
    """A password in a URL stays out of error messages and of repr."""
    text = (
        HEAD.replace("sqlite:///warehouse.db", "postgresql://u:hunter2@db.internal/w")
        + "schedule: {every: nonsense}\n"
    )

    message = error_of(text)
    config = parse(
        HEAD.replace("sqlite:///warehouse.db", "postgresql://u:hunter2@db.internal/w")
    )

    assert "hunter2" not in message
    assert "hunter2" not in repr(config)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (HEAD + "schedul: {every: 2h}\n", "line 6: schedul is not a known setting"),
        (
            HEAD + "audiences:\n  - name: A\n    source: warehouse\n",
            "line 7: audiences[0] needs exactly one of query: and condition:",
        ),
        (
            HEAD + "schedule:\n  every: 2 hours\n",
            "line 7: schedule.every '2 hours' is not a duration",
        ),
        (
            HEAD + "schedule:\n  every: 0s\n",
            "line 7: schedule.every must be longer than zero",
        ),
        (HEAD + "store: not-a-url\n", "line 6: store is not a database URL"),
        (HEAD + "store: nosuchdb://x/y\n", "names an unknown database kind"),
        (
            HEAD.replace("transport: file", "transport: carrier-pigeon"),
            "line 4: destination.transport must be one of file, segment, plotline",
        ),
        (
            HEAD
            + "audiences:\n  - {name: A, key: Bad-Key, source: warehouse, query: q}\n",
            "line 7: audiences[0].key must be lower-case letters",
        ),
        (
            HEAD + "audiences:\n  - {name: A, source: nowhere, query: q}\n",
            "line 7: audiences[0].source names 'nowhere', which is not under sources:",
        ),
        (
            HEAD + "audiences:\n  - {name: '!!!', source: warehouse, query: q}\n",
            "audiences[0].name '!!!' gives an empty key",
        ),
        (HEAD + "guard: {max_exit_fraction: 2}\n", "line 6: guard.max_exit_fraction"),
        (
            "destination: {transport: file, path: a}\ndestination: {}\n",
            "the key 'destination' appears twice",
        ),
        ("sources: [unclosed\n", "is not valid YAML at line 2"),
        ("", "is empty"),
        ("- just\n- a list\n", "must be a mapping"),
    ],
)
def test_invalid_configs_are_one_sentence_naming_field_and_line(
    text: str, expected: str
) -> None:
    """Each kind of mistake is reported as one line naming the field and line."""
    message = error_of(text)

    assert expected in message
    assert message.startswith("config.yaml")
    assert "\n" not in message


def test_two_names_with_the_same_key_are_refused() -> None:
    """Two definitions that snake_case to one key cannot both exist."""
    text = HEAD + (
        "audiences:\n"
        "  - {name: VIP Customers, source: warehouse, query: q}\n"
        "traits:\n"
        "  - {name: vipCustomers, source: warehouse, query: q}\n"
    )

    message = error_of(text)

    assert "line 9: traits[0] has the key 'vip_customers'" in message
    assert "audiences[0] ('VIP Customers') already uses" in message


def test_duplicate_explicit_keys_are_refused() -> None:
    """An explicit key may not repeat another definition's key."""
    text = HEAD + (
        "audiences:\n"
        "  - {name: A, key: same, source: warehouse, query: q}\n"
        "  - {name: B, key: same, source: warehouse, query: q}\n"
    )

    assert "audiences[1] has the key 'same'" in error_of(text)


def test_explicit_key_wins_over_the_name() -> None:
    """A definition with key: keeps that key whatever its name."""
    config = parse_config(
        HEAD
        + "audiences:\n  - {name: Renamed, key: vip, source: warehouse, query: q}\n",
        Path("c.yaml"),
        {},
    )

    assert [d.key for d in config.definitions] == ["vip"]
    assert config.definitions[0].explicit_key


def test_missing_file_is_a_config_error(tmp_path: Path) -> None:
    """A config path that does not exist is reported, not a traceback."""
    with pytest.raises(ConfigError, match="no config file at"):
        load_config(tmp_path / "nope.yaml")


def test_selecting_an_unknown_key_lists_the_known_ones() -> None:
    """--audience with an unknown key names the keys that exist."""
    config = parse_config(
        HEAD + "audiences:\n  - {name: VIP, source: warehouse, query: q}\n",
        Path("c.yaml"),
        {},
    )

    with pytest.raises(
        ConfigError, match=r"no audience or trait has the key 'x' \(known keys: vip\)"
    ):
        config.select(["x"])
