"""Versioned model files and the pointer to the promoted one, re-read when it changes.

    <models>/model-v0003.base.txt     LightGBM text model (baseline)
    <models>/model-v0003.effect.<type>.txt  LightGBM text model per type (its effect, R-learner)
    <models>/model-v0003.response.txt LightGBM text model (chance of acting on a nudge)
    <models>/model-v0003.json         metadata: actions, columns, training and evaluation
    <models>/current.json             {"version": 3, ...}: the promoted model

Files are written to a temporary name and renamed, so a running server never reads half a
file; it notices a new current.json by its modification time and loads the model (hot reload).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any, Final

from pulsesync.server.nudges.model import COLUMNS, OutcomeModel, meta_json

_STEM: Final = re.compile(r"^model-v(\d{4,})\.json$")


def version_name(version: int) -> str:
    """The name of a version, e.g. "model-v0003"."""
    return f"model-v{version:04d}"


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, "utf-8")
    os.replace(tmp, path)


class ModelRegistry:
    """The model folder: save candidates, promote one, load the current one."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._seen: tuple[int, int] | None = None

    def versions(self) -> list[int]:
        """Saved versions, oldest first."""
        if not self.root.exists():
            return []
        return sorted(int(m.group(1)) for p in self.root.iterdir() if (m := _STEM.match(p.name)))

    def meta(self, version: int) -> dict[str, Any]:
        """The metadata of a saved version."""
        path = self.root / f"{version_name(version)}.json"
        try:
            return dict(json.loads(path.read_text("utf-8")))
        except FileNotFoundError:
            raise FileNotFoundError(f"no model version {version} in {self.root}") from None

    def save(self, model: OutcomeModel, extra: dict[str, Any]) -> int:
        """Store model as the next version (not promoted); its number."""
        self.root.mkdir(parents=True, exist_ok=True)
        version = (self.versions() or [0])[-1] + 1
        stem = self.root / version_name(version)
        model.version = version_name(version)
        model.save(stem)
        _atomic_write(stem.with_suffix(".json"), meta_json(model, extra))
        return version

    def update_meta(self, version: int, **fields: Any) -> None:
        meta = self.meta(version)
        meta.update(fields)
        _atomic_write(
            self.root / f"{version_name(version)}.json", json.dumps(meta, indent=2, sort_keys=True)
        )

    def current(self) -> int | None:
        """The promoted version, if any."""
        try:
            return int(json.loads((self.root / "current.json").read_text("utf-8"))["version"])
        except FileNotFoundError:
            return None

    def promote(self, version: int, evaluation: dict[str, Any]) -> None:
        """Make version the one servers use (they reload within a decision tick)."""
        self.meta(version)  # exists
        _atomic_write(
            self.root / "current.json",
            json.dumps({"version": version, "evaluation": evaluation}, indent=2),
        )

    def load(self, version: int) -> OutcomeModel:
        """The model of a saved version."""
        meta = self.meta(version)
        return OutcomeModel.load(
            self.root / version_name(version),
            meta["actions"],
            version_name(version),
            float(meta.get("send_threshold", 0.0)),
            meta.get("learned_actions"),
            meta.get("act_gain"),
            meta.get("columns", COLUMNS),
        )

    def changed(self) -> bool:
        """Whether current.json changed since the last call (cheap: one stat)."""
        try:
            st = (self.root / "current.json").stat()
            seen: tuple[int, int] | None = (st.st_mtime_ns, st.st_size)
        except FileNotFoundError:
            seen = None
        if seen != self._seen:
            self._seen = seen
            return True
        return False
