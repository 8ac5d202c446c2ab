"""The committed stubs must be exactly what scripts/gen_protos makes from proto/."""

from __future__ import annotations

import filecmp
import runpy
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
STUBS = ROOT / "proto" / "pulsesync" / "v1"


def test_committed_stubs_match_protos(tmp_path: Path) -> None:
    gen = runpy.run_path(str(ROOT / "scripts" / "gen_protos"))
    gen["generate"](tmp_path)
    fresh = tmp_path / "pulsesync" / "v1"
    generated = sorted(p.name for p in fresh.iterdir() if "_pb2" in p.name)
    committed = sorted(p.name for p in STUBS.iterdir() if "_pb2" in p.name)
    assert generated == committed, "stub files differ from protos: run scripts/gen_protos"
    _, mismatch, errors = filecmp.cmpfiles(fresh, STUBS, generated, shallow=False)
    assert not errors
    assert not mismatch, f"stale stubs {mismatch}: run scripts/gen_protos and commit the result"
