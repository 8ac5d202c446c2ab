"""Event sources for trying the agent out: simulated apps and emulated wearables.

Sources are registered by name for `pulsesync-agent run --source NAME`. Each entry is
"module:factory", imported only when used (so the BLE stack loads only for BLE sources); a
factory takes SourceOptions and returns an EventSource.
"""

from __future__ import annotations

import importlib
from typing import Final

from pulsesync.edge_agent.sources.base import EventSource, SourceFactory, SourceOptions

SOURCES: Final[dict[str, str]] = {
    "simulated-phone": "pulsesync.edge_agent.sources.simulated:SimulatedPhone",
    "simulated-desktop": "pulsesync.edge_agent.sources.simulated:SimulatedDesktop",
    "emulated-wearable": "pulsesync.edge_agent.sources.wearable:create",
    "wearable": "pulsesync.edge_agent.sources.wearable:create_real",
    # One line per additional source, e.g. "emulated-wearable": "...sources.wearable:create".
}


def source_factory(name: str) -> SourceFactory:
    """The factory registered under name (ValueError listing the known names if none)."""
    try:
        module_name, _, attr = SOURCES[name].partition(":")
    except KeyError:
        raise ValueError(f"unknown source {name!r}; choose one of {', '.join(SOURCES)}") from None
    factory: SourceFactory = getattr(importlib.import_module(module_name), attr)
    return factory


def create_source(name: str, options: SourceOptions) -> EventSource:
    """Build the source registered under name."""
    return source_factory(name)(options)


__all__ = ["SOURCES", "EventSource", "SourceFactory", "SourceOptions", "create_source",
           "source_factory"]  # fmt: skip
