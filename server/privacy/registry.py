"""How server components take part in export and erasure of a person's data.

Erasure deletes every row of the user from every table with a `user_id` column (found from
the schema, so a new table is covered without anyone remembering to add it) and then runs the
erase hooks, which destroy what rows alone do not hold: encryption keys, caches, open streams.
Export writes every such table's rows, plus records that components produce themselves
(e.g. the decrypted profile) through exporters.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

EraseHook = Callable[[int], Awaitable[None]]
Exporter = Callable[[int], AsyncIterator[dict[str, Any]]]


class UserDataRegistry:
    """Erase hooks and exporters contributed by components at start-up."""

    def __init__(self) -> None:
        self.erase_hooks: list[tuple[str, EraseHook]] = []
        self.exporters: dict[str, Exporter] = {}

    def on_erase(self, name: str, hook: EraseHook) -> None:
        """Run hook(user_id) after the user's rows are deleted."""
        self.erase_hooks.append((name, hook))

    def add_exporter(self, record_type: str, exporter: Exporter) -> None:
        """Export exporter(user_id)'s records as `<record_type>.jsonl`."""
        if record_type in self.exporters:
            raise ValueError(f"exporter {record_type!r} registered twice")
        self.exporters[record_type] = exporter
