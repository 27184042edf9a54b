"""audience-sync: keep Plotline user attributes in step with audiences in your SQL."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("audience-sync")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0"

__all__ = ["__version__"]
