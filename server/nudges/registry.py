"""The nudge model registry: versioned models and the pointer to the promoted one, in the database.

Every process over the database sees the same registry: one server, every replica of a
deployment over one PostgreSQL (each with a data directory of its own), and the
`pulsesync nudges train|evaluate|promote|status` commands. Stored per version
(`pulsesync.server.storage.models`):

    version   1, 2, ... shown as "model-v0001"; the next one is numbered by the database
    meta      JSON: actions, columns, send threshold, steps per act, training, evaluation
    model     zlib-compressed JSON {"format": "pulsesync-model/1", "parts": {part: text}}, the
              LightGBM text models of OutcomeModel.parts(): "base", "effect.<type>" (or
              "effect"), "response" and "response.<type>"

and the promoted pointer (version, promotion time, the evaluation it was promoted on).

A running server checks the pointer at the start of every decision tick (one primary-key read)
and loads the model when it changed: hot reload on every replica, whichever process promoted.
A check per tick rather than a doorbell ring: the model is only used by the tick's decisions,
which come after the check, so a ring could not make any decision use the new model sooner;
the read costs one tiny query per replica per tick (15 s); and it asks nothing of the promoting
process, usually the CLI, which has no doorbell of its own (so no ring to lose, either).

An earlier release kept the registry as files in DATA_DIR/nudge_models (`model-v0003.json`,
`model-v0003.<part>.txt`, `current.json`). `import_folder` moves them into the database once: a
server (or `pulsesync nudges ...`) finding such a folder while the database holds no model
imports every version with its number, and the promoted pointer, in one transaction; after that
the folder is no longer read (a warning at start says it can be removed).
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import zlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Final

from pulsesync.server.clock import Clock, SystemClock
from pulsesync.server.nudges.model import COLUMNS, OutcomeModel, meta_json
from pulsesync.server.storage.models import ModelStorage, Promoted, StoredModel

log = logging.getLogger(__name__)

MODEL_FORMAT: Final = "pulsesync-model/1"
# Where an earlier release kept the registry, under the data directory.
MODEL_FOLDER: Final = "nudge_models"
# The earlier release's files: model-v0003.json (metadata) and model-v0003.<part>.txt.
_STEM: Final = re.compile(r"^model-v(\d{4,})\.json$")
_CURRENT: Final = "current.json"


def version_name(version: int) -> str:
    """The name of a version, e.g. "model-v0003"."""
    return f"model-v{version:04d}"


class ModelNotFound(LookupError):
    """No saved model has this version."""

    def __init__(self, version: int) -> None:
        super().__init__(f"no model version {version} in the database")
        self.version = version


class ModelFolderError(SystemExit):
    """An earlier release's model folder cannot be imported: the server must not start
    without the model the operator promoted."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


def encode_parts(parts: Mapping[str, str]) -> bytes:
    """The stored form of a model's boosters (LightGBM text models compress well)."""
    doc = {"format": MODEL_FORMAT, "parts": dict(parts)}
    return zlib.compress(json.dumps(doc, sort_keys=True).encode(), 6)


def decode_parts(blob: bytes) -> dict[str, str]:
    """The boosters' parts from their stored form."""
    doc = json.loads(zlib.decompress(blob))
    if doc.get("format") != MODEL_FORMAT:
        raise ValueError(f"unknown model format {doc.get('format')!r}")
    return {str(k): str(v) for k, v in doc["parts"].items()}


def _model(blob: bytes, meta: Mapping[str, Any], name: str) -> OutcomeModel:
    return OutcomeModel.from_parts(
        decode_parts(blob),
        meta["actions"],
        name,
        float(meta.get("send_threshold", 0.0)),
        meta.get("learned_actions"),
        meta.get("act_gain"),
        meta.get("columns", COLUMNS),
        meta.get("support"),
    )


def _stored_meta(meta: Mapping[str, Any]) -> str:
    # The version is the row's; a copy in the JSON could only disagree with it.
    return json.dumps({k: v for k, v in meta.items() if k != "version"}, indent=2, sort_keys=True)


class ModelRegistry:
    """Save candidates, promote one, load the promoted one; over the database's registry."""

    def __init__(self, storage: ModelStorage, clock: Clock | None = None) -> None:
        self._storage = storage
        self._clock = clock or SystemClock()
        self._seen: tuple[int, int] | None = None

    async def versions(self) -> list[int]:
        """Saved versions, oldest first."""
        return await self._storage.versions()

    async def meta(self, version: int) -> dict[str, Any]:
        """The metadata of a saved version (ModelNotFound if there is none)."""
        text = await self._storage.meta(version)
        if text is None:
            raise ModelNotFound(version)
        return {**json.loads(text), "version": version_name(version)}

    async def save(self, model: OutcomeModel, extra: dict[str, Any]) -> int:
        """Store model as the next version (not promoted); its number."""
        meta = json.loads(meta_json(model, extra))
        blob = await asyncio.to_thread(lambda: encode_parts(model.parts()))
        version = await self._storage.add(_stored_meta(meta), blob, self._clock.now_us())
        model.version = version_name(version)
        return version

    async def update_meta(self, version: int, **fields: Any) -> None:
        """Add or replace metadata fields of a saved version (e.g. its evaluation)."""
        meta = await self.meta(version)
        meta.update(fields)
        if not await self._storage.set_meta(version, _stored_meta(meta)):
            raise ModelNotFound(version)

    async def current(self) -> int | None:
        """The promoted version, if any."""
        promoted = await self._storage.promoted()
        return None if promoted is None else promoted.version

    async def promote(self, version: int, evaluation: dict[str, Any]) -> None:
        """Make version the one servers use (each loads it at its next decision tick)."""
        evaluation_json = json.dumps(evaluation, sort_keys=True)
        if not await self._storage.promote(version, evaluation_json, self._clock.now_us()):
            raise ModelNotFound(version)

    async def load(self, version: int) -> OutcomeModel:
        """The model of a saved version (ModelNotFound if there is none)."""
        stored = await self._storage.get(version)
        if stored is None:
            raise ModelNotFound(version)
        meta = json.loads(stored.meta_json)
        # Decompressing and parsing the boosters takes milliseconds: off the event loop.
        return await asyncio.to_thread(_model, stored.model, meta, version_name(version))

    async def changed(self) -> bool:
        """Whether the promoted pointer changed since the last call (one primary-key read)."""
        promoted = await self._storage.promoted()
        seen = None if promoted is None else (promoted.version, promoted.promote_us)
        if seen != self._seen:
            self._seen = seen
            return True
        return False

    async def import_folder(self, root: Path) -> list[int]:
        """Move an earlier release's model folder into the database, once (see the module
        docstring); the versions imported. ModelFolderError if its files cannot be read."""
        if not await asyncio.to_thread(_has_models, root):
            return []
        if await self._storage.versions():
            log.warning(
                "%s holds nudge model files of an earlier release; they are not read (the models"
                " are in the database) and the folder can be removed",
                root,
            )
            return []
        try:
            models, promoted = await asyncio.to_thread(_read_folder, root)
        except Exception as e:  # unreadable files, bad JSON, a booster LightGBM cannot parse
            raise ModelFolderError(
                f"cannot import the nudge models of {root} (an earlier release's model folder)"
                f" into the database: {e}; fix the folder, or remove it to start without them"
                " (docs/nudges.md)"
            ) from None
        if not await self._storage.import_models(models, promoted):
            return []  # another process imported them (or trained) first
        names = ", ".join(version_name(m.version) for m in models)
        log.info(
            "imported the nudge models of %s into the database (%s; promoted: %s); the folder is"
            " no longer read and can be removed",
            root,
            names,
            version_name(promoted.version) if promoted is not None else "none",
        )
        return [m.version for m in models]


def _has_models(root: Path) -> bool:
    return root.is_dir() and any(_STEM.match(p.name) for p in root.iterdir())


def _read_folder(root: Path) -> tuple[list[StoredModel], Promoted | None]:
    """Every version of an earlier release's model folder, and its promoted pointer."""
    models: list[StoredModel] = []
    for path in sorted(root.iterdir()):
        match = _STEM.match(path.name)
        if match is None:
            continue
        version = int(match.group(1))
        stem = version_name(version)
        meta = json.loads(path.read_text("utf-8"))
        parts = {
            p.name[len(stem) + 1 : -len(".txt")]: p.read_text("utf-8")
            for p in root.glob(f"{stem}.*.txt")
        }
        if "base" not in parts:
            raise ValueError(f"{stem}.base.txt is missing")
        blob = encode_parts(parts)
        _model(blob, meta, stem)  # it loads (or says why not) before anything is stored
        create_us = path.stat().st_mtime_ns // 1000
        models.append(StoredModel(version, create_us, _stored_meta(meta), blob))
    promoted = None
    current = root / _CURRENT
    if current.exists():
        doc = json.loads(current.read_text("utf-8"))
        version = int(doc["version"])
        if version not in {m.version for m in models}:
            raise ValueError(f"{_CURRENT} names {version_name(version)}, which is not there")
        promoted = Promoted(
            version,
            current.stat().st_mtime_ns // 1000,
            json.dumps(doc.get("evaluation") or {}, sort_keys=True),
        )
    return models, promoted
