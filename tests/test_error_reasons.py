"""Every ErrorInfo reason the server can raise is in the table of docs/errors.md.

The server's sources are scanned (AST): `reason="..."` arguments, the exception classes'
`default_reason`, and the first argument of the ingest `Refusal(...)` / `Problem(...)`.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
_REASON_SHAPE = re.compile(r"^[A-Z][A-Z0-9_]+$")


def reasons_in_code() -> dict[str, set[str]]:
    """reason -> the files that can raise it."""
    found: dict[str, set[str]] = {}

    def add(value: object, path: Path) -> None:
        if isinstance(value, str) and _REASON_SHAPE.match(value):
            found.setdefault(value, set()).add(str(path.relative_to(ROOT)))

    for path in sorted((ROOT / "server").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if (
                isinstance(node, ast.keyword)
                and node.arg == "reason"
                and isinstance(node.value, ast.Constant)
            ):
                add(node.value.value, path)
            elif isinstance(node, ast.Assign | ast.AnnAssign):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                named = any(isinstance(t, ast.Name) and t.id == "default_reason" for t in targets)
                if named and isinstance(node.value, ast.Constant):
                    add(node.value.value, path)
            elif (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Name)
                and node.func.id in ("Refusal", "Problem")
                and node.args
                and isinstance(node.args[0], ast.Constant)
            ):
                add(node.args[0].value, path)
    return found


def reasons_in_table() -> set[str]:
    rows = re.findall(r"^\| `([A-Z0-9_]+)` \|", (ROOT / "docs/errors.md").read_text(), re.M)
    return set(rows)


def test_the_scan_finds_reasons() -> None:
    found = reasons_in_code()
    assert "MALFORMED_MESSAGE" in found
    assert "TIME_TOO_OLD" in found  # Problem(...)
    assert "BATCH_TOO_LARGE" in found  # Refusal(...)
    assert "NOT_YET_AVAILABLE" in found  # default_reason


def test_every_reason_the_server_raises_is_documented() -> None:
    missing = {r: sorted(f) for r, f in reasons_in_code().items() if r not in reasons_in_table()}
    assert not missing, f"add these reasons to docs/errors.md and common.proto: {missing}"


def test_the_proto_comment_holds_the_same_table() -> None:
    proto = (ROOT / "proto/pulsesync/v1/common.proto").read_text()
    in_proto = set(re.findall(r"^//   ([A-Z][A-Z0-9_]+) ", proto, re.M))
    assert in_proto == reasons_in_table()
