"""The nudge model registry's storage seam: trained model versions and the promoted pointer.

Kept in the database every server process shares, not in a replica's data directory: a model
trained and promoted by `pulsesync nudges ...` is the one every replica loads. The registry
(`pulsesync.server.nudges.registry`) owns the encodings: metadata and evaluation as JSON text,
the boosters as one blob; storage only keeps and finds them. Both backends implement
`ModelStorage`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True, slots=True)
class StoredModel:
    """One saved version: its number, when it was saved, its metadata and its boosters."""

    version: int
    create_us: int
    meta_json: str
    model: bytes


@dataclass(frozen=True, slots=True)
class Promoted:
    """The promoted version, when it was promoted and the evaluation it was promoted on."""

    version: int
    promote_us: int
    evaluation_json: str


class ModelStorage(Protocol):
    """Model versions by number and the pointer to the promoted one."""

    async def versions(self) -> list[int]:
        """Saved versions, oldest first."""
        ...

    async def meta(self, version: int) -> str | None:
        """The metadata of a version (None: no such version), without its boosters."""
        ...

    async def get(self, version: int) -> StoredModel | None:
        """A version with its boosters (None: no such version)."""
        ...

    async def add(self, meta_json: str, model: bytes, create_us: int) -> int:
        """Store a model as the next version (one above the highest, so concurrent trainers
        get distinct numbers); its number."""
        ...

    async def set_meta(self, version: int, meta_json: str) -> bool:
        """Replace a version's metadata (e.g. with its evaluation); whether the version exists."""
        ...

    async def promote(self, version: int, evaluation_json: str, promote_us: int) -> bool:
        """Make version the promoted one; False (nothing changed) if there is no such version."""
        ...

    async def promoted(self) -> Promoted | None:
        """The promoted version (None: nothing promoted); one primary-key read, made by every
        server at each decision tick."""
        ...

    async def import_models(self, models: Sequence[StoredModel], promoted: Promoted | None) -> bool:
        """Store models (with their own numbers) and the promoted pointer in one transaction,
        only if no model is stored yet; whether they were stored. For the one-time move of an
        earlier release's model folder into the database, safe when several servers start
        with the same folder at once."""
        ...
