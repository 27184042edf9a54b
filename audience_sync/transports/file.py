"""The file transport: JSON Lines, one message a line, fsynced before acknowledging."""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import BinaryIO

from audience_sync.errors import TerminalTransportError
from audience_sync.messages import Message
from audience_sync.transports.base import ACKNOWLEDGED, Delivery

logger = logging.getLogger(__name__)


class FileTransport:
    """Append messages to a JSON Lines file; a message counts once it is on disk."""

    name = "file"

    def __init__(self, path: Path) -> None:
        self.path = path
        self._file: BinaryIO | None = None

    def _open(self) -> BinaryIO:
        if self._file is not None:
            return self._file

        self.path.parent.mkdir(parents=True, exist_ok=True)
        handle = self.path.open("ab+")
        # A process killed mid-write can leave a torn last line; start on a fresh line
        # so the torn one stays alone and every later line parses.
        if handle.seek(0, os.SEEK_END) > 0:
            handle.seek(-1, os.SEEK_END)
            if handle.read(1) != b"\n":
                handle.write(b"\n")
        self._file = handle
        return handle

    def send(
        self, messages: Sequence[Message], stop: threading.Event
    ) -> list[Delivery]:
        """Write the batch, flush and fsync it, then acknowledge every message."""
        try:
            handle = self._open()
            handle.write(b"".join(m.encoded + b"\n" for m in messages))
            handle.flush()
            os.fsync(handle.fileno())
        except OSError as exc:
            raise TerminalTransportError(
                f"cannot write messages to {self.path}: {exc.strerror or exc}"
            ) from exc

        logger.debug("Wrote %d messages to %s", len(messages), self.path)
        return [ACKNOWLEDGED] * len(messages)

    def close(self) -> None:
        """Close the file."""
        if self._file is not None:
            self._file.close()
            self._file = None
