"""The merge is a join: commutative, associative, idempotent; devices converge in any order."""

from __future__ import annotations

import asyncio
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pulsesync import profile_document as document
from pulsesync.hlc import HybridClock, Stamp
from pulsesync.profile_document import Entry, State
from pulsesync.server.clock import FakeClock
from pulsesync.server.compose import open_profile_store
from pulsesync.server.config import ServerConfig
from pulsesync.server.storage.db import Database
from pulsesync.v1 import profiles_pb2

PATHS = [
    "preferences.theme",
    "goals.daily_steps",
    "time_zone",
    "quiet_hours",
    "layout.pinned_order",
    "muted_nudge_types/streak",
    "muted_nudge_types/hydrate",
    "preferences.app_settings/font",
    "continuity_items/reader/book-1",
    "continuity_items/reader/book%2F2",
]
NODES = ["dev_a", "dev_b", "dev_c"]


def set_value(p: profiles_pb2.Profile, path: str, n: int) -> None:
    """Give path the n-th of a few distinct values."""
    if path == "preferences.theme":
        p.preferences.theme = f"theme-{n}"
    elif path == "goals.daily_steps":
        p.goals.daily_steps = 1000 + n
    elif path == "time_zone":
        p.time_zone = ["UTC", "Europe/Paris", "Asia/Tokyo"][n % 3]
    elif path == "quiet_hours":
        p.quiet_hours.start_minute = 60 * n
        p.quiet_hours.end_minute = 7 * 60
    elif path == "layout.pinned_order":
        p.layout.pinned_order[:] = [*["a", "b", "c"][n % 3 :], "x"]
    elif path.startswith("muted_nudge_types/"):
        p.muted_nudge_types.append(path.split("/")[1])
    elif path.startswith("preferences.app_settings/"):
        p.preferences.app_settings["font"] = f"size-{n}"
    else:
        _, app, item = path.split("/")
        from urllib.parse import unquote

        p.continuity_items.add(
            app=app, item_id=unquote(item), position=f"page={n}", progress=n / 10
        )


stamps = st.builds(
    Stamp,
    wall_time_ms=st.integers(0, 5),
    logical=st.integers(0, 2),
    node_id=st.sampled_from(NODES),
)
entries = st.builds(
    Entry, stamp=stamps, value=st.one_of(st.none(), st.binary(min_size=1, max_size=3))
)
states = st.dictionaries(st.sampled_from(PATHS), entries, max_size=len(PATHS))


@given(states, states)
def test_merge_commutative(a: State, b: State) -> None:
    assert document.merge(a, b) == document.merge(b, a)


@given(states, states, states)
def test_merge_associative(a: State, b: State, c: State) -> None:
    assert document.merge(document.merge(a, b), c) == document.merge(a, document.merge(b, c))


@given(states, states)
def test_merge_idempotent(a: State, b: State) -> None:
    ab = document.merge(a, b)
    assert document.merge(ab, ab) == ab
    assert document.merge(ab, b) == ab


@given(states)
def test_state_survives_the_document_round_trip(a: State) -> None:
    # Real values (fragments of a profile), so build/state_of must reproduce them exactly.
    real: State = {}
    for i, (path, entry) in enumerate(sorted(a.items())):
        draft = profiles_pb2.Profile()
        set_value(draft, path, i)
        value = document.fields_of(draft)[path] if entry.value is not None else None
        real[path] = Entry(entry.stamp, value)
    profile = document.build(real)
    again = profiles_pb2.Profile.FromString(profile.SerializeToString())
    assert document.state_of(again) == real


# -- devices editing offline ---------------------------------------------------------------
# An edit: (device index, path, value index or None for a delete, clock step in ms).
edit_ops = st.lists(
    st.tuples(
        st.integers(0, 2),
        st.sampled_from(PATHS),
        st.one_of(st.none(), st.integers(0, 5)),
        st.integers(0, 3),
    ),
    min_size=1,
    max_size=25,
)


class Device:
    """A device editing its local view offline, stamping with its own skewed clock."""

    def __init__(self, node: str, skew_ms: int) -> None:
        self.now = 1_000_000 + skew_ms
        self.hlc = HybridClock(node, lambda: self.now)
        self.node = node
        self.view = profiles_pb2.Profile()
        self.edits: dict[str, profiles_pb2.ProfileEdit] = {}
        self.frags: dict[str, bytes] = {}

    def edit(self, path: str, value: int | None, step: int) -> Entry:
        self.now += step
        draft = profiles_pb2.Profile()
        stamp = self.hlc.tick()
        if value is not None:
            set_value(draft, path, value)
        frag = document.fields_of(draft).get(path)
        self.edits[path] = profiles_pb2.ProfileEdit(
            field_path=path, stamp=stamp.to_proto(), delete=frag is None
        )
        self.frags.pop(path, None)
        if frag is not None:
            self.frags[path] = frag
        return Entry(stamp, frag)

    def request(self) -> tuple[profiles_pb2.Profile, list[profiles_pb2.ProfileEdit]]:
        """The values of the latest edit per path, and those edits."""
        values = profiles_pb2.Profile()
        values.MergeFromString(b"".join(self.frags.values()))
        return values, list(self.edits.values())


@settings(max_examples=150, deadline=None)
@given(edit_ops, st.permutations([0, 1, 2]), st.lists(st.integers(-50, 50), min_size=3, max_size=3))
def test_offline_devices_converge_in_any_reconnect_order(
    ops: list[tuple[int, str, int | None, int]], order: list[int], skews: list[int]
) -> None:
    devices = [Device(n, s) for n, s in zip(NODES, skews, strict=True)]
    latest: dict[str, Entry] = {}  # every edit, as the oracle sees them
    per_device: list[State] = [{}, {}, {}]
    for dev, path, value, step in ops:
        entry = devices[dev].edit(path, value, step)
        per_device[dev][path] = entry
        if path not in latest or entry.sort_key() > latest[path].sort_key():
            latest[path] = entry
    # Reconnect in the given order, each applying its pending edits on the server's state.
    server: State = {}
    lost: set[tuple[str, str]] = set()
    for i in order:
        server, lost_now = document.apply(server, per_device[i])
        lost |= {(NODES[i], p) for p in lost_now}
    # Same result whatever the order: exactly the LWW winner of every path.
    assert server == latest
    # No change is lost except by LWW: each edit is the final value or lost to a greater one,
    # and an edit reported lost is indeed not the final value.
    for i in range(3):
        for path, entry in per_device[i].items():
            assert server[path] == entry or server[path].sort_key() > entry.sort_key()
            if (NODES[i], path) in lost:
                assert server[path] != entry


def _run(coro):  # type: ignore[no-untyped-def]
    return asyncio.run(coro)


@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(edit_ops, st.booleans())
def test_store_merges_devices_reconnecting_in_either_order(
    ops: list[tuple[int, str, int | None, int]], a_first: bool
) -> None:
    """Through the real store (SQLite, encryption, versions): both orders, same profile."""
    ops = [(dev % 2, *rest) for dev, *rest in ops]  # type: ignore[misc]

    async def scenario(first: int) -> profiles_pb2.Profile:
        devices = [Device("dev_a", 0), Device("dev_b", 7)]
        for dev, path, value, step in ops:
            devices[dev].edit(path, value, step)
        with tempfile.TemporaryDirectory() as tmp:
            config = ServerConfig(data_dir=Path(tmp))
            async with await Database.open(config.database) as db:
                await db.writer.execute("INSERT INTO users VALUES (1, 'ada', 0)")
                store = await open_profile_store(config, db, FakeClock())
                for i in (first, 1 - first):
                    values, edits = devices[i].request()
                    if edits:
                        # Both devices based their edits on version 0 (stale for the second).
                        await store.update(
                            1, values, edits, base_version=0, device_id=devices[i].node
                        )
                store.forget_caches()
                out = await store.get(1)
        out.ClearField("update_time")
        out.ClearField("update_device_id")
        out.ClearField("version")
        return out

    one = _run(scenario(0 if a_first else 1))
    other = _run(scenario(1 if a_first else 0))
    assert one == other
