"""Every error audience-sync raises on purpose, in one tree.

```
AudienceSyncError                 one clear sentence for the user; exit_code says how
├── ConfigError                   the config file is missing, unreadable or invalid (2)
├── UsageError                    a command got arguments that cannot work (2)
├── StoreError                    the state store cannot be opened or is not ready (2)
├── LockHeldError                 another process holds an audience's lease (3)
└── SyncError                     something went wrong inside one run
    ├── SourceError               a source query failed or returned the wrong shape
    ├── GuardError                an audience collapsed; nothing is sent for it
    └── TransportError            the destination could not be reached or refused us
        ├── RetryableTransportError   worth another attempt (5xx, 429, timeouts)
        └── TerminalTransportError    another attempt cannot help (bad credentials)
```

Errors from SQLAlchemy, httpx and the YAML parser are translated into this tree once,
at the boundary where they are caught, always chained with `raise ... from exc`.
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_INCOMPLETE = 1
EXIT_USAGE = 2
EXIT_LOCKED = 3


class AudienceSyncError(Exception):
    """Base of every error audience-sync raises on purpose."""

    exit_code = EXIT_USAGE


class ConfigError(AudienceSyncError):
    """The configuration file is missing, unreadable or invalid."""


class UsageError(AudienceSyncError):
    """A command was called with arguments that cannot work."""


class StoreError(AudienceSyncError):
    """The state store cannot be opened, or its schema is not at this version."""


class LockHeldError(AudienceSyncError):
    """Another live process holds the lease of an audience."""

    exit_code = EXIT_LOCKED


class SyncError(AudienceSyncError):
    """Something went wrong inside a run; the run records it and goes on."""

    exit_code = EXIT_INCOMPLETE


class SourceError(SyncError):
    """A source query failed, timed out, or returned rows of the wrong shape."""


class GuardError(SyncError):
    """Too many members would leave at once; the audience is held."""


class TransportError(SyncError):
    """The destination could not be reached or refused the request."""


class RetryableTransportError(TransportError):
    """A transport failure that another attempt may cure."""


class TerminalTransportError(TransportError):
    """A transport failure that no retry can cure, such as bad credentials."""
