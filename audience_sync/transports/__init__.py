"""Transports: how messages leave the process, and how acknowledgements come back."""

from __future__ import annotations

from audience_sync.config import (
    FileDestination,
    PlotlineDestination,
    SegmentDestination,
)
from audience_sync.transports.base import Delivery, Transport
from audience_sync.transports.file import FileTransport
from audience_sync.transports.plotline import PlotlineTransport
from audience_sync.transports.segment import SegmentTransport

__all__ = ["Delivery", "Transport", "make_transport"]


def make_transport(
    destination: FileDestination | SegmentDestination | PlotlineDestination,
) -> Transport:
    """Build the transport a destination setting describes."""
    if isinstance(destination, FileDestination):
        return FileTransport(destination.path)
    if isinstance(destination, SegmentDestination):
        return SegmentTransport(destination)
    return PlotlineTransport(destination)
