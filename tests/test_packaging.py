"""Packaging: every package folder is listed, the extras match what each part imports, one
version source, and the command lines stay light for --help."""

from __future__ import annotations

import importlib.metadata
import json
import pkgutil
import re
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_every_package_folder_is_listed() -> None:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    mapping: dict[str, str] = config["package-dir"]
    listed = set(config["packages"])
    found = set()
    for prefix, folder in mapping.items():
        for init in (ROOT / folder).rglob("__init__.py"):
            rel = init.parent.relative_to(ROOT / folder)
            found.add(".".join([prefix, *rel.parts]))
    assert found - listed == set(), "add these to [tool.setuptools] packages"


# -- extras: the agent's core installs without the server, Bluetooth or the demo ------------------
_NON_DEPENDENCIES = {
    # grpcio imports these optionally to alias grpc.health etc.; absent they are skipped.
    "grpc_health",
    "grpc_reflection",
    "grpc_tools",
}

_PROBE = """
import importlib, json, sys
import importlib.metadata as md
at_start = {m.split(".")[0] for m in sys.modules}  # site hooks (.pth files), not the code
for name in sys.argv[2:]:
    importlib.import_module(name)
dists = md.packages_distributions()
loaded = {m.split(".")[0] for m in sys.modules} - at_start
third = sorted(
    d for m in loaded - set(sys.stdlib_module_names) - {"pulsesync"} for d in dists.get(m, ())
    if m not in set(sys.argv[1].split(","))
)
print(json.dumps({"dists": third, "modules": sorted(sys.modules)}))
"""


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _requirement_names(reqs: list[str]) -> set[str]:
    return {_norm(re.split(r"[\s<>=!~\[;(]", r, maxsplit=1)[0]) for r in reqs}


def _closure(reqs: list[str]) -> set[str]:
    """The distributions that installing `reqs` brings, through their own non-extra requirements."""
    todo = list(_requirement_names(reqs) - {"pulsesync"})
    seen: set[str] = set()
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        try:
            requires = importlib.metadata.requires(name) or []
        except importlib.metadata.PackageNotFoundError:
            continue
        todo.extend(_requirement_names([r for r in requires if "extra ==" not in r]))
    return seen


def _project() -> dict[str, Any]:
    project: dict[str, Any] = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return project


def _probe(*modules: str) -> dict[str, list[str]]:
    out = subprocess.run(
        [sys.executable, "-c", _PROBE, ",".join(sorted(_NON_DEPENDENCIES)), *modules],
        capture_output=True,
        text=True,
        check=True,
        timeout=100,
    )
    result: dict[str, list[str]] = json.loads(out.stdout)
    return result


def _agent_modules(*, ble: bool) -> list[str]:
    import pulsesync.edge_agent as pkg

    names = [m.name for m in pkgutil.walk_packages(pkg.__path__, "pulsesync.edge_agent.")]
    bluetooth = [
        n for n in names if n.startswith("pulsesync.edge_agent.ble.") or n.endswith(".wearable")
    ]
    # The emulation needs bumble, which only the demo installs.
    emulation = {"pulsesync.edge_agent.ble.emulation", "pulsesync.edge_agent.ble.bumble_backend"}
    if ble:
        return [n for n in bluetooth if n not in emulation]
    return [n for n in names if n not in bluetooth and n != "pulsesync.edge_agent.ble"]


def test_the_agent_core_imports_only_core_dependencies() -> None:
    modules = _agent_modules(ble=False)
    assert "pulsesync.edge_agent.tracker" in modules
    assert "pulsesync.edge_agent.cli" in modules
    allowed = _closure(_project()["dependencies"])
    used = {_norm(d) for d in _probe(*modules)["dists"]}
    assert used - allowed == set(), "imported by the agent's core but not a core dependency"


def test_the_ble_bridge_needs_only_the_ble_extra() -> None:
    project = _project()
    allowed = _closure(project["dependencies"] + project["optional-dependencies"]["ble"])
    used = {_norm(d) for d in _probe(*_agent_modules(ble=True))["dists"]}
    assert "bleak" in used
    assert used - allowed == set(), "imported by the BLE bridge but not in [ble]"


def test_every_extra_is_pulled_by_all_and_test() -> None:
    extras = _project()["optional-dependencies"]
    assert {"server", "ble", "demo", "postgres", "all", "test"} <= set(extras)
    assert extras["all"] == ["pulsesync[server,ble,demo,postgres]"]
    assert "pulsesync[all]" in extras["test"]
    for name in ("server", "ble", "demo", "postgres"):
        for req in extras[name]:
            dist = _norm(re.split(r"[\s<>=!~\[;(]", req, maxsplit=1)[0])
            if dist != "pulsesync":
                importlib.metadata.distribution(dist)  # the test install has every extra


def test_one_version_source() -> None:
    import pulsesync

    project = _project()
    assert "version" not in project
    assert "version" in project["dynamic"]
    assert importlib.metadata.version("pulsesync") == pulsesync.__version__


# -- the command lines import what the command needs, not the demo or LightGBM for --help ---------
_HEAVY = ("matplotlib", "lightgbm", "rich", "pulsesync.server.demo", "numpy")

_HELP = """
import contextlib, io, json, sys, importlib
main = importlib.import_module(sys.argv[1]).main
with contextlib.redirect_stdout(io.StringIO()) as out, contextlib.suppress(SystemExit):
    main(["--help"])
assert "usage" in out.getvalue()
print(json.dumps(sorted(sys.modules)))
"""


@pytest.mark.parametrize("cli", ["pulsesync.server.cli", "pulsesync.edge_agent.cli"])
def test_help_imports_no_heavy_module(cli: str) -> None:
    out = subprocess.run(
        [sys.executable, "-c", _HELP, cli], capture_output=True, text=True, check=True, timeout=100
    )
    loaded = set(json.loads(out.stdout))
    assert {m for m in loaded if m.split(".")[0] in _HEAVY or m in _HEAVY} == set()
    if cli.startswith("pulsesync.edge_agent"):
        assert not any(m.startswith("pulsesync.server") for m in loaded)


def test_a_command_group_is_still_built_in_full_when_named() -> None:
    from pulsesync.server.cli import build_parser

    args = build_parser(load=("keys",)).parse_args(["keys", "rotate", "--data-dir", "x"])
    assert args.command == "keys"


def test_a_sqlite_server_never_loads_the_postgresql_driver() -> None:
    # `pip install ".[server]"` (or ".[demo]") has no asyncpg: serving, the demo and the admin
    # commands on SQLite must not import it.
    probe = (
        "import sys, pulsesync.server.app, pulsesync.server.cli, pulsesync.server.compose, "
        "pulsesync.server.demo.world; "
        "print(','.join(m for m in sys.modules if m.split('.')[0] in ('asyncpg', 'psycopg')))"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=100
    )
    assert out.stdout.strip() == ""
